"""Cheaper float arithmetic.

DivideToMultiply: ``x / c`` with a constant ``c`` becomes ``x * (1/c)``. A vector divide costs several times a multiply on every CPU tvmq targets; exporters write
``x / 6`` (hard-swish), ``x / sqrt(d)`` (attention) and the like. The result differs from the
division by at most one unit in the last place.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq._compat import TensorType, constant_array, is_constant

from .patterns import call_op, dtype_of, static_shape

__all__ = ["DivideToMultiply", "FastSoftmax"]


def _rewrite_functions(rewriter, mod):
    """``mod`` with every Relax function passed through ``rewriter`` (a PyExprMutator made on it)."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()


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
        return _rewrite_functions(_Rewriter(mod), mod)


@relax.expr_functor.mutator
class _SoftmaxRewriter(relax.PyExprMutator):
    def __init__(self, mod, lanes):
        super().__init__(mod)
        self.lanes = lanes

    def _reshaped(self, expr):
        """``(source, shape)`` when ``expr`` is a variable bound to ``reshape(source, shape)``."""
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if call_op(bound) == "relax.reshape" and static_shape(bound.args[0]) and static_shape(bound):
            return bound.args[0], static_shape(bound)
        return None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call_op(call) == "relax.reshape" and static_shape(call):
            # reshape(reshape(a)) -> reshape(a), and a reshape back to a's own shape -> a. What the
            # row kernel below leaves of ONNX's flatten-softmax-unflatten (opset < 13): a model
            # whose output is that softmax would otherwise copy it (a reshape TVM keeps as a
            # kernel where it makes the output; 20 us for PP-OCR's 40 x 6625 probabilities).
            inner = self._reshaped(call.args[0])
            if inner is not None:
                source, _ = inner
                return source if static_shape(source) == static_shape(call) else relax.op.reshape(source, static_shape(call))
            return call
        if call_op(call) != "relax.nn.softmax" or dtype_of(call) != "float32":
            return call
        x = call.args[0]
        shape = static_shape(x)
        axis = int(call.attrs.axis)
        if shape and axis in (-1, len(shape) - 1) and shape[-1] >= self.lanes:
            # Last axis, static shape: tvmq's row kernel (DLight's reduction rule scalarizes rows
            # whose length is not a multiple of the vector width), on the tensor before a reshape
            # that only merged its leading axes.
            from tvmq.targets.softmax import row_softmax

            inner = self._reshaped(x)
            source = inner[0] if inner is not None and static_shape(inner[0])[-1] == shape[-1] else x
            full = static_shape(source)
            rows = int(np.prod(full[:-1], dtype=np.int64))
            kernel = self.builder_.add_func(row_softmax(rows, full[-1], self.lanes, full), "tvmq_softmax")
            y = relax.call_tir(kernel, [source], TensorType(tuple(full), "float32"))
            return y if source is x else relax.op.reshape(self.builder_.emit(y), shape)
        from tvm import topi

        return self.builder_.call_te(topi.nn.fast_softmax, x, axis, primfunc_name_hint="fast_softmax")


@tvm.transform.module_pass(opt_level=0, name="FastSoftmax")
class FastSoftmax:
    """float32 softmax with TVM's polynomial ``fast_exp`` instead of ``exp``.

    LLVM turns a vector ``exp`` into one libm call per lane; the polynomial vectorizes. Relative
    error below 5e-5 of the exact softmax (tested); PP-OCR's recogniser ends in a 6625-class
    softmax over 40 steps, which took a fifth of its int8 kernel time with ``exp``. A softmax
    over the last axis of a static shape uses :func:`tvmq.targets.softmax.row_softmax` with
    ``lanes``-wide vectors.
    """

    def __init__(self, lanes: int = 16):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return _rewrite_functions(_SoftmaxRewriter(mod, self.lanes), mod)
