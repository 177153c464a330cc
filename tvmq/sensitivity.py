"""Sensitivity: what quantizing each layer costs in accuracy and saves in time.

The measuring half of ``--precision auto`` (:mod:`tvmq.precision` is the choosing half):

* Accuracy: one compiled simulation (:func:`tvmq.passes.insert_qdq.insert_switchable_qdq`)
  whose layers are switched between int8 (8- or, on x86, 16-bit activations) and float by an
  input mask, run over the evaluation data with each layer alone quantized and alone left in
  float. No recompilation per layer.
* Stability: FP32 itself run with each image channel moved within its 8-bit step
  (``--input-noise``); a sample whose output moves beyond the budget there is judged against
  that, not the budget (:meth:`tvmq.metrics.Metric.slack`).
* Latency: the int8 and the float build (and the one with 16-bit activations) are compiled
  once; each layer's kernel is timed on this machine, or, for targets that do not run here,
  estimated from its multiply-accumulates and the ISA's int8/float rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tvmq.errors import TvmqError
from tvmq.metrics import Metric, OutputParts

__all__ = ["LayerInfo", "Analysis", "analyse", "input_rounding_outputs", "input_rounding_stability", "layer_latency", "estimated_ms"]


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
    only_int16: float | None = None  # metric with this layer alone int8 on 16-bit activations (x86 targets)
    sqnr_int16: float | None = None
    int16_ms: float | None = None

    def __post_init__(self):
        if self.sqnr_int8 is None:  # the metric is SQNR itself
            self.sqnr_int8 = self.only_int8
        if self.sqnr_fp16 is None:
            self.sqnr_fp16 = self.only_fp16
        if self.sqnr_int16 is None:
            self.sqnr_int16 = self.only_int16

    def ms(self, precision: str) -> float:
        return {"int8": self.int8_ms, "int16": self.int16_ms, "fp16": self.fp16_ms, "fp32": self.fp32_ms}[precision] or 0.0

    def alone(self, precision: str) -> float | None:
        """The metric with this layer alone in ``precision`` (None: not a candidate for it)."""
        return {"int8": self.only_int8, "int16": self.only_int16, "fp16": self.only_fp16}[precision]

    def sqnr(self, precision: str) -> float | None:
        """The output SQNR with this layer alone in ``precision`` (None: not a candidate for it)."""
        return {"int8": self.sqnr_int8, "int16": self.sqnr_int16, "fp16": self.sqnr_fp16}[precision]

    def saving_ms(self, precision: str = "int8") -> float:
        """Time saved by the ``precision`` kernel; negative where it is clearly (>10%) slower.

        Differences within 10% of the float kernel's time are timing noise and count as a tie,
        which the lower precision wins (smaller weights)."""
        diff = self.fp32_ms + self.boundary_ms - self.ms(precision)
        return diff if diff > 0 or -diff > 0.1 * self.fp32_ms else 0.0


_CODE = {"fp32": 0.0, "int8": 1.0, "fp16": 2.0, "int16": 3.0}  # the simulation's mask (insert_switchable_qdq)


@dataclass
class Analysis:
    metric: Metric
    fp32: float  # metric of the float model (inf for sqnr, 1 for cosine, accuracy for top1)
    all_int8: float
    layers: list[LayerInfo] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # switchable layers, mask order
    fp16: bool = False  # fp16 is a candidate
    wide: tuple = ()  # the layers for which int16 (int8 weights, 16-bit activations) is a candidate
    runner: object = field(default=None, repr=False)
    samples: list = field(default_factory=list, repr=False)
    reference: list = field(default_factory=list, repr=False)
    labels: object = None
    input_names: list = field(default_factory=list)
    parts: object = None  # OutputParts: the outputs and output slices the metric judges apart
    evaluations: int = 0
    tensors: dict = field(default_factory=dict, repr=False)  # quantized activation tensor -> its int8 readers (widths' order)
    narrowed: list = field(default_factory=list)  # the tensors whose range was clipped: readers, width, SQNR before/after
    widths: object = None  # per quantized tensor, the factor its calibrated range is scaled by (None: all 1)
    input_noise: float = 0.0  # input rounding (8-bit steps) the stability was measured under; 0: not measured
    stability: list = field(default_factory=list, repr=False)  # per sample and part: FP32 under input rounding
    slack: list | None = field(default=None, repr=False)  # what the budget forgives each (Metric.slack)
    sqnr_slack: list | None = field(default=None, repr=False)  # the same for the search's SQNR costs
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def candidates(self) -> tuple[str, ...]:
        return ("int8",) + (("int16",) if self.wide else ()) + (("fp16",) if self.fp16 else ())

    def layer(self, name: str) -> LayerInfo:
        return next(l for l in self.layers if l.name == name)

    def outputs(self, assignment, widths=None) -> list[tuple[np.ndarray, ...]]:
        """The simulation's outputs (a tuple per sample) under ``assignment``, with the
        quantized tensors' ranges scaled by ``widths`` (default: :attr:`widths`)."""
        if not isinstance(assignment, dict):
            assignment = {n: "int8" for n in assignment}
        mask = np.array([_CODE[assignment.get(n, "fp32")] for n in self.names], np.float32)
        widths = self.widths if widths is None else widths
        self.evaluations += 1
        split = self.parts or tuple
        return [split(self.runner(*[s[k] for k in self.input_names], mask, widths)) for s in self.samples]

    def evaluate(self, assignment) -> float:
        """The metric of the simulation with ``assignment`` (layer -> int8|fp16|fp32, or a list
        of the int8 layers; unnamed layers are fp32). Repeated assignments are not rerun."""
        if not isinstance(assignment, dict):
            assignment = {n: "int8" for n in assignment}
        key = (tuple(assignment.get(n, "fp32") for n in self.names), None if self.widths is None else self.widths.tobytes())
        if key not in self._cache:
            self._cache[key] = self.metric(self.outputs(assignment), self.reference, self.labels, self.slack)
        return self._cache[key]

    def sqnr(self, outputs) -> float:
        """The SQNR (dB) of ``outputs`` (the search's noise cost), unstable samples forgiven alike."""
        return Metric("sqnr")(outputs, self.reference, slack=self.sqnr_slack)

    def narrowed_ranges(self) -> dict:
        """``{tensor: width}`` of the tensors whose calibrated range the search clipped."""
        return {t: float(w) for t, w in zip(self.tensors, self.widths) if w != 1.0}

    def held_samples(self) -> list[dict]:
        """The samples and parts judged against their own FP32 stability instead of the budget."""
        labels = self.parts.labels if self.parts else [f"output{i}" for i in range(len(self.reference[0]))]
        return [{"sample": i, "part": labels[j], "fp32_under_input_rounding": stable, "slack": slack}
                for i, (row, forgiven) in enumerate(zip(self.stability, self.slack or []))
                for j, (stable, slack) in enumerate(zip(row, forgiven)) if slack > 0]


