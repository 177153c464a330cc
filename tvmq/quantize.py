"""The high-level API: float Relax module + calibration data -> integer Relax module.

Where it sits: frontend -> **prepare** (the float passes) -> calibrate -> **plan** (statistics ->
:class:`~tvmq.plan.QuantPlan`) -> **the quantize passes** (InsertQDQ, FoldQDQ) -> pipeline -> bundle.
:func:`quantize` composes them for a Relax module; :mod:`tvmq.compile` for an ONNX file.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import tvm
from tvm import relax

from tvmq.calibrate import InputSpec, collect_statistics, select_range, validate_samples
from tvmq.config import WIDE, ActivationSpec, CalibrationMethod, QuantConfig, RequantizeMode
from tvmq.errors import TvmqError
from tvmq.plan import LayerPlan, QuantPlan
from tvmq.qparams import QParams, activation_qparams, channel_activation_qparams, int16_accumulates_exactly, quantize_weight, sixteen_bits
from tvmq.passes import Conv1dToConv2d, ConvertToNHWC, ConvTransposeToConv, DivideToMultiply, FoldConstantsNumpy, FoldQDQ, InsertQDQ
from tvmq.passes.graph import FunctionGraph, dtype_of, dims
from tvmq.passes.layers import find_layers

__all__ = ["prepare", "calibrate", "narrow", "widen_activations", "wide_activations_fit", "wide_candidates", "per_channel_inputs", "quantize", "quantize_pipeline", "input_specs", "smooth", "smooth_and_calibrate", "finish"]

log = logging.getLogger("tvmq")


def prepare(mod: tvm.IRModule, params: Mapping[str, np.ndarray] | None = None, layout: str = "NHWC",
            fold_batchnorm: bool = True) -> tvm.IRModule:
    """Bind parameters, fold batch norms into convolutions, fold constants, convert the layout.

    ``layout="NHWC"`` (default) makes activations channels-last, what the int8 dot-product
    kernels and the channel-vectorized kernels want; ``"NCHW"`` keeps the model's layout.
    ``fold_batchnorm=False`` keeps batch norms as separate (elementwise) ops: a pre-quantized
    model's weight scales belong to the unfolded weights.
    """
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be NHWC or NCHW, not {layout!r}")
    if params:
        mod = relax.transform.BindParams("main", {k: tvm.runtime.tensor(np.asarray(v)) for k, v in params.items()})(mod)
    seq = tvm.transform.Sequential(
        [
            *([relax.transform.FoldBatchnormToConv2D()] if fold_batchnorm else []),
            relax.transform.DecomposeOpsForInference(),
            ConvTransposeToConv(),
            Conv1dToConv2d(),
            FoldConstantsNumpy(),
            relax.transform.FoldConstant(),
            DivideToMultiply(),
            relax.transform.DeadCodeElimination(["main"]),
        ]
    )
    mod = seq(mod)
    return ConvertToNHWC()(mod) if layout == "NHWC" else mod


def input_specs(mod: tvm.IRModule, names: list[str] | None = None) -> list[InputSpec]:
    """The model inputs as ``InputSpec`` (names default to the Relax parameter names)."""
    params = list(mod["main"].params)
    names = names or [p.name for p in params]
    specs = []
    for name, p in zip(names, [p for p in params if dtype_of(p) is not None]):  # not main's shape argument
        shape = dims(p)
        if shape is None:
            raise TvmqError(f"input {name!r} has a dynamic shape; fix it with --shape {name}:D0,D1,...")
        specs.append(InputSpec(name, shape, dtype_of(p)))
    return specs


def _int8_layers(layers, graph, config: QuantConfig, kernel=None):
    """Decide which layers run in int8: conv/matmul by the rules, else where the target's
    micro-kernel makes int8 pay (``kernel``); adds only between int8 layers. Returns the int8
    layers, each layer's input roots, and the layers kept float for speed alone."""
    from tvmq.targets.intrinsics import int8_pays

    chosen, slow = {}, []
    for layer in layers:
        if layer.kind != "add":
            pays = config.int8_everywhere or int8_pays(kernel, layer.reduction, layer.depthwise,
                                                                layer.pixels if layer.kind == "conv2d" else None)
            chosen[layer.name] = config.precision_for(layer.name, layer.kind, "int8" if pays else "fp32") in ("int8", WIDE)
            if not pays and config.precision_for(layer.name, layer.kind, "") == "":
                slow.append(layer.name)
    ends = {layer.output: layer for layer in layers}
    # an int16 rule gives an add 8-bit inputs (it has no 16-bit kernel)
    adds = [l for l in layers if l.kind == "add" and config.quantize_add and config.precision_for(l.name, "add") in ("int8", WIDE)]
    for layer in adds:
        chosen[layer.name] = True
    root_of = {l.name: [graph.root(x)[0] for x in l.inputs] for l in layers}
    changed = True
    while changed:
        changed = False
        consumed = {r for l in layers if chosen.get(l.name) for r in root_of[l.name]}
        for layer in adds:
            if not chosen[layer.name]:
                continue
            producers_int8 = all(r in ends and chosen.get(ends[r].name) for r in root_of[layer.name])
            if not producers_int8 or layer.output not in consumed:
                chosen[layer.name] = False
                changed = True
    return {name for name, on in chosen.items() if on}, root_of, tuple(slow)


