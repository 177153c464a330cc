"""Precision per layer: sensitivity, an accuracy budget, and the fastest plan that meets it.

Runtime-side quantizers make users exclude layers by hand until accuracy comes back, or stop
at the first plan that passes. tvmq measures, per layer, what quantizing it costs in accuracy
and what it saves in time on the target, then picks the fastest plan within the budget.

* Sensitivity: one compiled simulation (:func:`tvmq.passes.insert_qdq.insert_switchable_qdq`)
  whose layers are switched between int8 and float by an input mask, run over the evaluation
  data with each layer alone quantized and alone left in float. No recompilation per layer.
* Latency: the int8 and the float build are compiled once; each layer's kernel is timed.
* Search: a layer's cost is the output noise power it causes alone (noise powers add up across
  layers, as in HAWQ's additivity assumption); for a given noise allowance the fastest plan is a
  multiple-choice knapsack (one of fp32/int8/fp16 per layer), solved exactly by dynamic
  programming over a finely discretized allowance; the greedy ratio order is the baseline. The
  allowance is then chosen by bisection on the *measured* metric of the simulated plan, so
  discrete metrics (top-1, exact-match) are budgeted as measured, not as assumed.
* ``fallback_plan`` is INC's strategy, for comparison: start all-int8 and put the most
  sensitive remaining layer back in float until the budget is met.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from tvmq.errors import TvmqError

__all__ = ["Metric", "OutputParts", "parse_output_slice", "concat_slices", "LayerInfo", "Analysis", "analyse", "search", "fallback_plan", "config_for", "latency",
           "float_layers_by_saving"]


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

    def __call__(self, outputs: list, reference: list, labels=None) -> float:
        if outputs and isinstance(outputs[0], (tuple, list)):
            if self.kind in ("sqnr", "cosine"):
                return min(self([o[i] for o in outputs], [r[i] for r in reference])
                           for i in range(len(outputs[0])))
            outputs, reference = [o[0] for o in outputs], [r[0] for r in reference]
        if self.kind == "sqnr":
            return min(_sample_sqnr(o, r) for o, r in zip(outputs, reference))
        if self.kind == "cosine":
            return min(_sample_cosine(o, r) for o, r in zip(outputs, reference))
        if self.kind == "top1":
            return float(np.mean([np.argmax(o) == y for o, y in zip(outputs, labels)]))
        return float(self.function()(outputs, labels))

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

    from tvmq.passes.patterns import FunctionGraph, call_op, static_shape

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


def _sample_sqnr(out, ref) -> float:
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


@dataclass
class LayerInfo:
    name: str
    kind: str
    only_int8: float  # metric with this layer alone in int8
    only_float: float  # metric with every other layer in int8
    only_fp16: float | None = None  # metric with this layer alone in fp16 (fp16 targets)
    int8_ms: float = 0.0
    fp32_ms: float = 0.0
    fp16_ms: float | None = None
    estimated: bool = False  # latencies from a MAC-count model, not measured
    sqnr_int8: float | None = None  # output SQNR with this layer alone in int8 (the search's cost)
    sqnr_fp16: float | None = None
    boundary_ms: float = 0.0  # converting its input to float and its output back, when it stays float amid int8

    def __post_init__(self):
        if self.sqnr_int8 is None:  # the metric is SQNR itself
            self.sqnr_int8 = self.only_int8
        if self.sqnr_fp16 is None:
            self.sqnr_fp16 = self.only_fp16

    def ms(self, precision: str) -> float:
        return {"int8": self.int8_ms, "fp16": self.fp16_ms, "fp32": self.fp32_ms}[precision] or 0.0

    def saving_ms(self, precision: str = "int8") -> float:
        """Time saved by the ``precision`` kernel; negative where it is clearly (>10%) slower.

        Differences within 10% of the float kernel's time are timing noise and count as a tie,
        which the lower precision wins (smaller weights)."""
        diff = self.fp32_ms + self.boundary_ms - self.ms(precision)
        return diff if diff > 0 or -diff > 0.1 * self.fp32_ms else 0.0


_CODE = {"fp32": 0.0, "int8": 1.0, "fp16": 2.0}


@dataclass
class Analysis:
    metric: Metric
    fp32: float  # metric of the float model (inf for sqnr, 1 for cosine, accuracy for top1)
    all_int8: float
    layers: list[LayerInfo] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # switchable layers, mask order
    fp16: bool = False  # fp16 is a candidate
    runner: object = field(default=None, repr=False)
    samples: list = field(default_factory=list, repr=False)
    reference: list = field(default_factory=list, repr=False)
    labels: object = None
    input_names: list = field(default_factory=list)
    parts: object = None  # OutputParts: the outputs and output slices the metric judges apart
    evaluations: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def candidates(self) -> tuple[str, ...]:
        return ("int8", "fp16") if self.fp16 else ("int8",)

    def outputs(self, assignment) -> list[tuple[np.ndarray, ...]]:
        """The simulation's outputs (a tuple per sample) under ``assignment``."""
        if not isinstance(assignment, dict):
            assignment = {n: "int8" for n in assignment}
        mask = np.array([_CODE[assignment.get(n, "fp32")] for n in self.names], np.float32)
        self.evaluations += 1
        split = self.parts or tuple
        return [split(self.runner(*[s[k] for k in self.input_names], mask)) for s in self.samples]

    def evaluate(self, assignment) -> float:
        """The metric of the simulation with ``assignment`` (layer -> int8|fp16|fp32, or a list
        of the int8 layers; unnamed layers are fp32). Repeated assignments are not rerun."""
        if not isinstance(assignment, dict):
            assignment = {n: "int8" for n in assignment}
        key = tuple(assignment.get(n, "fp32") for n in self.names)
        if key not in self._cache:
            self._cache[key] = self.metric(self.outputs(assignment), self.reference, self.labels)
        return self._cache[key]


