"""ConvertToNHWC: channels-last activations, so int8 kernels can use dot-product instructions.

Runs last in :func:`tvmq.prepare` (``layout="NHWC"``, the default), after constant folding and
DivideToMultiply, so calibration, InsertQDQ and FoldQDQ see the NHWC graph that PackKernels
packs; it ends with FoldConstantsNumpy and ``FoldConstant`` for the transposed weights.

x86 VNNI and ARM sdot multiply four consecutive int8 reduction elements; in NHWC the input
channels of one pixel are consecutive, and depthwise and elementwise kernels vectorize over
channels. ``relax.transform.ConvertLayout`` does the work, but in TVM 0.27 ``R.clip`` (and
``R.nn.relu6``) have no layout inference, so it wraps every clip in a transpose pair. This pass
rewrites clips as ``maximum``/``minimum`` with scalar constants, which do, converts, then turns
the pairs back into ``R.clip`` so the integer epilogue still sees them.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq._compat import constant_array, is_constant, make_call

from .fold_constants import FoldConstantsNumpy
from .graph import FunctionGraph, call_op, dtype_of, map_functions, relax_functions
from .layers import Activation

__all__ = ["ConvertToNHWC"]

# Pooling follows its input's layout (naming it here trips a check in 0.27's InferLayoutPool2d).
# conv2d_transpose stays NCHW (transposes around it): TOPI legalizes it in NCHW only.
DESIRED_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "OHWI"], "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}


_ELEMENTWISE = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
                "relax.power")


def _as_scalar(expr, other):
    """A one-element constant of rank >= 1 as a 0-d constant, where broadcasting it against
    ``other`` (of at least its rank) gives the same result; else None."""
    if not is_constant(expr):
        return None
    value = constant_array(expr)
    shape = getattr(getattr(other, "ty", None), "shape", None)
    if value.size != 1 or value.ndim == 0 or shape is None or len(shape.values) < value.ndim:
        return None
    return relax.const(value.reshape(()), str(value.dtype))


@relax.expr_functor.mutator
class _ClipToMinMax(relax.PyExprMutator):
    """Clips to maximum/minimum with scalars, and one-element constant operands (Paddle exports
    write ``x + c`` with ``c`` of shape ``[1]``) to 0-d scalars: ConvertLayout infers layouts for
    those, while a rank-1 operand against an NCHW tensor makes it keep NCHW and wrap the op in
    transposes."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call_op(call) in _ELEMENTWISE and len(call.args) == 2:
            lhs, rhs = call.args
            new_rhs, new_lhs = _as_scalar(rhs, lhs), _as_scalar(lhs, rhs)
            if new_rhs is not None or new_lhs is not None:
                call = make_call(call, [new_lhs if new_lhs is not None else lhs, new_rhs if new_rhs is not None else rhs])
        act = Activation.of(call) if call_op(call) in ("relax.clip", "relax.nn.relu6") else None
        if act is None:
            return call
        dtype = dtype_of(call.args[0])
        lo = relax.const(np.asarray(act.lo, dtype), dtype)
        hi = relax.const(np.asarray(act.hi, dtype), dtype)
        return relax.op.minimum(self.builder_.emit(relax.op.maximum(call.args[0], lo)), hi)


@relax.expr_functor.mutator
class _MinMaxToClip(relax.PyExprMutator):
    def __init__(self, mod, graph):
        super().__init__(mod)
        self.graph = graph

    def _scalar(self, expr):
        if is_constant(expr):
            value = constant_array(expr)
            return float(value) if value.size == 1 and value.ndim == 0 else None
        return None

    def visit_call_(self, call):
        if call_op(call) == "relax.minimum" and isinstance(call.args[0], relax.Var):
            hi = self._scalar(call.args[1])
            inner = self.graph.value(call.args[0])
            if hi is not None and call_op(inner) == "relax.maximum" and self.graph.num_uses(call.args[0]) == 1:
                lo = self._scalar(inner.args[1])
                if lo is not None:
                    return relax.op.clip(self.visit_expr(inner.args[0]), lo, hi)
        return super().visit_call_(call)


@tvm.transform.module_pass(opt_level=0, name="ConvertToNHWC")
class ConvertToNHWC:
    """Convert conv2d and pooling to NHWC (weights OHWI) and propagate the layout."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        has_conv = any(
            call_op(v) == "relax.nn.conv2d" and str(v.attrs.data_layout) == "NCHW"
            for _, f in relax_functions(mod)
            for v in FunctionGraph(f).values.values()
        )
        if not has_conv:
            return mod
        scalar = map_functions(mod, lambda f: _ClipToMinMax(mod).visit_expr(f), remove_unused=True)
        converted = relax.transform.ConvertLayout(DESIRED_LAYOUTS)(scalar)
        clipped = map_functions(converted, lambda f: _MinMaxToClip(converted, FunctionGraph(f)).visit_expr(f),
                                remove_unused=True)
        return tvm.transform.Sequential([FoldConstantsNumpy(), relax.transform.FoldConstant()])(clipped)
