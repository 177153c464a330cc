"""Every op family of the zoo's real models compiles, on a small synthetic model each.

Detectors, segmentation heads, transformers and recognisers put these ops around their convs and
matmuls: Resize (FPN / DB upsampling), Erf GELU and LayerNorm (decomposed, as Paddle exports it,
and as the ONNX op), attention (products of two activations, Softmax), HardSwish/HardSigmoid
(PP-LCNet), Split/Slice/Concat heads (YOLO), MaxPool pyramids (SPPF), 1-D convolutions (audio
front ends such as Silero VAD's). For each: the FP32 build
equals ONNX Runtime, the int8 build keeps its output within an SQNR floor, and the layers around
the op really run as integer kernels.
"""

import numpy as np
import onnxruntime as ort
import pytest
from conftest import Compiled, make_model, sqnr_db
from onnx import helper

from tvmq.kernels import call_order, reduction_kernels
from tvmq.pipeline import lower

RNG = np.random.default_rng(0)


def _w(*shape, scale=0.3):
    return RNG.normal(0, scale, shape).astype(np.float32)


def _conv(name, x, w, y, k=3, stride=1):
    return helper.make_node("Conv", [x, w], [y], name=name, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2)


def resize_model():
    """conv (stride 2) -> Resize x2 (nearest, then linear) -> conv: an FPN upsampling path."""
    nodes = [_conv("down", "x", "w0", "a", stride=2),
             helper.make_node("Resize", ["a", "", "s"], ["b"], name="up_nearest", mode="nearest"),
             helper.make_node("Resize", ["b", "", "s"], ["c"], name="up_linear", mode="linear"),
             _conv("head", "c", "w1", "y")]
    inits = [("w0", _w(8, 4, 3, 3)), ("w1", _w(4, 8, 3, 3)), ("s", np.array([1, 1, 2, 2], np.float32))]
    return make_model(nodes, [("x", [1, 4, 16, 16])], [("y", [1, 4, 32, 32])], inits), 2


def _layernorm_decomposed(x, y, c, prefix):
    """Paddle's export of LayerNorm: ReduceMean, Sub, Pow, ReduceMean, Add eps, Sqrt, Div, Mul, Add."""
    n = lambda op, i, o, **kw: helper.make_node(op, i, [f"{prefix}{o}"] if o != y else [y], name=f"{prefix}{o}", **kw)  # noqa: E731
    p = lambda s: f"{prefix}{s}"  # noqa: E731
    return [n("ReduceMean", [x], "mean", axes=[-1]), n("Sub", [x, p("mean")], "d"),
            n("Pow", [p("d"), "two"], "d2"), n("ReduceMean", [p("d2")], "var", axes=[-1]),
            n("Add", [p("var"), "eps"], "ve"), n("Sqrt", [p("ve")], "sd"), n("Div", [p("d"), p("sd")], "nrm"),
            n("Mul", [p("nrm"), f"{prefix}gamma"], "sc"), n("Add", [p("sc"), f"{prefix}beta"], y)]


def transformer_model():
    """A transformer block as PP-OCRv6's recogniser holds it (tokens 16 x 32): LayerNorm
    (decomposed), Q/K/V projections, Q.K^T and softmax(.).V (products of two activations),
    output projection + residual, LayerNorm (the ONNX op), MLP with Erf GELU, residual."""
    t, d = 16, 32
    nodes = _layernorm_decomposed("x", "h", d, "ln1_")
    nodes += [helper.make_node("MatMul", ["h", f"w{n}"], [n], name=f"proj_{n}") for n in "qkv"]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["qk"], name="scores"),
              helper.make_node("Mul", ["qk", "scale"], ["qks"], name="scale"),
              helper.make_node("Softmax", ["qks"], ["p"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["att"], name="context"),
              helper.make_node("MatMul", ["att", "wo"], ["o"], name="proj_o"),
              helper.make_node("Add", ["x", "o"], ["r1"], name="residual1"),
              helper.make_node("LayerNormalization", ["r1", "ln2_gamma", "ln2_beta"], ["h2"], name="ln2", axis=-1),
              helper.make_node("MatMul", ["h2", "wf1"], ["f1"], name="fc1"),
              helper.make_node("Div", ["f1", "sqrt2"], ["f1s"], name="gelu_div"),
              helper.make_node("Erf", ["f1s"], ["e"], name="gelu_erf"),
              helper.make_node("Add", ["e", "one"], ["e1"], name="gelu_add"),
              helper.make_node("Mul", ["f1", "e1"], ["g"], name="gelu_mul"),
              helper.make_node("Mul", ["g", "half"], ["gh"], name="gelu_half"),
              helper.make_node("MatMul", ["gh", "wf2"], ["f2"], name="fc2"),
              helper.make_node("Add", ["r1", "f2"], ["y"], name="residual2")]
    inits = [("two", np.float32(2)), ("eps", np.float32(1e-5)), ("ln1_gamma", 1 + _w(d, scale=0.1)),
             ("ln1_beta", _w(d, scale=0.1)), ("ln2_gamma", 1 + _w(d, scale=0.1)), ("ln2_beta", _w(d, scale=0.1)),
             ("scale", np.float32(d ** -0.5)), ("sqrt2", np.float32(np.sqrt(2))), ("one", np.float32(1)),
             ("half", np.float32(0.5)), ("wo", _w(d, d, scale=0.15)), ("wf1", _w(d, 2 * d, scale=0.15)),
             ("wf2", _w(2 * d, d, scale=0.1))] + [(f"w{n}", _w(d, d, scale=0.15)) for n in "qkv"]
    return make_model(nodes, [("x", [1, t, d])], [("y", [1, t, d])], inits), 6


