"""FastSoftmax: float32 softmax as a kernel that vectorizes, with a polynomial ``exp``.

Runs in :func:`tvmq.pipeline.relax_passes` (LLVM targets), after FoldAffineChains and
PackKernels and before FastMath and legalization (``LegalizeOps``), on the quantized module.
LLVM turns a vector ``exp`` into one libm call per lane; TVM's ``fast_exp`` polynomial
vectorizes. A softmax over the last axis becomes tvmq's row kernel
(:func:`tvmq.targets.softmax.row_softmax`), static or dynamic shape (the same arithmetic for a
size either way); one over another axis of a static shape with at least a vector's elements
after that axis, tvmq's column kernel (:func:`tvmq.targets.softmax.column_softmax`); every other
one ``topi.nn.fast_softmax``. The pass also removes the reshape pairs ONNX's
flatten-softmax-unflatten (opset < 13) leaves around the row kernel.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq._compat import IntImm, TensorType, expr_type
from tvmq.targets.kernel_names import SOFTMAX_FUNC

from .graph import call_op, dims, dtype_of, map_functions, static_shape

__all__ = ["FastSoftmax"]


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
        symbolic = dims(x)
        if shape is None and symbolic and axis in (-1, len(symbolic) - 1):
            # dynamic dimensions (a sequence of any length, rows of any length): the same row
            # kernel over the rows as [rows, n], so a dynamic build computes what a static one does,
            # bit for bit
            from tvmq.targets.softmax import row_softmax

            n = symbolic[-1]
            count = 1  # the rows: the product of the leading extents (a constant when they all are)
            for d in list(expr_type(x).shape.values)[:-1]:
                count = d * count
            as_rows = self.builder_.emit(relax.op.reshape(x, [count, expr_type(x).shape.values[-1]]))
            rows = int(count) if isinstance(count, (int, IntImm)) else None
            kernel = self.builder_.add_func(row_softmax(rows, n if isinstance(n, int) else None, self.lanes), SOFTMAX_FUNC)
            y = self.builder_.emit(relax.call_tir(kernel, [as_rows], TensorType(expr_type(as_rows).shape.values, "float32")))
            return relax.op.reshape(y, expr_type(x).shape)
        if shape and axis in (-1, len(shape) - 1):
            # Last axis, static shape: tvmq's row kernel (DLight's reduction rule scalarizes rows
            # whose length is not a multiple of the vector width; rows shorter than a vector run
            # in scalars, as a dynamic build runs them), on the tensor before a reshape
            # that only merged its leading axes.
            from tvmq.targets.softmax import row_softmax

            inner = self._reshaped(x)
            source = inner[0] if inner is not None and static_shape(inner[0])[-1] == shape[-1] else x
            full = static_shape(source)
            rows = int(np.prod(full[:-1], dtype=np.int64))
            kernel = self.builder_.add_func(row_softmax(rows, full[-1], self.lanes, full), SOFTMAX_FUNC)
            y = relax.call_tir(kernel, [source], TensorType(tuple(full), "float32"))
            return y if source is x else relax.op.reshape(self.builder_.emit(y), shape)
        if shape and int(np.prod(shape[axis % len(shape) + 1:], dtype=np.int64)) >= self.lanes:
            # another axis, whole vectors across it: tvmq's column kernel (YOLOv8's box
            # distribution head, [1, 16, 4, 2100] over its 16 bins: 0.59 -> 0.06 ms)
            from tvmq.targets.softmax import column_softmax

            kernel = self.builder_.add_func(column_softmax(shape, axis, self.lanes), SOFTMAX_FUNC)
            return relax.call_tir(kernel, [x], TensorType(tuple(shape), "float32"))
        from tvm import topi

        return self.builder_.call_te(topi.nn.fast_softmax, x, axis, primfunc_name_hint="fast_softmax")


@tvm.transform.module_pass(opt_level=0, name="FastSoftmax")
class FastSoftmax:
    """float32 softmax with TVM's polynomial ``fast_exp`` instead of ``exp``.

    LLVM turns a vector ``exp`` into one libm call per lane; the polynomial vectorizes. Relative
    error below 5e-5 of the exact softmax (tested); PP-OCR's recogniser ends in a 6625-class
    softmax over 40 steps, which took a fifth of its int8 kernel time with ``exp``. A softmax
    over the last axis uses :func:`tvmq.targets.softmax.row_softmax` with
    ``lanes``-wide vectors.
    """

    def __init__(self, lanes: int = 16):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        rewriter = _SoftmaxRewriter(mod, self.lanes)
        return map_functions(mod, rewriter.visit_expr, builder=rewriter.builder_)
