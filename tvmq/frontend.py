"""ONNX import: static shapes, named layers, and the frontend workarounds TVM 0.27 needs.

Where it sits: **frontend** (ONNX -> float Relax) -> calibrate -> plan -> passes -> pipeline -> bundle;
the ONNX-level rewrites it applies first are in :mod:`tvmq.onnx_rewrites`.

``load_onnx`` returns a float Relax module whose bindings are named after the ONNX nodes that
produced them (TVM's importer names everything ``lv``), so layer names in plans, reports and
``--keep-float`` globs are the names users see in Netron.

Workarounds (each covered by a test):

* TVM's importer turns ``Slice`` of a constant into a runtime ``strided_slice``; a ``Reshape``
  fed by such a shape computation (Paddle2ONNX's Shape -> Cast -> Slice -> Cast -> Concat ->
  Reshape) then fails with "Reshape requires the input new shape to be Shape". tvmq folds
  constant shape subgraphs in ONNX, with onnx's reference evaluator, before import
  (:mod:`tvmq.onnx_rewrites`, which also rewrites QLinear ops into QDQ form).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tvmq.calibrate import InputSpec
from tvmq.errors import TvmqError
from tvmq.onnx_rewrites import QLINEAR_OPS, fold_constant_subgraphs, resolve_dynamic_reshapes, rewrite_qlinear_ops, value_dims

__all__ = ["ModelInfo", "load_onnx", "read_onnx", "parse_shape_arg", "fold_constant_subgraphs", "is_prequantized",
           "rewrite_qlinear_ops", "parse_dim_arg", "parse_dim_spec", "check_dims", "check_variants"]

log = logging.getLogger("tvmq")

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}

@dataclass(frozen=True)
class ModelInfo:
    """What the artifact records about the imported model."""

    inputs: tuple[InputSpec, ...]
    outputs: tuple[InputSpec, ...]
    opset: int
    producer: str
    float_ops: tuple[str, ...]  # op types that never run in int8 (reported, not an error)
    dims: tuple[tuple[str, int, int, int], ...] = ()  # (name, smallest, largest, step) of each dynamic dimension
    # the sizes compiled as static copies too (--dim W=32..1280@160,320): one ((name, size), ...) per copy
    variants: tuple[tuple[tuple[str, int], ...], ...] = ()

    @property
    def dim_ranges(self) -> dict[str, tuple[int, int, int]]:
        return {name: (lo, hi, step) for name, lo, hi, step in self.dims}


_DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_shape_arg(text: str) -> tuple[str, list[int | str]]:
    """``NAME:1,3,48,192`` -> ``("NAME", [1, 3, 48, 192])``; a dimension may be a name, dynamic
    over the range ``--dim`` gives it: ``NAME:1,3,48,W`` -> ``("NAME", [1, 3, 48, "W"])``."""
    name, sep, dims = text.rpartition(":")
    shape = [int(d) if d.strip().lstrip("-").isdigit() else d.strip() for d in dims.split(",")] if dims else []
    if (not sep or not name or not shape
            or any(d <= 0 if isinstance(d, int) else not _DIM_NAME.match(d) for d in shape)):
        raise TvmqError(f"--shape {text!r} is not NAME:D0,D1,... with positive integers or dimension names, "
                        "e.g. --shape input:1,3,48,192 or --shape input:1,3,48,W --dim W=32..1280")
    return name, shape


def parse_dim_arg(text: str) -> tuple[str, tuple[int, ...]]:
    """``W=32..1280`` -> ``("W", (32, 1280))``: the sizes a dynamic dimension may take;
    ``H=320..1280:32`` -> ``("H", (320, 1280, 32))``: multiples of 32 only (a detector's pages,
    whose feature maps are added after upsampling: equal shapes need the multiple)."""
    name, sep, span = text.partition("=")
    span, colon, step = span.partition(":")
    lo, dots, hi = span.partition("..")
    try:
        bounds = (int(lo), int(hi)) + ((int(step),) if colon else ()) if dots else None
    except ValueError:
        bounds = None
    if (not sep or not _DIM_NAME.match(name.strip()) or bounds is None or not 1 <= bounds[0] <= bounds[1]
            or (colon and bounds[2] < 1)):
        raise TvmqError(f"--dim {text!r} is not NAME=LO..HI[:STEP] with 1 <= LO <= HI, e.g. --dim W=32..1280 "
                        "or --dim H=320..1280:32")
    return name.strip(), bounds


def parse_dim_spec(text: str) -> tuple[str, tuple[int, ...], list[int]]:
    """:func:`parse_dim_arg` with the sizes to compile static copies for after ``@``:
    ``W=32..1280@160,320,640`` -> ``("W", (32, 1280), [160, 320, 640])``."""
    span, at, sizes = text.partition("@")
    name, bounds = parse_dim_arg(span)
    if not at:
        return name, bounds, []
    try:
        values = [int(v) for v in sizes.split(",")]
    except ValueError:
        values = []
    if not values:
        raise TvmqError(f"--dim {text!r}: after @ come the sizes to compile static copies for, e.g. "
                        "--dim W=32..1280@160,320,640")
    return name, bounds, values


def check_variants(dims: dict, variants: dict[str, list[int]]) -> None:
    """Every size to specialise names a dynamic dimension and lies inside its range (on its steps)."""
    for name, sizes in (variants or {}).items():
        if name not in (dims or {}):
            raise TvmqError(f"sizes to specialise for {name!r}, which has no --dim range; give one, e.g. "
                            f"--dim {name}=32..1280@{','.join(map(str, sizes))}")
        lo, hi, step = dim_range(dims[name])
        for size in sizes:
            if not lo <= size <= hi or size % step:
                raise TvmqError(f"--dim {name}: {size} is not a size of {lo}..{hi}"
                                + (f" in steps of {step}" if step > 1 else "") + "; specialise sizes the range holds")


def variant_bindings(info: ModelInfo) -> list[dict[str, int]]:
    """Each static copy in ``info.variants`` as ``{symbolic variable: value}`` (``H_32: 20`` for
    H=640 in steps of 32), what :class:`tvmq.passes.Specialize` takes."""
    steps = {name: step for name, _, _, step in info.dims}
    return [{dim_variable_name(name, steps[name]): size // steps[name] for name, size in variant}
            for variant in info.variants]


def variant_product(variants: dict[str, list[int]]) -> tuple[tuple[tuple[str, int], ...], ...]:
    """``{"H": [320, 640], "W": [640]}`` -> every combination, ``((("H", 320), ("W", 640)), ...)``."""
    import itertools

    names = sorted(n for n, sizes in (variants or {}).items() if sizes)
    combos = itertools.product(*[list(dict.fromkeys(variants[n])) for n in names])
    return tuple(tuple(zip(names, combo)) for combo in combos) if names else ()


def dim_range(bounds) -> tuple[int, int, int]:
    """``(lo, hi)`` or ``(lo, hi, step)`` as ``(lo, hi, step)``."""
    lo, hi, *step = bounds
    return int(lo), int(hi), int(step[0]) if step else 1


def dim_variable_name(name: str, step: int) -> str:
    """The symbolic variable a dynamic dimension imports as: ``W``, or ``H_32`` (H / 32) for one
    in steps of 32; ``tir_var_upper_bound`` names it too."""
    return name if step == 1 else f"{name}_{step}"


def check_dims(shapes: dict[str, list], dims: dict[str, tuple[int, int]]) -> None:
    """Every dimension name in ``shapes`` has a range in ``dims``, and every range is used."""
    used = {d for shape in shapes.values() for d in shape if isinstance(d, str)}
    missing, unused = sorted(used - set(dims)), sorted(set(dims) - used)
    if missing:
        raise TvmqError(f"--shape names dynamic dimension(s) {missing} without a range; give each one, "
                        f"e.g. --dim {missing[0]}=32..1280")
    if unused:
        raise TvmqError(f"--dim {unused[0]} names no dimension of --shape; use it in a shape, e.g. "
                        f"--shape input:1,3,48,{unused[0]}, or drop it")
    for name, bounds in dims.items():
        lo, hi, step = dim_range(bounds)
        if not 1 <= lo <= hi or step < 1 or hi // step * step < lo:
            raise TvmqError(f"--dim {name}={lo}..{hi}:{step} holds no size; give 1 <= LO <= HI (and a multiple of "
                            "STEP between them)")


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
        dims = value_dims(inp)
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
        specs.append(InputSpec(inp.name, tuple(d if isinstance(d, str) else int(d) for d in shape), dtype))
    return specs


def _set_static_shapes(model, specs: list[InputSpec]):
    by_name = {s.name: s for s in specs}
    for inp in _graph_inputs(model):
        dims = inp.type.tensor_type.shape.dim
        shape = by_name[inp.name].shape
        del dims[:]
        for d in shape:
            if isinstance(d, str):
                dims.add().dim_param = d  # a dynamic dimension (--dim), symbolic from here on
            else:
                dims.add().dim_value = d


def name_nodes(model):
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


def is_prequantized(model) -> bool:
    """Whether an ONNX model (path or proto) already carries quantization (QDQ or QLinear ops)."""
    if isinstance(model, (str, Path)):
        model = read_onnx(model)
    ops = {n.op_type for n in model.graph.node}
    return bool(ops & {"QuantizeLinear", "DequantizeLinear", *QLINEAR_OPS})


def _integer_scales(inputs):
    """Resize's inputs with constant whole-number scales as a ``ShapeExpr`` of ints."""
    from tvm import relax

    from tvmq._compat import constant_array, is_constant

    if len(inputs) > 2 and inputs[2] is not None and is_constant(inputs[2]):
        scales = constant_array(inputs[2])
        if scales.size and np.all(scales == np.round(scales)) and np.all(scales >= 1):
            inputs = list(inputs)
            inputs[2] = relax.ShapeExpr([int(v) for v in scales.reshape(-1)])
    return inputs


