"""Quantization parameters and the integer arithmetic that uses them.

``real = scale * (q - zero_point)``. Activations are per-tensor (affine, zero point allowed);
weights are per output channel and symmetric, restricted to [-127, 127] so that a u8 x s8 or
s8 x s8 product pair never overflows the int16 intermediate some instructions use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "QParams",
    "dtype_range",
    "activation_qparams",
    "quantize_weight",
    "fixed_point_multiplier",
    "int16_accumulates_exactly",
    "sixteen_bits",
    "requantize_reference",
]

_RANGES = {"uint8": (0, 255), "int8": (-128, 127), "int16": (-(2**15), 2**15 - 1), "int32": (-(2**31), 2**31 - 1)}


def dtype_range(dtype: str) -> tuple[int, int]:
    if dtype not in _RANGES:
        raise ValueError(f"unsupported quantized dtype {dtype!r}")
    return _RANGES[dtype]


@dataclass(frozen=True, eq=False)
class QParams:
    """Scale and zero point of one quantized tensor.

    ``scale`` and ``zero_point`` are 0-d (per-tensor) or 1-d along ``axis`` (per-channel).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str
    axis: int = -1

    def __post_init__(self):
        object.__setattr__(self, "scale", np.asarray(self.scale, dtype=np.float32))
        object.__setattr__(self, "zero_point", np.asarray(self.zero_point, dtype=np.int32))
        dtype_range(self.dtype)
        if self.scale.shape != self.zero_point.shape or self.scale.ndim > 1:
            raise ValueError("scale and zero_point must have the same 0-d or 1-d shape")
        if not np.all(np.isfinite(self.scale)) or np.any(self.scale <= 0):
            raise ValueError(f"scale must be finite and positive, got {self.scale}")

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim == 1

    @property
    def qmin(self) -> int:
        return dtype_range(self.dtype)[0]

    @property
    def qmax(self) -> int:
        return dtype_range(self.dtype)[1]

    def key(self) -> tuple:
        return (self.dtype, self.axis, self.scale.tobytes(), self.zero_point.tobytes())

    def __eq__(self, other):
        return isinstance(other, QParams) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Round half to even, as ``relax.op.quantize`` and ONNX QuantizeLinear do."""
        s, z = self._broadcast(x.ndim)
        q = np.round(x.astype(np.float32) / s) + z
        return np.clip(q, self.qmin, self.qmax).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        s, z = self._broadcast(q.ndim)
        return ((q.astype(np.int32) - z) * s).astype(np.float32)

    def _broadcast(self, ndim):
        if not self.per_channel:
            return self.scale, self.zero_point
        shape = [1] * ndim
        shape[self.axis] = -1
        return self.scale.reshape(shape), self.zero_point.reshape(shape)

    def to_json(self) -> dict:
        out = {"dtype": self.dtype}
        if self.per_channel:
            out.update(axis=self.axis, scale=self.scale.tolist(), zero_point=self.zero_point.tolist())
        else:
            out.update(scale=float(self.scale), zero_point=int(self.zero_point))
        return out

    def covering(self) -> "QParams":
        """Per-tensor parameters covering every channel's range (``self`` when per-tensor)."""
        if not self.per_channel:
            return self
        lo = float(np.min((self.qmin - self.zero_point.astype(np.float64)) * self.scale))
        hi = float(np.max((self.qmax - self.zero_point.astype(np.float64)) * self.scale))
        return activation_qparams(lo, hi, self.dtype)

    @classmethod
    def from_json(cls, d: dict) -> "QParams":
        return cls(np.asarray(d["scale"]), np.asarray(d["zero_point"]), d["dtype"], d.get("axis", -1))


