"""PackKernels: emit conv2d/matmul in the weight layouts fast CPU kernels read.

Runs in :func:`tvmq.pipeline.relax_passes` (LLVM targets), on the quantized NHWC module (layout
from ConvertToNHWC in :func:`tvmq.prepare`, int8 conv2d/matmul from FoldQDQ): after
FoldAffineChains, before FastSoftmax, FastMath and legalization, so the packed kernels are the
PrimFuncs that fusion gives their epilogues and tvmq's schedule rules then schedule.

An int8 micro-kernel (:mod:`tvmq.targets.intrinsics`) adds, into each of ``lanes`` int32
accumulators (one per output channel), the dot product of ``k`` consecutive input channels of
one pixel with that output channel's ``k`` weights: ``k = 4`` for the dot-product instructions
(x86 VNNI ``vpdpbusd``, ARM ``sdot``), ``k = 2`` for the widening multiply-adds of ISAs without
one (x86 ``vpmaddwd``, ARM ``smull``/``sadalp``). So:

* activations are NHWC (the ``k`` input channels of a pixel are adjacent) - see ConvertToNHWC;
* weights are packed offline, once, into ``[O/lanes, KH, KW, I/k, lanes, k]`` (conv) or
  ``[N/lanes, K/k, lanes, k]`` (matmul), so each step reads ``lanes*k`` contiguous bytes;
* input channels are padded to a multiple of ``k`` (zero weights make the padded values irrelevant).

Depthwise convolutions (int8 or float) get their weights as ``[KH, KW, C]`` so a vector of
channels is one contiguous load.

The kernels are emitted as TE computes with named blocks (``tvmq_dot_conv2d``,
``tvmq_dot_matmul``, ``tvmq_depthwise``, ...; the names live in :mod:`tvmq.targets.kernel_names`)
that tvmq's schedule rules (:mod:`tvmq.targets.schedules`) tile and tensorize. Layers whose
output channels are not a multiple of a supported lane count keep the plain ``conv2d``/``matmul``.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, te

from tvmq._compat import IntImm, TensorType, arith, expr_type
from tvmq.targets.kernel_names import (
    CONV_BLOCK,
    CONV_FUNC,
    CROP_BLOCK,
    DEPTHWISE_BLOCK,
    DEPTHWISE_FUNC,
    FMA_CONV_BLOCK,
    FMA_CONV_FUNC,
    FMA_MATMUL_BLOCK,
    FMA_MATMUL_FUNC,
    MATMUL_BLOCK,
    MATMUL_FUNC,
    UNPAIR_BLOCK,
)

from .graph import bound_constant, call_op, dims, dtype_of, map_functions
from .layers import Activation

__all__ = ["PackKernels", "CONV_BLOCK", "MATMUL_BLOCK", "DEPTHWISE_BLOCK", "pack_conv_weight", "pack_matmul_weight"]

PAIR_K = 8  # input channels per step of the two-pixel micro-kernel (smmla); no other kernel has 8
FLOAT_PIXELS = 8  # the float and depthwise schedules' pixel tile where the extent allows it (targets.schedules)


def _out_extent(size, kernel, dilation, stride):
    """Output extent of a convolution window over an input extent (padding already applied),
    simplified: a symbolic extent must keep the form Relax's shape matching sees elsewhere."""
    extent = (size - (kernel - 1) * dilation - 1) // stride + 1
    return extent if isinstance(extent, int) else arith.Analyzer().simplify(extent)

