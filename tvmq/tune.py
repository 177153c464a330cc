"""Tuning: MetaSchedule search over tvmq's kernel schedules, and verified reuse of the results.

The design spaces of each kernel are tvmq's own default schedule in each loop order it may
take (pixel tiles outermost, weight blocks outermost, a float conv's input channels in chunks)
with its tile sizes sampled (:func:`tvmq.targets.schedules.tunable_schedule`): MetaSchedule's
evolutionary search, guided by its XGBoost cost model, samples the spaces, mutates the tiles and
measures candidates. The other kernels (pools, norms, elementwise epilogues, layout changes)
are searched in MetaSchedule's own design space for the target (multi-level tiling,
parallel/vector/unroll choices, inlining), where they take at least ``GENERIC_MIN_SHARE`` of the
model's kernel time and ``GENERIC_MIN_US`` on this machine. The untuned build is recorded as one
measured candidate of every kernel, so tuning can only pick something measured to be faster.

The search's XGBoost cost model starts from a prior where tvmq ships one for the target's ISA
(``tvmq/costmodels/<isa>.tar.gz``, :func:`train_cost_model` on the records of tuned zoo models):
without one, MetaSchedule's model guesses at random until it has 100 measurements of its own.

Results go to a JSON database in ``--db DIR`` (``database_workload.json`` and
``database_tuning_record.json``), keyed by kernel (structural hash) and target. Before a tuned
kernel is used, :func:`load_database` runs it against the untuned build of the same kernel on
random inputs; a kernel that disagrees is rejected (listed in ``rejected.json``) and the next
best record is tried. MetaSchedule itself never checks results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi

from tvmq.errors import TvmqError

__all__ = ["Task", "TuneReport", "extract_tasks", "tune", "load_database", "verify_schedule", "isa_key",
           "shipped_cost_model", "prior_path", "train_cost_model"]

log = logging.getLogger("tvmq")

REJECTED = "rejected.json"
# Candidates per kernel: by default, and when only a time budget is given (``--time``: the time
# ends the search).
TRIALS = 32
TRIALS_WITH_TIME = 1000
COST_MODELS = Path(__file__).resolve().parent / "costmodels"
# A kernel outside tvmq's packed/depthwise schedules is tuned (in MetaSchedule's generic design
# space) when its untuned time (all its calls) is at least this share of the model's kernel time
# and this many microseconds: smaller ones are not worth a trial (a few-microsecond call is mostly
# its launch). Only where kernels are timed here (their time decides).
GENERIC_MIN_SHARE = 0.01
GENERIC_MIN_US = 5.0
# How a kernel is timed (the untuned one and every candidate alike): one call per repeat, its
# weights (every argument but the first, the input) flushed from the cache first, as they come
# in the model, where the other layers' weights have evicted them. Timed hot (20 calls in a row),
# PP-OCRv6 rec's FP32 kernels tuned for 10 minutes measured 7.80 -> 6.41 ms summed and the model
# ran slower than untuned (8.90 -> 9.34 ms, 0.95x); timed cold, 10.39 -> 8.90 ms summed and the
# model 9.21 -> 8.91 ms (1.03x). One run each (AVX-512 VNNI host, 2 threads).
_TIMING = dict(number=1, repeat=20, min_repeat_ms=0)
_FLUSH = "cache_flush_cpu_non_first_arg"  # what MetaSchedule's enable_cpu_cache_flush runs
_BUILDER_TIMEOUT = 300.0  # a fresh builder process spends 30-60 s importing TVM's intrinsics


@dataclass
class Task:
    """One distinct kernel to tune; ``weight`` counts its occurrences in the model."""

    name: str
    mod: tvm.IRModule
    weight: int = 1
    untuned_s: float | None = None  # one call under the default schedule, timed here
    untuned_runs: list[float] = field(default_factory=list)  # its timed repeats (seconds per call)
    default_trace: object = None  # the default schedule's trace (what was timed)
    generic: bool = False  # not one of tvmq's packed/depthwise kernels: MetaSchedule's own design space


@dataclass
class TuneReport:
    tasks: list[dict] = field(default_factory=list)
    trials: int = 0  # candidates measured
    database: str = ""
    out_of_time: bool = False  # the time budget ended the search before the trials did
    kernel_ms: tuple[float, float] | None = None  # the tuned kernels' time in the model: untuned, tuned
    cost_model: str = "none"  # the prior the search's cost model started from ("none": MetaSchedule's own)
    # after each measured batch: (candidates measured so far, the tuned kernels' time in the model, ms)
    history: list[tuple[int, float]] = field(default_factory=list)


def _normalized(func) -> tvm.IRModule:
    if "global_symbol" not in (func.attrs or {}):
        func = func.with_attr("global_symbol", "main")
    return tvm.IRModule({"main": func.with_attr("tirx.noalias", True)})


def extract_tasks(mod: tvm.IRModule, preset, generic: bool = False) -> list[Task]:
    """The tunable kernels of ``mod`` (packed conv/matmul and depthwise; with ``generic``, every
    other kernel over static shapes too, but tvmq's LSTM loop), deduplicated."""
    from tvmq._compat import tir
    from tvmq.kernels import call_order
    from tvmq.pipeline import dot_intrinsics, fuse
    from tvmq.targets.recurrence import LSTM_ATTR
    from tvmq.targets.schedules import is_tunable

    dot_intrinsics(preset)
    fused = fuse(mod, preset)
    calls = Counter(call_order(fused)) if any(gv.name_hint == "main" for gv in fused.get_global_vars()) else Counter()
    tasks: list[Task] = []
    for gv, func in fused.functions_items():
        if not isinstance(func, tir.PrimFunc):
            continue
        packed = is_tunable(func)
        if not packed and not (generic and _static(func) and LSTM_ATTR not in (func.attrs or {})):
            continue
        task_mod = _normalized(func)
        weight = calls.get(gv.name_hint, 1)  # a kernel main calls 6 times (6 blocks alike) weighs 6
        for task in tasks:
            if tvm_ffi.structural_equal(task.mod, task_mod):
                task.weight += weight
                break
        else:
            tasks.append(Task(gv.name_hint, task_mod, weight=weight, generic=not packed))
    return tasks


def _static(func) -> bool:
    """Every buffer of ``func`` has a static shape (MetaSchedule's search needs one)."""
    from tvmq._compat import tir

    return all(isinstance(d, tir.IntImm) for p in func.params for d in getattr(p, "shape", None) or [])


def _cost(task: Task) -> float:
    """Rough work estimate (bytes of all buffers) used to tune the biggest kernels first."""
    func = task.mod["main"]
    total = 0
    for p in func.params:
        shape = [int(s) for s in p.shape]
        total += int(np.prod(shape)) if shape else 1
    return total * task.weight


def _untuned_seconds(task: Task, preset) -> float | None:
    """The task's kernel under tvmq's default schedule, timed on this machine (median seconds of
    one call); None where it cannot run here (a cross target, a dynamic shape)."""
    if preset.cross_compiler or preset.kind != "llvm":
        return None
    try:
        sch = _default_sch(task.mod["main"], preset)
        func = task.mod["main"] if sch is None else sch.mod["main"]
        task.default_trace = None if sch is None else sch.trace
        lib = tvm.compile(tvm.IRModule({"main": func}), preset.tvm_target()).jit()
        args = [tvm.runtime.tensor(a) for a in _random_args(func, np.random.default_rng(0))]
        # as the runner measures candidates (``_search``), so the two compare
        timer = lib.time_evaluator("main", tvm.cpu(), **_TIMING, f_preproc=_FLUSH)
        task.untuned_runs = [float(r) for r in timer(*args).results]
        return float(np.median(task.untuned_runs))
    except Exception:  # pylint: disable=broad-except
        return None


def _order(tasks: list[Task], preset) -> list[Task]:
    """Tasks by their share of the model's kernel time (untuned time x occurrences), largest
    first; by buffer sizes where the kernels cannot be timed here. Generic kernels stay only
    where timed, when they take at least ``GENERIC_MIN_SHARE`` of the time and ``GENERIC_MIN_US``,
    and their untuned schedule can be recorded (so that a tuned one is used only where measured
    faster)."""
    for task in tasks:
        task.untuned_s = _untuned_seconds(task, preset)
    tasks = [t for t in tasks if not t.generic or (t.untuned_s is not None and t.default_trace is not None)]
    if all(t.untuned_s is not None for t in tasks):
        total = sum(t.untuned_s * t.weight for t in tasks)
        tasks = [t for t in tasks if not t.generic
                 or t.untuned_s * t.weight >= max(GENERIC_MIN_SHARE * total, GENERIC_MIN_US * 1e-6)]
        return sorted(tasks, key=lambda t: t.untuned_s * t.weight, reverse=True)
    return sorted([t for t in tasks if not t.generic], key=_cost, reverse=True)


class _Progress:
    """tqdm bar over all trials, showing the best time so far of the task being tuned."""

    def __init__(self, total: int, names: list[str], enabled: bool, deadline: float | None = None,
                 untuned: list[tuple[float | None, int]] | None = None):
        self.untuned = untuned or []  # (untuned seconds, occurrences) of each task
        self.best: dict[int, float] = {}
        self.errors: dict[int, str] = {}  # first build/run error of each task
        self.names = names
        self.measured = 0
        self.deadline = deadline  # time.monotonic() after which no new batch starts
        self.out_of_time = False
        self.history: list[tuple[int, float]] = []  # (measured, kernels' estimated seconds)
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="tuning", unit="trial")

    def update(self, task_id: int, seconds: list[float]) -> None:
        self.measured += len(seconds)
        good = [s for s in seconds if s is not None and np.isfinite(s)]
        if good:
            self.best[task_id] = min(self.best.get(task_id, float("inf")), min(good))
        estimate = self.estimate()
        if estimate is not None:
            self.history.append((self.measured, estimate[1]))
        if self.bar is not None:
            self.bar.update(len(seconds))
            best = self.best.get(task_id)
            self.bar.set_postfix_str((f"{self.names[task_id][:32]} best {best * 1e6:.1f} us" if best else "")
                                     + (f"; kernels {estimate[1] * 1e3:.3f} ms (untuned {estimate[0] * 1e3:.3f})"
                                        if estimate else ""))

    def estimate(self) -> tuple[float, float] | None:
        """``(untuned, now)`` seconds of the tuned kernels, occurrences counted: the model's time
        spent in them, before and with the best candidate of each so far."""
        if not self.untuned or any(s is None for s, _ in self.untuned):
            return None
        before = sum(s * w for s, w in self.untuned)
        now = sum(min(s, self.best.get(i, s)) * w for i, (s, w) in enumerate(self.untuned))
        return before, now

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _measure_callback(progress: _Progress):
    from tvm.ir.utils import derived_object

    from tvmq._compat import meta_schedule

    ms = meta_schedule()

    @derived_object
    class ProgressCallback(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            secs = []
            for b, r in zip(builder_results, runner_results):
                run = [float(x) for x in r.run_secs] if r.run_secs else []
                secs.append(float(np.median(run)) if run and r.error_msg is None else None)
                error = b.error_msg or r.error_msg
                if error and task_id not in progress.errors:
                    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                    progress.errors[task_id] = (lines[-1] if lines else "unknown error")[:300]
            progress.update(task_id, secs)
            if progress.deadline is not None and time.monotonic() >= progress.deadline and not progress.out_of_time:
                # the budget is spent: every task ends after the batch in flight
                progress.out_of_time = True
                for i in range(len(progress.names)):
                    try:
                        task_scheduler.terminate_task(i)
                    except Exception:  # pylint: disable=broad-except
                        pass  # already finished

    return ProgressCallback()


def parse_duration(text: str) -> float:
    """``--time`` values: ``90s``, ``10m``, ``1h`` or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    value, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        seconds = float(value) * unit
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise TvmqError(f"--time {text!r} is not a duration; give e.g. --time 10m, --time 90s or --time 1h")
    return seconds


def require_board_runner(preset, runner) -> None:
    """A cross target's kernels run on its boards: tuning needs an RPC runner for them."""
    if preset.cross_compiler and runner is None:
        raise TvmqError(f"kernels for {preset.name} are measured on the board: pass --rpc-tracker HOST:PORT "
                        "--rpc-key KEY (a tracker with the board's RPC server registered)")


def tune(
    mod: tvm.IRModule,
    preset,
    db_dir: str | Path,
    *,
    trials: int = TRIALS,
    max_tasks: int | None = None,
    progress: bool = True,
    seed: int = 0,
    runner=None,
    time_budget: float | None = None,
    batch: int = 16,
    cost_model: str | Path | None = "auto",
) -> TuneReport:
    """Tune the kernels of ``mod`` (a quantized or float Relax module) and store the results.

    Parameters
    ----------
    trials : int
        Measured candidates per kernel.
    max_tasks : int, optional
        Tune only the largest kernels (by buffer size x occurrences).
    runner : MetaSchedule runner, optional
        Where candidates are measured; default this machine (``LocalRunner``). An ``RPCRunner``
        measures on boards.
    time_budget : float, optional
        Seconds of search (``--time 10m``): no batch of candidates starts after it, whatever
        ``trials`` is left; ``report.out_of_time`` says when it ended the search.
    batch : int
        Candidates built and measured per round (the budget is checked between rounds).
    cost_model : path, "auto" or None
        The prior of the search's cost model: a file written by :func:`train_cost_model`;
        ``"auto"`` (default) the one tvmq ships for the target's ISA, if any; None none.
    """
    from tvmq._compat import meta_schedule
    from tvmq.targets import get_preset

    ms = meta_schedule()
    preset = get_preset(preset)
    if trials < 1:
        raise TvmqError(f"--trials must be at least 1, got {trials}")
    if time_budget is not None and time_budget <= 0:
        raise TvmqError(f"--time must be positive, got {time_budget:g} s")
    deadline = None if time_budget is None else time.monotonic() + time_budget
    prior = prior_path(cost_model, preset)
    prior_name = str(prior) if prior else "none"
    try:  # before anything is written: a damaged prior leaves no database behind
        model = _xgb_model(ms, prior)
    except TvmqError as err:
        if str(cost_model) != "auto":
            raise
        # the shipped prior, unreadable here (another xgboost?): tune without it, and say so
        log.warning("%s; tuning without a prior", err)
        model, prior_name = _xgb_model(ms, None), f"none ({prior.name} unreadable here)"
    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    target = preset.tvm_target()
    tasks = _order(extract_tasks(mod, preset, generic=True), preset)
    total_s = sum(t.untuned_s * t.weight for t in tasks) if all(t.untuned_s is not None for t in tasks) else None
    if max_tasks is not None:
        tasks = tasks[:max_tasks]
    report = TuneReport(database=str(db_dir), cost_model=prior_name)
    if not tasks:
        return report
    contexts = _tune_contexts(ms, tasks, preset, target, seed)
    database = _json_database(db_dir)
    _record_defaults(ms, tasks, database, preset)
    bar = _Progress(trials * len(tasks), [t.name for t in tasks], progress, deadline,
                    [(t.untuned_s, t.weight) for t in tasks])
    _search(ms, tasks, contexts, database, bar, db_dir=db_dir, trials=trials, preset=preset, runner=runner, batch=batch,
            cost_model=model)
    report.trials, report.out_of_time = bar.measured, bar.out_of_time
    report.history = [(n, s * 1e3) for n, s in bar.history]
    report.kernel_ms = None if bar.estimate() is None else tuple(v * 1e3 for v in bar.estimate())
    for i, task in enumerate(tasks):
        best = bar.best.get(i)
        report.tasks.append({"name": task.name, "weight": task.weight, "generic": task.generic,
                             "best_us": None if best is None else best * 1e6,
                             "untuned_us": None if task.untuned_s is None else task.untuned_s * 1e6,
                             # the kernel's share of the model's tunable kernel time, untuned
                             "share": None if total_s is None else task.untuned_s * task.weight / total_s,
                             "error": bar.errors.get(i) if best is None else None})
    return report


def _record_defaults(ms, tasks: list[Task], database, preset) -> None:
    """Each task's default schedule as a record, with the time it was measured at: the database
    then holds the untuned kernel among the candidates, and a tuned one is used only where it
    was measured faster (the random search need not meet the default's tiles)."""
    for task in tasks:
        if not task.untuned_runs or task.default_trace is None:
            continue
        workload = database.commit_workload(task.mod)
        database.commit_tuning_record(ms.database.TuningRecord(
            task.default_trace, workload, task.untuned_runs, preset.tvm_target(),
            ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])))


