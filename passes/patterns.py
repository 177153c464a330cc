"""Graph facts shared by the passes and the planner.

A *chain* is an anchor (conv2d, matmul or a two-input add) followed by the single-use
epilogue that an integer kernel absorbs: an optional per-channel bias add, then an optional
relu / relu6 / clip. A *layer* is a chain of the float graph that tvmq may quantize; its name
comes from the ONNX node that produced the anchor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from tvm import relax

from tvmq._compat import constant_array, expr_type, is_constant, make_call, scalar_arg, var_name

__all__ = [
    "call_op",
    "FunctionGraph",
    "QWeight",
    "Activation",
    "Chain",
    "Layer",
    "find_chains",
    "find_layers",
    "evaluate_constant",
    "channel_vector",
    "SCALE_PRESERVING_OPS",
    "count_ops",
]

CONV2D = "relax.nn.conv2d"
MATMUL = "relax.matmul"
ADD = "relax.add"
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

_GENERIC_NAME = re.compile(r"^(lv|gv)\d*$")


def call_op(expr) -> str | None:
    """Name of the operator ``expr`` calls (``"relax.nn.conv2d"``), or None."""
    if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
        return str(expr.op.name)
    return None


def _tensor_type(expr):
    ty = expr_type(expr)
    return ty if hasattr(ty, "dtype") and hasattr(ty, "ndim") else None


def static_shape(expr) -> tuple[int, ...] | None:
    ty = _tensor_type(expr)
    if ty is None or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape.values)
    except (TypeError, ValueError):
        return None


def rewrite_functions(rewriter: relax.PyExprMutator, mod, remove_unused: bool = False):
    """``mod`` with every Relax function passed through ``rewriter`` (a PyExprMutator made on it);
    ``remove_unused`` drops the bindings the rewrite left unused."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            new = rewriter.visit_expr(func)
            rewriter.builder_.update_func(gv, relax.analysis.remove_all_unused(new) if remove_unused else new)
    return rewriter.builder_.get()


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
    new = rewrite_functions(rewriter, mod, remove_unused=True)
    return new if rewriter.rewritten else mod


def out_dtype_attr(attrs) -> str | None:
    """A call's ``out_dtype`` attribute, or None where it is unset (``""``/``void``: the input's)."""
    dtype = str(attrs.out_dtype)
    return None if dtype in ("", "void", "None") else dtype


def bound_constant(mutator: relax.PyExprMutator, expr) -> np.ndarray | None:
    """numpy value of ``expr`` when it is a constant or a variable a mutator's builder bound to one."""
    if isinstance(expr, relax.Var):
        expr = mutator.lookup_binding(expr)
    return constant_array(expr) if expr is not None and is_constant(expr) else None


def dtype_of(expr) -> str | None:
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
            if call_op(value) not in SCALE_PRESERVING_OPS or not isinstance(value.args[0], relax.Var):
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
    seen = 0
    while isinstance(expr, relax.Var):
        value = lookup(expr)
        if value is None or seen > 64:
            return None
        expr, seen = value, seen + 1
    if is_constant(expr):
        return constant_array(expr)
    op = call_op(expr)
    if op is None:
        return None
    args = expr.args
    if op == DEQUANTIZE:
        q = evaluate_constant(args[0], lookup)
        scale = evaluate_constant(args[1], lookup)
        zp = evaluate_constant(args[2], lookup)
        if q is None or scale is None or zp is None or isinstance(q, QWeight):
            return None
        if q.dtype.kind not in "iu":
            return None
        return QWeight(q, np.asarray(scale, np.float32), np.asarray(zp, np.int32), int(expr.attrs.axis) % max(q.ndim, 1))
    if op == QUANTIZE:
        data = evaluate_constant(args[0], lookup)
        scale = evaluate_constant(args[1], lookup)
        zp = evaluate_constant(args[2], lookup)
        if data is None or scale is None or zp is None or isinstance(data, QWeight):
            return None
        axis = int(expr.attrs.axis) % max(data.ndim, 1)
        shape = [1] * data.ndim
        if np.ndim(scale) == 1:
            shape[axis] = -1
        s = np.reshape(scale, shape if np.ndim(scale) == 1 else ()).astype(np.float32)
        z = np.reshape(zp, shape if np.ndim(zp) == 1 else ())
        dtype = str(expr.attrs.out_dtype)
        info = np.iinfo(dtype)
        return np.clip(np.round(data.astype(np.float32) / s) + z, info.min, info.max).astype(dtype)
    data = evaluate_constant(args[0], lookup)
    if data is None:
        return None
    if op == "relax.permute_dims":
        axes = expr.attrs.axes
        axes = list(range(_ndim(data))[::-1]) if axes is None else [int(a) for a in axes]
        if isinstance(data, QWeight):
            if data.scale.ndim == 0:
                return QWeight(np.transpose(data.q, axes), data.scale, data.zero_point, 0)
            return QWeight(np.transpose(data.q, axes), data.scale, data.zero_point, axes.index(data.axis))
        return np.transpose(data, axes)
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