def analyse(float_mod, plan, samples, input_names, metric: Metric, labels=None, preset="x86",
            measure_latency: bool = True, progress: bool = False, fp16: bool | None = None,
            parts: OutputParts | None = None, budget: float | None = None, input_noise: float = 1.0,
            clip_ranges: bool = False, int16: bool = False) -> Analysis:
    """Per-layer sensitivity (and latency) of ``plan``'s int8 layers on ``samples``.

    For each layer: the metric (and the output SQNR) with it alone in int8 (and alone in fp16,
    or int8 on 16-bit activations, where that is a candidate), and with every other layer in
    int8. ``fp16`` adds fp16 as a candidate (default: where the target has fast fp16); ``int16``
    adds int8 weights on 16-bit activations, where the target has a kernel for them (x86) and the
    layer can take them (:func:`tvmq.quantize.wide_candidates`). ``parts``: what the metric
    judges apart (default: each output whole). With a ``budget`` (sqnr and cosine metrics), each sample's
    FP32 stability with its image inputs moved within ``input_noise`` 8-bit steps
    (:func:`input_rounding_outputs`) is measured first, and a sample FP32 cannot hold to the
    budget is judged against that (0: none is). ``clip_ranges`` (with a sqnr or cosine budget):
    :func:`narrow_ranges` first.
    """
    from tvmq.execute import HostModule
    from tvmq.passes.insert_qdq import insert_switchable_qdq, quantized_tensors
    from tvmq.quantize import wide_candidates
    from tvmq.targets import get_preset

    preset = get_preset(preset)
    fp16 = preset.fp16 if fp16 is None else fp16
    if metric.needs_labels and labels is None:
        raise TvmqError(f"metric {metric.kind} needs labels: put labels.npy (one label per sample) in the data folder")
    wide = wide_candidates(plan, float_mod, preset) if int16 else ()
    switchable, names = insert_switchable_qdq(float_mod, plan, fp16=fp16, wide=wide)
    runner = HostModule(switchable)
    zeros = np.zeros(len(names), np.float32)
    tensors = quantized_tensors(float_mod["main"], plan)
    ones = np.ones(max(len(tensors), 1), np.float32)
    split = parts or tuple
    reference = [split(runner(*[s[k] for k in input_names], zeros, ones)) for s in samples]
    a = Analysis(metric, 0.0, 0.0, names=names, fp16=fp16, wide=wide, runner=runner, samples=samples, reference=reference,
                 labels=labels, input_names=input_names, parts=parts, widths=ones, tensors=tensors)
    a.fp32 = metric(reference, reference, labels)
    if budget is not None and input_noise > 0 and metric.kind in ("sqnr", "cosine"):
        noisy = input_rounding_outputs(lambda *xs: split(runner(*xs, zeros, ones)), samples, input_names, input_noise)
        a.input_noise, a.stability = input_noise, input_rounding_stability(metric, noisy, reference)
        a.slack = metric.slack(a.stability, budget)
        sqnr_budget = sqnr_equivalent(metric, budget)
        sqnr = Metric("sqnr")
        sqnr_stability = a.stability if metric.kind == "sqnr" else input_rounding_stability(sqnr, noisy, reference)
        a.sqnr_slack = sqnr.slack(sqnr_stability, sqnr_budget)

    def measure(assignment):
        outs = a.outputs(assignment)
        return metric(outs, reference, labels, a.slack), a.sqnr(outs)

    iterator = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc="sensitivity", unit="layer", leave=False)
    alone = {name: measure({name: "int8"}) for name in iterator}
    if clip_ranges and budget is not None and metric.kind in ("sqnr", "cosine"):
        for name in narrow_ranges(a, {n: v[1] for n, v in alone.items()}, sqnr_equivalent(metric, budget)):
            alone[name] = measure({name: "int8"})
    a.all_int8 = a.evaluate(names)
    for name in names:
        only_int8, sqnr_int8 = alone[name]
        info = LayerInfo(name, plan.layers[name].kind, only_int8, a.evaluate([n for n in names if n != name]),
                         sqnr_int8=sqnr_int8)
        if fp16 and info.kind != "add":
            info.only_fp16, info.sqnr_fp16 = measure({name: "fp16"})
        if name in wide:
            info.only_int16, info.sqnr_int16 = measure({name: "int16"})
        a.layers.append(info)
    if measure_latency:
        layer_latency(float_mod, plan, a, preset)
    return a