def lcnet_model():
    """PP-LCNet's blocks: conv -> HardSwish -> depthwise conv -> HardSwish -> squeeze-excite
    (GlobalAveragePool, conv, Relu, conv, HardSigmoid, Mul) -> pointwise conv."""
    nodes = [_conv("stem", "x", "w0", "a"), helper.make_node("HardSwish", ["a"], ["b"], name="hs0"),
             helper.make_node("Conv", ["b", "wd"], ["c"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=16),
             helper.make_node("HardSwish", ["c"], ["d"], name="hs1"),
             helper.make_node("GlobalAveragePool", ["d"], ["g"], name="gap"),
             helper.make_node("Conv", ["g", "ws1"], ["s1"], name="se1", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["s1"], ["s2"], name="se_relu"),
             helper.make_node("Conv", ["s2", "ws2"], ["s3"], name="se2", kernel_shape=[1, 1]),
             helper.make_node("HardSigmoid", ["s3"], ["s4"], name="se_gate", alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["d", "s4"], ["e"], name="se_mul"),
             helper.make_node("Conv", ["e", "wp"], ["y"], name="pw", kernel_shape=[1, 1])]
    inits = [("w0", _w(16, 3, 3, 3)), ("wd", _w(16, 1, 3, 3)), ("ws1", _w(4, 16, 1, 1)), ("ws2", _w(16, 4, 1, 1)),
             ("wp", _w(32, 16, 1, 1, scale=0.2))]
    return make_model(nodes, [("x", [1, 3, 16, 16])], [("y", [1, 32, 16, 16])], inits), 5


def yolo_head_model():
    """A YOLOv8-style head: conv -> Split into two branches (C2f), SPPF MaxPools + Concat, a box
    branch (conv, Slice of the first 4 channels) and a class branch (conv, Sigmoid), one output
    Concat([boxes * stride, scores]) reshaped to ``[1, 4+C, anchors]``."""
    nodes = [_conv("stem", "x", "w0", "a"), helper.make_node("Sigmoid", ["a"], ["as"], name="silu_sig"),
             helper.make_node("Mul", ["a", "as"], ["b"], name="silu"),
             helper.make_node("Split", ["b", "split"], ["b1", "b2"], name="c2f_split", axis=1),
             _conv("c2f_conv", "b2", "w1", "c"),
             helper.make_node("MaxPool", ["c"], ["m1"], name="sppf1", kernel_shape=[5, 5], pads=[2] * 4),
             helper.make_node("MaxPool", ["m1"], ["m2"], name="sppf2", kernel_shape=[5, 5], pads=[2] * 4),
             helper.make_node("Concat", ["b1", "c", "m1", "m2"], ["cat"], name="c2f_cat", axis=1),
             _conv("box_conv", "cat", "wb", "box8", k=1),
             helper.make_node("Slice", ["box8", "s0", "s4", "s1"], ["box"], name="box_slice"),
             helper.make_node("Mul", ["box", "stride"], ["boxs"], name="box_stride"),
             _conv("cls_conv", "cat", "wc", "cls", k=1),
             helper.make_node("Sigmoid", ["cls"], ["score"], name="cls_sigmoid"),
             helper.make_node("Concat", ["boxs", "score"], ["head"], name="head_cat", axis=1),
             helper.make_node("Reshape", ["head", "shape"], ["y"], name="flatten")]
    inits = [("w0", _w(16, 3, 3, 3)), ("w1", _w(8, 8, 3, 3)), ("wb", _w(8, 32, 1, 1)), ("wc", _w(6, 32, 1, 1)),
             ("split", np.array([8, 8], np.int64)), ("s0", np.array([0], np.int64)), ("s4", np.array([4], np.int64)),
             ("s1", np.array([1], np.int64)), ("stride", np.float32(16)), ("shape", np.array([1, 10, 64], np.int64))]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 10, 64])], inits), 4


