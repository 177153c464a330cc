"""FoldConstantsNumpy: evaluate constant arithmetic in numpy.

Runs in :func:`tvmq.prepare`, after ConvTransposeToConv and Conv1dToConv2d and just before
``relax.transform.FoldConstant``, and again at the end of ConvertToNHWC (transposed weights).

``relax.transform.FoldConstant`` compiles and runs a kernel for every constant expression,
which costs seconds on a model whose batch norms were folded into convolutions (8 s for
PP-OCR's classifier). The handful of ops those expressions use are evaluated here in numpy
instead; whatever remains goes to ``FoldConstant`` afterwards.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq._compat import FloatImm, IntImm, constant_array, is_constant, make_call

from .graph import call_op, dtype_of, map_functions, static_shape

__all__ = ["FoldConstantsNumpy"]

_BINARY = {
    "relax.add": np.add,
    "relax.subtract": np.subtract,
    "relax.multiply": np.multiply,
    "relax.divide": np.divide,
    "relax.power": np.power,
    "relax.maximum": np.maximum,
    "relax.minimum": np.minimum,
}
_UNARY = {
    "relax.sqrt": np.sqrt,
    "relax.rsqrt": lambda x: 1 / np.sqrt(x),
    "relax.negative": np.negative,
    "relax.exp": np.exp,
    "relax.abs": np.abs,
}


def _evaluate(call, args):
    op = call_op(call)
    if op in _BINARY:
        return _BINARY[op](args[0], args[1])
    if op in _UNARY:
        return _UNARY[op](args[0])
    if op in ("relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten"):
        shape = static_shape(call)
        return None if shape is None else args[0].reshape(shape)
    if op == "relax.permute_dims":
        axes = call.attrs.axes
        return np.transpose(args[0], None if axes is None else [int(a) for a in axes])
    if op == "relax.astype":
        return args[0].astype(str(call.attrs.dtype))
    return None


@relax.expr_functor.mutator
class _ConstantFolder(relax.PyExprMutator):
    def _constant(self, expr):
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is not None and is_constant(bound):
                return bound
        return None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        # Use folded constants directly, so their ``v = const`` bindings become dead.
        args = [self._constant(a) or a for a in call.args]
        if any(not a.same_as(b) for a, b in zip(args, call.args)):
            call = self.builder_.normalize(make_call(call, args))
        op = call_op(call)
        if op not in _BINARY and op not in _UNARY and op not in (
            "relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten", "relax.permute_dims", "relax.astype"
        ):
            return call
        tensor_args = [a for a in call.args if not isinstance(a, relax.ShapeExpr)]
        args = []
        for a in tensor_args:
            if isinstance(a, (FloatImm, IntImm)):  # scalar operands, e.g. BN's epsilon
                args.append(np.asarray(a.value, dtype=str(a.ty)))
                continue
            if isinstance(a, relax.Var):
                a = self.lookup_binding(a)
            if a is None or not is_constant(a):
                return call
            args.append(constant_array(a))
        with np.errstate(all="ignore"):
            value = _evaluate(call, args)
        dtype = dtype_of(call)
        if value is None or dtype is None or str(np.asarray(value).dtype) != dtype:
            return call  # let FoldConstant handle type promotion we do not mirror
        if static_shape(call) != tuple(np.shape(value)):
            return call
        return relax.const(np.ascontiguousarray(value), dtype)


@tvm.transform.module_pass(opt_level=0, name="FoldConstantsNumpy")
class FoldConstantsNumpy:
    """Fold constant elementwise arithmetic, reshapes, transposes and casts with numpy."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        folder = _ConstantFolder(mod)
        return map_functions(mod, folder.visit_expr, remove_unused=True)