@contextlib.contextmanager
def _named_importer(integer_scales: bool = False):
    """Swap TVM's ONNX importer for one that names each binding after its ONNX node. With
    ``integer_scales``, a ``Resize`` by whole-number scales sizes its output as ``2 * H`` (TVM
    computes ``int64(2.0f * float(H))``, which no symbolic shape equals)."""
    from tvm import relax

    from tvmq._compat import onnx_frontend

    frontend = onnx_frontend()
    base = frontend.ONNXGraphImporter

    class NamedImporter(base):
        def _check_for_unsupported_ops(self, graph):
            # tvmq.recurrent's loop node is converted below, not by the importer's map
            nodes = list(graph.node)
            del graph.node[:]
            graph.node.extend(n for n in nodes if n.op_type != "LSTMRecurrence")
            try:
                super()._check_for_unsupported_ops(graph)
            finally:
                del graph.node[:]
                graph.node.extend(nodes)

        def _convert_operator(self, op_name, inputs, attrs, opset):
            name = re.sub(r"[^A-Za-z0-9_]", "_", str(attrs.get("tvm_custom", {}).get("name", "")))
            emit = self.bb.emit

            def named_emit(expr, name_hint=""):
                return emit(expr, name_hint or name)

            self.bb.emit = named_emit
            if integer_scales and op_name == "Resize":
                inputs = _integer_scales(inputs)
            try:
                sym = _clip_with_constant_bounds(op_name, inputs) if op_name == "Clip" else None
                if op_name == "LSTMRecurrence":
                    sym = _lstm_recurrence(self.bb, inputs, attrs)
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