def analyse(float_mod, plan, samples, input_names, metric: Metric, labels=None, preset="x86",
            measure_latency: bool = True, progress: bool = False, fp16: bool | None = None,
            parts: OutputParts | None = None) -> Analysis:
    """Per-layer sensitivity (and latency) of ``plan``'s int8 layers on ``samples``.

    For each layer: the metric (and the output SQNR) with it alone in int8 (and alone in fp16
    where that is a candidate), and with every other layer in int8. ``fp16`` adds fp16 as a
    candidate (default: where the target has fast fp16). ``parts``: what the metric judges apart
    (default: each output whole).
    """
    from tvmq.execute import HostModule
    from tvmq.passes.insert_qdq import insert_switchable_qdq
    from tvmq.pipeline import _preset

    preset = _preset(preset)
    fp16 = preset.fp16 if fp16 is None else fp16
    if metric.needs_labels and labels is None:
        raise TvmqError(f"metric {metric.kind} needs labels: put labels.npy (one label per sample) in the data folder")
    switchable, names = insert_switchable_qdq(float_mod, plan, fp16=fp16)
    runner = HostModule(switchable)
    zeros = np.zeros(len(names), np.float32)
    split = parts or tuple
    reference = [split(runner(*[s[k] for k in input_names], zeros)) for s in samples]
    a = Analysis(metric, 0.0, 0.0, names=names, fp16=fp16, runner=runner, samples=samples, reference=reference,
                 labels=labels, input_names=input_names, parts=parts)
    a.fp32 = metric(reference, reference, labels)
    a.all_int8 = a.evaluate(names)

    def measure(assignment):
        outs = a.outputs(assignment)
        return metric(outs, reference, labels), sqnr_db(outs, reference)

    iterator = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc="sensitivity", unit="layer", leave=False)
    for name in iterator:
        only_int8, sqnr_int8 = measure({name: "int8"})
        info = LayerInfo(name, plan.layers[name].kind, only_int8, a.evaluate([n for n in names if n != name]),
                         sqnr_int8=sqnr_int8)
        if fp16 and info.kind != "add":
            info.only_fp16, info.sqnr_fp16 = measure({name: "fp16"})
        a.layers.append(info)
    if measure_latency:
        _layer_latency(float_mod, plan, a, preset)
    return a


