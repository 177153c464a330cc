"""Export a plan as a standard ONNX QDQ model that ONNX Runtime (or any QDQ consumer) runs.

Each int8 layer of the plan becomes what ``quantize_static`` would write: its activation input
wrapped in ``QuantizeLinear -> DequantizeLinear`` with the plan's parameters, its weights stored
as int8 (per output channel, symmetric) behind ``DequantizeLinear``, its bias as int32 with scale
``input_scale * weight_scale``, and its output wrapped again when the plan quantizes it.

Layers are matched to ONNX nodes by kind and order (the importer keeps ONNX's topological
order): Conv <-> conv2d, Gemm/MatMul with a constant weight <-> matmul, Add of two tensors <-> add.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tvmq.errors import TvmqError
from tvmq.plan import QuantPlan
from tvmq.qparams import QParams, quantize_weight

__all__ = ["export_qdq", "with_opset_13", "onnx_constants"]


def onnx_constants(model) -> dict:
    """``{name: array}`` of an ONNX model's initializers and Constant-node values."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _fold_into_conv(model, consts) -> None:
    """Fold each Conv's following BatchNormalization and constant bias Add into the Conv, as tvmq's
    import does, so the exported weights, bias and output Q/DQ are those of the integer program
    (quantizing the unfolded weights with the folded weights' scales would be wrong)."""
    from onnx import numpy_helper

    graph_outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    removed = set()
    for conv in list(model.graph.node):
        has_bias = len(conv.input) > 2 and conv.input[2]
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in consts or (
                has_bias and conv.input[2] not in consts):
            continue
        w = consts[conv.input[1]].astype(np.float64)
        b = consts[conv.input[2]].astype(np.float64) if has_bias else np.zeros(w.shape[0])
        folded = False
        while conv.output[0] not in graph_outputs and len(consumers.get(conv.output[0], [])) == 1:
            user = consumers[conv.output[0]][0]
            if user.op_type == "BatchNormalization" and len(user.output) == 1 and all(i in consts for i in user.input[1:5]):
                gamma, beta, mean, var = (consts[i].astype(np.float64) for i in user.input[1:5])
                eps = next((a.f for a in user.attribute if a.name == "epsilon"), 1e-5)
                k = gamma / np.sqrt(var + eps)
                w, b = w * k.reshape(-1, *[1] * (w.ndim - 1)), (b - mean) * k + beta
            elif user.op_type == "Add" and len(user.input) == 2 and sum(i in consts for i in user.input) == 1:
                c = consts[next(i for i in user.input if i in consts)]
                channel = c.ndim - (w.ndim - 1)  # (C, 1, 1) or (1, C, 1, 1) against an NCHW output
                if channel < 0 or c.shape[channel] != w.shape[0] or c.size != w.shape[0]:
                    break
                b = b + c.reshape(-1).astype(np.float64)
            else:
                break
            conv.output[0] = user.output[0]
            removed.add(id(user))
            folded = True
        if folded:
            name = conv.name or conv.output[0]
            for value, suffix in ((w, "weight"), (b, "bias")):
                tensor = f"{name}_tvmq_folded_{suffix}"
                model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), tensor))
                consts[tensor] = value.astype(np.float32)
            del conv.input[1:]
            conv.input.extend([f"{name}_tvmq_folded_weight", f"{name}_tvmq_folded_bias"])
    if removed:
        kept = [n for n in model.graph.node if id(n) not in removed]
        del model.graph.node[:]
        model.graph.node.extend(kept)


def with_opset_13(model):
    """Per-channel DequantizeLinear (its ``axis``) needs opset 13: older models are converted with
    ONNX's version converter, which rewrites the ops whose signature changed since."""
    import onnx
    from onnx import version_converter

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= 13:
        return model
    try:
        converted = version_converter.convert_version(model, 13)
        onnx.checker.check_model(converted)
    except Exception as err:  # pylint: disable=broad-except
        raise TvmqError(f"the model's opset {opset} is older than 13, which per-channel QDQ needs, and ONNX's version "
                        f"converter failed on it ({str(err).splitlines()[0][:200]}); convert the model to opset 13+ "
                        "first") from None
    return converted