WIDTHS = (0.85, 0.7, 0.55, 0.4)  # range factors tried for a tensor whose quantization breaks the budget
NARROW_MARGIN_DB = 6.0  # readers alone within this of the SQNR budget (a quarter of its noise or more): worth a search
NARROW_GAIN_DB = 0.5  # a narrower range is kept when all-int8 gains this much with it (and neither half nor the median loses)


def sqnr_equivalent(metric: Metric, budget: float) -> float:
    """The SQNR (dB) a sqnr or cosine budget amounts to (1 - cos = noise / 2 signal for small noise)."""
    return budget if metric.kind == "sqnr" else 10 * np.log10(1 / (2 * max(budget, 1e-12)))


def narrow_ranges(a: Analysis, sqnr_alone: dict, sqnr_budget: float) -> list[str]:
    """Clip the ranges of the activation tensors whose quantization nearly breaks the budget.

    Calibration covers each tensor's whole observed range; a long tail (a YOLO backbone's SiLU
    outputs: 99.9% under 48, a maximum of 116) then spends the 8-bit grid on rare values while
    a sample whose objects lie in the small ones loses them. Each tensor whose int8 readers
    (alone) fall within ``NARROW_MARGIN_DB`` of ``sqnr_budget`` is tried, worst first, with its
    range scaled by each of ``WIDTHS`` in the simulation with every layer int8 (the plan the
    search starts from: a width that helps a layer alone can hurt amid the others' noise, as
    one did on YOLOX), and the best kept when it gains ``NARROW_GAIN_DB`` there (worst sample
    and part, the search's own cost) while neither half of the samples (even- and
    odd-numbered) nor the median sample loses. A factor that one image's score asks for and the
    others pay for fits the calibration set, not the model (on YOLOX, `Conv_64` at 0.4 held
    17.4 dB on the calibration images and lost the held-out class scores, cosine 0.974); and
    clipping a real tail refines the step for most inputs, so a factor that lifts the worst
    sample while the median one falls is a chance gain, not a resolution one (ddddocr's
    `Conv_3` at 0.4: worst calibration sample 16.6 -> 19.2 dB, median 30.0 -> 26.4, held-out
    worst 28.7 -> 19.7; YOLOv8n's `model.2.cv1` at 0.55: worst 4.2 -> 9.6, median 12.0 -> 17.3,
    held-out median 15.5 -> 19.0). The next tensor is tried with the kept ones. Sets
    ``a.widths``; returns the layers whose input changed (their figures are stale)."""
    readers = list(a.tensors.values())
    worst = {i: min(sqnr_alone[n] for n in names) for i, names in enumerate(readers)}
    tried = sorted((i for i, v in worst.items() if v < sqnr_budget + NARROW_MARGIN_DB), key=worst.get)
    if not tried:
        return []
    everything = {n: "int8" for n in a.names}
    current = _clip_figures(a, a.outputs(everything))
    changed = []
    for i in tried:
        trials = []  # ((all-int8 SQNR, even samples', odd samples', median sample's), width)
        for width in WIDTHS:
            trial = a.widths.copy()
            trial[i] = width
            trials.append((_clip_figures(a, a.outputs(everything, trial)), width))
        kept = [(v, w) for v, w in trials if v[0] >= current[0] + NARROW_GAIN_DB and all(x >= c for x, c in zip(v[1:], current[1:]))]
        if not kept:
            continue
        value, width = max(kept)
        a.widths[i] = width
        a.narrowed.append({"readers": readers[i], "width": width, "all_int8_db": [current[0], value[0]]})
        changed += readers[i]
        current = value
    return changed


