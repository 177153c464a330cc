"""Schedule primitives, and the rules for kernels of any shape (TVM's own as much as tvmq's).

The loop-level steps every tvmq rule is built from: the extent of a loop
(:func:`loop_extent`), the vector width that divides it (:func:`vector_width`), the blocks of
a kernel (:func:`find_block`), inlining an elementwise epilogue into the kernel's last block
(:func:`inline_epilogue`), and the parallel-rows / vectorized-innermost schedule of a spatial
block (:func:`spatial_schedule`, :func:`schedule_producers`). The rules here use nothing but
those, and recognise a kernel by the shape of its blocks, not by a name tvmq gave it:

* ``ChannelReductionRule``: reductions whose output's innermost axis is not reduced (NHWC pools,
  attention's activation x activation matmuls), accumulating whole vectors along it;
* ``InjectiveRule``: elementwise/injective kernels, fused loops split into parallel chunks of
  vectors;
* ``FallbackRule``: anything else gets its outer spatial loops parallelized and its innermost
  spatial loop vectorized where that is legal;
* ``NoInt8TensorCores``: DLight's GPU Matmul rule, not tensorizing 8-bit kernels (for
  :func:`tvmq.pipeline.lower` on CUDA).

:mod:`tvmq.targets.schedules` builds the rules for tvmq's packed kernels on the primitives and
puts these rules after them in :func:`~tvmq.targets.schedules.default_rules`.
"""

from __future__ import annotations

import math

import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule

from tvmq._compat import arith

__all__ = ["loop_extent", "extent_hint", "SYMBOLIC_EXTENT", "vector_width", "find_block", "spatial_size", "inline_epilogue", "schedule_producers",
           "spatial_schedule", "ChannelReductionRule", "InjectiveRule", "FallbackRule", "NoInt8TensorCores"]

_SPATIAL, _REDUCE = 0, 2
_PARALLEL_MIN = 2048  # elements below which threads cost more than they save
_FEW_LANES = 4  # innermost extents too short to vectorize
_PARALLEL_TASKS = 16  # parallel iterations enough to share among threads without a dynamic loop
SYMBOLIC_EXTENT = 256  # what a dynamic dimension counts as when the rules weigh sizes


def loop_extent(sch, loop) -> int | None:
    """Extent of ``loop`` as an int, or None when it is not a constant."""
    ext = sch.get(loop).extent
    return int(ext.value) if hasattr(ext, "value") else (int(ext) if isinstance(ext, int) else None)


def extent_hint(sch, loop) -> int:
    """A loop's extent; for a symbolic one (a dynamic dimension), its value with every variable
    at :data:`SYMBOLIC_EXTENT` (a fused ``8 * T * T`` loop counts as such, not as one dimension):
    what the rules weigh when they decide on threads and tile sizes."""
    extent = loop_extent(sch, loop)
    return extent if extent is not None else symbolic_value(sch.get(loop).extent)


def symbolic_value(expr) -> int:
    """A symbolic extent's value with every variable at :data:`SYMBOLIC_EXTENT`."""
    analyzer = arith.Analyzer()
    for var in tirx.analysis.undefined_vars(expr):
        analyzer.bind(var, SYMBOLIC_EXTENT)
    value = analyzer.simplify(expr)
    return max(1, int(value)) if isinstance(value, (int, tirx.IntImm)) else SYMBOLIC_EXTENT


def vector_width(n: int | None, lanes: int) -> int:
    """The largest power of two <= ``lanes`` dividing ``n`` (odd widths split badly in LLVM)."""
    width = 1
    while n and width * 2 <= lanes and n % (width * 2) == 0:
        width *= 2
    return width


def find_block(sch, name):
    """The block called ``name`` in ``sch``, or None."""
    try:
        return sch.get_sblock(name)
    except Exception:  # pylint: disable=broad-except
        return None


def _root_blocks(sch):
    root = sch.get_sblock("root") if find_block(sch, "root") is not None else None
    return list(sch.get_child_blocks(root)) if root is not None else []


def _is_spatial(sch, block) -> bool:
    return all(int(iv.iter_type) == _SPATIAL for iv in sch.get(block).iter_vars)


def spatial_size(sch, block) -> int:
    """Product of the extents of a block's spatial iterators."""
    size = 1
    for iv in sch.get(block).iter_vars:
        if int(iv.iter_type) == _SPATIAL:
            ext = iv.dom.extent
            size *= int(ext.value) if hasattr(ext, "value") else symbolic_value(ext)
    return size


def inline_epilogue(sch, main):
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


def schedule_producers(sch, main, lanes):
    """Pads and other spatial producers of ``main``: parallel over rows, vectors over channels."""
    blocks = _root_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    for b in blocks[: names.index(sch.get(main).name_hint)]:
        if _is_spatial(sch, b):
            spatial_schedule(sch, b, lanes)


