"""Default CPU schedules: what makes an untuned tvmq build fast.

TVM 0.27 schedules nothing on CPU by default (DLight's CPU rules cover GEMV and simple
reductions only), so every kernel would run as naive single-threaded loops. These rules give
each fused kernel a reasonable schedule without tuning:

* ``PackedKernelRule``: the packed conv2d/matmul blocks of :mod:`tvmq.passes.pack_kernels`,
  register-blocked over output pixels and channel blocks; int8 ones tensorized with the
  target's 4-way dot-product intrinsic, float ones as vector FMAs; the requantize epilogue is
  computed per tile while it is in cache;
* ``DepthwiseRule``: depthwise conv (NHWC, weights HWC), vectorized over channels;
* then the rules for kernels of any shape, from :mod:`tvmq.targets.generic_schedules`
  (``ChannelReductionRule``, DLight's CPU ``Reduction``, ``InjectiveRule``, ``FallbackRule``).

This module holds the rules for the kernels tvmq makes (recognised by their block names,
:mod:`tvmq.targets.kernel_names`) and the rule lists built from them: :func:`default_rules`
(used by :func:`tvmq.pipeline.schedule_rules`), and :func:`tunable_schedule` /
:func:`is_tunable` (used by :mod:`tvmq.tune`). The loop-level primitives the rules share live in
:mod:`tvmq.targets.generic_schedules`.

Each rule returns None when it does not apply (or when TVM refuses a step), so the next rule
gets a chance; the order of the list is the priority.
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule

from tvmq._compat import arith

from .generic_schedules import (
    ChannelReductionRule,
    FallbackRule,
    InjectiveRule,
    extent_hint,
    find_block,
    inline_epilogue,
    loop_extent,
    schedule_producers,
    spatial_schedule,
    spatial_size,
    symbolic_value,
    vector_width,
)
from .kernel_names import CONV_BLOCK, DEPTHWISE_BLOCK, FMA_CONV_BLOCK, FMA_MATMUL_BLOCK, MATMUL_BLOCK

__all__ = ["PackedKernelRule", "DepthwiseRule", "default_rules", "tunable_schedule", "is_tunable"]


ANY_EXTENT = 720720  # divisible by 1..16: an extent that allows every tile


def _divisor(n: int | None, limit: int) -> int:
    """The largest divisor of ``n`` up to ``limit``; 1 for an unknown ``n`` (a predicated last
    tile would stop the int8 kernels' tensorization). ``tile(None, ...)`` asks with
    :data:`ANY_EXTENT`."""
    if not n:
        return 1
    return max(d for d in range(1, max(1, min(limit, n)) + 1) if n % d == 0)


# Independent FMA chains a float tile keeps in flight to hide their latency.
_FMA_CHAINS = 8

# A float conv over a static width (its weights within ``_FLOAT_CHUNKED_WEIGHTS``, or outweighed
# by its activations) computes up to ``_FLOAT_BLOCKS`` channel blocks per register tile, with as
# many pixels as the registers left hold, and runs its reduction in chunks of input channels
# whose weights for those blocks take up to ``_FLOAT_CHUNK_BYTES`` (L1 holds them across the
# row's pixel tiles; the accumulators go to memory between chunks), as ONNX Runtime's NCHWc
# kernels do. One block by 8 pixels had loaded one weight vector per 8 FMAs. Intel Xeon AVX-512
# host, 2 threads, kernels timed alone: YOLOv8n's 40x40 3x3 conv 64 -> 64 0.44 -> 0.36 ms with
# 6 x 4 tiles in chunks of 16 channels (0.37 without the chunks; ONNX Runtime's 0.35), its FP32
# kernels 8.01 -> 7.52 ms summed, YOLOX's 24.7 -> 22.9, PP-OCRv4 det's 5.93 -> 5.52, PP-LCNet's
# 1.68 -> 1.35; a CRNN's 16x64 conv 48 -> 192 (330 KB of weights) 0.62 -> 0.54. The x86-avx2
# build on the same host (6 x 2 tiles): YOLOv8n's conv 0.86 -> 0.72 ms, its kernels 14.9 -> 13.7.
_FLOAT_BLOCKS = 4
_FLOAT_CHUNK_BYTES = 40 * 1024
_FLOAT_CHUNKED_WEIGHTS = 1 << 20

# How many times the useful accumulators of an int8 tile padding must buy before a kernel
# computes spare pixels, and the tile pixels below which it considers them (weights re-read
# from cache every few pixels); see ``PackedKernelRule.padded_pixels``. YOLOX's 13x13 3x3 conv
# 192 -> 384 went from 1 x 4 to 7 x 3 tiles (0.34 -> 0.14 ms; VNNI host, 2 threads); its 52x52
# convs, 4 x 3 tiles, lost 5% when padded to 8 x 3.
_PAD_GAIN = 1.5
_PAD_BELOW = 4

# Rows from which a conv over a symbolic width runs its rows in parallel and each row's
# epilogue after the row (fewer rows share badly among threads: the column tiles run in
# parallel then, the epilogue apart). PP-OCRv4 rec (dynamic int8 vs the build before, VNNI host,
# 2 threads): from 8 rows, 1.35 -> 1.30x static at width 48, 1.25 -> 1.19x at 96, 640 unchanged;
# from 4 rows, 1.35 -> 1.31x, 1.29 -> 1.25x.
_EPILOGUE_ROWS = 8


def _float_pixels(x: int | None, accumulators: int) -> int:
    """Output pixels of a float register tile: up to 8 (enough independent FMAs to hide their
    latency), more (up to 16) when that covers a row exactly; a tile need not divide the row
    (the last one is predicated), so the choice weighs the wasted pixels of the last tile."""
    preferred = max(1, min(_FMA_CHAINS, accumulators))
    if not x:
        return preferred
    limit = min(x, accumulators, 2 * preferred)
    return max(range(1, limit + 1), key=lambda b: (x / (math.ceil(x / b) * b) * min(b, preferred), -b))


def _known_multiple(extent, limit: int = 64) -> int | None:
    """The largest ``d <= limit`` a symbolic ``extent`` is provably a multiple of (a width
    PackKernels rounded up to its register tile), or None."""
    analyzer = arith.Analyzer()
    for d in range(limit, 1, -1):
        if analyzer.can_prove(tirx.floormod(extent, d) == 0):
            return d
    return None


def _pixel_extent(sch, loop) -> int | None:
    """A pixel loop's extent, or for a symbolic one the multiple it provably is (the tile
    multiple PackKernels computes), or None."""
    return loop_extent(sch, loop) or _known_multiple(sch.get(loop).extent)


def _read_bytes(sch, main, index: int, dynamic: bool = False) -> int | None:
    """Bytes of the buffer the kernel's read ``index`` is from (-1: its weights, -2: its
    activations); None for a dynamic one unless ``dynamic``, where a dynamic dimension counts as
    :data:`SYMBOLIC_EXTENT`."""
    buf = sch.get(main).reads[index].source  # 0.27: TensorRegion.source is the buffer
    if not dynamic and not all(isinstance(s, (int, tirx.IntImm)) for s in buf.shape):
        return None
    return math.prod(symbolic_value(s) for s in buf.shape) * tvm.DataType(str(buf.dtype)).bits // 8


def _weights_outweigh_activations(sch, main, dynamic: bool = False) -> bool:
    """The kernel's weights (its last read) hold more bytes than its activations (the read
    before); with ``dynamic``, a dynamic dimension counts as :data:`SYMBOLIC_EXTENT` (else the
    answer is no)."""
    act, weight = _read_bytes(sch, main, -2, dynamic), _read_bytes(sch, main, -1, dynamic)
    return act is not None and weight is not None and weight > act


def _intrinsic_pixels(name: str) -> int:
    """Output pixels one step of a registered int8 intrinsic computes (its activation operand is
    ``[pixels, k]``, or ``[k]`` for one)."""
    shape = s_tir.TensorIntrin.get(name).desc.params[0].shape  # 0.27: params are buffer-typed vars
    return int(shape[0]) if len(shape) == 2 else 1


def _packed_loops(sch, main, is_conv: bool, dot: bool, lanes: int, two_pixels: bool) -> tuple:
    """The loops of a packed kernel's main block by role: ``(spatial_outer, x, oo, oi,
    reduce_outer, inner, pair)`` — the loops outside the register tile, output pixels, channel
    blocks, channels within a block (``lanes``; split off here unless the block already has
    them), the reduction loops outside the intrinsic, the reduction loop the intrinsic covers
    (none for float kernels) and the two-pixel loop of a two-pixel intrinsic (smmla; else none).
    """
    loops = sch.get_loops(main)
    pair = []  # a two-pixel intrinsic (smmla): its block is [.., X/2, O/2, 2 pixels, 2 channels]
    if two_pixels:
        n_reduce = 4 if is_conv else 2
        *spatial_outer, x, oo, px, oi = loops[:-n_reduce]
        reduce, pair = loops[-n_reduce:], [px]
        reduce_outer, inner = reduce[:-1], [reduce[-1]]
    else:
        if is_conv:
            n, y, x, o, *reduce = loops
            spatial_outer = [n, y]
        else:
            *spatial_outer, x, o = loops[: len(loops) - (2 if dot else 1)]
            reduce = loops[len(loops) - (2 if dot else 1) :]
            if spatial_outer and loop_extent(sch, x) == 1 and extent_hint(sch, spatial_outer[-1]) > 1:
                # [T, 1, K] x [K, N] (an LSTM's input projection over its time steps): the rows
                # are the outer loop; as pixels they share the register tile's weight loads
                spatial_outer[-1], x = x, spatial_outer[-1]
        reduce_outer, inner = (reduce[:-1], [reduce[-1]]) if dot else (reduce, [])
        oo, oi = sch.split(o, [None, lanes])
    return spatial_outer, x, oo, oi, reduce_outer, inner, pair


def _rows(sch, loops) -> int:
    """Iterations of ``loops`` together (a dynamic one counted as :data:`SYMBOLIC_EXTENT`); 0 for none."""
    return math.prod(extent_hint(sch, loop) for loop in loops) if loops else 0


def _vectorize_innermost(sch, block, lanes: int):
    """Vectorize ``block``'s innermost loop, split by the widest vector that divides it."""
    last = sch.get_loops(block)[-1]
    vec = vector_width(loop_extent(sch, last), lanes)
    if vec > 1:
        sch.vectorize(sch.split(last, [None, vec])[1])


