"""Symbolic shapes and sizes built once per call, not once per kernel.

A Relax function over a dynamic dimension (a text line of width ``W``) passes ``W`` to every
kernel whose buffers have only derived extents (``(W - 1) // 2 + 1``, ``W + 8``: TIR cannot
recover ``W`` from them), and gives each intermediate tensor its symbolic shape. TVM 0.27's
``VMShapeLower`` turns each such argument into a VM builtin call at its use
(``vm.builtin.make_prim_value``, ``vm.builtin.make_shape``): PP-OCRv4 rec made 99 and 120 of
them per call, for one value of ``W`` and a few dozen distinct shapes, about 0.3 us per kernel
call more than a static build on top of the kernels themselves.

:class:`ShareSymbolicValues` (just before ``VMShapeLower``) binds each distinct symbolic value
once at the top of the function (``w = W``; ``s = R.shape([1, 24, (W - 1) // 2 + 1, 16])``) and
passes the variable to every call that used it: one builtin call per distinct value. Only values
of the dimensions the parameters define are hoisted (a size defined later, by a ``match_cast``
on a computed tensor, stays where it is), and sizes only of those the input tensors define (see
:func:`share_symbolic_values`); the values are the same, the kernels are untouched.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax

__all__ = ["ShareSymbolicValues", "share_symbolic_values"]


def _symbolic(arg, defined) -> bool:
    """Whether call argument ``arg`` is a size or shape over the dimensions in ``defined`` and not a
    constant."""
    from tvmq._compat import tir as tirx

    if isinstance(arg, relax.ShapeExpr):
        values = list(arg.values)
    elif isinstance(getattr(arg, "ty", None), tvm.ir.PrimType) and not isinstance(arg, tirx.IntImm):
        values = [arg]
    else:
        return False
    free = [v for value in values for v in tirx.analysis.undefined_vars(value)]
    return bool(free) and all(any(v.same_as(d) for d in defined) for v in free)


def share_symbolic_values(func):
    """``func`` (a Relax function after memory planning) with each distinct symbolic call argument
    bound once at its top; the same object when it has none to share."""
    from tvmq._compat import TensorType, make_call

    if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr) \
            or any(isinstance(b, relax.DataflowBlock) for b in func.body.blocks):
        return func
    defined = [v for p in func.params for v in relax.analysis.tir_vars_in_type(p.ty)]
    if not defined:
        return func
    # A size bound to a variable that only a shape parameter defines (``tvmq_dims``, for
    # dimensions in steps) stops VMShapeLower: its BlockBuilder no longer finds the function
    # ("UpdateFunction is updating main ... does not appear in the de-duplication map").
    # Sizes of dimensions the input tensors define share fine; shapes of either kind too.
    sized = [v for p in func.params if isinstance(p.ty, TensorType)
             for v in relax.analysis.definable_tir_vars_in_type(p.ty)]
    shared, hoisted, blocks = [], [], []  # shared: (value, var); a few dozen, compared structurally
    uses = 0

    def share(arg):
        nonlocal uses
        if not _symbolic(arg, defined if isinstance(arg, relax.ShapeExpr) else sized):
            return arg
        uses += 1
        for value, var in shared:
            if tvm_ffi.structural_equal(value, arg):
                return var
        kind = "shape" if isinstance(arg, relax.ShapeExpr) else "size"
        var = relax.Var(f"{kind}{len(shared)}", arg.ty)
        shared.append((arg, var))
        hoisted.append(relax.VarBinding(var, arg))
        return var

    for block in func.body.blocks:
        bindings = []
        for binding in block.bindings:
            value = binding.value
            if isinstance(binding, relax.VarBinding) and isinstance(value, relax.Call):
                args = [share(a) for a in value.args]
                if any(not a.same_as(b) for a, b in zip(args, value.args)):
                    binding = relax.VarBinding(binding.var, make_call(value, args))
            bindings.append(binding)
        blocks.append(relax.BindingBlock(bindings))
    if uses <= len(shared):  # every value used once: nothing to gain
        return func
    body = relax.SeqExpr([relax.BindingBlock(hoisted), *blocks], func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)


@relax.transform.function_pass(opt_level=0, name="ShareSymbolicValues")
class ShareSymbolicValues:
    """Apply :func:`share_symbolic_values` to every Relax function of a module."""

    def transform_function(self, func, mod, ctx):
        return share_symbolic_values(func)