def calibrate(
    mod: tvm.IRModule,
    calib_data: Iterable[Mapping[str, np.ndarray]],
    config: QuantConfig | None = None,
    *,
    target: str = "x86",
    input_names: list[str] | None = None,
    progress: bool = False,
) -> QuantPlan:
    """Observe ``calib_data`` on the (prepared) float module and return a :class:`QuantPlan`."""
    from tvmq.targets import get_preset

    config = config or QuantConfig()
    spec = config.activation or ActivationSpec(dtype=get_preset(target).activation_dtype)
    specs = input_specs(mod, input_names)
    samples = validate_samples(calib_data, specs)
    func = mod["main"]
    graph = FunctionGraph(func)
    layers = find_layers(func, graph)
    int8, root_of, slow = _int8_layers(layers, graph, config, get_preset(target).micro_kernel)

    method = CalibrationMethod(config.method)
    qparams = _activation_qparams(mod, _observed_tensors(layers, int8, root_of), samples, [s.name for s in specs],
                                  config, method, spec, progress)
    corrections = {}
    if config.bias_correction:
        corrections = _bias_corrections(mod, layers, int8, samples, [s.name for s in specs])
    plan = {}
    for layer in layers:
        if layer.name in int8:
            plan[layer.name] = LayerPlan(
                kind=layer.kind,
                precision="int8",
                inputs=tuple(qparams[r] for r in root_of[layer.name]),
                output=qparams.get(layer.output),
                bias_correction=corrections.get(layer.name),
            )
        else:
            wanted = config.precision_for(layer.name, layer.kind, default="fp32")
            plan[layer.name] = LayerPlan(kind=layer.kind, precision="fp16" if wanted == "fp16" and layer.kind != "add" else "fp32")
    plan = QuantPlan(
        layers=plan,
        input_shapes={s.name: list(s.shape) for s in specs},
        method=method.value, activation_dtype=spec.dtype,
        requantize=(config.requantize or RequantizeMode.FIXED_POINT).value,
        kept_float=slow,
    )
    wide = [l.name for l in layers if l.name in int8 and config.precision_for(l.name, l.kind, "") == WIDE]
    if config.per_channel_activations is not False:
        names = [s.name for s in specs]
        channels = per_channel_inputs(plan, mod, samples, names, wide=wide)
        if channels is not plan and (config.per_channel_activations or _simulated_better(mod, plan, channels, samples, names)):
            plan = channels
    return widen_activations(plan, mod, wide, target) if wide else plan


# Per-channel parameters replace a tensor's per-tensor ones where they cut the quantization noise
# its readers' outputs get from it (activation and weight rounding; see _rounding_noise) at least
# this many times.
PER_CHANNEL_GAIN = 2.0


