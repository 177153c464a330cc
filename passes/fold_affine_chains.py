"""FoldAffineChains: a chain of constant multiplies and adds becomes one multiply and one add.

Runs first in :func:`tvmq.pipeline.relax_passes` (LLVM targets), on the quantized module: after
FoldQDQ, whose float rescales of the integer accumulators are among the multiplies it folds, and
before PackKernels, FastSoftmax, FastMath and legalization, so that fusion gives each layer an
epilogue of one multiply-add per element (see :class:`FoldAffineChains`).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq._compat import constant_array, is_constant

from .graph import FunctionGraph, call_op, dims, dtype_of, map_functions, relax_functions

__all__ = ["FoldAffineChains"]


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
    shape = dims(x)  # dynamic dimensions too: a dynamic build must fold as the static one does
    if shape is None or dims(call) != shape:
        return None
    value = constant_array(c)
    if value.dtype != np.float32 or not np.all(np.isfinite(value)):
        return None
    if value.ndim > len(shape) or any(  # c broadcasts into x's shape without growing it
            v != 1 and v != d for v, d in zip(value.shape[::-1], shape[::-1])):
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
        for _, func in relax_functions(mod):
            if isinstance(func.body, relax.SeqExpr):
                forms.update(_affine_forms(func))
        if not forms:
            return mod
        folder = _AffineFolder(mod, forms)
        mod = map_functions(mod, folder.visit_expr, builder=folder.builder_)
        entries = [gv.name_hint for gv, _ in relax_functions(mod)]
        return relax.transform.DeadCodeElimination(entries)(mod)
