"""The quantization plan: per layer, its precision and the parameters of its tensors.

A plan is data. :func:`tvmq.calibrate` makes one from statistics, :class:`tvmq.passes.InsertQDQ`
applies it, the manifest records it, and ``--plan plan.json`` reuses it without calibrating.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tvmq.errors import TvmqError
from tvmq.qparams import QParams

__all__ = ["LayerPlan", "QuantPlan", "read_plan"]

PLAN_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """What to do with one layer.

    Parameters
    ----------
    kind : str
        ``conv2d``, ``matmul`` or ``add``.
    precision : str
        ``int8``, ``fp16`` or ``fp32``. An int8 layer has int8 weights and an integer kernel;
        its activations are 8-bit, or 16-bit where ``inputs`` say int16 (what an ``int16``
        layer rule or the ``--precision auto`` search asks for).
    inputs : tuple of QParams
        Parameters of the activation inputs (one for conv2d/matmul, two for add); empty unless int8.
    output : QParams or None
        Parameters of the output when an int8 consumer reads it in integers; None keeps the
        output in float (the accumulator is scaled back to float instead of requantized).
    weight : QParams or None
        Weight parameters to use as they are (a pre-quantized model's); None derives them
        from the weights (symmetric, per output channel).
    bias_correction : tuple of float or None
        Added to the bias, per output channel, to cancel the mean shift weight quantization
        causes (``QuantConfig(bias_correction=True)``).
    """

    kind: str
    precision: str = "int8"
    inputs: tuple[QParams, ...] = ()
    output: QParams | None = None
    weight: QParams | None = None
    bias_correction: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in ("conv2d", "matmul", "add"):
            raise ValueError(f"unknown layer kind {self.kind!r}")
        if self.precision not in ("int8", "fp16", "fp32"):
            raise ValueError(f"unknown precision {self.precision!r}")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        expected = 2 if self.kind == "add" else 1
        if self.precision == "int8" and len(self.inputs) != expected:
            raise ValueError(f"an int8 {self.kind} layer needs {expected} input QParams, got {len(self.inputs)}")

    @property
    def is_int8(self) -> bool:
        return self.precision == "int8"

    def to_json(self) -> dict:
        out = {"kind": self.kind, "precision": self.precision}
        if self.inputs:
            out["inputs"] = [q.to_json() for q in self.inputs]
        if self.output is not None:
            out["output"] = self.output.to_json()
        if self.weight is not None:
            out["weight"] = self.weight.to_json()
        if self.bias_correction is not None:
            out["bias_correction"] = [float(v) for v in self.bias_correction]
        return out

    @classmethod
    def from_json(cls, d: dict) -> "LayerPlan":
        return cls(
            kind=d["kind"],
            precision=d["precision"],
            inputs=tuple(QParams.from_json(q) for q in d.get("inputs", ())),
            output=QParams.from_json(d["output"]) if d.get("output") else None,
            weight=QParams.from_json(d["weight"]) if d.get("weight") else None,
            bias_correction=tuple(d["bias_correction"]) if d.get("bias_correction") else None,
        )


@dataclass(frozen=True, kw_only=True)
class QuantPlan:
    """Layer name -> :class:`LayerPlan`, plus how it was made."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    method: str = "minmax"
    activation_dtype: str = "uint8"
    requantize: str = "fixed_point"
    kept_float: tuple[str, ...] = ()  # layers left float because int8 is no faster on the ISA

    def get(self, name: str) -> LayerPlan | None:
        return self.layers.get(name)

    def count(self, precision: str) -> int:
        return sum(1 for lp in self.layers.values() if lp.precision == precision)

    def wide_layers(self) -> list[str]:
        """The int8 layers reading 16-bit activations (``int16`` layer rules and search choices)."""
        return [n for n, lp in self.layers.items() if lp.is_int8 and any(q.dtype == "int16" for q in lp.inputs)]

    def to_json(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "method": self.method,
            "activation_dtype": self.activation_dtype,
            "requantize": self.requantize,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "layers": {name: lp.to_json() for name, lp in self.layers.items()},
            **({"kept_float_for_speed": list(self.kept_float)} if self.kept_float else {}),
        }

    @classmethod
    def from_json(cls, d: dict) -> "QuantPlan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"unsupported plan version {d.get('version')!r} (expected {PLAN_VERSION})")
        return cls(
            layers={name: LayerPlan.from_json(lp) for name, lp in d["layers"].items()},
            input_shapes={k: list(v) for k, v in d.get("input_shapes", {}).items()},
            method=d.get("method", "minmax"),
            activation_dtype=d.get("activation_dtype", "uint8"),
            requantize=d.get("requantize", "fixed_point"),
            kept_float=tuple(d.get("kept_float_for_speed", ())),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> "QuantPlan":
        return cls.from_json(json.loads(text))


def read_plan(path) -> QuantPlan:
    """A plan file written by ``tvmq compile`` (``plan.json``); a missing or damaged one is an input error."""
    from pathlib import Path

    try:
        return QuantPlan.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TvmqError(f"plan file {path} does not exist") from None
    except (ValueError, KeyError, TypeError) as err:
        raise TvmqError(f"plan file {path} is not a valid tvmq plan ({err}); regenerate it with tvmq compile") from None