def _design_space(preset):
    """The ``ScheduleFn`` body of ``preset``'s tuned kernels (:func:`tunable_schedule` with its
    micro-kernel and registers): one design space per loop order of a packed kernel."""
    from tvmq.pipeline import dot_intrinsics
    from tvmq.targets.schedules import tunable_schedule

    return tunable_schedule(dot_intrinsics(preset), lanes=preset.vector_lanes, registers=preset.vector_registers)


def _tune_contexts(ms, tasks: list[Task], preset, target, seed: int) -> list:
    """One MetaSchedule tuning context per task: tvmq's schedule with its tiles (and loop order)
    searched, or for a generic kernel MetaSchedule's own design space for the target."""
    space = _design_space(preset)
    contexts = []
    for i, task in enumerate(tasks):
        if task.generic:
            generator = ms.space_generator.PostOrderApply()  # the target's own rules, postprocs, mutators
        else:
            generator = ms.space_generator.ScheduleFn(
                space, sch_rules=[], postprocs=[], mutator_probs={ms.mutator.MutateTileSize(): 1.0}
            )
        contexts.append(
            ms.TuneContext(
                mod=task.mod,
                target=target,
                space_generator=generator,
                # A design space of a few tile sizes needs no 512-strong population.
                search_strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=64, init_min_unmeasured=16, genetic_num_iters=2, genetic_max_fail_count=4
                ),
                task_name=task.name,
                rand_state=seed + i,
                num_threads=1,
            )
        )
    return contexts


