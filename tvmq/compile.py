"""Compile: the one composition of tvmq's stages that the CLI and the Python API both call.

ONNX -> :mod:`~tvmq.frontend` (import, prepare) -> :mod:`~tvmq.calibrate` (statistics) ->
:mod:`~tvmq.quantize` / :mod:`~tvmq.precision` (the plan) -> :mod:`tvmq.passes` (Q/DQ insertion
and folding into integer kernels) -> :mod:`~tvmq.pipeline` (lowering, schedules, build) ->
:mod:`~tvmq.bundle` (the deployable folder).

:func:`quantized_module` runs everything up to the quantized Relax module (what ``tvmq tune``,
``tvmq eval`` and the benchmarks start from); :func:`compile_model` builds and writes the bundle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tvmq.bundle import prepare_output_dir, staged_output, write_bundle
from tvmq.config import AutoPrecision, Precision, QuantConfig, TuneOptions
from tvmq.errors import TvmqError

if TYPE_CHECKING:
    import tvm

    from tvmq.frontend import ModelInfo
    from tvmq.plan import QuantPlan

__all__ = ["CompileResult", "QuantizedModel", "compile_model", "quantized_module"]

@dataclass
class CompileResult:
    """What :func:`compile_model` produced (the bundle is on disk at ``output_dir``)."""

    output_dir: Path
    manifest: dict
    module: tvm.IRModule = field(repr=False)  # the quantized (or float) Relax module
    float_module: tvm.IRModule = field(repr=False)
    executable: tvm.runtime.Executable | None = field(repr=False, default=None)
    plan: QuantPlan | None = None  # None for fp32 builds
    info: ModelInfo | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class QuantizedModel:
    """An imported model, prepared and (for int8) quantized: what gets compiled or tuned."""

    module: tvm.IRModule = field(repr=False)
    float_module: tvm.IRModule = field(repr=False)
    info: ModelInfo
    plan: QuantPlan | None
    warnings: list[str]
    precision: dict | None = None  # what --precision auto measured and chose


def compile_model(
    model,
    output_dir,
    *,
    target: str = "x86",
    calib=None,
    config: QuantConfig | None = None,
    shapes: dict[str, list[int | str]] | None = None,
    dims: dict[str, tuple[int, int]] | None = None,
    precision: str = "int8",
    plan=None,
    force: bool = False,
    progress: bool = False,
    tuning: TuneOptions | None = None,
    auto: AutoPrecision | None = None,
    variants: dict[str, list[int]] | None = None,
) -> CompileResult:
    """Compile an ONNX model into a bundle folder.

    Parameters
    ----------
    model : str, Path or onnx.ModelProto
    output_dir : str or Path
        Must not exist or be empty (unless ``force``).
    target : str or TargetPreset
        Target preset or its name (``python -m tvmq targets``).
    calib : str, Path or iterable of dict
        Calibration folder or samples; required for int8 unless ``plan`` is given.
    config : QuantConfig, optional
    shapes : dict, optional
        ``{input name: shape}`` for dynamic dimensions: a size fixes one, a name (``"W"``) keeps
        it dynamic over its range in ``dims``.
    dims : dict, optional
        ``{dimension name: (smallest, largest)}``: the bundle runs every size in the range.
    precision : str or Precision
        ``int8`` (default), ``fp16``, ``fp32`` (no quantization) or ``auto`` (per layer, see ``auto``).
    plan : QuantPlan or path, optional
        Reuse a plan instead of calibrating.
    tuning : TuneOptions, optional
        Tuning database (its kernels are verified, then used) and trials to run first.
    auto : AutoPrecision, optional
        ``--precision auto``'s metric and budget (default: :data:`~tvmq.config.DEFAULT_MIN_SQNR` per output).
    variants : dict, optional
        ``{dimension name: [sizes]}`` inside its range in ``dims``: the bundle also carries a static
        copy of the model for each size (each combination, for several names) and runs it for
        calls of that size, the dynamic program for every other (``--dim W=32..1280@160,320``).
    """
    from tvmq.calibrate import CalibrationData
    from tvmq.frontend import check_variants, variant_product
    from tvmq.targets import get_preset

    preset = get_preset(target)
    preset.check_toolchain()
    output_dir = Path(output_dir)
    prepare_output_dir(output_dir, force)
    precision, tuning = Precision.parse(precision), tuning or TuneOptions()
    raw = CalibrationData.of(calib)
    _check_request(model, precision, raw, plan, tuning, auto)
    check_variants(dims, variants)
    with staged_output(output_dir, force) as tmp:
        qm = quantized_module(model, preset, raw, config or QuantConfig(), shapes, precision, plan, progress, auto, dims)
        qm = dataclasses.replace(qm, info=dataclasses.replace(qm.info, variants=variant_product(variants)))
        executable, manifest = _build_into(tmp, model, qm, preset, tuning, progress)
    return CompileResult(output_dir, manifest, qm.module, qm.float_module, executable, qm.plan, qm.info, qm.warnings)


def _check_request(model, precision: Precision, raw, plan, tuning: TuneOptions, auto) -> None:
    """Input errors a build would meet late, raised before any work."""
    if precision is Precision.AUTO:
        (auto or AutoPrecision()).budget()  # a missing budget
        if plan is not None:
            raise TvmqError("--plan reuses a chosen plan; drop --precision auto (or drop --plan to choose again)")
    if tuning.trials and tuning.db is None:
        raise TvmqError("--tune needs --db DIR, the folder that keeps the tuning results")
    if precision in (Precision.INT8, Precision.AUTO) and raw is None and plan is None:
        from tvmq.frontend import is_prequantized

        if not is_prequantized(model):
            raise TvmqError("int8 compilation needs calibration data: pass --calib DIR (one .npy/.npz per sample) or --plan")


def quantized_module(model, preset, raw=None, config=None, shapes=None, precision="int8", plan=None,
                     progress=False, auto: AutoPrecision | None = None, dims=None) -> QuantizedModel:
    """Import ``model``, prepare it, and quantize it by calibration (``raw``: a folder or samples)
    or ``plan``; ``precision`` ``auto`` chooses each layer's precision (:func:`tvmq.precision.choose_plan`)."""
    from tvmq.calibrate import CalibrationData
    from tvmq.frontend import load_onnx
    from tvmq.passes import has_qdq
    from tvmq.plan import QuantPlan, read_plan
    from tvmq.recurrent import FLOAT_LOOP_MAX_BYTES

    config = config or QuantConfig()
    precision = Precision.parse(precision)
    raw = CalibrationData.of(raw)
    qplan = None
    if precision is Precision.INT8 and plan is not None:
        qplan = plan if isinstance(plan, QuantPlan) else read_plan(plan)
        shapes = {**qplan.input_shapes, **(shapes or {})}  # a plan is made for fixed shapes
    loop = FLOAT_LOOP_MAX_BYTES if precision is Precision.FP32 else None
    mod, info = load_onnx(model, shapes, sample=raw.first() if raw is not None else None, dims=dims,
                          lstm_loop_bytes=loop)
    warnings = list(preset.warnings())
    if info.float_ops:
        warnings.append("ops kept in float (no int8 kernel for them): " + ", ".join(info.float_ops))
    if has_qdq(mod):
        qm = _prequantized(mod, info, config, precision, qplan, raw is not None, warnings)
    else:
        qm = _quantized(mod, info, preset, raw, config, precision, qplan, warnings, progress, auto)
    return dataclasses.replace(qm, module=with_dim_bounds(qm.module, info), float_module=with_dim_bounds(qm.float_module, info))