def _layer_latency(float_mod, plan, analysis: Analysis, preset) -> None:
    """Each layer's kernel time per precision: measured on this machine for host targets,
    else estimated from its multiply-accumulates and the target's relative throughput."""
    from tvmq.kernels import call_order, reduction_kernels, time_kernel
    from tvmq.passes.patterns import find_layers
    from tvmq.pipeline import lower
    from tvmq.quantize import quantize_pipeline

    mac_layers = [l for l in analysis.layers if l.kind != "add"]
    if preset.runs_here:
        ns = _conversion_ns_per_element(preset)
        sizes = {l.name: l.io_elements for l in find_layers(float_mod["main"])}
        for layer in analysis.layers:
            layer.boundary_ms = ns * sizes.get(layer.name, 0) * 1e-6
        builds = {"int8": quantize_pipeline(plan)(float_mod), "fp32": float_mod}
        if analysis.fp16:
            builds["fp16"] = quantize_pipeline(_all_fp16(plan))(float_mod)
        times = {}
        for precision, mod in builds.items():
            lowered = lower(mod, preset)
            # A layer's kernel is one of tvmq's packed conv/depthwise/matmul kernels; products
            # of two activations (attention) are reductions too, but no layer of the plan.
            heavy = {k.func for k in reduction_kernels(lowered) if "tvmq_" in k.func}
            calls = call_order(lowered)
            if sum(n in heavy for n in calls) != len(mac_layers):
                break
            measured = {n: time_kernel(lowered[n], preset.tvm_target()) for n in dict.fromkeys(calls)}
            times[precision] = _attribute(calls, heavy, measured)
        if len(times) == len(builds):
            for i, layer in enumerate(mac_layers):
                layer.int8_ms, layer.fp32_ms = times["int8"][i], times["fp32"][i]
                if analysis.fp16:
                    layer.fp16_ms = times["fp16"][i]
            return
    # A model, not a measurement: time proportional to MACs at the target's relative rates.
    by_name = {l.name: l for l in find_layers(float_mod["main"])}
    for layer in mac_layers:
        fp32_ms, int8_ms, boundary_ms = estimated_ms(by_name.get(layer.name), preset)
        layer.fp32_ms, layer.int8_ms, layer.boundary_ms = fp32_ms, int8_ms, boundary_ms
        layer.fp16_ms = fp32_ms / 2.0 if analysis.fp16 else None  # fp16 lanes vs fp32
        layer.estimated = True


# What a cross target's estimate charges, in fp32 multiply-accumulates: converting one element
# between int8 and float (a dequantize or a quantize: a multiply, a round, a clamp, a narrowing;
# about 20 fp32 MACs' time on the x86 hosts measured); and the int8/fp32 rate of a layer whose
# int8 kernel the ISA's rules say does not pay (short reductions, depthwise and one-pixel convs
# without a dot product: 0.55-0.99x float in scripts/int8_breakeven.py).
CONVERSION_MACS = 20.0
SLOW_INT8_SPEEDUP = 0.7


def estimated_ms(layer, preset) -> tuple[float, float, float]:
    """(fp32, int8, boundary) time of ``layer`` on ``preset`` from its MACs and the ISA: its
    micro-kernel's int8/fp32 rate where the ISA's rules say int8 pays, else slower than float;
    LLVM's own widening loops (no micro-kernel) run slower than float too. 1 GMAC/s fp32 (only
    ratios matter)."""
    from tvmq.targets.intrinsics import int8_pays

    if layer is None:
        return 0.0, 0.0, 0.0
    kernel = preset.micro_kernel
    if kernel is None:
        speedup = 4.0 if preset.fast_int8 else SLOW_INT8_SPEEDUP
    elif int8_pays(kernel, layer.reduction, layer.depthwise, layer.pixels):
        speedup = kernel.int8_speedup
    else:
        speedup = SLOW_INT8_SPEEDUP
    fp32_ms = layer.macs * 1e-6
    return fp32_ms, fp32_ms / speedup, CONVERSION_MACS * layer.io_elements * 1e-6


def _attribute(calls: list[str], heavy: set, measured: dict) -> list[float]:
    """Per layer (each call of a ``heavy`` kernel, in order): its kernel's time plus that of
    every other kernel called before the next layer's (an activation, pad or quantize the
    fusion left on its own), and, for the first layer, of those before it (the input's
    quantization). Fusion differs between precisions (a swish's sigmoid fuses into the int8
    kernel's requantize but runs apart after a float conv), so timing the layer's kernel alone
    would charge the int8 layer for work the float one does too."""
    out: list[float] = []
    pending = 0.0
    for name in calls:
        if name in heavy:
            out.append(measured[name] + pending)
            pending = 0.0
        elif out:
            out[-1] += measured[name]
        else:
            pending += measured[name]
    return out