def _search(ms, tasks: list[Task], contexts: list, database, bar: _Progress, *, db_dir: Path, trials: int, preset,
            runner, cost_model, batch: int = 16) -> None:
    """MetaSchedule's search over all tasks: builds, measures and records ``trials`` candidates each."""
    callbacks = [
        ms.measure_callback.AddToDatabase(),
        ms.measure_callback.RemoveBuildArtifact(),
        ms.measure_callback.UpdateCostModel(),
        _measure_callback(bar),
    ]
    if preset.cross_compiler:
        require_board_runner(preset, runner)
        from tvmq.remote import EXPORT_FUNC, cross_export_initializer

        builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=_BUILDER_TIMEOUT, f_export=EXPORT_FUNC,
                                          initializer=cross_export_initializer(preset.cross_compiler))
    else:
        _register_intrinsics()
        builder = _in_process_builder(ms)
    if runner is None:
        runner = ms.runner.LocalRunner(
            timeout_sec=60,
            evaluator_config=ms.runner.EvaluatorConfig(**_TIMING, enable_cpu_cache_flush=True),
        )
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    try:
        ms.tune_tasks(
            tasks=contexts,
            task_weights=[float(t.weight) for t in tasks],
            work_dir=str(db_dir / "logs"),
            max_trials_global=trials * len(tasks),
            max_trials_per_task=trials,
            num_trials_per_iter=min(trials, batch),
            builder=builder,
            runner=runner,
            database=database,
            cost_model=cost_model,
            measure_callbacks=callbacks,
            task_scheduler="round-robin",
        )
    finally:
        bar.close()