def _rounding_noise(layer, scale: np.ndarray, mean_square: np.ndarray) -> float:
    """The noise power int8 rounding adds to ``layer``'s outputs (summed over output channels) when
    its input is quantized with steps ``scale`` (one, or one per channel: folded into the weights)
    and its weights per output channel: activation rounding ``sum W^2 s^2 / 12`` plus weight
    rounding ``sum_o step_o^2 / 12 * sum E[x^2] / s^2`` in integer steps (per tensor, ``s`` is
    common and the weight's own step applies to the real input)."""
    from tvmq.passes.insert_qdq import channel_scaled_weight

    channels = mean_square.size
    scale = np.broadcast_to(np.asarray(scale, np.float64), (channels,))
    w = np.asarray(layer.weight, np.float64)
    per_channel = bool(np.ptp(scale) > 0)
    folded = channel_scaled_weight(layer, scale) if per_channel else w
    wax = layer.weight_axis
    step = np.abs(np.moveaxis(folded, wax, 0)).reshape(folded.shape[wax], -1).max(axis=1) / 127.0
    activation = float(np.sum(channel_scaled_weight(layer, scale**2 / 12.0, w * w)))
    inputs = mean_square / scale**2 if per_channel else mean_square
    energy = np.moveaxis(channel_scaled_weight(layer, inputs, np.ones_like(w)), wax, 0).reshape(w.shape[wax], -1).sum(axis=1)
    weight = float(np.sum(step**2 / 12.0 * energy))
    return activation + weight


def _simulated_sqnr(mod: tvm.IRModule, plan: QuantPlan, samples: list, names: list[str], refs: list) -> np.ndarray:
    """Per sample, the lowest SQNR (dB) of the fake-quantized model's outputs against ``refs``."""
    from tvmq.execute import HostModule
    from tvmq.metrics import sample_sqnr

    sim = HostModule(InsertQDQ(plan)(mod))
    return np.asarray([min(sample_sqnr(g, r) for g, r in zip(sim(*[s[n] for n in names]), ref))
                       for s, ref in zip(samples, refs)])


def _simulated_better(mod: tvm.IRModule, plan: QuantPlan, candidate: QuantPlan, samples: list, names: list[str]) -> bool:
    """Whether ``candidate`` simulates closer to the float model than ``plan`` on ``samples``: its
    worst sample better and its median sample no worse (SQNR, lowest over the outputs). Quieter
    layers are not always a better model (the YOLO detectors lose with per-channel inputs)."""
    from tvmq.execute import HostModule

    fp32 = HostModule(mod)
    refs = [[np.asarray(o) for o in fp32(*[s[n] for n in names])] for s in samples]
    before, after = (_simulated_sqnr(mod, p, samples, names, refs) for p in (plan, candidate))
    log.info("per-channel activations: worst sample %.1f -> %.1f dB, median %.1f -> %.1f dB",
             before.min(), after.min(), np.median(before), np.median(after))
    return bool(after.min() > before.min() and np.median(after) >= np.median(before))


def _channel_foldable(layer) -> bool:
    """Whether ``layer`` can take an input quantized per channel by folding the channels' scales
    into its weights: a conv2d (NHWC) or matmul reducing over the input's last axis."""
    if layer.weight is None:
        return False
    if layer.kind == "conv2d":
        return str(layer.chain.call.attrs.data_layout) == "NHWC"
    return layer.kind == "matmul" and layer.weight.ndim == 2


