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
"""

from __future__ import annotations

import tvm
from tvm import relax

from .graph import call_op, dtype_of, map_functions

__all__ = ["FastMath", "logistic", "tanh"]


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


def _const(value):
    from tvm import tirx

    return tirx.const(value, "float32")


def _horner(coefficients, s):
    """The polynomial with ``coefficients`` (highest power first) at the PrimExpr ``s``."""
    acc = _const(coefficients[0])
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


@relax.expr_functor.mutator
class _SigmoidRewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call_op(call) != "relax.sigmoid" or dtype_of(call) != "float32":
            return call
        return self.builder_.call_te(fast_sigmoid, call.args[0], primfunc_name_hint="fast_sigmoid")


@tvm.transform.module_pass(opt_level=0, name="FastMath")
class FastMath:
    """float32 sigmoid, tanh, erf and exp as vectorizable polynomials (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        rewriter = _SigmoidRewriter(mod)
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
