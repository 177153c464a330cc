"""Pre-quantized models: QDQ / QAT graphs and QLinear ops compile to the same integer kernels,
their scales honoured exactly, and agree with ONNX Runtime running the same file."""

import json

import numpy as np
import onnx
import pytest
from conftest import make_model, sqnr_db
from onnx import TensorProto, helper, numpy_helper

from tvmq.cli import main
from tvmq.targets import get_preset

ort = pytest.importorskip("onnxruntime")


def reference_session(path):
    """ONNX Runtime with graph optimizations off: each QuantizeLinear/DequantizeLinear and
    integer op as the ONNX spec defines it, the exact reference. Its optimized int8 kernels
    are not one: on AVX2 CPUs (no VNNI) they saturate u8 x s8 pair sums in int16 (seen up to
    216 output steps off on the QLinearConv model below)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

X_S, X_Z = 0.02, 128  # input:  uint8
H_S, H_Z = 0.03, 0  # hidden: uint8 after relu
Y_S, Y_Z = 0.05, 120  # output: uint8


def _weights(rng, cout, cin, k):
    w_scale = rng.uniform(0.002, 0.01, cout).astype(np.float32)  # "learned" per-channel scales
    w_q = rng.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
    b_q = rng.integers(-2000, 2000, cout).astype(np.int32)
    return w_q, w_scale, b_q


def qat_model(seed=0):
    """x -> Q/DQ -> conv(int8 W, int32 b) -> relu -> Q/DQ -> conv -> Q/DQ -> y (float)."""
    rng = np.random.default_rng(seed)
    w1, s1, b1 = _weights(rng, 8, 4, 3)
    w2, s2, b2 = _weights(rng, 8, 8, 3)
    init = {
        "xs": np.float32(X_S), "xz": np.uint8(X_Z), "hs": np.float32(H_S), "hz": np.uint8(H_Z),
        "ys": np.float32(Y_S), "yz": np.uint8(Y_Z), "w1": w1, "w1s": s1, "w1z": np.zeros(8, np.int8), "b1": b1,
        "b1s": (X_S * s1).astype(np.float32), "w2": w2, "w2s": s2, "w2z": np.zeros(8, np.int8), "b2": b2,
        "b2s": (H_S * s2).astype(np.float32), "bz": np.zeros(8, np.int32),
    }
    q = lambda i, s, z, o: helper.make_node("QuantizeLinear", [i, s, z], [o], name=o)  # noqa: E731
    dq = lambda i, s, z, o, **kw: helper.make_node("DequantizeLinear", [i, s, z], [o], name=o, **kw)  # noqa: E731
    nodes = [
        q("x", "xs", "xz", "xq"), dq("xq", "xs", "xz", "xd"),
        dq("w1", "w1s", "w1z", "w1d", axis=0), dq("b1", "b1s", "bz", "b1d", axis=0),
        helper.make_node("Conv", ["xd", "w1d", "b1d"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        q("r1", "hs", "hz", "hq"), dq("hq", "hs", "hz", "hd"),
        dq("w2", "w2s", "w2z", "w2d", axis=0), dq("b2", "b2s", "bz", "b2d", axis=0),
        helper.make_node("Conv", ["hd", "w2d", "b2d"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
        q("c2", "ys", "yz", "yq"), dq("yq", "ys", "yz", "y"),
    ]
    return make_model(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 8, 8, 8])], init.items())


def qlinear_model(seed=0):
    """The same network with QLinearConv nodes: uint8 in, uint8 out."""
    rng = np.random.default_rng(seed)
    w1, s1, b1 = _weights(rng, 8, 4, 3)
    w2, s2, b2 = _weights(rng, 8, 8, 3)
    init = {
        "xs": np.float32(X_S), "xz": np.uint8(X_Z), "hs": np.float32(H_S), "hz": np.uint8(H_Z),
        "ys": np.float32(Y_S), "yz": np.uint8(Y_Z), "w1": w1, "w1s": s1, "w1z": np.zeros(8, np.int8), "b1": b1,
        "w2": w2, "w2s": s2, "w2z": np.zeros(8, np.int8), "b2": b2}
    nodes = [
        helper.make_node("QLinearConv", ["x", "xs", "xz", "w1", "w1s", "w1z", "hs", "hz", "b1"], ["h"], name="conv1",
                         kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("QLinearConv", ["h", "hs", "hz", "w2", "w2s", "w2z", "ys", "yz", "b2"], ["y"], name="conv2",
                         kernel_shape=[3, 3], pads=[1] * 4),
    ]
    return make_model(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 8, 8, 8])], init.items(), opset=13,
                      elem_type=TensorProto.UINT8)


def _compile(model, tmp_path, name, target="x86"):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    out = tmp_path / name
    assert main(["compile", str(path), "-o", str(out), "--target", target]) == 0  # no --calib: the model has its scales
    return path, out


# x86-avx2 runs on every x86 CI machine and has no dot product: its vpmaddwd micro-kernel must be as exact.
@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_qat_model_keeps_its_scales_and_matches_onnx_runtime(tmp_path, target):
    from tvmq.runtime import Bundle

    path, out = _compile(qat_model(), tmp_path, "qat", target)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "qdq"
    conv1, conv2 = plan["layers"]["conv1"], plan["layers"]["conv2"]
    assert (conv1["precision"], conv2["precision"]) == ("int8", "int8")
    assert conv1["inputs"][0] == {"dtype": "uint8", "scale": pytest.approx(X_S), "zero_point": X_Z}
    assert conv1["output"]["scale"] == pytest.approx(H_S) and conv2["inputs"][0]["scale"] == pytest.approx(H_S)
    w1s = numpy_helper.to_array(next(i for i in onnx.load(path).graph.initializer if i.name == "w1s"))
    np.testing.assert_array_equal(np.float32(conv1["weight"]["scale"]), w1s)  # the learned weight scales
    m = json.loads((out / "manifest.json").read_text())
    assert m["kernels"] and all(k["accumulator"] == "int32" for k in m["kernels"])

    bundle, session = Bundle(out), reference_session(path)
    rng = np.random.default_rng(1)
    got, want = [], []
    for _ in range(20):
        x = rng.uniform(-2.5, 2.5, (1, 4, 8, 8)).astype(np.float32)
        got.append(bundle.run({"x": x})["y"])
        want.append(session.run(None, {"x": x})[0])
    np.testing.assert_array_equal(np.stack(got), np.stack(want))  # the same integers, scaled alike


def tie_add_model():
    """``a + b`` between two quantized activations, with the scales of one of PP-OCR's classifier layers (the ``+ 3``
    of a hard-swish): at ``a = 0, b = 3`` the sum lands on 127.5 output steps in exact arithmetic."""
    sa, za, sb, sc = 0.09059707820415497, 126, 0.0117647061124444, 0.0235294122248888
    init = {"sa": np.float32(sa), "za": np.uint8(za), "sb": np.float32(sb), "sc": np.float32(sc), "z": np.uint8(0)}
    q = lambda i, s, z, o: helper.make_node("QuantizeLinear", [i, s, z], [o], name=o)  # noqa: E731
    dq = lambda i, s, z, o: helper.make_node("DequantizeLinear", [i, s, z], [o], name=o)  # noqa: E731
    nodes = [
        q("a", "sa", "za", "aq"), dq("aq", "sa", "za", "ad"), q("b", "sb", "z", "bq"), dq("bq", "sb", "z", "bd"),
        helper.make_node("Add", ["ad", "bd"], ["s"], name="add"), q("s", "sc", "z", "sq"), dq("sq", "sc", "z", "y"),
    ]
    model = make_model(nodes, [("a", [1, 256]), ("b", [1, 256])], [("y", [1, 256])], init.items(), opset=13)
    return model, sa, za, sb, sc


def test_integer_add_rounds_like_onnx_runtime_on_ties(tmp_path):
    """Every level of ``a`` plus ``b = 3``: tvmq's integer add equals ONNX Runtime's QLinearAdd bit for bit.

    ONNX Runtime folds both zero points into one float32 constant and sums with fused multiply-adds, so the level
    that is an exact tie rounds down there and up (half to even, 127.5 -> 128) in exact arithmetic. A pre-quantized
    model is requantized the way its reference runtime does it, so the two agree everywhere, not just within a step."""
    from tvmq.runtime import Bundle

    model, sa, za, sb, sc = tie_add_model()
    path, out = _compile(model, tmp_path, "tie")
    plan = json.loads((out / "plan.json").read_text())
    assert plan["layers"]["add"]["precision"] == "int8" and plan["requantize"] == "float"
    feed = {"a": ((np.arange(256) - za) * np.float32(sa)).astype(np.float32)[None],
            "b": np.full((1, 256), 255 * np.float32(sb), np.float32)}
    got = Bundle(out).run(feed)["y"]
    # QLinearAdd's own rounding is the point here: ONNX Runtime's optimized graph runs it.
    want = ort.InferenceSession(str(path)).run(None, feed)[0]
    np.testing.assert_array_equal(got, want)
    exact = (np.arange(256) - za) * (sa / sc) + 255 * (sb / sc)
    tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-6
    assert tie.sum() == 1  # the input does reach the tie
    # --requantize fixed_point is honoured: integer arithmetic rounds the tie up, one step from ONNX Runtime.
    out_fp = tmp_path / "tie-fixed"
    assert main(["compile", str(path), "-o", str(out_fp), "--requantize", "fixed_point"]) == 0
    assert json.loads((out_fp / "plan.json").read_text())["requantize"] == "fixed_point"
    fixed = Bundle(out_fp).run(feed)["y"]
    np.testing.assert_array_equal(fixed[~tie[None]], want[~tie[None]])
    np.testing.assert_allclose(fixed[tie[None]] - want[tie[None]], sc, rtol=1e-5)


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_qlinear_conv_graph_is_rewritten_and_matches_onnx_runtime(tmp_path, target):
    from tvmq.runtime import Bundle

    path, out = _compile(qlinear_model(), tmp_path, "qlinear", target)
    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs"][0]["dtype"] == "uint8" and m["outputs"][0]["dtype"] == "uint8"
    # uint8 activations (x86 vpmaddwd reads them widened to int16) x int8 weights
    operand = get_preset(target).micro_kernel.operand_dtype
    assert len(m["kernels"]) == 2 and all(k["operands"] == [operand, "int8"] for k in m["kernels"])
    bundle, session = Bundle(out), reference_session(path)
    rng = np.random.default_rng(2)
    xs = [rng.integers(0, 256, (1, 4, 8, 8)).astype(np.uint8) for _ in range(20)]
    got = np.stack([bundle.run({"x": x})["y"] for x in xs])
    want = np.stack([session.run(None, {"x": x})[0] for x in xs])
    np.testing.assert_array_equal(got, want)


def test_conv_integer_graph_is_exact(tmp_path):
    """ConvInteger's int32 result is exact integer arithmetic: tvmq must equal it bit for bit."""
    from tvmq.runtime import Bundle

    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (6, 3, 3, 3)).astype(np.int8)
    init = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.uint8(100), "xz")]
    node = helper.make_node("ConvInteger", ["x", "w", "xz"], ["y"], name="ci", kernel_shape=[3, 3])
    graph = helper.make_graph([node], "ci", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 6, 4, 4])], initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path, out = _compile(model, tmp_path, "convint")
    bundle, session = Bundle(out), reference_session(path)
    x = rng.integers(0, 256, (1, 3, 6, 6)).astype(np.uint8)
    np.testing.assert_array_equal(bundle.run({"x": x})["y"], session.run(None, {"x": x})[0])


