"""Dynamic shapes: one bundle compiled for a range of sizes (``--shape x:1,3,12,W --dim W=8..256``).

The reference for a dynamic bundle at a width is the static bundle compiled for that width from
the same plan: the integer kernels must give the same integers (bit-equal outputs), whatever
tiles the two schedules chose.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import tvm
from onnx import helper

from tvmq.compile import compile_model
from tvmq.errors import TvmqError
from tvmq.metrics import sample_sqnr
from tvmq.runtime import Bundle, BundleError
from tvmq.testing import make_model, primfuncs

H, C = 12, 3
RANGE = (8, 256)
CLASSES = 20  # at least a vector of them: the softmax runs tvmq's row kernel


def _text_line_model(seed=0):
    """A small OCR-recogniser-like model over a variable width: convs (one strided, one depthwise),
    a residual add, then the columns as a sequence through self-attention and a matmul (CTC-style
    head)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * (2.0 / np.prod(shape[1:])) ** 0.5).astype(np.float32)

    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
        helper.make_node("Add", ["c2", "r1"], ["a2"]),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("Conv", ["r2", "wd", "bd"], ["cd"], pads=[1, 1, 1, 1], group=32),
        # an affine chain (FoldAffineChains must fold it on a dynamic shape as on a static one)
        helper.make_node("Mul", ["cd", "gamma"], ["g"]),
        helper.make_node("Add", ["g", "beta"], ["gb0"]),
        helper.make_node("Mul", ["gb0", "sixth"], ["gb"]),
        helper.make_node("Reshape", ["gb", "seq_shape"], ["s"]),
        helper.make_node("Transpose", ["s"], ["t"], perm=[0, 2, 1]),
        # self-attention over the columns: a softmax whose rows are as long as the line (any
        # length, shorter than a vector at the narrowest widths)
        helper.make_node("MatMul", ["t", "wq"], ["q"]),
        helper.make_node("Transpose", ["q"], ["k"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "k"], ["qk"]),
        helper.make_node("Softmax", ["qk"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "t"], ["ctx"]),
        helper.make_node("Add", ["ctx", "t"], ["u"]),
        helper.make_node("MatMul", ["u", "wf"], ["m"]),
        helper.make_node("Softmax", ["m"], ["logits"], axis=-1),  # tvmq's row kernel over T rows
    ]
    inits = [("w0", w(16, C, 3, 3)), ("b0", rng.standard_normal(16).astype(np.float32) * 0.1),
             ("w1", w(32, 16, 3, 3)), ("b1", rng.standard_normal(32).astype(np.float32) * 0.1),
             ("w2", w(32, 32, 1, 1)), ("b2", rng.standard_normal(32).astype(np.float32) * 0.1),
             ("wd", w(32, 1, 3, 3)), ("bd", rng.standard_normal(32).astype(np.float32) * 0.1),
             ("gamma", rng.uniform(0.5, 1.5, (1, 32, 1, 1)).astype(np.float32)),
             ("beta", rng.uniform(-0.2, 0.2, (1, 32, 1, 1)).astype(np.float32)),
             ("sixth", np.array(1 / 6, np.float32) * 5.0),
             ("seq_shape", np.array([1, 32 * H // 2, -1], np.int64)), ("wq", w(32 * H // 2, 8)),
             ("wf", w(32 * H // 2, CLASSES) * 0.3)]
    # the attention probabilities are an output too: float, not rounded away by a requantize
    return make_model(nodes, [("x", [1, C, H, "W"])], [("logits", [1, "T", CLASSES]), ("p", [1, "T", "T"])], inits)


def _line(rng, width):
    return rng.uniform(-1, 1, (1, C, H, width)).astype(np.float32)


def _calib(seed=1, widths=(24, 40, 64, 128, 200)):
    """Calibration samples of several widths."""
    rng = np.random.default_rng(seed)
    return [{"x": _line(rng, w)} for w in widths]


def _lowered_for_vnni(model, calib, shapes, dims):
    """``model`` quantized and lowered for AVX-512 VNNI, whatever this host is (nothing is built
    or run): the kernel structure that ISA's plan and schedules give, which tests check."""
    from tvmq.compile import quantized_module
    from tvmq.pipeline import lower
    from tvmq.targets import get_preset

    preset = get_preset("x86-avx512vnni")
    return lower(quantized_module(model, preset, raw=calib, shapes=shapes, dims=dims).module, preset)


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamic")
    model = _text_line_model()
    result = compile_model(model, root / "dyn", calib=_calib(), shapes={"x": [1, C, H, "W"]}, dims={"W": RANGE})
    return model, root, result


def test_manifest_records_the_range_and_every_kernel_is_integer(dynamic):
    _, root, result = dynamic
    m = json.loads((root / "dyn" / "manifest.json").read_text())
    assert m["inputs"] == [{"name": "x", "shape": [1, C, H, "W"], "dtype": "float32"}]
    assert m["dims"] == {"W": list(RANGE)}
    assert m["outputs"][0]["shape"] == [1, "(W - 1) // 2 + 1", CLASSES]
    int8 = [n for n, lp in result.plan.layers.items() if lp.is_int8 and lp.kind != "add"]
    assert len(int8) >= 4  # the three dense convs and the matmul, at least
    integer = [k for k in m["kernels"] if k["accumulator"] == "int32"]
    assert len(integer) >= len(int8) - 1  # the depthwise conv may stay float where int8 does not pay
    assert all(k["operands"] in (["uint8", "int8"], ["int16", "int8"], ["int8", "int8"]) for k in integer)
    # the dot-product kernels are tensorized with the ISA's micro-kernel although the width is
    # symbolic (they compute a multiple of their pixel tile and crop); depthwise has no dot product
    dots = [k for k in integer if k["block"].startswith("tvmq_dot_")]
    assert len(dots) >= 4 and all(k["intrinsic"] for k in dots)


def test_reshapes_of_dynamic_shapes_are_views_not_copies(dynamic):
    """TOPI's reshape kernel on a symbolic extent indexes with a division and a modulo per element,
    and TVM keeps it as a copy; tvmq keeps such reshapes as Relax reshapes (views at run time)."""
    from tvmq.pipeline import lower

    _, _, result = dynamic
    lowered = lower(result.module, "x86")
    kernels = list(primfuncs(lowered))
    assert not [k for k in kernels if k.startswith("reshape")], kernels
    assert "vm.builtin.reshape" in lowered["main"].script()


def test_symbolic_sizes_and_shapes_are_built_once_per_call(dynamic):
    """Every kernel whose buffers have only derived widths takes ``W`` as an argument, and every
    intermediate tensor gets its symbolic shape; TVM's VM builds each at its use (a builtin call
    apiece: 99 + 120 per call of PP-OCRv4 rec). tvmq binds each distinct value once
    (``ShareSymbolicValues``); the per-width tests below check the values."""
    import re

    from tvmq.pipeline import lower

    _, _, result = dynamic
    main = lower(result.module, "x86")["main"].script()
    built = re.findall(r'R\.call_packed\("vm\.builtin\.make_(?:shape|prim_value)", (.*)\)$', main, re.M)
    assert built and len(built) == len(set(built)), built  # no value built twice
    (size,) = re.findall(r'^\s*(\w+): T\.int64 = R\.call_packed\("vm\.builtin\.make_prim_value"', main, re.M)
    assert len(re.findall(rf"[(,] ?{size}[,)]", main)) >= 3  # the one W goes to several kernels


def test_depthwise_epilogue_over_a_dynamic_width_runs_in_the_row_loop(dynamic):
    """The depthwise kernel's requantize epilogue is computed inside the one parallel loop over
    rows, not as a second pass over an int32 buffer; no wider than the kernel's tile multiple,
    it runs per channel block of a row (channel blocks outside the column tiles). The per-width
    tests below check that every column is written (widths 8, 37, 101: no tile divides). The
    structure is VNNI's (the AVX2 plan keeps depthwise float, where int8 does not pay)."""
    model, _, _ = dynamic
    lowered = _lowered_for_vnni(model, _calib(), {"x": [1, C, H, "W"]}, {"W": RANGE})
    depthwise = list(primfuncs(lowered, "depthwise").values())
    assert len(depthwise) == 1 and "int32" in depthwise[0].script()
    assert depthwise[0].script().count("T.parallel") == 1
    assert "for ch_0 in range" in depthwise[0].script()  # not `for x_0, ch_0 in T.grid`


def test_depthwise_with_the_next_convs_pad_fused_in_runs_in_one_parallel_loop(tmp_path):
    """A pointwise conv after a depthwise one: the conv's spare columns (a pad) fuse into the
    depthwise kernel, whose epilogue is then wider than its output. It still runs per row in
    the one parallel loop, as do the convs' epilogues, and every column is written: bit-equal
    to static builds at widths no tile divides. The structure checked is VNNI's (lowered for it
    on any host; on AVX2 the 27-MAC first conv and the depthwise stay float); the bundles run
    on this host's ISA."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)

    def w(*shape):
        return (rng.standard_normal(shape) * (2.0 / np.prod(shape[1:])) ** 0.5).astype(np.float32)

    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "wd"], ["cd"], pads=[1, 1, 1, 1], group=32),
             helper.make_node("Relu", ["cd"], ["rd"]),
             helper.make_node("Conv", ["rd", "wp"], ["y"])]
    model = make_model(nodes, [("x", [1, C, H, "W"])], [("y", [1, 32, H, "W"])],
                       [("w0", w(32, C, 3, 3)), ("wd", w(32, 1, 3, 3)), ("wp", w(32, 32, 1, 1))])
    calib = [{"x": _line(rng, width)} for width in (24, 64, 200)]
    compile_model(model, tmp_path / "dyn", calib=calib, shapes={"x": [1, C, H, "W"]}, dims={"W": RANGE})
    lowered = _lowered_for_vnni(model, calib, {"x": [1, C, H, "W"]}, {"W": RANGE})
    depthwise = {name: f.script() for name, f in primfuncs(lowered, "depthwise").items()}
    assert len(depthwise) == 1 and "_pad" in list(depthwise)[0], sorted(depthwise)
    assert list(depthwise.values())[0].count("T.parallel") == 1
    # the int8 convs (12 rows) run their rows in parallel and each row's epilogue after it
    convs = {name: f.script() for name, f in primfuncs(lowered, "tvmq_conv2d").items()}
    assert len(convs) == 2 and all(text.count("T.parallel") == 1 and "vpdpbusd" in text for text in convs.values())
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for width in (13, 37):
        x = _line(np.random.default_rng(width), width)
        compile_model(model, tmp_path / f"s{width}", plan=tmp_path / "dyn" / "plan.json", shapes={"x": [1, C, H, width]})
        out = Bundle(tmp_path / "dyn").run({"x": x})["y"]
        np.testing.assert_array_equal(out, Bundle(tmp_path / f"s{width}").run({"x": x})["y"])
        assert sample_sqnr(session.run(None, {"x": x})[0], out) > 25.0


def test_matmul_with_large_weights_over_dynamic_rows(tmp_path):
    """An int8 matmul whose weights outweigh its activations (64 x 4101, 262 KB: a recogniser's
    class head) over a dynamic row count runs its channel blocks outermost, each block's weights
    read once for all row tiles, and its epilogue over the odd class count runs in vectors (the
    last one predicated) with the rows in parallel; bit-equal to static builds. The structure
    checked is VNNI's, lowered for it on any host; the bundles run on this host's ISA."""
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    classes = 4101
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [1, "T", 64])],
                       [("y", [1, "T", classes])], [("w", (rng.standard_normal((64, classes)) / 8).astype(np.float32))])
    calib = [{"x": rng.uniform(-1, 1, (1, t, 64)).astype(np.float32)} for t in (5, 16, 40)]
    compile_model(model, tmp_path / "dyn", calib=calib, shapes={"x": [1, "T", 64]}, dims={"T": (1, 64)})
    lowered = _lowered_for_vnni(model, calib, {"x": [1, "T", 64]}, {"T": (1, 64)})
    (text,) = [f.script() for f in primfuncs(lowered, "tvmq_matmul").values()]
    assert "vpdpbusd" in text
    assert "for i2_0_0_i0_i1_0_fused in T.parallel" in text  # channel blocks outermost, then row tiles
    assert f"< T.int64({classes})" in text and text.count("T.parallel") == 2  # the epilogue's rows too
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for rows in (6, 13):
        x = rng.uniform(-1, 1, (1, rows, 64)).astype(np.float32)
        compile_model(model, tmp_path / f"s{rows}", plan=tmp_path / "dyn" / "plan.json", shapes={"x": [1, rows, 64]})
        out = Bundle(tmp_path / "dyn").run({"x": x})["y"]
        np.testing.assert_array_equal(out, Bundle(tmp_path / f"s{rows}").run({"x": x})["y"])
        assert sample_sqnr(session.run(None, {"x": x})[0], out) > 30.0


def test_float_kernels_over_a_dynamic_width_compute_a_tile_multiple(tmp_path):
    """FP32 convs and matmuls over a symbolic width (or row count) compute a multiple of their
    pixel tile and crop, as the int8 ones do: a predicated last tile (a ``T.where`` per pixel)
    kept the accumulators in memory, 3x slower than static on PP-OCRv4 rec. Checked against
    ONNX Runtime at widths no tile divides."""
    import onnxruntime as ort

    from tvmq.pipeline import lower

    model = _text_line_model()
    result = compile_model(model, tmp_path / "fp32", precision="fp32", shapes={"x": [1, C, H, "W"]}, dims={"W": RANGE})
    lowered = lower(result.module, "x86")
    fma = {name: f.script() for name, f in primfuncs(lowered, "tvmq_fma").items()}
    assert len([n for n in fma if "conv2d" in n]) >= 3 and [n for n in fma if "matmul" in n], sorted(fma)
    assert not [n for n, text in fma.items() if "T.where" in text]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for width in (8, 37, 101):
        x = _line(np.random.default_rng(width), width)
        ref = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(Bundle(tmp_path / "fp32").run({"x": x})["logits"], ref, rtol=1e-4, atol=1e-5)


def test_parallel_loops_over_a_dynamic_extent_use_threads_only_when_big_enough():
    """A parallel loop over a symbolic extent becomes ``if extent x inner work >= 2048: parallel
    else serial`` (a static build decides that at compile time), and so does a constant extent
    over symbolic inner loops (the 8 heads of an attention over a text line's columns: 2.2 us in
    threads for 0.3 serial at width 48). Constant nests, reductions, and loops whose every
    iteration is worth a thread are left alone. Both copies compute the same."""
    import tvm
    from tvm.script import tirx as T

    from tvmq.targets.parallel import serial_when_small

    @T.prim_func(s_tir=True)
    def scale(a: T.handle, b: T.handle, c: T.Buffer((4, 64), "float32"), d: T.Buffer((4, 64), "float32"),
              e: T.handle, f: T.handle):
        n = T.int64()
        x = T.match_buffer(a, (n, 64), "float32")
        y = T.match_buffer(b, (n, 64), "float32")
        z = T.match_buffer(e, (8, n), "float32")
        r = T.match_buffer(f, (8,), "float32")
        for h in T.parallel(8):  # constant extent, symbolic work inside
            for j in range(n):
                with T.sblock("z"):
                    vh, vj = T.axis.remap("SS", [h, j])
                    z[vh, vj] = x[vj, vh] + T.float32(1)
        for h in T.parallel(8):  # a reduction: its schedule decides
            for j in range(n):
                with T.sblock("r"):
                    vh, vj = T.axis.remap("SR", [h, j])
                    with T.init():
                        r[vh] = T.float32(0)
                    r[vh] = r[vh] + x[vj, vh]
        for i in T.parallel(n):
            for j in T.vectorized(64):
                with T.sblock("y"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    y[vi, vj] = x[vi, vj] * T.float32(2)
        for i in T.parallel(4):  # constant extent: the schedule already chose
            for j in range(64):
                with T.sblock("d"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    d[vi, vj] = c[vi, vj]

    out = serial_when_small(scale)
    text = out.script()
    assert "T.parallel(n)" in text and "for i_serial in range(n)" in text and "if n * T.int64(64) >= T.int64(2048)" in text
    assert text.count("T.parallel(4)") == 1
    assert "if T.int64(8) * n >= T.int64(2048)" in text and text.count("T.parallel(8)") == 2
    assert text.count("if ") == 2  # the reduction's loop is not versioned
    assert serial_when_small(scale, minimum=8).script() == scale.script()  # each row, each head worth a thread
    lib = tvm.compile(tvm.IRModule({"main": out}), "llvm")
    for rows in (3, 300):  # one below the threshold, one above
        x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
        y, c = tvm.runtime.tensor(np.zeros_like(x)), tvm.runtime.tensor(np.ones((4, 64), np.float32))
        z, r = tvm.runtime.tensor(np.zeros((8, rows), np.float32)), tvm.runtime.tensor(np.zeros(8, np.float32))
        lib(tvm.runtime.tensor(x), y, c, tvm.runtime.tensor(np.zeros((4, 64), np.float32)), z, r)
        np.testing.assert_array_equal(y.numpy(), x * 2)
        np.testing.assert_array_equal(z.numpy(), x[:, :8].T + np.float32(1))


@pytest.mark.parametrize("rows, fused", [(26, False), (3, True)])
def test_a_dynamic_width_stays_out_of_the_parallel_loop_when_rows_suffice(rows, fused):
    """A pad over ``[1, rows, W, 16]``: with enough rows, only they run in parallel and the loop
    over the dynamic width stays inside each task (fused with the rows, every vector would pay a
    division by ``W``); with few rows the width is fused in, for threads enough. Exact either way."""
    import tvm
    from tvm import s_tir
    from tvm.script import tirx as T

    from tvmq.targets.generic_schedules import spatial_schedule

    @T.prim_func(s_tir=True)
    def pad(a: T.handle, b: T.handle):
        w = T.int64()
        x = T.match_buffer(a, (1, rows, w, 16), "uint8")
        y = T.match_buffer(b, (1, rows, w + 2, 16), "uint8")
        for i0, i1, i2, i3 in T.grid(1, rows, w + 2, 16):
            with T.sblock("pad"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                y[v0, v1, v2, v3] = T.if_then_else(1 <= v2 and v2 <= w, x[v0, v1, v2 - 1, v3], T.uint8(7))

    sch = s_tir.Schedule(pad)
    spatial_schedule(sch, sch.get_sblock("pad"), 16)
    parallel = [l for l in sch.get_loops(sch.get_sblock("pad")) if sch.get(l).kind == tvm.tirx.ForKind.PARALLEL]
    assert len(parallel) == 1
    extent = sch.get(parallel[0]).extent
    assert isinstance(extent, tvm.tirx.IntImm) != fused
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), "llvm")
    for width in (5, 300):
        x = np.random.default_rng(width).integers(0, 255, (1, rows, width, 16), dtype=np.uint8)
        y = tvm.runtime.tensor(np.zeros((1, rows, width + 2, 16), np.uint8))
        lib(tvm.runtime.tensor(x), y)
        np.testing.assert_array_equal(y.numpy(), np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)), constant_values=7))


def test_avx2_build_of_a_dynamic_width_is_tensorized_and_exact(dynamic, tmp_path):
    """The AVX2 preset (vpmaddwd, 16 registers: other tiles than AVX-512's) on a width no tile divides."""
    model, root, _ = dynamic
    dyn = compile_model(model, tmp_path / "dyn", target="x86-avx2", plan=root / "dyn" / "plan.json",
                        shapes={"x": [1, C, H, "W"]}, dims={"W": RANGE})
    kernels = [k for k in dyn.manifest["kernels"] if k["block"].startswith("tvmq_dot_")]
    assert len(kernels) >= 4 and all("pmadd" in (k["intrinsic"] or "") for k in kernels)
    compile_model(model, tmp_path / "static", target="x86-avx2", plan=root / "dyn" / "plan.json",
                  shapes={"x": [1, C, H, 53]})
    x = _line(np.random.default_rng(53), 53)
    np.testing.assert_array_equal(Bundle(tmp_path / "dyn").run({"x": x})["logits"],
                                  Bundle(tmp_path / "static").run({"x": x})["logits"])


@pytest.mark.parametrize("width", [8, 37, 101, 256])
def test_each_width_gives_the_integers_of_a_static_build_for_it(dynamic, width, tmp_path):
    import onnxruntime as ort

    model, root, result = dynamic
    x = _line(np.random.default_rng(width), width)
    out = Bundle(root / "dyn").run({"x": x})["logits"]
    static = compile_model(model, tmp_path / "static", plan=root / "dyn" / "plan.json", shapes={"x": [1, C, H, width]})
    assert json.loads((tmp_path / "static" / "manifest.json").read_text())["inputs"][0]["shape"] == [1, C, H, width]
    assert static.plan.count("int8") == result.plan.count("int8")
    got = Bundle(root / "dyn").run({"x": x})
    ref = Bundle(tmp_path / "static").run({"x": x})
    assert out.shape == ref["logits"].shape == (1, (width - 1) // 2 + 1, CLASSES)
    np.testing.assert_array_equal(out, ref["logits"])
    np.testing.assert_array_equal(got["p"], ref["p"])  # the softmax over a dynamic row length
    fp32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert sample_sqnr(fp32, out) > 20.0  # int8 at every width, not only the calibrated ones


def test_static_copies_run_for_their_sizes_and_the_dynamic_program_for_the_rest(dynamic, tmp_path):
    """``--dim W=8..256@37,64``: static copies of the model for widths 37 and 64, dispatched inside
    ``main``; each gives its static build's bits, every other width the dynamic program's."""
    model, root, _ = dynamic
    out = tmp_path / "spec"
    compile_model(model, out, plan=root / "dyn" / "plan.json", shapes={"x": [1, C, H, "W"]}, dims={"W": RANGE},
                  variants={"W": [37, 64]})
    assert json.loads((out / "manifest.json").read_text())["variants"] == [{"W": 37}, {"W": 64}]
    bundle, dyn = Bundle(out), Bundle(root / "dyn")
    vm, _ = bundle._load()
    called = []
    vm.set_instrument(lambda func, name, before, ret, *args: (called.append(name) if before else None, 0)[1])
    for width, program in ((37, "main_W37"), (64, "main_W64"), (8, "main_dynamic"), (101, "main_dynamic")):
        x = _line(np.random.default_rng(width), width)
        called.clear()
        got = bundle.run({"x": x})
        assert [n for n in called if n.startswith("main")] == [program]
        if program == "main_dynamic":
            ref = dyn.run({"x": x})
        else:
            compile_model(model, tmp_path / f"s{width}", plan=root / "dyn" / "plan.json", shapes={"x": [1, C, H, width]})
            ref = Bundle(tmp_path / f"s{width}").run({"x": x})
        for name in ("logits", "p"):
            np.testing.assert_array_equal(got[name], ref[name])


def test_sizes_to_specialise_must_lie_in_the_range(tmp_path):
    from tvmq.frontend import parse_dim_spec

    assert parse_dim_spec("W=32..1280@160,320") == ("W", (32, 1280), [160, 320])
    assert parse_dim_spec("H=64..1280:32@640") == ("H", (64, 1280, 32), [640])
    with pytest.raises(TvmqError, match="after @"):
        parse_dim_spec("W=32..1280@")
    model = tmp_path / "m.onnx"
    model.write_bytes(_text_line_model().SerializeToString())
    for spec, problem in (("W=8..64@65", "65 is not a size of 8..64"), ("W=8..64:4@30", "30 is not a size of 8..64 in steps of 4")):
        proc = subprocess.run([sys.executable, "-m", "tvmq", "compile", str(model), "-o", str(tmp_path / "out"), "--precision",
                               "fp32", "--shape", "x:1,3,12,W", "--dim", spec], capture_output=True, text=True, check=False)
        assert proc.returncode != 0 and proc.stderr.startswith("error: --dim W: " + problem), proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_sizes_outside_the_range_are_refused_before_running(dynamic, tmp_path):
    _, root, _ = dynamic
    bundle = Bundle(root / "dyn")
    with pytest.raises(BundleError, match=r"W in 8\.\.256"):
        bundle.run({"x": _line(np.random.default_rng(0), 300)})
    with pytest.raises(BundleError, match="shape"):
        bundle.run({"x": np.zeros((1, C, H + 1, 32), np.float32)})
    np.save(tmp_path / "wide.npy", _line(np.random.default_rng(0), 257))
    cmd = [sys.executable, "-m", "tvmq", "run", str(root / "dyn"), "--input", str(tmp_path / "wide.npy")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "W in 8..256" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cpp_runner_checks_the_range(dynamic, tmp_path):
    from tvmq.crossrt import build_runner

    _, root, _ = dynamic
    runner = build_runner("g++", "x86_64")
    x = _line(np.random.default_rng(3), 77)
    np.save(tmp_path / "x.npy", x)
    subprocess.run([str(runner), str(root / "dyn" / "model.so"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "out")],
                   check=True, capture_output=True)
    np.testing.assert_array_equal(np.load(tmp_path / "out0.npy"), Bundle(root / "dyn").run({"x": x})["logits"])
    np.save(tmp_path / "wide.npy", _line(np.random.default_rng(3), 1000))
    proc = subprocess.run([str(runner), str(root / "dyn" / "model.so"), str(tmp_path / "wide.npy")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "W in 8..256" in proc.stderr and proc.stderr.count("\n") == 1


def test_dynamic_inputs_need_a_range_and_calibration_inside_it(tmp_path):
    model = _text_line_model()
    rng = np.random.default_rng(0)
    with pytest.raises(TvmqError, match=r"without a range.*--dim W="):
        compile_model(model, tmp_path / "a", calib=[{"x": _line(rng, 32)}], shapes={"x": [1, C, H, "W"]})
    with pytest.raises(TvmqError, match=r"--dim V names no dimension"):
        compile_model(model, tmp_path / "b", calib=[{"x": _line(rng, 32)}], shapes={"x": [1, C, H, "W"]},
                      dims={"W": (8, 64), "V": (1, 2)})
    with pytest.raises(TvmqError, match=r"sample 1 .*W in 8\.\.64"):
        compile_model(model, tmp_path / "c", calib=[{"x": _line(rng, 32)}, {"x": _line(rng, 65)}],
                      shapes={"x": [1, C, H, "W"]}, dims={"W": (8, 64)})
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # nothing left behind


def test_cli_parses_named_dimensions_and_ranges(tmp_path):
    from tvmq.frontend import parse_dim_arg, parse_shape_arg

    assert parse_shape_arg("x:1,3,48,W") == ("x", [1, 3, 48, "W"])
    assert parse_dim_arg("W=32..1280") == ("W", (32, 1280))
    assert parse_dim_arg("H=320..1280:32") == ("H", (320, 1280, 32))
    for bad in ("W=0..4", "W=9..4", "W=4", "3W=1..2", "W=a..b", "W=1..4:0", "W=1..4:"):
        with pytest.raises(TvmqError, match="--dim"):
            parse_dim_arg(bad)
    with pytest.raises(TvmqError, match="--shape"):
        parse_shape_arg("x:1,3,48,W-1")
    model = tmp_path / "m.onnx"
    model.write_bytes(_text_line_model().SerializeToString())
    proc = subprocess.run([sys.executable, "-m", "tvmq", "compile", str(model), "-o", str(tmp_path / "out"), "--precision",
                           "fp32", "--shape", "x:1,3,12,W", "--dim", "W=0..9"], capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and proc.stderr.startswith("error: --dim 'W=0..9'") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def _shape_arithmetic_model():
    """A conv, then Paddle2ONNX-style shape arithmetic (Shape -> Slice -> Concat) feeding a
    Reshape to [batch, channels x height, width]: TVM's importer reads only constant targets."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["y"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
        helper.make_node("Slice", ["s", "three", "four"], ["w"]),
        helper.make_node("Concat", ["n", "ch", "w"], ["target"], axis=0),
        helper.make_node("Reshape", ["y", "target"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "wf"], ["out"]),
    ]
    inits = [("w0", rng.standard_normal((8, C, 3, 3)).astype(np.float32) * 0.3),
             ("zero", np.array([0], np.int64)), ("one", np.array([1], np.int64)),
             ("three", np.array([3], np.int64)), ("four", np.array([4], np.int64)),
             ("ch", np.array([8 * H], np.int64)), ("wf", rng.standard_normal((8 * H, 5)).astype(np.float32) * 0.1)]
    return make_model(nodes, [("x", ["N", C, H, "W"])], [("out", ["N", "W", 5])], inits)


def test_reshape_targets_computed_from_dynamic_shapes_import(tmp_path):
    import onnxruntime as ort

    from onnx import numpy_helper

    from tvmq.onnx_rewrites import resolve_dynamic_reshapes

    model = _shape_arithmetic_model()
    copy = type(model).FromString(model.SerializeToString())
    assert resolve_dynamic_reshapes(copy, {"N": (1, 4), "W": (8, 64)}) == 1
    reshape = next(n for n in copy.graph.node if n.op_type == "Reshape")
    target = next(i for i in copy.graph.initializer if i.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [0, 8 * H, -1]  # batch copied, width inferred
    stepped = type(model).FromString(model.SerializeToString())  # probed on the steps of the range
    assert resolve_dynamic_reshapes(stepped, {"N": (1, 4), "W": (8, 64, 4)}) == 1
    assert not any(n.op_type in ("Shape", "Slice", "Concat") for n in copy.graph.node)  # dead arithmetic gone

    compile_model(model, tmp_path / "b", precision="fp32", shapes={"x": ["N", C, H, "W"]}, dims={"N": (1, 4), "W": (8, 64)})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    bundle = Bundle(tmp_path / "b")
    for n, width in ((1, 8), (3, 21), (4, 64)):
        x = np.random.default_rng(width).standard_normal((n, C, H, width)).astype(np.float32)
        np.testing.assert_allclose(bundle.run({"x": x})["out"], session.run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_reshape_target_with_two_dynamic_entries_is_one_error(tmp_path):
    from onnx import numpy_helper

    model = _shape_arithmetic_model()
    # [N, 8, H, W] -> [W, N * 8 * H]: two entries follow the dimensions, neither copies its axis
    nodes = [n for n in model.graph.node if n.op_type not in ("Concat", "Reshape", "Transpose", "MatMul")]
    nodes += [helper.make_node("Mul", ["n", "ch"], ["nch"]),
              helper.make_node("Concat", ["w", "nch"], ["target"], axis=0),
              helper.make_node("Reshape", ["y", "target"], ["out"], name="odd_reshape")]
    inits = [(i.name, numpy_helper.to_array(i)) for i in model.graph.initializer if i.name != "wf"]
    bad = make_model(nodes, [("x", ["N", C, H, "W"])], [("out", ["W", "M"])], inits)
    with pytest.raises(TvmqError, match=r"Reshape 'odd_reshape'.*fix those dimensions with --shape"):
        compile_model(bad, tmp_path / "b", precision="fp32", shapes={"x": ["N", C, H, "W"]}, dims={"N": (1, 4), "W": (8, 64)})
    assert not (tmp_path / "b").exists()


def _fpn_model(seed=5):
    """A detector-like model: a stride-2 conv, a nearest x2 Resize back up, added to the full-size
    branch (equal shapes only for even sizes: the dimensions are dynamic in steps of 2)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Resize", ["r1", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Add", ["up", "r0"], ["a"]),
        helper.make_node("Conv", ["a", "w2"], ["y"]),
    ]
    inits = [("w0", rng.standard_normal((16, C, 3, 3)).astype(np.float32) * 0.3),
             ("w1", rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1),
             ("scales", np.array([1, 1, 2, 2], np.float32)),
             ("w2", rng.standard_normal((2, 16, 1, 1)).astype(np.float32) * 0.3)]
    return make_model(nodes, [("x", [1, C, "H", "W"])], [("y", [1, 2, "H", "W"])], inits)


def test_dimensions_in_steps_upsample_and_add(tmp_path):
    """``--dim H=8..64:2``: shapes that only agree for multiples of the step (x2 upsampling of a
    stride-2 branch, added to the full-size one) import, run at every multiple, and the runners
    refuse the sizes between. A copy specialised for H=22 (W still dynamic in it) runs at that
    height and gives the bits of the static build too."""
    import onnxruntime as ort

    from tvmq.crossrt import build_runner

    model = _fpn_model()
    dims = {"H": (8, 64, 2), "W": (8, 128, 2)}
    rng = np.random.default_rng(0)
    calib = [{"x": rng.uniform(-1, 1, (1, C, h, w)).astype(np.float32)} for h, w in ((8, 8), (16, 40), (32, 64))]
    result = compile_model(model, tmp_path / "dyn", calib=calib, shapes={"x": [1, C, "H", "W"]}, dims=dims,
                           variants={"H": [22]})
    m = json.loads((tmp_path / "dyn" / "manifest.json").read_text())
    assert m["dims"] == {"H": [8, 64, 2], "W": [8, 128, 2]} and m["variants"] == [{"H": 22}]
    assert m["shape_args"] == [{"input": "x", "axis": 2, "step": 2}, {"input": "x", "axis": 3, "step": 2}]
    assert result.plan.count("int8") >= 3
    bundle = Bundle(tmp_path / "dyn")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runner = build_runner("g++", "x86_64")
    for h, w in ((8, 8), (22, 34), (64, 128)):
        x = rng.uniform(-1, 1, (1, C, h, w)).astype(np.float32)
        out = bundle.run({"x": x})["y"]
        assert sample_sqnr(session.run(None, {"x": x})[0], out) > 20.0
        compile_model(model, tmp_path / f"s{h}", plan=tmp_path / "dyn" / "plan.json", shapes={"x": [1, C, h, w]})
        np.testing.assert_array_equal(out, Bundle(tmp_path / f"s{h}").run({"x": x})["y"])
        np.save(tmp_path / "x.npy", x)
        subprocess.run([str(runner), str(tmp_path / "dyn" / "model.so"), str(tmp_path / "x.npy"), "-o",
                        str(tmp_path / "c")], check=True, capture_output=True)
        np.testing.assert_array_equal(np.load(tmp_path / "c0.npy"), out)
    odd = np.zeros((1, C, 21, 34), np.float32)
    with pytest.raises(BundleError, match="H in 8..64, multiples of 2"):
        bundle.run({"x": odd})
    np.save(tmp_path / "odd.npy", odd)
    proc = subprocess.run([str(runner), str(tmp_path / "dyn" / "model.so"), str(tmp_path / "odd.npy")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "multiples of 2" in proc.stderr


def test_precision_auto_judges_samples_of_several_sizes(tmp_path):
    """``--precision auto`` with a dynamic width: the search runs the model on calibration samples
    of several widths, times its kernels at one of them, and the bundle it picks holds the budget
    on every sample. Which layers end int8 depends on this host's kernel times (on an AVX2 host
    this model's small int8 kernels may all lose to float), so what is checked is that plans with
    int8 layers were judged as integer programs over every width, and the one chosen passes."""
    from tvmq.config import AutoPrecision

    model = _text_line_model(seed=2)
    rng = np.random.default_rng(3)
    calib = [{"x": _line(rng, w)} for w in (16, 48, 120, 200)]
    result = compile_model(model, tmp_path / "auto", calib=calib, precision="auto", auto=AutoPrecision(min_sqnr=25.0),
                           shapes={"x": [1, C, H, "W"]}, dims={"W": RANGE})
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    bundle = Bundle(tmp_path / "auto")
    for sample in calib:
        assert sample_sqnr(session.run(None, sample)[0], bundle.run(sample)["logits"]) >= 25.0 - 0.5
    report = result.manifest["precision"]
    assert report["samples"] == len(calib)
    # The INC-style fallback quantizes every layer the budget allows, whatever the timings: it
    # keeps int8 layers and passes on the integer program over all four widths.
    assert report["fallback"]["int8_layers"] >= 1 and report["race"]["fallback (INC-style)"]["passes"]
    assert all(layer["sqnr_int8"] is not None for layer in report["layers"])
    chosen = report["race"][report["chosen_from"]]
    assert chosen["passes"] and chosen["metric"] >= 25.0


def test_a_kernel_over_a_dynamic_width_is_tuned_in_its_one_loop_order():
    """A tuner searches loop orders only over static extents: over a symbolic width the order is
    the one the rules choose (rows outermost, each row's epilogue in its loop), one design space."""
    from tvmq.compile import quantized_module
    from tvmq.pipeline import dot_intrinsics
    from tvmq.targets import get_preset
    from tvmq.targets.schedules import PackedKernelRule
    from tvmq.tune import _design_space, extract_tasks

    preset = get_preset("x86-avx512vnni")
    qm = quantized_module(_text_line_model(), preset, raw=_calib(), shapes={"x": [1, C, H, "W"]}, dims={"W": RANGE})
    rule = PackedKernelRule(dot_intrinsics(preset), preset.vector_registers, preset.vector_lanes)
    space = _design_space(preset)
    orders = {}
    for task in extract_tasks(qm.module, preset):
        orders[task.name] = rule.orders(tvm.s_tir.Schedule(task.mod))
        if orders[task.name]:
            assert len(space(tvm.s_tir.Schedule(task.mod))) == 1
    assert orders and [None] in orders.values() and all(o in ([None], []) for o in orders.values())
