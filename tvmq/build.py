"""Build: ONNX model -> quantized Relax -> compiled library -> bundle folder.

The bundle is written into a temporary folder beside the output and renamed into place at the
end, so a failed or interrupted build leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tvmq.config import QuantConfig
from tvmq.errors import TvmqError

__all__ = ["CompileResult", "QuantizedModel", "compile_model", "quantized_module", "prepare_output_dir",
           "weight_bytes", "sha256_file"]

log = logging.getLogger("tvmq")

BUNDLE_FORMAT = "tvmq-bundle"
BUNDLE_VERSION = 1
LIBRARY = "model.so"


@dataclass
class CompileResult:
    """What :func:`compile_model` produced (the bundle is on disk at ``output_dir``)."""

    output_dir: Path
    manifest: dict
    module: object = field(repr=False)  # the quantized (or float) Relax module
    float_module: object = field(repr=False)
    executable: object = field(repr=False, default=None)
    plan: object = None
    info: object = None
    warnings: list[str] = field(default_factory=list)


_interrupt_requested = False


def on_sigint(signum, frame):
    """SIGINT handler for the CLI: remembers the request, so an interrupt that Python swallows (one
    raised inside a weakref callback or a ``__del__`` is only printed as "Exception ignored") still stops
    the build before its output is renamed into place."""
    _record_sigint(signum, frame)
    raise KeyboardInterrupt


def _record_sigint(signum, frame):  # pylint: disable=unused-argument
    global _interrupt_requested  # pylint: disable=global-statement
    _interrupt_requested = True


def interrupt_requested() -> bool:
    return _interrupt_requested


def import_compiler():
    """Import TVM and the compiler modules with SIGINT deferred, then honour a pending interrupt.

    A KeyboardInterrupt that lands inside a C extension's module initialisation can crash the
    interpreter (a segfault in module_dealloc), so the CLI loads them first with the interrupt held back.
    """
    global _interrupt_requested  # pylint: disable=global-statement
    _interrupt_requested = False
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGINT, _record_sigint)
    try:
        import onnx  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
        import tvm  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
        from tvm import relax  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel

        from tvmq import frontend, pipeline, quantize  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, on_sigint)
    if _interrupt_requested:
        raise KeyboardInterrupt


@contextlib.contextmanager
def staged_output(output_dir: Path, force: bool = False):
    """Yield a temporary folder beside ``output_dir``; on success it replaces ``output_dir``
    (empty, or any folder with ``force``), on any failure or interrupt it is removed. mkdtemp
    makes it private (0700); the finished folder gets the permissions ``mkdir`` would give it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.resolve().parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        yield tmp
        if _interrupt_requested:  # one Python swallowed: still never rename a half-made folder into place
            raise KeyboardInterrupt
        if output_dir.exists():
            if force:
                shutil.rmtree(output_dir)
            else:
                output_dir.rmdir()  # empty, checked by prepare_output_dir
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_bytes(mod) -> dict[str, int]:
    """Bytes of constant tensors in ``mod``'s Relax functions, by dtype."""
    from tvm import relax

    from tvmq._compat import constant_array, is_constant

    sizes: Counter = Counter()
    seen = set()
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue

        def visit(node):
            if is_constant(node) and node.id_ not in seen:
                seen.add(node.id_)
                arr = constant_array(node)
                sizes[str(arr.dtype)] += arr.nbytes

        relax.analysis.post_order_visit(func, visit)
    return dict(sizes)


