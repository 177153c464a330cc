"""Structural tests of InsertQDQ and FoldQDQ: small Before/Expected modules.

Weights are function parameters in the TVMScript and bound to numpy arrays afterwards, so both
sides hold the same constants and ``assert_structural_equal`` compares them by value.
"""

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvmq.plan import LayerPlan, QuantPlan
from tvmq.passes import FoldQDQ, InsertQDQ, count_ops, find_layers
from tvmq.qparams import QParams, fixed_point_multiplier, quantize_weight

W = np.array([[0.5, -0.25], [0.1, 0.2], [-0.4, 0.3], [0.05, -0.45]], dtype=np.float32)
X_QP = QParams(np.float32(0.25), np.int32(0), "uint8")
Y_QP = QParams(np.float32(0.125), np.int32(0), "uint8")


def bind(mod, **arrays):
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in arrays.items()})(mod)


@I.ir_module
class MatmulRelu:
    @R.function
    def main(x: R.Tensor((1, 4), "float32"), w: R.Tensor((4, 2), "float32")) -> R.Tensor((1, 2), "float32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            lv = R.matmul(x, w)
            gv = R.nn.relu(lv)
            R.output(gv)
        return gv


def before():
    return bind(MatmulRelu, w=W)


def plan(output=None, precision="int8"):
    inputs = (X_QP,) if precision == "int8" else ()
    return QuantPlan(layers={"matmul_0": LayerPlan(kind="matmul", precision=precision, inputs=inputs, output=output)})


def test_layers_are_found_and_named():
    layers = find_layers(before()["main"])
    assert [(l.name, l.kind) for l in layers] == [("matmul_0", "matmul")]
    assert layers[0].chain.act.kind == "relu"


def test_insert_qdq_wraps_input_and_weight():
    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 4), "float32"),
            wq: R.Tensor((4, 2), "int8"),
            ws: R.Tensor((2,), "float32"),
            wz: R.Tensor((2,), "int32"),
        ) -> R.Tensor((1, 2), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                q = R.quantize(x, R.const(0.25, "float32"), R.const(0, "int32"), axis=-1, out_dtype="uint8")
                dq = R.dequantize(q, R.const(0.25, "float32"), R.const(0, "int32"), axis=-1, out_dtype="float32")
                wd = R.dequantize(wq, ws, wz, axis=1, out_dtype="float32")
                lv = R.matmul(dq, wd)
                gv = R.nn.relu(lv)
                R.output(gv)
            return gv

    wq, wqp = quantize_weight(W, 1)
    expected = bind(Expected, wq=wq, ws=wqp.scale, wz=wqp.zero_point)
    tvm.ir.assert_structural_equal(InsertQDQ(plan())(before()), expected)


def test_insert_qdq_quantizes_output_when_planned():
    out = InsertQDQ(plan(output=Y_QP))(before())
    counts = count_ops(out)
    assert counts["relax.quantize"] == 2 and counts["relax.dequantize"] == 3


def test_insert_qdq_leaves_float_layers_alone():
    mod = before()
    tvm.ir.assert_structural_equal(InsertQDQ(plan(precision="fp32"))(mod), mod)
    tvm.ir.assert_structural_equal(InsertQDQ(QuantPlan(layers={}))(mod), mod)


def test_fold_qdq_float_output_becomes_integer_matmul():
    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 4), "float32"), wq: R.Tensor((4, 2), "int8"), s: R.Tensor((1, 2), "float32")
        ) -> R.Tensor((1, 2), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                xs = R.multiply(x, R.const(4.0, "float32"))  # entering integers: x * (1/scale)
                xr = R.round(xs)
                xc = R.clip(xr, 0, 255)
                q = R.astype(xc, "uint8")
                acc = R.matmul(q, wq, out_dtype="int32")
                f = R.astype(acc, "float32")
                m = R.multiply(f, s)
                gv = R.nn.relu(m)
                R.output(gv)
            return gv

    wq, wqp = quantize_weight(W, 1)
    scale = (0.25 * wqp.scale.astype(np.float64)).astype(np.float32).reshape(1, 2)
    expected = bind(Expected, wq=wq, s=scale)
    folded = FoldQDQ()(InsertQDQ(plan())(before()))
    tvm.ir.assert_structural_equal(folded, expected)


def test_fold_qdq_requantizes_with_fixed_point_and_folds_relu_into_clamp():
    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 4), "float32"),
            wq: R.Tensor((4, 2), "int8"),
            m0: R.Tensor((1, 2), "int64"),
            rnd: R.Tensor((1, 2), "int64"),
            sh: R.Tensor((1, 2), "int64"),
        ) -> R.Tensor((1, 2), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                xs = R.multiply(x, R.const(4.0, "float32"))  # entering integers: x * (1/scale)
                xr = R.round(xs)
                xc = R.clip(xr, 0, 255)
                q = R.astype(xc, "uint8")
                acc = R.matmul(q, wq, out_dtype="int32")
                a = R.astype(acc, "int64")
                b = R.multiply(a, m0)
                c = R.add(b, rnd)
                d = R.right_shift(c, sh)
                e = R.clip(d, 0, 255)
                y = R.astype(e, "uint8")
                gv = R.dequantize(y, R.const(0.125, "float32"), R.const(0, "int32"), axis=-1, out_dtype="float32")
                R.output(gv)
            return gv

    wq, wqp = quantize_weight(W, 1)
    m0, shift = fixed_point_multiplier(0.25 * wqp.scale.astype(np.float64) / 0.125)
    expected = bind(Expected, wq=wq, m0=m0.reshape(1, 2), rnd=(np.int64(1) << (shift - 1)).reshape(1, 2),
                    sh=shift.reshape(1, 2))
    folded = FoldQDQ()(InsertQDQ(plan(output=Y_QP))(before()))
    tvm.ir.assert_structural_equal(folded, expected)


@I.ir_module
class QDQThroughReshape:
    @R.function
    def main(x: R.Tensor((1, 2, 2), "float32")) -> R.Tensor((1, 4), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.5, "float32"), R.const(3, "int32"), axis=-1, out_dtype="uint8")
            d = R.dequantize(q, R.const(0.5, "float32"), R.const(3, "int32"), axis=-1, out_dtype="float32")
            r = R.reshape(d, R.shape([1, 4]))
            q2 = R.quantize(r, R.const(0.5, "float32"), R.const(3, "int32"), axis=-1, out_dtype="uint8")
            gv = R.dequantize(q2, R.const(0.5, "float32"), R.const(3, "int32"), axis=-1, out_dtype="float32")
            R.output(gv)
        return gv


