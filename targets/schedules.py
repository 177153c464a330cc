"""Default CPU schedules: what makes an untuned tvmq build fast.

TVM 0.27 schedules nothing on CPU by default (DLight's CPU rules cover GEMV and simple
reductions only), so every kernel would run as naive single-threaded loops. These rules give
each fused kernel a reasonable schedule without tuning:

* ``PackedKernelRule``: the packed conv2d/matmul blocks of :mod:`tvmq.passes.pack_kernels`,
  register-blocked over output pixels and channel blocks; int8 ones tensorized with the
  target's 4-way dot-product intrinsic, float ones as vector FMAs; the requantize epilogue is
  computed per tile while it is in cache;
* ``DepthwiseRule``: depthwise conv (NHWC, weights HWC), vectorized over channels;
* ``InjectiveRule``: elementwise/injective kernels, fused loops split into parallel chunks of
  vectors;
* ``FallbackRule``: anything else gets its outer spatial loops parallelized and its innermost
  spatial loop vectorized where that is legal.

Each rule returns None when it does not apply (or when TVM refuses a step), so the next rule
gets a chance; the order of the list is the priority.
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule

__all__ = ["NoInt8TensorCores", "PackedKernelRule", "DepthwiseRule", "ChannelReductionRule", "InjectiveRule", "FallbackRule", "default_rules",
           "tunable_schedule", "is_tunable"]

CONV_BLOCK = "tvmq_dot_conv2d"
MATMUL_BLOCK = "tvmq_dot_matmul"
FMA_CONV_BLOCK = "tvmq_fma_conv2d"
FMA_MATMUL_BLOCK = "tvmq_fma_matmul"
DEPTHWISE_BLOCK = "tvmq_depthwise"
_SPATIAL, _REDUCE = 0, 2
_PARALLEL_MIN = 2048  # elements below which threads cost more than they save
_FEW_LANES = 4  # innermost extents too short to vectorize


def _extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext.value) if hasattr(ext, "value") else (int(ext) if isinstance(ext, int) else None)


def _divisor(n: int | None, limit: int) -> int:
    if not n:
        return 1
    return max(d for d in range(1, max(1, min(limit, n)) + 1) if n % d == 0)


def _vector_width(n: int | None, lanes: int) -> int:
    """The largest power of two <= ``lanes`` dividing ``n`` (odd widths split badly in LLVM)."""
    width = 1
    while n and width * 2 <= lanes and n % (width * 2) == 0:
        width *= 2
    return width


def _float_pixels(x: int | None, accumulators: int) -> int:
    """Output pixels of a float register tile: up to 8 (enough independent FMAs to hide their
    latency), more (up to 16) when that covers a row exactly; a tile need not divide the row
    (the last one is predicated), so the choice weighs the wasted pixels of the last tile."""
    preferred = max(1, min(8, accumulators))
    if not x:
        return preferred
    limit = min(x, accumulators, 2 * preferred)
    return max(range(1, limit + 1), key=lambda b: (x / (math.ceil(x / b) * b) * min(b, preferred), -b))


def _weights_outweigh_activations(sch, main) -> bool:
    """The kernel's weights (its last read) hold more bytes than its activations (the read before)."""
    reads = sch.get(main).reads

    def size(region):  # 0.27: TensorRegion.source is the buffer
        buf = region.source
        if not all(isinstance(s, (int, tirx.IntImm)) for s in buf.shape):
            return None
        return math.prod(int(s) for s in buf.shape) * tvm.DataType(str(buf.dtype)).bits // 8

    act, weight = size(reads[-2]), size(reads[-1])
    return act is not None and weight is not None and weight > act


def _intrinsic_pixels(name: str) -> int:
    """Output pixels one step of a registered int8 intrinsic computes (its activation operand is
    ``[pixels, k]``, or ``[k]`` for one)."""
    shape = s_tir.TensorIntrin.get(name).desc.params[0].shape  # 0.27: params are buffer-typed vars
    return int(shape[0]) if len(shape) == 2 else 1