def _conversion_ns_per_element(preset) -> float:
    """Nanoseconds per element to dequantize a tensor and quantize it again on this machine
    (what a float layer between int8 layers adds: its input to float, its output to 8 bits)."""
    import tvm
    from tvm import relax

    from tvmq._compat import TensorType
    from tvmq.execute import HostModule

    n = 1 << 18
    x = relax.Var("x", TensorType((n,), "uint8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            scale, zp = relax.const(np.float32(0.05)), relax.const(np.int32(128))
            f = bb.emit(relax.op.dequantize(x, scale, zp))
            g = bb.emit(relax.op.nn.relu(f))  # a float layer's epilogue stands between the two
            q = bb.emit_output(relax.op.quantize(g, scale, zp, out_dtype="uint8"))
        bb.emit_func_output(q)
    module = HostModule(bb.get(), preset)
    ms = module.latency_ms(np.random.default_rng(0).integers(0, 255, n).astype(np.uint8), repeat=20)
    return ms * 1e6 / n


def _all_fp16(plan):
    """``plan`` with every conv/matmul layer in fp16."""
    import dataclasses

    layers = {n: dataclasses.replace(lp, precision="fp16", inputs=(), output=None, weight=None, bias_correction=None)
              if lp.kind != "add" else dataclasses.replace(lp, precision="fp32", inputs=(), output=None)
              for n, lp in plan.layers.items()}
    return dataclasses.replace(plan, layers=layers)


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
    layers = analysis.layers
    names = [layer.name for layer in layers]
    options = [_options(analysis, layer, budget) for layer in layers]
    pick = _knapsack if method == "exact" else _greedy
    passing: list[tuple[float, dict, float]] = []  # (estimated latency, assignment, metric)
    spent = 0

    def check(assignment) -> bool:
        nonlocal spent
        spent += 1
        value = analysis.evaluate(assignment)
        if meets(analysis, value, budget):
            passing.append((latency(analysis, assignment), dict(assignment), value))
            return True
        return False

    costs = [c for opts in options for _, c, _ in opts]
    everything = sum(max((c for _, c, _ in opts), default=0.0) for opts in options) * 1.001
    allowance = min(_noise(budget), everything) if analysis.metric.kind == "sqnr" else everything
    floor = min((c for c in costs if c > 0), default=0.0) / 4
    tried = set()
    while spent < max_evaluations // 2:
        assignment = dict(zip(names, pick(options, allowance)))
        key = tuple(assignment.values())
        if key not in tried:
            tried.add(key)
            if check(assignment):
                break
        if allowance <= floor:
            break
        allowance /= 2
    if method == "exact":
        for seed in seeds:
            check(seed)
    if not passing:
        if not check({n: "fp32" for n in names}):  # the float model itself misses the budget
            return {n: "fp32" for n in names}, analysis.fp32
    if method == "exact":
        best = min(passing, key=lambda t: t[0])[1]
        moves = sorted(((saving / max(cost, 1e-30), i, p) for i, opts in enumerate(options) for p, cost, saving in opts),
                       key=lambda t: -t[0])
        for _, i, precision in moves:
            if spent >= max_evaluations:
                break
            now = best[names[i]]
            if now == precision or (now != "fp32" and layers[i].ms(precision) >= layers[i].ms(now)):
                continue  # already there, or no faster than the precision it has
            trial = {**best, names[i]: precision}
            if check(trial):
                best = trial
        # A seed (the fallback) quantizes every layer it did not need in float, including those
        # whose quantized kernel is slower than the float one: back to float, the slowest first,
        # while the budget holds (one evaluation each, beyond ``max_evaluations``).
        best = min(passing, key=lambda t: t[0])[1]
        slower = sorted(((layers[i].saving_ms(best[n]), i) for i, n in enumerate(names)
                         if best[n] != "fp32" and layers[i].saving_ms(best[n]) < 0))
        for _, i in slower:
            trial = {**best, names[i]: "fp32"}
            if check(trial):
                best = trial
        # A layer whose quantization alone breaks the budget is no option above, yet on a metric
        # that moves in whole samples the sample it loses alone is often won back once the plan's
        # other sensitive layers are float. The fastest plan and each seed therefore try each of
        # their float layers quantized, the largest saving first, kept while the budget holds
        # (one evaluation per float layer, beyond ``max_evaluations``).
        starts = [best] + [s for s in seeds if any(s == p for _, p, _ in passing)]
        for start in {tuple(s.items()): s for s in starts}.values():
            current = start
            for _, i, precision in float_layers_by_saving(analysis, current):
                trial = {**current, names[i]: precision}
                if check(trial):
                    current = trial
    lat, assignment, value = min(passing, key=lambda t: t[0])
    return assignment, value


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
