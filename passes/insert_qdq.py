"""InsertQDQ: wrap the layers a plan marks int8 in quantize/dequantize pairs.

Runs first in :func:`tvmq.quantize_pipeline`, on the prepared float module (:func:`tvmq.prepare`),
with the plan :func:`tvmq.quantize.calibrate` made (or :func:`~tvmq.passes.strip_qdq` read from a
pre-quantized model); :class:`FoldQDQ` runs next.

After this pass the module is a *fake-quantized* float program: it runs, and its numbers are
what the integer program will compute (up to accumulation order), which makes it the
reference :class:`FoldQDQ` is checked against.

For every int8 layer of the plan:

* each activation input gets ``dequantize(quantize(x))`` with the layer's input parameters.
  The pair is placed at the input's *root* (before any max-pool / reshape / transpose / nearest
  resize between the producer and the layer), so those ops later run on integers too;
* the weight becomes ``dequantize(const int8, per-channel scale, 0, axis)``;
* the output gets ``dequantize(quantize(y))`` when the plan gives output parameters, i.e. when
  an int8 layer reads it.

And a concat that only int8 layers read has its parts quantized instead (see
:func:`_quantized_concat_parts`), so that it joins integers.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq._compat import TensorType
from tvmq.plan import QuantPlan
from tvmq.qparams import QParams, quantize_weight, sixteen_bits

from .graph import FunctionGraph, call_op, dims, dtype_of, map_functions, moves_values, rebuild_call
from .layers import find_layers

__all__ = ["InsertQDQ"]


def qparams_args(qp: QParams):
    return relax.const(qp.scale, "float32"), relax.const(qp.zero_point, "int32")


@relax.expr_functor.mutator
class _Inserter(relax.PyExprMutator):
    def __init__(self, mod, func, plan: QuantPlan, mask=None, switches=None, fp16_switch=False, widths=None,
                 tensors=None, wide=()):
        super().__init__(mod)
        self.mask, self.switches, self.fp16_switch = mask, switches or {}, fp16_switch
        self.wide = set(wide)  # sensitivity mode: layers with a 16-bit-activation branch
        self.widths, self.tensors = widths, tensors or {}  # sensitivity mode: range factor per quantized tensor
        self.graph = FunctionGraph(func)
        self.anchors = {}
        self.outputs = {}
        self.corrections = {}
        for layer in find_layers(func, self.graph):
            lp = plan.get(layer.name)
            if lp is None or lp.kind != layer.kind:
                continue
            if lp.precision == "fp16" and layer.kind != "add" and mask is None:
                self.anchors[layer.chain.anchor] = (layer, lp)  # computed in fp16, accumulated in fp32
                continue
            if not lp.is_int8:
                continue
            self.anchors[layer.chain.anchor] = (layer, lp)
            # With switches, a layer's output parameters are modelled by its int8 consumers'
            # input Q/DQ (same parameters): a float consumer then sees the float output, as
            # in the compiled program where the producer's plan has no output parameters.
            if lp.output is not None and mask is None:
                self.outputs[layer.output] = lp.output
            if lp.bias_correction is not None and layer.kind != "add" and mask is None:
                key = layer.chain.bias_var if layer.chain.bias_var is not None else layer.chain.anchor
                self.corrections[key] = (layer, np.asarray(lp.bias_correction, np.float32))
        self.memo = {}
        self.concat_parts, self.stepped = ({}, set()) if mask is not None else _quantized_concat_parts(self.graph, func, plan)

    def _emit_like(self, var, expr, suffix=""):
        """Emit ``expr`` as a variable of the same kind (dataflow or not) as ``var``."""
        name = f"{var.name}{suffix}" if hasattr(var, "name") else ""
        if isinstance(var, relax.DataflowVar) or not self.builder_.current_block_is_dataflow():
            return self.builder_.emit(expr, name)
        return self.builder_.emit_output(expr, name)

    def _select(self, switch, fp32, branches):
        """The branch ``mask[switch]`` selects: ``branches[code]`` (1 int8, 2 fp16, 3 int8 with
        16-bit activations; None where the layer has no such branch), else fp32."""
        flag = self.builder_.emit(relax.op.take(self.mask, relax.const(np.int32(switch), "int32"), axis=0, mode="clip"))
        out = fp32
        for code, branch in branches.items():
            if branch is None:
                continue
            chosen = self.builder_.emit(relax.op.logical_and(
                relax.op.greater(flag, relax.const(np.float32(code - 0.5), "float32")),
                relax.op.less(flag, relax.const(np.float32(code + 0.5), "float32"))))
            out = self.builder_.emit(relax.op.where(chosen, branch, out))
        return out

    def _half_call(self, call, layer):
        """The anchor ``call`` on fp16 operands with an fp32 result (fp32 accumulation)."""
        data = self.builder_.emit(relax.op.astype(self.visit_expr(layer.inputs[0]), "float16"))
        weight = relax.const(layer.weight.astype(np.float16), "float16")
        return _with_out_dtype(call, [data, weight], "float32")

    def _switched_layer(self, var, layer, lp, call, switch):
        """Sensitivity mode: the layer computed in int8 (fake-quantized), in fp32 and, with
        fp16 candidates, on fp16-rounded operands, one picked by the mask. Every branch keeps
        a constant weight, so each compiles to the same packed kernels as the float model."""
        if layer.kind == "add":
            quantized = [self._quantized_input(x, qp) for x, qp in zip(layer.inputs, lp.inputs)]
            y_q = self.builder_.emit(relax.Call(call.op, quantized, call.attrs))
            y_f = self.builder_.emit(relax.Call(call.op, [self.visit_expr(x) for x in layer.inputs], call.attrs))
            return self._emit_like(var, self._select(switch, y_f, {1: y_q}))
        wq, wqp = self._weight(layer, lp)
        x = self.visit_expr(layer.inputs[0])

        def quantized(qp):
            w = wqp.dequantize(wq)
            if qp.per_channel:  # the simulation reads real values: the channels' scales come out again
                w = w / channel_scaled_weight(layer, qp.scale, np.ones_like(layer.weight))
            w = relax.const(w.astype(np.float32), "float32")
            y = self.builder_.emit(relax.Call(call.op, [self._quantized_input(layer.inputs[0], qp), w], call.attrs))
            if lp.bias_correction is not None:
                shape = [1] * len(layer.chain.out_shape)
                shape[layer.chain.channel_axis] = -1
                corr = np.asarray(lp.bias_correction, np.float32).reshape(shape)
                y = self.builder_.emit(relax.op.add(y, relax.const(corr, "float32")))
            return y

        y_q = quantized(lp.inputs[0])
        y_w = quantized(sixteen_bits(lp.inputs[0])) if layer.name in self.wide else None
        y_f = self.builder_.emit(relax.Call(call.op, [x, relax.const(layer.weight, "float32")], call.attrs))
        y_h = None
        if self.fp16_switch:
            x_h = self.builder_.emit(relax.op.astype(self.builder_.emit(relax.op.astype(x, "float16")), "float32"))
            w_h = relax.const(layer.weight.astype(np.float16).astype(np.float32), "float32")
            y_h = self.builder_.emit(relax.Call(call.op, [x_h, w_h], call.attrs))
        return self._emit_like(var, self._select(switch, y_f, {1: y_q, 2: y_h, 3: y_w}))

    @staticmethod
    def _weight(layer, lp):
        """The int8 weight and its parameters (a pre-quantized model's own, when they fit). With
        an input quantized per channel, the weight quantized is ``W[o, c] * s[c]``
        (:func:`channel_scaled_weight`): the layer reads that input in integer steps."""
        wq = None
        if lp.inputs and lp.inputs[0].per_channel and layer.kind != "add":
            return quantize_weight(channel_scaled_weight(layer, lp.inputs[0].scale), layer.weight_axis)
        if lp.weight is not None:
            wqp = lp.weight
            wq = wqp.quantize(layer.weight) if not wqp.per_channel or wqp.axis == layer.weight_axis else None
        if wq is None:
            wq, wqp = quantize_weight(layer.weight, layer.weight_axis)
        return wq, wqp

    def _fake_quant(self, expr, qp: QParams, like=None, width_index=None):
        scale, zp = qparams_args(qp)
        if width_index is not None:  # the range scaled by widths[width_index] (the zero point stays where it is)
            factor = relax.op.take(self.widths, relax.const(np.int32(width_index), "int32"), axis=0, mode="clip")
            scale = self.builder_.emit(relax.op.multiply(scale, factor))
        q = self.builder_.emit(relax.op.quantize(expr, scale, zp, axis=qp.axis, out_dtype=qp.dtype))
        dq = relax.op.dequantize(q, scale, zp, axis=qp.axis)
        if qp.per_channel and self.mask is None:
            # in integer steps (scale 1, the channels' shared zero point): what the layers reading
            # it take, their weights scaled by the channels' scales (see _weight)
            dq = relax.op.dequantize(q, relax.const(np.float32(1.0), "float32"),
                                     relax.const(np.int32(qp.zero_point.reshape(-1)[0]), "int32"))
        return self.builder_.emit(dq) if like is None else self._emit_like(like, dq, "_dq")

    def _quantized_input(self, x, qp: QParams):
        key = (x, qp.key())
        if key in self.memo:
            return self.memo[key]
        root, path = self.graph.root(x)
        root_key = (root, qp.key())
        if root_key not in self.memo and root in self.stepped:
            self.memo[root_key] = self.visit_expr(root)  # a concat of parts already in integer steps
        if root_key not in self.memo:
            self.memo[root_key] = self._fake_quant(self.visit_expr(root), qp, width_index=self.tensors.get(root))
        cur = self.memo[root_key]
        for _, call in path:
            visited = self.visit_expr(call)
            cur = self.builder_.emit(rebuild_call(visited, cur))
        self.memo[key] = cur
        return cur

    def visit_var_binding_(self, binding):
        var = binding.var
        if var in self.anchors:
            layer, lp = self.anchors[var]
            call = binding.value
            if lp.precision == "fp16":
                self.set_var_remap(var, self._emit_like(var, self._half_call(call, layer)))
                return
            if layer.name in self.switches:
                self.set_var_remap(var, self._switched_layer(var, layer, lp, call, self.switches[layer.name]))
                return
            if layer.kind == "add":
                args = [self._quantized_input(x, qp) for x, qp in zip(layer.inputs, lp.inputs)]
            else:
                wq, wqp = self._weight(layer, lp)
                scale, zp = qparams_args(wqp)
                weight = relax.op.dequantize(relax.const(wq, "int8"), scale, zp, axis=wqp.axis)
                args = [self._quantized_input(layer.inputs[0], lp.inputs[0]), self.builder_.emit(weight)]
            new = self._emit_like(var, relax.Call(call.op, args, call.attrs))
            self.set_var_remap(var, new)
        elif var in self.corrections and self.corrections[var][0].chain.bias_var is not None:
            layer, corr = self.corrections[var]  # the bias add: bias + correction
            chain = layer.chain
            shape = [1] * len(chain.out_shape)
            shape[chain.channel_axis] = -1
            bias = (chain.bias + corr).reshape(shape)
            self.set_var_remap(var, self._emit_like(var, relax.op.add(self.visit_expr(chain.anchor), relax.const(bias, "float32"))))
        else:
            super().visit_var_binding_(binding)
        if var in self.corrections and self.corrections[var][0].chain.bias_var is None:
            layer, corr = self.corrections[var]  # no bias to correct: add one
            shape = [1] * len(layer.chain.out_shape)
            shape[layer.chain.channel_axis] = -1
            self.set_var_remap(var, self._emit_like(var, relax.op.add(self.visit_expr(var), relax.const(corr.reshape(shape), "float32"))))
        if var in self.concat_parts:
            self.set_var_remap(var, self._fake_quant(self.visit_expr(var), self.concat_parts[var], var))
        if var in self.outputs:
            qp = self.outputs[var]
            dq = self._fake_quant(self.visit_expr(var), qp, var)
            self.memo[(var, qp.key())] = dq
            self.set_var_remap(var, dq)


def _quantized_concat_parts(graph: FunctionGraph, func, plan: QuantPlan) -> tuple[dict, set]:
    """The parts of concats that can be quantized before the concat: ``({part var: QParams}, {the
    concats whose parts are then all in integer steps})``.

    A concat whose every reader is an int8 layer quantizing it with the same parameters ``q``
    has its parts quantized with ``q`` instead, where the concat is all that reads them (directly
    or through max-pools, nearest resizes, reshapes and slices: an SPP pyramid, an FPN's
    upsampling). Quantizing is elementwise and monotonic, so
    ``quantize(concat(a, maxpool(b))) == concat(quantize(a), maxpool(quantize(b)))``: the numbers
    stay the same, but the producers (a conv's epilogue, a SiLU) write int8 instead of float and
    the concat and the pools move int8 values (CSP blocks, SPP, YOLO and FPN necks).
    Parameters per channel along the concat's axis are split among the parts; the parts are
    then in integer steps (see :meth:`_Inserter._fake_quant`) and the concat is not quantized
    again.
    """
    reads: dict = {}  # root -> {binding reading it on the way to an int8 layer: its parameters}
    for layer in find_layers(func, graph):
        lp = plan.get(layer.name)
        if lp is None or lp.kind != layer.kind or not lp.is_int8 or len(lp.inputs) != len(layer.inputs):
            continue
        for x, qp in zip(layer.inputs, lp.inputs):
            root, path = graph.root(x)
            if all(graph.num_uses(v) == 1 for v, _ in path[:-1]):  # no step of the way read by anything else
                reads.setdefault(root, {})[path[0][0] if path else layer.chain.anchor] = qp

    def only_into(var, concat, depth=0) -> bool:
        """Whether everything that reads ``var`` ends in ``concat`` (through value-moving ops)."""
        users = graph.users.get(var, [])
        return bool(users) and depth < 16 and all(
            u == concat or (u is not None and moves_values(graph.value(u))
                            and graph.value(u).args[0] == var and only_into(u, concat, depth + 1))
            for u in users)

    out, stepped = {}, set()
    for var, value in graph.values.items():
        if call_op(value) != "relax.concat" or not isinstance(value.args[0], relax.Tuple) or var not in reads:
            continue
        users = set(graph.users.get(var, []))
        if not users or not users <= set(reads[var]):
            continue  # something reads the concat in float
        qps = {reads[var][u].key(): reads[var][u] for u in users}
        qp = next(iter(qps.values()))
        if len(qps) != 1:
            continue
        if qp.per_channel:
            parts = _channel_parts(graph, value, qp)
            if parts is not None and all(only_into(root, var) for root in parts):
                out.update(parts)
                stepped.add(var)
            continue
        for part in value.args[0].fields:
            root = graph.root(part)[0]
            if root in graph.values and dtype_of(root) == "float32" and only_into(root, var):
                out[root] = qp
    return out, stepped


def _channel_parts(graph: FunctionGraph, concat, qp: QParams) -> dict | None:
    """``{part: its channels' parameters}`` for a concat along ``qp``'s (per-channel) axis whose
    parts are float tensors reaching it directly or through max-pools and resizes (which keep
    each channel where it is); None when one is not."""
    shape = dims(concat)
    axis = int(concat.attrs.axis) % len(shape)
    if axis != qp.axis % len(shape):
        return None
    out, start = {}, 0
    for part in concat.args[0].fields:
        root, path = graph.root(part)
        width = (dims(part) or [None] * len(shape))[axis]
        if (not isinstance(width, int) or root not in graph.values or dtype_of(root) != "float32" or root in out
                or any(call_op(call) not in _CHANNEL_KEEPING for _, call in path)):
            return None
        out[root] = QParams(qp.scale[start:start + width], qp.zero_point[start:start + width], qp.dtype, qp.axis)
        start += width
    return out if start == qp.scale.size else None


_CHANNEL_KEEPING = ("relax.nn.max_pool2d", "relax.image.resize2d")


@tvm.transform.module_pass(opt_level=0, name="InsertQDQ")
class InsertQDQ:
    """Insert quantize/dequantize pairs for the int8 layers of ``plan``.

    Parameters
    ----------
    plan : QuantPlan
        Layer name -> precision and tensor parameters (see :func:`tvmq.calibrate`).
        Layers the plan does not name, or names fp32, are left untouched.
    """

    def __init__(self, plan: QuantPlan):
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        def insert(func):
            inserter = _Inserter(mod, func, self.plan)
            return inserter.visit_expr(func) if inserter.anchors else None

        return map_functions(mod, insert, remove_unused=True)


def _with_out_dtype(call, args, out_dtype):
    """A conv2d / matmul ``call`` on new ``args`` with another result dtype."""
    attrs = call.attrs
    if call.op.name == "relax.matmul":
        return relax.op.matmul(args[0], args[1], out_dtype=out_dtype)
    return relax.op.nn.conv2d(args[0], args[1], strides=attrs.strides, padding=attrs.padding, dilation=attrs.dilation,
                              groups=attrs.groups, data_layout=attrs.data_layout, kernel_layout=attrs.kernel_layout,
                              out_layout=attrs.out_layout, out_dtype=out_dtype)


def insert_switchable_qdq(mod: tvm.IRModule, plan: QuantPlan, fp16: bool = False, wide=()):
    """The fake-quantized module with every int8 layer's Q/DQ behind a switch.

    ``main`` takes two more inputs. ``tvmq_mask`` (float32, one entry per switchable layer):
    layer ``i`` is int8 where ``mask[i]`` is 1 and float where it is 0 (with ``fp16``, 2 runs
    it on fp16-rounded operands; for the layers named in ``wide``, 3 quantizes its input to
    16 bits instead), so one compiled module simulates any mix of precisions.
    ``tvmq_widths`` (float32, one entry per quantized activation tensor, in the order of
    :func:`quantized_tensors`): the factor each tensor's calibrated range is scaled by (1: as
    calibrated; below 1 clips it), so one module also simulates any choice of ranges.
    Returns ``(module, layer names)``.
    """
    func = mod["main"]
    names = [name for name, lp in plan.layers.items() if lp.is_int8]
    tensors = {root: i for i, root in enumerate(quantized_tensors(func, plan))}
    mask = relax.Var("tvmq_mask", TensorType((len(names),), "float32"))
    widths = relax.Var("tvmq_widths", TensorType((max(len(tensors), 1),), "float32"))
    inserter = _Inserter(mod, func, plan, mask=mask, switches={n: i for i, n in enumerate(names)}, fp16_switch=fp16,
                         widths=widths, tensors=tensors, wide=wide)
    body = inserter.visit_expr(func)
    new = relax.Function([*func.params, mask, widths], body.body, body.ret_ty, func.is_pure, func.attrs)
    new = relax.analysis.remove_all_unused(new)
    if new.attrs and "num_input" in new.attrs:
        new = new.with_attr("num_input", len(func.params) + 2)
    out = mod.clone()
    out["main"] = new
    return relax.transform.Normalize()(out), names


def quantized_tensors(func, plan: QuantPlan) -> dict:
    """The activation tensors ``plan``'s int8 layers read, in the order the layers come, each
    with the names of the int8 layers reading it: the roots their inputs are quantized at
    (:meth:`FunctionGraph.root`), which is what calibration observes and gives one set of
    parameters each."""
    graph = FunctionGraph(func)
    readers = {}
    for layer in find_layers(func, graph):
        lp = plan.get(layer.name)
        if lp is None or lp.kind != layer.kind or not lp.is_int8:
            continue
        for x in layer.inputs:
            names = readers.setdefault(graph.root(x)[0], [])
            if layer.name not in names:
                names.append(layer.name)
    return readers


def channel_scaled_weight(layer, scale: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """``weight`` (default: the layer's) with each input channel's weights multiplied by its
    activation scale ``scale[c]``: an NHWC conv2d's OHWI weight (grouped or not) or a matmul's
    ``[K, N]`` weight."""
    w = np.asarray(layer.weight if weight is None else weight, np.float64)
    scale = np.asarray(scale, np.float64)
    if layer.kind == "matmul":
        return (w * scale[:, None]).astype(np.float32)
    per_group = w.shape[3]
    groups = scale.size // per_group
    index = (np.arange(w.shape[0]) // (w.shape[0] // groups))[:, None] * per_group + np.arange(per_group)[None]
    return (w * scale[index][:, None, None, :]).astype(np.float32)


def weight_qparams(weight: np.ndarray, axis: int) -> QParams:
    """Per-channel weight parameters InsertQDQ will use (for reports and manifests)."""
    return quantize_weight(weight, axis)[1]