def per_channel_inputs(plan: QuantPlan, mod: tvm.IRModule, samples: list, input_names: list[str],
                       wide=()) -> QuantPlan:
    """``plan`` with per-channel input parameters for the activation tensors whose channels' ranges
    differ enough (:data:`PER_CHANNEL_GAIN`) and that only int8 convs / matmuls read, directly:
    those fold each channel's scale into their weights (``W[o, c] * s[c]``, then quantized per
    output channel), so they still multiply 8-bit integers, and the layer writing the tensor
    requantizes per channel at no cost (its multiplier is per channel already). The channels keep
    one zero point (:func:`tvmq.qparams.channel_activation_qparams`).

    Mobile networks gain most (depthwise convs take the scales with no weight cost); :func:`calibrate`
    keeps the choice only where the simulated model gains (``QuantConfig.per_channel_activations``)."""
    from tvmq.calibrate import channel_ranges

    func = mod["main"]
    graph = FunctionGraph(func)
    layers = find_layers(func, graph)
    readers: dict = {}
    for layer in layers:
        lp = plan.get(layer.name)
        if lp is None or not lp.is_int8 or lp.kind != layer.kind:
            continue
        for x, qp in zip(layer.inputs, lp.inputs):
            root, path = graph.root(x)
            ok = (_channel_foldable(layer) and not path and layer.name not in wide and qp.dtype != "int16"
                  and not qp.per_channel)
            readers.setdefault(root, []).append((layer, ok))
    candidates = []
    for root, users in readers.items():
        anchors = {layer.chain.anchor for layer, _ in users}
        shape = dims(root)
        if (all(ok for _, ok in users) and shape and isinstance(shape[-1], int) and shape[-1] > 1
                and set(graph.users.get(root, [])) <= anchors):
            candidates.append(root)
    if not candidates:
        return plan
    per_tensor = {root: plan.get(users[0][0].name).inputs[0] for root, users in readers.items() if root in candidates}
    chosen = {}
    for root, (lo, hi, mean_square) in zip(candidates, channel_ranges(mod, candidates, samples, input_names)):
        qp = per_tensor[root]
        t_lo, t_hi = (qp.qmin - int(qp.zero_point)) * float(qp.scale), (qp.qmax - int(qp.zero_point)) * float(qp.scale)
        pc = channel_activation_qparams(np.clip(lo, t_lo, 0.0), np.clip(hi, 0.0, t_hi), qp.dtype, len(dims(root)) - 1)
        before = sum(_rounding_noise(layer, qp.scale, mean_square) for layer, _ in readers[root])
        after = sum(_rounding_noise(layer, pc.scale, mean_square) for layer, _ in readers[root])
        log.debug("%s: rounding noise %.3g per tensor, %.3g per channel", root.name, before, after)
        if after * PER_CHANNEL_GAIN <= before:
            chosen[root] = pc
    if not chosen:
        return plan
    new = dict(plan.layers)
    for layer in layers:
        lp = new.get(layer.name)
        if lp is None or not lp.is_int8 or lp.kind != layer.kind:
            continue
        inputs = tuple(chosen.get(graph.root(x)[0], qp) for x, qp in zip(layer.inputs, lp.inputs))
        output = chosen.get(layer.output, lp.output) if lp.output is not None else None
        new[layer.name] = dataclasses.replace(lp, inputs=inputs, output=output)
    log.info("per-channel activation parameters for %d tensor(s)", len(chosen))
    return dataclasses.replace(plan, layers=new)


def wide_activations_fit(layer) -> bool:
    """Whether ``layer`` can take 16-bit activations: a conv (not depthwise) or matmul whose int8
    weights keep its int32 sums exact (:func:`tvmq.qparams.int16_accumulates_exactly`)."""
    if layer.kind == "add" or layer.depthwise or layer.weight is None:
        return False
    q, _ = quantize_weight(layer.weight, layer.weight_axis)
    return int16_accumulates_exactly(q, layer.weight_axis)


def wide_candidates(plan: QuantPlan, mod: tvm.IRModule, target="x86") -> tuple[str, ...]:
    """The int8 layers of ``plan`` that can take 16-bit activations on ``target``, in the
    module's order: none where the target has no kernel for them, else those that fit
    (:func:`wide_activations_fit`)."""
    from tvmq.targets import get_preset

    kernel = get_preset(target).micro_kernel
    if kernel is None or kernel.wide is None:
        return ()
    return tuple(l.name for l in find_layers(mod["main"]) if plan.get(l.name) is not None and plan.get(l.name).is_int8
                 and not any(q.per_channel for q in plan.get(l.name).inputs) and wide_activations_fit(l))


