"""Before/Expected structural tests of the graph passes not covered by test_passes_structural.py.

Each pass (PackKernels, ConvertToNHWC, FoldAffineChains, FastSoftmax, DivideToMultiply, FastMath,
SeparableMaxPool, SmoothQuant, WeightOnly) and ``strip_qdq`` gets a tiny module, the module it must make of it
(the TIR kernels it emits written out in TVMScript), and a module it must return structurally
unchanged. Constants are function parameters bound to the same numpy arrays on both sides, so
``assert_structural_equal`` compares them by value; packed and quantized weights are derived here
with plain numpy index arithmetic and checked against the library's packing helpers.
"""

import re

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvmq.passes import (
    ConvTransposeToConv,
    ConvertToNHWC,
    DivideToMultiply,
    FastMath,
    FastSoftmax,
    FoldAffineChains,
    PackKernels,
    SeparableMaxPool,
    SmoothQuant,
    WeightOnly,
    strip_qdq,
)
from tvmq.passes.pack_kernels import pack_conv_weight, pack_float_matmul_weight, pack_matmul_weight
from tvmq.plan import LayerPlan
from tvmq.qparams import QParams


def bind(mod, **arrays):
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in arrays.items()})(mod)


def block_names(mod):
    """TIR block names in printing order: ``assert_structural_equal`` ignores them, tvmq's schedule rules match them."""
    return re.findall(r'T\.sblock\("(\w+)"\)', mod.script())


def assert_same_kernels(actual, expected):
    tvm.ir.assert_structural_equal(actual, expected)
    assert block_names(actual) == block_names(expected)


def fast_exp_poly(v):
    """TVM's ``topi.fast_exp`` polynomial, term by term as topi writes it."""
    x = T.max(T.min(v, T.float32(88.376266479492188)), T.float32(-88.376258850097656))
    n = T.floor(x * T.float32(1.4426950216293335) + T.float32(0.5))
    r = x - n * T.float32(0.69314718246459961)
    p = ((((((T.float32(0.00019875691214110702) * r + T.float32(0.0013981999363750219)) * r
            + T.float32(0.008333452045917511)) * r + T.float32(0.041665796190500259)) * r
          + T.float32(0.1666666567325592)) * r + T.float32(0.5)) * r * r + r + T.float32(1.0))
    return T.max(T.reinterpret("float32", T.Cast("int32", n + T.float32(127.0)) << 23) * p, v)


def logistic_poly(v):
    """ONNX Runtime's MLAS logistic: ``0.5 + v p(v^2) / q(v^2)``, ``v`` clamped to [-18, 18]."""
    c = T.max(T.min(v, T.float32(18.0)), T.float32(-18.0))
    s = c * c
    p = (((T.float32(4.37031012579801e-11) * s + T.float32(1.15627324459942e-07)) * s
          + T.float32(6.08574864600143e-05)) * s + T.float32(8.51377133304701e-03)) * s + T.float32(2.48287947061529e-01)
    q = ((((T.float32(6.10247389755681e-13) * s + T.float32(5.76102136993427e-09)) * s + T.float32(6.29106785017040e-06))
          * s + T.float32(1.70198817374094e-03)) * s + T.float32(1.16817656904453e-01)) * s + T.float32(9.93151921023180e-01)
    return c * p / q + T.float32(0.5)


# ----------------------------------------------------------------------------- PackKernels
def packed_reference(w, shape, index):
    """A zero array of ``shape`` with each element of ``w`` at ``index(position)`` (padding stays 0)."""
    out = np.zeros(shape, w.dtype)
    for p in np.ndindex(*w.shape):
        out[index(p)] = w[p]
    return out


