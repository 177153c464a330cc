"""FastMath: float32 sigmoid, tanh, erf and exp as polynomials that vectorize.

Runs last in :func:`tvmq.pipeline.relax_passes`, after FastSoftmax and before legalization, so
each rewritten op is a small elementwise PrimFunc that fuses into the kernel before it (a conv's
epilogue). LLVM turns a vector ``exp`` (what TVM's ``sigmoid`` is made of) into one libm call per
lane: a YOLOv8n spent more than half its int8 time in the SiLU epilogues of its convs
(``x * sigmoid(x)``, 4 ns per element). Sigmoid becomes ``1 / (1 + fast_exp(-x))`` with TVM's
``fast_exp`` polynomial; tanh (LSTM cells), erf (GELU) and exp go through Relax's own
``FastMathTransform`` (``topi.fast_tanh``, ``fast_erf``, ``fast_exp``). Runtimes do the same
(ONNX Runtime's MLAS computes logistic and tanh as rational polynomials). Absolute errors
measured: 8e-8 sigmoid, 2.2e-7 tanh, 2.4e-7 erf (tested).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .graph import call_op, dtype_of, map_functions

__all__ = ["FastMath"]


def fast_sigmoid(x):
    """``te`` compute: ``1 / (1 + fast_exp(-x))``, elementwise."""
    from tvm import te, tirx

    from tvmq.targets.softmax import fast_exp

    one = tirx.const(1.0, "float32")
    return te.compute(x.shape, lambda *i: one / (one + fast_exp(-x(*i))), name="fast_sigmoid", tag="elemwise")


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