def widen_activations(plan: QuantPlan, mod: tvm.IRModule, names: Iterable[str], target="x86") -> QuantPlan:
    """``plan`` with the int8 layers ``names`` reading 16-bit activations (int8 weights, int32
    sums; :data:`tvmq.config.WIDE`): each input's parameters cover the same range in int16
    steps (256 times finer than 8-bit ones), and a layer writing such an input requantizes to
    them (its 8-bit readers requantize from there, in integers). Layers that cannot take them
    (:func:`wide_activations_fit`), and every layer where the target has no kernel for them,
    keep 8-bit activations."""
    wide = set(wide_candidates(plan, mod, target)) & set(names)
    if not wide:
        return plan
    func = mod["main"]
    graph = FunctionGraph(func)
    layers = find_layers(func, graph)
    roots = {graph.root(x)[0] for l in layers if l.name in wide for x in l.inputs}
    new = dict(plan.layers)
    for layer in layers:
        lp = new.get(layer.name)
        if lp is None or not lp.is_int8 or lp.kind != layer.kind:
            continue
        inputs = tuple(sixteen_bits(q) for q in lp.inputs) if layer.name in wide else lp.inputs
        output = sixteen_bits(lp.output) if lp.output is not None and layer.output in roots else lp.output
        new[layer.name] = dataclasses.replace(lp, inputs=inputs, output=output)
    return dataclasses.replace(plan, layers=new)



def narrow(plan: QuantPlan, mod: tvm.IRModule, widths: Mapping) -> QuantPlan:
    """``plan`` with the ranges of some activation tensors scaled: ``widths`` maps a tensor (a
    root var of ``mod``'s main, as :func:`tvmq.passes.insert_qdq.quantized_tensors` lists them)
    to the factor its scale is multiplied by, for every int8 layer reading it and for the
    layer writing it. The zero point stays: the range keeps its proportions (what the
    sensitivity simulation's ``tvmq_widths`` models)."""
    if not widths:
        return plan
    func = mod["main"]
    graph = FunctionGraph(func)

    def scaled(qp, tensor):
        w = widths.get(tensor)
        return qp if qp is None or w is None else QParams(qp.scale * np.float32(w), qp.zero_point, qp.dtype, qp.axis)

    layers = dict(plan.layers)
    for layer in find_layers(func, graph):
        lp = layers.get(layer.name)
        if lp is None or not lp.is_int8 or lp.kind != layer.kind:
            continue
        inputs = tuple(scaled(qp, graph.root(x)[0]) for qp, x in zip(lp.inputs, layer.inputs))
        layers[layer.name] = dataclasses.replace(lp, inputs=inputs, output=scaled(lp.output, layer.output))
    return dataclasses.replace(plan, layers=layers)


def _observed_tensors(layers, int8: set, root_of: dict) -> list:
    """The float tensors entering the int8 layers, each once: what calibration observes."""
    observed = []
    for layer in layers:
        if layer.name in int8:
            for root in root_of[layer.name]:
                if dtype_of(root) != "float32":
                    raise TvmqError(f"layer {layer.name}: input is {dtype_of(root)}, only float32 inputs can be quantized")
                if root not in observed:
                    observed.append(root)
    return observed


def _activation_qparams(mod, observed, samples, names, config, method, spec, progress) -> dict:
    """Each observed tensor's quantization parameters, from its statistics over ``samples``."""
    stats = collect_statistics(mod, observed, samples, names, histogram=method != CalibrationMethod.MINMAX,
                               num_bins=config.num_bins, progress=progress)
    qparams = {}
    for tensor, st in zip(observed, stats):
        lo, hi = select_range(st, method, percentile=config.percentile, dtype=spec.dtype, symmetric=spec.symmetric)
        qparams[tensor] = activation_qparams(lo, hi, spec.dtype, spec.symmetric)
    return qparams


def _bias_corrections(mod, layers, int8, samples, names):
    """Per int8 conv/matmul layer, the bias correction from its input's channel means."""
    from tvmq.calibrate import channel_statistics
    from tvmq.passes.bias_correction import bias_corrections

    targets = [l for l in layers if l.name in int8 and l.kind != "add"]
    # The anchor's own input (channels last), not its root: a transpose may lie between.
    inputs = []
    for layer in targets:
        if layer.inputs[0] not in inputs:
            inputs.append(layer.inputs[0])
    stats = dict(zip(inputs, channel_statistics(mod, inputs, samples, names)))
    out = {}
    for layer in targets:
        _, mean = stats[layer.inputs[0]]
        if layer.kind == "conv2d" and str(layer.chain.call.attrs.data_layout) != "NHWC":
            continue  # channel statistics are taken over the last axis
        out[layer.name] = tuple(float(v) for v in bias_corrections(layer, None, mean))
    return out


