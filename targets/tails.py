"""Vector loops with a ragged last iteration: a clean vector body wherever every lane is inside.

A kernel whose channel count is not a multiple of the vector width computes its epilogue per
tile with a block predicate (``T.where(c < channels)``) inside the vectorized loop. TVM 0.27
cannot vectorize a loop whose lanes disagree on a condition, so it scalarizes the loop for
*every* tile, not just the last one. PP-OCR's recogniser ends in a matmul to 6625 classes
(an odd number): its int8 kernel spent 92 us, most of it in the scalar epilogue.

:class:`VersionVectorTails` rewrites each such loop into ``if <the last lane is inside>: the
loop without the predicate, else: the loop as it was``. The condition is uniform over the
lanes, so the first branch vectorizes; only the tiles that straddle the edge run the scalar
code. Same values, bit for bit (tested); the head matmul takes 39 us instead of 92.

Loops handled: ``for v in vectorized(n)`` whose body is one block realize with a predicate
``a(v) < b`` where ``a`` increases with ``v`` and ``b`` does not depend on it (what
``reverse_compute_at`` and imperfect ``split`` produce). TVM's own ``loop_partition``
schedule primitive, which would express this, produces a broken function in 0.27.

A select whose condition depends on the lane (``if_then_else(96 <= c, a[c - 96], b[c])``: a
concatenation along channels, what every NHWC feature pyramid does) scalarizes its loop the same
way, though the boundary (96) usually falls between vectors. :class:`VersionVectorTails` also
versions such a loop: where the condition holds at both the first and the last lane (it is a
comparison of an affine function of the lane, so it then holds at every lane) the loop takes the
first branch, where it fails at both the second, and only a vector that straddles the boundary
runs the select. YOLOX's upsample + concat + quantize kernel at 52x52x192: 163 -> 53 us (VNNI
host, 2 threads); its plain channel concatenations 21-34 -> 2-14 us.
"""

from __future__ import annotations

import tvm
import tvm_ffi

__all__ = ["VersionVectorTails", "version_vector_tails"]


def substitute(expr, var, value):
    """``expr`` (an expression or statement) with ``var`` replaced by ``value``."""
    from tvmq._compat import tir as tirx

    return tvm_ffi.structural_mutate(expr, [(tirx.Var, lambda x, _: value if x.same_as(var) else x)])


def version_vector_tails(func):
    """``func`` (a scheduled PrimFunc) with each predicated vector loop versioned; the same
    object when it has none."""
    from tvmq._compat import arith, s_tir
    from tvmq._compat import tir as tirx

    analyzer = arith.Analyzer()
    changed = []

    def on_for(loop, mutator):
        loop = mutator.default_mutate(loop)
        realize = _vector_realize(loop)
        if realize is None or not isinstance(realize.predicate, tirx.LT):
            return loop
        pred, v = realize.predicate, loop.loop_var
        step = _lane_step(pred.a, v, analyzer)
        if step is None or step <= 0:
            return loop  # not increasing with the lane: "last lane inside" says nothing of the others
        if not analyzer.can_prove_equal(substitute(pred.b, v, v + 1), pred.b):
            return loop
        every_lane = tirx.LT(substitute(pred.a, v, loop.min + loop.extent - 1), pred.b)
        clean = _with_realize(loop, s_tir.SBlockRealize(realize.iter_values, tirx.const(True, "bool"), realize.block))
        changed.append(loop)
        return tirx.IfThenElse(every_lane, clean, loop)

    def on_vector_loop(loop, mutator):
        loop = on_for(loop, mutator)
        return _version_selects(loop, analyzer, changed) if isinstance(loop, tirx.For) else loop

    body = tvm_ffi.structural_mutate(func.body, [(tirx.For, on_vector_loop)])
    return func.with_body(body) if changed else func


# Selects per vector loop versioned at most (each doubles the loop's code).
_MAX_SELECTS = 4


def _version_selects(loop, analyzer, changed, depth: int = 0):
    """``loop`` (vectorized, one block realize) versioned on its first lane-dependent select: the
    loop with the select's first branch where the condition holds at every lane, with its second
    where it holds at none, else ``loop`` itself; the branch loops are versioned in turn."""
    from tvmq._compat import s_tir
    from tvmq._compat import tir as tirx

    realize = _vector_realize(loop)
    if depth >= _MAX_SELECTS or realize is None:
        return loop
    block, v = realize.block, loop.loop_var
    bindings = dict(zip((iv.var for iv in block.iter_vars), realize.iter_values))
    selects = []

    def on_call(call):
        if getattr(call.op, "name", "") == "prim.if_then_else" and not selects:
            selects.append(call)

    tvm_ffi.structural_walk(block.body, [(tvm.ir.expr.Call, on_call)])
    if not selects:
        return loop
    select = selects[0]
    cond = select.args[0]
    for var, value in bindings.items():
        cond = substitute(cond, var, value)
    if not isinstance(cond, (tirx.LT, tirx.LE, tirx.GT, tirx.GE)):
        return loop
    if not _lane_step(cond.a - cond.b, v, analyzer):
        return loop  # not affine in the lane, or uniform already (TVM vectorizes a uniform select)
    first, last = (analyzer.simplify(substitute(cond, v, loop.min + i)) for i in (0, loop.extent - 1))

    def branch(value):
        body = tvm_ffi.structural_mutate(block.body, [(tvm.ir.expr.Call, lambda c, m: value if c.same_as(select) else m.default_mutate(c))])
        new = s_tir.SBlockRealize(realize.iter_values, realize.predicate, _with_body(block, body))
        return _version_selects(_with_realize(loop, new), analyzer, changed, depth + 1)

    changed.append(loop)
    return tirx.IfThenElse(tirx.And(first, last), branch(select.args[1]),
                           tirx.IfThenElse(tirx.And(tirx.Not(first), tirx.Not(last)), branch(select.args[2]), loop))


def _vector_realize(loop):
    """The block realize a vectorized ``loop`` holds as its whole body, or None."""
    from tvmq._compat import s_tir
    from tvmq._compat import tir as tirx

    if loop.kind != tirx.ForKind.VECTORIZED or not isinstance(loop.body, s_tir.SBlockRealize):
        return None
    return loop.body


def _lane_step(expr, v, analyzer) -> int | None:
    """How much ``expr`` changes from lane ``v`` to the next, where that is a constant."""
    from tvmq._compat import tir as tirx

    step = analyzer.simplify(substitute(expr, v, v + 1) - expr)
    return step.value if isinstance(step, tirx.IntImm) else None


def _with_realize(loop, realize):
    """``loop`` with ``realize`` as its body."""
    from tvmq._compat import tir as tirx

    return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, realize, loop.thread_binding, loop.annotations)


def _with_body(block, body):
    """``block`` with ``body`` (0.27's SBlock has no ``with_body``)."""
    from tvmq._compat import s_tir

    return s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, body, block.init,
                        block.alloc_buffers, block.match_buffers, block.annotations)


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="VersionVectorTails")
class VersionVectorTails:
    """Apply :func:`version_vector_tails` to every PrimFunc of a module (after scheduling)."""

    def transform_function(self, func, mod, ctx):
        return version_vector_tails(func)
