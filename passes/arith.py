"""DivideToMultiply: ``x / c`` with a constant ``c`` becomes ``x * (1/c)``.

A vector divide costs several times a multiply on every CPU tvmq targets; exporters write
``x / 6`` (hard-swish), ``x / sqrt(d)`` (attention) and the like. The result differs from the
division by at most one unit in the last place.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq._compat import constant_array, is_constant

from .patterns import call_op, dtype_of

__all__ = ["DivideToMultiply"]


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call_op(call) != "relax.divide" or dtype_of(call) != "float32":
            return call
        divisor = call.args[1]
        if isinstance(divisor, relax.Var):
            divisor = self.lookup_binding(divisor)
        if divisor is None or not is_constant(divisor):
            return call
        value = constant_array(divisor)
        if value.dtype != np.float32 or not np.all(np.isfinite(value)) or np.any(value == 0):
            return call
        reciprocal = (1.0 / value.astype(np.float64)).astype(np.float32)
        return relax.op.multiply(call.args[0], relax.const(reciprocal, "float32"))


@tvm.transform.module_pass(opt_level=0, name="DivideToMultiply")
class DivideToMultiply:
    """Replace division by a constant with multiplication by its reciprocal."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()
