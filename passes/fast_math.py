"""FastMath: float32 sigmoid, tanh, erf and exp as polynomials that vectorize.

Runs last in :func:`tvmq.pipeline.relax_passes`, after FastSoftmax and before legalization, so
each rewritten op is a small elementwise PrimFunc that fuses into the kernel before it (a conv's
epilogue). LLVM turns a vector ``exp`` (what TVM's ``sigmoid`` is made of) into one libm call per
lane: a YOLOv8n spent more than half its int8 time in the SiLU epilogues of its convs
(``x * sigmoid(x)``, 4 ns per element). Sigmoid becomes a rational polynomial (ONNX Runtime's
MLAS logistic); tanh (LSTM cells), erf (GELU) and exp go through Relax's own
``FastMathTransform`` (``topi.fast_tanh``, ``fast_erf``, ``fast_exp``). Absolute errors
measured: 1.7e-7 sigmoid (over [-40, 40]), 2.2e-7 tanh, 2.4e-7 erf (tested).

Sigmoid was ``1 / (1 + fast_exp(-x))`` (21 vector operations, 8e-8); the rational form takes 15,
and YOLOX's int8 kernels, SiLU after nearly every conv, went from 6.33 to 5.90 ms summed (its
stem conv 0.57 -> 0.47 ms), the whole model 7.18 -> 6.84 ms (VNNI host, 2 threads, one run).

A SiLU whose output is requantized (``round(x * sigmoid(x) * k)``, the epilogue of an int8 conv
followed by another int8 layer) is one shorter computation, :func:`requantized_silu`: the scale
folds into the polynomial, and a rational form of degree 3 / 4 replaces MLAS's 4 / 5, as exact
(1.8e-7) where it matters. An int8 kernel of few input channels is mostly its epilogue (YOLOX's
1x1 conv over 24 channels: 25 MACs per output element against some 30 vector operations per
8); YOLOX int8 9.35 -> 9.0 ms (VNNI host, 2 threads, one run). Converted to int8 next (x86),
its zero point joins the last multiply-add before the rounding, so the integers are only clipped
and narrowed (:func:`_requantized_silu_to_integer_te`): a 1x1 conv 24 -> 24 at 104 x 104 (AMD
Zen 4, 2 threads) 76.6 -> 70.0 us, 32 -> 32 98 -> 95 us. A SiLU whose float output is kept (a
residual add after it) is the same form with k = 1 (:func:`_silus`): 3 vector operations fewer
than the float sigmoid and a multiply, 1.8e-7 instead of 1.7e-7 from the exact sigmoid; a conv
32 -> 32 1x1 at 104 x 104 with it 93 -> 84 us, 24 -> 24 3x3 168 -> 160 us.

On x86 every quantize and float requantize, ``astype(clip(round(x) + zp, lo, hi), uint8)``,
becomes one conversion that rounds (``vcvtps2dq``) and an integer clip and narrowing, where the
float chain took a round, an add, two clamps, a truncating conversion and two narrowing steps;
the outputs are the same bits. YOLOX int8 9.14 / 9.19 / 9.13 -> 8.67 / 8.40 / 8.73 ms (three
alternating runs, VNNI host, 2 threads).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq._compat import constant_array, is_constant, scalar_arg

from .graph import FunctionGraph, call_op, dtype_of, map_functions, rebind, relax_functions

__all__ = ["FastMath", "logistic", "requantized_silu", "tanh"]


# sigmoid(x) ~ 0.5 + x p(x^2) / q(x^2) on [-18, 18]: the rational approximation ONNX Runtime's
# MLAS computes its logistic with (MIT licence); largest absolute error 1.7e-7 in float32.
_LOGISTIC_RANGE = 18.0
_LOGISTIC_P = (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
               2.48287947061529e-01)
_LOGISTIC_Q = (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06, 1.70198817374094e-03,
               1.16817656904453e-01, 9.93151921023180e-01)


# tanh(x) ~ x p(x^2) / q(x^2) on [-9, 9], x itself below 4e-4: Eigen's rational approximation
# (what topi.fast_tanh computes); 2.6e-7 from the exact value in float32.
_TANH_RANGE = 9.0
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


# k * x * sigmoid(x) when the product is rounded to an integer next (a requantized SiLU):
# sigmoid(x) - 0.5 ~ c P(c^2) / Q(c^2), c = x clamped to [-16, 16], P of degree 3 (highest power
# first; times k when used), Q monic of degree 4 (its leading 1 left out). Fitted by Loeb's
# reweighted least squares: largest error of the sigmoid 1.8e-7 on [-16, 16] (MLAS's: 1.7e-7),
# 1.1e-7 beyond. Rounded after the scale, it gives another integer than the exact value for
# about 1e-5 of the inputs (a step of 1/5 to 1/216; MLAS's form: 1e-6 to 1.4e-5); its error is
# within 2e-3 quantization steps for outputs below 300 steps (tested).
_SILU_RANGE = 16.0
_SILU_P = (4.6274537664348244e+01, 4.755485272603251e+04, 8.315934999744721e+06, 2.5722619902174756e+08)
_SILU_Q = (3.853812420192606e+03, 1.5332520502689881e+06, 1.1900539579511723e+08, 1.0289052315843462e+09)


def _const(value):
    from tvm import tirx

    return tirx.const(value, "float32")


def _horner(coefficients, s, monic: bool = False):
    """The polynomial with ``coefficients`` (highest power first) at the PrimExpr ``s``; with
    ``monic``, a leading coefficient 1 before them, left out (one add instead of a multiply-add)."""
    acc = s + _const(coefficients[0]) if monic else _const(coefficients[0])
    for k in coefficients[1:]:
        acc = acc * s + _const(k)
    return acc


def logistic(v):
    """The logistic function of one float32 PrimExpr as a rational polynomial: 15 vector
    operations with one division, where ``1 / (1 + fast_exp(-x))`` took 21."""
    from tvm import tirx

    v = tirx.max(tirx.min(v, _const(_LOGISTIC_RANGE)), _const(-_LOGISTIC_RANGE))
    s = v * v
    return v * _horner(_LOGISTIC_P, s) / _horner(_LOGISTIC_Q, s) + _const(0.5)


def requantized_silu(v, k: float, offset: float = 0.0):
    """``k * v * sigmoid(v) + offset`` of one float32 PrimExpr, for a result rounded to an integer
    next: ``v k / 2 + offset + (v c) (k P(c^2)) / Q(c^2)`` (``_SILU_P`` / ``_SILU_Q``), 14 vector
    operations with one division once multiply-adds fuse (15 with an offset), where
    ``k * (v * logistic(v))`` took 17.
    ``offset``: the zero point of the integer the result becomes, added before the rounding
    (:func:`_requantized_silu_to_integer_te`)."""
    from tvm import tirx
    c = tirx.max(tirx.min(v, _const(_SILU_RANGE)), _const(-_SILU_RANGE))
    s = c * c
    linear = v * _const(0.5 * k) + _const(offset) if offset else v * _const(0.5 * k)
    return (v * c) * _horner([k * p for p in _SILU_P], s) / _horner(_SILU_Q, s, monic=True) + linear


def tanh(v):
    """tanh of one float32 PrimExpr as a rational polynomial (``_TANH_P`` / ``_TANH_Q``), for
    kernels written by hand (an LSTM's cell update); FastMath rewrites Relax's ``tanh`` through
    ``topi.fast_tanh``, the same approximation."""
    from tvm.script import tirx as T

    x = T.max(T.min(v, _const(_TANH_RANGE)), _const(-_TANH_RANGE))
    x2 = x * x
    return T.Select(T.fabs(v) < _const(0.0004), v, x * _horner(_TANH_P, x2) / _horner(_TANH_Q, x2))


def fast_sigmoid(x):
    """``te`` compute: :func:`logistic` elementwise. SiLU (``x * sigmoid(x)``) is the epilogue of
    most convs in YOLO-family detectors."""
    from tvm import te

    return te.compute(x.shape, lambda *i: logistic(x(*i)), name="fast_sigmoid", tag="elemwise")


def _requantized_silu_te(x, k: float):
    from tvm import te
    return te.compute(x.shape, lambda *i: requantized_silu(x(*i), k), name="requantized_silu", tag="elemwise")


def _requantized_silu_to_integer_te(x, k: float, zero_point: int, lo: int, hi: int, dtype: str):
    """``clip(round(k * x * sigmoid(x)) + zero_point, lo, hi)`` as ``dtype``, the zero point added
    before the rounding (inside :func:`requantized_silu`'s last multiply-add): the integers are
    then only clipped and narrowed, which x86 does for uint8 in two instructions (``vpmaxsd``,
    then ``vpmovusdb`` saturating as it narrows) where the zero point added after the rounding
    took four (a clip on both sides, a narrowing, a byte add). ``round(y + zp)`` differs from
    ``round(y) + zp`` only for a ``y`` at a tie, which the rational form's own error already
    decides either way."""
    from tvm import te
    from tvm.script import tirx as T

    def convert(*i):
        r = T.call_llvm_pure_intrin("int32", "llvm.lrint", requantized_silu(x(*i), k, float(zero_point)))
        return T.Cast(dtype, T.max(T.min(r, T.int32(hi)), T.int32(lo)))

    return te.compute(x.shape, convert, name="requantized_silu_to_integer", tag="elemwise")


def _scalar_constant(expr) -> float | None:
    value = constant_array(expr) if is_constant(expr) else None
    return float(value.reshape(())) if value is not None and value.dtype == np.float32 and value.size == 1 else None


def _same(a, b) -> bool:
    return a is not None and a.same_as(b)


def _requantized_silus(func) -> tuple[dict, set]:
    """``t = x * sigmoid(x) * k`` bindings of ``func`` whose only use is a ``round`` (float32, ``k``
    a scalar constant, the sigmoid and the product used by nothing else): ``({t: (x, k)}, {the
    sigmoid's and the product's variables})``."""
    graph = FunctionGraph(func)
    found, inner = {}, set()
    for t, value in graph.values.items():
        if call_op(value) != "relax.multiply" or dtype_of(value) != "float32":
            continue
        k, m = next(((k, m) for m, c in (value.args, value.args[::-1]) if (k := _scalar_constant(c)) is not None),
                    (None, None))
        product = graph.value(m)
        if k is None or call_op(product) != "relax.multiply" or not _same(graph.sole_user(m), t):
            continue
        if call_op(graph.value(graph.sole_user(t))) != "relax.round":
            continue
        pair = _input_times_sigmoid(graph, m, product)
        if pair is not None:
            found[t] = (pair[0], k)
            inner.update((pair[1], m))
    return found, inner


def _input_times_sigmoid(graph: FunctionGraph, m, value):
    """``(x, s)`` where ``value`` (bound to ``m``) is ``x * s``, ``s = sigmoid(x)`` read by
    nothing but ``m``; else None."""
    for x, s in (value.args, value.args[::-1]):
        sigmoid = graph.value(s)
        if call_op(sigmoid) == "relax.sigmoid" and sigmoid.args[0].same_as(x) and _same(graph.sole_user(s), m):
            return x, s
    return None


def _silus(func, taken=frozenset()) -> tuple[dict, set]:
    """``m = x * sigmoid(x)`` bindings of ``func`` (float32, the sigmoid used by nothing else; not
    in ``taken``, the requantized SiLUs' products): ``({m: (x, 1.0)}, {the sigmoids' variables})``."""
    graph = FunctionGraph(func)
    found, inner = {}, set()
    for m, value in graph.values.items():
        if call_op(value) != "relax.multiply" or dtype_of(value) != "float32" or m in taken:
            continue
        pair = _input_times_sigmoid(graph, m, value)
        if pair is not None:
            found[m] = (pair[0], 1.0)
            inner.add(pair[1])
    return found, inner


def _to_integer_te(x, zero_point: int, lo: int, hi: int, dtype: str):
    """``clip(round(x) + zero_point, lo, hi)`` as ``dtype``: rounded to the nearest, ties to even
    (the CPU's rounding mode, which tvmq leaves at its default), by the float -> int32
    conversion itself (``llvm.lrint``: x86's ``vcvtps2dq``), then added, clipped and narrowed in
    integers. A value at or beyond 2**31 steps converts to the low end (x86's integer
    indefinite), where the float clip gave the high end; a requantized int8 layer never gets
    there (its int32 accumulator times a multiplier below 14)."""
    from tvm import te
    from tvm.script import tirx as T

    def convert(*i):
        r = T.call_llvm_pure_intrin("int32", "llvm.lrint", x(*i))
        if zero_point:
            r = r + T.int32(zero_point)
        return T.Cast(dtype, T.max(T.min(r, T.int32(hi)), T.int32(lo)))

    return te.compute(x.shape, convert, name="to_integer", tag="elemwise")


def _integer_conversions(func) -> tuple[dict, set]:
    """``q = astype(clip(round(x) [+ zp], lo, hi), int8 | uint8)`` bindings, each intermediate used
    once: ``({q: (x, zp, lo, hi, dtype)}, {the round's, add's and clip's variables})``."""
    graph = FunctionGraph(func)
    found, inner = {}, set()
    for q, value in graph.values.items():
        if call_op(value) != "relax.astype" or dtype_of(value) not in ("int8", "uint8"):
            continue
        clip_var = value.args[0]
        clip = graph.value(clip_var)
        if call_op(clip) != "relax.clip" or dtype_of(clip) != "float32" or not _same(graph.sole_user(clip_var), q):
            continue
        lo, hi = (scalar_arg(a) for a in clip.args[1:3])
        if lo != int(lo) or hi != int(hi):
            continue
        src, zero_point, chain = clip.args[0], 0, [clip_var]
        add = graph.value(src)
        if call_op(add) == "relax.add":
            zp = _scalar_constant(add.args[1])
            if zp is None or zp != round(zp) or not _same(graph.sole_user(src), clip_var):
                continue
            zero_point, chain = int(zp), chain + [src]
            src = add.args[0]
        rounded = graph.value(src)
        if call_op(rounded) != "relax.round" or not _same(graph.sole_user(src), chain[-1]):
            continue
        found[q] = (rounded.args[0], zero_point, int(lo), int(hi), dtype_of(value))
        inner.update(chain + [src])
    return found, inner


@relax.expr_functor.mutator
class _FastMathRewriter(relax.PyExprMutator):
    def __init__(self, mod, silus=None, conversions=None, inner=()):
        super().__init__(mod)
        self.silus, self.conversions, self.inner = silus or {}, conversions or {}, set(inner)

    def visit_var_binding_(self, binding):
        if binding.var in self.inner:  # folded into the requantized SiLU or conversion that uses it
            return
        if binding.var in self.conversions and self.conversions[binding.var][0] in self.silus:
            t, zp, lo, hi, dtype = self.conversions[binding.var]
            x, k = self.silus[t]
            rebind(self, binding.var, self.builder_.call_te(
                _requantized_silu_to_integer_te, self.visit_expr(x), k, zp, lo, hi, dtype,
                primfunc_name_hint="requantized_silu_to_integer"))
            return
        if binding.var in self.conversions:
            x, zp, lo, hi, dtype = self.conversions[binding.var]
            rebind(self, binding.var, self.builder_.call_te(_to_integer_te, self.visit_expr(x), zp, lo, hi, dtype,
                                                            primfunc_name_hint="to_integer"))
            return
        if binding.var not in self.silus:
            return super().visit_var_binding_(binding)
        x, k = self.silus[binding.var]
        rebind(self, binding.var, self.builder_.call_te(_requantized_silu_te, self.visit_expr(x), k,
                                                        primfunc_name_hint="requantized_silu" if k != 1.0 else "silu"))

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call_op(call) != "relax.sigmoid" or dtype_of(call) != "float32":
            return call
        return self.builder_.call_te(fast_sigmoid, call.args[0], primfunc_name_hint="fast_sigmoid")


@tvm.transform.module_pass(opt_level=0, name="FastMath")
class FastMath:
    """float32 sigmoid, tanh, erf and exp as vectorizable polynomials (see the module docstring).

    Parameters
    ----------
    integer_conversions : bool
        Also turn each ``astype(clip(round(x) + zp, lo, hi), int8 | uint8)`` (every quantize and
        float requantize) into one conversion that rounds (:func:`_to_integer_te`); for x86,
        where it is one instruction, bit-identical to the float chain.
    """

    def __init__(self, integer_conversions: bool = False):
        self.integer_conversions = integer_conversions

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        silus, conversions, inner = {}, {}, set()
        finders = [(silus, _requantized_silus)] + ([(conversions, _integer_conversions)] if self.integer_conversions else [])
        for _, func in relax_functions(mod):
            if isinstance(func.body, relax.SeqExpr):
                for table, find in finders:
                    found, folded = find(func)
                    table.update(found)
                    inner |= folded
                found, folded = _silus(func, taken=frozenset(inner))
                silus.update(found)
                inner |= folded
        # a requantized SiLU converted to integers next is one computation with the conversion
        inner |= {x for x, *_ in conversions.values() if x in silus}
        rewriter = _FastMathRewriter(mod, silus, conversions, inner)
        mod = map_functions(mod, rewriter.visit_expr, builder=rewriter.builder_)
        # TVM 0.27's FastMathTransform reads ``call.op.name`` of every call and fails on a call to
        # another function (a GlobalVar: Specialize's dispatch in main); it runs without those.
        callers = {gv: f for gv, f in mod.functions_items() if _calls_functions(f)}
        if not callers:
            return relax.transform.FastMathTransform()(mod)
        out = relax.transform.FastMathTransform()(tvm.IRModule(
            {gv: f for gv, f in mod.functions_items() if gv not in callers}, attrs=mod.attrs))
        for gv, f in callers.items():
            out[gv] = f
        return out


def _calls_functions(func) -> bool:
    """Whether a Relax function calls another function of the module."""
    found = []
    if isinstance(func, relax.Function):
        relax.analysis.post_order_visit(
            func.body, lambda e: found.append(e) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.GlobalVar) else None)
    return bool(found)
