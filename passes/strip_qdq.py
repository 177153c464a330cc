"""Read a pre-quantized (QDQ / QAT) model's quantization into a plan, leaving a float graph.

A model quantized elsewhere (ONNX Runtime's ``quantize_static``, PyTorch PT2E export, QAT)
arrives with ``QuantizeLinear``/``DequantizeLinear`` pairs whose scales were chosen (or
learned) there, and with int8 weights behind ``DequantizeLinear``. tvmq honours them exactly:
this pass removes the pairs, records each one's parameters, and returns

* the float graph (weights dequantized: ``scale * (q - zero_point)``, exactly representable, so
  re-quantizing with the same scale gives back the same integers), and
* a :class:`~tvmq.plan.QuantPlan` whose layers carry those activation and weight parameters,

which the usual pipeline (layout conversion, :class:`InsertQDQ`, :class:`FoldQDQ`) compiles into
the same integer kernels as a calibrated model. Layers the source model left in float stay float.

Not a pass, but the step before :func:`tvmq.prepare` for a model that :func:`has_qdq`: the
plan it returns takes the place of calibration, and :class:`InsertQDQ` puts the pairs back
where the integer kernels need them.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from tvmq.plan import LayerPlan, QuantPlan
from tvmq.qparams import QParams

from .graph import DEQUANTIZE, QUANTIZE, FunctionGraph, QWeight, call_op, dtype_of, evaluate_constant, rebind
from .layers import find_layers

__all__ = ["strip_qdq", "has_qdq"]


def has_qdq(mod) -> bool:
    """Whether ``mod`` holds quantize/dequantize ops (a pre-quantized model)."""
    from .graph import count_ops

    counts = count_ops(mod)
    return counts.get(QUANTIZE, 0) + counts.get(DEQUANTIZE, 0) > 0


def _symmetric(w: QWeight) -> QParams | None:
    """Weight parameters as symmetric int8 (what the integer kernels take), when exact.

    Exporters that treat weights as activations (Constant nodes) write uint8 with a zero
    point; ``q - zero_point`` is the same weight as a symmetric int8 value when it fits in
    [-127, 127]. Otherwise None, and the weights are re-quantized per channel.
    """
    shape = [1] * w.q.ndim
    if w.zero_point.ndim == 1:
        shape[w.axis] = -1
    centered = w.q.astype(np.int64) - (w.zero_point.reshape(shape) if w.zero_point.ndim == 1 else w.zero_point)
    if centered.min() < -127 or centered.max() > 127:
        return None
    return _qparams(w.scale, np.zeros_like(w.scale, dtype=np.int32), "int8", w.axis if w.scale.ndim == 1 else -1)


def _qparams(scale, zp, dtype, axis) -> QParams | None:
    try:
        return QParams(np.asarray(scale, np.float32), np.asarray(zp).astype(np.int32), dtype, int(axis))
    except ValueError:
        return None


@relax.expr_functor.mutator
class _Stripper(relax.PyExprMutator):
    def __init__(self, mod, graph: FunctionGraph):
        super().__init__(mod)
        self.graph = graph
        self.activations: dict = {}  # float var -> QParams of the pair that wrapped it
        self.weights: dict = {}  # dequantize var of a weight -> QParams
        self.unhandled = 0

    def visit_var_binding_(self, binding):
        var, value = binding.var, binding.value
        if call_op(value) == DEQUANTIZE:
            data, scale_e, zp_e = value.args
            scale = evaluate_constant(scale_e, self.graph.value)
            zp = evaluate_constant(zp_e, self.graph.value)
            const = evaluate_constant(value, self.graph.value)
            if isinstance(const, QWeight):  # int8 weights or int32 bias: back to float
                if const.q.dtype != np.int32:
                    self.weights[var] = (_symmetric(const), const.q)
                shape = [1] * const.q.ndim
                if const.scale.ndim == 1:
                    shape[const.axis] = -1
                s = const.scale.reshape(shape) if const.scale.ndim == 1 else const.scale
                z = const.zero_point.reshape(shape) if const.zero_point.ndim == 1 else const.zero_point
                real = ((const.q.astype(np.int64) - z) * s.astype(np.float64)).astype(np.float32)
                rebind(self, var, relax.const(real, "float32"))
                return
            inner = self.graph.value(data) if isinstance(data, relax.Var) else None
            if call_op(inner) == QUANTIZE and scale is not None and zp is not None:
                q_scale = evaluate_constant(inner.args[1], self.graph.value)
                q_zp = evaluate_constant(inner.args[2], self.graph.value)
                same = (
                    q_scale is not None and q_zp is not None and np.array_equal(q_scale, scale)
                    and np.array_equal(q_zp, zp) and int(inner.attrs.axis) == int(value.attrs.axis)
                )
                qp = _qparams(scale, zp, dtype_of(data), value.attrs.axis) if same else None
                if qp is not None and not qp.per_channel:
                    # The pair saturates to the representable range (exporters drop a Relu or
                    # Clip that this saturation makes redundant), so it becomes that clip.
                    lo = float((qp.qmin - int(qp.zero_point)) * float(qp.scale))
                    hi = float((qp.qmax - int(qp.zero_point)) * float(qp.scale))
                    clipped = rebind(self, var, relax.op.clip(self.visit_expr(inner.args[0]), lo, hi))
                    self.activations[clipped] = qp
                    return
            qp = _qparams(scale, zp, dtype_of(data), value.attrs.axis) if scale is not None and zp is not None else None
            if qp is not None and not qp.per_channel and not isinstance(inner, relax.Call):
                # An integer tensor entering the graph (a model input, or a QLinear op's output):
                # the dequantize stays, and its parameters are the tensor's.
                super().visit_var_binding_(binding)
                self.activations[self.visit_expr(var)] = qp
                return
            self.unhandled += 1
        super().visit_var_binding_(binding)


def strip_qdq(mod):
    """``(float module, QuantPlan)`` from a module with Q/DQ pairs (see the module docstring)."""
    func = mod["main"]
    graph = FunctionGraph(func)
    stripper = _Stripper(mod, graph)
    new_func = relax.analysis.remove_all_unused(stripper.visit_expr(func))
    new_mod = mod.clone()
    new_mod["main"] = new_func
    new_mod = relax.transform.Normalize()(new_mod)

    # Quantized activations are keyed by the original float variables; the stripped function
    # keeps those objects for bindings it did not rewrite, so layers can be matched to them.
    stripped = FunctionGraph(new_mod["main"])
    acts = stripper.activations
    weight_by_anchor = {}
    for anchor_var, value in graph.values.items():
        if call_op(value) in ("relax.nn.conv2d", "relax.matmul"):
            src, perms = value.args[1], []
            for _ in range(4):  # the weight may pass through a transpose first (Gemm transB)
                if src in stripper.weights:
                    qp = stripper.weights[src][0]
                    for axes in reversed(perms if qp is not None else []):  # follow the channel axis
                        qp = QParams(qp.scale, qp.zero_point, qp.dtype, axes.index(qp.axis) if qp.per_channel else -1)
                    weight_by_anchor[anchor_var] = qp  # None: quantized, but not as symmetric int8
                    break
                v = graph.value(src)
                if call_op(v) != "relax.permute_dims" or not isinstance(v.args[0], relax.Var):
                    break
                n = len(v.args[0].ty.shape.values)
                perms.append(list(range(n))[::-1] if v.attrs.axes is None else [int(a) for a in v.attrs.axes])
                src = v.args[0]
    layers = {}
    for layer in find_layers(new_mod["main"], stripped):
        inputs = [acts.get(stripped.root(x)[0]) for x in layer.inputs]
        weight = weight_by_anchor.get(layer.chain.anchor)
        if any(q is None for q in inputs) or (layer.kind != "add" and layer.chain.anchor not in weight_by_anchor):
            layers[layer.name] = LayerPlan(kind=layer.kind, precision="fp32")
            continue
        layers[layer.name] = LayerPlan(
            kind=layer.kind, precision="int8", inputs=tuple(inputs), output=acts.get(layer.output), weight=weight
        )
    # Pairs no int8 layer absorbs (around float ops: hard-swish, softmax, the output) still
    # round their tensor in the source model; keep that rounding, as float arithmetic.
    used = set()
    for layer in find_layers(new_mod["main"], stripped):
        if layers[layer.name].is_int8:
            used.update(stripped.root(x)[0] for x in layer.inputs)
            used.add(layer.output)
    rounding = {v: qp for v, qp in acts.items() if v not in used}
    if rounding:
        rounder = _Rounder(new_mod, rounding)
        new_mod = new_mod.clone()
        new_mod["main"] = rounder.visit_expr(new_mod["main"])
    shapes = {p.name: [int(d) for d in p.ty.shape.values] for p in new_mod["main"].params}
    dtypes = {q.dtype for q in acts.values()}
    # Float requantization rounds half to even, as ONNX Runtime's integer kernels do.
    plan = QuantPlan(layers=layers, input_shapes=shapes, method="qdq",
                     activation_dtype=dtypes.pop() if len(dtypes) == 1 else "uint8", requantize="float")
    return new_mod, plan


@relax.expr_functor.mutator
class _Rounder(relax.PyExprMutator):
    """Replace the clamp a pair became by the full fake-quantization (clamp and rounding)."""

    def __init__(self, mod, rounding):
        super().__init__(mod)
        self.rounding = rounding

    def visit_var_binding_(self, binding):
        qp = self.rounding.get(binding.var)
        if qp is None:
            return super().visit_var_binding_(binding)
        x = self.visit_expr(binding.value.args[0])
        s, z = float(qp.scale), float(qp.zero_point)
        t = self.builder_.emit(relax.op.divide(x, relax.const(np.float32(s), "float32")))
        t = self.builder_.emit(relax.op.round(t))
        t = self.builder_.emit(relax.op.clip(t, qp.qmin - z, qp.qmax - z))
        expr = relax.op.multiply(t, relax.const(np.float32(s), "float32"))
        var = binding.var
        if isinstance(var, relax.DataflowVar):
            new = self.builder_.emit(expr, var.name)
        else:
            new = self.builder_.emit_output(expr, var.name)
        self.set_var_remap(var, new)