def _in_process_builder(ms):
    """A MetaSchedule builder that compiles the candidates in this process.

    TVM 0.27's ``LocalBuilder`` starts a fresh process pool for every batch (a comment there
    cites a memory leak of long-lived pool workers), and each worker imports TVM and registers
    tvmq's intrinsics before it builds anything: most of a small batch's time. Here the
    intrinsics are registered already and each candidate is compiled with MetaSchedule's own
    build and export functions; a candidate that fails to build is an error result, as there."""
    from tvm.ir.utils import derived_object

    build = tvm.get_global_func("s_tir.meta_schedule.builder.default_build")
    export = tvm.get_global_func("s_tir.meta_schedule.builder.default_export")

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    results.append(ms.builder.BuilderResult(export(build(item.mod, item.target, None)), None))
                except Exception as err:  # pylint: disable=broad-except
                    results.append(ms.builder.BuilderResult(None, f"build failed: {str(err).splitlines()[-1][:300]}"))
            return results

    return InProcessBuilder()


def _register_intrinsics():
    from tvmq.targets import intrinsics

    intrinsics.register()


def _json_database(db_dir: Path):
    from tvmq._compat import meta_schedule

    ms = meta_schedule()
    _register_intrinsics()  # traces name tvmq's intrinsics: register before reading
    try:
        return ms.database.JSONDatabase(
            str(db_dir / "database_workload.json"), str(db_dir / "database_tuning_record.json"), allow_missing=True
        )
    except Exception as err:  # pylint: disable=broad-except
        raise TvmqError(
            f"tuning database in {db_dir} is unreadable ({str(err).splitlines()[0][:200]}); "
            "remove the folder or point --db at another one"
        ) from None