def _lstm_recurrence(bb, inputs, attrs):
    """tvmq.recurrent's ``LSTMRecurrence`` node: a call of the loop kernel
    (:func:`tvmq.targets.recurrence.lstm_recurrence`) returning ``(y, h_last, c_last)``."""
    from tvm import relax

    from tvmq._compat import TensorType, expr_type
    from tvmq.targets.recurrence import lstm_recurrence

    proj = inputs[0]
    steps, batch, gates = (int(d) for d in expr_type(proj).shape.values)
    kernel = lstm_recurrence(steps, batch, int(attrs["hidden_size"]), bool(attrs.get("reverse", 0)))
    gv = bb.add_func(kernel, "tvmq_lstm")
    padded = gates // 4
    return relax.call_tir(gv, list(inputs), [TensorType((steps, batch, padded), "float32"),
                                             TensorType((batch, padded), "float32"),
                                             TensorType((batch, padded), "float32")])


# ONNX ops that run in integers after quantization (anchors, their epilogues, and the ops a
# quantized tensor flows through unchanged); any other op type is reported as staying float.
_INT8_CAPABLE = frozenset(
    {"Conv", "MatMul", "Gemm", "Add", "Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Transpose",
     "Squeeze", "Unsqueeze", "Slice", "BatchNormalization", "Identity", "Constant", "Shape", "Cast",
     "QuantizeLinear", "DequantizeLinear", *QLINEAR_OPS}
)


def load_onnx(model, shapes: dict[str, list[int | str]] | None = None, sample: dict | None = None,
              dims: dict[str, tuple[int, int]] | None = None, lstm_loop_bytes: int | None = None):
    """Import an ONNX model (path or ``ModelProto``) into a float Relax module with static shapes.

    Parameters
    ----------
    model : str, Path or onnx.ModelProto
    shapes : dict, optional
        ``{input name: shape}`` fixing dynamic dimensions (``--shape``).
    sample : dict, optional
        One calibration sample; its array shapes fix dimensions ``shapes`` does not.
    dims : dict, optional
        ``{dimension name: (smallest, largest)}`` for the names in ``shapes`` (``--dim``): those
        dimensions stay symbolic through the whole compilation.
    lstm_loop_bytes : int, optional
        LSTMs whose recurrent weights take at most this many bytes run as one loop kernel
        (default :data:`tvmq.recurrent.LOOP_MAX_BYTES`; larger ones are unrolled).

    Returns
    -------
    (IRModule, ModelInfo)
    """
    import onnx

    if isinstance(model, (str, Path)):
        model = read_onnx(model)
    else:
        model = onnx.ModelProto.FromString(model.SerializeToString())
    check_dims(dict(shapes or {}), dict(dims or {}))
    specs = _static_inputs(model, _shapes_with_sample(model, dict(shapes or {}), sample))
    _set_static_shapes(model, specs)
    rewrite_qlinear_ops(model)
    name_nodes(model)
    _check_supported(model)
    if dims:
        resolved = resolve_dynamic_reshapes(model, dims)
        if resolved:
            log.info("gave %d reshapes of dynamic shapes a constant target", resolved)
    folded = fold_constant_subgraphs(model)
    if folded:
        log.info("folded %d constant shape nodes before import", folded)
    from tvmq.recurrent import decompose_lstm

    if decompose_lstm(model, lstm_loop_bytes):
        name_nodes(model)

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    mod = _import(model, specs, dims or {})
    info = _model_info(model, mod, specs, opset)
    return mod, dataclasses.replace(info, dims=tuple((n, *dim_range(b)) for n, b in sorted((dims or {}).items())))


