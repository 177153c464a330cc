"""ONNX import: static shapes, named layers, and the frontend workarounds TVM 0.27 needs.

``load_onnx`` returns a float Relax module whose bindings are named after the ONNX nodes that
produced them (TVM's importer names everything ``lv``), so layer names in plans, reports and
``--keep-float`` globs are the names users see in Netron.

Workarounds (each covered by a test):

* TVM's importer turns ``Slice`` of a constant into a runtime ``strided_slice``; a ``Reshape``
  fed by such a shape computation (Paddle2ONNX's Shape -> Cast -> Slice -> Cast -> Concat ->
  Reshape) then fails with "Reshape requires the input new shape to be Shape". tvmq folds
  constant shape subgraphs in ONNX, with onnx's reference evaluator, before import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tvmq.calibrate import InputSpec
from tvmq.errors import TvmqError

__all__ = ["ModelInfo", "load_onnx", "read_onnx", "parse_shape_arg", "fold_constant_subgraphs", "is_prequantized",
           "rewrite_qlinear_ops"]

log = logging.getLogger("tvmq")

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}

# Ops whose constant instances are evaluated in ONNX before import (shape arithmetic).
_FOLDABLE = frozenset(
    {
        "Shape", "Cast", "Transpose", "Slice", "Concat", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Add", "Sub",
        "Mul", "Div", "Range", "ConstantOfShape", "Equal", "Where", "Expand", "Identity", "ReduceProd",
        "Floor", "Ceil", "Max", "Min", "Neg", "Abs", "Not", "And", "Or", "Less", "Greater", "Size",
    }
)
_FOLD_LIMIT = 1 << 16  # elements: shape math, not weights


@dataclass(frozen=True)
class ModelInfo:
    """What the artifact records about the imported model."""

    inputs: tuple[InputSpec, ...]
    outputs: tuple[InputSpec, ...]
    opset: int
    producer: str
    float_ops: tuple[str, ...]  # op types that never run in int8 (reported, not an error)


def parse_shape_arg(text: str) -> tuple[str, list[int]]:
    """``NAME:1,3,48,192`` -> ``("NAME", [1, 3, 48, 192])``."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        shape = []
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise TvmqError(f"--shape {text!r} is not NAME:D0,D1,... with positive integers, e.g. --shape input:1,3,48,192")
    return name, shape


def read_onnx(path: str | Path):
    """Load and sanity-check an ONNX file, refusing external data outside its folder."""
    import onnx
    from onnx import external_data_helper

    path = Path(path)
    if not path.exists():
        raise TvmqError(f"model file {path} does not exist; check the path")
    if path.is_dir():
        raise TvmqError(f"{path} is a directory; pass the .onnx file inside it")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError and others
        raise TvmqError(f"{path} is not a readable ONNX model ({type(err).__name__}); re-export it") from None
    if not model.graph.node and not model.graph.output:
        raise TvmqError(f"{path} holds no ONNX graph; is it really an .onnx file?")
    base = path.resolve().parent
    for tensor in external_data_helper._get_all_tensors(model):  # pylint: disable=protected-access
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if os.path.isabs(location) or base not in target.parents:
            raise TvmqError(
                f"{path}: tensor {tensor.name!r} points at external data {location!r} outside the model's "
                "folder; refusing to read it (move the data file next to the model)"
            )
        if not target.exists():
            raise TvmqError(f"{path}: external data file {location!r} is missing; copy it next to the model")
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as err:
        raise TvmqError(f"{path}: cannot read external data ({err}); re-export the model") from None
    return model


def _dims(value_info) -> list:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?") for d in t.shape.dim]