def activation_qparams(lo: float, hi: float, dtype: str, symmetric: bool = False) -> QParams:
    """Per-tensor parameters covering ``[lo, hi]`` (widened to include 0, so 0 is exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = dtype_range(dtype)
    if symmetric:
        bound = max(abs(lo), abs(hi))
        scale = bound / ((qmax - qmin) / 2) if bound > 0 else 1.0
        zp = 0 if dtype == "int8" else 128
    else:
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zp = int(np.clip(np.round(qmin - lo / scale), qmin, qmax))
    scale = max(np.float32(scale), np.finfo(np.float32).tiny)
    return QParams(np.float32(scale), np.int32(zp), dtype)


def channel_activation_qparams(lo, hi, dtype: str, axis: int) -> QParams:
    """Per-channel parameters along ``axis`` covering each channel's ``[lo[c], hi[c]]`` (widened
    to include 0), with one zero point for every channel: the one whose steps are the finest
    overall (the smallest product of the channels' scales). One zero point keeps real 0 one
    integer across channels, so padding, clamps and the zero-point correction stay per tensor.
    """
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    qmin, qmax = dtype_range(dtype)
    z = np.arange(qmin, qmax + 1, dtype=np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(hi[None] > 0, hi[None] / (qmax - z), 0.0)
        down = np.where(lo[None] < 0, -lo[None] / (z - qmin), 0.0)
    scales = np.maximum(up, down)
    tiny = np.finfo(np.float32).tiny
    cost = np.where(np.isfinite(scales), np.log(np.maximum(scales, tiny)), np.inf).sum(axis=1)
    best = int(np.argmin(cost))
    scale = np.maximum(scales[best], tiny).astype(np.float32)
    scale[(hi <= 0) & (lo >= 0)] = 1.0  # a channel never seen non-zero
    zp = np.full(scale.shape, qmin + best, np.int32)
    return QParams(scale, zp, dtype, axis)


def sixteen_bits(qp: QParams) -> QParams:
    """Per-tensor int16 parameters of the range the 8-bit ``qp`` covers (steps 257 times finer)."""
    if qp.dtype == "int16":
        return qp
    zp, scale = int(qp.zero_point), float(qp.scale)
    return activation_qparams((qp.qmin - zp) * scale, (qp.qmax - zp) * scale, "int16")


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, QParams]:
    """Symmetric per-channel int8 weights in [-127, 127] along ``axis``."""
    w = np.asarray(w, dtype=np.float32)
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.abs(w).max(axis=reduce_axes) if reduce_axes else np.abs(w)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    qp = QParams(scale, np.zeros_like(scale, dtype=np.int32), "int8", axis % w.ndim)
    s = qp._broadcast(w.ndim)[0]
    q = np.clip(np.round(w / s), -127, 127).astype(np.int8)
    return q, qp


def int16_accumulates_exactly(w_q: np.ndarray, axis: int) -> bool:
    """Whether a layer with int8 weights ``w_q`` (output channels along ``axis``) can take 16-bit
    activations into an int32 accumulator without overflow: each output's products reach at most
    2^15 times its channel's sum of absolute weights, which must stay under 2^15 so the products
    fit in half of int32 (the bias, in accumulator units, gets the other half:
    ``passes.fold_qdq`` keeps a larger bias float). A 3x3 conv over 64 channels of typical
    per-channel weights (|w| ~ 25 of 127) sums to ~14,000; wide late layers need not fit."""
    w = np.abs(np.moveaxis(np.asarray(w_q, np.int64), axis % np.ndim(w_q), 0)).reshape(np.shape(w_q)[axis], -1)
    return bool(np.all(w.sum(axis=1) < 2**15))


def fixed_point_multiplier(m: np.ndarray, bits: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """Write each real multiplier as ``m0 * 2**-shift`` with ``2**(bits-1) <= m0 < 2**bits``.

    ``(acc * m0 + 2**(shift-1)) >> shift`` then equals ``round_half_up(acc * m)`` to within
    the 31-bit precision of ``m0``. Shifts are capped at 62 so the int64 product cannot overflow
    for |acc| < 2**31; tiny multipliers give up low bits of m0 instead.
    """
    m = np.asarray(m, dtype=np.float64)
    if np.any(m <= 0) or not np.all(np.isfinite(m)):
        raise ValueError("multipliers must be finite and positive")
    mant, exp = np.frexp(m)  # m = mant * 2**exp, mant in [0.5, 1)
    shift = bits - exp
    m0 = np.round(mant * 2.0**bits).astype(np.int64)
    carry = m0 == 2**bits  # rounding reached the next power of two
    m0 = np.where(carry, m0 // 2, m0)
    shift = np.where(carry, shift - 1, shift)
    too_big = shift > 62
    if np.any(too_big):
        m0 = np.where(too_big, np.round(np.where(too_big, m, 0) * 2.0**62).astype(np.int64), m0)
        shift = np.where(too_big, 62, shift)
    if np.any(shift < 1):
        raise ValueError(f"multiplier too large for fixed-point requantize: {m.max()}")
    return m0.astype(np.int64), shift.astype(np.int64)


def requantize_reference(acc: np.ndarray, m0: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """numpy model of the fixed-point requantize tvmq emits (int64, round half up)."""
    acc = acc.astype(np.int64)
    return (acc * m0 + (np.int64(1) << (shift - 1))) >> shift