def _onnx_layers(model, consts) -> list[tuple[str, object]]:
    """``[(kind, node)]`` of the ONNX nodes tvmq sees as layers, in graph order."""
    out = []
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in consts:
            out.append(("conv2d", node))
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) >= 2 and node.input[1] in consts \
                and consts[node.input[1]].ndim == 2:
            out.append(("matmul", node))
        elif node.op_type == "Add" and len(node.input) == 2 and not any(i in consts for i in node.input):
            out.append(("add", node))
    return out


class _Writer:
    def __init__(self, model, consts):
        from onnx import helper, numpy_helper

        self.h, self.nh = helper, numpy_helper
        self.model, self.consts = model, consts
        self.new_nodes: dict[str, list] = {}  # tensor -> nodes inserted after it is produced
        self.rename: dict[tuple[str, str], str] = {}  # (consumer node name, input) -> replacement
        self.wrapped: dict[tuple[str, bytes], str] = {}
        self.counter = 0

    def init(self, name, value):
        self.model.graph.initializer.append(self.nh.from_array(np.asarray(value), name))
        return name

    def fake_quant(self, tensor: str, qp: QParams) -> str:
        """Q/DQ after ``tensor``; returns the dequantized tensor's name (shared per params).
        Parameters per channel are written per tensor, covering every channel's range (ONNX
        Runtime's quantized kernels take activations per tensor)."""
        qp = qp.covering()
        key = (tensor, qp.key()[2] + qp.key()[3] + qp.dtype.encode())
        if key in self.wrapped:
            return self.wrapped[key]
        self.counter += 1
        base = f"{tensor}_tvmq{self.counter}"
        dtype = np.uint8 if qp.dtype == "uint8" else np.int8
        s = self.init(f"{base}_scale", np.float32(qp.scale))
        z = self.init(f"{base}_zero_point", dtype(int(qp.zero_point)))
        nodes = [
            self.h.make_node("QuantizeLinear", [tensor, s, z], [f"{base}_q"], name=f"{base}_QuantizeLinear"),
            self.h.make_node("DequantizeLinear", [f"{base}_q", s, z], [f"{base}_dq"], name=f"{base}_DequantizeLinear"),
        ]
        self.new_nodes.setdefault(tensor, []).extend(nodes)
        self.wrapped[key] = f"{base}_dq"
        return f"{base}_dq"

    def weight(self, node, index, w: np.ndarray, axis: int, given: QParams | None):
        if given is not None and (not given.per_channel or given.axis == axis):
            q, qp = given.quantize(w), given
        else:
            q, qp = quantize_weight(w, axis)
        self.counter += 1
        base = f"{node.name or node.output[0]}_w_tvmq{self.counter}"
        qi = self.init(f"{base}_quantized", q.astype(np.int8))
        s = self.init(f"{base}_scale", qp.scale.astype(np.float32))
        z = self.init(f"{base}_zero_point", np.zeros(qp.scale.shape, np.int8))
        dq = self.h.make_node("DequantizeLinear", [qi, s, z], [f"{base}_dq"], name=f"{base}_DequantizeLinear",
                              axis=axis if qp.per_channel else 1)
        self.new_nodes.setdefault("", []).append(dq)
        node.input[index] = f"{base}_dq"
        return qp

    def bias(self, node, index, b: np.ndarray, scale: np.ndarray):
        self.counter += 1
        base = f"{node.name or node.output[0]}_b_tvmq{self.counter}"
        scale = np.broadcast_to(scale, b.shape).astype(np.float32)
        bq = self.init(f"{base}_quantized", np.round(b.astype(np.float64) / scale).astype(np.int32))
        s = self.init(f"{base}_scale", scale)
        z = self.init(f"{base}_zero_point", np.zeros(b.shape, np.int32))
        dq = self.h.make_node("DequantizeLinear", [bq, s, z], [f"{base}_dq"], name=f"{base}_DequantizeLinear", axis=0)
        self.new_nodes.setdefault("", []).append(dq)
        node.input[index] = f"{base}_dq"

    def finish(self):
        nodes = list(self.new_nodes.get("", []))
        for tensor in [i.name for i in self.model.graph.input]:
            nodes += self.new_nodes.get(tensor, [])
        for node in self.model.graph.node:
            for i, name in enumerate(node.input):
                node.input[i] = self.rename.get((node.name, name), name)
            nodes.append(node)
            for out in node.output:
                nodes += self.new_nodes.get(out, [])
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)
        used = {i for n in nodes for i in n.input}
        kept = [t for t in self.model.graph.initializer if t.name in used]  # float weights now replaced
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(kept)