@I.ir_module
class Int8Matmul:
    @R.function
    def main(x: R.Tensor((1, 3), "uint8"), w: R.Tensor((3, 4), "int8")) -> R.Tensor((1, 4), "int32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            gv = R.matmul(x, w, out_dtype="int32")
            R.output(gv)
        return gv


def test_pack_kernels_int8_matmul_pads_k_and_packs_weights_into_lane_blocks():
    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def tvmq_matmul(lv: T.Buffer((T.int64(1), T.int64(4)), "uint8"),
                        B: T.Buffer((T.int64(1), T.int64(1), T.int64(4), T.int64(4)), "int8"),
                        out: T.Buffer((T.int64(1), T.int64(4)), "int32")):
            T.func_attr({"tirx.noalias": True})
            for i0, i1, ko, ki in T.grid(T.int64(1), T.int64(4), T.int64(1), T.int64(4)):
                with T.sblock("tvmq_dot_matmul"):
                    v_i0, v_i1, v_ko, v_ki = T.axis.remap("SSRR", [i0, i1, ko, ki])
                    T.reads(lv[v_i0, v_ko * T.int64(4) + v_ki], B[v_i1 // T.int64(4), v_ko, v_i1 % T.int64(4), v_ki])
                    T.writes(out[v_i0, v_i1])
                    with T.init():
                        out[v_i0, v_i1] = 0
                    out[v_i0, v_i1] = out[v_i0, v_i1] + T.Cast("int32", lv[v_i0, v_ko * T.int64(4) + v_ki]) * T.Cast(
                        "int32", B[v_i1 // T.int64(4), v_ko, v_i1 % T.int64(4), v_ki])

        @R.function
        def main(x: R.Tensor((1, 3), "uint8"), wp: R.Tensor((1, 1, 4, 4), "int8")) -> R.Tensor((1, 4), "int32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                lv = R.nn.pad(x, pad_width=[0, 0, 0, 1], pad_value=0.0)
                gv = R.call_tir(cls.tvmq_matmul, (lv, wp), out_ty=R.Tensor((1, 4), "int32"))
                R.output(gv)
            return gv

    w = (np.arange(12) - 6).astype(np.int8).reshape(3, 4)
    wp = packed_reference(w, (1, 1, 4, 4), lambda p: (p[1] // 4, p[0] // 4, p[1] % 4, p[0] % 4))  # [N/4, K/4, 4, 4]
    assert wp[0, 0, 2, 1] == w[1, 2] and not wp[0, 0, :, 3].any()
    np.testing.assert_array_equal(pack_matmul_weight(w, 4, 4), wp)
    packed = PackKernels("uint8", (4,), float_lanes=0, k=4)(bind(Int8Matmul, w=w))
    assert_same_kernels(packed, bind(Expected, wp=wp))


def test_pack_kernels_int8_conv_moves_padding_into_pad_and_packs_ohwi_weights():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 3, 3), "uint8"),
                 w: R.Tensor((4, 2, 2, 3), "int8")) -> R.Tensor((1, 2, 3, 4), "int32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                gv = R.nn.conv2d(x, w, padding=[1, 1, 0, 0], data_layout="NHWC", kernel_layout="OHWI",
                                 out_dtype="int32")
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def tvmq_conv2d(lv: T.Buffer((T.int64(1), T.int64(3), T.int64(4), T.int64(4)), "uint8"),
                        B: T.Buffer((T.int64(1), T.int64(2), T.int64(2), T.int64(1), T.int64(4), T.int64(4)), "int8"),
                        out: T.Buffer((T.int64(1), T.int64(2), T.int64(3), T.int64(4)), "int32")):
            T.func_attr({"tirx.noalias": True})
            for b, y, x, o, kh, kw, ico, ici in T.grid(T.int64(1), T.int64(2), T.int64(3), T.int64(4), T.int64(2),
                                                       T.int64(2), T.int64(1), T.int64(4)):
                with T.sblock("tvmq_dot_conv2d"):
                    v_b, v_y, v_x, v_o, v_kh, v_kw, v_ico, v_ici = T.axis.remap("SSSSRRRR",
                                                                                [b, y, x, o, kh, kw, ico, ici])
                    T.reads(lv[v_b, v_y + v_kh, v_x + v_kw, v_ico * T.int64(4) + v_ici],
                            B[v_o // T.int64(4), v_kh, v_kw, v_ico, v_o % T.int64(4), v_ici])
                    T.writes(out[v_b, v_y, v_x, v_o])
                    with T.init():
                        out[v_b, v_y, v_x, v_o] = 0
                    out[v_b, v_y, v_x, v_o] = out[v_b, v_y, v_x, v_o] + T.Cast(
                        "int32", lv[v_b, v_y + v_kh, v_x + v_kw, v_ico * T.int64(4) + v_ici]) * T.Cast(
                        "int32", B[v_o // T.int64(4), v_kh, v_kw, v_ico, v_o % T.int64(4), v_ici])

        @R.function
        def main(x: R.Tensor((1, 2, 3, 3), "uint8"),
                 wp: R.Tensor((1, 2, 2, 1, 4, 4), "int8")) -> R.Tensor((1, 2, 3, 4), "int32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                lv = R.nn.pad(x, pad_width=[0, 0, 1, 0, 1, 0, 0, 1], pad_value=0.0)  # top 1, left 1, channels 3 -> 4
                gv = R.call_tir(cls.tvmq_conv2d, (lv, wp), out_ty=R.Tensor((1, 2, 3, 4), "int32"))
                R.output(gv)
            return gv

    w = (np.arange(48) % 23 - 11).astype(np.int8).reshape(4, 2, 2, 3)
    wp = packed_reference(w, (1, 2, 2, 1, 4, 4), lambda p: (p[0] // 4, p[1], p[2], p[3] // 4, p[0] % 4, p[3] % 4))
    assert wp[0, 1, 0, 0, 3, 2] == w[3, 1, 0, 2] and not wp[..., 3].any()
    np.testing.assert_array_equal(pack_conv_weight(w, 4, 4), wp)
    packed = PackKernels("uint8", (4,), float_lanes=0, k=4)(bind(Before, w=w))
    assert_same_kernels(packed, bind(Expected, wp=wp))


def test_pack_kernels_float_matmul_pads_output_channels_to_lanes_and_crops():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2), "float32"), w: R.Tensor((2, 3), "float32")) -> R.Tensor((1, 3), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                gv = R.matmul(x, w)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def tvmq_fma_matmul(x: T.Buffer((T.int64(1), T.int64(2)), "float32"),
                            B: T.Buffer((T.int64(1), T.int64(2), T.int64(4)), "float32"),
                            crop: T.Buffer((T.int64(1), T.int64(3)), "float32")):
            T.func_attr({"tirx.noalias": True})
            full = T.sblock_alloc_buffer((T.int64(1), T.int64(4)))
            for i0, i1, k in T.grid(T.int64(1), T.int64(4), T.int64(2)):
                with T.sblock("tvmq_fma_matmul"):
                    v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
                    T.reads(x[v_i0, v_k], B[v_i1 // T.int64(4), v_k, v_i1 % T.int64(4)])
                    T.writes(full[v_i0, v_i1])
                    with T.init():
                        full[v_i0, v_i1] = T.float32(0.0)
                    full[v_i0, v_i1] = full[v_i0, v_i1] + x[v_i0, v_k] * B[v_i1 // T.int64(4), v_k, v_i1 % T.int64(4)]
            for i0, i1 in T.grid(T.int64(1), T.int64(3)):
                with T.sblock("tvmq_crop"):
                    v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                    T.reads(full[v_i0, v_i1])
                    T.writes(crop[v_i0, v_i1])
                    crop[v_i0, v_i1] = full[v_i0, v_i1]

        @R.function
        def main(x: R.Tensor((1, 2), "float32"), wp: R.Tensor((1, 2, 4), "float32")) -> R.Tensor((1, 3), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                gv = R.call_tir(cls.tvmq_fma_matmul, (x, wp), out_ty=R.Tensor((1, 3), "float32"))
                R.output(gv)
            return gv

    w = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    wp = np.zeros((1, 2, 4), np.float32)
    wp[0, :, :3] = w
    np.testing.assert_array_equal(pack_float_matmul_weight(w, 4), wp)
    packed = PackKernels("uint8", (4,), float_lanes=4, k=4)(bind(Before, w=w))
    assert_same_kernels(packed, bind(Expected, wp=wp))


def test_pack_kernels_depthwise_conv_weights_become_kh_kw_c():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 3, 4), "float32"),
                 w: R.Tensor((4, 2, 2, 1), "float32")) -> R.Tensor((1, 2, 2, 4), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                gv = R.nn.conv2d(x, w, groups=4, data_layout="NHWC", kernel_layout="OHWI")
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def tvmq_depthwise(x: T.Buffer((T.int64(1), T.int64(3), T.int64(3), T.int64(4)), "float32"),
                           B: T.Buffer((T.int64(2), T.int64(2), T.int64(4)), "float32"),
                           out: T.Buffer((T.int64(1), T.int64(2), T.int64(2), T.int64(4)), "float32")):
            T.func_attr({"tirx.noalias": True})
            for b, y, x_1, ch, kh, kw in T.grid(T.int64(1), T.int64(2), T.int64(2), T.int64(4), T.int64(2), T.int64(2)):
                with T.sblock("tvmq_depthwise"):
                    v_b, v_y, v_x, v_ch, v_kh, v_kw = T.axis.remap("SSSSRR", [b, y, x_1, ch, kh, kw])
                    T.reads(x[v_b, v_y + v_kh, v_x + v_kw, v_ch], B[v_kh, v_kw, v_ch])
                    T.writes(out[v_b, v_y, v_x, v_ch])
                    with T.init():
                        out[v_b, v_y, v_x, v_ch] = T.float32(0.0)
                    out[v_b, v_y, v_x, v_ch] = (out[v_b, v_y, v_x, v_ch]
                                                + x[v_b, v_y + v_kh, v_x + v_kw, v_ch] * B[v_kh, v_kw, v_ch])

        @R.function
        def main(x: R.Tensor((1, 3, 3, 4), "float32"),
                 wk: R.Tensor((2, 2, 4), "float32")) -> R.Tensor((1, 2, 2, 4), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                gv = R.call_tir(cls.tvmq_depthwise, (x, wk), out_ty=R.Tensor((1, 2, 2, 4), "float32"))
                R.output(gv)
            return gv

    w = np.arange(16, dtype=np.float32).reshape(4, 2, 2, 1)
    wk = packed_reference(w, (2, 2, 4), lambda p: (p[1], p[2], p[0]))
    packed = PackKernels("uint8", (4,), float_lanes=4, k=4)(bind(Before, w=w))
    assert_same_kernels(packed, bind(Expected, wk=wk))


def test_pack_kernels_leaves_nchw_mismatched_dtype_and_variable_weight_layers_alone():
    @I.ir_module
    class Unpackable:
        @R.function
        def main(x: R.Tensor((1, 4, 2, 2), "uint8"), s: R.Tensor((1, 4), "int8"), v: R.Tensor((4, 4), "int8"),
                 f: R.Tensor((1, 4), "float32"), wc: R.Tensor((4, 4, 1, 1), "int8"), wm: R.Tensor((4, 4), "int8"),
                 wf: R.Tensor((4, 4), "float32")):
            R.func_attr({"num_input": 4})
            with R.dataflow():
                nchw = R.nn.conv2d(x, wc, out_dtype="int32")
                signed = R.matmul(s, wm, out_dtype="int32")
                variable = R.matmul(s, v, out_dtype="int32")
                floating = R.matmul(f, wf)
                gv = (nchw, signed, variable, floating)
                R.output(gv)
            return gv

    rng = np.random.default_rng(0)
    mod = bind(Unpackable, wc=rng.integers(-9, 9, (4, 4, 1, 1), dtype=np.int8),
               wm=rng.integers(-9, 9, (4, 4), dtype=np.int8), wf=rng.normal(size=(4, 4)).astype(np.float32))
    tvm.ir.assert_structural_equal(PackKernels("uint8", (4,), float_lanes=0, k=4)(mod), mod)


# ----------------------------------------------------------------------------- ConvertToNHWC
def test_convert_to_nhwc_transposes_only_model_io_and_folds_weights_to_ohwi():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 3, 3), "float32"), w: R.Tensor((4, 2, 1, 1), "float32"),
                 a: R.Tensor((1,), "float32")) -> R.Tensor((1, 4, 3, 3), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                c = R.nn.conv2d(x, w)
                m = R.multiply(c, a)
                gv = R.clip(m, 0.0, 6.0)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 2, 3, 3), "float32"),
                 w: R.Tensor((4, 1, 1, 2), "float32")) -> R.Tensor((1, 4, 3, 3), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                t = R.permute_dims(x, axes=[0, 2, 3, 1])
                c = R.nn.conv2d(t, w, data_layout="NHWC", kernel_layout="OHWI", out_layout="NHWC")
                m = R.multiply(c, R.const(1.5, "float32"))
                h = R.clip(m, 0.0, 6.0)
                gv = R.permute_dims(h, axes=[0, 3, 1, 2])
                R.output(gv)
            return gv

    w = np.arange(8, dtype=np.float32).reshape(4, 2, 1, 1)
    out = ConvertToNHWC()(bind(Before, w=w, a=np.array([1.5], np.float32)))
    tvm.ir.assert_structural_equal(out, bind(Expected, w=w.transpose(0, 2, 3, 1)))


def test_convert_to_nhwc_leaves_modules_without_nchw_conv2d_alone():
    @I.ir_module
    class NoNCHWConv:
        @R.function
        def main(x: R.Tensor((1, 3, 3, 2), "float32"), y: R.Tensor((1, 2, 3, 3), "float32"),
                 w: R.Tensor((4, 1, 1, 2), "float32"), a: R.Tensor((1,), "float32"),
                 wt: R.Tensor((2, 2, 2, 2), "float32")):
            R.func_attr({"num_input": 2})
            with R.dataflow():
                c = R.nn.conv2d(x, w, data_layout="NHWC", kernel_layout="OHWI")
                m = R.multiply(c, a)
                r = R.clip(m, 0.0, 6.0)
                u = R.nn.conv2d_transpose(y, wt)
                gv = (r, u)
                R.output(gv)
            return gv

    mod = bind(NoNCHWConv, w=np.ones((4, 1, 1, 2), np.float32), a=np.array([1.5], np.float32),
               wt=np.ones((2, 2, 2, 2), np.float32))
    tvm.ir.assert_structural_equal(ConvertToNHWC()(mod), mod)


# ----------------------------------------------------------------------------- FoldAffineChains
def test_fold_affine_chains_combines_multiplies_adds_and_subtracts_into_one_fma():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3), "float32"), a: R.Tensor((3,), "float32"),
                 b: R.Tensor((1, 3), "float32")) -> R.Tensor((1, 3), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                t = R.multiply(x, a)
                u = R.add(b, t)
                v = R.subtract(u, R.const(0.5, "float32"))
                gv = R.multiply(R.const(2.0, "float32"), v)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3), "float32"), a: R.Tensor((3,), "float32"),
                 b: R.Tensor((1, 3), "float32")) -> R.Tensor((1, 3), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                t = R.multiply(x, a)
                gv = R.add(t, b)
                R.output(gv)
            return gv

    a = np.array([1.0, -2.0, 0.1], np.float32)
    b = np.array([[0.25, 0.5, 1.0]], np.float32)
    folded = FoldAffineChains()(bind(Before, a=a, b=b))
    scale = (2.0 * a.astype(np.float64)).astype(np.float32)
    offset = (2.0 * (b.astype(np.float64) - 0.5)).astype(np.float32)
    tvm.ir.assert_structural_equal(folded, bind(Expected, a=scale, b=offset))


def test_fold_affine_chains_leaves_shared_broadcasting_and_single_steps_alone():
    @I.ir_module
    class Unfoldable:
        @R.function
        def main(x: R.Tensor((1, 3), "float32"), y: R.Tensor((1, 3), "float32"), a: R.Tensor((3,), "float32"),
                 wide: R.Tensor((2, 3), "float32")):
            R.func_attr({"num_input": 2})
            with R.dataflow():
                t = R.multiply(x, a)
                u = R.add(t, R.const(1.0, "float32"))
                grown = R.add(y, wide)
                g = R.multiply(grown, R.const(3.0, "float32"))
                gv = (t, u, g)
                R.output(gv)
            return gv

    mod = bind(Unfoldable, a=np.array([1.0, 2.0, 3.0], np.float32), wide=np.ones((2, 3), np.float32))
    tvm.ir.assert_structural_equal(FoldAffineChains()(mod), mod)


# ----------------------------------------------------------------------------- ConvTransposeToConv
def test_conv_transpose_with_kernel_equal_to_stride_becomes_a_1x1_conv_and_depth_to_space():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 2, 2), "float32"),
                 w: R.Tensor((3, 2, 2, 2), "float32")) -> R.Tensor((1, 2, 4, 4), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                gv = R.nn.conv2d_transpose(x, w, strides=[2, 2])
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 2, 2), "float32"),
                 w1: R.Tensor((8, 3, 1, 1), "float32")) -> R.Tensor((1, 2, 4, 4), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                z = R.nn.conv2d(x, w1, out_dtype="float32")
                z6 = R.reshape(z, R.shape([1, 2, 2, 2, 2, 2]))
                zt = R.permute_dims(z6, axes=[0, 1, 4, 2, 5, 3])
                gv = R.reshape(zt, R.shape([1, 2, 4, 4]))
                R.output(gv)
            return gv

    w = np.arange(24, dtype=np.float32).reshape(3, 2, 2, 2) - 12  # [C_in, O, kh, kw]
    w1 = np.empty((8, 3, 1, 1), np.float32)  # W'[(o*kh + a)*kw + b, c] = w[c, o, a, b]
    for o, a, b, c in np.ndindex(2, 2, 2, 3):
        w1[(o * 2 + a) * 2 + b, c, 0, 0] = w[c, o, a, b]
    tvm.ir.assert_structural_equal(ConvTransposeToConv()(bind(Before, w=w)), bind(Expected, w1=w1))


def test_conv_transpose_that_overlaps_or_pads_is_left_alone():
    @I.ir_module
    class Overlapping:
        @R.function
        def main(x: R.Tensor((1, 3, 2, 2), "float32"), w: R.Tensor((3, 2, 3, 3), "float32"),
                 v: R.Tensor((3, 2, 2, 2), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                k3 = R.nn.conv2d_transpose(x, w, strides=[2, 2])
                padded = R.nn.conv2d_transpose(x, v, strides=[2, 2], padding=[1, 1, 1, 1])
                gv = (k3, padded)
                R.output(gv)
            return gv

    mod = bind(Overlapping, w=np.ones((3, 2, 3, 3), np.float32), v=np.ones((3, 2, 2, 2), np.float32))
    tvm.ir.assert_structural_equal(ConvTransposeToConv()(mod), mod)


# ----------------------------------------------------------------------------- FastSoftmax
def row_softmax_expected(shape):
    """The row kernel FastSoftmax(lanes=4) makes for two rows of 5 stored as ``shape``, called from ``main``."""

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def tvmq_softmax(x_in: T.Buffer(shape, "float32"), y_out: T.Buffer(shape, "float32")):
            T.func_attr({"op_pattern": 8, "tirx.is_scheduled": True, "tirx.noalias": True})
            acc = T.sblock_alloc_buffer((2, 4))
            top = T.sblock_alloc_buffer((2,))
            total = T.sblock_alloc_buffer((2,))
            x = T.decl_buffer((2, 5), data=x_in.data)
            y = T.decl_buffer((2, 5), data=y_out.data)
            for r in T.parallel(2):
                top[r] = x[r, 0]
                for _ in range(1):
                    for l in T.vectorized(4):
                        acc[r, l] = x[r, l]
                    for ko in range(1, 1):
                        for l in T.vectorized(4):
                            acc[r, l] = T.max(acc[r, l], x[r, ko * 4 + l])
                    for l in range(4):
                        top[r] = T.max(top[r], acc[r, l])
                for t in range(1):
                    top[r] = T.max(top[r], x[r, 4 + t])
                for l in T.vectorized(4):
                    acc[r, l] = T.float32(0.0)
                for ko in range(1):
                    for l in T.vectorized(4):
                        y[r, ko * 4 + l] = fast_exp_poly(x[r, ko * 4 + l] - top[r])
                        acc[r, l] = acc[r, l] + y[r, ko * 4 + l]
                total[r] = T.float32(0.0)
                for t in range(1):
                    y[r, 4 + t] = fast_exp_poly(x[r, 4 + t] - top[r])
                    total[r] = total[r] + y[r, 4 + t]
                for l in range(4):
                    total[r] = total[r] + acc[r, l]
                for ko in range(1):
                    for l in T.vectorized(4):
                        y[r, ko * 4 + l] = y[r, ko * 4 + l] / total[r]
                for t in range(1):
                    y[r, 4 + t] = y[r, 4 + t] / total[r]

        @R.function
        def main(x: R.Tensor(shape, "float32")) -> R.Tensor(shape, "float32"):
            cls = Expected
            with R.dataflow():
                gv = R.call_tir(cls.tvmq_softmax, (x,), out_ty=R.Tensor(shape, "float32"))
                R.output(gv)
            return gv
    return Expected


def test_fast_softmax_runs_last_axis_softmax_through_the_row_kernel():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 5), "float32")) -> R.Tensor((2, 5), "float32"):
            with R.dataflow():
                gv = R.nn.softmax(x, axis=-1)
                R.output(gv)
            return gv

    Expected = row_softmax_expected((2, 5))
    assert_same_kernels(FastSoftmax(lanes=4)(Before), Expected)


