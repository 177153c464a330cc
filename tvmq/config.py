"""Quantization configuration: frozen, keyword-only, validated on construction."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from enum import Enum

# ``--precision auto`` with no budget flag: every output, and every part of one judged apart,
# keeps at least this SQNR vs FP32: about cosine 0.99 for a zero-mean output, in the worst sample.
DEFAULT_MIN_SQNR = 17.0

__all__ = [
    "CalibrationMethod",
    "Precision",
    "RequantizeMode",
    "ActivationSpec",
    "LayerRule",
    "QuantConfig",
    "AutoPrecision",
    "TuneOptions",
]


class CalibrationMethod(str, Enum):
    """How an activation's range is chosen from its observed values."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"  # KL divergence, as TensorRT
    MSE = "mse"


class Precision(str, Enum):
    """A layer's precision; ``AUTO`` (a build's ``--precision`` only) lets the search choose per layer."""

    INT8 = "int8"
    FP16 = "fp16"
    FP32 = "fp32"
    AUTO = "auto"

    @classmethod
    def parse(cls, value, flag: str = "--precision", allowed=None) -> "Precision":
        """``value`` as a Precision; anything else is an input error naming the choices."""
        from tvmq.errors import TvmqError

        allowed = tuple(allowed or cls)
        try:
            precision = cls(value)
        except ValueError:
            precision = None
        if precision not in allowed:
            raise TvmqError(f"{flag} {value!r} is not supported; use {', '.join(p.value for p in allowed[:-1])} "
                            f"or {allowed[-1].value}")
        return precision


WIDE = "int16"  # a layer rule's (and the search's) name for int8 weights with 16-bit activations


class RequantizeMode(str, Enum):
    """How int32 accumulators are scaled back to 8 bits."""

    FIXED_POINT = "fixed_point"  # (acc * m0 + 2**(s-1)) >> s, integers only
    FLOAT = "float"  # round(acc * m) in float32


@dataclass(frozen=True, kw_only=True)
class ActivationSpec:
    """Activation quantization: per-tensor, affine unless ``symmetric``."""

    dtype: str = "uint8"
    symmetric: bool = False

    def __post_init__(self):
        if self.dtype not in ("uint8", "int8"):
            raise ValueError(f"activation dtype must be uint8 or int8, not {self.dtype!r}")