def _clip_figures(a: Analysis, outputs) -> tuple[float, float, float, float]:
    """What a range factor is judged by: the search's SQNR cost of ``outputs`` (worst sample
    and part, slack added) over all the samples, over the even-numbered ones and over the
    odd-numbered ones, and the median sample's (its worst part)."""
    values = Metric("sqnr").worst_parts(outputs, a.reference, a.sqnr_slack)
    if not values:
        return (np.inf,) * 4
    return min(values), min(values[0::2]), min(values[1::2], default=np.inf), float(np.median(values))


def input_rounding_outputs(run, samples: list, input_names: list[str], steps: float = 1.0, draws: int = 4) -> list:
    """``run``'s outputs (per draw, per sample) with every image input moved by uniform noise
    ``steps`` wide in units of an 8-bit grid over each channel's range in the samples: the
    resolution camera and file images come in (a normalized 8-bit pixel), so an output that
    changes under it is not determined by the image. Image inputs are the 4-D float ones
    (channels on axis 1, or 3 when that is the shorter); other inputs (audio, tokens, states)
    stay as they are: their resolution is not known. Seeded: the same samples draw the same
    noise."""
    rng = np.random.default_rng(0)
    step = {}
    for k in input_names:
        values = [np.asarray(s[k]) for s in samples]  # sizes may differ (dynamic shapes); channels do not
        if values[0].dtype.kind == "f" and values[0].ndim == 4:
            axis = 1 if values[0].shape[1] <= values[0].shape[3] else 3
            others = tuple(a for a in range(4) if a != axis)
            width = np.max([v.max(axis=others) for v in values], 0) - np.min([v.min(axis=others) for v in values], 0)
            shape = [1, 1, 1, 1]
            shape[axis] = -1
            step[k] = (steps * width / 255).reshape(shape).astype(values[0].dtype)
    out = []
    for _ in range(draws):
        moved = [[np.asarray(s[k]) + (rng.uniform(-0.5, 0.5, np.shape(s[k])) * step[k]).astype(step[k].dtype)
                  if k in step else s[k] for k in input_names] for s in samples]
        out.append([run(*xs) for xs in moved])
    return out


