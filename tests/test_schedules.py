"""tvmq's default schedule rules: the kernels they produce are vectorized the intended way and exact."""

import re

import numpy as np
import pytest
import tvm
from conftest import unary_module
from tvm import relax

from tvmq.pipeline import build, lower
from tvmq.testing import kernel_asm, primfuncs


def _nhwc_module(op):
    return unary_module(op, (1, 6, 10, 40))


OPS = {
    "global average pool": (lambda x: relax.op.mean(x, axis=[1, 2], keepdims=True),
                            lambda a: a.mean(axis=(1, 2), keepdims=True)),
    "max pool": (lambda x: relax.op.nn.max_pool2d(x, pool_size=(2, 2), strides=(2, 2), layout="NHWC"),
                 lambda a: a.reshape(1, 3, 2, 5, 2, 40).max(axis=(2, 4))),
}


@pytest.mark.parametrize("name", list(OPS))
def test_spatial_reductions_over_nhwc_sum_channel_vectors(name):
    """Pools over H and W read whole channel vectors (the innermost, contiguous axis) instead of walking each
    channel with a stride of the channel count; the result is the same."""
    op, reference = OPS[name]
    mod = _nhwc_module(op)
    kernels = list(primfuncs(lower(mod, "x86")).values())
    assert len(kernels) == 1
    lines = kernels[0].script().splitlines()
    update = next(i for i, line in enumerate(lines) if 'sblock("' in line and '_update")' in line)
    assert "in T.vectorized(T.int64(8))" in lines[update - 1], "\n".join(lines)  # 40 channels: vectors of 8
    x = np.random.default_rng(0).uniform(-3, 3, (1, 6, 10, 40)).astype(np.float32)
    vm = relax.VirtualMachine(build(mod, "x86"), tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), reference(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, axis", [((4, 6625), -1), ((1, 40, 37), 2), ((2, 9, 5), -1), ((3, 20, 6), 1),
                                         ((1, 16, 4, 37), 1), ((3, 2, 16), 0)])
def test_softmax_uses_a_vectorizable_exp_and_stays_within_5e5(shape, axis):
    """A 6625-class softmax (PP-OCR's recogniser head): no libm ``exp`` per element, same probabilities. A last
    axis runs in tvmq's row kernel (whole vectors of 16, then the remainder; a shorter row in scalars) on the
    tensor's own shape; another axis with at least 16 elements after it in the column kernel (vectors across
    the softmax axis, then the remainder: YOLOv8's box-distribution head), a shorter one in TVM's
    ``fast_softmax``."""
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.softmax(x, axis=axis))
        bb.emit_func_output(y)
    mod = bb.get()
    kernels = {name: f.script() for name, f in primfuncs(lower(mod, "x86")).items()}
    assert kernels and not any("T.exp(" in k for k in kernels.values())
    row_kernel = [k for name, k in kernels.items() if name.startswith("tvmq_softmax")]
    if axis in (-1, len(shape) - 1):
        assert len(row_kernel) == 1 and "T.vectorized(16)" in row_kernel[0] and "T.where" not in row_kernel[0]
        # the kernel takes the tensor's own shape: no reshape copied the model's output (20 us at 40 x 6625)
        assert not any(name.startswith("reshape") for name in kernels), sorted(kernels)
    elif np.prod(shape[axis + 1:]) >= 16:
        assert len(row_kernel) == 1 and "T.vectorized(16)" in row_kernel[0] and "T.where" not in row_kernel[0]
        assert not any(name.startswith("fast_softmax") for name in kernels), sorted(kernels)
    else:
        assert not row_kernel
    a = np.random.default_rng(0).normal(0, 4, shape).astype(np.float32)
    ref = np.exp(a.astype(np.float64) - a.max(axis, keepdims=True))
    ref /= ref.sum(axis, keepdims=True)
    got = relax.VirtualMachine(build(mod, "x86"), tvm.cpu())["main"](tvm.runtime.tensor(a)).numpy()
    np.testing.assert_allclose(got, ref, rtol=5e-5, atol=1e-9)


