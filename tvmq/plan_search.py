"""Plan search: the fastest per-layer precision assignment that meets an accuracy budget.

Works on a :class:`~tvmq.sensitivity.Analysis` (each layer's measured noise and time); used by
the ``--precision auto`` driver (:mod:`tvmq.precision`).

* A layer's cost is the output noise power it causes alone (noise powers add up across
  layers, as in HAWQ's additivity assumption); for a given noise allowance the fastest plan is a
  multiple-choice knapsack (one of fp32/int8/int16/fp16 per layer, int16 being int8 weights on
  16-bit activations), solved exactly by dynamic
  programming over a finely discretized allowance; the greedy ratio order is the baseline. The
  allowance is then chosen by bisection on the *measured* metric of the simulated plan, so
  discrete metrics (top-1, exact-match) are budgeted as measured, not as assumed.
* ``fallback_plan`` is INC's strategy, for comparison: start all-int8 and put the most
  sensitive remaining layer back in float until the budget is met.
"""

from __future__ import annotations

import numpy as np

from tvmq.errors import TvmqError
from tvmq.sensitivity import Analysis, LayerInfo

__all__ = ["search", "fallback_plan", "config_for", "latency", "meets", "float_layers_by_saving", "most_sensitive_first",
           "tries"]


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
        sqnr, alone = layer.sqnr(precision), layer.alone(precision)
        if sqnr is None or (budget is not None and alone is not None and not meets(analysis, alone, budget)):
            continue
        saving = layer.saving_ms(precision)
        if saving < 0:
            continue  # slower than float: never worth it
        # ties: int8 first (8-bit activations: the least traffic), then int16, then fp16
        out.append((precision, _noise(sqnr), saving + _TIE[precision]))
    return out


_TIE = {"int8": 3e-6, "int16": 2e-6, "fp16": 1e-6}


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
    """The fastest assignment (layer -> int8|int16|fp16|fp32) meeting ``budget``, and its metric.

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
            for _, i, precisions in float_layers_by_saving(analysis, current):
                for precision in tries(precisions):
                    trial = {**current, names[i]: precision}
                    if trials.check(trial):
                        current = trial
                        break
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


def tries(precisions: tuple[str, ...]) -> tuple[str, ...]:
    """The precisions a float layer is tried in, in order: its fastest quantized one, then int16
    (8-bit weights on 16-bit activations) where that is a slower option: what 8 bits lose on a
    long-tailed input, 16 bits often hold."""
    return precisions[:1] + (("int16",) if "int16" in precisions[1:] else ())


def float_layers_by_saving(analysis: Analysis, assignment: dict) -> list[tuple[float, int, tuple[str, ...]]]:
    """``(saving, index, precisions)`` for each float layer of ``assignment`` with a faster
    quantized kernel: its candidate precisions that are faster than float, the fastest first
    (``saving`` is that one's), the largest saving first."""
    out = []
    for i, layer in enumerate(analysis.layers):
        if assignment[layer.name] != "fp32":
            continue
        savings = sorted(((layer.saving_ms(p), _TIE[p], p) for p in analysis.candidates if layer.sqnr(p) is not None),
                         reverse=True)
        faster = tuple(p for saving, _, p in savings if saving > 0)
        if faster:
            out.append((layer.saving_ms(faster[0]), i, faster))
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
