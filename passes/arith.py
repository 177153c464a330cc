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

from .patterns import FunctionGraph, call_op, dtype_of, rewrite_functions, static_shape

__all__ = ["DivideToMultiply", "FastSoftmax", "FoldAffineChains"]


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
        return rewrite_functions(_Rewriter(mod), mod)


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
        return rewrite_functions(_SoftmaxRewriter(mod, self.lanes), mod)


_AFFINE_OPS = ("relax.multiply", "relax.add", "relax.subtract")


def _affine_step(call):
    """``(x, c, op)`` when ``call`` is ``x * c``, ``x + c`` or ``x - c`` (either order for the
    first two) of a float32 variable and a constant that keeps ``x``'s shape; else None."""
    op = call_op(call)
    if op not in _AFFINE_OPS or dtype_of(call) != "float32":
        return None
    a, b = call.args
    if is_constant(b) and isinstance(a, relax.Var):
        x, c = a, b
    elif is_constant(a) and isinstance(b, relax.Var) and op != "relax.subtract":
        x, c = b, a
    else:
        return None
    shape = static_shape(x)
    if shape is None or static_shape(call) != shape:
        return None
    value = constant_array(c)
    if value.dtype != np.float32 or not np.all(np.isfinite(value)):
        return None
    try:
        if np.broadcast_shapes(value.shape, shape) != tuple(shape):
            return None
    except ValueError:
        return None
    return x, value.astype(np.float64), op


def _affine_forms(func) -> dict:
    """``var -> (base, A, B)`` for each binding equal to ``base * A + B`` through a chain of
    constant multiplies/adds whose intermediate results have no other use."""
    graph = FunctionGraph(func)
    forms = {}
    for var in graph.order:  # bindings in order: x's form is known before var's
        value = graph.value(var)
        step = _affine_step(value) if isinstance(value, relax.Call) else None
        if step is None:
            continue
        x, c, op = step
        base, a, b, length = x, np.float64(1.0), np.float64(0.0), 0
        if x in forms and graph.num_uses(x) == 1:
            base, a, b, length = forms[x]
        if op == "relax.multiply":
            a, b = a * c, b * c
        elif op == "relax.add":
            b = b + c
        else:
            b = b - c
        forms[var] = (base, a, b, length + 1)
    return {v: f for v, f in forms.items() if f[3] > 1}


@relax.expr_functor.mutator
class _AffineFolder(relax.PyExprMutator):
    def __init__(self, mod, forms):
        super().__init__(mod)
        self.forms = forms

    def visit_var_binding_(self, binding):
        if binding.var not in self.forms:
            return super().visit_var_binding_(binding)
        base, a, b, _ = self.forms[binding.var]
        expr = self.visit_expr(base)
        if np.any(a != 1.0):
            expr = relax.op.multiply(expr, relax.const(np.asarray(a, np.float32), "float32"))
        if np.any(b != 0.0):
            expr = relax.op.add(self.builder_.emit(expr) if np.any(a != 1.0) else expr,
                                relax.const(np.asarray(b, np.float32), "float32"))
        # the same variable (a dataflow block's output stays one), bound to the folded value
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(expr)))


@tvm.transform.module_pass(opt_level=0, name="FoldAffineChains")
class FoldAffineChains:
    """``((x * a1 + b1) * a2 + b2) ...`` with constant ``a``/``b`` becomes ``x * A + B``.

    Exporters and tvmq's own folding leave such chains around every layer: an int8 conv's
    dequantize scale, PP-LCNetV3's learnable scalar affine, hard-swish's ``/ 6``, the next
    affine and the requantize scale are five multiplies and two adds per element where one
    multiply and one add (an FMA) do. Only results with no other use are folded, so nothing
    is computed twice; the coefficients are combined in float64. The folded value may differ
    from the chain in the last bit of float32; an int8 layer's output can move by one step
    where it sat on a rounding boundary.
    """

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        forms = {}  # keyed by variable: one table serves every function
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
                forms.update(_affine_forms(func))
        if not forms:
            return mod
        mod = rewrite_functions(_AffineFolder(mod, forms), mod)
        entries = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
        return relax.transform.DeadCodeElimination(entries)(mod)
