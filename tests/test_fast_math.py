"""FastMath: sigmoid, tanh, erf and exp as vectorizable polynomials, within stated errors."""

import numpy as np
import pytest
import tvm
from conftest import unary_module
from tvm import relax

from tvmq.execute import HostModule
from tvmq.passes import FastMath, count_ops


def _unary(op, dtype="float32", n=4096):
    return unary_module(op, (n,), dtype)


def _erf(x):
    from math import erf

    return np.vectorize(erf)(x)


@pytest.mark.parametrize("name, op, exact, bound", [
    ("sigmoid", relax.op.sigmoid, lambda x: 1 / (1 + np.exp(-x)), 2e-7),
    ("tanh", relax.op.tanh, np.tanh, 1e-6),
    ("erf", relax.op.erf, _erf, 1e-6),
])
def test_fast_math_ops_are_rewritten_and_within_their_error_bound(name, op, exact, bound):
    mod = _unary(op)
    fast = FastMath()(mod)
    assert count_ops(fast).get(f"relax.{name}", 0) == 0 and count_ops(mod)[f"relax.{name}"] == 1
    x = np.concatenate([np.linspace(-20, 20, 2048), np.random.default_rng(0).normal(0, 3, 2048)]).astype(np.float32)
    got = np.asarray(HostModule(mod)(x), np.float64)  # the pipeline runs FastMath itself
    assert np.abs(got - exact(x.astype(np.float64))).max() < bound


def test_fast_math_leaves_other_dtypes_alone():
    mod = _unary(relax.op.sigmoid, "float16")
    tvm.ir.assert_structural_equal(FastMath()(mod), mod)


def test_sigmoid_is_a_short_rational_polynomial():
    """SiLU (``x * sigmoid(x)``) follows nearly every conv of a YOLO-family detector, so its
    operation count is the epilogue's: the rational form has 24 adds, multiplies, clamps and one
    division (15 vector operations once multiply-adds fuse), where ``1 / (1 + fast_exp(-x))`` had
    27 (21 fused), a floor, a float -> int conversion and a shift."""
    import tvm_ffi
    from tvm import te

    from tvmq._compat import tir
    from tvmq.passes.fast_math import fast_sigmoid

    x = te.placeholder((16,), "float32", name="x")
    func = te.create_prim_func([x, fast_sigmoid(x)])
    kinds = (tir.Add, tir.Sub, tir.Mul, tir.Div, tir.Min, tir.Max, tir.Cast, tir.FloorDiv)
    unique = {}  # the expression is a tree; a repeated subexpression is computed once

    def count(node):
        unique[tvm_ffi.structural_hash(node)] = type(node).__name__

    tvm_ffi.structural_walk(func.body, [(k, count) for k in kinds])
    ops = list(unique.values())
    assert len(ops) <= 24 and ops.count("Div") == 1 and "Cast" not in ops, ops


def _silu_then_round(k: float, n: int = 4096, extra_use: bool = False, to_uint8_at: float | None = None):
    """``main(x) = round(x * sigmoid(x) * k)`` (a requantized SiLU); with ``extra_use`` the
    product is also an output, so it must stay as it is; with ``to_uint8_at`` a zero point, the
    rounded value is shifted by it, clipped to [0, 255] and narrowed to uint8 (FoldQDQ's int8
    requantize)."""
    from tvm import relax

    from tvmq._compat import TensorType

    x = relax.Var("x", TensorType((n,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            s = bb.emit(relax.op.sigmoid(x))
            m = bb.emit(relax.op.multiply(x, s))
            t = bb.emit(relax.op.multiply(m, relax.const(np.float32(k))))
            if to_uint8_at is not None:
                shifted = bb.emit(relax.op.add(bb.emit(relax.op.round(t)), relax.const(np.float32(to_uint8_at))))
                r = bb.emit_output(relax.op.astype(bb.emit(relax.op.clip(shifted, 0, 255)), "uint8"))
            else:
                r = bb.emit_output(relax.op.round(t))
            outs = [r, bb.emit_output(m)] if extra_use else [r]
        bb.emit_func_output(relax.Tuple(outs) if extra_use else r)
    return bb.get()


def _exact_silu(x, k):
    x = x.astype(np.float64)
    return k * x / (1 + np.exp(-x))


@pytest.mark.parametrize("k", [5.0, 24.585728, 216.52])
def test_a_requantized_silu_is_one_shorter_kernel_within_a_fraction_of_a_step(k):
    """``round(x * sigmoid(x) * k)``: the scale folds into a degree 3 / 4 rational form whose
    error is judged in steps of the quantized output; it rounds to another integer than the
    exact product about as rarely as MLAS's sigmoid does (a value a hair from a .5 boundary)."""
    mod = _silu_then_round(k)
    fast = FastMath()(mod)
    names = [gv.name_hint for gv in fast.get_global_vars()]
    assert "requantized_silu" in names and "fast_sigmoid" not in names, names
    assert count_ops(fast).get("relax.sigmoid", 0) == 0 and count_ops(fast).get("relax.multiply", 0) == 0
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 3, 2048), rng.uniform(-300 / k - 1, 300 / k, 2048)]).astype(np.float32)
    got = HostModule(mod)(x)[0]
    exact = _exact_silu(x, k)
    assert np.abs(got - np.round(exact)).max() <= 1  # the pipeline runs FastMath itself
    assert np.mean(got != np.round(exact)) < 1e-3