def conv1d_model():
    """An audio front end: a strided 1-D conv with bias (an STFT as a conv), Relu, a dilated one,
    a grouped one, Relu, a pointwise one; input ``[batch 2, 1, 64]``."""
    c1 = lambda name, x, w, y, k, **kw: helper.make_node("Conv", [x, w] + (["b0"] if name == "stft" else []), [y],  # noqa: E731
                                                        name=name, kernel_shape=[k], **kw)
    nodes = [c1("stft", "x", "w0", "a", 8, strides=[4], pads=[2, 2]), helper.make_node("Relu", ["a"], ["b"], name="r0"),
             c1("dilated", "b", "w1", "c", 3, dilations=[2], pads=[2, 2]),
             c1("grouped", "c", "w2", "d", 3, group=2, pads=[1, 1]), helper.make_node("Relu", ["d"], ["e"], name="r1"),
             c1("pointwise", "e", "w3", "y", 1)]
    inits = [("w0", _w(16, 1, 8)), ("b0", _w(16, scale=0.1)), ("w1", _w(16, 16, 3, scale=0.15)),
             ("w2", _w(16, 8, 3, scale=0.2)), ("w3", _w(8, 16, 1, scale=0.2))]
    return make_model(nodes, [("x", [2, 1, 64])], [("y", [2, 8, 16])], inits), 4


FAMILIES = {"conv1d": conv1d_model, "resize": resize_model, "transformer": transformer_model, "lcnet": lcnet_model,
            "yolo_head": yolo_head_model}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_op_family_compiles_equal_to_onnx_runtime_in_fp32_and_int8_within_its_floor(family):
    model, int8_layers = FAMILIES[family]()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(1)
    samples = [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(8)]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = [session.run(None, s)[0] for s in samples]
    c = Compiled(model, samples)
    for s, r in zip(samples, ref):
        np.testing.assert_allclose(np.asarray(c.fp32(s["x"])[0]), r, rtol=1e-4, atol=1e-4 * np.abs(r).max())
    got = np.concatenate([np.asarray(c.int8(s["x"])[0]).ravel() for s in samples])
    # a handful of int8 layers, each adding noise ~40 dB below its signal
    assert sqnr_db(np.concatenate([r.ravel() for r in ref]), got) > 25
    assert c.plan.count("int8") == int8_layers
    lowered = lower(c.qmod, "x86")
    integer = {k.func for k in reduction_kernels(lowered)
               if k.accum_dtype == "int32" and set(k.operand_dtypes) <= {"int8", "uint8"}}
    assert sum(1 for f in call_order(lowered) if f in integer) == int8_layers  # one call per int8 layer


def test_conv1d_becomes_a_height_1_conv2d_and_other_convs_are_untouched():
    import tvm
    from tvm import relax

    from tvmq.passes import Conv1dToConv2d

    def build(one_d: bool, rewritten: bool):
        x = relax.Var("x", relax.TensorType((2, 4, 16) if one_d else (2, 4, 1, 16), "float32"))
        w = relax.const(np.ones((8, 2, 3) if one_d else (8, 2, 1, 3), np.float32))
        bb = relax.BlockBuilder()
        with bb.function("main", [x]):
            with bb.dataflow():
                if one_d and not rewritten:
                    y = bb.emit_output(relax.op.nn.conv1d(x, w, strides=2, padding=(1, 2), dilation=3, groups=2))
                else:
                    x4 = bb.emit(relax.op.expand_dims(x, 2)) if one_d else x
                    w4 = bb.emit(relax.op.expand_dims(w, 2)) if one_d else w
                    c = relax.op.nn.conv2d(x4, w4, strides=[1, 2], padding=[0, 1, 0, 2], dilation=[1, 3], groups=2)
                    y = bb.emit_output(relax.op.squeeze(bb.emit(c), [2]) if one_d else c)
            bb.emit_func_output(y)
        return bb.get()

    tvm.ir.assert_structural_equal(Conv1dToConv2d()(build(True, False)), build(True, True))
    untouched = build(False, False)  # a conv2d of height 1 already: must not touch
    tvm.ir.assert_structural_equal(Conv1dToConv2d()(untouched), untouched)


