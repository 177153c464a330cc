"""Metrics: how a quantized model's outputs are judged against FP32.

Used by the ``--precision auto`` budget (:mod:`tvmq.precision`), the sensitivity analysis
(:mod:`tvmq.sensitivity`), ``tvmq eval`` and the tests. ``sqnr`` and ``cosine`` judge each output
(and each named slice of one, :class:`OutputParts`) of each sample on its own and keep the worst.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from tvmq.errors import TvmqError

# An unstable sample (FP32 moves beyond the budget when its image input moves within its 8-bit
# steps) is held to this many times the noise power FP32 shows there (:meth:`Metric.slack`).
STABILITY_MARGIN = 2.0

__all__ = ["Metric", "OutputSlice", "OutputParts", "parse_output_slice", "concat_slices", "sample_sqnr", "sqnr_db"]


@dataclass(frozen=True)
class Metric:
    """How good a set of outputs is (higher is better) and how a budget is expressed.

    ``kind``: ``sqnr`` (dB vs FP32), ``cosine`` (vs FP32), ``top1`` (needs labels) or
    ``python:module:function`` (``function(outputs, labels) -> float``, higher is better).

    ``outputs``/``reference`` hold one entry per sample: an array (the model's first output) or
    a tuple of every output. ``sqnr`` and ``cosine`` judge each output of each sample on its own
    and report the worst (a detector's scores must not hide behind its boxes, nor one hard input
    behind many easy ones); ``top1`` and ``python:`` metrics see the first output.
    """

    kind: str = "sqnr"

    def __post_init__(self):
        if self.kind not in ("sqnr", "cosine", "top1") and not self.kind.startswith("python:"):
            raise TvmqError(f"unknown metric {self.kind!r}; use top1, cosine, sqnr or python:module:function")

    @property
    def needs_labels(self) -> bool:
        return self.kind == "top1" or self.kind.startswith("python:")

    def __call__(self, outputs: list, reference: list, labels=None, slack=None) -> float:
        """The metric of ``outputs`` (worst sample and part for sqnr and cosine). ``slack`` (per
        sample, per part, in the metric's units; :meth:`slack`) is added to each sample's value
        first: what the budget forgives a sample that FP32 itself cannot hold to it."""
        if self.kind in ("sqnr", "cosine"):
            return min(self.worst_parts(outputs, reference, slack))
        if outputs and isinstance(outputs[0], (tuple, list)):
            outputs, reference = [o[0] for o in outputs], [r[0] for r in reference]
        if self.kind == "top1":
            return float(np.mean([np.argmax(o) == y for o, y in zip(outputs, labels)]))
        return float(self.function()(outputs, labels))

    def worst_parts(self, outputs: list, reference: list, slack=None) -> list[float]:
        """sqnr / cosine: each sample's worst part, ``slack`` added first (as :meth:`__call__`)."""
        values = self.per_sample(outputs, reference)
        if slack is not None:
            values = [tuple(v + s for v, s in zip(vs, ss)) for vs, ss in zip(values, slack)]
        return [float(min(vs)) for vs in values]

    def per_sample(self, outputs: list, reference: list) -> list[tuple[float, ...]]:
        """sqnr / cosine: each sample's value for each output (part), worst not yet taken."""
        one = sample_sqnr if self.kind == "sqnr" else _sample_cosine
        return [tuple(one(a, b) for a, b in zip(o, r)) if isinstance(o, (tuple, list)) else (one(o, r),)
                for o, r in zip(outputs, reference)]

    def slack(self, stability: list[tuple[float, ...]], budget: float) -> list[tuple[float, ...]]:
        """What ``budget`` forgives each sample and part whose FP32 output is itself unstable.

        ``stability``: each sample's value (:meth:`per_sample`) of FP32 with its image inputs
        moved within their 8-bit steps (:func:`tvmq.sensitivity.input_rounding_stability`). A
        sample whose FP32 reading moves further than the budget allows there (a CTC line whose
        character changes when a pixel moves by less than one step) is not determined by its
        image, and no int8 plan holds it to the budget: it is held instead to
        ``STABILITY_MARGIN`` times the noise power FP32 shows there (3 dB below it; for cosine,
        twice its distance from 1). Zero for every sample FP32 holds within the budget."""
        if self.kind == "sqnr":
            margin = 10 * float(np.log10(STABILITY_MARGIN))
            return [tuple(max(0.0, budget - (s - margin)) for s in ss) for ss in stability]
        if self.kind == "cosine":
            return [tuple(max(0.0, (1 - budget) - (1 - STABILITY_MARGIN * (1 - s))) for s in ss) for ss in stability]
        raise TvmqError(f"metric {self.kind} judges no sample apart: only sqnr and cosine take a per-sample slack")

    def function(self):
        """The user's ``python:module:function`` (loaded, so a typo fails before any work)."""
        _, module, func = (self.kind.split(":", 2) + ["", ""])[:3]
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError, ValueError) as err:
            raise TvmqError(f"metric {self.kind!r} cannot be loaded ({err}); give python:MODULE:FUNCTION "
                            "with MODULE importable (on PYTHONPATH)") from None
        if not callable(fn):
            raise TvmqError(f"metric {self.kind!r}: {func} is not a function (outputs, labels) -> score")
        return fn


@dataclass(frozen=True)
class OutputSlice:
    """``start:stop`` along ``axis`` of output ``output`` (an index into the model's outputs)."""

    output: int
    axis: int
    start: int
    stop: int | None
    label: str


def parse_output_slice(text: str, output_names: list[str]) -> OutputSlice:
    """``NAME:START:STOP`` (axis 1, a YOLO head's channels) or ``NAME:AXIS:START:STOP``; empty
    bounds run to the end, as in Python (``output0:4:`` -- the class scores after 4 box values)."""
    fields = text.rsplit(":", 3) if text.count(":") >= 3 else text.rsplit(":", 2)
    usage = (f"--output-slice {text!r}: give NAME:START:STOP or NAME:AXIS:START:STOP with NAME one of "
             f"{', '.join(output_names)} (e.g. {output_names[0]}:4: for the channels from 4 on)")
    if len(fields) not in (3, 4) or fields[0] not in output_names:
        raise TvmqError(usage)
    try:
        axis = int(fields[1]) if len(fields) == 4 else 1
        start = int(fields[-2]) if fields[-2] else 0
        stop = int(fields[-1]) if fields[-1] else None
    except ValueError:
        raise TvmqError(usage) from None
    return OutputSlice(output_names.index(fields[0]), axis, start, stop, text)


def concat_slices(func, output_names: list[str]) -> list[OutputSlice]:
    """The inputs of each output's final Concat, as slices of that output: a YOLO head concatenates
    boxes (hundreds of pixels) with class scores (0..1), and judged as one tensor the scores' damage
    hides behind the boxes' range. Outputs whose Concat has a symbolic extent get none."""
    from tvm import relax

    from tvmq.passes.graph import FunctionGraph, call_op, static_shape

    graph = FunctionGraph(func)

    def producer(expr):  # the value behind ``expr``, through ``gv = lv`` aliases
        return graph.value(graph.resolve(expr)) if isinstance(expr, relax.Var) else expr

    ret = func.body.body
    outs = list(ret.fields) if isinstance(ret, relax.Tuple) else [ret]
    slices = []
    for i, out in enumerate(outs):
        value, reshaped = producer(out), None
        if call_op(value) == "relax.reshape":  # a flattening of the dims after the Concat's axis keeps it
            reshaped, value = static_shape(out), producer(value.args[0])
        if call_op(value) != "relax.concat":
            continue
        parts = producer(value.args[0])
        shapes = [static_shape(p) for p in parts.fields] if isinstance(parts, relax.Tuple) else [None]
        if len(shapes) < 2 or any(s is None for s in shapes):
            continue
        axis = int(value.attrs.axis) % len(shapes[0])
        if reshaped is not None and (len(reshaped) <= axis or list(reshaped[:axis]) != list(shapes[0][:axis])
                                     or reshaped[axis] != sum(s[axis] for s in shapes)):
            continue
        start = 0
        for shape in shapes:
            stop = start + shape[axis]
            slices.append(OutputSlice(i, axis, start, stop, f"{output_names[i]}[{':, ' * axis}{start}:{stop}]"))
            start = stop
    return slices


@dataclass(frozen=True)
class OutputParts:
    """What a budget is judged on: every output whole, then each slice (a part of an output that
    must not hide behind the rest of it), one array per part."""

    output_names: tuple[str, ...]
    slices: tuple[OutputSlice, ...] = ()

    @property
    def labels(self) -> list[str]:
        return [*self.output_names, *(s.label for s in self.slices)]

    def __call__(self, outputs) -> tuple:
        outputs = tuple(outputs)
        parts = list(outputs)
        for s in self.slices:
            out = np.asarray(outputs[s.output])
            index = [slice(None)] * out.ndim
            index[s.axis] = slice(s.start, s.stop)
            parts.append(out[tuple(index)])
        return tuple(parts)

    def values(self, metric: "Metric", outputs: list, reference: list, labels=None) -> dict[str, float]:
        """The metric of each part on its own (``outputs``/``reference``: parts per sample)."""
        return {label: metric([o[i] for o in outputs], [r[i] for r in reference], labels)
                for i, label in enumerate(self.labels)}


def sample_sqnr(out, ref) -> float:
    """SQNR (dB) of one array against its reference: the one definition tvmq, its tests and benchmarks use."""
    ref, out = np.asarray(ref, np.float64).ravel(), np.asarray(out, np.float64).ravel()
    noise = np.sum((out - ref) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(max(np.sum(ref**2), 1e-30) / noise))


def _sample_cosine(out, ref) -> float:
    ref, out = np.asarray(ref, np.float64).ravel(), np.asarray(out, np.float64).ravel()
    if not out.any() and not ref.any():
        return 1.0
    return float(out @ ref / max(np.linalg.norm(out) * np.linalg.norm(ref), 1e-30))


def sqnr_db(outputs, reference) -> float:
    """Output SQNR (dB) of ``outputs`` against ``reference`` (lists of arrays): the worst sample."""
    return Metric("sqnr")(outputs, reference)

