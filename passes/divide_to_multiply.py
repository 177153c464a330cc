"""DivideToMultiply: ``x / c`` with a constant ``c`` becomes ``x * (1/c)``.

Runs in :func:`tvmq.prepare`, after ConvTransposeToConv, Conv1dToConv2d and constant folding
(FoldConstantsNumpy, ``FoldConstant``) and before ConvertToNHWC, so calibration observes the
same arithmetic the compiled model runs. A vector divide costs several times a multiply on
every CPU tvmq targets; exporters write ``x / 6`` (hard-swish), ``x / sqrt(d)`` (attention) and
the like. The result differs from the division by at most one unit in the last place.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq._compat import constant_array, is_constant

from .graph import call_op, dtype_of, map_functions

__all__ = ["DivideToMultiply"]


@relax.expr_functor.mutator
class _DivisionRewriter(relax.PyExprMutator):
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
        with np.errstate(over="ignore"):
            reciprocal = (1.0 / value.astype(np.float64)).astype(np.float32)
        if not np.all(np.isfinite(reciprocal)):
            return call  # a subnormal divisor: its reciprocal overflows float32 (0 * inf would be NaN)
        return relax.op.multiply(call.args[0], relax.const(reciprocal, "float32"))


@tvm.transform.module_pass(opt_level=0, name="DivideToMultiply")
class DivideToMultiply:
    """Replace division by a constant with multiplication by its reciprocal."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        rewriter = _DivisionRewriter(mod)
        return map_functions(mod, rewriter.visit_expr, builder=rewriter.builder_)