@pytest.mark.parametrize("k, zero_point", [(24.585728, 51.0), (5.0, 0.0), (216.52, 3.0)])
def test_a_requantized_silu_converted_to_uint8_is_one_computation_with_its_zero_point(k, zero_point):
    """``clip(round(k x sigmoid(x)) + zp, 0, 255)`` as uint8 on x86: one elementwise kernel whose
    zero point is added in float before the rounding (no integer add left), the uint8 equal to the
    exact product's within one step and different from it about as rarely as the float output's
    rounding is (``round(y + zp)`` and ``round(y) + zp`` part only at ties)."""
    from tvmq._compat import tir

    mod = _silu_then_round(k, to_uint8_at=zero_point)
    fast = FastMath(integer_conversions=True)(mod)
    funcs = {gv.name_hint: f for gv, f in fast.functions_items() if isinstance(f, tir.PrimFunc)}
    assert list(funcs) == ["requantized_silu_to_integer"], list(funcs)
    script = funcs["requantized_silu_to_integer"].script()
    if zero_point:  # in the float sum that is rounded, not added to the rounded integer
        assert f"+ T.float32({zero_point}))" in script and f"+ {int(zero_point)}" not in script, script
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 3, 2048), rng.uniform(-300 / k - 1, (255 - zero_point) / k + 1, 2048)]).astype(np.float32)
    got = HostModule(mod)(x)[0]  # the x86 pipeline converts with FastMath(integer_conversions=True)
    exact = np.clip(np.round(_exact_silu(x, k)) + zero_point, 0, 255)
    assert got.dtype == np.uint8 and np.abs(got.astype(np.int64) - exact).max() <= 1
    assert np.mean(got != exact) < 1e-3


@pytest.mark.parametrize("k", [5.0, 24.585728, 216.52])
def test_requantized_silu_error_in_steps(k):
    from tvm import te

    from tvmq.passes.fast_math import requantized_silu
    from tvmq.targets import get_preset

    n = 1 << 16
    x = te.placeholder((n,), "float32", name="x")
    y = te.compute(x.shape, lambda i: requantized_silu(x[i], k), name="y")
    f = tvm.compile(te.create_prim_func([x, y]), get_preset("x86").tvm_target())
    rng = np.random.default_rng(1)
    xs = np.concatenate([rng.normal(0, 3, n // 2), rng.uniform(-300 / k - 1, 300 / k, n // 2)]).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(n, np.float32))
    f(tvm.runtime.tensor(xs), out)
    exact = _exact_silu(xs, k)
    small = np.abs(exact) < 300
    assert np.abs(out.numpy() - exact)[small].max() < 2e-3


def test_a_silu_not_rounded_next_is_the_same_rational_form_in_float():
    """``x * sigmoid(x)`` whose product is not requantized next (a float output: a residual add
    after it), or is also read elsewhere: the SiLU form with k = 1, one division and no separate
    multiply, within 4e-7 |x| of the exact product (the sigmoid's own 1.8e-7 times |x|, and
    beyond |x| = 16, where the form is v / 2 + v (sigmoid(16) - 1 / 2), float32 rounding of
    both halves: 3e-7 |x|, about 2.5 ulps)."""
    for mod in (_silu_then_round(24.0, extra_use=True), _unary(lambda x: relax.op.multiply(x, relax.op.sigmoid(x)))):
        names = [gv.name_hint for gv in FastMath()(mod).get_global_vars()]
        assert "silu" in names and "fast_sigmoid" not in names and "requantized_silu" not in names, names
    mod = _unary(lambda x: relax.op.multiply(x, relax.op.sigmoid(x)))
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 6, 4090), [-40.0, -16.0, -1e-3, 0.0, 16.0, 40.0]]).astype(np.float32)
    got = HostModule(mod)(x)[0].astype(np.float64)
    exact = _exact_silu(x, 1.0)
    assert np.all(np.abs(got - exact) <= 4e-7 * np.maximum(np.abs(x), 1.0)), np.abs(got - exact).max()


