"""End-to-end numerics on synthetic models: error bounds from the scales, SQNR, exact integers."""

import numpy as np
import pytest
from tvm import relax

from conftest import Compiled, conv_model, matmul_model, random_samples, residual_model, sqnr_db
from tvmq.execute import HostModule
from tvmq.kernels import reduction_kernels
from tvmq.pipeline import lower
from tvmq.passes import ConvertToNHWC, FoldQDQ, InsertQDQ
from tvmq.qparams import QParams, fixed_point_multiplier, quantize_weight, requantize_reference
from tvmq.targets import get_preset, host_cpu_flags


def layer_bound(plan_entry, w, axis, reduce_size, x_absmax):
    """Worst-case |int8 - fp32| per output channel of one conv/matmul layer with float output.

    x*w - x^*w^ = x (w - w^) + w^ (x - x^): at most K*max|x|*sw/2 + sum|w^|*sx/2 per output, plus
    half an accumulator step from rounding the bias to int32.
    """
    sx = float(plan_entry.inputs[0].scale)
    wq, wqp = quantize_weight(w, axis)
    sw = wqp.scale.astype(np.float64)
    w_hat = np.abs(wqp.dequantize(wq)).astype(np.float64)
    other = tuple(i for i in range(w.ndim) if i != axis)
    return reduce_size * x_absmax * sw / 2 + w_hat.sum(axis=other) * sx / 2 + sx * sw / 2 + 1e-5


def assert_integer_kernels(mod, expected):
    kernels = reduction_kernels(lower(mod, "x86"))
    assert len(kernels) == expected, kernels
    for k in kernels:
        assert k.is_integer, k  # int8/uint8 operands, int32 accumulator


@pytest.mark.parametrize(
    "cin,cout,k,stride,pad,groups",
    [(4, 8, 3, 1, 1, 1), (3, 6, 3, 2, 1, 1), (8, 8, 3, 1, 1, 8), (8, 16, 1, 1, 0, 2), (4, 4, 5, 1, 2, 1)],
    ids=["conv3x3", "strided", "depthwise", "grouped1x1", "conv5x5"],
)
def test_conv_within_scale_bound(cin, cout, k, stride, pad, groups):
    model, w, _ = conv_model(cin, cout, k, stride, pad, groups, relu=True)
    samples = random_samples((1, cin, 8, 8))
    c = Compiled(model, samples)
    bound = layer_bound(c.plan.layers["conv"], w, 0, (cin // groups) * k * k, 1.0).reshape(1, -1, 1, 1)
    for s in samples:
        ref, out = c.fp32(s["x"])[0], c.int8(s["x"])[0]
        assert np.all(np.abs(out - ref) <= bound)
        assert sqnr_db(ref, out) >= 30
    assert_integer_kernels(c.qmod, 1)


@pytest.mark.parametrize("batch,relu", [(1, False), (4, True), (13, False)])  # 13 rows: computed to 14
def test_matmul_within_scale_bound(batch, relu):
    model, w, _ = matmul_model(32, 16, batch, relu)
    samples = random_samples((batch, 32))
    c = Compiled(model, samples)
    bound = layer_bound(c.plan.layers["mm"], w, 1, 32, 1.0).reshape(1, -1)
    for s in samples:
        ref, out = c.fp32(s["x"])[0], c.int8(s["x"])[0]
        assert np.all(np.abs(out - ref) <= bound)
        assert sqnr_db(ref, out) >= 30
    assert_integer_kernels(c.qmod, 1)


def test_residual_block_runs_in_integers_with_high_sqnr():
    samples = random_samples((1, 8, 8, 8), n=24)
    c = Compiled(residual_model(), samples)
    plan = c.plan.layers
    assert plan["residual"].precision == "int8" and plan["residual"].output is not None
    assert all(plan[n].precision == "int8" for n in ("conv0", "conv1", "conv2"))
    for s in samples:
        assert sqnr_db(c.fp32(s["x"])[0], c.int8(s["x"])[0]) >= 30
    assert_integer_kernels(c.qmod, 3)
    from tvmq.passes import count_ops

    # Only the model input is quantized (multiply by 1/scale, round) and the last layer's
    # accumulator scaled to float: everything between is integer.
    counts = count_ops(c.qmod)
    assert counts["relax.quantize"] + counts["relax.round"] == 1 and counts["relax.dequantize"] == 0


def test_fixed_point_and_float_requantize_agree_within_one_step():
    samples = random_samples((1, 8, 8, 8), n=8)
    c = Compiled(residual_model(), samples)
    float_mode = HostModule(relax.transform.FoldConstant()(FoldQDQ("float")(InsertQDQ(c.plan)(c.float_mod))))
    fake = HostModule(InsertQDQ(c.plan)(c.float_mod))  # the Q/DQ float simulation
    for s in samples:
        a, b, sim = c.int8(s["x"])[0], float_mode(s["x"])[0], fake(s["x"])[0]
        step = np.abs(sim).max() / 127
        assert np.abs(a - b).max() <= 2 * step
        assert np.abs(a - sim).max() <= 2 * step


def _qdq_conv_module(x_qp, w, b, y_qp, pad, size=6, stride=1):
    """quantize -> dequantize -> conv(dequantize(W int8)) + b -> relu -> quantize (output stays int)."""
    wq, wqp = quantize_weight(w, 0)
    c = lambda a, d: relax.const(np.asarray(a, d), d)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, w.shape[1], size, size), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.quantize(x, c(x_qp.scale, "float32"), c(x_qp.zero_point, "int32"), out_dtype="uint8"))
            d = bb.emit(relax.op.dequantize(q, c(x_qp.scale, "float32"), c(x_qp.zero_point, "int32")))
            wd = bb.emit(relax.op.dequantize(relax.const(wq, "int8"), c(wqp.scale, "float32"), c(wqp.zero_point, "int32"), axis=0))
            y = bb.emit(relax.op.nn.conv2d(d, wd, strides=stride, padding=pad))
            y = bb.emit(relax.op.add(y, relax.const(b.reshape(1, -1, 1, 1))))
            y = bb.emit(relax.op.nn.relu(y))
            o = bb.emit_output(relax.op.quantize(y, c(y_qp.scale, "float32"), c(y_qp.zero_point, "int32"), out_dtype="uint8"))
        bb.emit_func_output(o)
    return bb.get(), wq, wqp


