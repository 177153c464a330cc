"""ONNX import: shapes, names, unsupported ops, and the TVM frontend workaround."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import conv_model, lstm_model, make_model
from tvmq.errors import TvmqError
from tvmq.frontend import load_onnx, parse_shape_arg, read_onnx


def paddle_reshape_model():
    """Paddle2ONNX's shape pattern: Shape -> Cast -> Slice -> Cast -> Concat -> Reshape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT, name="cast1"),
        helper.make_node("Slice", ["sf", "st", "en"], ["sl"], name="slice"),
        helper.make_node("Cast", ["sl"], ["si"], to=TensorProto.INT64, name="cast2"),
        helper.make_node("Concat", ["si", "minus1"], ["shp"], axis=0, name="concat"),
        helper.make_node("Reshape", ["x", "shp"], ["y"], name="reshape"),
    ]
    inits = [("st", np.array([0], np.int64)), ("en", np.array([1], np.int64)), ("minus1", np.array([-1], np.int64))]
    return make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 48])], inits)


def test_tvm_frontend_bug_constant_slice_before_reshape_is_still_there():
    # Upstream symptom the workaround exists for; if this starts passing, the fold can go.
    from tvm.relax.frontend.onnx import from_onnx

    with pytest.raises(Exception, match="Reshape requires the input new shape to be Shape"):
        from_onnx(paddle_reshape_model(), shape_dict={"x": [1, 3, 4, 4]})


def test_constant_shape_subgraph_is_folded_before_import():
    from tvmq.execute import HostModule

    mod, info = load_onnx(paddle_reshape_model())
    x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    np.testing.assert_array_equal(HostModule(mod)(x)[0], x.reshape(1, 48))
    assert info.outputs[0].shape == (1, 48)


def dynamic_model():
    model, _, _ = conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def test_dynamic_batch_needs_a_shape():
    with pytest.raises(TvmqError, match=r"dynamic shape .*--shape x:1,4,8,8"):
        load_onnx(dynamic_model())
    mod, info = load_onnx(dynamic_model(), shapes={"x": [2, 4, 8, 8]})
    assert info.inputs[0].shape == (2, 4, 8, 8)
    mod, info = load_onnx(dynamic_model(), sample={"x": np.zeros((3, 4, 8, 8), np.float32)})
    assert info.inputs[0].shape == (3, 4, 8, 8)


def test_shape_argument_errors():
    assert parse_shape_arg("input:1,3,48,192") == ("input", [1, 3, 48, 192])
    for bad in ("input", "input:1,x-1", "input:1,2.5", ":1,2", "input:0,3"):  # "input:1,W" names a dynamic dim
        with pytest.raises(TvmqError, match="--shape"):
            parse_shape_arg(bad)
    with pytest.raises(TvmqError, match="unknown input"):
        load_onnx(dynamic_model(), shapes={"nope": [1]})
    with pytest.raises(TvmqError, match="conflicts"):
        load_onnx(conv_model()[0], shapes={"x": [1, 4, 9, 9]})


def test_layers_are_named_after_onnx_nodes(demo_dir):
    from tvmq.passes import find_layers
    from tvmq.quantize import prepare

    mod, _ = load_onnx(demo_dir / "digits.onnx", shapes={"input": [1, 1, 8, 8]})
    names = [l.name for l in find_layers(prepare(mod)["main"])]
    assert names == ["conv0", "conv1", "conv2", "fc0", "fc1"]


def test_unsupported_op_is_named_in_the_error():
    node = helper.make_node("Relu", ["x"], ["y"], name="r")
    model = make_model([node], [("x", [1, 4])], [("y", [1, 4])])
    model.graph.node[0].op_type = "FancyOp"
    with pytest.raises(TvmqError, match="cannot read op\\(s\\) FancyOp"):
        load_onnx(model)


def test_unreadable_files(tmp_path):
    with pytest.raises(TvmqError, match="does not exist"):
        read_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(TvmqError, match="ONNX"):
        read_onnx(junk)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    model, _, _ = conv_model()
    w = model.graph.initializer[0]
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    w.ClearField("float_data")
    w.ClearField("raw_data")
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(TvmqError, match="outside the model's folder"):
        read_onnx(path)


def test_clip_with_constant_bounds_becomes_relax_clip_and_fuses_as_activation():
    from tvmq.passes import count_ops, find_layers
    from tvmq.quantize import prepare

    model, w, b = conv_model(relu=False)
    model.graph.output[0].name = "y"
    lo = onnx.numpy_helper.from_array(np.array(0.0, np.float32), "lo")
    hi = onnx.numpy_helper.from_array(np.array(6.0, np.float32), "hi")
    model.graph.initializer.extend([lo, hi])
    model.graph.node.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6"))
    mod, _ = load_onnx(model)
    mod = prepare(mod)
    assert count_ops(mod)["relax.clip"] == 1 and "relax.call_tir" not in count_ops(mod)
    act = find_layers(mod["main"])[0].chain.act
    assert (act.kind, act.lo, act.hi) == ("clip", 0.0, 6.0)


