"""Graph facts, walks and constant evaluation shared by the passes and the planner (no pass lives here).

* :func:`relax_functions` and :func:`map_functions`: the walk over a module's Relax functions,
  written once, that the passes rewrite through (SmoothQuant, WeightOnly and ``strip_qdq`` rewrite
  ``main`` alone); :func:`rewrite_calls` builds an op-for-op rewrite on it;
* :class:`FunctionGraph`: the bindings of one function with the users of each variable;
* facts about one expression (:func:`call_op`, :func:`dtype_of`, :func:`static_shape`) and
  :func:`evaluate_constant`, which recovers constants (integer weights as :class:`QWeight`).

Every pass in :mod:`tvmq.passes` builds on these, as do ``tvmq``'s calibration, metrics and
planner; the layer discovery built on them (chains and :func:`~tvmq.passes.layers.find_layers`)
lives in :mod:`tvmq.passes.layers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax

from tvmq._compat import constant_array, expr_type, is_constant, make_call, tir

__all__ = [
    "relax_functions",
    "map_functions",
    "rewrite_calls",
    "rebind",
    "call_op",
    "dtype_of",
    "static_shape",
    "dims",
    "known_size",
    "out_dtype_attr",
    "bound_constant",
    "rebuild_call",
    "FunctionGraph",
    "QWeight",
    "evaluate_constant",
    "SCALE_PRESERVING_OPS",
    "moves_values",
    "QUANTIZE",
    "DEQUANTIZE",
    "count_ops",
]

QUANTIZE = "relax.quantize"
DEQUANTIZE = "relax.dequantize"

# Ops that move or select elements without changing their values: they commute with
# dequantize, so a quantized tensor can flow through them in integers.
SCALE_PRESERVING_OPS = frozenset(
    {
        "relax.nn.max_pool2d",
        "relax.reshape",
        "relax.permute_dims",
        "relax.flatten",
        "relax.squeeze",
        "relax.expand_dims",
        "relax.strided_slice",
    }
)


def call_op(expr) -> str | None:
    """Name of the operator ``expr`` calls (``"relax.nn.conv2d"``), or None."""
    if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
        return str(expr.op.name)
    return None


def moves_values(expr) -> bool:
    """Whether ``expr`` only moves or selects its input's elements (it commutes with quantize and
    dequantize): one of :data:`SCALE_PRESERVING_OPS`, or a nearest-neighbour resize (an FPN or
    YOLO neck's upsampling; a linear one computes new values)."""
    op = call_op(expr)
    if op in SCALE_PRESERVING_OPS:
        return True
    if op == "relax.image.resize2d":
        attrs = expr.attrs
        return str(attrs.method) == "nearest_neighbor" and not attrs.out_dtype
    return False


def _tensor_type(expr):
    ty = expr_type(expr)
    return ty if hasattr(ty, "dtype") and hasattr(ty, "ndim") else None


def static_shape(expr) -> tuple[int, ...] | None:
    """Shape of a tensor-typed ``expr`` as ints, or None when it is not a tensor or not static."""
    ty = _tensor_type(expr)
    if ty is None or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape.values)
    except (TypeError, ValueError):
        return None


def dims(expr) -> tuple[int | str, ...] | None:
    """Shape of a tensor-typed ``expr``: an int for each static dimension and the printed
    expression for a symbolic one (``(1, 48, 8, "W // 4")``); None when it is not a tensor or its
    rank is unknown. Two tensors with equal ``dims`` have equal shapes for every size."""
    ty = _tensor_type(expr)
    if ty is None or ty.shape is None:
        return None
    return tuple(int(d) if isinstance(d, tir.IntImm) else str(d) for d in ty.shape.values)


def known_size(shape) -> int:
    """Product of the static dimensions of a :func:`dims` shape (symbolic ones count as 1)."""
    return int(np.prod([d for d in shape if isinstance(d, int)] or [1]))


def relax_functions(mod) -> list:
    """``[(global var, function), ...]`` for the Relax functions of ``mod`` (PrimFuncs and
    external functions left out), a snapshot that stays valid while the module is rewritten."""
    return [(gv, func) for gv, func in mod.functions_items() if isinstance(func, relax.Function)]


def map_functions(mod, rewrite, *, builder=None, remove_unused: bool = False):
    """``mod`` with every Relax function ``func`` replaced by ``rewrite(func)``.

    Parameters
    ----------
    mod : IRModule
    rewrite : callable
        ``func -> new function``, or None to leave ``func`` as it is.
    builder : relax.BlockBuilder, optional
        The builder ``rewrite`` emits through (a ``PyExprMutator``'s ``builder_``), when it adds
        functions to the module (``call_te``'s PrimFuncs, ``add_func``): the new functions go into
        it and its module is returned, the added functions with them. Without, the result is a
        copy of ``mod``, or ``mod`` itself when nothing was replaced.
    remove_unused : bool
        Drop the bindings each rewrite left unused.
    """
    out = mod
    for gv, func in relax_functions(mod):
        new = rewrite(func)
        if new is None:
            continue
        if remove_unused:
            new = relax.analysis.remove_all_unused(new)
        if builder is not None:
            builder.update_func(gv, new)
            continue
        if out is mod:
            out = mod.clone()
        out[gv] = new
    return builder.get() if builder is not None else out