def test_fold_qdq_moves_dequantize_past_reshape_and_cancels_the_pair():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 2, 2), "float32")) -> R.Tensor((1, 4), "float32"):
            with R.dataflow():
                xs = R.multiply(x, R.const(2.0, "float32"))
                xr = R.round(xs)
                xz = R.add(xr, R.const(3.0, "float32"))
                xc = R.clip(xz, 0, 255)
                q = R.astype(xc, "uint8")
                r = R.reshape(q, R.shape([1, 4]))
                gv = R.dequantize(r, R.const(0.5, "float32"), R.const(3, "int32"), axis=-1, out_dtype="float32")
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(FoldQDQ()(QDQThroughReshape), Expected)


def test_fold_qdq_leaves_float_modules_alone():
    mod = before()
    tvm.ir.assert_structural_equal(FoldQDQ()(mod), mod)


def test_passes_compose_in_sequential():
    seq = tvm.transform.Sequential([InsertQDQ(plan()), FoldQDQ("float")])
    counts = count_ops(seq(before()))
    assert counts["relax.matmul"] == 1 and counts["relax.dequantize"] == 0


@I.ir_module
class ConstantChain:
    @R.function
    def main(x: R.Tensor((1, 2), "float32"), v: R.Tensor((2,), "float32")) -> R.Tensor((1, 2), "float32"):
        with R.dataflow():
            a = R.add(v, R.const(1.0, "float32"))
            b = R.sqrt(a)
            c = R.reshape(b, R.shape([1, 2]))
            gv = R.multiply(x, c)
            R.output(gv)
        return gv