# --- LSTM: a loop kernel, or unrolled into plain ops, before import (TVM's importer has none) --


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("layout, initial", [(0, False), (0, True), (1, True)])
def test_lstm_decomposition_equals_the_onnx_reference(direction, layout, initial):
    """The unrolled graph (what a large LSTM becomes) computes what ONNX's LSTM does (its
    reference implementation; ONNX Runtime runs layout 0 only): all three outputs, every
    direction and layout."""
    import copy

    from onnx.reference import ReferenceEvaluator

    from tvmq.frontend import name_nodes
    from tvmq.recurrent import decompose_lstm

    model = lstm_model(direction=direction, layout=layout, initial=initial)
    x = np.random.default_rng(1).normal(0, 1, [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])
    x = x.astype(np.float32)
    unrolled = copy.deepcopy(model)
    name_nodes(unrolled)
    assert decompose_lstm(unrolled, loop_max_bytes=0) == 1 and "LSTM" not in {n.op_type for n in unrolled.graph.node}
    for want, got in zip(ReferenceEvaluator(model).run(None, {"x": x}), ReferenceEvaluator(unrolled).run(None, {"x": x})):
        assert want.shape == got.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction, layout, initial, hidden, steps", [
    ("bidirectional", 0, True, 6, 5),  # hidden 6: one chunk, 10 padded units
    ("reverse", 1, True, 20, 4),  # two chunks, layout 1
    ("forward", 0, False, 136, 3),  # recurrent weights over 256 KB: chunks in parallel
])
def test_lstm_loop_kernel_equals_the_onnx_reference(direction, layout, initial, hidden, steps):
    """A small LSTM runs its recurrence as one loop kernel (``tvmq_lstm``, no per-step kernels),
    and computes ONNX's LSTM (its reference implementation) within float32 rounding: every
    output, direction and layout, hidden sizes that are and are not whole chunks."""
    from onnx.reference import ReferenceEvaluator

    from tvmq.execute import HostModule
    from tvmq.passes import count_ops
    from tvmq.quantize import prepare

    model = lstm_model(steps=steps, batch=2, hidden=hidden, direction=direction, layout=layout, initial=initial)
    x = np.random.default_rng(1).normal(0, 1, [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])
    x = x.astype(np.float32)
    mod, _ = load_onnx(model)
    names = [gv.name_hint for gv, _ in mod.functions_items()]
    assert sum(n.startswith("tvmq_lstm") for n in names) == (2 if direction == "bidirectional" else 1)
    assert count_ops(mod)["relax.matmul"] == (2 if direction == "bidirectional" else 1)  # the input projections only
    got = HostModule(prepare(mod))(x)
    for want, out in zip(ReferenceEvaluator(model).run(None, {"x": x}), got):
        assert np.asarray(out).shape == want.shape
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("loop", [True, False])
def test_lstm_model_compiles_matches_onnx_runtime_and_quantizes_its_projections(loop, monkeypatch):
    """A bidirectional LSTM (20 steps) through tvmq: FP32 equals ONNX Runtime within 1e-5, and
    the int8 build keeps every output above 30 dB. Its input projections are integer kernels;
    unrolled (an LSTM too large for the loop kernel), its recurrent matmuls too; as a loop, the
    recurrence is one float kernel."""
    import onnxruntime as ort

    import tvmq.recurrent
    from conftest import Compiled, sqnr_db
    from tvmq.kernels import reduction_kernels
    from tvmq.pipeline import lower

    if not loop:
        monkeypatch.setattr(tvmq.recurrent, "LOOP_MAX_BYTES", 0)
    model = lstm_model(steps=20, features=32, hidden=16)
    rng = np.random.default_rng(2)
    samples = [{"x": rng.normal(0, 1, (20, 1, 32)).astype(np.float32)} for _ in range(6)]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = [session.run(None, s) for s in samples]
    c = Compiled(model, samples)
    for s, r in zip(samples, ref):
        for got, want in zip(c.fp32(s["x"]), r):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    for i in range(3):
        got = np.concatenate([np.asarray(c.int8(s["x"])[i]).ravel() for s in samples])
        assert sqnr_db(np.concatenate([r[i].ravel() for r in ref]), got) > 30
    # two input projections, and unrolled a recurrent matmul per step and direction (but the
    # first: its state is the zero initial state, folded away), all in integers
    assert sum(1 for lp in c.plan.layers.values() if lp.kind == "matmul" and lp.is_int8) == 2 + (0 if loop else 2 * 19)
    lowered = lower(c.qmod, "x86")
    kernels = reduction_kernels(lowered)
    assert kernels and all(k.accum_dtype == "int32" for k in kernels)
    assert sum(gv.name_hint.startswith("tvmq_lstm") for gv, _ in lowered.functions_items()) == (2 if loop else 0)