def test_fast_softmax_applies_the_row_kernel_before_a_flatten_and_drops_the_reshape_pair():
    """ONNX's flatten-softmax-unflatten: the kernel reads the 3-d tensor as rows. The pass leaves the
    reshapes it bypassed for DeadCodeElimination, which runs before the comparison (with
    CanonicalizeBindings for the alias it leaves)."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 5), "float32")) -> R.Tensor((1, 2, 5), "float32"):
            with R.dataflow():
                a = R.reshape(x, R.shape([2, 5]))
                s = R.nn.softmax(a, axis=-1)
                gv = R.reshape(s, R.shape([1, 2, 5]))
                R.output(gv)
            return gv

    out = relax.transform.DeadCodeElimination()(FastSoftmax(lanes=4)(Before))
    assert_same_kernels(relax.transform.CanonicalizeBindings()(out), row_softmax_expected((1, 2, 5)))


def test_fast_softmax_over_another_axis_with_less_than_a_vector_after_it_uses_topi_fast_softmax():
    """Axis 0 of [2, 3]: 3 elements after the axis, fewer than a vector of 4 (the column kernel's case)."""
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                gv = R.nn.softmax(x, axis=0)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def fast_softmax(x: T.Buffer((T.int64(2), T.int64(3)), "float32"),
                         norm: T.Buffer((T.int64(2), T.int64(3)), "float32")):
            T.func_attr({"tirx.noalias": True})
            maxelem = T.sblock_alloc_buffer((T.int64(3),))
            delta = T.sblock_alloc_buffer((T.int64(2), T.int64(3)))
            e = T.sblock_alloc_buffer((T.int64(2), T.int64(3)))
            expsum = T.sblock_alloc_buffer((T.int64(3),))
            for i0, k in T.grid(T.int64(3), T.int64(2)):
                with T.sblock("T_softmax_maxelem"):
                    v_i0, v_k = T.axis.remap("SR", [i0, k])
                    T.reads(x[v_k, v_i0])
                    T.writes(maxelem[v_i0])
                    with T.init():
                        maxelem[v_i0] = T.float32(-340282346638528859811704183484516925440.0)
                    maxelem[v_i0] = T.max(maxelem[v_i0], x[v_k, v_i0])
            for i0, i1 in T.grid(T.int64(2), T.int64(3)):
                with T.sblock("T_softmax_delta"):
                    v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                    T.reads(x[v_i0, v_i1], maxelem[v_i1])
                    T.writes(delta[v_i0, v_i1])
                    delta[v_i0, v_i1] = x[v_i0, v_i1] - maxelem[v_i1]
            for ax0, ax1 in T.grid(T.int64(2), T.int64(3)):
                with T.sblock("T_fast_exp"):
                    v_ax0, v_ax1 = T.axis.remap("SS", [ax0, ax1])
                    T.reads(delta[v_ax0, v_ax1])
                    T.writes(e[v_ax0, v_ax1])
                    e[v_ax0, v_ax1] = fast_exp_poly(delta[v_ax0, v_ax1])
            for i0, k in T.grid(T.int64(3), T.int64(2)):
                with T.sblock("T_softmax_expsum"):
                    v_i0, v_k = T.axis.remap("SR", [i0, k])
                    T.reads(e[v_k, v_i0])
                    T.writes(expsum[v_i0])
                    with T.init():
                        expsum[v_i0] = T.float32(0.0)
                    expsum[v_i0] = expsum[v_i0] + e[v_k, v_i0]
            for i0, i1 in T.grid(T.int64(2), T.int64(3)):
                with T.sblock("T_softmax_norm"):
                    v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                    T.reads(e[v_i0, v_i1], expsum[v_i1])
                    T.writes(norm[v_i0, v_i1])
                    T.sblock_attr({"axis": 0})
                    norm[v_i0, v_i1] = e[v_i0, v_i1] / expsum[v_i1]

        @R.function
        def main(x: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "float32"):
            cls = Expected
            with R.dataflow():
                gv = R.call_tir(cls.fast_softmax, (x,), out_ty=R.Tensor((2, 3), "float32"))
                R.output(gv)
            return gv

    assert_same_kernels(FastSoftmax(lanes=4)(Before), Expected)


def test_fast_softmax_leaves_non_float32_softmax_alone():
    @I.ir_module
    class Half:
        @R.function
        def main(x: R.Tensor((2, 8), "float16"), y: R.Tensor((2, 8), "float64")):
            with R.dataflow():
                a = R.nn.softmax(x, axis=-1)
                b = R.nn.softmax(y, axis=-1)
                gv = (a, b)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(FastSoftmax(lanes=4)(Half), Half)


# ----------------------------------------------------------------------------- DivideToMultiply
def test_divide_to_multiply_replaces_constant_divisors_by_float32_reciprocals():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3), "float32"), c: R.Tensor((3,), "float32")) -> R.Tensor((1, 3), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                t = R.divide(x, c)
                gv = R.divide(t, R.const(6.0, "float32"))
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3), "float32"), r: R.Tensor((3,), "float32"),
                 sixth: R.Tensor((), "float32")) -> R.Tensor((1, 3), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                t = R.multiply(x, r)
                gv = R.multiply(t, sixth)
                R.output(gv)
            return gv

    c = np.array([2.0, 5.0, 0.1], np.float32)
    out = DivideToMultiply()(bind(Before, c=c))
    expected = bind(Expected, r=np.array([0.5, 0.2, 10.0], np.float32), sixth=np.array(1 / 6, np.float32))
    tvm.ir.assert_structural_equal(out, expected)


def test_divide_to_multiply_leaves_variable_zero_integer_and_non_float32_divisions_alone():
    @I.ir_module
    class Unsafe:
        @R.function
        def main(x: R.Tensor((3,), "float32"), y: R.Tensor((3,), "float32"), i: R.Tensor((3,), "int32"),
                 h: R.Tensor((3,), "float16"), z: R.Tensor((3,), "float32"), k: R.Tensor((3,), "int32"),
                 c: R.Tensor((3,), "float16")):
            R.func_attr({"num_input": 4})
            with R.dataflow():
                by_var = R.divide(x, y)
                by_zero = R.divide(x, z)
                integer = R.divide(i, k)
                half = R.divide(h, c)
                numerator = R.divide(R.const(1.0, "float32"), x)
                gv = (by_var, by_zero, integer, half, numerator)
                R.output(gv)
            return gv

    mod = bind(Unsafe, z=np.array([1.0, 0.0, 2.0], np.float32), k=np.array([2, 3, 4], np.int32),
               c=np.array([2, 4, 8], np.float16))
    tvm.ir.assert_structural_equal(DivideToMultiply()(mod), mod)



def test_divide_to_multiply_leaves_a_divisor_whose_reciprocal_overflows_float32():
    """1 / 1e-39 is beyond float32: multiplying by it would turn 0 / 1e-39 = 0 into 0 * inf = NaN."""

    @I.ir_module
    class Subnormal:
        @R.function
        def main(x: R.Tensor((3,), "float32"), d: R.Tensor((3,), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                gv = R.divide(x, d)
                R.output(gv)
            return gv

    mod = bind(Subnormal, d=np.array([1e-39, 1.0, 2.0], np.float32))
    tvm.ir.assert_structural_equal(DivideToMultiply()(mod), mod)


# ----------------------------------------------------------------------------- SeparableMaxPool
def test_separable_max_pool_splits_a_large_window_into_a_row_pool_and_a_column_pool():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 17, 22, 8), "uint8")) -> R.Tensor((1, 9, 8, 8), "uint8"):
            with R.dataflow():
                gv = R.nn.max_pool2d(x, pool_size=[5, 4], strides=[2, 3], padding=[1, 2, 2, 0], ceil_mode=True,
                                     layout="NHWC")
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 17, 22, 8), "uint8")) -> R.Tensor((1, 9, 8, 8), "uint8"):
            with R.dataflow():
                rows = R.nn.max_pool2d(x, pool_size=[1, 4], strides=[1, 3], padding=[0, 2, 0, 0], ceil_mode=True,
                                       layout="NHWC")
                gv = R.nn.max_pool2d(rows, pool_size=[5, 1], strides=[2, 1], padding=[1, 0, 2, 0], ceil_mode=True,
                                     layout="NHWC")
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(SeparableMaxPool()(Before), Expected)