def test_export_qdq_round_trip_runs_in_onnx_runtime_at_tvmq_accuracy(tmp_path, demo_dir):
    from tvmq.runtime import Bundle

    exported = tmp_path / "digits.int8.onnx"
    assert main(["export-qdq", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"),
                 "-o", str(exported)]) == 0
    model = onnx.load(exported)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10
    int8_weights = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_weights) == 5  # 3 conv + 2 gemm weights, stored as int8
    assert not [i for i in model.graph.initializer if i.name in ("conv0.w", "fc0.w")]  # float copies gone

    bundle_dir = tmp_path / "tvmq"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--plan", str(exported.with_suffix(".plan.json")),
                 "-o", str(bundle_dir)]) == 0
    test = np.load(demo_dir / "digits_test.npz")
    session, bundle = reference_session(exported), Bundle(bundle_dir)
    acc_ort = np.mean([session.run(None, {"input": x[None]})[0].argmax() == y for x, y in zip(test["x"], test["y"])])
    acc_tvmq = np.mean([bundle.run({"input": x[None]})["logits"].argmax() == y for x, y in zip(test["x"], test["y"])])
    assert abs(acc_ort - acc_tvmq) <= 0.002, (acc_ort, acc_tvmq)

    # And back: tvmq reads the exported file's scales as its plan.
    again = tmp_path / "again"
    assert main(["compile", str(exported), "--shape", "input:1,1,8,8", "-o", str(again)]) == 0
    first = json.loads(exported.with_suffix(".plan.json").read_text())["layers"]["conv1"]["inputs"][0]
    second = json.loads((again / "plan.json").read_text())["layers"]["conv1"]["inputs"][0]
    assert first["scale"] == pytest.approx(second["scale"], rel=1e-6) and first["zero_point"] == second["zero_point"]