def test_a_sigmoid_read_elsewhere_keeps_the_float_sigmoid():
    from tvmq._compat import TensorType

    x = relax.Var("x", TensorType((64,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            s = bb.emit(relax.op.sigmoid(x))
            y = bb.emit_output(relax.op.add(bb.emit(relax.op.multiply(x, s)), s))
        bb.emit_func_output(y)
    names = [gv.name_hint for gv in FastMath()(bb.get()).get_global_vars()]
    assert "fast_sigmoid" in names and "silu" not in names, names


def test_requantized_silu_takes_fewer_operations_than_the_float_sigmoid_and_two_multiplies():
    import tvm_ffi
    from tvm import te

    from tvmq._compat import tir
    from tvmq.passes.fast_math import fast_sigmoid, requantized_silu

    x = te.placeholder((16,), "float32", name="x")
    s = fast_sigmoid(x)
    kinds = (tir.Add, tir.Sub, tir.Mul, tir.Div, tir.Min, tir.Max, tir.Cast, tir.FloorDiv)

    def ops(out):
        unique = {}  # the expression is a tree; a repeated subexpression is computed once

        def count(node):
            unique[tvm_ffi.structural_hash(node)] = type(node).__name__

        tvm_ffi.structural_walk(te.create_prim_func([x, out]).body, [(kind, count) for kind in kinds])
        return list(unique.values())

    float_form = ops(te.compute(x.shape, lambda i: x[i] * s[i] * tvm.tirx.const(24.0, "float32")))
    fused = ops(te.compute(x.shape, lambda i: requantized_silu(x[i], 24.0)))
    assert fused.count("Div") == 1 and len(fused) + 3 <= len(float_form), (fused, float_form)


def _quantize_chain(zero_point: float, lo: int, hi: int, dtype: str, n: int = 4096, extra_use: bool = False):
    """``main(x) = astype(clip(round(x) + zero_point, lo, hi), dtype)``, as FoldQDQ writes a
    quantize or a float requantize; with ``extra_use`` the rounded value is an output too."""
    from tvm import relax

    from tvmq._compat import TensorType

    x = relax.Var("x", TensorType((n,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            r = bb.emit(relax.op.round(x))
            t = bb.emit(relax.op.add(r, relax.const(np.float32(zero_point)))) if zero_point else r
            q = bb.emit_output(relax.op.astype(bb.emit(relax.op.clip(t, lo, hi)), dtype))
            extra = bb.emit_output(relax.op.multiply(r, relax.const(np.float32(2.0)))) if extra_use else None
        bb.emit_func_output(relax.Tuple([q, extra]) if extra_use else q)
    return bb.get()


@pytest.mark.parametrize("zero_point, lo, hi, dtype", [(60.0, 0, 255, "uint8"), (0.0, 0, 255, "uint8"),
                                                       (-3.0, -128, 127, "int8"), (0.0, 0, 6, "uint8")])
def test_quantizing_converts_once_with_the_same_bits_on_x86(zero_point, lo, hi, dtype):
    """round half to even, + zero point, clip, narrow: one rounding conversion and integer clips
    on x86, the same bits as the float chain (ties, values far outside the range included, up to
    the 2**31 steps where the conversion overflows to the low end)."""
    mod = _quantize_chain(zero_point, lo, hi, dtype)
    fast = FastMath(integer_conversions=True)(mod)
    names = [gv.name_hint for gv in fast.get_global_vars()]
    assert "to_integer" in names and count_ops(fast).get("relax.round", 0) == 0, names
    assert FastMath()(mod).same_as(mod) or count_ops(FastMath()(mod)).get("relax.round", 0) == 1
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 80, 3000), np.arange(-300, 300) + 0.5, [2.1e9, -2.1e9, -3.4e37, 0.0, -0.0],
                        rng.uniform(-2, 2, 491)]).astype(np.float32)
    got = HostModule(mod)(x)[0]  # the pipeline runs FastMath itself (x86 host: with conversions)
    expected = np.clip(np.round(x.astype(np.float64)) + zero_point, lo, hi).astype(dtype)
    assert got.dtype == np.dtype(dtype) and np.array_equal(got, expected)


def test_a_rounded_value_used_twice_keeps_the_float_chain():
    fast = FastMath(integer_conversions=True)(_quantize_chain(60.0, 0, 255, "uint8", extra_use=True))
    assert "to_integer" not in [gv.name_hint for gv in fast.get_global_vars()]
    assert count_ops(fast)["relax.round"] == 1