def test_flatten_softmax_unflatten_is_one_kernel_on_the_original_shape():
    """ONNX Softmax before opset 13 imports as reshape to 2-D, softmax, reshape back. As a model's output the
    reshape back was a copy kernel (TVM keeps reshapes that make a function's output); now the row kernel runs
    on the 3-D tensor and both reshapes are gone."""
    shape = (1, 40, 37)
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            flat = bb.emit(relax.op.reshape(x, (40, 37)))
            probs = bb.emit(relax.op.nn.softmax(flat, axis=1))
            y = bb.emit_output(relax.op.reshape(probs, shape))
        bb.emit_func_output(y)
    mod = bb.get()
    kernels = list(primfuncs(lower(mod, "x86")))
    assert kernels == ["tvmq_softmax"], kernels
    a = np.random.default_rng(1).normal(0, 4, shape).astype(np.float32)
    ref = np.exp(a.astype(np.float64) - a.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    got = relax.VirtualMachine(build(mod, "x86"), tvm.cpu())["main"](tvm.runtime.tensor(a)).numpy()
    np.testing.assert_allclose(got, ref, rtol=5e-5, atol=1e-9)


def test_few_channel_layout_change_runs_rows_in_parallel_and_is_exact():
    """An NCHW image quantized, transposed to NHWC and padded (a model's first int8 layer input): the parallel
    loop runs whole rows (no division per pixel), the 3 channels are unrolled, and the bytes equal numpy's."""
    x = relax.Var("x", relax.TensorType((1, 3, 20, 36), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.quantize(x, relax.const(np.float32(1 / 100)), relax.const(np.int32(128)),
                                          axis=1, out_dtype="uint8"))
            t = bb.emit(relax.op.permute_dims(q, [0, 2, 3, 1]))
            y = bb.emit_output(relax.op.nn.pad(t, [0, 0, 1, 1, 1, 1, 0, 0], pad_value=128.0))
        bb.emit_func_output(y)
    mod = bb.get()
    kernels = [f.script() for f in primfuncs(lower(mod, "x86")).values()]
    assert len(kernels) == 1
    assert "T.parallel(T.int64(22))" in kernels[0] and "T.unroll(T.int64(3))" in kernels[0], kernels[0]
    a = np.random.default_rng(0).uniform(-1.5, 1.5, (1, 3, 20, 36)).astype(np.float32)
    want = np.full((1, 22, 38, 3), 128, np.uint8)
    want[0, 1:21, 1:37] = np.clip(np.round(a / np.float32(1 / 100)) + 128, 0, 255).astype(np.uint8)[0].transpose(1, 2, 0)
    got = relax.VirtualMachine(build(mod, "x86"), tvm.cpu())["main"](tvm.runtime.tensor(a)).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("a_shape, b_shape, marker", [((1, 8, 40, 15), (1, 8, 15, 40), "T.vectorized(T.int64(8))"),
                                                       ((1, 8, 40, 40), (1, 8, 40, 15), "T.unroll(T.int64(15))")])
def test_activation_matmul_accumulates_along_the_output_rows(a_shape, b_shape, marker):
    """Attention's ``Q K^T`` and ``A V`` (both operands activations, no packed weights): whole output rows are
    accumulated per step of the reduction, as vectors where a vector width divides the row, else unrolled; the
    products equal numpy's within float32 rounding."""
    a = relax.Var("a", relax.TensorType(a_shape, "float32"))
    b = relax.Var("b", relax.TensorType(b_shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [a, b]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(a, b))
        bb.emit_func_output(y)
    mod = bb.get()
    kernels = [f.script() for f in primfuncs(lower(mod, "x86")).values()]
    assert len(kernels) == 1 and marker in kernels[0] and "T.parallel" in kernels[0], kernels[0]
    rng = np.random.default_rng(0)
    x, w = rng.uniform(-1, 1, a_shape).astype(np.float32), rng.uniform(-1, 1, b_shape).astype(np.float32)
    got = relax.VirtualMachine(build(mod, "x86"), tvm.cpu())["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_a_ragged_channel_epilogue_is_vectorized_where_every_lane_is_inside():
    """An int8 matmul to 100 outputs (not a multiple of 16): the per-tile epilogue carries ``c < 100``, which made
    TVM scalarize it in every tile. Versioned, the tiles inside run a vector epilogue, the edge tile the scalar one;
    the bytes equal the unversioned kernel's."""
    from tvm import s_tir

    from tvmq.frontend import load_onnx
    from tvmq.pipeline import dot_intrinsics, fuse
    from tvmq.targets import get_preset
    from tvmq.quantize import calibrate, prepare, quantize_pipeline
    from tvmq.targets.schedules import PackedKernelRule
    from tvmq.targets.tails import version_vector_tails
    from tvmq.testing import matmul_model

    rng = np.random.default_rng(0)
    mod, _ = load_onnx(matmul_model(24, 64, 100))
    mod = prepare(mod)
    plan = calibrate(mod, [{"x": rng.uniform(-1, 1, (24, 64)).astype(np.float32)} for _ in range(2)], input_names=["x"])
    fused = fuse(quantize_pipeline(plan)(mod), get_preset("x86"))
    (func,) = primfuncs(fused, "matmul").values()
    sch = s_tir.Schedule(func)
    assert PackedKernelRule(dot_intrinsics(get_preset("x86"))).schedule(sch)
    before = sch.mod["main"]
    after = version_vector_tails(before)
    assert "T.where" in before.script()
    text = after.script()
    assert "if " in text and text.count("T.where") == before.script().count("T.where")  # the edge keeps its guard
    target = get_preset("x86").tvm_target()
    args = [rng.integers(0, 256, [int(d) for d in p.shape]).astype(str(p.dtype)) if "int" in str(p.dtype)
            else rng.uniform(0.5, 1.5, [int(d) for d in p.shape]).astype(str(p.dtype)) for p in before.params]
    outs = []
    for f in (before, after):
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target)
        tensors = [tvm.runtime.tensor(a) for a in args]
        lib["main"](*tensors)
        outs.append(tensors[-1].numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    asm = [kernel_asm(f, target) for f in (before, after)]
    assert asm[1].count("vcvtdq2ps") > asm[0].count("vcvtdq2ps")  # int32 -> float conversions, 16 at a time


@pytest.mark.parametrize("preset", ["x86-avx2", "x86-avx512", "x86-avx512vnni", "rpi4", "arm", "arm32"])
def test_int8_register_tile_fits_the_register_file(preset):
    """An int8 tile's accumulators, one register of weights per channel block (widened to int16
    for vpmaddwd; NEON has no memory operands), the broadcast activation and a product all fit
    the ISA's vector registers: AVX2's old 4 x 3 tile (12 + 3 + 2 = 17 of 16) spilled, and ran
    its 1x1 convs at the float kernel's speed."""
    from tvmq.targets import get_preset
    from tvmq.targets.schedules import PackedKernelRule

    p = get_preset(preset)
    rule = PackedKernelRule(None, p.vector_registers, p.vector_lanes)
    for lanes in p.micro_kernel.lanes:
        per_acc = max(1, lanes // p.vector_lanes)
        for x, oo in [(80, 30), (960, 30), (784, 64), (48, 13), (7, 2), (1, 1), (96, 25)]:
            xb, ob = rule.tile(x, oo, lanes, dot=True)
            assert x % xb == 0 and oo % ob == 0
            assert (xb * ob + ob) * per_acc + 2 <= p.vector_registers, (lanes, x, oo, xb, ob)
            assert xb * ob * per_acc <= p.vector_registers * 3 // 4
    # the widest tile that fits is taken: AVX2 fills 12 accumulators where the extents allow
    if preset == "x86-avx2":
        assert rule.tile(960, 30, 8, dot=True) == (6, 2)


@pytest.mark.parametrize("preset", ["x86-avx2", "x86-avx512"])
def test_float_tiles_of_rows_with_no_small_divisor_are_exact(preset):
    """A float tile need not divide the row (YOLO's 13x13, PP-LCNet's 7x7 maps; depthwise convs
    too): the last tile of each row is predicated, and every pixel still equals ONNX Runtime's
    (reference kernels)."""
    import onnxruntime as ort
    from conftest import conv_model, matmul_model

    from tvmq.execute import HostModule
    from tvmq.frontend import load_onnx
    from tvmq.quantize import prepare

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    rng = np.random.default_rng(3)
    for model, shape in [(conv_model(cin=32, cout=48, hw=13)[0], [1, 32, 13, 13]),
                         (conv_model(cin=32, cout=32, groups=32, hw=19)[0], [1, 32, 19, 19]),
                         (conv_model(cin=16, cout=32, k=1, pad=0, hw=7)[0], [1, 16, 7, 7]),
                         (conv_model(cin=256, cout=64, k=1, pad=0, hw=11)[0], [1, 256, 11, 11]),  # 1x1, 2 chunks
                         (conv_model(cin=64, cout=64, hw=10)[0], [1, 64, 10, 10]),
                         (matmul_model(k=64, n=32, batch=25)[0], [25, 64]),
                         (matmul_model(k=64, n=40, batch=32)[0], [32, 64]),  # 8 rows x 2 of 3 channel blocks
                         *((_matmul_of_rows(shape, 64), shape) for shape in _ROW_SHAPES)]:
        x = rng.normal(0, 1, shape).astype(np.float32)
        ref = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        mod, _ = load_onnx(model)
        got = HostModule(prepare(mod), preset)(x)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_a_float_tile_keeps_its_rows_in_l1_and_covers_ragged_rows():
    """Float tiles: one channel block by up to 8 pixels (up to 16 where that covers the row
    exactly), within the accumulator registers (AVX2's 16-lane accumulators take two of its
    16 registers each); a single pixel takes several channel blocks, leaving 4 tiles."""
    from tvmq.targets import get_preset
    from tvmq.targets.schedules import PackedKernelRule

    avx512, avx2 = (PackedKernelRule(None, get_preset(p).vector_registers, get_preset(p).vector_lanes)
                    for p in ("x86-avx512", "x86-avx2"))
    assert [avx512.tile(x, 24, 16, dot=False) for x in (13, 7, 56, 52, 1)] == [(13, 1), (7, 1), (8, 1), (13, 1), (1, 6)]
    assert all(avx2.tile(x, 24, 16, dot=False)[0] * 2 <= 12 for x in (13, 7, 56, 52, 208))
    # a matmul's 8-row tile takes a second block where 16 accumulators fit (not AVX2's 12), also
    # where the blocks are odd (ddddocr's classifier: 514 blocks; PP-OCRv4 rec's head: 415)
    assert [avx512.tile(x, oo, 16, dot=False, matmul=True) for x, oo in ((32, 514), (40, 415), (32, 1), (7, 24))] == [
        (8, 2), (8, 2), (8, 1), (7, 1)]
    assert avx2.tile(32, 514, 8, dot=False, matmul=True) == (8, 1)


@pytest.mark.parametrize("preset", ["x86-avx2", "x86-avx512", "rpi4", "arm32"])
def test_a_float_conv_tile_spans_channel_blocks_within_the_registers_and_chunks_fit_l1(preset):
    """A float conv over a static width (activations outweighing weights, or weights within L2)
    takes several channel blocks per tile, as many pixels as the accumulators left hold, and its
    input channels in chunks whose weights fit L1: the accumulators, one weight register per
    block and the broadcast activation fit the ISA's registers (AVX2: 6 x 2, AVX-512: 6 x 4)."""
    from tvmq.targets import get_preset
    from tvmq.targets.schedules import _FLOAT_CHUNK_BYTES, PackedKernelRule

    p = get_preset(preset)
    rule = PackedKernelRule(None, p.vector_registers, p.vector_lanes)
    lanes = p.vector_lanes
    for x, oo, reduce in [(40, 64 // lanes, [3, 3, 64]), (52, 96 // lanes, [3, 3, 96]), (13, 8, [3, 3, 192]),
                          (7, 2, [1, 1, 1024]), (208, 4, [3, 3, 12])]:
        xb, ob, chunk = rule.float_conv_tile(x, oo, lanes, reduce)
        assert oo % ob == 0 and 2 <= ob <= 4 and 1 <= xb <= x
        assert xb * ob + ob + 1 <= p.vector_registers and xb * ob <= p.vector_registers * 3 // 4, (x, oo, xb, ob)
        assert reduce[-1] % chunk == 0
        assert chunk * reduce[0] * reduce[1] * ob * lanes * 4 <= _FLOAT_CHUNK_BYTES or chunk == 1
    assert rule.float_conv_tile(40, 1, lanes, [3, 3, 64]) is None  # one block: the one-block tile
    if preset == "x86-avx512":
        assert rule.float_conv_tile(40, 4, 16, [3, 3, 64]) == (6, 4, 16)
    if preset == "x86-avx2":
        assert rule.float_conv_tile(40, 8, 8, [3, 3, 64]) == (6, 2, 64)


def test_a_float_conv_runs_its_input_channels_in_chunks_outside_the_pixel_tiles():
    """YOLOv8n's 40x40 3x3 conv 64 -> 64 (AVX-512): 6 pixels x 4 channel blocks per tile, the 64
    input channels in 4 chunks of 16 around the row's tiles (the reduction starts before them)."""
    from conftest import conv_model

    from tvmq.frontend import load_onnx
    from tvmq.pipeline import lower
    from tvmq.quantize import prepare
    from tvmq.testing import primfuncs

    mod, _ = load_onnx(conv_model(cin=64, cout=64, hw=40)[0])
    (kernel,) = primfuncs(lower(prepare(mod), "x86-avx512"), "tvmq_fma_conv2d").values()
    script = kernel.script()
    assert "T.unroll(T.int64(6))" in script and "T.unroll(T.int64(4))" in script
    # the chunk loop (4) encloses the pixel tiles (7 of 6 pixels over 40) and the 3 x 3 x 16 reduction
    grid = r"T\.grid\(T\.int64\(4\), T\.int64\(7\), T\.int64\(3\), T\.int64\(3\), T\.int64\(16\)\)"
    assert re.search(grid, script), script


_ROW_SHAPES = ([1, 64], [20, 1, 64])  # one row (an LSTM's recurrent step), rows outside a unit pixel loop


def _matmul_of_rows(shape, n, seed=5):
    """An ONNX model ``y = x @ w``, ``x`` of ``shape`` (its last dimension the reduction), ``w`` normal(0, 0.2)."""
    from conftest import make_model
    from onnx import helper

    w = np.random.default_rng(seed).normal(0, 0.2, (shape[-1], n)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [("x", shape)],
                      [("y", shape[:-1] + [n])], [("w", w)])


@pytest.mark.parametrize("preset", ["x86-avx2", "x86-avx512"])
def test_a_float_matrix_vector_product_keeps_eight_fmas_in_flight(preset):
    """A float kernel with one row (an LSTM's recurrent step ``h @ R``) or with its rows outside
    a unit pixel loop (the input projection ``[T, 1, K] @ [K, 4H]``) had one accumulator per tile:
    every FMA waited on the one before (ddddocr's projection 0.90 -> 0.17 ms, its recurrent
    step 0.032 -> 0.024 ms; AVX-512 host, 2 threads). Now the tile holds 8 accumulators (channel
    blocks, or the rows as pixels); both shapes are in the exactness test above."""
    from tvm import s_tir

    from tvmq.frontend import load_onnx
    from tvmq.pipeline import fuse
    from tvmq.quantize import prepare
    from tvmq.targets import get_preset
    from tvmq.targets.generic_schedules import find_block
    from tvmq.targets.kernel_names import FMA_MATMUL_BLOCK
    from tvmq.targets.schedules import PackedKernelRule

    p = get_preset(preset)
    for shape in _ROW_SHAPES:
        mod = prepare(load_onnx(_matmul_of_rows(shape, 32 * p.vector_lanes))[0])
        (func,) = primfuncs(fuse(mod, p), "matmul").values()
        sch = s_tir.Schedule(func)
        assert PackedKernelRule(None, p.vector_registers, p.vector_lanes).schedule(sch)
        loops = sch.get_loops(find_block(sch, FMA_MATMUL_BLOCK + "_update"))  # decompose_reduction renames it
        unrolled = [int(sch.get(lp).extent) for lp in loops if sch.get(lp).kind == tvm.tirx.ForKind.UNROLLED]
        assert np.prod(unrolled) >= 8, (shape, unrolled)


def _upsample_concat_quantize(channels):
    """``quantize(concat([resize2x(a), b, ...], channels))``: a feature pyramid's upsample + concat
    (NHWC), quantized for the next int8 conv."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((1, 6, 6, channels[0]), "float32"))
    rest = [relax.Var(f"b{i}", relax.TensorType((1, 12, 12, c), "float32")) for i, c in enumerate(channels[1:])]
    with bb.function("main", [a, *rest]):
        with bb.dataflow():
            up = bb.emit(relax.op.image.resize2d(a, (12, 12), layout="NHWC", method="nearest_neighbor",
                                                 coordinate_transformation_mode="asymmetric", rounding_method="floor"))
            cat = bb.emit(relax.op.concat([up, *rest], axis=3))
            q = bb.emit_output(relax.op.quantize(cat, relax.const(0.05, "float32"), relax.const(7, "int32"), out_dtype="uint8"))
        bb.emit_func_output(q)
    return bb.get()


@pytest.mark.parametrize("channels", [(96, 40), (20, 28, 13)], ids=["aligned", "ragged-three-way"])
def test_a_concat_along_channels_is_vectorized_between_its_boundaries(channels):
    """Concatenating NHWC tensors selects the source per channel (``if_then_else(96 <= c, ...)``),
    which made TVM scalarize the whole loop (YOLOX's upsample + concat + quantize: 163 us for
    52x52x192; 53 us vectorized). The vector loop is versioned on the select: vectors on one side
    of a boundary take that source, only a vector straddling one selects per lane. Exact against
    numpy on boundaries between vectors and inside them, and the aligned kernel has no scalar
    float code left."""
    from tvmq.execute import HostModule
    from tvmq.targets import get_preset

    mod = _upsample_concat_quantize(channels)
    rng = np.random.default_rng(1)
    xs = [rng.normal(0, 3, (1, 6, 6, channels[0])).astype(np.float32)]
    xs += [rng.normal(0, 3, (1, 12, 12, c)).astype(np.float32) for c in channels[1:]]
    ref = np.concatenate([xs[0].repeat(2, 1).repeat(2, 2), *xs[1:]], axis=3)
    ref = np.clip(np.round(ref / np.float32(0.05)) + 7, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(HostModule(mod, "x86")(*xs)[0], ref)
    if channels == (96, 40):
        (func,) = [f for gv, f in lower(mod, "x86").functions_items() if "concat" in gv.name_hint]
        asm = kernel_asm(func, get_preset("x86").tvm_target())
        assert "vcvttps2dq" in asm and "vcvttss2si" not in asm and "vroundss" not in asm


def test_an_nhwc_pad_runs_whole_rows_in_parallel_and_is_exact():
    """The pad before a 3x3 conv (uint8 NHWC, 24 channels: whole vectors): one parallel task per
    output row, its columns a loop inside it (fused into the parallel loop, every pixel divided
    its index by the width), and the bytes equal numpy's."""
    x = relax.Var("x", relax.TensorType((1, 30, 34, 24), "uint8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.pad(x, [0, 0, 1, 1, 1, 1, 0, 0], pad_value=0.0))
        bb.emit_func_output(y)
    mod = bb.get()
    (kernel,) = [f.script() for f in primfuncs(lower(mod, "x86")).values()]
    assert "T.parallel(T.int64(32))" in kernel and "T.vectorized(T.int64(8))" in kernel, kernel
    a = np.random.default_rng(0).integers(0, 256, (1, 30, 34, 24), dtype=np.uint8)
    got = relax.VirtualMachine(build(mod, "x86"), tvm.cpu())["main"](tvm.runtime.tensor(a)).numpy()
    np.testing.assert_array_equal(got, np.pad(a, [(0, 0), (1, 1), (1, 1), (0, 0)]))


def test_one_tensor_padded_for_two_readers_is_padded_once():
    """Two 3x3 convs reading one tensor (a CSP block) that pad it alike (its spatial pad, then
    columns for the register tile) share one pad kernel, and the two pads fuse: one kernel where
    there were three, the results equal numpy's."""
    from tvmq.kernels import call_order

    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.2, (3, 3, 8, 8)).astype("float32") for _ in range(2)]
    x = relax.Var("x", relax.TensorType((1, 10, 10, 8), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            padded = bb.emit(relax.op.nn.pad(x, [0, 0, 1, 1, 1, 1, 0, 0]))
            outs = []
            for w in weights:
                p = bb.emit(relax.op.nn.pad(padded, [0, 0, 0, 0, 0, 2, 0, 0]))
                outs.append(bb.emit(relax.op.nn.conv2d(p, relax.const(w), data_layout="NHWC", kernel_layout="HWIO")))
            y = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(y)
    mod = bb.get()
    order = call_order(lower(mod, "x86"))
    assert len([n for n in order if "pad" in n]) == 1, order
    v = rng.normal(0, 1, (1, 10, 10, 8)).astype("float32")
    got = relax.VirtualMachine(build(mod, "x86"), tvm.cpu())["main"](tvm.runtime.tensor(v))
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(v, [(0, 0), (1, 1), (1, 3), (0, 0)]), (3, 3), axis=(1, 2))
    for w, out in zip(weights, got):  # windows: [1, y, x, ci, kh, kw]
        np.testing.assert_allclose(out.numpy(), np.einsum("byxcij,ijco->byxo", windows, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("int8", [True, False], ids=["int8", "fp32"])
def test_a_conv_writes_the_padded_input_of_the_next_conv(monkeypatch, int8):
    """Two 3x3 convs in a row: the first writes its output straight into the padded tensor the
    second reads (int8: a border of the zero point, and spare columns for the register tile of
    a width of 13), so no pad kernel is left between them, and the outputs equal, bit for bit,
    those of the build whose pad is a kernel of its own."""
    from conftest import Compiled
    from onnx import helper

    from tvmq import pipeline
    from tvmq.execute import HostModule
    from tvmq.kernels import call_order
    from tvmq.targets.padded_outputs import WritePaddedOutputs
    from tvmq.testing import make_model

    rng = np.random.default_rng(3)
    conv = lambda x, w, y: helper.make_node("Conv", [x, w], [y], name=y, kernel_shape=[3, 3], pads=[1] * 4)  # noqa: E731
    model = make_model([conv("x", "w0", "a"), conv("a", "w1", "y")], [("x", [1, 4, 13, 13])], [("y", [1, 8, 13, 13])],
                       [("w0", rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)),
                        ("w1", rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32))])
    samples = [{"x": rng.normal(0, 1, (1, 4, 13, 13)).astype(np.float32)} for _ in range(4)]
    c = Compiled(model, samples)
    mod = c.qmod if int8 else c.float_mod
    order = call_order(lower(mod, "x86"))
    assert [n for n in order if n.endswith("_padded")] and not [n for n in order if re.match(r"(fused_)?pad\d*", n)], order
    got = (c.int8 if int8 else c.fp32)(samples[0]["x"])

    fuse_passes = pipeline._fuse_passes
    monkeypatch.setattr(pipeline, "_fuse_passes",
                        lambda preset: [p for p in fuse_passes(preset) if not isinstance(p, WritePaddedOutputs)])
    apart = call_order(lower(mod, "x86"))
    assert len([n for n in apart if re.match(r"(fused_)?pad\d*", n)]) == 1 and len(apart) == len(order) + 1, apart
    want = HostModule(mod)(samples[0]["x"])
    np.testing.assert_array_equal(got[0], want[0])


def test_a_split_is_read_where_it_lies_by_the_kernels_of_its_parts():
    """A split along the channels whose parts are read by injective ops: each part is a slice
    that the reader's kernel absorbs, no kernel of its own copies the parts (a split was one,
    with a tuple of outputs nothing fuses with), and the values are numpy's."""
    from tvmq.kernels import call_order

    x = relax.Var("x", relax.TensorType((1, 6, 6, 24), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            parts = bb.emit(relax.op.split(x, [8], axis=3))
            a = bb.emit(relax.op.multiply(relax.TupleGetItem(parts, 0), relax.const(np.float32(2))))
            b = bb.emit(relax.op.concat([relax.TupleGetItem(parts, 1), x], axis=3))
            y = bb.emit_output(relax.Tuple([a, b]))
        bb.emit_func_output(y)
    mod = bb.get()
    order = call_order(lower(mod, "x86"))
    assert len(order) == 2 and not [n for n in order if "split" in n], order
    v = np.random.default_rng(0).normal(0, 1, (1, 6, 6, 24)).astype(np.float32)
    a, b = relax.VirtualMachine(build(mod, "x86"), tvm.cpu())["main"](tvm.runtime.tensor(v))
    np.testing.assert_array_equal(a.numpy(), v[..., :8] * 2)
    np.testing.assert_array_equal(b.numpy(), np.concatenate([v[..., 8:], v], axis=3))


@pytest.mark.parametrize("channels, lanes", [((24, 24), 8), ((40, 56), 8), ((20, 28, 16), 4)],
                         ids=["24+24", "40+56", "ragged"])
def test_a_concat_takes_vectors_that_divide_its_boundaries(channels, lanes):
    """A uint8 concat of 24 + 24 channels took 16-lane vectors, one of which straddled the
    boundary and selected lane by lane; a width dividing every boundary (8 here) leaves every
    vector one source. Where only 4 lanes would divide them (20 + 28 + 16), the widest vector
    stays and the straddling ones select. Exact against numpy either way."""
    xs = [relax.Var(f"x{i}", relax.TensorType((1, 18, 18, c), "uint8")) for i, c in enumerate(channels)]
    bb = relax.BlockBuilder()
    with bb.function("main", xs):
        with bb.dataflow():
            y = bb.emit_output(relax.op.concat(xs, axis=3))
        bb.emit_func_output(y)
    mod = bb.get()
    (kernel,) = [f.script() for f in primfuncs(lower(mod, "x86")).values()]
    width = 16 if lanes == 4 else lanes
    assert f"T.vectorized(T.int64({width}))" in kernel, kernel
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (1, 18, 18, c), dtype=np.uint8) for c in channels]
    got = relax.VirtualMachine(build(mod, "x86"), tvm.cpu())["main"](*map(tvm.runtime.tensor, arrays)).numpy()
    np.testing.assert_array_equal(got, np.concatenate(arrays, axis=3))


def test_an_int8_kernels_float_epilogue_runs_at_the_full_avx512_width():
    """LLVM tunes Intel's AVX-512 CPUs to prefer 256-bit vectors and split the 512-bit operations
    it may: an int8 conv's SiLU + requantize epilogue ran as ymm pairs beside its zmm vpdpbusd
    (0.46 -> 0.40 ms for a 52x52 conv 96 -> 96 once whole). The AVX-512 presets turn that off
    (compiled for Cascade Lake on any host; the machine code is checked, nothing runs)."""
    from conftest import make_model
    from onnx import helper

    from tvmq.compile import quantized_module
    from tvmq.targets import get_preset

    preset = get_preset("x86-avx512vnni")
    assert "-prefer-256-bit" in preset.target["mattr"] and "-prefer-256-bit" in get_preset("x86-avx512").target["mattr"]
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"), helper.make_node("Mul", ["c", "s"], ["y"], name="silu")]
    model = make_model(nodes, [("x", [1, 32, 8, 8])], [("y", [1, 32, 8, 8])],
                       [("w", rng.normal(0, 0.2, (32, 32, 3, 3)).astype(np.float32)), ("b", rng.normal(0, 0.1, 32).astype(np.float32))])
    qm = quantized_module(model, preset, raw=[{"x": rng.normal(0, 1, (1, 32, 8, 8)).astype(np.float32)} for _ in range(4)])
    (kernel,) = [f for name, f in primfuncs(lower(qm.module, preset), "tvmq_conv2d").items() if "silu" in name]
    asm = kernel_asm(kernel, preset.tvm_target())
    divisions = re.findall(r"vdivps\s+[^\n]*", asm)
    assert "vpdpbusd" in asm and divisions and all("zmm" in d for d in divisions), divisions


def test_denormals_are_flushed_on_every_thread_and_the_callers_mxcsr_comes_back():
    """x86 kernels run with FTZ/DAZ on every thread (a denormal-heavy FP32 detector: 51.6 ->
    11.6 ms): ``x * 1.5`` over 256 rows of denormals, in parallel, is zero in every row; the
    calling thread's MXCSR is restored after the call (numpy there still sees denormals). An ARM
    build has no such kernels."""
    from tvmq.execute import HostModule
    from tvmq.targets.denormals import FLUSH_FUNC, RESTORE_FUNC

    x = relax.Var("x", relax.TensorType((256, 1024), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.multiply(x, relax.const(1.5, "float32")))
        bb.emit_func_output(y)
    mod = bb.get()
    tiny = np.full((256, 1024), 1e-39, np.float32)
    assert np.all(tiny * np.float32(1.5) > 0)  # denormal arithmetic here before the call
    got = np.asarray(HostModule(mod, "x86")(tiny))
    assert not np.any(got), np.count_nonzero(got)
    assert np.all(tiny * np.float32(1.5) > 0)  # and after it: the caller's MXCSR came back
    names = lambda preset: {gv.name_hint for gv in lower(mod, preset).get_global_vars()}  # noqa: E731
    assert {FLUSH_FUNC, RESTORE_FUNC} <= names("x86") and not {FLUSH_FUNC, RESTORE_FUNC} & names("arm")