def rewrite_pattern(mod, pattern, rewrite):
    """``mod`` with ``relax.dpl.rewrite_call(pattern, rewrite, func)`` applied to each of its Relax
    functions (``mod`` itself where nothing was rewritten)."""
    from tvm.relax.dpl import rewrite_call

    def one(func):
        new = rewrite_call(pattern, rewrite, func)
        return None if new.same_as(func) else new

    return map_functions(mod, one)


@relax.expr_functor.mutator
class _CallRewriter(relax.PyExprMutator):
    def __init__(self, mod, op_name, rewrite):
        super().__init__(mod)
        self.op_name, self.rewrite, self.rewritten = op_name, rewrite, 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call_op(call) != self.op_name:
            return call
        new = self.rewrite(self, call)
        if new is None:
            return call
        self.rewritten += 1
        return new


def rewrite_calls(mod, op_name: str, rewrite):
    """``mod`` with every call of ``op_name`` replaced by ``rewrite(mutator, call)`` (which emits
    through ``mutator.builder_`` and returns the new expression, or None to leave the call alone);
    bindings left unused are dropped. ``mod`` itself when nothing was rewritten."""
    rewriter = _CallRewriter(mod, op_name, rewrite)
    new = map_functions(mod, rewriter.visit_expr, builder=rewriter.builder_, remove_unused=True)
    return new if rewriter.rewritten else mod


def out_dtype_attr(attrs) -> str | None:
    """A call's ``out_dtype`` attribute, or None where it is unset (``""``/``void``: the input's)."""
    dtype = str(attrs.out_dtype)
    return None if dtype in ("", "void", "None") else dtype


def rebind(mutator: relax.PyExprMutator, var, expr):
    """Emit ``expr`` in place of ``var``'s binding, as a dataflow variable or, when ``var`` leaves
    its dataflow block (a function output), as an output; later uses of ``var`` see the new one."""
    if isinstance(var, relax.DataflowVar) or not mutator.builder_.current_block_is_dataflow():
        new = mutator.builder_.emit(expr, var.name)
    else:
        new = mutator.builder_.emit_output(expr, var.name)
    mutator.set_var_remap(var, new)
    return new


def bound_constant(mutator: relax.PyExprMutator, expr) -> np.ndarray | None:
    """numpy value of ``expr`` when it is a constant or a variable a mutator's builder bound to one."""
    if isinstance(expr, relax.Var):
        expr = mutator.lookup_binding(expr)
    return constant_array(expr) if expr is not None and is_constant(expr) else None


def dtype_of(expr) -> str | None:
    """dtype of a tensor-typed ``expr`` (``"float32"``), or None when it is not a tensor."""
    ty = _tensor_type(expr)
    return str(ty.dtype) if ty is not None else None


class FunctionGraph:
    """Bindings of one Relax function, with who uses each variable.

    Works on the original variables, so its answers stay valid while a mutator rewrites
    the function (the mutator keys its decisions on original variables too).
    """

    def __init__(self, func: relax.Function):
        self.func = func
        self.values: dict = {}
        self.order: list = []
        self.users: dict = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    self.values[binding.var] = binding.value
                self.order.append(binding.var)
                value = binding.value if isinstance(binding, relax.VarBinding) else binding.value
                for used in _vars_in(value):
                    self.users.setdefault(used, []).append(binding.var)
        self.output_vars = set(_vars_in(func.body.body))
        for used in self.output_vars:
            self.users.setdefault(used, []).append(None)

    def value(self, var):
        return self.values.get(var) if isinstance(var, relax.Var) else None

    def num_uses(self, var) -> int:
        return len(self.users.get(var, ()))

    def sole_user(self, var):
        users = self.users.get(var, ())
        return users[0] if len(users) == 1 and users[0] is not None else None

    def resolve(self, expr):
        """Follow variable-to-variable bindings (``a = b``) to the expression behind them."""
        while isinstance(expr, relax.Var) and isinstance(self.value(expr), relax.Var):
            expr = self.value(expr)
        return expr

    def root(self, var) -> tuple[object, list]:
        """Walk back through scale-preserving ops: ``(root, [(var, call), ...] root-first)``."""
        path = []
        while isinstance(var, relax.Var):
            value = self.value(var)
            if not moves_values(value) or not isinstance(value.args[0], relax.Var):
                break
            path.append((var, value))
            var = value.args[0]
        return var, path[::-1]