def with_dim_bounds(mod, info):
    """``mod`` with its dynamic dimensions' largest sizes on ``main`` (``tir_var_upper_bound``):
    TVM's memory planner then plans every intermediate tensor once, at its largest size, instead
    of allocating it at each call (which cost the PP-OCR recogniser more than its kernels)."""
    if not info.dims:
        return mod
    from tvmq.frontend import dim_variable_name

    mod = mod.clone() if hasattr(mod, "clone") else mod
    bounds = {dim_variable_name(name, step): hi // step for name, _, hi, step in info.dims}
    mod["main"] = mod["main"].with_attr("tir_var_upper_bound", bounds)
    return mod


def _prequantized(mod, info, config, precision, qplan, with_calib: bool, warnings) -> QuantizedModel:
    """A pre-quantized (QDQ / QAT) model: its own scales are the plan (or ``qplan``); no calibration."""
    from tvmq.passes import strip_qdq
    from tvmq.quantize import prepare, quantize_pipeline

    mod, source_plan = strip_qdq(mod)
    float_mod = prepare(mod, fold_batchnorm=False)
    if precision is not Precision.INT8:
        return QuantizedModel(float_mod, float_mod, info, None, warnings)
    if with_calib:
        warnings.append("the model is already quantized (QDQ): its scales are used and --calib is ignored")
    requantized = [n for n, lp in source_plan.layers.items() if lp.is_int8 and lp.kind != "add" and lp.weight is None]
    if requantized and not qplan:
        warnings.append(
            f"{len(requantized)} layer(s) ({', '.join(requantized[:3])}{', ...' if len(requantized) > 3 else ''}) hold "
            "weights quantized asymmetrically (uint8 with a zero point: the quantizer took them for activations); "
            "the int8 kernels take symmetric weights, so tvmq re-quantizes those per channel and the outputs differ "
            "from the file's own arithmetic. Quantize with int8 weights (ONNX Runtime: run quant_pre_process first)"
        )
    qplan = qplan or source_plan
    if config.requantize is not None and config.requantize.value != qplan.requantize:
        qplan = dataclasses.replace(qplan, requantize=config.requantize.value)
    return QuantizedModel(quantize_pipeline(qplan)(float_mod), float_mod, info, qplan, warnings)


def _quantized(mod, info, preset, raw, config, precision, qplan, warnings, progress, auto) -> QuantizedModel:
    """A float model: prepared, then kept float, made fp16, or quantized by ``qplan``, calibration or the search."""
    import tvm

    from tvmq.metrics import concat_slices
    from tvmq.quantize import finish, prepare, quantize_pipeline

    # the parts of each output's final Concat, as the model has them (prepare changes layouts)
    concat = concat_slices(mod["main"], [o.name for o in info.outputs]) if precision is Precision.AUTO else ()
    float_mod = prepare(mod)
    if precision is Precision.FP32:
        return QuantizedModel(finish(float_mod, config), float_mod, info, None, warnings)
    if precision is Precision.FP16:
        qplan = _fp16_plan(float_mod, config, info)
        if not preset.fp16:
            warnings.append(f"target {preset.name!r} has no fast fp16 arithmetic: fp16 layers save memory, not time")
        return QuantizedModel(finish(quantize_pipeline(qplan)(float_mod), config), float_mod, info, qplan, warnings)
    report = None
    if qplan is None:
        float_mod, qplan, report = _plan(float_mod, info, preset, raw, config, precision, progress, auto, concat)
    elif config.smoothquant:
        raise TvmqError("--smoothquant changes the weights the plan was made for; use it when calibrating, not with --plan")
    try:
        qmod = finish(quantize_pipeline(qplan)(float_mod), config)
    except tvm.error.TVMError as err:  # pragma: no cover - a bug, reported as such
        raise TvmqError(f"quantization failed inside TVM: {str(err).splitlines()[0][:300]}; please report it") from None
    return QuantizedModel(qmod, float_mod, info, qplan, warnings, report)


def _plan(float_mod, info, preset, raw, config, precision, progress, auto, concat):
    """The plan from the calibration data: calibrated (int8) or searched (auto); returns the float
    module it is for (SmoothQuant changes the weights), the plan and the search's report."""
    from tvmq.precision import choose_plan
    from tvmq.quantize import smooth, smooth_and_calibrate

    if raw is None:
        raise TvmqError("int8 compilation needs calibration data: pass --calib DIR (one .npy/.npz per sample) or --plan")
    inputs, names = list(info.inputs), [s.name for s in info.inputs]
    samples = raw.samples(inputs, info.dim_ranges)
    if precision is not Precision.AUTO:
        float_mod, plan = smooth_and_calibrate(float_mod, samples, config, target=preset.name, input_names=names,
                                               progress=progress)
        return float_mod, plan, None
    if config.smoothquant:
        float_mod = smooth(float_mod, samples, config.smoothquant, names)
    plan, report = choose_plan(float_mod, samples, config, auto or AutoPrecision(), preset, info, input_names=names,
                               progress=progress, concat=concat)
    return float_mod, plan, report


def _fp16_plan(float_mod, config, info):
    """``--precision fp16``: every conv/matmul in fp16 (fp32 accumulation) unless a rule keeps it fp32."""
    from tvmq.passes import find_layers
    from tvmq.plan import LayerPlan, QuantPlan

    layers = {}
    for layer in find_layers(float_mod["main"]):
        wanted = config.precision_for(layer.name, layer.kind, default="fp16")
        half = layer.kind != "add" and wanted in ("fp16", "int8")
        layers[layer.name] = LayerPlan(kind=layer.kind, precision="fp16" if half else "fp32")
    return QuantPlan(layers=layers, input_shapes={s.name: list(s.shape) for s in info.inputs})


def _build_into(out: Path, model, qm: QuantizedModel, preset, tuning: TuneOptions, progress: bool):
    """Tune (if asked), lower and build ``qm`` for ``preset``; write the bundle into ``out``."""
    from tvmq.kernels import reduction_kernels
    from tvmq.pipeline import compile_lowered, lower

    database, tuning_info = None, None
    if tuning.db is not None:
        from tvmq.tune import load_database, tune

        if tuning.trials:
            tune(qm.module, preset, tuning.db, trials=tuning.trials, max_tasks=tuning.max_tasks, progress=progress)
        database = load_database(tuning.db, qm.module, preset)
        tuning_info = {"tuned_kernels": len(database.get_all_tuning_records())}
    if preset.kind == "cuda":
        from tvmq.cuda import prepare_cuda_build

        prepare_cuda_build()
    module = qm.module
    if qm.info.variants:
        from tvmq.frontend import variant_bindings
        from tvmq.passes import Specialize

        module = Specialize(variant_bindings(qm.info))(module)
    lowered = lower(module, preset, database)
    executable = compile_lowered(lowered, preset)
    return executable, write_bundle(out, model, qm, preset, executable, reduction_kernels(lowered), tuning_info)