# ----------------------------------------------------------------------------- cost model prior
def isa_key(preset) -> str:
    """What a kernel's measured speed depends on beyond its code: the architecture and the int8
    micro-kernel (``x86_64-vnni``, ``x86_64-pmaddwd256``, ``aarch64-sdot``, ``cuda``)."""
    if preset.kind != "llvm":
        return preset.kind
    arch = str(preset.target.get("mtriple", "x86_64")).split("-")[0]
    return f"{arch}-{preset.int8_kernel or 'none'}"


def shipped_cost_model(preset) -> Path | None:
    """The cost model prior tvmq ships for ``preset``'s ISA, or None."""
    path = COST_MODELS / f"{isa_key(preset)}.tar.gz"
    return path if path.is_file() else None


def prior_path(cost_model, preset) -> Path | None:
    """The cost model prior ``cost_model`` names (a file, ``"auto"`` or ``"none"``/None) for ``preset``."""
    if cost_model is None or str(cost_model) == "none":
        return None
    if str(cost_model) == "auto":
        return shipped_cost_model(preset)
    path = Path(cost_model)
    if not path.is_file():
        raise TvmqError(f"cost model {path} does not exist; pass a file written by scripts/cost_model.py train, "
                        "or --cost-model none")
    return path


def _xgb_model(ms, prior: Path | None):
    """MetaSchedule's XGBoost cost model, holding ``prior``'s records (features and measured
    speeds) and trained on them: it ranks candidates from the first batch, and every batch
    measured here is added to those records when it retrains."""
    model = ms.cost_model.XGBModel()
    if prior is None:
        return model
    try:
        _gzipped_tar(model.load, prior, write=False)
    except Exception as err:  # pylint: disable=broad-except
        raise TvmqError(f"cost model {prior} is unreadable ({str(err).splitlines()[0][:160]}); "
                        "train it again with scripts/cost_model.py train, or pass --cost-model none") from None
    model.last_train_size = model.data_size  # retrain once the new records add a fifth
    return model