def _vars_in(expr) -> list:
    found = []

    def visit(node):
        if isinstance(node, relax.Var):
            found.append(node)

    relax.analysis.post_order_visit(expr, visit)
    return found


@dataclass(frozen=True, eq=False)
class QWeight:
    """A constant already in integers: ``real = scale * (q - zero_point)`` along ``axis``."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int


def evaluate_constant(expr, lookup):
    """numpy value of a constant expression, or None if it is not one.

    ``lookup(var)`` returns the value bound to a variable (or None). Understands constants,
    reshape / permute_dims / astype / expand_dims / squeeze of them, quantize, and dequantize;
    a dequantize of an integer constant is returned as a :class:`QWeight`, so integer weights
    are recovered exactly instead of being re-derived from floats.
    """
    expr = _bound_value(expr, lookup)
    if is_constant(expr):
        return constant_array(expr)
    op = call_op(expr)
    if op is None:
        return None
    if op == DEQUANTIZE:
        return _evaluate_dequantize(expr, lookup)
    if op == QUANTIZE:
        return _evaluate_quantize(expr, lookup)
    data = evaluate_constant(expr.args[0], lookup)
    if data is None:
        return None
    if op == "relax.permute_dims":
        return _evaluate_permute(expr, data)
    if isinstance(data, QWeight):
        if op == "relax.reshape" and data.scale.ndim == 0:
            return QWeight(data.q.reshape(static_shape(expr)), data.scale, data.zero_point, 0)
        return None
    if op in ("relax.reshape", "relax.expand_dims", "relax.squeeze"):
        shape = static_shape(expr)
        return None if shape is None else data.reshape(shape)
    if op == "relax.astype":
        return data.astype(str(expr.attrs.dtype))
    return None


def _bound_value(expr, lookup):
    """The expression behind a chain of variable bindings (None when one is unbound, or the chain
    is longer than 64)."""
    seen = 0
    while isinstance(expr, relax.Var):
        value = lookup(expr)
        if value is None or seen > 64:
            return None
        expr, seen = value, seen + 1
    return expr


def _qdq_operands(call, lookup) -> tuple | None:
    """The three operands of a quantize / dequantize (data, scale, zero point), evaluated; None
    unless all three are constants and the data is not already a :class:`QWeight`."""
    data, scale, zp = (evaluate_constant(arg, lookup) for arg in call.args[:3])
    if data is None or scale is None or zp is None or isinstance(data, QWeight):
        return None
    return data, scale, zp


def _evaluate_dequantize(call, lookup) -> QWeight | None:
    operands = _qdq_operands(call, lookup)
    if operands is None:
        return None
    q, scale, zp = operands
    if q.dtype.kind not in "iu":
        return None
    return QWeight(q, np.asarray(scale, np.float32), np.asarray(zp, np.int32), int(call.attrs.axis) % max(q.ndim, 1))


def _evaluate_quantize(call, lookup) -> np.ndarray | None:
    operands = _qdq_operands(call, lookup)
    if operands is None:
        return None
    data, scale, zp = operands
    axis = int(call.attrs.axis) % max(data.ndim, 1)
    shape = [1] * data.ndim
    if np.ndim(scale) == 1:
        shape[axis] = -1
    s = np.reshape(scale, shape if np.ndim(scale) == 1 else ()).astype(np.float32)
    z = np.reshape(zp, shape if np.ndim(zp) == 1 else ())
    dtype = str(call.attrs.out_dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(data.astype(np.float32) / s) + z, info.min, info.max).astype(dtype)


def _evaluate_permute(call, data):
    """``permute_dims`` of an evaluated constant; a :class:`QWeight`'s axis follows its channels."""
    axes = call.attrs.axes
    axes = list(range(_ndim(data))[::-1]) if axes is None else [int(a) for a in axes]
    if isinstance(data, QWeight):
        if data.scale.ndim == 0:
            return QWeight(np.transpose(data.q, axes), data.scale, data.zero_point, 0)
        return QWeight(np.transpose(data.q, axes), data.scale, data.zero_point, axes.index(data.axis))
    return np.transpose(data, axes)


def _ndim(x):
    return x.q.ndim if isinstance(x, QWeight) else np.ndim(x)


def count_ops(mod) -> dict[str, int]:
    """``{op name: count}`` over every Relax function of ``mod`` (for tests and reports)."""
    from collections import Counter

    counts = Counter()

    def visit(node):
        op = call_op(node)
        if op is not None:
            counts[op] += 1

    for _, func in relax_functions(mod):
        relax.analysis.post_order_visit(func, visit)
    return counts


def rebuild_call(call, data):
    """``call`` with its first (tensor) argument replaced."""
    return make_call(call, [data, *call.args[1:]])