def input_rounding_stability(metric: Metric, noisy: list, reference: list) -> list[tuple[float, ...]]:
    """Per sample and part, the worst ``metric`` value over the draws of
    :func:`input_rounding_outputs` against the FP32 ``reference``."""
    per_draw = [metric.per_sample(outs, reference) for outs in noisy]
    return [tuple(min(values) for values in zip(*rows)) for rows in zip(*per_draw)]


def layer_latency(float_mod, plan, analysis: Analysis, preset) -> None:
    """Each layer's kernel time per precision: measured on this machine for host targets,
    else estimated from its multiply-accumulates and the target's relative throughput."""
    from tvmq.kernels import call_order, reduction_kernels, time_kernel
    from tvmq.passes.layers import find_layers
    from tvmq.targets.intrinsics import MICRO_KERNELS
    from tvmq.pipeline import lower
    from tvmq.quantize import quantize_pipeline, widen_activations

    mac_layers = [l for l in analysis.layers if l.kind != "add"]
    float_mod = specialised(float_mod, analysis.samples[0], analysis.input_names) if analysis.samples else float_mod
    if preset.runs_here:
        ns = _conversion_ns_per_element(preset)
        sizes = {l.name: l.io_elements for l in find_layers(float_mod["main"])}
        for layer in analysis.layers:
            layer.boundary_ms = ns * sizes.get(layer.name, 0) * 1e-6
        builds = {"int8": quantize_pipeline(plan)(float_mod), "fp32": float_mod}
        if analysis.fp16:
            builds["fp16"] = quantize_pipeline(_all_fp16(plan))(float_mod)
        if analysis.wide:
            builds["int16"] = quantize_pipeline(widen_activations(plan, float_mod, analysis.wide, preset))(float_mod)
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
                if layer.name in analysis.wide:
                    layer.int16_ms = times["int16"][i]
            return
    # A model, not a measurement: time proportional to MACs at the target's relative rates.
    by_name = {l.name: l for l in find_layers(float_mod["main"])}
    for layer in mac_layers:
        fp32_ms, int8_ms, boundary_ms = estimated_ms(by_name.get(layer.name), preset)
        layer.fp32_ms, layer.int8_ms, layer.boundary_ms = fp32_ms, int8_ms, boundary_ms
        layer.fp16_ms = fp32_ms / 2.0 if analysis.fp16 else None  # fp16 lanes vs fp32
        if layer.name in analysis.wide:  # the ISA's kernel for 16-bit activations, at its rate
            layer.int16_ms = fp32_ms / MICRO_KERNELS[preset.micro_kernel.wide].int8_speedup
        layer.estimated = True


def specialised(mod, sample: dict, input_names: list[str]):
    """``mod`` with its dynamic dimensions fixed at ``sample``'s sizes (``H_32`` at H / 32): the
    kernels a latency measurement can time. ``mod`` itself when it has none."""
    from tvm import relax

    from tvmq._compat import expr_type
    from tvmq.execute import dim_variable

    tensors = [p for p in mod["main"].params if hasattr(expr_type(p), "dtype")]
    values = {}
    for name, param in zip(input_names, tensors):
        shape = getattr(expr_type(param), "shape", None)
        for d, size in zip(shape.values if shape is not None else [], np.shape(sample[name])):
            var, step = dim_variable(d) or (None, 1)
            if var is not None:
                values[var] = int(size) // step
    return relax.transform.BindSymbolicVars(values, "main")(mod) if values else mod


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