def smooth(mod: tvm.IRModule, calib_data, alpha: float, input_names: list[str] | None = None) -> tvm.IRModule:
    """SmoothQuant: migrate matmul input outliers into the weights (see :mod:`tvmq.passes.smooth_quant`)."""
    from tvmq.calibrate import channel_statistics
    from tvmq.passes.smooth_quant import SmoothQuant, smoothing_factors

    specs = input_specs(mod, input_names)
    samples = validate_samples(calib_data, specs)
    graph = FunctionGraph(mod["main"])
    layers = [l for l in find_layers(mod["main"], graph) if l.kind == "matmul"]
    if not layers:
        return mod
    stats = channel_statistics(mod, [l.inputs[0] for l in layers], samples, [s.name for s in specs])
    factors = {l.name: smoothing_factors(absmax, l.weight, alpha) for l, (absmax, _) in zip(layers, stats)}
    return SmoothQuant(factors)(mod)


def quantize_pipeline(plan: QuantPlan) -> tvm.transform.Pass:
    """The passes that apply ``plan``: InsertQDQ, FoldQDQ, then constant folding and cleanup."""
    return tvm.transform.Sequential(
        [
            InsertQDQ(plan),
            FoldQDQ(plan.requantize),
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(["main"]),
        ],
        name="tvmq.quantize",
    )


def quantize(
    mod: tvm.IRModule,
    params: Mapping[str, np.ndarray] | None = None,
    calib_data: Iterable[Mapping[str, np.ndarray]] | None = None,
    config: QuantConfig | None = None,
    *,
    target: str = "x86",
    plan: QuantPlan | None = None,
    input_names: list[str] | None = None,
) -> tvm.IRModule:
    """Quantize a float Relax module into integer kernels.

    Parameters
    ----------
    mod : IRModule
        Float model (e.g. from ``tvm.relax.frontend.onnx.from_onnx``) with static shapes.
    params : dict, optional
        Weights to bind when the model keeps them as inputs.
    calib_data : iterable of dict
        Calibration samples, ``{input name: array}`` each. Not needed when ``plan`` is given.
    config : QuantConfig, optional
    target : str
        Target preset name: decides the activation dtype (u8 on x86, s8 on ARM).
    plan : QuantPlan, optional
        A plan from an earlier :func:`calibrate`; skips calibration.
    input_names : list of str, optional
        Names the samples use for the inputs, in order (default: Relax parameter names).

    Returns
    -------
    IRModule
        The module with int8 conv2d/matmul (int32 accumulation) and fused requantization.
    """
    config = config or QuantConfig()
    mod = prepare(mod, params)
    if plan is None:
        if calib_data is None:
            raise TvmqError("quantize needs calibration data or a plan")
        mod, plan = smooth_and_calibrate(mod, list(calib_data), config, target=target, input_names=input_names)
    return finish(quantize_pipeline(plan)(mod), config)


def smooth_and_calibrate(mod: tvm.IRModule, samples: list, config: QuantConfig, *, target: str = "x86",
                         input_names: list[str] | None = None, progress: bool = False) -> tuple[tvm.IRModule, QuantPlan]:
    """SmoothQuant (when ``config`` asks for it), then :func:`calibrate`: the float module the plan
    is made for, and the plan. :func:`quantize` and ``tvmq compile`` both go through here."""
    if config.smoothquant:
        mod = smooth(mod, samples, config.smoothquant, input_names)
    return mod, calibrate(mod, samples, config, target=target, input_names=input_names, progress=progress)


def finish(qmod: tvm.IRModule, config: QuantConfig) -> tvm.IRModule:
    """Passes after quantization: weight-only storage for the matmuls left in float."""
    if config.weight_only:
        from tvmq.passes.weight_only import WeightOnly

        qmod = WeightOnly(8 if config.weight_only == "int8" else 4, config.weight_only_group)(qmod)
    return qmod