def _find_block(sch, name):
    try:
        return sch.get_sblock(name)
    except Exception:  # pylint: disable=broad-except
        return None


def _root_blocks(sch):
    root = sch.get_sblock("root") if _find_block(sch, "root") is not None else None
    return list(sch.get_child_blocks(root)) if root is not None else []


def _is_spatial(sch, block) -> bool:
    return all(int(iv.iter_type) == _SPATIAL for iv in sch.get(block).iter_vars)


def _spatial_size(sch, block) -> int:
    """Product of the extents of a block's spatial iterators."""
    size = 1
    for iv in sch.get(block).iter_vars:
        if int(iv.iter_type) == _SPATIAL:
            ext = iv.dom.extent
            size *= int(ext.value) if hasattr(ext, "value") else int(ext)
    return size


def _inline_epilogue(sch, main):
    """Inline every elementwise block after ``main`` into the last one; return the rest."""
    blocks = _root_blocks(sch)
    after = blocks[[sch.get(b).name_hint for b in blocks].index(sch.get(main).name_hint) + 1 :]
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(sch.get_sblock("root"))}
    remaining = []
    for b in after:
        name = sch.get(b).name_hint
        if name not in outputs and _is_spatial(sch, b):
            try:
                sch.compute_inline(b)
                continue
            except Exception:  # pylint: disable=broad-except
                pass
        remaining.append(b)
    return remaining


def _vectorize_inner(sch, block, lanes: int, parallel: bool = False):
    """Fuse a spatial block's loops, split off ``lanes``-wide vectors, parallelize the rest."""
    loops = sch.get_loops(block)
    if not loops:
        return
    total = 1
    for l in loops:
        e = _extent(sch, l)
        total = total * e if e else 0
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    inner_ext = _extent(sch, sch.get_loops(block)[-1])
    vec = _vector_width(inner_ext, lanes) if inner_ext else 1
    if vec > 1:
        outer, inner = sch.split(fused, [None, vec])
        sch.vectorize(inner)
        fused = outer
    if parallel and total >= _PARALLEL_MIN:
        sch.parallel(fused)


def _schedule_producers(sch, main, lanes):
    """Pads and other spatial producers of ``main``: parallel over rows, vectors over channels."""
    blocks = _root_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    for b in blocks[: names.index(sch.get(main).name_hint)]:
        if _is_spatial(sch, b):
            _spatial_schedule(sch, b, lanes)