def prepare_output_dir(output_dir: Path, force: bool = False) -> None:
    """Refuse a non-empty or unwritable output folder before any work is done."""
    output_dir = Path(output_dir)
    if output_dir.exists():
        if not output_dir.is_dir():
            raise TvmqError(f"output path {output_dir} is a file; choose a folder name for -o")
        if any(output_dir.iterdir()) and not force:
            raise TvmqError(f"output folder {output_dir} is not empty; choose a new folder or remove it first")
    parent = output_dir.resolve().parent
    if not parent.is_dir():
        raise TvmqError(f"cannot create {output_dir}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise TvmqError(f"cannot write to {parent}; choose an output folder you can write to")


def _load_raw_samples(calib) -> list[dict] | None:
    """Calibration samples keyed by name, before the model's input names are known."""
    if calib is None:
        return None
    if isinstance(calib, (str, Path)):
        path = Path(calib)
        if not path.is_dir():
            raise TvmqError(f"calibration directory {path} does not exist; pass a folder of .npy/.npz samples to --calib")
        return path  # read once the input names are known
    return list(calib)


def compile_model(
    model,
    output_dir,
    *,
    target: str = "x86",
    calib=None,
    config: QuantConfig | None = None,
    shapes: dict[str, list[int]] | None = None,
    precision: str = "int8",
    plan=None,
    force: bool = False,
    progress: bool = False,
    db=None,
    tune_trials: int = 0,
    tune_max_tasks: int | None = None,
    auto: AutoPrecision | None = None,
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
        ``{input name: shape}`` for dynamic dimensions.
    precision : str
        ``int8`` (default) or ``fp32`` (no quantization).
    plan : QuantPlan or path, optional
        Reuse a plan instead of calibrating.
    db : str or Path, optional
        Tuning database folder: its kernels are verified, then used.
    tune_trials : int
        Tune each kernel with this many measured candidates first (needs ``db``).
    tune_max_tasks : int, optional
        Tune only the largest kernels.
    """
    from tvmq.targets import TargetPreset, get_preset

    preset = target if isinstance(target, TargetPreset) else get_preset(target)
    preset.check_toolchain()
    output_dir = Path(output_dir)
    prepare_output_dir(output_dir, force)
    if precision not in ("int8", "fp16", "fp32", "auto"):
        raise TvmqError(f"--precision {precision!r} is not supported; use int8, fp16, fp32 or auto")
    if precision == "auto":
        (auto or AutoPrecision()).budget()  # a missing budget is an input error: before any work
        if plan is not None:
            raise TvmqError("--plan reuses a chosen plan; drop --precision auto (or drop --plan to choose again)")
    if tune_trials and db is None:
        raise TvmqError("--tune needs --db DIR, the folder that keeps the tuning results")
    raw = _load_raw_samples(calib)
    if precision in ("int8", "auto") and raw is None and plan is None:
        from tvmq.frontend import is_prequantized

        if not is_prequantized(model):
            raise TvmqError("int8 compilation needs calibration data: pass --calib DIR (one .npy/.npz per sample) or --plan")

    with staged_output(output_dir, force) as tmp:
        tuning = {"db": db, "trials": tune_trials, "max_tasks": tune_max_tasks}
        result = _compile_into(tmp, model, preset, raw, config or QuantConfig(), shapes, precision, plan, progress, tuning,
                               auto)
    result.output_dir = output_dir
    return result


@dataclass
class QuantizedModel:
    """An imported model, prepared and (for int8) quantized: what gets compiled or tuned."""

    module: object = field(repr=False)
    float_module: object = field(repr=False)
    info: object
    plan: object
    warnings: list[str]
    precision: dict | None = None  # what --precision auto measured and chose


@dataclass(frozen=True)
class AutoPrecision:
    """``--precision auto``: the metric, the budget and the data it is measured on."""

    metric: str = "sqnr"
    max_drop: float | None = None  # metric points (top1: percentage points)
    min_sqnr: float | None = None  # dB
    eval_data: object = None  # folder of samples (+ labels.npy); default: the calibration data
    output_slices: tuple[str, ...] = ()  # NAME:START:STOP parts of outputs judged apart (--output-slice)

    def budget(self) -> float:
        """The budget in the metric's units; raises on anything missing, before any work."""
        from tvmq.config import DEFAULT_MIN_SQNR
        from tvmq.precision import Metric

        metric = Metric(self.metric)
        if metric.kind.startswith("python:"):
            metric.function()
        if self.metric == "sqnr":
            budget = DEFAULT_MIN_SQNR if self.min_sqnr is None else self.min_sqnr
        elif self.max_drop is None:
            raise TvmqError(f"--precision auto with the {self.metric} metric needs --max-drop POINTS")
        else:
            budget = self.max_drop / 100 if self.metric == "top1" else self.max_drop
        if metric.needs_labels and (self.eval_data is None or not (Path(self.eval_data) / "labels.npy").exists()):
            raise TvmqError(f"metric {self.metric} needs labels: pass --eval-data DIR with samples and labels.npy "
                            "(one label per sample)")
        return budget


def load_eval_data(path, inputs) -> tuple[list[dict], np.ndarray | None]:
    """Samples of a data folder (as for calibration) and its ``labels.npy`` if present."""
    from tvmq.calibrate import load_samples_dir

    path = Path(path)
    samples = load_samples_dir(path, inputs)
    labels = None
    if (path / "labels.npy").exists():
        labels = np.load(path / "labels.npy", allow_pickle=False)
        if len(labels) != len(samples):
            raise TvmqError(f"{path}/labels.npy has {len(labels)} labels for {len(samples)} samples; give one per sample")
    return samples, labels


class _Candidate:
    """A plan compiled for this machine: its integer program's metric and, later, its latency."""

    def __init__(self, float_mod, plan, samples, names, metric, labels, ref, parts):
        from tvmq.execute import HostModule
        from tvmq.quantize import quantize_pipeline

        self.plan = plan
        self.module = HostModule(quantize_pipeline(plan)(float_mod))
        self.first = [samples[0][n] for n in names]
        out = [parts(self.module(*[s[n] for n in names])) for s in samples]
        self.metric = metric(out, ref, labels)
        # each output and slice apart (what the report shows; the metric above is their worst)
        self.parts = parts.values(metric, out, ref, labels) if metric.kind in ("sqnr", "cosine") else {}
        self.ms = None


def _race(candidates: list, rounds: int = 7, runs: int = 10) -> None:
    """Median latency of each compiled candidate, timed in turns (drift hits all alike)."""
    import time

    calls = [c.module.prepared(*c.first) for c in candidates]
    times = [[] for _ in candidates]
    for _ in range(rounds):
        for call, t in zip(calls, times):
            call()  # not timed: the previous model's worker threads may still spin
            for _ in range(runs):
                t0 = time.perf_counter()
                call()
                t.append((time.perf_counter() - t0) * 1e3)
    for c, t in zip(candidates, times):
        c.ms = float(np.median(t))


def _auto_precision(float_mod, samples, config, auto: AutoPrecision, preset, names, info, progress, concat=()):
    """Calibrate, measure per-layer sensitivity and latency, and choose the plan.

    The exact search, the greedy baseline and the INC-style fallback each propose a plan; each
    is compiled as the integer program it will be and checked against the budget, and on a
    target that runs here the passing ones race (whole-model latency, which also counts the
    conversions between int8 and float regions that per-layer kernel times leave out).
    """
    from tvmq import precision as P
    from tvmq.quantize import calibrate

    metric = P.Metric(auto.metric)
    budget = auto.budget()
    output_names = [o.name for o in info.outputs]
    parts = P.OutputParts(tuple(output_names),
                          (*concat, *(P.parse_output_slice(t, output_names) for t in auto.output_slices)))
    full = calibrate(float_mod, samples, config, target=preset.name, input_names=names, progress=progress)
    eval_samples, labels = (samples, None) if auto.eval_data is None else load_eval_data(auto.eval_data, list(info.inputs))
    analysis = P.analyse(float_mod, full, eval_samples, names, metric, labels, preset=preset, progress=progress,
                         parts=parts)
    greedy, greedy_value = P.search(analysis, budget, "greedy")
    fallback, fallback_value, evaluations = P.fallback_plan(analysis, budget)
    seeds = [a for a, v in ((fallback, fallback_value), (greedy, greedy_value)) if P.meets(analysis, v, budget)]

    def summary(assignment, value):
        counts = Counter(assignment.values())
        return {"int8_layers": counts["int8"], "fp16_layers": counts["fp16"], "metric": value,
                "latency_ms": P.latency(analysis, assignment), "assignment": assignment}

    compiled = {}

    def candidate(assignment):
        key = tuple(assignment[n] for n in sorted(assignment))
        if key not in compiled:
            plan = full
            if any(p != "int8" for p in assignment.values()):
                plan = calibrate(float_mod, samples, P.config_for(config, assignment), target=preset.name,
                                 input_names=names)
            compiled[key] = _Candidate(float_mod, plan, eval_samples, names, metric, labels, analysis.reference, parts)
        return compiled[key]

    # The simulation and the integer program round alike up to requantization; should a
    # proposal miss as an integer program, it is repaired: the most sensitive layer it still
    # quantizes goes back to float, until it meets the budget. (Searching again with a tighter
    # budget changes nothing when the metric moves in whole samples, as accuracy does.) The
    # INC-style fallback is repaired the same way, as INC itself judges the quantized model.
    chosen, _ = P.search(analysis, budget, "exact", seeds=seeds)
    repaired = {}

    def repair(assignment):
        steps = 0
        for name in [n for n in P.most_sensitive_first(analysis) if assignment[n] != "fp32"][:8]:
            if P.meets(analysis, candidate(assignment).metric, budget):
                break
            assignment, steps = {**assignment, name: "fp32"}, steps + 1
        return assignment, steps

    chosen, repaired["exact search"] = repair(chosen)
    greedy, repaired["greedy"] = repair(greedy)
    greedy_value = analysis.evaluate(greedy)
    fallback, repaired["fallback (INC-style)"] = repair(fallback)
    evaluations += repaired["fallback (INC-style)"]
    fallback_value = analysis.evaluate(fallback)
    proposals = {"exact search": chosen, "greedy": greedy, "fallback (INC-style)": fallback}
    race = {label: candidate(a) for label, a in proposals.items()}
    passing = {label: c for label, c in race.items() if P.meets(analysis, c.metric, budget)}
    winner = "exact search"
    if passing and winner not in passing:
        winner = min(passing, key=lambda label: P.latency(analysis, proposals[label]))
    if preset.runs_here and len({id(c) for c in passing.values()}) > 1:
        _race(list({id(c): c for c in passing.values()}.values()))
        winner = min(passing, key=lambda label: (passing[label].ms, label != "exact search"))
    # The simulation and the integer programs disagree about borderline samples, so the winner's
    # float layers get one more try as what will ship: each (the largest estimated saving first,
    # at most 8) in its quantized precision, compiled, kept when the integer program meets the
    # budget. A refined plan then races the winner it came from.
    refined = []
    if winner in passing:
        best = proposals[winner]
        for _, i, precision in P.float_layers_by_saving(analysis, best)[:8]:
            trial = {**best, analysis.layers[i].name: precision}
            if P.meets(analysis, candidate(trial).metric, budget):
                best = trial
                refined.append(analysis.layers[i].name)
        if refined:
            proposals["refined"], race["refined"], repaired["refined"] = best, candidate(best), 0
            if preset.runs_here:
                _race([race[winner], race["refined"]])
            if not preset.runs_here or race["refined"].ms <= race[winner].ms:
                winner = "refined"
    exact = summary(proposals["exact search"], analysis.evaluate(proposals["exact search"]))
    chosen, plan, value = proposals[winner], race[winner].plan, race[winner].metric

    report = {
        "metric": metric.kind,
        "budget": budget,
        "samples": len(eval_samples),
        "candidates": ["fp32", *analysis.candidates],
        "latency_source": (f"estimated for {preset.name}: MACs x the ISA's int8/fp32 rate "
                           f"({preset.int8_kernel or 'no int8 micro-kernel'}; slower than float where its rules say "
                           "int8 does not pay), plus the int8/float conversions around float layers"
                           if any(l.estimated for l in analysis.layers) else "measured kernels on this machine"),
        "fp32": analysis.fp32,
        "all_int8": analysis.all_int8,
        "plan": value,
        "assignment": chosen,
        "chosen_from": winner,
        "refined_layers": refined,
        "refined": summary(proposals["refined"], analysis.evaluate(proposals["refined"])) if refined else None,
        "race": {label: {"metric": c.metric, "passes": P.meets(analysis, c.metric, budget), "measured_ms": c.ms,
                         "repaired_layers": repaired[label]}
                 for label, c in race.items()},
        # each output and output slice apart: the chosen plan compiled, every layer int8 simulated
        "parts": {"plan": race[winner].parts,
                  "all_int8": parts.values(metric, analysis.outputs(analysis.names), analysis.reference, labels)
                  if race[winner].parts else {}},
        "int8_layers": sorted(n for n, p in chosen.items() if p == "int8"),
        "latency_ms": {"fp32": P.latency(analysis, {}), "all_int8": P.latency(analysis, analysis.names),
                       "plan": P.latency(analysis, chosen)},
        "exact": exact,
        "greedy": summary(greedy, greedy_value),
        "fallback": {**summary(fallback, fallback_value), "evaluations": evaluations},
        "evaluations": analysis.evaluations,
        "layers": [{"name": l.name, "kind": l.kind, "only_int8": l.only_int8, "only_float": l.only_float,
                    "only_fp16": l.only_fp16, "sqnr_int8": l.sqnr_int8, "sqnr_fp16": l.sqnr_fp16,
                    "int8_ms": l.int8_ms, "fp32_ms": l.fp32_ms, "fp16_ms": l.fp16_ms, "boundary_ms": l.boundary_ms,
                    "chosen": chosen[l.name]} for l in analysis.layers],
    }
    return plan, report


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


def quantized_module(model, preset, raw=None, config=None, shapes=None, precision="int8", plan=None,
                     progress=False, auto: AutoPrecision | None = None) -> QuantizedModel:
    """Import ``model``, prepare it, and quantize it by calibration (``raw``) or ``plan``."""
    import tvm

    from tvmq.calibrate import load_samples_dir, validate_samples
    from tvmq.frontend import load_onnx
    from tvmq.plan import QuantPlan
    from tvmq.precision import concat_slices
    from tvmq.quantize import calibrate, finish, prepare, quantize_pipeline, smooth

    config = config or QuantConfig()
    if isinstance(raw, (str, Path)):
        raw = _load_raw_samples(raw)
    qplan = None
    if precision == "int8" and plan is not None:
        qplan = plan if isinstance(plan, QuantPlan) else _read_plan(plan)
        shapes = {**qplan.input_shapes, **(shapes or {})}  # a plan is made for fixed shapes
    first = None
    if isinstance(raw, Path):
        first = _peek_sample(raw)
    elif raw:
        first = dict(raw[0])
    mod, info = load_onnx(model, shapes, sample=first)
    names = [s.name for s in info.inputs]
    warnings = list(preset.warnings())
    if info.float_ops:
        warnings.append("ops kept in float (no int8 kernel for them): " + ", ".join(info.float_ops))
    from tvmq.passes.strip_qdq import has_qdq, strip_qdq

    if has_qdq(mod):
        # A pre-quantized (QDQ / QAT) model: its own scales are the plan; no calibration.
        mod, source_plan = strip_qdq(mod)
        float_mod = prepare(mod, fold_batchnorm=False)
        if precision != "int8":
            return QuantizedModel(float_mod, float_mod, info, None, warnings)
        if raw is not None:
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
    # the parts of each output's final Concat, as the model has them (prepare changes layouts)
    concat = concat_slices(mod["main"], [o.name for o in info.outputs]) if precision == "auto" else ()
    float_mod = prepare(mod)
    if precision == "fp32":
        return QuantizedModel(finish(float_mod, config), float_mod, info, None, warnings)
    if precision == "fp16":
        qplan = _fp16_plan(float_mod, config, info)
        if not preset.fp16:
            warnings.append(f"target {preset.name!r} has no fast fp16 arithmetic: fp16 layers save memory, not time")
        return QuantizedModel(finish(quantize_pipeline(qplan)(float_mod), config), float_mod, info, qplan, warnings)
    report = None
    if qplan is None:
        if raw is None:
            raise TvmqError("int8 compilation needs calibration data: pass --calib DIR (one .npy/.npz per sample) or --plan")
        samples = load_samples_dir(raw, list(info.inputs)) if isinstance(raw, Path) else validate_samples(raw, list(info.inputs))
        if config.smoothquant:
            float_mod = smooth(float_mod, samples, config.smoothquant, names)
        if precision == "auto":
            qplan, report = _auto_precision(float_mod, samples, config, auto or AutoPrecision(), preset, names, info,
                                            progress, concat)
        else:
            qplan = calibrate(float_mod, samples, config, target=preset.name, input_names=names, progress=progress)
    elif config.smoothquant:
        raise TvmqError("--smoothquant changes the weights the plan was made for; use it when calibrating, not with --plan")
    try:
        qmod = finish(quantize_pipeline(qplan)(float_mod), config)
    except tvm.error.TVMError as err:  # pragma: no cover - a bug, reported as such
        raise TvmqError(f"quantization failed inside TVM: {str(err).splitlines()[0][:300]}; please report it") from None
    return QuantizedModel(qmod, float_mod, info, qplan, warnings, report)


def _compile_into(tmp: Path, model, preset, raw, config, shapes, precision, plan, progress, tuning, auto) -> CompileResult:
    from tvmq.kernels import reduction_kernels
    from tvmq.pipeline import compile_lowered, lower

    qm = quantized_module(model, preset, raw, config, shapes, precision, plan, progress, auto)
    qmod, float_mod, info, qplan, warnings = qm.module, qm.float_module, qm.info, qm.plan, qm.warnings
    database, tuning_info = None, None
    if tuning["db"] is not None:
        from tvmq.tune import load_database, tune

        if tuning["trials"]:
            tune(qmod, preset, tuning["db"], trials=tuning["trials"], max_tasks=tuning["max_tasks"], progress=progress)
        database = load_database(tuning["db"], qmod, preset)
        tuning_info = {"tuned_kernels": len(database.get_all_tuning_records())}
    if preset.kind == "cuda":
        from tvmq.cuda import prepare_cuda_build

        prepare_cuda_build()
    lowered = lower(qmod, preset, database)
    kernels = reduction_kernels(lowered)
    executable = compile_lowered(lowered, preset)
    lib_path = tmp / LIBRARY
    if preset.cross_compiler:
        from tvmq._compat import cross_compiler

        executable.export_library(str(lib_path), fcompile=cross_compiler(preset.cross_compiler))
    else:
        executable.export_library(str(lib_path))

    shutil.copyfile(Path(__file__).with_name("runtime.py"), tmp / "run.py")
    shutil.copyfile(Path(__file__).with_name("runner") / "tvmq_run.cc", tmp / "tvmq_run.cc")
    if qplan is not None:
        (tmp / "plan.json").write_text(qplan.dumps() + "\n")

    manifest = _manifest(model, info, preset, qplan, float_mod, qmod, kernels, warnings)
    manifest["tuning"] = tuning_info
    manifest["precision"] = qm.precision
    report_md = _report(manifest)
    if qm.precision is not None:
        from tvmq.report import precision_markdown, write_html

        report_md += precision_markdown(qm.precision)
        write_html(tmp, manifest)
    (tmp / "report.md").write_text(report_md)
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    manifest["files"] = {name: sha256_file(tmp / name) for name in files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return CompileResult(tmp, manifest, qmod, float_mod, executable, qplan, info, warnings)


def _peek_sample(path: Path) -> dict | None:
    from tvmq.calibrate import LABELS

    files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz") and p.name != LABELS)
    if not files:
        raise TvmqError(f"calibration directory {path} holds no .npy or .npz files; add one file per sample")
    f = files[0]
    try:
        if f.suffix == ".npz":
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        arr = np.load(f, allow_pickle=False)
    except Exception as err:  # numpy raises several types for damaged files
        raise TvmqError(f"cannot read calibration sample {f}: {err}; replace or remove the file") from None
    return {None: arr}  # the single input, named once the model is read


def _read_plan(path):
    from tvmq.plan import QuantPlan

    try:
        return QuantPlan.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TvmqError(f"plan file {path} does not exist") from None
    except (ValueError, KeyError, TypeError) as err:
        raise TvmqError(f"plan file {path} is not a valid tvmq plan ({err}); regenerate it with tvmq compile") from None


def _versions() -> dict:
    from importlib import metadata

    import tvmq

    out = {"tvmq": tvmq.__version__}
    for dist in ("apache-tvm", "apache-tvm-ffi", "onnx", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _manifest(model, info, preset, plan, float_mod, qmod, kernels, warnings) -> dict:
    from tvmq.passes import find_layers
    from tvmq.passes.insert_qdq import weight_qparams

    target = dict(preset.target)
    model_entry = {"opset": info.opset, "producer": info.producer}
    if isinstance(model, (str, Path)):
        model_entry.update(file=Path(model).name, sha256=sha256_file(model))
    layers = {}
    for layer in find_layers(float_mod["main"]):
        entry = {"kind": layer.kind, "precision": "fp32"}
        if plan is not None and layer.name in plan.layers:
            lp = plan.layers[layer.name]
            entry.update(lp.to_json())
            if lp.is_int8 and layer.weight is not None:
                wqp = weight_qparams(layer.weight, layer.weight_axis)
                entry["weight"] = {
                    "dtype": "int8",
                    "per_channel_axis": int(wqp.axis),
                    "scale_min": float(wqp.scale.min()),
                    "scale_max": float(wqp.scale.max()),
                }
        layers[layer.name] = entry
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "library": LIBRARY,
        "runner": {"python": "run.py", "cpp": "tvmq_run.cc",
                   "needs": ["libtvm_runtime.so", "libtvm_ffi.so", "numpy + tvm_ffi (run.py only)"]},
        "versions": _versions(),
        "model": model_entry,
        "target": {
            "preset": preset.name,
            "tvm": target,
            "triple": target.get("mtriple") or (target.get("host", {}) or {}).get("mtriple") or "x86_64-linux-gnu",
            "cpu": target.get("mcpu") or (target.get("host", {}) or {}).get("mcpu"),
            "features": list(target.get("mattr", [])),
            "device": "cuda" if preset.kind == "cuda" else "cpu",
            "activation_dtype": preset.activation_dtype,
            "int8_kernel": preset.int8_kernel,
            "int8_instructions": list(preset.micro_kernel.mnemonics) if preset.micro_kernel else [],
        },
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in info.inputs],
        "outputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in info.outputs],
        "quantization": None if plan is None else {
            "method": plan.method,
            "activation_dtype": plan.activation_dtype,
            "requantize": plan.requantize,
            "int8_layers": plan.count("int8"),
            "float_layers": plan.count("fp32") + plan.count("fp16"),
            "fp16_layers": plan.count("fp16"),
            # float because the ISA's int8 kernel is no faster there (QuantConfig.int8_everywhere)
            "kept_float_for_speed": [n for n in plan.kept_float if plan.get(n) and not plan.get(n).is_int8],
        },
        "layers": layers,
        "kernels": [
            {"func": k.func, "block": k.block, "operands": list(k.operand_dtypes), "accumulator": k.accum_dtype,
             "intrinsic": k.intrinsic}
            for k in sorted(kernels, key=lambda k: (k.func, k.block))
        ],
        "weight_bytes": {"float_model": weight_bytes(float_mod), "compiled": weight_bytes(qmod)},
        "float_ops": list(info.float_ops),
        "warnings": warnings,
    }


def _fmt_qp(d: dict | None) -> str:
    if not d:
        return "float"
    if isinstance(d.get("scale"), list):
        return f"{d['dtype']} per-channel"
    return f"{d['dtype']} s={d['scale']:.4g} zp={d['zero_point']}"


def _report(m: dict) -> str:
    lines = [
        f"# tvmq build report: {m['model'].get('file', 'model')}",
        "",
        f"- target: `{m['target']['preset']}` ({m['target']['triple']}, cpu {m['target']['cpu']})",
        f"- tvmq {m['versions']['tvmq']}, apache-tvm {m['versions']['apache-tvm']}",
    ]
    q = m["quantization"]
    if q:
        lines.append(
            f"- quantization: {q['int8_layers']} int8 layers, {q['float_layers']} float ({q.get('fp16_layers', 0)} of them fp16); "
            f"calibration `{q['method']}`, "
            f"activations {q['activation_dtype']}, requantize `{q['requantize']}`"
        )
        if q.get("kept_float_for_speed"):
            from tvmq.targets.intrinsics import MICRO_KERNELS

            kernel = m["target"]["int8_kernel"]
            lines.append(f"- kept float where int8 is no faster on `{kernel}` ({MICRO_KERNELS[kernel].float_rules()}; "
                         f"`--int8-everywhere` quantizes them): {', '.join(q['kept_float_for_speed'])}")
    wb = m["weight_bytes"]
    total_f = sum(wb["float_model"].values())
    total_c = sum(wb["compiled"].values())
    lines.append(f"- constant bytes: {total_f} in the float model, {total_c} compiled ({wb['compiled']})")
    for w in m["warnings"]:
        lines.append(f"- warning: {w}")
    lines += ["", "## Layers", "", "| layer | kind | precision | input | output | weight scale range |", "|---|---|---|---|---|---|"]
    for name, e in m["layers"].items():
        inputs = ", ".join(_fmt_qp(i) for i in e.get("inputs", [])) or "float"
        w = e.get("weight")
        wr = f"{w['scale_min']:.3g} .. {w['scale_max']:.3g}" if w else ""
        lines.append(f"| {name} | {e['kind']} | {e['precision']} | {inputs} | {_fmt_qp(e.get('output'))} | {wr} |")
    lines += ["", "## Multiply-accumulate kernels (lowered TIR)", "",
              "| kernel | operands | accumulator | micro-kernel intrinsic |", "|---|---|---|---|"]
    for k in m["kernels"]:
        lines.append(f"| {k['func']} | {' x '.join(k['operands'])} | {k['accumulator']} | {k.get('intrinsic') or ''} |")
    return "\n".join(lines) + "\n"