def _ndim(x):
    return x.q.ndim if isinstance(x, QWeight) else np.ndim(x)


def channel_vector(value: np.ndarray, out_shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """A bias-like constant as a per-channel vector, or None if it varies along other axes."""
    value = np.asarray(value)
    if value.ndim > len(out_shape):
        return None
    aligned = (1,) * (len(out_shape) - value.ndim) + value.shape
    channels = out_shape[axis]
    for i, d in enumerate(aligned):
        if d != 1 and (i != axis or d != channels):
            return None
    flat = value.reshape(aligned)
    index = tuple(slice(None) if i == axis else 0 for i in range(len(aligned)))
    return np.broadcast_to(flat[index], (channels,)).copy()


@dataclass(frozen=True)
class Activation:
    """The clamp an epilogue applies: relu is ``(0, inf)``, relu6 and clip are bounded."""

    kind: str
    lo: float
    hi: float

    @classmethod
    def of(cls, call) -> "Activation | None":
        op = call_op(call)
        if op == "relax.nn.relu":
            return cls("relu", 0.0, float("inf"))
        if op == "relax.nn.relu6":
            return cls("relu6", 0.0, 6.0)
        if op == "relax.clip":
            return cls("clip", scalar_arg(call.args[1]), scalar_arg(call.args[2]))
        return None

    def intersect(self, other: "Activation") -> "Activation":
        lo, hi = max(self.lo, other.lo), min(self.hi, other.hi)
        if lo == 0.0 and hi == float("inf"):
            return Activation("relu", lo, hi)
        return Activation("clip", lo, hi)

    def apply(self, expr):
        if self.kind == "relu":
            return relax.op.nn.relu(expr)
        return relax.op.clip(expr, self.lo, self.hi)


@dataclass(eq=False)
class Chain:
    kind: str  # "conv2d" | "matmul" | "add"
    anchor: relax.Var
    call: relax.Call
    channel_axis: int
    out_shape: tuple[int, ...]
    bias_var: relax.Var | None = None
    bias: np.ndarray | None = None  # per output channel
    act_var: relax.Var | None = None
    act: Activation | None = None

    @property
    def end(self):
        for var in (self.act_var, self.bias_var):
            if var is not None:
                return var
        return self.anchor

    @property
    def vars(self) -> list:
        return [v for v in (self.anchor, self.bias_var, self.act_var) if v is not None]


def _anchor_kind(call) -> str | None:
    op = call_op(call)
    if op == CONV2D:
        attrs = call.attrs
        if (str(attrs.data_layout), str(attrs.kernel_layout)) in (("NCHW", "OIHW"), ("NHWC", "OHWI")):
            return "conv2d"
        return None
    if op == MATMUL:
        return "matmul"
    if op == ADD:
        return "add"
    return None


def _channel_axis(kind: str, call, ndim: int) -> int:
    if kind == "conv2d":
        return str(call.attrs.out_layout or call.attrs.data_layout).index("C")
    return ndim - 1


def find_chains(graph: FunctionGraph, accept=None, lookup=None) -> list[Chain]:
    """Every anchor with the epilogue it can absorb, in binding order.

    ``accept(kind, call)`` filters anchors; ``lookup`` resolves variables to values when
    evaluating bias constants (defaults to the graph's own bindings).
    """
    lookup = lookup or graph.value
    chains = []
    for var in graph.order:
        call = graph.value(var)
        kind = _anchor_kind(call)
        if kind is None or (accept is not None and not accept(kind, call)):
            continue
        shape = static_shape(var)
        if shape is None or not shape:
            continue
        if kind == "add" and any(evaluate_constant(a, lookup) is not None for a in call.args):
            continue  # an add with a constant operand is a bias, not a residual
        chain = Chain(kind, var, call, _channel_axis(kind, call, len(shape)), shape)
        cur = var
        if kind != "add":
            user = graph.sole_user(cur)
            if user is not None and call_op(graph.value(user)) == ADD:
                bias = _bias_operand(graph.value(user), cur, lookup)
                if bias is not None and static_shape(user) == shape:
                    vec = channel_vector(bias, shape, chain.channel_axis)
                    if vec is not None:
                        chain.bias_var, chain.bias, cur = user, vec.astype(np.float32), user
        user = graph.sole_user(cur)
        while user is not None:  # clamps compose: relu then clip(lo, hi) is one clamp
            act = Activation.of(graph.value(user))
            if act is None:
                break
            chain.act = act if chain.act is None else chain.act.intersect(act)
            chain.act_var, cur = user, user
            user = graph.sole_user(cur)
        chains.append(chain)
    return chains


def _bias_operand(add_call, anchor_var, lookup):
    """The constant operand of ``anchor + c`` / ``c + anchor``, evaluated, else None."""
    lhs, rhs = add_call.args
    other = rhs if lhs.same_as(anchor_var) else lhs if rhs.same_as(anchor_var) else None
    if other is None:
        return None
    value = evaluate_constant(other, lookup)
    if value is None or isinstance(value, QWeight) or value.dtype.kind != "f":
        return None
    return value


@dataclass(eq=False)
class Layer:
    """A quantizable chain of the float graph, with the name users refer to it by."""

    name: str
    chain: Chain
    inputs: tuple  # activation operands of the anchor (vars)
    weight: np.ndarray | None = None
    weight_axis: int = 0  # output-channel axis of the weight
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.chain.kind

    @property
    def output(self):
        return self.chain.end

    @property
    def io_elements(self) -> int:
        """Elements of the activation inputs and of the output (what precision changes convert)."""
        inputs = sum(int(np.prod(static_shape(x) or ())) for x in self.inputs)
        return inputs + int(np.prod(self.chain.out_shape))

    @property
    def reduction(self) -> int:
        """Multiply-accumulates per output element: input channels (per group) x kernel taps
        of a conv2d, the inner dimension of a matmul; 0 for adds."""
        if self.weight is None:
            return 0
        return self.weight.size // self.weight.shape[self.weight_axis]

    @property
    def pixels(self) -> int:
        """Output pixels (conv2d, batch included) or rows (matmul) the anchor computes: its
        output elements per output channel."""
        shape = list(self.chain.out_shape)
        if self.kind == "conv2d" and str(self.chain.call.attrs.data_layout) != "NHWC":
            shape = shape[:1] + shape[2:]
        else:
            shape = shape[:-1]
        return int(np.prod(shape))

    @property
    def depthwise(self) -> bool:
        """A grouped conv2d with one input channel per group."""
        if self.kind != "conv2d" or int(self.chain.call.attrs.groups) == 1:
            return False
        return self.weight.shape[str(self.chain.call.attrs.kernel_layout).index("I")] == 1

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the anchor (0 for adds)."""
        return int(np.prod(self.chain.out_shape)) * self.reduction


def find_layers(func: relax.Function, graph: FunctionGraph | None = None) -> list[Layer]:
    """The float conv2d / matmul / add layers tvmq knows how to quantize, named and ordered."""
    graph = graph or FunctionGraph(func)

    def float_tensor(expr) -> bool:
        return dtype_of(expr) == "float32" and evaluate_constant(expr, graph.value) is None

    def const_float(expr):
        value = evaluate_constant(expr, graph.value)
        if value is None or isinstance(value, QWeight) or value.dtype != np.float32:
            return None
        return value

    layers, taken = [], {}
    for chain in find_chains(graph):
        call = chain.call
        if chain.kind == "conv2d":
            data, weight = call.args
            w = const_float(weight)
            if not float_tensor(data) or w is None or w.ndim != 4 or call.attrs.out_dtype not in (None, "", "float32"):
                continue
            layer = Layer("", chain, (data,), w, 0)
        elif chain.kind == "matmul":
            data, weight = call.args
            w = const_float(weight)
            if not float_tensor(data) or w is None or w.ndim != 2 or static_shape(data) is None:
                continue
            layer = Layer("", chain, (data,), w, 1)
        else:
            lhs, rhs = call.args
            if not (float_tensor(lhs) and float_tensor(rhs)) or static_shape(lhs) != static_shape(rhs):
                continue
            layer = Layer("", chain, (lhs, rhs))
        names = [var_name(v) for v in chain.vars]
        base = next((n for n in names if n and not _GENERIC_NAME.match(n)), f"{chain.kind}_{len(layers)}")
        name, n = base, 1
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken[name] = True
        layer.name = name
        layers.append(layer)
    return layers


def count_ops(mod) -> dict[str, int]:
    """``{op name: count}`` over every Relax function of ``mod`` (for tests and reports)."""
    from collections import Counter

    counts = Counter()
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):

            def visit(node):
                op = call_op(node)
                if op is not None:
                    counts[op] += 1

            relax.analysis.post_order_visit(func, visit)
    return counts


def rebuild_call(call, data):
    """``call`` with its first (tensor) argument replaced."""
    return make_call(call, [data, *call.args[1:]])