def export_qdq(model_path, plan: QuantPlan, out_path, layer_names: list[str]) -> dict:
    """Write ``model_path`` with ``plan``'s quantization as QDQ ONNX to ``out_path``.

    ``layer_names`` are tvmq's layer names in graph order (``find_layers`` on the imported
    model), used to pair plan entries with ONNX nodes. Returns counts of what was written.
    """
    import onnx

    from tvmq.frontend import name_nodes, read_onnx
    from tvmq.onnx_rewrites import fold_constant_subgraphs

    model = with_opset_13(read_onnx(model_path))
    # Constant subgraphs become initializers, as on import: PaddlePaddle's conv biases arrive as
    # Add(conv, Reshape(bias)), which is then a bias, not a layer.
    fold_constant_subgraphs(model)
    name_nodes(model)
    consts = onnx_constants(model)
    _fold_into_conv(model, consts)
    onnx_layers = _onnx_layers(model, consts)
    kinds = [plan.layers[n].kind for n in layer_names]
    if [k for k, _ in onnx_layers] != kinds:
        raise TvmqError(
            "cannot match the plan's layers to the model's ONNX nodes "
            f"({len(kinds)} layers, {len(onnx_layers)} candidate nodes); export from the model the plan was made for"
        )
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    w = _Writer(model, consts)
    written = 0
    for name, (kind, node) in zip(layer_names, onnx_layers):
        lp = plan.layers[name]
        if not lp.is_int8:
            continue
        written += 1
        _write_layer(w, kind, node, lp, consts, consumers)
    w.finish()
    model.producer_name = "tvmq"
    onnx.checker.check_model(model)
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".part")
    onnx.save(model, str(tmp))
    tmp.replace(out_path)
    return {"int8_layers": written, "layers": len(layer_names)}


def _write_layer(w: _Writer, kind: str, node, lp, consts: dict, consumers: dict[str, list]) -> None:
    """Q/DQ around one int8 layer's ONNX node: its inputs, weight and bias, and its chain's output."""
    if kind == "add":
        for i, qp in enumerate(lp.inputs):
            node.input[i] = w.fake_quant(node.input[i], qp)
    else:
        x_qp = lp.inputs[0].covering()
        node.input[0] = w.fake_quant(node.input[0], x_qp)
        weight = consts[node.input[1]].astype(np.float32)
        axis = 0
        if kind == "matmul":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
            axis = 0 if trans_b else 1
        wqp = w.weight(node, 1, weight, axis, lp.weight)
        if len(node.input) > 2 and node.input[2] in consts and node.op_type in ("Conv", "Gemm"):
            w.bias(node, 2, consts[node.input[2]], np.float64(x_qp.scale) * wqp.scale.astype(np.float64))
    end = _chain_end(node, consts, consumers)
    if lp.output is not None:
        tensor = end.output[0]
        dq = w.fake_quant(tensor, lp.output)
        for user in consumers.get(tensor, []):
            w.rename[(user.name, tensor)] = dq


def _chain_end(node, consts: dict, consumers: dict[str, list]):
    """The chain end in ONNX: a following Relu/Clip (or bias Add for MatMul) that solely consumes it."""
    end = node
    for _ in range(2):
        users = consumers.get(end.output[0], [])
        if len(users) == 1 and users[0].op_type in ("Relu", "Clip") or (
            len(users) == 1 and end.op_type == "MatMul" and users[0].op_type == "Add"
            and any(i in consts for i in users[0].input)
        ):
            end = users[0]
        else:
            break
    return end