def _graph_inputs(model):
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _static_inputs(model, shapes: dict[str, list[int]]) -> list[InputSpec]:
    specs = []
    names = [i.name for i in _graph_inputs(model)]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise TvmqError(f"--shape names unknown input(s) {unknown}; the model's inputs are {names}")
    for inp in _graph_inputs(model):
        elem = inp.type.tensor_type.elem_type
        dtype = _ONNX_DTYPES.get(elem)
        if dtype is None:
            raise TvmqError(f"input {inp.name!r} has unsupported element type {elem}; tvmq takes numeric tensors")
        dims = _dims(inp)
        if inp.name in shapes:
            shape = list(shapes[inp.name])
            if dims and len(dims) != len(shape):
                raise TvmqError(
                    f"--shape {inp.name} has {len(shape)} dims but the model's input has {len(dims)} ({dims})"
                )
            for want, got in zip(dims, shape):
                if isinstance(want, int) and want != got:
                    raise TvmqError(f"--shape {inp.name}:{','.join(map(str, shape))} conflicts with the model's static shape {dims}")
        else:
            if not dims or any(not isinstance(d, int) for d in dims):
                example = ",".join(str(d) if isinstance(d, int) else "1" for d in dims) or "1,3,224,224"
                raise TvmqError(
                    f"input {inp.name!r} has dynamic shape {dims}; fix it with --shape {inp.name}:{example} "
                    "(or give calibration data, whose shape is used)"
                )
            shape = dims
        specs.append(InputSpec(inp.name, tuple(int(d) for d in shape), dtype))
    return specs


def _set_static_shapes(model, specs: list[InputSpec]):
    from onnx import TensorProto  # noqa: F401

    by_name = {s.name: s for s in specs}
    for inp in _graph_inputs(model):
        dims = inp.type.tensor_type.shape.dim
        shape = by_name[inp.name].shape
        del dims[:]
        for d in shape:
            dims.add().dim_value = d


