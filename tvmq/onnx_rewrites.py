"""ONNX graph rewrites done before TVM's importer sees a model, in place on the ``ModelProto``.

:func:`tvmq.frontend.load_onnx` runs them after fixing the input shapes: first
:func:`rewrite_qlinear_ops` (QLinear / Integer ops into QDQ form, which the importer reads and
FoldQDQ turns back into integer kernels), then :func:`resolve_dynamic_reshapes` (only with dynamic
dimensions: a ``Reshape`` target computed from them becomes a constant with ``0``/``-1``), then
:func:`fold_constant_subgraphs` (shape arithmetic evaluated into initializers, so a ``Reshape``
fed by it imports; needs the static shapes). After
them come the LSTM unrolling (:mod:`tvmq.recurrent`) and the import itself.
:func:`tvmq.export.export_qdq` folds the same way before matching layers to nodes.
"""

from __future__ import annotations

import numpy as np

from tvmq.errors import TvmqError

__all__ = ["QLINEAR_OPS", "value_dims", "fold_constant_subgraphs", "rewrite_qlinear_ops", "resolve_dynamic_reshapes"]

# Ops whose constant instances are evaluated in ONNX before import (shape arithmetic).
_FOLDABLE = frozenset(
    {
        "Shape", "Cast", "Transpose", "Slice", "Concat", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Add", "Sub",
        "Mul", "Div", "Range", "ConstantOfShape", "Equal", "Where", "Expand", "Identity", "ReduceProd",
        "Floor", "Ceil", "Max", "Min", "Neg", "Abs", "Not", "And", "Or", "Less", "Greater", "Size",
    }
)
_FOLD_LIMIT = 1 << 16  # elements: shape math, not weights

QLINEAR_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")


def value_dims(value_info) -> list:
    """The dims of an ONNX value: ints where static, the dim's name (or ``"?"``) where not."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?") for d in t.shape.dim]


# ----------------------------------------------------------------------------- constant folding
def fold_constant_subgraphs(model, max_rounds: int = 16):
    """Evaluate small constant subgraphs (shape arithmetic) into initializers.

    Needs static input shapes (so ``Shape`` nodes are constant). Repeats until nothing changes:
    a folded ``Reshape`` target lets ONNX shape inference see through, which makes the next
    ``Shape`` constant. Returns the number of nodes folded.
    """
    total = 0
    for _ in range(max_rounds):
        folded = _fold_once(model)
        total += folded
        if not folded:
            break
    return total


def _static_shapes(model) -> dict[str, list[int]]:
    """``{value name: dims}`` of the values whose shape ONNX shape inference finds static."""
    import onnx

    # Stale value_info (exporters write dynamic dims there) would win over what the static
    # input shapes now imply, so inference starts from a copy without it.
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # shape inference is best effort here
        inferred = probe
    static = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = value_dims(vi)
        if dims and all(isinstance(d, int) for d in dims):
            static[vi.name] = dims
    return static


def _evaluate(node, consts, opset):
    """``node``'s single output, run by ONNX's reference evaluator on constant inputs; or None."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    try:
        single = helper.make_model(
            helper.make_graph(
                [node],
                "fold",
                [],
                [helper.make_empty_tensor_value_info(o) for o in node.output],
                initializer=[numpy_helper.from_array(consts[i], i) for i in node.input if i],
            ),
            opset_imports=opset,
        )
        outs = ReferenceEvaluator(single).run(None, {})
        if len(outs) == 1 and np.asarray(outs[0]).size <= _FOLD_LIMIT:
            return np.asarray(outs[0])
    except Exception:  # leave the node to TVM
        return None
    return None


def _constant_value(node, consts, static, opset):
    """What ``node`` computes if it is constant (and small), else None."""
    from onnx import numpy_helper

    if node.op_type == "Constant" and len(node.output) == 1:
        try:
            return numpy_helper.to_array(node.attribute[0].t) if node.attribute and node.attribute[0].name == "value" else None
        except Exception:
            return None
    if node.op_type == "Shape" and node.input[0] in static and len(node.attribute) == 0:
        return np.asarray(static[node.input[0]], dtype=np.int64)
    if node.op_type in _FOLDABLE and node.input and all(i == "" or i in consts for i in node.input):
        if all(consts[i].size <= _FOLD_LIMIT for i in node.input if i):
            return _evaluate(node, consts, opset)
    return None