def _epilogue_per_tile(sch, main, outer, lanes: int, vector_lanes: int):
    """Compute the epilogue blocks of ``main`` inside its tile loop ``outer``, vectorized
    ``vector_lanes`` wide; a block that does not fit gets its own schedule (``lanes`` wide).

    The epilogue goes into the tile before the reduction is decomposed and tensorized
    (reverse_compute_at needs the plain reduction block). An epilogue larger than the
    kernel's output (a broadcast, e.g. squeeze-excite scaling a feature map) runs on its
    own, in parallel, instead of inside one tile.
    """
    main_size = spatial_size(sch, main)
    for block in inline_epilogue(sch, main):
        if spatial_size(sch, block) > main_size:
            spatial_schedule(sch, block, lanes)
            continue
        try:
            sch.reverse_compute_at(block, outer, preserve_unit_loops=True)
            _vectorize_innermost(sch, block, vector_lanes)
        except Exception:  # pylint: disable=broad-except
            spatial_schedule(sch, block, lanes)


def _row_aligned(sch, main, block) -> bool:
    """Whether ``block`` (an epilogue of ``main``, a pad of the next kernel fused in, say)
    computes its output row ``r`` from row ``r`` of ``main``'s output alone, over the same rows:
    then one loop over the rows may run both, a row after the other."""
    node = sch.get(block)
    produced = sch.get(main).writes[0].source  # 0.27: TensorRegion.source is the buffer
    loops = sch.get_loops(block)
    body = sch.get(loops[-1]).body if loops else None
    if len(loops) < 2 or len(node.writes) != 1 or not isinstance(body, s_tir.SBlockRealize):
        return False
    rows = [iv.var for iv in node.iter_vars[:2]]
    if not all(v.same_as(sch.get(loop).loop_var) for v, loop in zip(body.iter_values[:2], loops[:2])):
        return False
    analyzer = arith.Analyzer()

    def at_rows(region):  # the region's first two axes are (rows[0], rows[1]), one element each
        return all(r.min.same_as(v) and analyzer.can_prove_equal(r.extent, 1) for r, v in zip(region.region[:2], rows))

    out = node.writes[0].source
    reads = [r for r in node.reads if r.source.same_as(produced)]
    return (len(out.shape) >= 2 and len(produced.shape) >= 2 and bool(reads)
            and all(analyzer.can_prove_equal(a, b) for a, b in zip(out.shape[:2], produced.shape[:2]))
            and at_rows(node.writes[0]) and all(at_rows(r) for r in reads))