def _spatial_schedule(sch, block, lanes):
    """Parallel outer loops, vectorized innermost loop (kept separate, as it is contiguous)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    inner_ext = _extent(sch, inner) or 1
    total = math.prod(_extent(sch, l) or 1 for l in loops)  # elements (splitting keeps it)
    if len(loops) > 2 and inner_ext <= _FEW_LANES:
        # A few channels innermost (an NHWC image, often read transposed from NCHW): a vector
        # of them is mostly gathers, and fusing the columns into the parallel loop costs a
        # division per pixel. Whole rows per task, the channels unrolled: the PP-OCR
        # classifier's input quantize + transpose + pad went from 25.4 to 2.7 us.
        if inner_ext > 1:
            sch.unroll(inner)
        if total >= _PARALLEL_MIN:
            rows = loops[:-2]
            sch.parallel(sch.fuse(*rows) if len(rows) > 1 else rows[0])
        return
    vec = _vector_width(inner_ext, lanes)
    if vec > 1:
        _, vi = sch.split(inner, [None, vec])
        sch.vectorize(vi)
    outer = sch.get_loops(block)[:-1]
    if outer and total >= _PARALLEL_MIN:
        keep = [l for l in outer[: max(1, len(outer) - 1)]]
        fused = sch.fuse(*keep) if len(keep) > 1 else keep[0]
        sch.parallel(fused)


class PackedKernelRule(ScheduleRule):
    """Packed conv2d/matmul blocks: register-blocked over output pixels and channel blocks.

    int8 blocks (``tvmq_dot_*``) are tensorized with the target's 4-way dot-product intrinsic;
    float blocks (``tvmq_fma_*``) vectorize the channel lanes into fused multiply-adds. The
    epilogue (bias, requantize, activation, residual) is computed per tile while it is in cache.

    Parameters
    ----------
    intrinsics : dict
        ``{lanes: registered tensor intrinsic name}`` for the int8 blocks (empty: int8 blocks
        are left to the next rule).
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

    def schedule(self, sch, tunable: bool = False) -> bool:
        """Schedule ``sch`` in place; False when the kernel is not a packed one (or TVM refuses).

        With ``tunable``, the tile sizes are sampled (``sample_perfect_tile``) so MetaSchedule
        can search and mutate them; otherwise they are fixed by the register budget.
        """
        for name, is_conv, dot in ((CONV_BLOCK, True, True), (MATMUL_BLOCK, False, True),
                                   (FMA_CONV_BLOCK, True, False), (FMA_MATMUL_BLOCK, False, False)):
            main = _find_block(sch, name)
            if main is not None:
                try:
                    return self._schedule(sch, main, is_conv, dot, tunable)
                except Exception:  # pylint: disable=broad-except
                    return False
        return False

    def _tiles(self, sch, x, oo, lanes, tunable, dot=False):
        if tunable:
            xs = sch.sample_perfect_tile(x, n=2, max_innermost_factor=16)
            os_ = sch.sample_perfect_tile(oo, n=2, max_innermost_factor=8)
            return xs, os_
        xb, ob = self.tile(_extent(sch, x), _extent(sch, oo), lanes, dot)
        return [None, xb], [None, ob]

    def tile(self, x: int | None, oo: int | None, lanes: int, dot: bool) -> tuple[int, int]:
        """Output pixels x channel blocks of one register tile (``x``, ``oo``: their extents).

        Accumulators fill three quarters of the registers. An int8 kernel also holds one
        register of weights per channel block (widened to int16 for ``vpmaddwd``, or loaded
        once for the tile's pixels on NEON, which has no memory operands), the broadcast
        activation and a product: with AVX2's 16 registers the float tile of 4 x 3 would spill
        (12 + 3 + 2), so int8 takes e.g. 6 x 2 (12 + 2 + 2) or 3 x 3.

        A float tile is one channel block by up to 8 pixels (see ``_float_pixels``): its weight
        and activation rows stay in L1 across the reduction. Wider tiles (4 x 4) streamed the
        weights from L2, and a pixel count with no small divisor (13, 7: YOLO and PP-LCNet's
        last stages) fell to one pixel per tile, re-reading every weight per pixel: 5.5 ms
        instead of 1.0 for YOLOX's 13x13 3x3 conv 192 -> 384 (x86 AVX-512 host, 2 threads).
        """
        per_acc = max(1, lanes // self.vector_lanes)
        accumulators = max(1, self.registers * 3 // 4 // per_acc)
        if not dot:
            return _float_pixels(x, accumulators), 1
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

    def _schedule(self, sch, main, is_conv, dot, tunable=False):
        weight = sch.get(main).reads[-1].source  # 0.27: TensorRegion.source is the buffer
        lanes = int(weight.shape[-2] if dot else weight.shape[-1])
        intrin = self.intrinsics.get(lanes) if dot else None
        if dot and intrin is None:
            return False
        _schedule_producers(sch, main, 64)
        loops = sch.get_loops(main)
        pair = []  # a two-pixel intrinsic (smmla): its block is [.., X/2, O/2, 2 pixels, 2 channels]
        if dot and _intrinsic_pixels(intrin) == 2:
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
            reduce_outer, inner = (reduce[:-1], [reduce[-1]]) if dot else (reduce, [])
            oo, oi = sch.split(o, [None, lanes])
        x_tiles, o_tiles = self._tiles(sch, x, oo, lanes, tunable, dot)
        xo, xi = sch.split(x, x_tiles)
        ooo, ooi = sch.split(oo, o_tiles)
        if _weights_outweigh_activations(sch, main):
            # Channel blocks outermost: each weight block is read from memory once and reused
            # from cache by every pixel tile (a classifier's 1024 x 8210 matmul streamed its 34 MB
            # of weights once per 8 rows).
            sch.reorder(ooo, *spatial_outer, xo, *reduce_outer, xi, ooi, *pair, oi, *inner)
            outer = sch.fuse(ooo, *spatial_outer, xo)
        else:
            sch.reorder(*spatial_outer, xo, ooo, *reduce_outer, xi, ooi, *pair, oi, *inner)
            outer = sch.fuse(*spatial_outer, xo, ooo) if spatial_outer else sch.fuse(xo, ooo)
        # The epilogue goes into the tile before the reduction is decomposed and tensorized
        # (reverse_compute_at needs the plain reduction block). An epilogue larger than the
        # kernel's output (a broadcast, e.g. squeeze-excite scaling a feature map) runs on its
        # own, in parallel, instead of inside one tile.
        main_size = _spatial_size(sch, main)
        for block in _inline_epilogue(sch, main):
            if _spatial_size(sch, block) > main_size:
                _spatial_schedule(sch, block, lanes)
                continue
            try:
                sch.reverse_compute_at(block, outer, preserve_unit_loops=True)
                last = sch.get_loops(block)[-1]
                vec = _vector_width(_extent(sch, last), self.vector_lanes if pair else lanes)
                if vec > 1:
                    _, vi = sch.split(last, [None, vec])
                    sch.vectorize(vi)
            except Exception:  # pylint: disable=broad-except
                _spatial_schedule(sch, block, lanes)
        if (_extent(sch, outer) or 1) > 1:
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
        main = _find_block(sch, DEPTHWISE_BLOCK)
        if main is None:
            return False
        try:
            _schedule_producers(sch, main, 64)
            n, y, x, c, kh, kw = sch.get_loops(main)
            vec = _vector_width(_extent(sch, c), self.lanes)
            co, ci = sch.split(c, [None, vec])
            if tunable:
                x_tiles = sch.sample_perfect_tile(x, n=2, max_innermost_factor=8)
            else:
                x_tiles = [None, _float_pixels(_extent(sch, x), self.x_block)]
            xo, xi = sch.split(x, x_tiles)
            sch.reorder(n, y, xo, co, kh, kw, xi, ci)
            outer = sch.fuse(n, y)
            for block in _inline_epilogue(sch, main):
                try:
                    sch.reverse_compute_at(block, co, preserve_unit_loops=True)
                    sch.vectorize(sch.get_loops(block)[-1])
                except Exception:  # pylint: disable=broad-except
                    _spatial_schedule(sch, block, self.lanes)
            if (_extent(sch, outer) or 1) > 1:
                sch.parallel(outer)
            sch.vectorize(ci)  # before decomposing: the update block fails the check afterwards
            sch.unroll(xi)
            sch.unroll(kw)
            init = sch.decompose_reduction(main, kh)
            sch.vectorize(sch.get_loops(init)[-1])
            return True
        except Exception:  # pylint: disable=broad-except
            return False


class _LanesRule(ScheduleRule):
    """A rule with a vector width, scheduling a PrimFunc's root blocks."""

    def __init__(self, lanes: int = 16):
        self.lanes = lanes

    @staticmethod
    def _blocks(func):
        """``(schedule, root blocks)`` of ``func``, or None for anything but a PrimFunc with blocks."""
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = _root_blocks(sch)
        return (sch, blocks) if blocks else None


class ChannelReductionRule(_LanesRule):
    """Reductions whose output's innermost axis is not reduced: pools over the spatial axes of an
    NHWC tensor (global / squeeze-excite average pools) and activation x activation matmuls
    (attention's ``Q K^T`` and ``A V``: ``C[.., i, j] += A[.., i, k] * B[.., k, j]``).

    The innermost axis is contiguous in the output and in the inputs that use it, so the kernel
    accumulates whole vectors along it (``acc[c:c+16] += x[h, w, c:c+16]``), in parallel over
    the other output axes, and runs the epilogue (a requantize) on each block while it is in
    registers. A last-axis reduction rule would instead walk each output element on its own,
    one lane at a time.
    """

    def apply(self, func, target, tunable):
        found = self._blocks(func)
        if found is None:
            return None
        sch, blocks = found
        reductions = [b for b in blocks if not _is_spatial(sch, b)]
        if len(reductions) != 1 or not all(_is_spatial(sch, b) for b in blocks[blocks.index(reductions[0]) + 1:]):
            return None
        main = reductions[0]
        block = sch.get(main)
        ivs = list(block.iter_vars)
        kinds = [int(iv.iter_type) for iv in ivs]
        # [spatial..., reduce...], the last spatial one indexing the innermost axis of the input
        if _REDUCE not in kinds or kinds != sorted(kinds) or _SPATIAL not in kinds:
            return None
        channel = ivs[kinds.index(_REDUCE) - 1].var
        # Every input either runs along the output's innermost axis (a vector) or does not
        # depend on it (broadcast): a pool reads one NHWC tensor; an activation x activation
        # matmul (attention) reads A[.., i, k] and B[.., k, j].
        inner = [r.region[-1].min for r in block.reads]
        if not any(_is_var(e, channel) for e in inner) or any(
                not _is_var(e, channel) and _uses(e, channel) for e in inner):
            return None
        try:
            return sch if self._schedule(sch, main, len([k for k in kinds if k == _SPATIAL])) else None
        except Exception:  # pylint: disable=broad-except
            return None

    def _schedule(self, sch, main, n_spatial) -> bool:
        _schedule_producers(sch, main, self.lanes)
        loops = sch.get_loops(main)
        spatial, reduce = loops[:n_spatial], loops[n_spatial:]
        extent = _extent(sch, spatial[-1]) or 0
        vec = _vector_width(extent, self.lanes)
        # An odd width no vector divides (attention's 15-wide heads): whole rows per task, the
        # row unrolled inside the reduction for LLVM's SLP vectorizer.
        short = vec == 1 and 1 < extent <= 2 * self.lanes and n_spatial > 1
        if short:
            ci = spatial[-1]
            sch.reorder(*spatial[:-1], *reduce, ci)
            outer = sch.fuse(*spatial[:-1]) if n_spatial > 2 else spatial[0]
        else:
            co, ci = sch.split(spatial[-1], [None, vec])
            sch.reorder(*spatial[:-1], co, *reduce, ci)
            outer = sch.fuse(*spatial[:-1], co) if len(spatial) > 1 else co
        width, widen = (extent, sch.unroll) if short else (vec, sch.vectorize)
        for block in _inline_epilogue(sch, main):
            sch.reverse_compute_at(block, outer, preserve_unit_loops=True)
            last = sch.get_loops(block)[-1]
            if _extent(sch, last) == width and width > 1:
                widen(last)
        total = 1
        for l in sch.get_loops(main):
            total *= _extent(sch, l) or 1
        if total >= _PARALLEL_MIN and (_extent(sch, outer) or 1) > 1:
            sch.parallel(outer)
        if width > 1:
            widen(ci)  # before decomposing, as for the depthwise kernels
        init = sch.decompose_reduction(main, reduce[0])
        if width > 1:
            widen(sch.get_loops(init)[-1])
        return True


def _is_var(expr, var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


class InjectiveRule(_LanesRule):
    """Kernels with only spatial blocks: inline into the output, then parallel vectors."""

    def apply(self, func, target, tunable):
        found = self._blocks(func)
        if found is None or not all(_is_spatial(found[0], b) for b in found[1]):
            return None
        sch, blocks = found
        try:
            outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(sch.get_sblock("root"))}
            for b in blocks:
                if sch.get(b).name_hint not in outputs:
                    try:
                        sch.compute_inline(b)
                    except Exception:  # pylint: disable=broad-except
                        pass
            for b in _root_blocks(sch):
                _spatial_schedule(sch, b, self.lanes)
            return sch
        except Exception:  # pylint: disable=broad-except
            return None


class FallbackRule(_LanesRule):
    """Parallelize the outer spatial loops of every block; vectorize spatial inner loops."""

    def apply(self, func, target, tunable):
        found = self._blocks(func)
        if found is None:
            return None
        sch, blocks = found
        changed = False
        for b in blocks:
            try:
                if _is_spatial(sch, b):
                    _spatial_schedule(sch, b, self.lanes)
                    changed = True
                    continue
                loops = sch.get_loops(b)
                ivs = sch.get(b).iter_vars
                # Leading loops bound to spatial iterators can run in parallel.
                lead = []
                for l, iv in zip(loops, ivs):
                    if int(iv.iter_type) != _SPATIAL:
                        break
                    lead.append(l)
                if len(lead) >= 1 and math.prod(_extent(sch, l) or 1 for l in lead) > 1:
                    fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
                    sch.parallel(fused)
                    changed = True
            except Exception:  # pylint: disable=broad-except
                continue
        return sch if changed else None


class NoInt8TensorCores(ScheduleRule):
    """``rule`` (DLight's GPU Matmul) with tensor-core tensorization turned off for kernels with
    8-bit integer operands (``dlight.do_not_tensorize``): TVM 0.27 compiles an int8 matmul it
    tensorizes into a failed check (``fragment_info_``, TensorCoreFragmentInfer) and aborts the
    build. Its plain tiled schedule remains, for which nvcc emits dp4a (IDP.4A)."""

    def __init__(self, rule: ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        # 0.27: a PrimFunc's params are buffer-typed variables
        if isinstance(func, tirx.PrimFunc) and any(str(p.dtype) in ("int8", "uint8") for p in func.params):
            func = func.with_attr("dlight.do_not_tensorize", True)
        return self.rule.apply(func, target, tunable)


def tunable_schedule(intrinsics: dict[int, str] | None = None, lanes: int = 16, registers: int = 32):
    """A MetaSchedule ``ScheduleFn`` body: tvmq's packed/depthwise schedules with sampled tiles.

    Raises for kernels the rules do not cover (MetaSchedule then records no design space).
    """
    packed, depthwise = PackedKernelRule(intrinsics, registers, lanes), DepthwiseRule(lanes)

    def schedule(sch):
        if not (packed.schedule(sch, tunable=True) or depthwise.schedule(sch, tunable=True)):
            raise ValueError("not a kernel tvmq tunes")
        return sch

    return schedule


def is_tunable(func) -> bool:
    """Whether ``func`` holds a kernel whose schedule has tunable tiles."""
    sch = s_tir.Schedule(func)
    return any(_find_block(sch, n) is not None for n in (CONV_BLOCK, MATMUL_BLOCK, FMA_CONV_BLOCK,
                                                          FMA_MATMUL_BLOCK, DEPTHWISE_BLOCK))


def default_rules(intrinsics: dict[int, str] | None = None, lanes: int = 16, registers: int = 32) -> list[ScheduleRule]:
    from tvm.s_tir.dlight import cpu

    rules: list[ScheduleRule] = [PackedKernelRule(intrinsics, registers, lanes)]

    # DLight's CPU Reduction rule covers softmax / layer norm style kernels.
    rules += [DepthwiseRule(lanes), ChannelReductionRule(lanes), cpu.Reduction(), InjectiveRule(lanes),
              FallbackRule(lanes)]
    return rules
