"""Precision per layer: an accuracy budget, and the fastest plan that meets it.

Runtime-side quantizers make users exclude layers by hand until accuracy comes back, or stop
at the first plan that passes. tvmq measures, per layer, what quantizing it costs in accuracy
and what it saves in time on the target (:mod:`tvmq.sensitivity`), then picks the fastest plan
within the budget:

* Search: a layer's cost is the output noise power it causes alone (noise powers add up across
  layers, as in HAWQ's additivity assumption); for a given noise allowance the fastest plan is a
  multiple-choice knapsack (one of fp32/int8/fp16 per layer), solved exactly by dynamic
  programming over a finely discretized allowance; the greedy ratio order is the baseline. The
  allowance is then chosen by bisection on the *measured* metric of the simulated plan, so
  discrete metrics (top-1, exact-match) are budgeted as measured, not as assumed.
* ``fallback_plan`` is INC's strategy, for comparison: start all-int8 and put the most
  sensitive remaining layer back in float until the budget is met.
* :func:`choose_plan`, the ``--precision auto`` driver: propose (the three above), repair each
  until its compiled integer program meets the budget, race the passing ones, refine the winner.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tvmq.errors import TvmqError
from tvmq.metrics import Metric, OutputParts, parse_output_slice
from tvmq.sensitivity import Analysis, LayerInfo, analyse

__all__ = ["search", "fallback_plan", "config_for", "latency", "meets", "float_layers_by_saving", "most_sensitive_first",
           "choose_plan"]


def _noise(sqnr: float | None) -> float | None:
    """Output noise power relative to the signal, 10^(-SQNR/10): what adds across layers."""
    if sqnr is None:
        return None
    return 10 ** (-sqnr / 10) if np.isfinite(sqnr) else 0.0


def _options(analysis: Analysis, layer: LayerInfo, budget: float | None = None) -> list[tuple[str, float, float]]:
    """(precision, noise cost, time saved) for each candidate of ``layer``; a precision that
    breaks ``budget`` on its own (this layer alone in it) is no candidate."""
    out = []
    for precision in analysis.candidates:
        sqnr = layer.sqnr_int8 if precision == "int8" else layer.sqnr_fp16
        alone = layer.only_int8 if precision == "int8" else layer.only_fp16
        if sqnr is None or (budget is not None and alone is not None and not meets(analysis, alone, budget)):
            continue
        saving = layer.saving_ms(precision)
        if saving < 0:
            continue  # slower than float: never worth it
        # ties: int8 first (smallest weights), then fp16
        out.append((precision, _noise(sqnr), saving + (2e-6 if precision == "int8" else 1e-6)))
    return out


def meets(analysis: Analysis, value: float, budget: float) -> bool:
    """``budget``: a minimum SQNR (dB) for the sqnr metric, else the largest drop from FP32."""
    if analysis.metric.kind == "sqnr":
        return value >= budget
    return analysis.fp32 - value <= budget + 1e-12


def _knapsack(options: list[list[tuple[str, float, float]]], allowance: float, buckets: int = 2000) -> list[str]:
    """Multiple-choice knapsack: one option (or fp32) per layer, maximizing the total saving
    with the total cost <= allowance (costs rounded up to 1/buckets of it)."""
    n = len(options)
    if allowance <= 0:
        return [next((p for p, c, _ in opts if c == 0), "fp32") for opts in options]
    best = np.full(buckets + 1, -np.inf)
    best[0] = 0.0
    pick = np.zeros((n, buckets + 1), np.int8)  # 0: fp32, k: options[i][k-1]
    weights = [[int(np.ceil(min(c / allowance, 2.0) * buckets)) for _, c, _ in opts] for opts in options]
    for i, opts in enumerate(options):
        new = best.copy()
        for k, ((_, _, saving), w) in enumerate(zip(opts, weights[i]), start=1):
            if w > buckets:
                continue
            cand = np.full(buckets + 1, -np.inf)
            cand[w:] = best[: buckets + 1 - w] + saving
            better = cand > new
            new = np.where(better, cand, new)
            pick[i] = np.where(better, k, pick[i])
        best = new
    cap = int(np.argmax(best))
    chosen = ["fp32"] * n
    for i in range(n - 1, -1, -1):
        k = int(pick[i, cap])
        if k:
            chosen[i] = options[i][k - 1][0]
            cap -= weights[i][k - 1]
    return chosen


def _greedy(options: list[list[tuple[str, float, float]]], allowance: float) -> list[str]:
    """Baseline: the best time saved per unit of noise first, while the allowance lasts."""
    chosen = ["fp32"] * len(options)
    steps = sorted(((saving / max(cost, 1e-30), i, p, cost) for i, opts in enumerate(options) for p, cost, saving in opts),
                   key=lambda t: -t[0])
    total = 0.0
    for _, i, precision, cost in steps:
        if chosen[i] == "fp32" and total + cost <= allowance:
            chosen[i], total = precision, total + cost
    return chosen


def search(analysis: Analysis, budget: float, method: str = "exact", seeds=(), max_evaluations: int = 32
           ) -> tuple[dict, float]:
    """The fastest assignment (layer -> int8|fp16|fp32) meeting ``budget``, and its metric.

    ``budget`` is a minimum SQNR (dB) for the sqnr metric, else the largest allowed drop from
    FP32 in the metric's units. A precision that breaks the budget for a layer on its own is
    not offered for it. Each remaining option costs the output noise it causes alone (noise
    powers add); for a noise allowance the fastest assignment is a multiple-choice knapsack
    (``exact``) or the greedy ratio order (``greedy``, the baseline). Allowances are tried from
    the largest (the SQNR budget's own noise, or everything) down by halves until the measured
    metric meets the budget. ``exact`` then also considers ``seeds`` (other passing plans, e.g.
    the fallback plan) and climbs from the fastest passing plan, moving single layers to faster
    precisions in order of time saved per noise while the budget still holds; then it puts back
    in float the layers of the fastest passing plan whose quantized kernel is clearly slower
    than their float one (with its conversions), if the budget still holds, and finally tries
    each float layer of that plan and of each passing seed quantized, even one that breaks the
    budget on its own (see below).
    """
    if method not in ("exact", "greedy"):
        raise TvmqError(f"unknown search method {method!r}; use exact or greedy")
    names = [layer.name for layer in analysis.layers]
    options = [_options(analysis, layer, budget) for layer in analysis.layers]
    trials = _Trials(analysis, budget)
    _largest_allowance_that_passes(trials, names, options, _knapsack if method == "exact" else _greedy, max_evaluations)
    if method == "exact":
        for seed in seeds:
            trials.check(seed)
    if not trials.passing:
        if not trials.check({n: "fp32" for n in names}):  # the float model itself misses the budget
            return {n: "fp32" for n in names}, analysis.fp32
    if method == "exact":
        _climb(trials, names, options, max_evaluations)
        best = _unquantize_slower(trials, names)
        # A layer whose quantization alone breaks the budget is no option above, yet on a metric
        # that moves in whole samples the sample it loses alone is often won back once the plan's
        # other sensitive layers are float. The fastest plan and each seed therefore try each of
        # their float layers quantized, the largest saving first, kept while the budget holds
        # (one evaluation per float layer, beyond ``max_evaluations``).
        starts = [best] + [s for s in seeds if any(s == p for _, p, _ in trials.passing)]
        for start in {tuple(s.items()): s for s in starts}.values():
            current = start
            for _, i, precision in float_layers_by_saving(analysis, current):
                trial = {**current, names[i]: precision}
                if trials.check(trial):
                    current = trial
    _, assignment, value = trials.fastest()
    return assignment, value


class _Trials:
    """The assignments a search has evaluated, and those that met the budget."""

    def __init__(self, analysis: Analysis, budget: float):
        self.analysis, self.budget = analysis, budget
        self.passing: list[tuple[float, dict, float]] = []  # (estimated latency, assignment, metric)
        self.spent = 0

    def check(self, assignment: dict) -> bool:
        self.spent += 1
        value = self.analysis.evaluate(assignment)
        if meets(self.analysis, value, self.budget):
            self.passing.append((latency(self.analysis, assignment), dict(assignment), value))
            return True
        return False

    def fastest(self) -> tuple[float, dict, float]:
        return min(self.passing, key=lambda t: t[0])


def _largest_allowance_that_passes(trials: _Trials, names, options, pick, max_evaluations: int) -> None:
    """Noise allowances from the largest (the SQNR budget's own noise, or everything) down by
    halves, each solved by ``pick``, until one's plan meets the budget."""
    costs = [c for opts in options for _, c, _ in opts]
    everything = sum(max((c for _, c, _ in opts), default=0.0) for opts in options) * 1.001
    sqnr = trials.analysis.metric.kind == "sqnr"
    allowance = min(_noise(trials.budget), everything) if sqnr else everything
    floor = min((c for c in costs if c > 0), default=0.0) / 4
    tried = set()
    while trials.spent < max_evaluations // 2:
        assignment = dict(zip(names, pick(options, allowance)))
        key = tuple(assignment.values())
        if key not in tried:
            tried.add(key)
            if trials.check(assignment):
                break
        if allowance <= floor:
            break
        allowance /= 2


def _climb(trials: _Trials, names, options, max_evaluations: int) -> None:
    """From the fastest passing plan, single layers to faster precisions, the most time saved per
    noise first, while the budget holds."""
    layers = trials.analysis.layers
    best = trials.fastest()[1]
    moves = sorted(((saving / max(cost, 1e-30), i, p) for i, opts in enumerate(options) for p, cost, saving in opts),
                   key=lambda t: -t[0])
    for _, i, precision in moves:
        if trials.spent >= max_evaluations:
            break
        now = best[names[i]]
        if now == precision or (now != "fp32" and layers[i].ms(precision) >= layers[i].ms(now)):
            continue  # already there, or no faster than the precision it has
        trial = {**best, names[i]: precision}
        if trials.check(trial):
            best = trial


def _unquantize_slower(trials: _Trials, names) -> dict:
    """A seed (the fallback) quantizes every layer it did not need in float, including those whose
    quantized kernel is slower than the float one: back to float, the slowest first, while the
    budget holds (one evaluation each, beyond ``max_evaluations``). Returns the plan it ends on."""
    layers = trials.analysis.layers
    best = trials.fastest()[1]
    slower = sorted(((layers[i].saving_ms(best[n]), i) for i, n in enumerate(names)
                     if best[n] != "fp32" and layers[i].saving_ms(best[n]) < 0))
    for _, i in slower:
        trial = {**best, names[i]: "fp32"}
        if trials.check(trial):
            best = trial
    return best


def float_layers_by_saving(analysis: Analysis, assignment: dict) -> list[tuple[float, int, str]]:
    """``(saving, index, precision)`` for each float layer of ``assignment`` with a faster
    quantized kernel (its fastest candidate precision), the largest saving first."""
    out = []
    for i, layer in enumerate(analysis.layers):
        if assignment[layer.name] != "fp32":
            continue
        savings = [(layer.saving_ms(p), p) for p in analysis.candidates
                   if p == "int8" or layer.sqnr_fp16 is not None]
        saving, precision = max(savings, default=(0.0, "fp32"))
        if saving > 0:
            out.append((saving, i, precision))
    return sorted(out, key=lambda t: (-t[0], t[1]))


def most_sensitive_first(analysis: Analysis) -> list[str]:
    """Layer names, the worst when quantized alone first (the order layers go back to float)."""
    return [l.name for l in sorted(analysis.layers, key=lambda l: (l.only_int8, l.sqnr_int8))]


def fallback_plan(analysis: Analysis, budget: float) -> tuple[dict, float, int]:
    """INC-style: all int8, then put the most sensitive layer back in fp32 until the budget
    is met. Returns ``(assignment, metric, evaluations)``."""
    assignment = {l.name: "int8" for l in analysis.layers}
    value, evaluations = analysis.all_int8, 1
    for name in most_sensitive_first(analysis):
        if meets(analysis, value, budget):
            break
        assignment[name] = "fp32"
        value = analysis.evaluate(assignment)
        evaluations += 1
    return assignment, value, evaluations


def config_for(config, assignment: dict):
    """``config`` with rules (first in order) giving each layer its assigned precision."""
    import dataclasses

    from tvmq.config import LayerRule

    rules = tuple(LayerRule(name=_glob_escape(n), precision=p) for n, p in sorted(assignment.items()))
    return dataclasses.replace(config, rules=rules + tuple(config.rules))


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def latency(analysis: Analysis, assignment) -> float:
    """Estimated time of an assignment (or a list of int8 layers): each layer's kernel in its
    precision, plus, in a plan with int8 layers, the conversions around each float layer."""
    if not isinstance(assignment, dict):
        assignment = {n: "int8" for n in assignment}
    mixed = any(p != "fp32" for p in assignment.values())  # float layers then convert in and out
    return float(sum(l.ms(p) + (l.boundary_ms if mixed and p == "fp32" else 0.0)
                     for l in analysis.layers for p in [assignment.get(l.name, "fp32")]))


# ---------------------------------------------------------------------------- the --precision auto driver
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


@dataclass
class _Search:
    """One ``--precision auto`` search: the analysis, and each assignment compiled once as the
    integer program it will be (the simulation and the integer program round alike only up to
    requantization, so every decision is checked on the latter)."""

    float_mod: object
    samples: list
    eval_samples: list
    labels: object
    config: object
    preset: object
    names: list
    full: object  # the all-int8 plan
    analysis: Analysis
    budget: float
    _compiled: dict = field(default_factory=dict)

    def candidate(self, assignment: dict) -> _Candidate:
        from tvmq.quantize import calibrate

        key = tuple(assignment[n] for n in sorted(assignment))
        if key not in self._compiled:
            plan = self.full
            if any(p != "int8" for p in assignment.values()):
                plan = calibrate(self.float_mod, self.samples, config_for(self.config, assignment),
                                 target=self.preset.name, input_names=self.names)
            a = self.analysis
            self._compiled[key] = _Candidate(self.float_mod, plan, self.eval_samples, self.names, a.metric, self.labels,
                                             a.reference, a.parts)
        return self._compiled[key]

    def passes(self, assignment: dict) -> bool:
        return meets(self.analysis, self.candidate(assignment).metric, self.budget)

    def summary(self, assignment: dict, value: float | None = None) -> dict:
        counts = Counter(assignment.values())
        value = self.analysis.evaluate(assignment) if value is None else value
        return {"int8_layers": counts["int8"], "fp16_layers": counts["fp16"], "metric": value,
                "latency_ms": latency(self.analysis, assignment), "assignment": assignment}


def _propose(s: _Search) -> tuple[dict, dict, dict]:
    """The exact search, the greedy baseline and the INC-style fallback, each repaired until its
    integer program meets the budget: the most sensitive layer it still quantizes goes back to
    float, at most 8 times. (Searching again with a tighter budget changes nothing when the
    metric moves in whole samples, as accuracy does.) The fallback is repaired the same way, as
    INC itself judges the quantized model. Returns proposals, repair steps and the summaries."""
    a, budget = s.analysis, s.budget
    greedy, greedy_value = search(a, budget, "greedy")
    fallback, fallback_value, evaluations = fallback_plan(a, budget)
    seeds = [x for x, v in ((fallback, fallback_value), (greedy, greedy_value)) if meets(a, v, budget)]
    exact, _ = search(a, budget, "exact", seeds=seeds)

    def repair(assignment):
        steps = 0
        for name in [n for n in most_sensitive_first(a) if assignment[n] != "fp32"][:8]:
            if s.passes(assignment):
                break
            assignment, steps = {**assignment, name: "fp32"}, steps + 1
        return assignment, steps

    proposals, repaired = {}, {}
    for label, assignment in (("exact search", exact), ("greedy", greedy), ("fallback (INC-style)", fallback)):
        proposals[label], repaired[label] = repair(assignment)
    summaries = {"exact": s.summary(proposals["exact search"]), "greedy": s.summary(proposals["greedy"]),
                 "fallback": {**s.summary(proposals["fallback (INC-style)"]),
                              "evaluations": evaluations + repaired["fallback (INC-style)"]}}
    return proposals, repaired, summaries


def _pick(s: _Search, proposals: dict) -> tuple[str, dict]:
    """The winner among the proposals that pass: the exact search's, unless (on a target that
    runs here) another passing plan is measured faster as a whole model, which also counts the
    conversions between int8 and float regions that per-layer kernel times leave out."""
    race = {label: s.candidate(a) for label, a in proposals.items()}
    passing = {label: c for label, c in race.items() if meets(s.analysis, c.metric, s.budget)}
    winner = "exact search"
    if passing and winner not in passing:
        winner = min(passing, key=lambda label: latency(s.analysis, proposals[label]))
    if s.preset.runs_here and len({id(c) for c in passing.values()}) > 1:
        _race(list({id(c): c for c in passing.values()}.values()))
        winner = min(passing, key=lambda label: (passing[label].ms, label != "exact search"))
    return winner, race


def _refine(s: _Search, best: dict) -> tuple[dict, list[str]]:
    """The simulation and the integer programs disagree about borderline samples, so the
    winner's float layers get one more try as what will ship: each (the largest estimated saving
    first, at most 8) in its quantized precision, compiled, kept when it meets the budget."""
    refined = []
    for _, i, precision in float_layers_by_saving(s.analysis, best)[:8]:
        trial = {**best, s.analysis.layers[i].name: precision}
        if s.passes(trial):
            best = trial
            refined.append(s.analysis.layers[i].name)
    return best, refined


def choose_plan(float_mod, samples, config, auto, preset, info, *, input_names, progress=False, concat=()):
    """``--precision auto``: calibrate, measure per-layer sensitivity and latency, and choose the plan.

    Propose (:func:`_propose`), pick among the proposals that pass (:func:`_pick`), refine the
    winner (:func:`_refine`, which then races the plan it came from). Returns the plan and the
    report that ``manifest["precision"]`` keeps.
    """
    from tvmq.calibrate import load_eval_data
    from tvmq.quantize import calibrate

    metric = Metric(auto.metric)
    budget = auto.budget()
    output_names = [o.name for o in info.outputs]
    parts = OutputParts(tuple(output_names), (*concat, *(parse_output_slice(t, output_names) for t in auto.output_slices)))
    full = calibrate(float_mod, samples, config, target=preset.name, input_names=input_names, progress=progress)
    eval_samples, labels = (samples, None) if auto.eval_data is None else load_eval_data(auto.eval_data, list(info.inputs))
    analysis = analyse(float_mod, full, eval_samples, input_names, metric, labels, preset=preset, progress=progress,
                       parts=parts)
    s = _Search(float_mod, samples, eval_samples, labels, config, preset, input_names, full, analysis, budget)

    proposals, repaired, summaries = _propose(s)
    winner, race = _pick(s, proposals)
    refined = []
    if meets(analysis, race[winner].metric, budget):
        best, refined = _refine(s, proposals[winner])
        if refined:
            proposals["refined"], race["refined"], repaired["refined"] = best, s.candidate(best), 0
            if preset.runs_here:
                _race([race[winner], race["refined"]])
            if not preset.runs_here or race["refined"].ms <= race[winner].ms:
                winner = "refined"
    return race[winner].plan, _report(s, proposals, race, repaired, summaries, winner, refined)


def _report(s: _Search, proposals: dict, race: dict, repaired: dict, summaries: dict, winner: str, refined: list) -> dict:
    """What ``manifest["precision"]`` keeps of a search (``tvmq.report`` draws it)."""
    analysis, budget, preset, metric = s.analysis, s.budget, s.preset, s.analysis.metric
    chosen, value, parts, labels = proposals[winner], race[winner].metric, s.analysis.parts, s.labels
    return {
        "metric": metric.kind,
        "budget": budget,
        "samples": len(s.eval_samples),
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
        "refined": s.summary(proposals["refined"]) if refined else None,
        "race": {label: {"metric": c.metric, "passes": meets(analysis, c.metric, budget), "measured_ms": c.ms,
                         "repaired_layers": repaired[label]}
                 for label, c in race.items()},
        # each output and output slice apart: the chosen plan compiled, every layer int8 simulated
        "parts": {"plan": race[winner].parts,
                  "all_int8": parts.values(metric, analysis.outputs(analysis.names), analysis.reference, labels)
                  if race[winner].parts else {}},
        "int8_layers": sorted(n for n, p in chosen.items() if p == "int8"),
        "latency_ms": {"fp32": latency(analysis, {}), "all_int8": latency(analysis, analysis.names),
                       "plan": latency(analysis, chosen)},
        **summaries,
        "evaluations": analysis.evaluations,
        "layers": [{"name": l.name, "kind": l.kind, "only_int8": l.only_int8, "only_float": l.only_float,
                    "only_fp16": l.only_fp16, "sqnr_int8": l.sqnr_int8, "sqnr_fp16": l.sqnr_fp16,
                    "int8_ms": l.int8_ms, "fp32_ms": l.fp32_ms, "fp16_ms": l.fp16_ms, "boundary_ms": l.boundary_ms,
                    "chosen": chosen[l.name]} for l in analysis.layers],
    }
