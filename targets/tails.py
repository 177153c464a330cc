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
        realize = loop.body
        if loop.kind != tirx.ForKind.VECTORIZED or not isinstance(realize, s_tir.SBlockRealize):
            return loop
        pred = realize.predicate
        if not isinstance(pred, tirx.LT):
            return loop
        v = loop.loop_var
        step = analyzer.simplify(substitute(pred.a, v, v + 1) - pred.a)
        if not (isinstance(step, tirx.IntImm) and step.value > 0):
            return loop  # not increasing with the lane: "last lane inside" says nothing of the others
        if not analyzer.can_prove_equal(substitute(pred.b, v, v + 1), pred.b):
            return loop
        every_lane = tirx.LT(substitute(pred.a, v, loop.min + loop.extent - 1), pred.b)
        clean = tirx.For(v, loop.min, loop.extent, loop.kind,
                         s_tir.SBlockRealize(realize.iter_values, tirx.const(True, "bool"), realize.block),
                         loop.thread_binding, loop.annotations)
        changed.append(loop)
        return tirx.IfThenElse(every_lane, clean, loop)

    body = tvm_ffi.structural_mutate(func.body, [(tirx.For, on_for)])
    return func.with_body(body) if changed else func


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="VersionVectorTails")
class VersionVectorTails:
    """Apply :func:`version_vector_tails` to every PrimFunc of a module (after scheduling)."""

    def transform_function(self, func, mod, ctx):
        return version_vector_tails(func)
