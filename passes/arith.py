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

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call_op(call) != "relax.nn.softmax" or dtype_of(call) != "float32":
            return call
        x = call.args[0]
        shape = static_shape(x)
        axis = int(call.attrs.axis)
        if shape and axis in (-1, len(shape) - 1) and shape[-1] >= self.lanes:
            # Last axis, static shape: tvmq's row kernel (DLight's reduction rule scalarizes rows
            # whose length is not a multiple of the vector width).
            from tvmq.targets.softmax import row_softmax

            rows = int(np.prod(shape[:-1], dtype=np.int64))
            kernel = self.builder_.add_func(row_softmax(rows, shape[-1], self.lanes), "tvmq_softmax")
            flat = self.builder_.emit(relax.op.reshape(x, (rows, shape[-1]))) if len(shape) != 2 else x
            y = self.builder_.emit(relax.call_tir(kernel, [flat], TensorType((rows, shape[-1]), "float32")))
            return relax.op.reshape(y, shape) if len(shape) != 2 else y
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