def _packed_conv_width(fused) -> int:
    """The output width the packed int8 conv of ``fused`` computes (before any crop)."""
    import tvm_ffi

    from tvmq._compat import s_tir
    from tvmq.targets.kernel_names import CONV_BLOCK
    from tvmq.testing import primfuncs

    widths = []

    def on_block(block):
        if block.name_hint == CONV_BLOCK:
            widths.append(int(block.writes[0].source.shape[2]))  # 0.27: TensorRegion.source

    for func in primfuncs(fused).values():
        tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, on_block)])
    (width,) = widths
    return width


X86_PRESETS = ["x86-avx2", "x86-avx512", "x86-avxvnni", "x86-avx512vnni"]


@pytest.mark.parametrize("preset", X86_PRESETS)
@pytest.mark.parametrize("size, stride", [(6, 1), (13, 1), (26, 2)], ids=["6x6", "13x13", "26x26-stride2"])
def test_folded_conv_is_bit_exact_against_integer_reference(preset, size, stride):
    """Each x86 preset's int8 micro-kernel (vpmaddwd ymm/zmm, vpdpbusd ymm/zmm) against a numpy
    integer program: 3 input channels (padded to the kernel's k) and 5 output channels (padded to
    its lanes); uint8 activations up to 255 against int8 weights up to +-127, where a
    vpmaddubsw pair sum would saturate. An output width of 13 (prime: a YOLO head's last stage)
    is computed to a few more columns by fuller register tiles, the spare ones cropped."""
    from tvmq.pipeline import fuse

    p = get_preset(preset)
    if not p.runs_here:
        pytest.skip(f"this CPU lacks {sorted(p.cpu_flags - host_cpu_flags())} (its code is checked in test_isa.py)")
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.3, (5, 3, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.2, 5).astype(np.float32)
    x_qp = QParams(np.float32(2 / 255), np.int32(128), "uint8")  # real 0 is 128: padding must use it
    y_qp = QParams(np.float32(0.02), np.int32(0), "uint8")
    mod, wq, wqp = _qdq_conv_module(x_qp, w, b, y_qp, pad=1, size=size, stride=stride)
    folded = ConvertToNHWC()(FoldQDQ()(mod))  # NHWC: the layout of the packed micro-kernels
    assert_integer_kernels(folded, 1)
    assert [k.intrinsic is not None for k in reduction_kernels(lower(folded, p))] == [True]  # tensorized
    out = (size - 1) // stride + 1
    width = _packed_conv_width(fuse(folded, p))
    assert (out < width <= out + 3) if out == 13 else width == out  # spare columns only where 13 has no tile
    run = HostModule(folded, p)
    for _ in range(5):
        x = rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
        xq = x_qp.quantize(x).astype(np.int64)
        padded = np.pad(xq, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=int(x_qp.zero_point))
        acc = np.zeros((1, 5, out, out), np.int64)
        reach = (out - 1) * stride + 1
        for i in range(3):
            for j in range(3):
                acc += np.einsum("oc,nchw->nohw", wq[:, :, i, j].astype(np.int64),
                                 padded[:, :, i : i + reach : stride, j : j + reach : stride] - int(x_qp.zero_point))
        sxw = float(x_qp.scale) * wqp.scale.astype(np.float64)
        acc += np.round(b / sxw).astype(np.int64).reshape(1, -1, 1, 1)
        m0, shift = fixed_point_multiplier(sxw / float(y_qp.scale))
        expected = requantize_reference(acc, m0.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1))
        expected = np.clip(expected + int(y_qp.zero_point), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(run(x)[0], expected)


def test_weights_are_stored_as_int8():
    from tvmq.bundle import weight_bytes

    samples = random_samples((1, 8, 8, 8), n=4)
    c = Compiled(residual_model(), samples)
    conv_weight_elems = 3 * 8 * 8 * 3 * 3
    before, after = weight_bytes(c.float_mod), weight_bytes(c.qmod)
    assert before["float32"] == 4 * conv_weight_elems + 4 * 3 * 8  # weights + biases
    assert after["int8"] == conv_weight_elems  # a quarter of the float weight bytes
    assert after.get("float32", 0) <= 4 * 3 * 8  # only scales are left in float