def _gzipped_tar(io, path: Path, write: bool) -> None:
    """``io(tar)`` (XGBModel's ``load`` or ``save``, which use an uncompressed tar) on the
    gzipped file ``path``: unpacked into a temporary tar before a load, packed after a save."""
    import gzip
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "model.tar"
        if not write:
            with gzip.open(path, "rb") as src, open(tar, "wb") as dst:
                shutil.copyfileobj(src, dst)
        with warnings.catch_warnings():  # xgboost: "Unknown file format: `bin`" (MetaSchedule's name)
            warnings.simplefilter("ignore", UserWarning)
            io(str(tar))
        if write:
            with open(tar, "rb") as src, gzip.open(path, "wb", compresslevel=9) as dst:
                shutil.copyfileobj(src, dst)


def train_cost_model(db_dirs, preset, out: str | Path) -> dict:
    """Train MetaSchedule's XGBoost cost model on every record of the tuning databases
    ``db_dirs`` (measured on ``preset``'s ISA) and write it, with the records' features, to
    ``out`` (a gzipped tar). Returns counts: workloads, records, bytes written."""
    from tvmq._compat import meta_schedule
    from tvmq.targets import get_preset

    ms = meta_schedule()
    preset = get_preset(preset)
    target = preset.tvm_target()
    groups: dict[int, tuple] = {}  # workload hash -> (mod, [records])
    for db_dir in db_dirs:
        for rec in _json_database(Path(db_dir)).get_all_tuning_records():
            secs = [float(s) for s in rec.run_secs or []]
            if not secs or not all(np.isfinite(s) and s < 1e9 for s in secs):
                continue  # a candidate that failed to build or run
            mod = rec.workload.mod
            groups.setdefault(tvm_ffi.structural_hash(mod), (mod, []))[1].append(rec)
    if not groups:
        raise TvmqError(f"no measured records in {', '.join(str(d) for d in db_dirs)}; run tvmq tune into them first")
    model = ms.cost_model.XGBModel()
    model.last_train_size = 1 << 62  # train once, after the last workload (below), not after each
    count = 0
    for i, (mod, records) in enumerate(groups.values()):
        candidates, results = [], []
        for rec in records:
            sch = tvm.s_tir.Schedule(mod)
            try:
                rec.trace.apply_to_schedule(sch, remove_postproc=False)
            except Exception:  # pylint: disable=broad-except
                continue
            candidates.append(ms.MeasureCandidate(sch, rec.args_info))
            results.append(ms.runner.RunnerResult([float(s) for s in rec.run_secs], None))
        if i == len(groups) - 1:
            model.last_train_size = 0
        model.update(ms.TuneContext(mod=mod, target=target, num_threads=1), candidates, results)
        count += len(candidates)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _gzipped_tar(model.save, out, write=True)
    return {"workloads": len(groups), "records": count, "bytes": out.stat().st_size}