@pytest.mark.parametrize("channels, length, padding", [(1, 30, (1, 2)), (2, 40, (0, 0))])
def test_a_conv1d_of_whole_strides_over_few_channels_runs_over_the_phases(channels, length, padding):
    """A conv1d whose kernel is whole strides over few input channels (an STFT) becomes a
    stride-1 conv over ``channels * stride`` phase channels, computing the same (with a crop
    where the padded input runs past the last window); a wider input stays a strided conv."""
    from tvm import relax

    from tvmq.execute import HostModule
    from tvmq.passes import Conv1dToConv2d, count_ops
    from tvmq.passes.graph import static_shape

    def build(c):
        x = relax.Var("x", relax.TensorType((2, c, length), "float32"))
        w = relax.const(_w(6, c, 8))
        bb = relax.BlockBuilder()
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.nn.conv1d(x, w, strides=4, padding=padding))
            bb.emit_func_output(y)
        return bb.get()

    mod = build(channels)
    rewritten = Conv1dToConv2d()(mod)
    conv = [b.value for b in rewritten["main"].body.blocks[0].bindings if getattr(b.value, "op", None) is not None
            and getattr(b.value.op, "name", "") == "relax.nn.conv2d"]
    assert len(conv) == 1 and [int(s) for s in conv[0].attrs.strides] == [1, 1]
    assert static_shape(conv[0].args[1])[1] == channels * 4  # the phases as channels
    assert count_ops(rewritten)["relax.strided_slice"] == (1 if sum(padding) else 0)
    x = np.random.default_rng(0).normal(0, 1, (2, channels, length)).astype(np.float32)
    want = np.asarray(HostModule(mod)(x))
    np.testing.assert_allclose(np.asarray(HostModule(rewritten)(x)), want, rtol=1e-5, atol=1e-5)
    wide = Conv1dToConv2d()(build(16))  # 16 channels already fill a vector: the strided conv stays
    assert count_ops(wide)["relax.permute_dims"] == 0


def _csp_model(head_is_output: bool):
    """A CSP block with an SPP pyramid and an FPN-style upsampling: conv + SiLU branches, a
    max-pool of one, a strided conv upsampled by a nearest Resize, Concat, a 1x1 conv (which
    reads the concat in int8); ``head_is_output`` also makes the concat a model output."""
    def silu(x, y):
        return [helper.make_node("Sigmoid", [x], [f"{y}_s"], name=f"{y}_sig"),
                helper.make_node("Mul", [x, f"{y}_s"], [y], name=f"{y}_silu")]

    nodes = [_conv("stem", "x", "w0", "s"), _conv("ca", "s", "w1", "a0"), *silu("a0", "a"),
             _conv("cb", "s", "w2", "b0"), *silu("b0", "b"),
             helper.make_node("MaxPool", ["b"], ["m"], name="spp", kernel_shape=[5, 5], pads=[2] * 4),
             _conv("cc", "s", "w4", "d0", stride=2), *silu("d0", "d"),
             helper.make_node("Resize", ["d", "", "up"], ["u"], name="fpn_up", mode="nearest"),
             helper.make_node("Concat", ["a", "b", "m", "u"], ["cat"], name="csp_cat", axis=1),
             _conv("fuse", "cat", "w3", "y", k=1)]
    inits = [("w0", _w(16, 3, 3, 3)), ("w1", _w(8, 16, 3, 3)), ("w2", _w(8, 16, 3, 3)), ("w3", _w(8, 32, 1, 1)),
             ("w4", _w(8, 16, 3, 3)), ("up", np.array([1, 1, 2, 2], np.float32))]
    outputs = [("y", [1, 8, 16, 16])] + ([("cat", [1, 32, 16, 16])] if head_is_output else [])
    return make_model(nodes, [("x", [1, 3, 16, 16])], outputs, inits)