def test_separable_max_pool_leaves_small_and_dilated_windows_alone():
    @I.ir_module
    class Kept:
        @R.function
        def main(x: R.Tensor((1, 8, 16, 16), "float32")):
            with R.dataflow():
                small = R.nn.max_pool2d(x, pool_size=[3, 3], strides=[2, 2], padding=[1, 1, 1, 1])
                row = R.nn.max_pool2d(x, pool_size=[1, 9], padding=[0, 4, 0, 4])
                dilated = R.nn.max_pool2d(x, pool_size=[5, 5], dilation=[2, 2], padding=[4, 4, 4, 4])
                gv = (small, row, dilated)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(SeparableMaxPool()(Kept), Kept)


# ----------------------------------------------------------------------------- FastMath
def test_fast_math_rewrites_sigmoid_as_a_rational_polynomial_and_exp_as_fast_exp():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
            with R.dataflow():
                s = R.sigmoid(x)
                gv = R.exp(s)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def fast_sigmoid(x: T.Buffer((T.int64(4),), "float32"), y: T.Buffer((T.int64(4),), "float32")):
            T.func_attr({"tirx.noalias": True})
            for i0 in range(T.int64(4)):
                with T.sblock("fast_sigmoid"):
                    v_i0 = T.axis.spatial(T.int64(4), i0)
                    T.reads(x[v_i0])
                    T.writes(y[v_i0])
                    y[v_i0] = logistic_poly(x[v_i0])

        @T.prim_func(private=True, s_tir=True)
        def fast_exp(s: T.Buffer((T.int64(4),), "float32"), y: T.Buffer((T.int64(4),), "float32")):
            T.func_attr({"tirx.noalias": True})
            for ax0 in range(T.int64(4)):
                with T.sblock("T_fast_exp"):
                    v_ax0 = T.axis.spatial(T.int64(4), ax0)
                    T.reads(s[v_ax0])
                    T.writes(y[v_ax0])
                    y[v_ax0] = fast_exp_poly(s[v_ax0])

        @R.function
        def main(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
            cls = Expected
            with R.dataflow():
                s = R.call_tir(cls.fast_sigmoid, (x,), out_ty=R.Tensor((4,), "float32"))
                gv = R.call_tir(cls.fast_exp, (s,), out_ty=R.Tensor((4,), "float32"))
                R.output(gv)
            return gv

    assert_same_kernels(FastMath()(Before), Expected)



def test_fast_math_leaves_non_float32_sigmoid_and_other_ops_alone():
    @I.ir_module
    class Untouched:
        @R.function
        def main(x: R.Tensor((4,), "float16"), y: R.Tensor((4,), "float64"), z: R.Tensor((4,), "float32")):
            with R.dataflow():
                a = R.sigmoid(x)
                b = R.sigmoid(y)
                c = R.nn.relu(z)
                gv = (a, b, c)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(FastMath()(Untouched), Untouched)


# ----------------------------------------------------------------------------- SmoothQuant, WeightOnly
@I.ir_module
class MatmulRelu:
    @R.function
    def main(x: R.Tensor((1, 2, 3), "float32"), w: R.Tensor((3, 2), "float32")) -> R.Tensor((1, 2, 2), "float32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            fc = R.matmul(x, w)
            gv = R.nn.relu(fc)
            R.output(gv)
        return gv


W = np.array([[0.5, -0.8], [0.2, 2.0], [-3.0, 1.2]], np.float32)


def test_smooth_quant_divides_input_channels_and_multiplies_weight_rows():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 2, 3), "float32"), inv: R.Tensor((1, 1, 3), "float32"),
                 w: R.Tensor((3, 2), "float32")) -> R.Tensor((1, 2, 2), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                xs = R.multiply(x, inv)
                fc = R.matmul(xs, w)
                gv = R.nn.relu(fc)
                R.output(gv)
            return gv

    s = np.array([2.0, 0.5, 4.0], np.float32)
    out = SmoothQuant({"fc": s})(bind(MatmulRelu, w=W))
    expected = bind(Expected, inv=np.array([[[0.5, 2.0, 0.25]]], np.float32),
                    w=np.array([[1.0, -1.6], [0.1, 1.0], [-12.0, 4.8]], np.float32))
    tvm.ir.assert_structural_equal(out, expected)


def test_smooth_quant_leaves_layers_without_factors_and_variable_weights_alone():
    @I.ir_module
    class Unsmoothed:
        @R.function
        def main(x: R.Tensor((1, 3), "float32"), v: R.Tensor((3, 2), "float32"), w: R.Tensor((3, 2), "float32")):
            R.func_attr({"num_input": 2})
            with R.dataflow():
                fc = R.matmul(x, w)
                other = R.matmul(x, v)
                gv = (fc, other)
                R.output(gv)
            return gv

    mod = bind(Unsmoothed, w=W)
    factors = np.full(3, 2.0, np.float32)
    tvm.ir.assert_structural_equal(SmoothQuant({"other": factors, "absent": factors})(mod), mod)


# ----------------------------------------------------------------------------- WeightOnly
def test_weight_only_int8_stores_per_column_int8_weights_and_scales():
    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def tvmq_weight_only_int8(x: T.Buffer((T.int64(1), T.int64(2), T.int64(3)), "float32"),
                                  B: T.Buffer((T.int64(3), T.int64(2)), "int8"), C: T.Buffer((T.int64(2),), "float32"),
                                  out: T.Buffer((T.int64(1), T.int64(2), T.int64(2)), "float32")):
            T.func_attr({"tirx.noalias": True})
            for i0, i1, i2, k in T.grid(T.int64(1), T.int64(2), T.int64(2), T.int64(3)):
                with T.sblock("tvmq_weight_only_matmul"):
                    v_i0, v_i1, v_i2, v_k = T.axis.remap("SSSR", [i0, i1, i2, k])
                    T.reads(x[v_i0, v_i1, v_k], B[v_k, v_i2], C[v_i2])
                    T.writes(out[v_i0, v_i1, v_i2])
                    with T.init():
                        out[v_i0, v_i1, v_i2] = T.float32(0.0)
                    out[v_i0, v_i1, v_i2] = (out[v_i0, v_i1, v_i2]
                                             + x[v_i0, v_i1, v_k] * (T.Cast("float32", B[v_k, v_i2]) * C[v_i2]))

        @R.function
        def main(x: R.Tensor((1, 2, 3), "float32"), q: R.Tensor((3, 2), "int8"),
                 scale: R.Tensor((2,), "float32")) -> R.Tensor((1, 2, 2), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                fc = R.call_tir(cls.tvmq_weight_only_int8, (x, q, scale), out_ty=R.Tensor((1, 2, 2), "float32"))
                gv = R.nn.relu(fc)
                R.output(gv)
            return gv

    scale = np.array([3.0, 2.0], np.float32) / np.float32(127)  # max |w| of each column / 127
    q = np.array([[21, -51], [8, 127], [-127, 76]], np.int8)
    np.testing.assert_array_equal(q, np.round(W / scale).astype(np.int8))
    out = WeightOnly(bits=8)(bind(MatmulRelu, w=W))
    assert_same_kernels(out, bind(Expected, q=q, scale=scale))


def test_weight_only_int4_packs_two_offset_nibbles_per_byte_with_group_scales():
    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def tvmq_weight_only_int4(x: T.Buffer((T.int64(1), T.int64(2), T.int64(3)), "float32"),
                                  B: T.Buffer((T.int64(3), T.int64(1)), "uint8"),
                                  C: T.Buffer((T.int64(2), T.int64(2)), "float32"),
                                  out: T.Buffer((T.int64(1), T.int64(2), T.int64(2)), "float32")):
            T.func_attr({"tirx.noalias": True})
            for i0, i1, i2, k in T.grid(T.int64(1), T.int64(2), T.int64(2), T.int64(3)):
                with T.sblock("tvmq_weight_only_matmul"):
                    v_i0, v_i1, v_i2, v_k = T.axis.remap("SSSR", [i0, i1, i2, k])
                    T.reads(x[v_i0, v_i1, v_k], B[v_k, v_i2 // T.int64(2)], C[v_k // T.int64(2), v_i2])
                    T.writes(out[v_i0, v_i1, v_i2])
                    with T.init():
                        out[v_i0, v_i1, v_i2] = T.float32(0.0)
                    out[v_i0, v_i1, v_i2] = out[v_i0, v_i1, v_i2] + x[v_i0, v_i1, v_k] * (
                        T.Cast("float32", T.if_then_else(v_i2 % T.int64(2) == T.int64(0),
                                                         T.Cast("int32", B[v_k, v_i2 // T.int64(2)]) & 15,
                                                         T.Cast("int32", B[v_k, v_i2 // T.int64(2)]) >> 4 & 15) - 8)
                        * C[v_k // T.int64(2), v_i2])

        @R.function
        def main(x: R.Tensor((1, 2, 3), "float32"), packed: R.Tensor((3, 1), "uint8"),
                 scale: R.Tensor((2, 2), "float32")) -> R.Tensor((1, 2, 2), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                fc = R.call_tir(cls.tvmq_weight_only_int4, (x, packed, scale), out_ty=R.Tensor((1, 2, 2), "float32"))
                gv = R.nn.relu(fc)
                R.output(gv)
            return gv

    scale = np.array([[0.5, 2.0], [3.0, 1.2]], np.float32) / np.float32(7)  # max |w| per (group of 2 rows, column) / 7
    q = np.clip(np.round(W / scale[[0, 0, 1]]), -7, 7).astype(np.int32)
    np.testing.assert_array_equal(q, [[7, -3], [3, 7], [-7, 7]])
    packed = ((q[:, 0] + 8) | ((q[:, 1] + 8) << 4)).astype(np.uint8).reshape(3, 1)
    np.testing.assert_array_equal(packed, [[0x5F], [0xFB], [0xF1]])
    out = WeightOnly(bits=4, group=2)(bind(MatmulRelu, w=W))
    assert_same_kernels(out, bind(Expected, packed=packed, scale=scale))


def test_smooth_quant_and_weight_only_keep_a_matmul_that_is_the_model_output_an_output():
    """A model ending in a matmul (an LLM's lm_head): the rewritten binding must stay the dataflow
    block's output, not become a dataflow variable returned from outside its block."""
    from tvmq.execute import HostModule

    @I.ir_module
    class Head:
        @R.function
        def main(x: R.Tensor((2, 3), "float32"), w: R.Tensor((3, 4), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                fc = R.matmul(x, w)
                R.output(fc)
            return fc

    weight = np.arange(12, dtype=np.float32).reshape(3, 4) / 7 - 0.8
    mod = bind(Head, w=weight)
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    smoothed = SmoothQuant({"fc": np.array([2.0, 0.5, 4.0], np.float32)})(mod)
    stored = WeightOnly(8)(mod)
    for out in (smoothed, stored):
        assert relax.analysis.check_well_formed(out)
        assert not isinstance(out["main"].body.body, relax.DataflowVar)
    np.testing.assert_allclose(HostModule(smoothed)(x)[0], x @ weight, rtol=1e-5, atol=1e-6)
    step = np.abs(weight).max(axis=0) / 127  # per output column
    assert np.all(np.abs(HostModule(stored)(x)[0] - x @ weight) <= np.abs(x).sum(axis=1, keepdims=True) * step / 2 + 1e-6)


def test_weight_only_leaves_skipped_integer_and_variable_weight_matmuls_alone():
    @I.ir_module
    class Untouched:
        @R.function
        def main(x: R.Tensor((1, 3), "float32"), u: R.Tensor((1, 3), "uint8"), v: R.Tensor((3, 2), "float32"),
                 w: R.Tensor((3, 2), "float32"), wq: R.Tensor((3, 2), "int8")):
            R.func_attr({"num_input": 3})
            with R.dataflow():
                fc = R.matmul(x, w)
                integer = R.matmul(u, wq, out_dtype="int32")
                variable = R.matmul(x, v)
                gv = (fc, integer, variable)
                R.output(gv)
            return gv

    mod = bind(Untouched, w=W, wq=np.arange(6, dtype=np.int8).reshape(3, 2))
    tvm.ir.assert_structural_equal(WeightOnly(bits=8, skip={"fc"})(mod), mod)


# ----------------------------------------------------------------------------- strip_qdq
def test_strip_qdq_turns_pairs_into_clips_dequantizes_weights_and_records_the_plan():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4), "float32"), wq: R.Tensor((4, 2), "int8"), ws: R.Tensor((2,), "float32"),
                 wz: R.Tensor((2,), "int32")) -> R.Tensor((1, 2), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                q = R.quantize(x, R.const(0.5, "float32"), R.const(128, "int32"), axis=-1, out_dtype="uint8")
                d = R.dequantize(q, R.const(0.5, "float32"), R.const(128, "int32"), axis=-1, out_dtype="float32")
                w = R.dequantize(wq, ws, wz, axis=1, out_dtype="float32")
                fc = R.matmul(d, w)
                q2 = R.quantize(fc, R.const(0.25, "float32"), R.const(0, "int32"), axis=-1, out_dtype="uint8")
                gv = R.dequantize(q2, R.const(0.25, "float32"), R.const(0, "int32"), axis=-1, out_dtype="float32")
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4), "float32"), wf: R.Tensor((4, 2), "float32")) -> R.Tensor((1, 2), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                d = R.clip(x, -64.0, 63.5)  # (0 - 128) * 0.5, (255 - 128) * 0.5
                w = wf
                fc = R.matmul(d, w)
                gv = R.clip(fc, 0.0, 63.75)
                R.output(gv)
            return gv

    wq = np.array([[1, -2], [3, 4], [-5, 6], [7, -127]], np.int8)
    ws = np.array([0.5, 0.125], np.float32)
    mod, plan = strip_qdq(bind(Before, wq=wq, ws=ws, wz=np.zeros(2, np.int32)))
    wf = np.array([[0.5, -0.25], [1.5, 0.5], [-2.5, 0.75], [3.5, -15.875]], np.float32)
    tvm.ir.assert_structural_equal(mod, bind(Expected, wf=wf))
    assert plan.layers == {
        "fc": LayerPlan(kind="matmul", precision="int8", inputs=(QParams(0.5, 128, "uint8"),),
                        output=QParams(0.25, 0, "uint8"), weight=QParams(ws, [0, 0], "int8", 1))
    }
    assert (plan.method, plan.activation_dtype, plan.requantize) == ("qdq", "uint8", "float")
    assert plan.input_shapes == {"x": [1, 4]}


def test_strip_qdq_keeps_the_rounding_of_pairs_no_int8_layer_absorbs():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4), "float32")) -> R.Tensor((1, 4), "float32"):
            with R.dataflow():
                s = R.sigmoid(x)
                q = R.quantize(s, R.const(0.25, "float32"), R.const(-128, "int32"), axis=-1, out_dtype="int8")
                gv = R.dequantize(q, R.const(0.25, "float32"), R.const(-128, "int32"), axis=-1, out_dtype="float32")
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4), "float32")) -> R.Tensor((1, 4), "float32"):
            with R.dataflow():
                s = R.sigmoid(x)
                t = R.divide(s, R.const(0.25, "float32"))
                r = R.round(t)
                c = R.clip(r, 0.0, 255.0)  # [-128, 127] - (-128)
                gv = R.multiply(c, R.const(0.25, "float32"))
                R.output(gv)
            return gv

    mod, plan = strip_qdq(Before)
    tvm.ir.assert_structural_equal(mod, Expected)
    assert plan.layers == {} and plan.activation_dtype == "int8"


def test_strip_qdq_leaves_mismatched_pairs_in_place_and_their_layer_float():
    @I.ir_module
    class Mismatched:
        @R.function
        def main(x: R.Tensor((1, 4), "float32"), w: R.Tensor((4, 2), "float32")) -> R.Tensor((1, 2), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                q = R.quantize(x, R.const(0.5, "float32"), R.const(128, "int32"), axis=-1, out_dtype="uint8")
                d = R.dequantize(q, R.const(0.25, "float32"), R.const(128, "int32"), axis=-1, out_dtype="float32")
                gv = R.matmul(d, w)
                R.output(gv)
            return gv

    before = bind(Mismatched, w=np.ones((4, 2), np.float32))
    mod, plan = strip_qdq(before)
    tvm.ir.assert_structural_equal(mod, before)
    assert plan.layers == {"matmul_0": LayerPlan(kind="matmul", precision="fp32")}