# ----------------------------------------------------------------------------- verification
def _random_args(func, rng):
    args = []
    for p in func.params:
        shape = [int(s) for s in p.shape]
        dtype = str(p.dtype)
        if dtype.startswith("float"):
            arr = rng.uniform(-1, 1, shape).astype(dtype)
        elif dtype == "bool":
            arr = rng.integers(0, 2, shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            arr = rng.integers(max(info.min, -128), min(info.max, 127) + 1, shape).astype(dtype)
        args.append(arr)
    return args


def _run(func, target, arrays):
    lib = tvm.compile(tvm.IRModule({"main": func}), target).jit()
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*tensors)
    return [t.numpy() for t in tensors]


def verify_schedule(reference, candidate, target, seed: int = 0) -> str | None:
    """Run two schedules of one kernel on the same random inputs; None if they agree.

    Integer outputs must match exactly; float ones to 1e-4 of their magnitude (reassociation).
    Returns a one-line description of the disagreement otherwise.
    """
    rng = np.random.default_rng(seed)
    arrays = _random_args(reference, rng)
    try:
        want = _run(reference, target, [a.copy() for a in arrays])
        got = _run(candidate, target, [a.copy() for a in arrays])
    except Exception as err:  # pylint: disable=broad-except
        return f"does not build or run: {str(err).splitlines()[0][:160]}"
    for w, g in zip(want, got):
        if w.dtype.kind in "iub":
            bad = int(np.sum(w != g))
            if bad:
                return f"{bad} of {w.size} integer outputs differ"
        else:
            tol = 1e-4 * max(1.0, float(np.abs(w).max()))
            bad = int(np.sum(np.abs(w - g) > tol))
            if bad:
                return f"{bad} of {w.size} float outputs differ by more than {tol:.2g}"
    return None