def _name_nodes(model):
    """Give every node a unique, non-empty name (the layer names users see)."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{node.output[0] if node.output else i}"
        name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", name)
        base, n = name, 1
        while name in seen:
            name, n = f"{base}_{n}", n + 1
        seen.add(name)
        node.name = name


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


def _fold_once(model):
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

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
        dims = _dims(vi)
        if dims and all(isinstance(d, int) for d in dims):
            static[vi.name] = dims
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    keep, new_inits, folded = [], [], 0
    opset = [o for o in model.opset_import]
    for node in model.graph.node:
        value = None
        if node.op_type == "Constant" and len(node.output) == 1:
            try:
                value = numpy_helper.to_array(node.attribute[0].t) if node.attribute and node.attribute[0].name == "value" else None
            except Exception:
                value = None
        elif node.op_type == "Shape" and node.input[0] in static and len(node.attribute) == 0:
            value = np.asarray(static[node.input[0]], dtype=np.int64)
        elif node.op_type in _FOLDABLE and node.input and all(i == "" or i in consts for i in node.input):
            if all(consts[i].size <= _FOLD_LIMIT for i in node.input if i):
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
                        value = np.asarray(outs[0])
                except Exception:  # leave the node to TVM
                    value = None
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


def _clip_with_constant_bounds(op_name, inputs):
    """``R.clip`` for an opset-11+ Clip whose bounds are constants.

    TVM's converter emits ``maximum``/``minimum`` call_tir kernels guarded by ``isnan`` of the
    bounds, which hides ReLU6-style clamps from fusion (and costs a compiled kernel per bound in
    FoldConstant). Constant scalar bounds are what exporters write.
    """
    from tvmq._compat import constant_array, is_constant

    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        b = inputs[i] if len(inputs) > i else None
        if b is None:
            bounds.append(default)
        elif is_constant(b) and constant_array(b).size == 1:
            bounds.append(float(constant_array(b).reshape(())))
        else:
            return None
    from tvm import relax

    x = inputs[0]
    if getattr(getattr(x, "ty", None), "dtype", None) not in ("float32", "float16"):
        return None
    return relax.op.clip(x, bounds[0], bounds[1])


_QLINEAR = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")


def rewrite_qlinear_ops(model) -> int:
    """Rewrite QLinearConv / QLinearMatMul / ConvInteger / MatMulInteger into QDQ form.

    TVM's importer does not read the QLinear ops (and reads the Integer ops as float math);
    ``DequantizeLinear -> Conv/MatMul -> QuantizeLinear`` is the same computation, which
    FoldQDQ turns into integer kernels again. The Integer ops (int32 results) become
    ``DequantizeLinear`` with scale 1 around the float op and a Cast back to int32. Returns the
    number of nodes rewritten.
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes, count = [], 0
    inits = model.graph.initializer
    one = None

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    for node in model.graph.node:
        if node.op_type not in _QLINEAR or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        count += 1
        n = node.name
        ins = list(node.input) + [""] * 8
        attrs = [a for a in node.attribute]
        if node.op_type in ("QLinearConv", "QLinearMatMul"):
            x, xs, xz, w, ws, wz, ys, yz = ins[:8]
            op = "Conv" if node.op_type == "QLinearConv" else "MatMul"
            w_axis = 0 if op == "Conv" else 1
            nodes += [
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
            core.attribute.extend(attrs)
            nodes += [core, helper.make_node("QuantizeLinear", [f"{n}_y", ys, yz], [node.output[0]], name=f"{n}_q")]
        else:  # ConvInteger / MatMulInteger: int32 = sum((x - xz) * (w - wz))
            if one is None:
                one = const(f"{n}_one", 1.0)
            x, w, xz, wz = ins[:4]
            op = "Conv" if node.op_type == "ConvInteger" else "MatMul"
            dqx = [x, one] + ([xz] if xz else [])
            dqw = [w, one] + ([wz] if wz else [])
            core = helper.make_node(op, [f"{n}_x", f"{n}_w"], [f"{n}_y"], name=n)
            core.attribute.extend(attrs)
            nodes += [
                helper.make_node("DequantizeLinear", dqx, [f"{n}_x"], name=f"{n}_dqx"),
                helper.make_node("DequantizeLinear", dqw, [f"{n}_w"], name=f"{n}_dqw"),
                core,
                helper.make_node("Cast", [f"{n}_y"], [node.output[0]], name=f"{n}_cast", to=TensorProto.INT32),
            ]
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return count


def is_prequantized(model) -> bool:
    """Whether an ONNX model (path or proto) already carries quantization (QDQ or QLinear ops)."""
    if isinstance(model, (str, Path)):
        model = read_onnx(model)
    ops = {n.op_type for n in model.graph.node}
    return bool(ops & {"QuantizeLinear", "DequantizeLinear", *_QLINEAR})


@contextlib.contextmanager
def _named_importer():
    """Swap TVM's ONNX importer for one that names each binding after its ONNX node."""
    from tvm import relax

    from tvmq._compat import onnx_frontend

    frontend = onnx_frontend()
    base = frontend.ONNXGraphImporter

    class NamedImporter(base):
        def _convert_operator(self, op_name, inputs, attrs, opset):
            name = re.sub(r"[^A-Za-z0-9_]", "_", str(attrs.get("tvm_custom", {}).get("name", "")))
            emit = self.bb.emit

            def named_emit(expr, name_hint=""):
                return emit(expr, name_hint or name)

            self.bb.emit = named_emit
            try:
                sym = _clip_with_constant_bounds(op_name, inputs) if op_name == "Clip" else None
                if sym is None:
                    sym = super()._convert_operator(op_name, inputs, attrs, opset)
                if name and isinstance(sym, relax.Call):
                    sym = emit(sym, name)
            finally:
                del self.bb.emit
            return sym

    frontend.ONNXGraphImporter = NamedImporter
    try:
        yield frontend
    finally:
        frontend.ONNXGraphImporter = base


# ONNX ops that run in integers after quantization (anchors, their epilogues, and the ops a
# quantized tensor flows through unchanged); any other op type is reported as staying float.
_INT8_CAPABLE = frozenset(
    {"Conv", "MatMul", "Gemm", "Add", "Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Transpose",
     "Squeeze", "Unsqueeze", "Slice", "BatchNormalization", "Identity", "Constant", "Shape", "Cast",
     "QuantizeLinear", "DequantizeLinear", *_QLINEAR}
)


def load_onnx(model, shapes: dict[str, list[int]] | None = None, sample: dict | None = None):
    """Import an ONNX model (path or ``ModelProto``) into a float Relax module with static shapes.

    Parameters
    ----------
    model : str, Path or onnx.ModelProto
    shapes : dict, optional
        ``{input name: shape}`` fixing dynamic dimensions (``--shape``).
    sample : dict, optional
        One calibration sample; its array shapes fix dimensions ``shapes`` does not.

    Returns
    -------
    (IRModule, ModelInfo)
    """
    import onnx

    if isinstance(model, (str, Path)):
        model = read_onnx(model)
    else:
        model = onnx.ModelProto.FromString(model.SerializeToString())
    shapes = dict(shapes or {})
    graph_inputs = {i.name: _dims(i) for i in _graph_inputs(model)}
    named = {k for k in (sample or {}) if k is not None}
    if named and not named & set(graph_inputs):
        raise TvmqError(
            f"calibration samples have inputs {sorted(named)} but the model takes {sorted(graph_inputs)}; "
            "name each array after a model input"
        )
    for name, array in (sample or {}).items():
        if name is None and len(graph_inputs) == 1:
            name = next(iter(graph_inputs))
        dims = graph_inputs.get(name)
        # Only dynamic inputs take their shape from the data; a mismatch with a static input is
        # reported when the samples are validated.
        if dims is not None and (not dims or any(not isinstance(d, int) for d in dims)) and name not in shapes:
            shape = list(np.shape(array))
            if dims and (len(dims) != len(shape) or any(isinstance(d, int) and d != g for d, g in zip(dims, shape))):
                raise TvmqError(
                    f"calibration data for input {name!r} has shape {shape}, the model expects {dims}; "
                    "save samples with the model's input shape"
                )
            shapes[name] = shape
    specs = _static_inputs(model, shapes)
    _set_static_shapes(model, specs)
    rewrite_qlinear_ops(model)
    _name_nodes(model)

    from tvmq._compat import onnx_frontend

    # LSTM: unrolled into plain ops below (tvmq.recurrent), once shapes are static and folded
    supported = set(onnx_frontend()._get_convert_map()) | {"Constant", "If", "LSTM"}  # pylint: disable=protected-access
    missing = sorted({n.op_type for n in model.graph.node if n.op_type not in supported and n.domain in ("", "ai.onnx")})
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if missing or foreign:
        raise TvmqError(
            "TVM's ONNX importer cannot read op(s) " + ", ".join(missing + foreign)
            + "; replace them when exporting (e.g. a different opset) or remove them from the graph"
        )
    folded = fold_constant_subgraphs(model)
    if folded:
        log.info("folded %d constant shape nodes before import", folded)
    from tvmq.recurrent import decompose_lstm

    if decompose_lstm(model):
        _name_nodes(model)

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    with warnings.catch_warnings(), _named_importer() as frontend:
        warnings.simplefilter("ignore")
        try:
            mod = frontend.from_onnx(model, shape_dict={s.name: list(s.shape) for s in specs},
                                     dtype_dict={s.name: s.dtype for s in specs})
        except TvmqError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TvmqError(f"TVM's ONNX importer failed: {first[:300]}; please report this model") from None
    outputs = []
    from tvmq._compat import TupleType, expr_type

    ret = expr_type(mod["main"].body.body)
    fields = ret.fields if isinstance(ret, TupleType) else [ret]
    for out, ty in zip(model.graph.output, fields):
        shape = tuple(int(d) for d in ty.shape.values) if getattr(ty, "shape", None) is not None else ()
        outputs.append(InputSpec(out.name, shape, str(getattr(ty, "dtype", "float32"))))
    float_ops = sorted({n.op_type for n in model.graph.node if n.op_type not in _INT8_CAPABLE})
    info = ModelInfo(
        inputs=tuple(specs),
        outputs=tuple(outputs),
        opset=int(opset),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        float_ops=tuple(float_ops),
    )
    return mod, info