def spatial_schedule(sch, block, lanes, ragged: bool = False):
    """Parallel outer loops, vectorized innermost loop (kept separate, as it is contiguous).

    A tensor of pixel rows whose channels are whole vectors (three loops or more, at least
    :data:`_PARALLEL_TASKS` rows before the last two) runs its rows in parallel, each row's
    columns in a loop of their own: fused into the parallel loop, every pixel divided its index by
    the width (the pad of YOLOX's 208 x 208 x 24 stem output: 58 -> 22 us; its other pads
    2-3x). A concat along the channels (``c < 24 ? a : b``) gets a vector width that divides its
    boundaries (:func:`_innermost_boundaries`), where one of at least 8 lanes does, so that no
    vector straddles one and ``VersionVectorTails`` gives every vector the select-free body
    (a 16-lane vector over channels 16..31 ran its select lane by lane): 104 x 104 x (24 + 24)
    bytes 31 -> 10 us, (40 + 56) 32 -> 22 us (AMD Zen 4 VNNI host, 2 threads).

    ``ragged``: an innermost extent of at least 4 vectors that no power of two divides (6625
    classes) is still split into full vectors, the last one predicated (``VersionVectorTails``
    gives the others a clean vector body); otherwise it gets the widest dividing vector."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    inner_ext = loop_extent(sch, inner) or 1
    total = math.prod(extent_hint(sch, l) for l in loops)  # elements (splitting keeps it)
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
    vec = vector_width(inner_ext, lanes)
    bounds = _innermost_boundaries(sch, block)
    aligned = vector_width(math.gcd(inner_ext, *bounds), lanes) if bounds else 0
    if aligned > _FEW_LANES:
        vec = aligned  # no vector straddles a boundary
    if ragged and vec < lanes and inner_ext >= 4 * lanes:
        vec = lanes
    if vec > 1:
        _, vi = sch.split(inner, [None, vec])
        sch.vectorize(vi)
    # whole rows per task where the channels are contiguous vectors (a gather of a few, as the
    # input transpose of a YOLOX Focus layer, ran slower so: 0.176 -> 0.215 ms)
    rows = loops[:-2] if len(loops) > 2 and vec >= 2 * _FEW_LANES and \
        math.prod(extent_hint(sch, l) for l in loops[:-2]) >= _PARALLEL_TASKS else []
    outer = sch.get_loops(block)[:-1]
    if outer and total >= _PARALLEL_MIN:
        keep = _parallel_prefix(sch, rows or outer[: max(1, len(outer) - 1)])
        fused = sch.fuse(*keep) if len(keep) > 1 else keep[0]
        sch.parallel(fused)


def _innermost_boundaries(sch, block) -> list[int]:
    """The indices of ``block``'s innermost (static) axis where a condition on it changes: a
    concat along that axis compares it with each input's offset. Empty for none."""
    node = sch.get(block)
    if not node.iter_vars or not isinstance(node.iter_vars[-1].dom.extent, tirx.IntImm):
        return []
    var, extent = node.iter_vars[-1].var, int(node.iter_vars[-1].dom.extent)
    found = set()
    # the first index at which each comparison of the axis with a constant changes its value
    after = {tirx.LT: 0, tirx.GE: 0, tirx.LE: 1, tirx.GT: 1}

    def visit(e):
        kind = type(e)
        if e.a.same_as(var) and isinstance(e.b, tirx.IntImm):
            found.add(int(e.b.value) + after[kind])
        elif e.b.same_as(var) and isinstance(e.a, tirx.IntImm):  # K < v changes where v < K + 1 does
            found.add(int(e.a.value) + 1 - after[kind])

    tvm_ffi.structural_walk(node.body, [(kind, visit) for kind in after])
    return sorted(b for b in found if 0 < b < extent)


def _parallel_prefix(sch, loops):
    """The leading ``loops`` to fuse into one parallel loop. A loop over a dynamic dimension
    fused with others makes every iteration divide by its symbolic extent (a 64-bit division
    per vector, which TVM cannot turn into a multiply as it does for a constant); where the
    loops before it already give :data:`_PARALLEL_TASKS` tasks, they alone run in parallel
    and the dynamic loop stays inside each task."""
    constant = 1
    for i, loop in enumerate(loops):
        extent = loop_extent(sch, loop)
        if extent is None:
            return loops[:i] if i and constant >= _PARALLEL_TASKS else loops
        constant *= extent
    return loops


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
        schedule_producers(sch, main, self.lanes)
        loops = sch.get_loops(main)
        spatial, reduce = loops[:n_spatial], loops[n_spatial:]
        extent = loop_extent(sch, spatial[-1]) or 0
        # a symbolic innermost extent (attention over a dynamic sequence): whole vectors and a
        # predicated last one, which VersionVectorTails gives a clean vector body
        vec = vector_width(extent, self.lanes) if extent else self.lanes
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
        for block in inline_epilogue(sch, main):
            sch.reverse_compute_at(block, outer, preserve_unit_loops=True)
            last = sch.get_loops(block)[-1]
            if loop_extent(sch, last) == width and width > 1:
                widen(last)
        total = 1
        for l in sch.get_loops(main):
            total *= extent_hint(sch, l)
        if total >= _PARALLEL_MIN and extent_hint(sch, outer) > 1:
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
                spatial_schedule(sch, b, self.lanes)
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
                    spatial_schedule(sch, b, self.lanes)
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
                if len(lead) >= 1 and math.prod(extent_hint(sch, l) for l in lead) > 1:
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