def test_export_refuses_quantized_input_and_existing_output(tmp_path, demo_dir, capsys):
    existing = tmp_path / "x.onnx"
    existing.write_bytes(b"keep")
    assert main(["export-qdq", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"),
                 "-o", str(existing)]) == 2
    assert "exists" in capsys.readouterr().err and existing.read_bytes() == b"keep"
    path = tmp_path / "qat.onnx"
    onnx.save(qat_model(), path)
    assert main(["export-qdq", str(path), "-o", str(tmp_path / "y.onnx")]) == 2
    assert "already quantized" in capsys.readouterr().err


def paddle_style_model(seed=0):
    """Opset 11, as PaddlePaddle exports: Conv -> BatchNormalization -> Relu, and a Conv whose bias
    is Add(conv, Reshape(constant)), then pooling and a Gemm."""
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {
        "w1": f32(8, 3, 3, 3) * 0.3, "gamma": rng.uniform(0.3, 3.0, 8).astype(np.float32), "beta": f32(8),
        "mean": f32(8) * 0.5, "var": rng.uniform(0.2, 4.0, 8).astype(np.float32), "w2": f32(8, 8, 3, 3) * 0.2,
        "b2": f32(8) * 2.0, "b2_shape": np.array([1, 8, 1, 1], np.int64), "fc_w": f32(4, 8) * 0.5, "fc_b": f32(4) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn1"], epsilon=1e-5),
        helper.make_node("Relu", ["bn1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["b2", "b2_shape"], ["b2r"]),
        helper.make_node("Add", ["c2", "b2r"], ["c2b"]),
        helper.make_node("Relu", ["c2b"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    return make_model(nodes, [("x", [1, 3, 12, 12])], [("y", [1, 4])], inits.items(), opset=11)


def test_export_folds_batchnorm_and_bias_add_like_the_integer_program(tmp_path):
    """An opset-11 model with unfolded BatchNormalization and Reshape'd biases exports as opset 13
    with the folded weights (what tvmq computes), so ONNX Runtime on the export tracks tvmq."""
    from tvmq.runtime import Bundle

    path = tmp_path / "paddle.onnx"
    onnx.save(paddle_style_model(), path)
    rng = np.random.default_rng(1)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(16):
        np.save(calib / f"{i}.npy", rng.standard_normal((1, 3, 12, 12)).astype(np.float32))
    exported = tmp_path / "paddle.qdq.onnx"
    assert main(["export-qdq", str(path), "--calib", str(calib), "-o", str(exported)]) == 0
    model = onnx.load(exported)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2 and ops.count("Add") == 0
    assert main(["compile", str(path), "--plan", str(exported.with_suffix(".plan.json")), "-o", str(tmp_path / "b")]) == 0
    session, bundle, ref = reference_session(exported), Bundle(tmp_path / "b"), reference_session(path)
    xs = [rng.standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(8)]
    ours = np.concatenate([bundle.run({"x": x})["y"] for x in xs])
    theirs = np.concatenate([session.run(None, {"x": x})[0] for x in xs])
    fp32 = np.concatenate([ref.run(None, {"x": x})[0] for x in xs])
    assert sqnr_db(fp32, theirs) >= 25, sqnr_db(fp32, theirs)  # unfolded weights with folded scales: ~0 dB
    assert sqnr_db(ours, theirs) >= 35, sqnr_db(ours, theirs)


def test_asymmetric_uint8_weights_are_requantized_with_a_warning(tmp_path, capsys):
    """Weights a quantizer took for activations (uint8, zero point 10) have no symmetric int8
    reading: the layer still compiles to an integer kernel, and the user is told why its outputs
    differ from the file's arithmetic."""
    model = qat_model()
    rng = np.random.default_rng(5)
    for init in model.graph.initializer:
        if init.name == "w1":
            init.CopyFrom(numpy_helper.from_array(rng.integers(0, 256, (8, 4, 3, 3)).astype(np.uint8), "w1"))
        if init.name == "w1z":
            init.CopyFrom(numpy_helper.from_array(np.full(8, 10, np.uint8), "w1z"))
    _, out = _compile(model, tmp_path, "asym")
    err = capsys.readouterr().err
    assert "1 layer(s) (conv1) hold weights quantized asymmetrically" in err and "quant_pre_process" in err
    kernels = json.loads((out / "manifest.json").read_text())["kernels"]
    assert len(kernels) == 2 and all(k["accumulator"] == "int32" for k in kernels)