def _default_sch(func, preset):
    """The schedule an untuned build gives ``func`` (None where no rule takes it)."""
    from tvmq.pipeline import schedule_rules

    target = preset.tvm_target()
    for rule in schedule_rules(preset):
        sch = rule.apply(func, target, False)
        if sch is not None:
            return sch
    return None


def _default_schedule(func, preset):
    """``func`` as an untuned build schedules it (the reference a tuned kernel must match)."""
    sch = _default_sch(func, preset)
    return func if sch is None else sch.mod["main"]


def load_database(db_dir: str | Path, mod: tvm.IRModule, preset, *, top_k: int = 3, verify: bool = True):
    """The tuned kernels for ``mod`` from ``db_dir``, each checked before use.

    Returns a MetaSchedule in-memory database holding, per kernel of ``mod``, the best record
    that agrees with the untuned build (or none), ready for :func:`tvmq.pipeline.lower`.
    """
    from tvmq._compat import meta_schedule
    from tvmq.targets import get_preset

    ms = meta_schedule()
    preset = get_preset(preset)
    db_dir = Path(db_dir)
    if not db_dir.is_dir():
        raise TvmqError(f"tuning database folder {db_dir} does not exist; create it with `tvmq tune ... --db {db_dir}`")
    source = _json_database(db_dir)
    target = preset.tvm_target()
    chosen = ms.database.MemoryDatabase()
    rejected = _read_rejected(db_dir)
    for task in extract_tasks(mod, preset, generic=True):
        if not source.has_workload(task.mod):
            continue
        records = source.get_top_k(source.commit_workload(task.mod), top_k)
        reference = None
        for rec in records:
            trace_id = hashlib.sha256(str(rec.trace).encode()).hexdigest()[:16]
            key = f"{tvm_ffi.structural_hash(task.mod)}:{trace_id}"
            if key in rejected:
                continue
            sch = tvm.s_tir.Schedule(task.mod)
            try:
                rec.trace.apply_to_schedule(sch, remove_postproc=False)
            except Exception as err:  # pylint: disable=broad-except
                rejected[key] = {"task": task.name, "reason": f"trace does not apply: {str(err).splitlines()[0][:120]}"}
                continue
            if verify:
                if reference is None:
                    reference = _default_schedule(task.mod["main"], preset)
                problem = verify_schedule(reference, sch.mod["main"], target)
                if problem is not None:
                    log.warning("rejected a tuned kernel for %s: %s", task.name, problem)
                    rejected[key] = {"task": task.name, "reason": problem}
                    continue
            workload = chosen.commit_workload(task.mod)
            chosen.commit_tuning_record(
                ms.database.TuningRecord(rec.trace, workload, rec.run_secs, rec.target, rec.args_info)
            )
            break
    _write_rejected(db_dir, rejected)
    return chosen


def _read_rejected(db_dir: Path) -> dict:
    path = db_dir / REJECTED
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def _write_rejected(db_dir: Path, rejected: dict) -> None:
    if not rejected:
        return
    tmp = db_dir / (REJECTED + ".part")
    tmp.write_text(json.dumps(rejected, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, db_dir / REJECTED)
