"""DivideToMultiply: ``x / c`` with a constant ``c`` becomes ``x * (1/c)``.

Runs in :func:`tvmq.prepare`, after ConvTransposeToConv, Conv1dToConv2d and constant folding
(FoldConstantsNumpy, ``FoldConstant``) and before ConvertToNHWC, so calibration observes the
same arithmetic the compiled model runs. A vector divide costs several times a multiply on
every CPU tvmq targets; exporters write ``x / 6`` (hard-swish), ``x / sqrt(d)`` (attention) and
the like. The result differs from the division by at most one unit in the last place.

The match is a dataflow pattern, ``divide(*, constant)``, rewritten by ``relax.dpl.rewrite_call``
(which sees through variables bound to constants).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from tvmq._compat import constant_array

from .graph import dtype_of, rewrite_pattern

__all__ = ["DivideToMultiply"]


def _reciprocal(divisor) -> np.ndarray | None:
    """``1 / divisor`` in float32, or ``None`` where multiplying by it would not equal dividing."""
    value = constant_array(divisor)
    if value.dtype != np.float32 or not np.all(np.isfinite(value)) or np.any(value == 0):
        return None
    with np.errstate(over="ignore"):
        reciprocal = (1.0 / value.astype(np.float64)).astype(np.float32)
    # a subnormal divisor's reciprocal overflows float32 (0 * inf would be NaN)
    return reciprocal if np.all(np.isfinite(reciprocal)) else None


@tvm.transform.module_pass(opt_level=0, name="DivideToMultiply")
class DivideToMultiply:
    """Replace division by a constant with multiplication by its reciprocal."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        x, c = wildcard(), is_const()
        pattern = is_op("relax.divide")(x, c)

        def rewrite(call, matches):
            reciprocal = _reciprocal(matches[c]) if dtype_of(call) == "float32" else None
            if reciprocal is None:
                return call
            return relax.op.multiply(matches[x], relax.const(reciprocal, "float32"))

        return rewrite_pattern(mod, pattern, rewrite)