def test_fold_constants_numpy_evaluates_batchnorm_style_chains():
    from tvmq.passes import FoldConstantsNumpy

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 2), "float32"), c: R.Tensor((1, 2), "float32")) -> R.Tensor((1, 2), "float32"):
            with R.dataflow():
                gv = R.multiply(x, c)
                R.output(gv)
            return gv

    v = np.array([3.0, 8.0], np.float32)
    folded = FoldConstantsNumpy()(bind(ConstantChain, v=v))
    tvm.ir.assert_structural_equal(folded, bind(Expected, c=np.sqrt(v + 1).reshape(1, 2)))
    # Nothing constant: untouched.
    tvm.ir.assert_structural_equal(FoldConstantsNumpy()(ConstantChain), ConstantChain)


@I.ir_module
class AffineBetweenConvs:
    """Paddle exports write per-tensor affine steps as ``x * a + b`` with ``a``, ``b`` of shape ``[1]``."""

    @R.function
    def main(x: R.Tensor((1, 8, 6, 6), "float32"), w1: R.Tensor((8, 8, 1, 1), "float32"),
             w2: R.Tensor((8, 8, 1, 1), "float32"), a: R.Tensor((1,), "float32"), b: R.Tensor((1,), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            c1 = R.nn.conv2d(x, w1)
            m = R.multiply(c1, a)
            s = R.add(m, b)
            h = R.clip(s, 0.0, 6.0)
            gv = R.nn.conv2d(h, w2)
            R.output(gv)
        return gv


def test_nhwc_conversion_keeps_one_element_constant_ops_channels_last():
    """Only the model's input and output are transposed: the ``[1]``-shaped operands become scalars, for which
    ConvertLayout infers the layout, instead of wrapping the multiply and the add in transpose pairs."""
    from tvmq.passes.layout import ConvertToNHWC

    rng = np.random.default_rng(0)
    w1, w2 = (rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32) for _ in range(2))
    a, b = np.array([1.5], np.float32), np.array([-0.25], np.float32)
    mod = bind(AffineBetweenConvs, w1=w1, w2=w2, a=a, b=b)
    out = ConvertToNHWC()(mod)
    assert count_ops(out).get("relax.permute_dims", 0) == 2
    x = rng.normal(0, 1, (1, 8, 6, 6)).astype(np.float32)
    run = lambda m: relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()  # noqa: E731
    np.testing.assert_allclose(run(out), run(mod), rtol=1e-5, atol=1e-5)


def test_fold_affine_chains_leaves_one_multiply_and_one_add_per_chain():
    """conv-style epilogue: ``(x * s_c) * 2 + 1`` feeds hard-swish (two uses: kept), then ``* (1/6) * 0.2 - 0.3``
    then a requantize scale: each chain folds into one multiply and one add, values within float32 rounding."""
    from tvmq.passes import FoldAffineChains
    from tvmq.pipeline import build

    rng = np.random.default_rng(0)
    s_c = rng.uniform(0.5, 2, 8).astype(np.float32)
    x = relax.Var("x", relax.TensorType((1, 4, 4, 8), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.multiply(x, relax.const(s_c)))
            t = bb.emit(relax.op.add(relax.op.multiply(relax.const(np.float32(2.0)), a), relax.const(np.float32(1.0))))
            clip = bb.emit(relax.op.clip(relax.op.add(t, relax.const(np.float32(3.0))), 0, 6))
            h = bb.emit(relax.op.multiply(t, clip))  # t's second use
            d = bb.emit(relax.op.multiply(h, relax.const(np.float32(1 / 6))))
            e = bb.emit(relax.op.subtract(relax.op.multiply(relax.const(np.float32(0.2)), d), relax.const(np.float32(0.3))))
            y = bb.emit_output(relax.op.multiply(e, relax.const(np.float32(37.5))))
        bb.emit_func_output(y)
    mod = relax.transform.Normalize()(bb.get())
    folded = FoldAffineChains()(mod)
    ops = count_ops
    assert ops(mod)["relax.multiply"] == 6 and ops(folded)["relax.multiply"] == 3  # x*A, t*clip, h*B
    assert ops(folded)["relax.add"] == 3 and ops(folded).get("relax.subtract", 0) == 0  # t's +1, +3, B's offset
    data = rng.normal(0, 2, (1, 4, 4, 8)).astype(np.float32)
    outs = [relax.VirtualMachine(build(m, "x86"), tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy() for m in (mod, folded)]
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * np.abs(outs[0]).max())