def _shapes_with_sample(model, shapes: dict[str, list[int]], sample: dict | None) -> dict[str, list[int]]:
    """``shapes`` plus the shapes of ``sample``'s arrays for the dynamic inputs ``shapes`` leaves open."""
    graph_inputs = {i.name: value_dims(i) for i in _graph_inputs(model)}
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
    return shapes


def _check_supported(model) -> None:
    """Refuse, naming them all, the ops TVM's importer cannot read."""
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


def _symbolic_shapes(specs: list[InputSpec], dims: dict):
    """Each input's shape for the importer: ints, one variable per dynamic dimension, and
    ``step * blocks`` for a stepped one (``H=320..1280:32`` is ``32 * H_32``, so the shapes a
    detector adds after upsampling simplify to equal ones); and the ``blocks`` variables."""
    from tvmq._compat import tir

    variables, blocks = {}, []
    for name in sorted(dims):
        step = dim_range(dims[name])[2]
        var = tir.Var(dim_variable_name(name, step), "int64")
        if step > 1:
            variables[name] = step * var
            blocks.append(var)
        else:
            variables[name] = var
    return {s.name: [variables.get(d, d) if isinstance(d, str) else d for d in s.shape] for s in specs}, blocks


def _with_shape_parameter(mod, blocks):
    """``main`` with one more parameter, ``R.Shape(blocks)``, defining the stepped dimensions'
    block counts (a tensor's ``32 * H_32`` cannot define ``H_32``); the runners pass it, computed
    from the inputs (:func:`tvmq.execute.shape_arguments`)."""
    from tvm import relax

    from tvmq._compat import ret_type

    func = mod["main"]
    param = relax.Var("tvmq_dims", relax.ShapeType(blocks))
    mod["main"] = relax.Function([*func.params, param], func.body, ret_type(func), func.is_pure, func.attrs)
    return mod


def _import(model, specs: list[InputSpec], dims: dict):
    """TVM's importer (with named bindings) on the prepared ``model``; its failures as one line."""
    with warnings.catch_warnings(), _named_importer(integer_scales=bool(dims)) as frontend:
        warnings.simplefilter("ignore")
        try:
            shapes, blocks = _symbolic_shapes(specs, dims)
            mod = frontend.from_onnx(model, shape_dict=shapes, dtype_dict={s.name: s.dtype for s in specs})
            return _with_shape_parameter(mod, blocks) if blocks else mod
        except TvmqError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TvmqError(f"TVM's ONNX importer failed: {first[:300]}; please report this model") from None


def _dim_text(dim) -> str:
    """A symbolic dimension as people write it: ``(W - 1) // 2 + 1``, not ``T.int64(1)``."""
    return re.sub(r"T\.int(?:32|64)\((-?\d+)\)", r"\1", str(dim))


def _model_info(model, mod, specs: list[InputSpec], opset: int) -> ModelInfo:
    from tvmq._compat import IntImm, TupleType, expr_type

    outputs = []
    ret = expr_type(mod["main"].body.body)
    fields = ret.fields if isinstance(ret, TupleType) else [ret]
    for out, ty in zip(model.graph.output, fields):
        shape = (tuple(int(d) if isinstance(d, IntImm) else _dim_text(d) for d in ty.shape.values)
                 if getattr(ty, "shape", None) is not None else ())
        outputs.append(InputSpec(out.name, shape, str(getattr(ty, "dtype", "float32"))))
    # an LSTM's recurrence (tvmq.recurrent's loop node) is reported as the LSTM it came from
    float_ops = sorted({"LSTM" if n.op_type == "LSTMRecurrence" else n.op_type
                        for n in model.graph.node if n.op_type not in _INT8_CAPABLE})
    return ModelInfo(
        inputs=tuple(specs),
        outputs=tuple(outputs),
        opset=int(opset),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        float_ops=tuple(float_ops),
    )