@pytest.mark.parametrize("head_is_output", [False, True])
def test_a_concat_read_by_int8_layers_alone_moves_int8_values_and_the_same_numbers(monkeypatch, head_is_output):
    """quantize(concat(a, maxpool(b), resize(d))) == concat(quantize(a), maxpool(quantize(b)),
    resize(quantize(d))): the SiLU branches then write int8 and the pool, the nearest resize and
    the concat move int8; where the concat is also read in float (a model output) nothing changes."""
    import tvm
    from tvm import relax

    import tvmq.passes.insert_qdq as insert_qdq
    from tvmq.execute import HostModule
    from tvmq.passes.graph import call_op, dtype_of
    from tvmq.quantize import quantize_pipeline

    rng = np.random.default_rng(2)
    samples = [{"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    c = Compiled(_csp_model(head_is_output), samples)

    def dtypes(mod, op):
        found = []
        relax.analysis.post_order_visit(mod["main"], lambda e: found.append(dtype_of(e))
                                        if isinstance(e, relax.Call) and call_op(e) == op else None)
        return found

    with monkeypatch.context() as m:
        m.setattr(insert_qdq, "_quantized_concat_parts", lambda *args: ({}, set()))
        before = quantize_pipeline(c.plan)(c.float_mod)
    assert dtypes(before, "relax.concat") == ["float32"]
    if head_is_output:
        tvm.ir.assert_structural_equal(c.qmod, before)
        return
    assert dtypes(c.qmod, "relax.concat") == ["uint8"] and dtypes(c.qmod, "relax.nn.max_pool2d") == ["uint8"]
    assert dtypes(c.qmod, "relax.image.resize2d") == ["uint8"]
    old = HostModule(before)
    for s in samples:
        np.testing.assert_array_equal(np.asarray(c.int8(s["x"])[0]), np.asarray(old(s["x"])[0]))


@pytest.mark.parametrize("channels, hw, blocks", [(258, 5, 18), (258, 9, 17), (64, 5, 4), (80, 6, 6)])
def test_a_float_conv_of_a_prime_block_count_on_short_rows_gets_one_more_block(channels, hw, blocks):
    """Output channels in a prime number of vector blocks (17 of 16 lanes for 258 filters) on
    rows shorter than a pixel tile are packed one block wider, so the float conv tile can hold
    2-4 blocks; the spare channels are cropped (the FP32 build equals ONNX Runtime). Long rows
    and block counts with a small divisor are packed as they are."""
    from conftest import conv_model

    from tvmq.execute import HostModule
    from tvmq.frontend import load_onnx
    from tvmq.passes.pack_kernels import float_conv_blocks
    from tvmq.quantize import prepare

    assert float_conv_blocks(channels, 16, hw) == blocks
    model, _, _ = conv_model(cin=8, cout=channels, hw=hw)
    x = np.random.default_rng(0).normal(0, 1, (1, 8, hw, hw)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = np.asarray(HostModule(prepare(load_onnx(model)[0]))(x)[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _max_pool_reference(x, pool_size, strides, padding, ceil_mode, layout):
    """numpy max-pool: every output the largest of its window, padding at the dtype's lowest."""
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    (kh, kw), (sh, sw), (top, left, bottom, right) = pool_size, strides, padding
    n, c, h, w = x.shape

    def size(extent, k, s, pad):
        span = extent + pad - k
        return (-(-span // s) if ceil_mode else span // s) + 1

    oh, ow = size(h, kh, sh, top + bottom), size(w, kw, sw, left + right)
    lowest = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf
    padded = np.full((n, c, h + top + bottom + kh * sh, w + left + right + kw * sw), lowest, x.dtype)
    padded[:, :, top:top + h, left:left + w] = x
    out = np.empty((n, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = padded[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].max(axis=(2, 3))
    return out.transpose(0, 2, 3, 1) if layout == "NHWC" else out


@pytest.mark.parametrize("shape, dtype, pool_size, strides, padding, ceil_mode, layout", [
    ((1, 13, 13, 64), "uint8", (13, 13), (1, 1), (6, 6, 6, 6), False, "NHWC"),  # SPP's largest window
    ((1, 3, 17, 22), "float32", (5, 4), (2, 3), (1, 2, 2, 0), True, "NCHW"),
])
def test_a_large_max_pool_runs_as_a_row_pool_and_a_column_pool_with_the_same_numbers(
        shape, dtype, pool_size, strides, padding, ceil_mode, layout):
    from tvm import relax

    from tvmq._compat import TensorType
    from tvmq.execute import HostModule
    from tvmq.kernels import kernel_funcs

    bb = relax.BlockBuilder()
    x = relax.Var("x", TensorType(shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.max_pool2d(x, pool_size=pool_size, strides=strides, padding=padding,
                                                      ceil_mode=ceil_mode, layout=layout))
        bb.emit_func_output(y)
    mod = bb.get()
    pools = [f for name, f in kernel_funcs(lower(mod, "x86")).items() if name.startswith("max_pool2d")]
    assert len(pools) == 2
    run, rng = HostModule(mod), np.random.default_rng(0)
    for _ in range(3):
        data = (rng.integers(0, 256, shape) if dtype == "uint8" else rng.normal(size=shape)).astype(dtype)
        got = run(data)[0]
        np.testing.assert_array_equal(got, _max_pool_reference(data, pool_size, strides, padding, ceil_mode, layout))