@pytest.mark.parametrize("attrs, inputs, message", [
    ({"clip": 3.0}, {}, "the clip attribute"),
    ({"input_forget": 1}, {}, "input_forget=1"),
    ({}, {"P": True}, "a peephole input"),
])
def test_unsupported_lstm_variants_are_one_error_line(attrs, inputs, message):
    from onnx import numpy_helper

    model = lstm_model(**attrs)
    if inputs.get("P"):
        model.graph.initializer.append(numpy_helper.from_array(np.zeros((2, 18), np.float32), "P"))
        model.graph.node[0].input.append("P")  # the 8th input
    with pytest.raises(TvmqError, match=message) as err:
        load_onnx(model)
    assert "\n" not in str(err.value)


_THREADED_LOOP = """
import sys, numpy as np, tvm
from tvmq.targets import get_preset
from tvmq.targets.recurrence import lstm_recurrence
from tvmq.tune import _random_args, _run
steps, hidden, reverse = int(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3]))
assert tvm.runtime.num_threads() == 2
outs = []
for parallel in (True, False):  # the same inputs to both
    func = lstm_recurrence(steps, 1, hidden, reverse, parallel=parallel).with_attr("global_symbol", "main")
    outs.append(_run(func, get_preset("x86").tvm_target(), _random_args(func, np.random.default_rng(0)))[4:])
for a, b in zip(*outs):
    assert np.array_equal(a, b) and np.abs(a).max() > 0, "threads computed other values"
print("ok")
"""


@pytest.mark.parametrize("steps, hidden, reverse", [(4, 136, 0), (3, 136, 1), (5, 40, 0)])
def test_lstm_loop_kernel_in_threads_computes_what_one_thread_does(steps, hidden, reverse):
    """In parallel each thread takes one range of chunks, backwards on odd steps (for its L2):
    with 2 threads (9 chunks: ranges of 5 and 4; 3 chunks: 2 and 1), even and odd step counts,
    both directions, every output equals the serial kernel's bit for bit."""
    import os
    import subprocess
    import sys

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs")
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, "-c", _THREADED_LOOP, str(steps), str(hidden), str(reverse)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_lstm_loop_kernel_unrolls_for_targets_it_was_not_written_for():
    """UnrollLSTM (a GPU build's first pass) replaces the CPU loop kernel with per-step ops that
    compute the same: checked here on the CPU, against the loop kernel itself."""
    from tvmq.execute import HostModule
    from tvmq.passes import UnrollLSTM, count_ops
    from tvmq.quantize import prepare

    model = lstm_model(steps=4, batch=2, hidden=20, direction="bidirectional", initial=True)
    x = np.random.default_rng(3).normal(0, 1, (4, 2, 8)).astype(np.float32)
    mod = prepare(load_onnx(model)[0])
    unrolled = UnrollLSTM()(mod)
    assert not any(gv.name_hint.startswith("tvmq_lstm") for gv, _ in unrolled.functions_items())
    assert count_ops(unrolled)["relax.matmul"] == 2 + 2 * 4  # projections, then one per step and direction
    for want, got in zip(HostModule(mod)(x), HostModule(unrolled)(x)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-6)


def test_a_float_build_runs_every_lstm_as_a_loop(monkeypatch):
    """An LSTM too large for the loop kernel in an int8 build (unrolled, so its recurrent
    matmuls can be int8) is a loop kernel in an FP32 build, which has no int8 matmul to keep."""
    import tvmq.recurrent
    from tvmq.compile import quantized_module
    from tvmq.targets import get_preset

    monkeypatch.setattr(tvmq.recurrent, "LOOP_MAX_BYTES", 0)  # every LSTM "too large"
    qm = quantized_module(lstm_model(steps=3, hidden=16), get_preset("x86"), precision="fp32")
    names = [gv.name_hint for gv, _ in qm.module.functions_items()]
    assert sum(n.startswith("tvmq_lstm") for n in names) == 2
    unrolled, _ = load_onnx(lstm_model(steps=3, hidden=16))
    assert not any(gv.name_hint.startswith("tvmq_lstm") for gv, _ in unrolled.functions_items())