def _within_tile_multiple(sch, main, block) -> bool:
    """Whether ``block``, an epilogue of a kernel over a symbolic width (NHWC), is row-aligned
    with it (:func:`_row_aligned`), has its channels, and is no wider than the columns it
    computes: ``main``'s width is provably its own rounded up to the multiple ``main`` computes
    (TVM 0.27's analyzer cannot prove ``(W - 1) // 4 + 1 <= (W - 1) // 32 * 8 + 8`` directly)."""
    out, produced = sch.get(block).writes[0].source, sch.get(main).writes[0].source
    if len(out.shape) != 4 or len(produced.shape) != 4 or not _row_aligned(sch, main, block):
        return False
    analyzer = arith.Analyzer()
    multiple = _known_multiple(produced.shape[2])
    return (multiple is not None and analyzer.can_prove_equal(out.shape[3], produced.shape[3])
            and analyzer.can_prove_equal(produced.shape[2], analyzer.simplify(
                (out.shape[2] + multiple - 1) // multiple * multiple)))


def _epilogue_per_row(sch, main, outer, lanes: int):
    """Compute the epilogue blocks of ``main`` in its row loop ``outer`` (``main``'s first two
    axes fused), each row's after its columns; returns the row loop.

    The blocks' own loops are merged with ``outer``, so a block keeps its own width: an epilogue
    with the next kernel's pad fused in is wider than ``main``'s output, and computed at the
    row loop (``reverse_compute_at``) TVM 0.27 would bound it to the columns ``main`` writes,
    leaving the pad's last columns unwritten. A block that is not row-aligned
    (:func:`_row_aligned`) runs apart, in parallel."""
    for block in inline_epilogue(sch, main):
        if not _row_aligned(sch, main, block):
            spatial_schedule(sch, block, lanes)
            continue
        loops = sch.get_loops(block)
        try:
            outer = sch.merge(outer, sch.fuse(loops[0], loops[1]))
        except Exception:  # pylint: disable=broad-except
            spatial_schedule(sch, block, lanes)
            continue
        _vectorize_innermost(sch, block, lanes)
    return outer


def _epilogue_apart(sch, main, lanes: int):
    """The epilogue of a kernel over a symbolic width, as its own parallel loop after the kernel.

    Computed per tile, it reads the accumulators under a predicate (the width is cropped from
    the tile multiple the kernel computes), and TVM 0.27 then sizes the tile's accumulator
    buffer symbolically: a heap workspace allocated in every tile, which made the PP-OCR
    recogniser's 1x1 conv 480 -> 480 2.5x slower than the static build (0.92 vs 0.36 ms at
    width 320). Apart, the accumulators live in one buffer per call: 0.33 ms."""
    for block in inline_epilogue(sch, main):
        spatial_schedule(sch, block, lanes, ragged=True)


class PackedKernelRule(ScheduleRule):
    """Packed conv2d/matmul blocks: register-blocked over output pixels and channel blocks.

    int8 blocks (``tvmq_dot_*``) are tensorized with the target's 4-way dot-product intrinsic;
    float blocks (``tvmq_fma_*``) vectorize the channel lanes into fused multiply-adds. The
    epilogue (bias, requantize, activation, residual) is computed per tile while it is in cache.

    Parameters
    ----------
    intrinsics : dict
        ``{lanes: registered tensor intrinsic name}`` for the int8 blocks (empty: int8 blocks
        are left to the next rule), and ``{("int16", lanes): name}`` for blocks reading 16-bit
        activations where the ISA's kernel for them differs.
    registers : int
        Vector registers of the ISA (AVX-512 and aarch64: 32, AVX2 and armv7: 16); three
        quarters of them hold accumulators, the rest operands.
    vector_lanes : int
        int32/float32 lanes of one register: an accumulator of more lanes takes several.
    x_block, o_block : int
        Upper bounds of the output pixels / channel blocks computed together (tunable knobs).
    """

    def __init__(self, intrinsics: dict[int, str] | None = None, registers: int = 32, vector_lanes: int = 16,
                 x_block: int = 12, o_block: int = 4):
        self.intrinsics = dict(intrinsics or {})
        self.registers = registers
        self.vector_lanes = vector_lanes
        self.x_block = x_block
        self.o_block = o_block

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        return sch if self.schedule(sch, tunable) else None

    def schedule(self, sch, tunable: bool = False, order: str | None = None) -> bool:
        """Schedule ``sch`` in place; False when the kernel is not a packed one (or TVM refuses).

        With ``tunable``, the tile sizes are sampled (``sample_perfect_tile``) so MetaSchedule
        can search and mutate them; otherwise they are fixed by the register budget. ``order``
        (one of :meth:`orders`) overrides the loop order the kernel's shape would get.
        """
        found = self._main(sch)
        if found is None:
            return False
        try:
            return self._schedule(sch, *found, tunable=tunable, order=order)
        except Exception:  # pylint: disable=broad-except
            return False

    @staticmethod
    def _main(sch):
        """``(main block, is_conv, dot)`` of a packed kernel, or None."""
        for name, is_conv, dot in ((CONV_BLOCK, True, True), (MATMUL_BLOCK, False, True),
                                   (FMA_CONV_BLOCK, True, False), (FMA_MATMUL_BLOCK, False, False)):
            main = find_block(sch, name)
            if main is not None:
                return main, is_conv, dot
        return None

    def orders(self, sch) -> list[str | None]:
        """The loop orders a tuner may try for the packed kernel of ``sch`` (empty: not one):
        ``"pixels"`` (pixel tiles outermost: each tile reads all its weights), ``"weights"``
        (channel blocks outermost: each weight block read once, reused by every pixel tile), and
        for a float conv over a static width ``"chunked"`` (input channels in chunks whose
        weights stay in L1, see :meth:`float_conv_tile`). The shape-chosen order is one of
        them; over a symbolic width only that one (``None``)."""
        found = self._main(sch)
        if found is None:
            return []
        main, is_conv, dot = found
        if any(loop_extent(sch, loop) is None for loop in sch.get_loops(main)):
            return [None]
        return ["pixels", "weights"] + (["chunked"] if is_conv and not dot else [])

    def _tiles(self, sch, x, oo, lanes, tunable, dot=False, matmul=False):
        if tunable:
            xs = sch.sample_perfect_tile(x, n=2, max_innermost_factor=16)
            os_ = sch.sample_perfect_tile(oo, n=2, max_innermost_factor=8)
            return xs, os_
        xb, ob = self.tile(_pixel_extent(sch, x), loop_extent(sch, oo), lanes, dot, matmul=matmul)
        return [None, xb], [None, ob]

    def tile(self, x: int | None, oo: int | None, lanes: int, dot: bool, matmul: bool = False) -> tuple[int, int]:
        """Output pixels x channel blocks of one register tile (``x``, ``oo``: their extents;
        ``x=None``: the tile for an extent that allows any, what PackKernels pads a symbolic
        width to a multiple of).

        Accumulators fill three quarters of the registers. An int8 kernel also holds one
        register of weights per channel block (widened to int16 for ``vpmaddwd``, or loaded
        once for the tile's pixels on NEON, which has no memory operands), the broadcast
        activation and a product: with AVX2's 16 registers the float tile of 4 x 3 would spill
        (12 + 3 + 2), so int8 takes e.g. 6 x 2 (12 + 2 + 2) or 3 x 3.

        A float tile here (matmuls; convs over a symbolic width or with weights beyond L2; a conv
        with one channel block) is one channel block by up to 8 pixels (see ``_float_pixels``):
        its weight and activation rows stay in L1 across the reduction. Other float convs take
        several blocks in input-channel chunks (:meth:`float_conv_tile`). Wider tiles (4 x 4)
        without chunks streamed the weights from L2, and a pixel count with no small divisor (13, 7: YOLO and PP-LCNet's
        last stages) fell to one pixel per tile, re-reading every weight per pixel: 5.5 ms
        instead of 1.0 for YOLOX's 13x13 3x3 conv 192 -> 384 (x86 AVX-512 host, 2 threads).

        A float ``matmul`` tile of 8 rows takes two channel blocks where the accumulators allow
        (AVX-512's 24, not AVX2's 12): one block loads 9 operands (8 broadcast activations, one
        weight vector) per 8 FMAs, more than the 2 load ports serve per the 2 FMA ports; two take
        10 per 16. The second block need not divide the blocks (the last tile is predicated).
        Kernels alone, x86 AVX-512, 2 threads: ddddocr's classifier [32, 1024] x [1024, 8210]
        2.07 -> 1.88 ms, its LSTM input projection 0.24 -> 0.18, PP-OCRv6 rec's [40, 120] x
        [120, 18720] head 0.71 -> 0.60, PP-OCRv4 rec's 0.27 -> 0.23 (415 blocks: predicated);
        their 40-row attention projections within noise. AVX2's 6 x 2 (predicated rows) lost up
        to 2x there.
        """
        per_acc = max(1, lanes // self.vector_lanes)
        accumulators = max(1, self.registers * 3 // 4 // per_acc)
        if not dot:
            # fewer pixels than FMAs in flight (a matrix-vector product: one): more channel
            # blocks, each its own accumulator chain, rather than one chain waiting on itself
            # (while 4+ tiles are left to run in parallel)
            xb = _float_pixels(x, accumulators)
            ob = _divisor(oo, max(1, min(min(_FMA_CHAINS, accumulators) // xb, (oo or 1) // 4)))
            if matmul and ob == 1 and xb >= _FMA_CHAINS and 2 * xb <= accumulators and (oo or 2) >= 2:
                ob = 2
            return xb, ob
        x = ANY_EXTENT if x is None else x
        best = (1, 1)
        for ob in range(1, self.o_block + 1):
            if oo and oo % ob:
                continue
            room = (self.registers - 2) // per_acc - ob  # accumulators left beside the weights
            xb = _divisor(x, max(1, min(self.x_block, accumulators // ob, room // ob)))
            # most accumulators, then the squarest tile (fewest operand loads per step)
            if (xb * ob, -(xb + ob)) > (best[0] * best[1], -sum(best)):
                best = (xb, ob)
        return best

    def float_conv_tile(self, x: int, oo: int, lanes: int, reduce: list[int]) -> tuple[int, int, int] | None:
        """``(pixels, channel blocks, input channels per chunk)`` of a float conv over ``x``
        output pixels and ``oo`` channel blocks whose reduction loops have the extents ``reduce``
        (taps..., input channels), or None where its channels make one block (the one-block tile
        of :meth:`tile` then). See :data:`_FLOAT_BLOCKS`."""
        if not x or not oo or not all(reduce):
            return None
        per_acc = max(1, lanes // self.vector_lanes)

        def pixels(ob):
            # accumulators, one weight register per block and the broadcast activation fit the
            # registers (AVX2's 16 take 6 x 2, AVX-512's 32 6 x 4); the most useful pixels per
            # tile, a predicated last tile's spare ones not counted
            room = max(1, min(self.registers * 3 // 4, self.registers - 1 - ob * per_acc) // per_acc // ob)
            return max(range(1, min(x, room) + 1), key=lambda b: (x / (math.ceil(x / b) * b) * b, b))

        ob = max((b for b in range(2, _FLOAT_BLOCKS + 1) if oo % b == 0), key=lambda b: (pixels(b) * b, b), default=1)
        if ob < 2:
            return None
        xb = pixels(ob)
        *taps, channels = reduce
        per_channel = math.prod(taps) * ob * lanes * 4
        return xb, ob, _divisor(channels, max(1, _FLOAT_CHUNK_BYTES // per_channel))

    def padded_pixels(self, x: int, oo: int, lanes: int) -> int:
        """The multiple an int8 kernel over a static pixel extent ``x`` should compute (cropped
        after; 1: ``x`` itself). An int8 tile must divide its pixel loop (a predicated tile is not
        tensorized), so a width with no small divisor (13, 7: the last stages of YOLO heads and
        PP-LCNet) gets one-pixel tiles that re-read their weights for every pixel. When the tile
        for ``x`` has fewer than ``_PAD_BELOW`` pixels, a few spare columns buy a fuller one if it
        holds at least ``_PAD_GAIN`` times the useful accumulators (pixels x channel blocks, the
        spare pixels not counted)."""
        def useful(multiple):
            padded = -(-x // multiple) * multiple
            xb, ob = self.tile(padded, oo, lanes, dot=True)
            return xb * ob * x / padded

        xb, ob = self.tile(x, oo, lanes, dot=True)
        if xb >= _PAD_BELOW:
            return 1
        best = max(range(2, self.x_block + 1), key=lambda m: (useful(m), -m))
        return best if useful(best) >= _PAD_GAIN * xb * ob else 1

    def _schedule(self, sch, main, is_conv, dot, tunable=False, order=None):
        weight = sch.get(main).reads[-1].source  # 0.27: TensorRegion.source is the buffer
        lanes = int(weight.shape[-2] if dot else weight.shape[-1])
        wide = dot and str(sch.get(main).reads[0].source.dtype) == "int16" and ("int16", lanes) in self.intrinsics
        intrin = self.intrinsics.get(("int16", lanes) if wide else lanes) if dot else None
        if dot and intrin is None:
            return False
        schedule_producers(sch, main, 64)
        two_pixels = dot and _intrinsic_pixels(intrin) == 2
        spatial_outer, x, oo, oi, reduce_outer, inner, pair = _packed_loops(sch, main, is_conv, dot, lanes, two_pixels)
        symbolic = loop_extent(sch, x) is None
        x_tiles, o_tiles = self._tiles(sch, x, oo, lanes, tunable, dot, matmul=not is_conv)
        # the float conv's (pixels, channel blocks, input channels per chunk) where the shape
        # chooses chunks; the "chunked" order samples all three instead
        chunk_tile = None
        if order is None and is_conv and not dot and not symbolic and not tunable and (
                not _weights_outweigh_activations(sch, main) or _read_bytes(sch, main, -1) <= _FLOAT_CHUNKED_WEIGHTS):
            chunk_tile = self.float_conv_tile(loop_extent(sch, x), loop_extent(sch, oo), lanes,
                                              [loop_extent(sch, loop) for loop in reduce_outer])
        if chunk_tile:
            x_tiles, o_tiles = [None, chunk_tile[0]], [None, chunk_tile[1]]
        xo, xi = sch.split(x, x_tiles)
        ooo, ooi = sch.split(oo, o_tiles)
        per_row = False
        if chunk_tile or order == "chunked":
            # the input channels in chunks outside the row's pixel tiles (see _FLOAT_BLOCKS)
            *taps, ic = reduce_outer
            ic_tiles = [None, chunk_tile[2]] if chunk_tile else sch.sample_perfect_tile(ic, n=2, max_innermost_factor=64)
            ico, ici = sch.split(ic, ic_tiles)
            sch.reorder(*spatial_outer, ooo, ico, xo, *taps, ici, xi, ooi, oi)
            outer = sch.fuse(*spatial_outer, ooo)
            reduce_outer = [ico]
        elif (order == "weights" if order is not None
              else _weights_outweigh_activations(sch, main, dynamic=not is_conv)):
            # Channel blocks outermost: each weight block is read from memory once and reused
            # from cache by every pixel tile (a classifier's 1024 x 8210 matmul streamed its 34 MB
            # of weights once per 8 rows). A matmul over a dynamic row count too (PP-OCRv4 rec's
            # 120 x 6625 head: 15.2 -> 13.7 us at width 48, 179 -> 141 at 640); a conv over a
            # dynamic width keeps its rows outermost (its epilogue per row).
            sch.reorder(ooo, *spatial_outer, xo, *reduce_outer, xi, ooi, *pair, oi, *inner)
            outer = sch.fuse(ooo, *spatial_outer, xo)
        else:
            sch.reorder(*spatial_outer, xo, ooo, *reduce_outer, xi, ooi, *pair, oi, *inner)
            per_row = symbolic and is_conv and not pair and _rows(sch, spatial_outer) >= _EPILOGUE_ROWS
            if per_row:
                # a conv over a symbolic width with rows to share among threads: rows in
                # parallel, each row's epilogue right after its tiles (_epilogue_per_row), not
                # a second parallel pass over an int32 buffer of the whole output
                outer = _epilogue_per_row(sch, main, sch.fuse(*spatial_outer), lanes)
            else:
                outer = sch.fuse(*spatial_outer, xo, ooo) if spatial_outer else sch.fuse(xo, ooo)
        if not symbolic:
            _epilogue_per_tile(sch, main, outer, lanes, self.vector_lanes if pair else lanes)
        elif not per_row:
            _epilogue_apart(sch, main, lanes)
        if extent_hint(sch, outer) > 1:
            sch.parallel(outer)  # before tensorize: the tensorized block is opaque to the check
        if not dot:
            sch.vectorize(oi)  # before decomposing, as for the depthwise kernels
        sch.unroll(xi)
        sch.unroll(ooi)
        init = sch.decompose_reduction(main, reduce_outer[0])
        sch.vectorize(sch.get_loops(init)[-1])
        if dot:
            sch.tensorize(pair[0] if pair else oi, intrin)
        return True


class DepthwiseRule(ScheduleRule):
    """``tvmq_depthwise`` (NHWC, weights [KH, KW, C]): vectors over channels, rows in parallel."""

    def __init__(self, lanes: int = 16, x_block: int = 12):
        self.lanes = lanes
        self.x_block = x_block

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        return sch if self.schedule(sch, tunable) else None

    def schedule(self, sch, tunable: bool = False) -> bool:
        main = find_block(sch, DEPTHWISE_BLOCK)
        if main is None:
            return False
        try:
            schedule_producers(sch, main, 64)
            n, y, x, c, kh, kw = sch.get_loops(main)
            symbolic = loop_extent(sch, x) is None
            vec = vector_width(loop_extent(sch, c), self.lanes)
            co, ci = sch.split(c, [None, vec])
            if tunable:
                x_tiles = sch.sample_perfect_tile(x, n=2, max_innermost_factor=8)
            else:
                x_tiles = [None, _float_pixels(_pixel_extent(sch, x), self.x_block)]
            xo, xi = sch.split(x, x_tiles)
            sch.reorder(n, y, xo, co, kh, kw, xi, ci)
            outer = sch.fuse(n, y)
            if symbolic:
                blocks = inline_epilogue(sch, main)
                if blocks and all(_within_tile_multiple(sch, main, block) for block in blocks):
                    # channel blocks outside the column tiles, and the epilogue per channel
                    # block of a row, while its accumulators are in cache: it covers the row's
                    # columns (no wider than the tile multiple the kernel computes), so every
                    # column is written. A float 5x5 depthwise of PP-OCRv4 rec (480 channels)
                    # alone: 10.6 -> 8.6 us at width 48, 128 -> 108 us at 640.
                    sch.reorder(co, xo)
                    for block in blocks:
                        sch.reverse_compute_at(block, co, preserve_unit_loops=True)
                        sch.vectorize(sch.get_loops(block)[-1])
                else:
                    # per row: an epilogue wider than the kernel's output (the next conv's pad
                    # fused in: 12 of PP-OCRv4 rec's 14 depthwise kernels) runs after each row,
                    # in the same parallel loop (_epilogue_per_row): width 48 0.524 -> 0.503 ms
                    # against a pass of its own over an int32 buffer.
                    outer = _epilogue_per_row(sch, main, outer, self.lanes)
            else:
                for block in inline_epilogue(sch, main):
                    try:
                        sch.reverse_compute_at(block, co, preserve_unit_loops=True)
                        sch.vectorize(sch.get_loops(block)[-1])
                    except Exception:  # pylint: disable=broad-except
                        spatial_schedule(sch, block, self.lanes)
            if extent_hint(sch, outer) > 1:
                sch.parallel(outer)
            sch.vectorize(ci)  # before decomposing: the update block fails the check afterwards
            sch.unroll(xi)
            sch.unroll(kw)
            init = sch.decompose_reduction(main, kh)
            sch.vectorize(sch.get_loops(init)[-1])
            return True
        except Exception:  # pylint: disable=broad-except
            return False


def tunable_schedule(intrinsics: dict[int, str] | None = None, lanes: int = 16, registers: int = 32):
    """A MetaSchedule ``ScheduleFn`` body: tvmq's packed/depthwise schedules with sampled tiles.

    A packed kernel has one design space per loop order (:meth:`PackedKernelRule.orders`), so
    the search weighs the orders as well as the tiles within each. Raises for kernels the rules
    do not cover (MetaSchedule then records no design space).
    """
    packed, depthwise = PackedKernelRule(intrinsics, registers, lanes), DepthwiseRule(lanes)

    def schedule(sch):
        spaces = []
        for order in packed.orders(sch):
            space = sch.copy()
            if packed.schedule(space, tunable=True, order=order):
                spaces.append(space)
        if not spaces and depthwise.schedule(sch, tunable=True):
            spaces.append(sch)
        if not spaces:
            raise ValueError("not a kernel tvmq tunes")
        return spaces

    return schedule


def is_tunable(func) -> bool:
    """Whether ``func`` holds a kernel whose schedule has tunable tiles."""
    sch = s_tir.Schedule(func)
    return any(find_block(sch, n) is not None for n in (CONV_BLOCK, MATMUL_BLOCK, FMA_CONV_BLOCK,
                                                          FMA_MATMUL_BLOCK, DEPTHWISE_BLOCK))


def default_rules(intrinsics: dict[int, str] | None = None, lanes: int = 16, registers: int = 32) -> list[ScheduleRule]:
    from tvm.s_tir.dlight import cpu

    rules: list[ScheduleRule] = [PackedKernelRule(intrinsics, registers, lanes)]

    # DLight's CPU Reduction rule covers softmax / layer norm style kernels.
    rules += [DepthwiseRule(lanes), ChannelReductionRule(lanes), cpu.Reduction(), InjectiveRule(lanes),
              FallbackRule(lanes)]
    return rules