@dataclass(frozen=True, kw_only=True)
class LayerRule:
    """``(op type | name glob) -> precision``; the first rule that matches a layer wins.

    ``precision`` is ``"int8"``, ``"int16"`` (int8 weights, 16-bit activations: x86 targets,
    conv/matmul layers whose int32 sums cannot overflow; elsewhere int8), ``"fp16"``, ``"fp32"``
    or ``"skip"`` (same as fp32: the layer is left exactly as imported).
    """

    precision: str
    op: str | None = None
    name: str | None = None

    def __post_init__(self):
        if self.precision not in ("skip", WIDE, Precision.INT8, Precision.FP16, Precision.FP32):
            raise ValueError(f"rule precision must be int8, int16, fp16, fp32 or skip, not {self.precision!r}")
        if self.op is None and self.name is None:
            raise ValueError("a layer rule needs an op type, a name glob, or both")

    def matches(self, name: str, op: str) -> bool:
        if self.op is not None and self.op != op:
            return False
        return self.name is None or fnmatch.fnmatchcase(name, self.name)


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What :func:`tvmq.quantize` does.

    Parameters
    ----------
    method : CalibrationMethod
        Range selection for activations.
    percentile : float
        Kept fraction (in %) for ``PERCENTILE``.
    num_bins : int
        Histogram bins on each side of zero for the histogram methods.
    activation : ActivationSpec or None
        ``None`` takes the target preset's choice (u8 on x86 VNNI, s8 on ARM sdot).
    requantize : RequantizeMode or None
        Integer fixed-point or float scaling of accumulators. ``None`` (default): fixed-point for
        calibrated models; float for pre-quantized ones, computed as ONNX Runtime does, so they
        match the runtime their scales were made for.
    quantize_add : bool
        Also run residual adds between int8 layers in integers.
    rules : tuple of LayerRule
        Per-layer overrides, first match wins.
    bias_correction : bool
        Correct each int8 layer's bias for the mean shift of weight quantization.
    smoothquant : float or None
        Migration strength alpha (0..1, 0.5 typical) to move activation outliers of matmul
        inputs into the weights before calibrating; None is off.
    weight_only : str or None
        ``"int8"`` or ``"int4"``: matmul layers left in float store their weights in that many
        bits (dequantized in the kernel); None is off.
    weight_only_group : int
        Input rows per scale for int4.
    int8_everywhere : bool
        Quantize every layer the rules allow. Off (default), layers whose int8 kernel is no
        faster than float on the target's ISA stay float: depthwise convolutions and short
        reductions where the micro-kernel measured so (:func:`tvmq.targets.intrinsics.int8_pays`;
        on AVX2, reductions under 32). A rule naming a layer ``int8`` always wins.
    per_channel_activations : bool or None
        A tensor whose channels' ranges differ widely and that only int8 convs / matmuls read gets
        one scale per channel, folded into their weights (:func:`tvmq.quantize.per_channel_inputs`).
        ``None`` (default): where the simulated model does better on the calibration samples with
        them than without (worst and median sample; on the YOLO detectors it does not);
        ``True``: wherever they quiet the readers (``--per-channel-activations``); ``False``: never
        (``--no-per-channel-activations``).
    """

    method: CalibrationMethod = CalibrationMethod.MINMAX
    percentile: float = 99.999
    num_bins: int = 2048
    activation: ActivationSpec | None = None
    requantize: RequantizeMode | None = None
    quantize_add: bool = True
    rules: tuple[LayerRule, ...] = field(default_factory=tuple)
    bias_correction: bool = False
    smoothquant: float | None = None
    weight_only: str | None = None
    weight_only_group: int = 32
    int8_everywhere: bool = False
    per_channel_activations: bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "method", CalibrationMethod(self.method))
        if self.requantize is not None:
            object.__setattr__(self, "requantize", RequantizeMode(self.requantize))
        object.__setattr__(self, "rules", tuple(self.rules))
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.num_bins < 128:
            raise ValueError(f"num_bins must be at least 128, got {self.num_bins}")
        if self.smoothquant is not None and not 0.0 < self.smoothquant < 1.0:
            raise ValueError(f"smoothquant alpha must be in (0, 1), got {self.smoothquant}")
        if self.weight_only not in (None, "int8", "int4"):
            raise ValueError(f"weight_only must be int8 or int4, not {self.weight_only!r}")
        if self.weight_only_group < 1:
            raise ValueError(f"weight_only_group must be positive, got {self.weight_only_group}")

    def precision_for(self, name: str, op: str, default: str = "int8") -> str:
        """The precision of the first rule matching ``name``/``op``, else ``default``."""
        for rule in self.rules:
            if rule.matches(name, op):
                return "fp32" if rule.precision == "skip" else rule.precision
        return default


def load_rules(path) -> tuple[LayerRule, ...]:
    """Layer rules from a JSON or TOML file, in order (first match wins).

    JSON: ``{"rules": [{"name": "head.*", "precision": "fp32"}, {"op": "add", "precision": "skip"}]}``;
    TOML: ``[[rules]]`` tables with the same keys. ``op`` is conv2d, matmul or add; ``name`` a
    glob over layer names. Raises ``ValueError`` naming the file and the problem.
    """
    import json
    from pathlib import Path

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"config {path}: cannot be read ({err.strerror})") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ValueError(f"config {path}: not valid {kind} ({err})") from None
    rules = data.get("rules") if isinstance(data, dict) else None
    if not isinstance(rules, list):
        raise ValueError(f"config {path}: needs a list of rules (\"rules\": [{{\"name\": GLOB, \"precision\": ...}}])")
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or set(rule) - {"op", "name", "precision"} or "precision" not in rule:
            raise ValueError(f"config {path}: rule {i + 1} must have 'precision' and 'op' and/or 'name', nothing else")
        if rule.get("op") not in (None, "conv2d", "matmul", "add"):
            raise ValueError(f"config {path}: rule {i + 1}: op {rule['op']!r} is not conv2d, matmul or add")
        try:
            out.append(LayerRule(**rule))
        except (TypeError, ValueError) as err:
            raise ValueError(f"config {path}: rule {i + 1}: {err}") from None
    return tuple(out)


@dataclass(frozen=True)
class AutoPrecision:
    """``--precision auto``: the metric, the budget and the data it is measured on."""

    metric: str = "sqnr"
    max_drop: float | None = None  # metric points (top1: percentage points)
    min_sqnr: float | None = None  # dB
    eval_data: object = None  # folder of samples (+ labels.npy); default: the calibration data
    output_slices: tuple[str, ...] = ()  # NAME:START:STOP parts of outputs judged apart (--output-slice)
    # Each image input's channels moved within this many steps of their 8-bit grid (uniform noise): a
    # sample whose FP32 output moves beyond the budget under it is judged against that instead
    # (--input-noise; 0: every sample held to the budget).
    input_noise: float = 1.0
    # Clip long-tailed activation ranges where the simulated all-int8 plan gains and neither half of
    # the samples nor the median one loses (--clip-ranges; off by default: on the whole zoo it moved
    # no plan's latency and cost three models some held-out accuracy, README).
    clip_ranges: bool = False
    # Also offer int8 weights on 16-bit activations per layer (x86; --int16-activations; off by
    # default: on the zoo's YOLO detectors it moved no plan's latency, and on YOLOX it traded a
    # float layer for a plan that held the calibration budget and lost held-out boxes, README).
    int16_activations: bool = False

    def budget(self) -> float:
        """The budget in the metric's units; raises on anything missing, before any work."""
        from pathlib import Path

        from tvmq.errors import TvmqError
        from tvmq.metrics import Metric

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


@dataclass(frozen=True)
class TuneOptions:
    """Tuning for a build: ``db`` keeps the results; ``trials`` measured candidates per kernel first
    (0: only use what ``db`` already holds); ``max_tasks`` tunes only the largest kernels."""

    db: object = None  # str or Path
    trials: int = 0
    max_tasks: int | None = None
