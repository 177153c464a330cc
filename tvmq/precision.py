"""Precision per layer (``--precision auto``): an accuracy budget, and the fastest plan that meets it.

Runtime-side quantizers make users exclude layers by hand until accuracy comes back, or stop
at the first plan that passes. tvmq measures, per layer, what quantizing it costs in accuracy
and what it saves in time on the target (:mod:`tvmq.sensitivity`), searches the fastest plan
within the budget (:mod:`tvmq.plan_search`), and checks what it will ship: :func:`choose_plan`
proposes (exact search, greedy, INC-style fallback), repairs each until its compiled integer
program meets the budget, races the passing ones, and refines the winner.

Where it sits: frontend -> calibrate -> **plan** (this search, or :func:`tvmq.quantize.calibrate`
for all-int8) -> passes -> pipeline -> bundle.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from tvmq.metrics import Metric, OutputParts, parse_output_slice
from tvmq.plan_search import (config_for, fallback_plan, float_layers_by_saving, latency, meets, most_sensitive_first,
                              search, tries)
from tvmq.sensitivity import Analysis, analyse

__all__ = ["choose_plan"]


# ---------------------------------------------------------------------------- the --precision auto driver
class _Candidate:
    """A plan compiled for this machine: its integer program's metric and, later, its latency."""

    def __init__(self, float_mod, plan, samples, names, metric, labels, ref, parts, slack=None):
        from tvmq.execute import HostModule
        from tvmq.quantize import quantize_pipeline

        self.plan = plan
        self.module = HostModule(quantize_pipeline(plan)(float_mod))
        self.first = [samples[0][n] for n in names]
        out = [parts(self.module(*[s[n] for n in names])) for s in samples]
        self.metric = metric(out, ref, labels, slack)
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
        from tvmq.quantize import calibrate, narrow

        key = tuple(assignment[n] for n in sorted(assignment))
        if key not in self._compiled:
            plan = self.full
            if any(p != "int8" for p in assignment.values()):
                plan = narrow(calibrate(self.float_mod, self.samples, config_for(self.config, assignment),
                                        target=self.preset.name, input_names=self.names),
                              self.float_mod, self.analysis.narrowed_ranges())
            a = self.analysis
            self._compiled[key] = _Candidate(self.float_mod, plan, self.eval_samples, self.names, a.metric, self.labels,
                                             a.reference, a.parts, a.slack)
        return self._compiled[key]

    def passes(self, assignment: dict) -> bool:
        return meets(self.analysis, self.candidate(assignment).metric, self.budget)

    def summary(self, assignment: dict, value: float | None = None) -> dict:
        counts = Counter(assignment.values())
        value = self.analysis.evaluate(assignment) if value is None else value
        return {"int8_layers": counts["int8"], "int16_layers": counts["int16"], "fp16_layers": counts["fp16"], "metric": value,
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
            wider = assignment[name] == "int8" and a.layer(name).sqnr("int16") is not None
            assignment, steps = {**assignment, name: "int16" if wider else "fp32"}, steps + 1
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
    first, at most 8) in its fastest quantized precision (then int16, where offered: ``tries``),
    compiled, kept when it meets the budget."""
    refined = []
    for _, i, precisions in float_layers_by_saving(s.analysis, best)[:8]:
        for precision in tries(precisions):
            trial = {**best, s.analysis.layers[i].name: precision}
            if s.passes(trial):
                best = trial
                refined.append(s.analysis.layers[i].name)
                break
    return best, refined


def choose_plan(float_mod, samples, config, auto, preset, info, *, input_names, progress=False, concat=()):
    """``--precision auto``: calibrate, measure per-layer sensitivity and latency, and choose the plan.

    Propose (:func:`_propose`), pick among the proposals that pass (:func:`_pick`), refine the
    winner (:func:`_refine`, which then races the plan it came from). Returns the plan and the
    report that ``manifest["precision"]`` keeps.
    """
    from tvmq.calibrate import load_eval_data
    from tvmq.quantize import calibrate, narrow

    metric = Metric(auto.metric)
    budget = auto.budget()
    output_names = [o.name for o in info.outputs]
    parts = OutputParts(tuple(output_names), (*concat, *(parse_output_slice(t, output_names) for t in auto.output_slices)))
    full = calibrate(float_mod, samples, config, target=preset.name, input_names=input_names, progress=progress)
    # per-channel activations as decided for the all-int8 plan, not simulated again for every candidate
    config = replace(config, per_channel_activations=any(q.per_channel for lp in full.layers.values()
                                                                     if lp.is_int8 for q in lp.inputs))
    eval_samples, labels = (samples, None) if auto.eval_data is None else load_eval_data(auto.eval_data, list(info.inputs))
    analysis = analyse(float_mod, full, eval_samples, input_names, metric, labels, preset=preset, progress=progress,
                       parts=parts, budget=budget, input_noise=auto.input_noise, clip_ranges=auto.clip_ranges,
                       int16=auto.int16_activations)
    full = narrow(full, float_mod, analysis.narrowed_ranges())
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
        "input_noise": analysis.input_noise,
        # samples FP32 itself cannot hold to the budget when their image moves within its 8-bit
        # steps: each is judged against that stability instead (Metric.slack); the part figures
        # below are raw
        "held_samples": analysis.held_samples(),
        # activation ranges the search clipped (--clip-ranges: readers, factor on the calibrated
        # range, the simulated all-int8 SQNR before and after)
        "narrowed_ranges": analysis.narrowed,
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
        "int16_layers": sorted(n for n, p in chosen.items() if p == "int16"),
        "latency_ms": {"fp32": latency(analysis, {}), "all_int8": latency(analysis, analysis.names),
                       "plan": latency(analysis, chosen)},
        **summaries,
        "evaluations": analysis.evaluations,
        "layers": [{"name": l.name, "kind": l.kind, "only_int8": l.only_int8, "only_float": l.only_float,
                    "only_fp16": l.only_fp16, "sqnr_int8": l.sqnr_int8, "sqnr_fp16": l.sqnr_fp16,
                    "only_int16": l.only_int16, "sqnr_int16": l.sqnr_int16, "int16_ms": l.int16_ms,
                    "int8_ms": l.int8_ms, "fp32_ms": l.fp32_ms, "fp16_ms": l.fp16_ms, "boundary_ms": l.boundary_ms,
                    "chosen": chosen[l.name]} for l in analysis.layers],
    }