def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def pack_conv_weight(w: np.ndarray, lanes: int, k: int = 4) -> np.ndarray:
    """OHWI int8 -> ``[O'/lanes, KH, KW, I'/k, lanes, k]`` (zero-padded: I to k, O to lanes)."""
    o, kh, kw, i = w.shape
    op, ip = _round_up(o, lanes), _round_up(i, k)
    w = np.pad(w, ((0, op - o), (0, 0), (0, 0), (0, ip - i)))
    return np.ascontiguousarray(w.reshape(op // lanes, lanes, kh, kw, ip // k, k).transpose(0, 2, 3, 4, 1, 5))


def pack_matmul_weight(w: np.ndarray, lanes: int, k: int = 4) -> np.ndarray:
    """``[K, N]`` int8 -> ``[N'/lanes, K'/k, lanes, k]`` (zero-padded: K to k, N to lanes)."""
    kd, n = w.shape
    np_, kp = _round_up(n, lanes), _round_up(kd, k)
    w = np.pad(w, ((0, kp - kd), (0, np_ - n)))
    return np.ascontiguousarray(w.T.reshape(np_ // lanes, lanes, kp // k, k).transpose(0, 2, 1, 3))


def float_conv_blocks(channels: int, lanes: int, width=None) -> int:
    """Output channel blocks of a packed float conv: ``channels / lanes`` rounded up, and one more
    where that is an odd count of 5 or more with no divisor up to 4 (17, 13, 7, 5) and the output
    rows are shorter than a full pixel tile (``width`` < ``FLOAT_PIXELS``). The float conv tile
    takes 2 to 4 blocks that divide the count (``targets.schedules: float_conv_tile``); a prime
    count left it one block by a short row's pixels, fewer accumulators than hide the FMA
    latency (Silero VAD's 258-filter STFT conv, 17 blocks by 5 pixels: 64 -> 42 us with 18). The
    extra block is cropped. Longer rows fill the one-block tile with pixels: no extra work."""
    blocks = -(-channels // lanes)
    if blocks >= 5 and all(blocks % b for b in range(2, 5)) and isinstance(width, int) and width < FLOAT_PIXELS:
        blocks += 1
    return blocks


def pack_float_conv_weight(w: np.ndarray, lanes: int, width=None) -> np.ndarray:
    """OHWI float -> ``[O'/lanes, KH, KW, I, lanes]``: one vector of output channels per tap
    (``O'/lanes``: :func:`float_conv_blocks` for rows of ``width`` output pixels)."""
    o, kh, kw, i = w.shape
    op = float_conv_blocks(o, lanes, width) * lanes
    w = np.pad(w, ((0, op - o), (0, 0), (0, 0), (0, 0)))
    return np.ascontiguousarray(w.reshape(op // lanes, lanes, kh, kw, i).transpose(0, 2, 3, 4, 1))


def pack_float_matmul_weight(w: np.ndarray, lanes: int) -> np.ndarray:
    """``[K, N]`` float -> ``[N'/lanes, K, lanes]``."""
    k, n = w.shape
    np_ = _round_up(n, lanes)
    w = np.pad(w, ((0, 0), (0, np_ - n)))
    return np.ascontiguousarray(w.reshape(k, np_ // lanes, lanes).transpose(1, 0, 2))


def _float_conv_compute(strides, dilation, out_channels, lanes, granule: int = 1):
    """The packed float conv; ``granule`` as for :func:`_conv_compute`: over a symbolic width a
    predicated last tile keeps the accumulators in memory (4x slower), a tile multiple does not."""
    sh, sw = strides
    dh, dw = dilation

    def compute(data, wp):
        n, h, w, _ = data.shape
        _, kh_, kw_, i, _ = wp.shape
        oh, ow = _out_extent(h, kh_, dh, sh), _out_extent(w - (granule - 1) * sw, kw_, dw, sw)
        kh = te.reduce_axis((0, kh_), "kh")
        kw = te.reduce_axis((0, kw_), "kw")
        ic = te.reduce_axis((0, i), "ic")
        full = te.compute(
            (n, oh, _tile_multiple(ow, granule), wp.shape[0] * lanes),
            lambda b, y, x, o: te.sum(
                data[b, y * sh + kh * dh, x * sw + kw * dw, ic] * wp[o // lanes, kh, kw, ic, o % lanes],
                axis=[kh, kw, ic],
            ),
            name=FMA_CONV_BLOCK,
        )
        return _crop(full, out_channels, ow if granule > 1 else None)

    return compute


def _float_matmul_compute(out_features, lanes, granule: int = 1):
    """The packed float matmul; ``granule`` as for :func:`_matmul_compute` (spare rows)."""
    def compute(x, wp):
        k = te.reduce_axis((0, wp.shape[1]), "k")
        rows = _useful_rows(x.shape[-2], granule)
        full = te.compute(
            (*x.shape[:-2], _tile_multiple(rows, granule), wp.shape[0] * lanes),
            lambda *idx: te.sum(x[(*idx[:-1], k)] * wp[idx[-1] // lanes, k, idx[-1] % lanes], axis=[k]),
            name=FMA_MATMUL_BLOCK,
        )
        return _crop(full, out_features, rows if granule > 1 else None)

    return compute


def _crop(full, channels, pixels=None):
    """The first ``channels`` of the last axis (output channels padded up to a lane multiple) and,
    given ``pixels``, the first ``pixels`` of the axis before it (a symbolic width or row count
    padded up to a multiple of the register tile)."""
    if int(full.shape[-1]) == channels and pixels is None:
        return full
    shape = (*full.shape[:-2], full.shape[-2] if pixels is None else pixels, channels)
    return te.compute(shape, lambda *i: full[i], name=CROP_BLOCK)


def _tile_multiple(extent, granule: int):
    """``extent`` rounded up to a multiple of ``granule`` (simplified; ``extent`` itself for 1)."""
    if granule <= 1:
        return extent
    return arith.Analyzer().simplify((extent + granule - 1) // granule * granule)


def _useful_rows(rows, granule: int):
    """A matmul input's row count without its ``granule - 1`` spare rows (simplified)."""
    return arith.Analyzer().simplify(rows - (granule - 1)) if granule > 1 else rows


def _unpair(paired, channels):
    """``[..., X/2, O/2, 2, 2]`` two-pixel accumulators (what ``smmla`` holds: pixel pair x channel
    pair) back to ``[..., X, O]`` (an index map the requantize epilogue absorbs), cropped."""
    *outer, xp, op, _, _ = paired.shape
    full = te.compute((*outer, xp * 2, op * 2),
                      lambda *i: paired[(*i[:-2], i[-2] // 2, i[-1] // 2, i[-2] % 2, i[-1] % 2)], name=UNPAIR_BLOCK)
    return _crop(full, channels)


def _conv_compute(strides, dilation, out_channels, lanes, granule: int = 1):
    """The packed int8 conv. ``granule`` > 1 (a symbolic width): ``data`` carries ``granule - 1``
    spare output columns of zero padding on the right, and the kernel computes the output width
    rounded up to a multiple of ``granule`` (the register tile then divides it: tensorizable, no
    predicated tile), cropped back after."""
    sh, sw = strides
    dh, dw = dilation

    def compute(data, wp):
        n, h, w, _ = data.shape
        _, kh_, kw_, ib, _, k = wp.shape
        k = int(k)
        oh, ow = _out_extent(h, kh_, dh, sh), _out_extent(w - (granule - 1) * sw, kw_, dw, sw)
        kh = te.reduce_axis((0, kh_), "kh")
        kw = te.reduce_axis((0, kw_), "kw")
        ico = te.reduce_axis((0, ib), "ico")
        ici = te.reduce_axis((0, k), "ici")
        if k == PAIR_K:  # two pixels per step: accumulators in the micro-kernel's 2 x 2 order
            paired = te.compute(
                (n, oh, ow // 2, wp.shape[0], 2, lanes),
                lambda b, y, xp, op, px, oc: te.sum(
                    data[b, y * sh + kh * dh, (xp * 2 + px) * sw + kw * dw, ico * k + ici].astype("int32")
                    * wp[op, kh, kw, ico, oc, ici].astype("int32"),
                    axis=[kh, kw, ico, ici],
                ),
                name=CONV_BLOCK,
            )
            return _unpair(paired, out_channels)
        full = te.compute(
            (n, oh, _tile_multiple(ow, granule), wp.shape[0] * lanes),
            lambda b, y, x, o: te.sum(
                data[b, y * sh + kh * dh, x * sw + kw * dw, ico * k + ici].astype("int32")
                * wp[o // lanes, kh, kw, ico, o % lanes, ici].astype("int32"),
                axis=[kh, kw, ico, ici],
            ),
            name=CONV_BLOCK,
        )
        return _crop(full, out_channels, ow if granule > 1 else None)

    return compute


def _depthwise_compute(strides, dilation, acc_dtype, granule: int = 1):
    """The depthwise conv; ``granule`` as for :func:`_conv_compute` (spare columns, the width
    computed to a multiple of the pixel tile, cropped after)."""
    sh, sw = strides
    dh, dw = dilation

    def compute(data, w):
        n, h, width, c = data.shape
        kh_, kw_, _ = w.shape
        oh, ow = _out_extent(h, kh_, dh, sh), _out_extent(width - (granule - 1) * sw, kw_, dw, sw)
        kh = te.reduce_axis((0, kh_), "kh")
        kw = te.reduce_axis((0, kw_), "kw")
        full = te.compute(
            (n, oh, _tile_multiple(ow, granule), c),
            lambda b, y, x, ch: te.sum(
                data[b, y * sh + kh * dh, x * sw + kw * dw, ch].astype(acc_dtype) * w[kh, kw, ch].astype(acc_dtype),
                axis=[kh, kw],
            ),
            name=DEPTHWISE_BLOCK,
        )
        return full if granule == 1 else _crop(full, int(c), ow)

    return compute


def _matmul_compute(out_features, lanes, granule: int = 1):
    """The packed int8 matmul; ``granule`` > 1 (a symbolic row count): ``x`` carries
    ``granule - 1`` spare zero rows, and the kernel computes the rows rounded up to a multiple of
    ``granule``, cropped back after (as :func:`_conv_compute` does with columns)."""

    def compute(x, wp):
        kb, k = wp.shape[1], int(wp.shape[3])
        ko = te.reduce_axis((0, kb), "ko")
        ki = te.reduce_axis((0, k), "ki")
        if k == PAIR_K:
            *outer, rows, _ = x.shape
            paired = te.compute(
                (*outer, rows // 2, wp.shape[0], 2, lanes),
                lambda *i: te.sum(
                    x[(*i[:-4], i[-4] * 2 + i[-2], ko * k + ki)].astype("int32")
                    * wp[i[-3], ko, i[-1], ki].astype("int32"),
                    axis=[ko, ki],
                ),
                name=MATMUL_BLOCK,
            )
            return _unpair(paired, out_features)
        rows = _useful_rows(x.shape[-2], granule)
        full = te.compute(
            (*x.shape[:-2], _tile_multiple(rows, granule), wp.shape[0] * lanes),
            lambda *idx: te.sum(
                x[(*idx[:-1], ko * k + ki)].astype("int32")
                * wp[idx[-1] // lanes, ko, idx[-1] % lanes, ki].astype("int32"),
                axis=[ko, ki],
            ),
            name=MATMUL_BLOCK,
        )
        return _crop(full, out_features, rows if granule > 1 else None)

    return compute


@relax.expr_functor.mutator
class _Packer(relax.PyExprMutator):
    def __init__(self, mod, data_dtype, lane_options, float_lanes, k, operand_dtype, pairs=None, pixel_tile=None,
                 wide_lanes=()):
        super().__init__(mod)
        self.wide_lanes = wide_lanes
        self.pixel_tile = pixel_tile
        self.k = k
        self.pairs = pairs
        self.operand_dtype = operand_dtype
        self.data_dtype = data_dtype
        self.lane_options = lane_options
        self.float_lanes = float_lanes
        self.packed = 0

    def _weight(self, expr):
        return bound_constant(self, expr)

    def _lanes(self, channels, options=None):
        """Lanes per output-channel block.

        The widest lane count when it divides ``channels`` or padding wastes little (up to
        1/8 of the work); narrower exact lanes for small layers; else the widest, padded.
        """
        options = self.lane_options if options is None else options
        if not options:
            return None
        widest = options[0]
        if channels % widest == 0 or (-channels % widest) * 8 <= channels:
            return widest
        return next((l for l in options if channels % l == 0), widest)

    def _operands(self, data, out_features):
        """``(lanes, k, activations as the kernel reads them)`` of an int8-weight layer over
        ``data``, or None when no micro-kernel takes its activations: the preset's kernel for
        its activation dtype, the wide kernel (``k`` 2, read as they are) for 16-bit ones."""
        dtype = dtype_of(data)
        if dtype == self.data_dtype:
            lanes = self._lanes(out_features)
            return None if lanes is None else (lanes, self.k, self._widen(data))
        if dtype == "int16" and self.wide_lanes:
            return self._lanes(out_features, self.wide_lanes), 2, data
        return None

    def _widen(self, data):
        """Activations as the micro-kernel reads them (int16 for x86 ``vpmaddwd``: widened once,
        where the producer's epilogue usually absorbs the cast, not once per output block)."""
        if self.operand_dtype == self.data_dtype:
            return data
        # A requantized activation is astype(clip(v, lo, hi), uint8) with 0 <= lo, hi <= 255: v
        # converts to int16 directly (one conversion instead of float -> uint8 -> int16, which
        # LLVM does with shuffles).
        source = data
        bound = self.lookup_binding(data) if isinstance(data, relax.Var) else None
        if call_op(bound) == "relax.astype" and dtype_of(bound.args[0]) in ("float32", "int32", "int64"):
            inner = bound.args[0]
            clip = self.lookup_binding(inner) if isinstance(inner, relax.Var) else None
            act = Activation.of(clip) if call_op(clip) == "relax.clip" else None
            if act is not None and 0 <= act.lo and act.hi <= 255:
                source = inner
        return self.builder_.emit(relax.op.astype(source, self.operand_dtype))

    def visit_call_(self, call):
        call = super().visit_call_(call)
        op = call_op(call)
        new = None
        if op == "relax.nn.conv2d":
            new = self._conv(call)
        elif op == "relax.matmul":
            new = self._matmul(call)
        return call if new is None else new

    def _granule(self, pixels, channels: int, lanes: int, k: int) -> int:
        """The pixel (or row) multiple a kernel over ``pixels`` computes (cropped after): for a
        symbolic extent the register tile's pixels for its channel blocks; for a static one 1
        (the tile divides it) unless a few spare pixels buy a much fuller tile (a width of 13);
        1 for a two-pixel micro-kernel (pairs need an even extent, and that is not known)."""
        if self.pixel_tile is None or (self.pairs and (lanes, k) == tuple(self.pairs)):
            return 1
        return max(1, int(self.pixel_tile(-(-channels // lanes), lanes, pixels if isinstance(pixels, int) else None)))

    def _float_granule(self, pixels) -> int:
        """The pixel (or row) multiple a float or depthwise kernel over ``pixels`` computes: its
        schedule's pixel tile for a symbolic extent (the tile then divides the loop, no
        predicated last tile), else 1."""
        return 1 if isinstance(pixels, int) or self.pixel_tile is None else FLOAT_PIXELS

    def _pad(self, data, pad_width, exact: bool = True):
        """Zero padding, its extents simplified (see :meth:`_canonical`).

        Over a constant pad (FoldQDQ's, which pads an int8 conv's input with its zero point) it
        extends that one: one pad kernel instead of two in a row, which the conv before can
        then write into (``WritePaddedOutputs``). It keeps the inner pad's value, so it does
        only where that is zero or where this padding's values are never used (``exact``
        False: spare columns of the last tile, cropped after; input channels that meet zero
        weights)."""
        bound = self.lookup_binding(data) if isinstance(data, relax.Var) else None
        if call_op(bound) == "relax.nn.pad" and str(bound.attrs.pad_mode) == "constant" \
                and (not exact or float(bound.attrs.pad_value) == 0.0):
            inner = [int(w) for w in bound.attrs.pad_width]
            return self._canonical(self.builder_.emit(relax.op.nn.pad(
                bound.args[0], [a + b for a, b in zip(inner, pad_width)], pad_value=float(bound.attrs.pad_value))))
        return self._canonical(self.builder_.emit(relax.op.nn.pad(data, pad_width, pad_value=0.0)))

    def _canonical(self, data):
        """``data`` with its symbolic extents simplified. Relax infers a pad as
        ``(W - 1) // 2 + 1 + 2`` where the legalized pad says ``(W - 1) // 2 + 3``, and FuseTIR
        (TVM 0.27) matches a kernel's parameter shapes structurally against its arguments, so a
        kernel made from the unsimplified form fails to fuse; a ``match_cast`` gives it the other."""
        shape = expr_type(data).shape
        if shape is None or all(isinstance(d, IntImm) for d in shape.values):
            return data
        analyzer = arith.Analyzer()
        simple = [analyzer.simplify(d) for d in shape.values]
        if all(tvm_ffi.structural_equal(a, b) for a, b in zip(shape.values, simple)):
            return data
        return self.builder_.match_cast(data, TensorType(simple, dtype_of(data)))

    def _conv(self, call):
        a = call.attrs
        data, weight = call.args
        if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout)) != ("NHWC", "OHWI", "NHWC"):
            return None
        if int(a.groups) > 1:
            return self._depthwise(call)
        if self.float_lanes and dtype_of(data) == "float32" and str(a.out_dtype or "float32") == "float32":
            return self._float_conv(call)
        if int(a.groups) != 1 or str(a.out_dtype) != "int32":
            return None
        w = self._weight(weight)
        shape = dims(data)  # height and width may be symbolic, channels are not
        if w is None or w.dtype != np.int8 or shape is None or not isinstance(shape[3], int):
            return None
        operands = self._operands(data, w.shape[0])
        if operands is None:
            return None
        lanes, k, data = operands
        top, left, bottom, right = (int(p) for p in a.padding)
        static_width = isinstance(shape[2], int)  # a symbolic width may be odd: no pixel pairs
        out_width = (shape[2] + left + right - (w.shape[2] - 1) * int(a.dilation[1]) - 1) // int(a.strides[1]) + 1 \
            if static_width else 1
        if self.pairs and k == self.k and static_width and int(a.strides[1]) == 1 and out_width % 2 == 0:
            lanes, k = self.pairs  # neighbouring pixels read neighbouring columns: one two-pixel step
        extra_c = _round_up(shape[3], k) - shape[3]
        granule = self._granule(out_width if static_width else shape[2], w.shape[0], lanes, k)
        exact = any((top, left, bottom, right))
        right += (granule - 1) * int(a.strides[1])  # spare columns for the last, padded tile
        data = self._pad(data, [0, 0, top, bottom, left, right, 0, extra_c], exact) \
            if top or left or bottom or right or extra_c else self._canonical(data)
        wp = relax.const(pack_conv_weight(w, lanes, k), "int8")
        compute = _conv_compute([int(s) for s in a.strides], [int(d) for d in a.dilation], w.shape[0], lanes, granule)
        self.packed += 1
        return self.builder_.normalize(self.builder_.call_te(compute, data, wp, primfunc_name_hint=CONV_FUNC))

    def _depthwise(self, call):
        """groups == channels: weights to [KH, KW, C] so channels are contiguous (int8 or float)."""
        a = call.attrs
        data, weight = call.args
        w = self._weight(weight)
        shape = dims(data)
        if w is None or shape is None or w.shape[3] != 1 or w.shape[0] != shape[3] or int(a.groups) != shape[3]:
            return None
        out_dtype = str(a.out_dtype) if a.out_dtype else dtype_of(data)
        kinds = {("uint8", "int8", "int32"), ("int8", "int8", "int32"), ("float32", "float32", "float32")}
        if (dtype_of(data), str(w.dtype), out_dtype) not in kinds:
            return None
        top, left, bottom, right = (int(p) for p in a.padding)
        granule = self._float_granule(shape[2])
        exact = any((top, left, bottom, right))
        right += (granule - 1) * int(a.strides[1])
        data = self._pad(data, [0, 0, top, bottom, left, right, 0, 0], exact) if top or left or bottom or right \
            else self._canonical(data)
        wk = relax.const(np.ascontiguousarray(w[:, :, :, 0].transpose(1, 2, 0)), str(w.dtype))
        compute = _depthwise_compute([int(s) for s in a.strides], [int(d) for d in a.dilation], out_dtype, granule)
        self.packed += 1
        return self.builder_.normalize(self.builder_.call_te(compute, data, wk, primfunc_name_hint=DEPTHWISE_FUNC))

    def _float_conv(self, call):
        a = call.attrs
        data, weight = call.args
        w = self._weight(weight)
        shape = dims(data)
        if w is None or w.dtype != np.float32 or shape is None:
            return None
        top, left, bottom, right = (int(p) for p in a.padding)
        width = _out_extent(shape[2] + left + right, w.shape[2], int(a.dilation[1]), int(a.strides[1])) \
            if isinstance(shape[2], int) else None  # output pixels per row (static)
        granule = self._float_granule(shape[2])
        exact = any((top, left, bottom, right))
        right += (granule - 1) * int(a.strides[1])
        data = self._pad(data, [0, 0, top, bottom, left, right, 0, 0], exact) if top or left or bottom or right \
            else self._canonical(data)
        lanes = self.float_lanes
        wp = relax.const(pack_float_conv_weight(w, lanes, width), "float32")
        compute = _float_conv_compute([int(s) for s in a.strides], [int(d) for d in a.dilation], w.shape[0], lanes,
                                      granule)
        self.packed += 1
        return self.builder_.normalize(self.builder_.call_te(compute, data, wp, primfunc_name_hint=FMA_CONV_FUNC))

    def _float_matmul(self, call):
        x, weight = call.args
        w = self._weight(weight)
        shape = dims(x)
        if w is None or w.dtype != np.float32 or w.ndim != 2 or shape is None:
            return None
        wp = relax.const(pack_float_matmul_weight(w, self.float_lanes), "float32")
        granule = self._float_granule(shape[-2] if len(shape) >= 2 else 1)
        x = self._pad(x, [0, 0] * (len(shape) - 2) + [0, granule - 1, 0, 0], exact=False) if granule > 1 \
            else self._canonical(x)
        self.packed += 1
        compute = _float_matmul_compute(w.shape[1], self.float_lanes, granule)
        return self.builder_.normalize(self.builder_.call_te(compute, x, wp, primfunc_name_hint=FMA_MATMUL_FUNC))

    def _matmul(self, call):
        x, weight = call.args
        if self.float_lanes and dtype_of(x) == "float32" and str(call.attrs.out_dtype or "float32") in ("float32", "void"):
            return self._float_matmul(call)
        if str(call.attrs.out_dtype) != "int32":
            return None
        w = self._weight(weight)
        shape = dims(x)
        if w is None or w.dtype != np.int8 or w.ndim != 2 or shape is None:
            return None
        operands = self._operands(x, w.shape[1])
        if operands is None:
            return None
        lanes, k, x = operands
        if self.pairs and k == self.k and len(shape) >= 2 and isinstance(shape[-2], int) and shape[-2] % 2 == 0:
            lanes, k = self.pairs
        extra_k = _round_up(w.shape[0], k) - w.shape[0]
        granule = self._granule(shape[-2] if len(shape) >= 2 else 1, w.shape[1], lanes, k)
        x = self._pad(x, [0, 0] * (len(shape) - 2) + [0, granule - 1, 0, extra_k], exact=False) if extra_k or granule > 1 \
            else self._canonical(x)
        wp = relax.const(pack_matmul_weight(w, lanes, k), "int8")
        self.packed += 1
        return self.builder_.normalize(
            self.builder_.call_te(_matmul_compute(w.shape[1], lanes, granule), x, wp, primfunc_name_hint=MATMUL_FUNC)
        )


@tvm.transform.module_pass(opt_level=0, name="PackKernels")
class PackKernels:
    """Rewrite conv2d (NHWC) and matmul with constant weights into packed kernel form.

    int8 conv2d/matmul with ``data_dtype`` activations become dot-product kernels; depthwise
    convolutions (int8 or float) become channel-vector kernels. ``lanes=()`` packs only those.

    Parameters
    ----------
    data_dtype : str
        Activation dtype the instruction takes: ``uint8`` (x86 VNNI) or ``int8`` (ARM sdot).
    lanes : tuple of int
        Output-channel block sizes the instruction supports, preferred first (padded when none
        divides the channel count).
    float_lanes : int
        float32 lanes of one vector register (16 with AVX-512); float conv2d/matmul get weights
        packed to one vector of output channels per reduction step. 0 leaves them alone.
    k : int
        Input channels per micro-kernel step: 4 (dot-product instructions) or 2 (widening
        multiply-adds).
    operand_dtype : str, optional
        The dtype the kernel reads activations as, when it is not ``data_dtype``: ``int16`` for
        x86 ``vpmaddwd`` (the activations are cast, exactly, before the kernel).
    pairs : (int, int), optional
        ``(lanes, k)`` of a two-pixel micro-kernel (ARM ``smmla``: 2 output channels x 8 input
        channels x 2 pixels), packed for every layer whose output pixels pair up along a row
        (a stride-1 conv of even output width; a matmul of an even number of rows); the others
        take ``lanes``/``k``.
    pixel_tile : callable, optional
        ``(channel blocks, lanes) -> pixels`` of the int8 register tile the schedule will choose.
        An int8 kernel over a symbolic width (or row count) computes a multiple of it, so the
        tile divides the loop and stays tensorized (see :func:`_conv_compute`).
    wide_lanes : tuple of int
        Output-channel block sizes of the micro-kernel for 16-bit activations (``k`` 2, read as
        int16); empty leaves layers with int16 activations unpacked.
    """

    def __init__(self, data_dtype: str = "uint8", lanes: tuple[int, ...] = (16, 8, 4), float_lanes: int = 16,
                 k: int = 4, operand_dtype: str | None = None, pairs: tuple[int, int] | None = None,
                 pixel_tile=None, wide_lanes: tuple[int, ...] = ()):
        self.wide_lanes = tuple(wide_lanes)
        if k not in (2, 4):
            raise ValueError(f"k must be 2 or 4, not {k}")
        self.pairs = tuple(pairs) if pairs else None
        self.data_dtype = data_dtype
        self.lanes = tuple(lanes)
        self.float_lanes = float_lanes
        self.k = k
        self.operand_dtype = operand_dtype or data_dtype
        self.pixel_tile = pixel_tile

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        packer = _Packer(mod, self.data_dtype, self.lanes, self.float_lanes, self.k, self.operand_dtype, self.pairs,
                         self.pixel_tile, self.wide_lanes)
        new = map_functions(mod, packer.visit_expr, builder=packer.builder_, remove_unused=True)
        return new if packer.packed else mod