def _fold_once(model):
    from onnx import numpy_helper

    static = _static_shapes(model)
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    keep, new_inits, folded = [], [], 0
    opset = [o for o in model.opset_import]
    for node in model.graph.node:
        value = _constant_value(node, consts, static, opset)
        if value is not None and len(node.output) == 1:
            consts[node.output[0]] = value
            new_inits.append(numpy_helper.from_array(value, node.output[0]))
            folded += node.op_type != "Constant"
        else:
            keep.append(node)
    if folded:
        used = {i for n in keep for i in n.input} | {o.name for o in model.graph.output}
        del model.graph.node[:]
        model.graph.node.extend(keep)
        model.graph.initializer.extend([t for t in new_inits if t.name in used])
        # Drop now-unused initializers produced by folding chains.
        live = [t for t in model.graph.initializer if t.name in used or t.name in {i.name for i in model.graph.input}]
        del model.graph.initializer[:]
        model.graph.initializer.extend(live)
    return folded


def resolve_dynamic_reshapes(model, dims: dict[str, tuple[int, ...]]) -> int:
    """Give each ``Reshape`` whose target is computed from dynamic shapes a constant target, in
    ONNX's own terms: ``0`` copies the input's dimension, ``-1`` is inferred (TVM's importer reads
    only constant targets). The target is evaluated at three sizes of every dynamic dimension
    (smallest, middle, largest; on its steps): an entry equal at all three is a constant, one that
    follows the input's dimension at the same axis is ``0``, and the one other entry is ``-1``. Returns the number of reshapes rewritten; a target
    that needs more than one inferred entry is a :class:`TvmqError` naming the node."""
    import onnx
    from onnx import numpy_helper

    if not dims:
        return 0
    inits = {i.name for i in model.graph.initializer}
    consts = inits | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    targets = [n for n in model.graph.node if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] not in consts]
    if not targets:
        return 0
    probes = []
    probe = {name: _probe_sizes(bounds) for name, bounds in dims.items()}
    for pick in range(3):  # the smallest, a middle and the largest size of every dimension
        sizes = {name: three[pick] for name, three in probe.items()}
        static = onnx.ModelProto.FromString(model.SerializeToString())
        for inp in static.graph.input:
            for d in inp.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in sizes:
                    d.dim_value = sizes[d.dim_param]
        fold_constant_subgraphs(static)
        folded = {i.name: numpy_helper.to_array(i) for i in static.graph.initializer}
        shapes = _static_shapes(static)
        probes.append((folded, shapes))
    rewritten = 0
    for node in targets:
        got = [(f.get(node.input[1]), s.get(node.input[0])) for f, s in probes]
        if any(t is None or x is None for t, x in got):
            continue  # not shape arithmetic of the inputs alone: left to the importer
        values = [t.tolist() for t, _ in got]
        if len({len(v) for v in values}) != 1:
            raise TvmqError(f"Reshape {node.name!r} changes its rank with the dynamic dimensions; fix them with --shape")
        target = []
        for i, entry in enumerate(zip(*values)):
            if len(set(entry)) == 1:
                target.append(entry[0])
            elif all(i < len(x) and e == x[i] for e, (_, x) in zip(entry, got)):
                target.append(0)  # ONNX: copy the input's dimension
            else:
                target.append(-1)
        if target.count(-1) > 1:
            raise TvmqError(f"Reshape {node.name!r} has a target shape that depends on the dynamic dimensions "
                            f"({' / '.join(map(str, values))} at three sizes) in a way tvmq cannot express; "
                            "fix those dimensions with --shape")
        name = f"{node.name}_dynamic_target"
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(target, np.int64), name))
        node.input[1] = name
        rewritten += 1
    if rewritten:
        _drop_dead_nodes(model)
    return rewritten


