"""Layer discovery: the chains and layers of a float graph that tvmq may quantize.

A *chain* is an anchor (conv2d, matmul or a two-input add) followed by the single-use epilogue
that an integer kernel absorbs: an optional per-channel bias add, then an optional relu / relu6 /
clip (an :class:`Activation`). A *layer* is a chain of the float graph that tvmq may quantize
(:func:`find_layers`); its name comes from the ONNX node that produced the anchor.

Used by the passes that rewrite layers (InsertQDQ, FoldQDQ, SmoothQuant, WeightOnly,
``strip_qdq``; ConvertToNHWC and PackKernels use :class:`Activation`) and by the planner and
calibration in ``tvmq`` (``quantize``, ``sensitivity``). Built on the generic walks and constant
evaluation of :mod:`tvmq.passes.graph`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from tvm import relax

from tvmq._compat import scalar_arg, var_name

from .graph import FunctionGraph, QWeight, call_op, dims, dtype_of, evaluate_constant, known_size

__all__ = ["Activation", "Chain", "Layer", "find_chains", "find_layers", "channel_vector"]

CONV2D = "relax.nn.conv2d"
MATMUL = "relax.matmul"
ADD = "relax.add"

_GENERIC_NAME = re.compile(r"^(lv|gv)\d*$")


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
    out_shape: tuple[int | str, ...]  # passes.graph.dims: str for a symbolic dimension
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
        shape = dims(var)
        if shape is None or not shape or not isinstance(shape[_channel_axis(kind, call, len(shape))], int):
            continue
        if kind == "add" and any(evaluate_constant(a, lookup) is not None for a in call.args):
            continue  # an add with a constant operand is a bias, not a residual
        chain = Chain(kind, var, call, _channel_axis(kind, call, len(shape)), shape)
        cur = var
        if kind != "add":
            user = graph.sole_user(cur)
            if user is not None and call_op(graph.value(user)) == ADD:
                bias = _bias_operand(graph.value(user), cur, lookup)
                if bias is not None and dims(user) == shape:
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
        inputs = sum(known_size(dims(x) or ()) for x in self.inputs)
        return inputs + known_size(self.chain.out_shape)

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
        return known_size(shape)

    @property
    def depthwise(self) -> bool:
        """A grouped conv2d with one input channel per group."""
        if self.kind != "conv2d" or int(self.chain.call.attrs.groups) == 1:
            return False
        return self.weight.shape[str(self.chain.call.attrs.kernel_layout).index("I")] == 1

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the anchor (0 for adds)."""
        return known_size(self.chain.out_shape) * self.reduction


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
            if not float_tensor(data) or w is None or w.ndim != 2 or dims(data) is None:
                continue
            layer = Layer("", chain, (data,), w, 1)
        else:
            lhs, rhs = call.args
            if not (float_tensor(lhs) and float_tensor(rhs)) or dims(lhs) != dims(rhs):
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