def _probe_sizes(bounds) -> tuple[int, int, int]:
    """The smallest, a middle and the largest size of ``(lo, hi)`` or ``(lo, hi, step)``, each a
    multiple of the step."""
    lo, hi, step = (*bounds, 1)[:3]
    first, last = -(-lo // step) * step, hi // step * step
    return first, min(last, first + ((last - first) // 2 // step + 1) * step), last


def _drop_dead_nodes(model) -> None:
    """Remove nodes (and initializers) nothing reads any more."""
    outputs = {o.name for o in model.graph.output}
    nodes = list(model.graph.node)
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


# ----------------------------------------------------------------------------- QLinear ops
def rewrite_qlinear_ops(model) -> int:
    """Rewrite QLinearConv / QLinearMatMul / ConvInteger / MatMulInteger into QDQ form.

    TVM's importer does not read the QLinear ops (and reads the Integer ops as float math);
    ``DequantizeLinear -> Conv/MatMul -> QuantizeLinear`` is the same computation, which
    FoldQDQ turns into integer kernels again. The Integer ops (int32 results) become
    ``DequantizeLinear`` with scale 1 around the float op and a Cast back to int32. Returns the
    number of nodes rewritten.
    """
    from onnx import numpy_helper

    nodes, count = [], 0
    inits = model.graph.initializer
    one = None
    for node in model.graph.node:
        if node.op_type not in QLINEAR_OPS or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        count += 1
        if node.op_type in ("QLinearConv", "QLinearMatMul"):
            nodes += _qlinear_as_qdq(node)
        else:
            if one is None:
                one = f"{node.name}_one"
                inits.append(numpy_helper.from_array(np.asarray(1.0, np.float32), one))
            nodes += _integer_as_qdq(node, one)
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return count


def _qlinear_as_qdq(node) -> list:
    """QLinearConv / QLinearMatMul as ``DequantizeLinear -> Conv/MatMul -> QuantizeLinear``."""
    from onnx import helper

    n = node.name
    ins = list(node.input) + [""] * 8
    x, xs, xz, w, ws, wz, ys, yz = ins[:8]
    op = "Conv" if node.op_type == "QLinearConv" else "MatMul"
    w_axis = 0 if op == "Conv" else 1
    nodes = [
        helper.make_node("DequantizeLinear", [x, xs, xz], [f"{n}_x"], name=f"{n}_dqx"),
        helper.make_node("DequantizeLinear", [w, ws, wz], [f"{n}_w"], name=f"{n}_dqw", axis=w_axis),
    ]
    conv_in = [f"{n}_x", f"{n}_w"]
    if op == "Conv" and ins[8]:
        nodes += [
            helper.make_node("Mul", [xs, ws], [f"{n}_bs"], name=f"{n}_bscale"),
            helper.make_node("DequantizeLinear", [ins[8], f"{n}_bs"], [f"{n}_b"], name=f"{n}_dqb"),
        ]
        conv_in.append(f"{n}_b")
    core = helper.make_node(op, conv_in, [f"{n}_y"], name=n)
    core.attribute.extend([a for a in node.attribute])
    return nodes + [core, helper.make_node("QuantizeLinear", [f"{n}_y", ys, yz], [node.output[0]], name=f"{n}_q")]


def _integer_as_qdq(node, one: str) -> list:
    """ConvInteger / MatMulInteger (int32 = sum((x - xz) * (w - wz))) as scale-1 dequantize, the
    float op, and a Cast back to int32; ``one`` names the scale-1 initializer."""
    from onnx import TensorProto, helper

    n = node.name
    x, w, xz, wz = (list(node.input) + [""] * 8)[:4]
    op = "Conv" if node.op_type == "ConvInteger" else "MatMul"
    dqx = [x, one] + ([xz] if xz else [])
    dqw = [w, one] + ([wz] if wz else [])
    core = helper.make_node(op, [f"{n}_x", f"{n}_w"], [f"{n}_y"], name=n)
    core.attribute.extend([a for a in node.attribute])
    return [
        helper.make_node("DequantizeLinear", dqx, [f"{n}_x"], name=f"{n}_dqx"),
        helper.make_node("DequantizeLinear", dqw, [f"{n}_w"], name=f"{n}_dqw"),
        core,
        helper.make_node("Cast", [f"{n}_y"], [node.output[0]], name=f"{n}_cast", to=TensorProto.INT32),
    ]
