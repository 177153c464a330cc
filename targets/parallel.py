"""Parallel loops over a dynamic extent: threads only where the call brings work for them.

tvmq's schedules run a loop nest in threads when it holds at least ``_PARALLEL_MIN`` elements
(below that, waking the thread pool costs more than it saves: about 1 us hot, 3.5 us less so,
for a loop of two iterations). On a static shape the rule decides at compile time; on a dynamic
one (a text line of any width) it cannot, and every loop over the width went parallel, the
small pads, epilogues and transposes of a short line too.

:class:`SerialWhenSmall` versions each parallel loop whose extent is symbolic into ``if <the
nest's elements> >= _PARALLEL_MIN: the parallel loop, else: the same loop, serial``. Same
arithmetic either way (only the loop kind differs), so the results are bit-equal. Tensorized
loops are left parallel. Measured on PP-OCRv4 rec (dynamic/static, one run): 1.15 -> 1.12x
at width 320, 1.17 -> 1.13x at 96, 1.35 -> 1.33x at 48 (the gap there is elsewhere).

A parallel loop of a fixed count over symbolic work inside (the 8 heads of the recogniser's
attention over the line's columns, copied out of the QKV tensor: 720 floats at width 48, 2.2 us
in threads for 0.3 us in a static build) is versioned the same way; reductions keep what their
schedule chose. Every loop of the serial copy gets a variable of its own (the branch condition
bounds them differently). PP-OCRv4 rec, A/B in one process: 1.128 / 1.142 -> 1.112 / 1.123x
static at width 32, 1.169 / 1.156 -> 1.154 / 1.133x at 48, 1.049 -> 1.032x at 640; bit-equal.
"""

from __future__ import annotations

import tvm
import tvm_ffi

from .generic_schedules import _PARALLEL_MIN
from .tails import substitute

__all__ = ["SerialWhenSmall", "serial_when_small"]


def _elements(stmt, symbolic: bool = False):
    """Iterations of the innermost statements under ``stmt`` (constant loop extents only), or
    None when a loop inside has a symbolic extent or a block is tensorized. ``symbolic``: a
    symbolic extent counts too (the result is then an expression); None for a tensorized or
    reduction block or a branch whose sides differ symbolically."""
    from tvmq._compat import s_tir
    from tvmq._compat import tir as tirx

    if isinstance(stmt, tirx.For):
        inner = _elements(stmt.body, symbolic)
        if inner is None:
            return None
        if isinstance(stmt.extent, tirx.IntImm):
            return int(stmt.extent) * inner
        return stmt.extent * inner if symbolic else None
    if isinstance(stmt, tirx.SeqStmt):
        parts = [_elements(s, symbolic) for s in stmt.seq]
        return None if any(p is None for p in parts) else sum(parts)
    if isinstance(stmt, s_tir.SBlockRealize):
        # a tensorized block's match_buffer views cannot be bound twice (in two copies of a loop);
        # its loops are big enough for threads anyway (measured: no gain at width 48)
        reduction = any(int(iv.iter_type) == int(tirx.IterVar.CommReduce) for iv in stmt.block.iter_vars)
        if len(stmt.block.match_buffers) or (symbolic and reduction):
            return None  # ... and a reduction (a conv, a matmul) has its threads decided by its schedule
        return _elements(stmt.block.body, symbolic)
    if isinstance(stmt, tirx.IfThenElse):
        parts = [_elements(stmt.then_case, symbolic)]
        if stmt.else_case is not None:
            parts.append(_elements(stmt.else_case, symbolic))
        return None if any(p is None or not isinstance(p, int) for p in parts) else max(parts)
    body = getattr(stmt, "body", None)
    return _elements(body, symbolic) if body is not None and not isinstance(stmt, s_tir.SBlock) else 1


def _smallest(extent) -> int:
    """``extent`` with its dynamic dimensions at 1 (an extent grows with them): a serial copy for
    sizes it never takes would be dead code, in which TVM's simplifier proves a divisor zero and
    stops the build ("Find divide by zero")."""
    from tvmq._compat import arith
    from tvmq._compat import tir as tirx

    value = extent
    for var in tirx.analysis.undefined_vars(extent):
        value = substitute(value, var, tirx.IntImm(str(var.ty), 1))
    value = arith.Analyzer().simplify(value)
    return int(value) if isinstance(value, tirx.IntImm) else 0


def _fresh_loop_vars(stmt):
    """``stmt`` with every loop under it over a variable of its own (a copy of a loop nest)."""
    from tvmq._compat import tir as tirx

    def on_for(loop, mutator):
        body = mutator.default_mutate(loop).body
        var = tirx.Var(loop.loop_var.name + "_serial", str(loop.loop_var.ty))
        return tirx.For(var, loop.min, loop.extent, loop.kind, substitute(body, loop.loop_var, var),
                        loop.thread_binding, loop.annotations)

    return tvm_ffi.structural_mutate(stmt, [(tirx.For, on_for)])


def serial_when_small(func, minimum: int = _PARALLEL_MIN):
    """``func`` with each parallel loop over a symbolic extent versioned on its size; the same
    object when it has none."""
    from tvmq._compat import tir as tirx

    changed = []

    def on_for(loop, mutator):
        if loop.kind != tirx.ForKind.PARALLEL:
            return mutator.default_mutate(loop)
        if isinstance(loop.extent, tirx.IntImm):
            # a fixed count of iterations over symbolic ones (a row per attention head, the
            # columns of a text line): threads only when the nest is big enough, as above
            inner = _elements(loop.body, symbolic=True)
            if inner is None or isinstance(inner, int):
                return mutator.default_mutate(loop)  # decided when it was scheduled
            if _smallest(loop.extent * inner) >= minimum:
                return loop
        else:
            inner = _elements(loop.body)
            if inner is None or inner >= minimum or _smallest(loop.extent) * inner >= minimum:
                return loop  # each iteration is worth a thread, or the extent is never small enough
        # variables of its own: the condition bounds the serial loops' extents, and TVM's analyzer
        # refuses one variable bound two ways
        serial = _fresh_loop_vars(tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body,
                                           loop.thread_binding, loop.annotations))
        changed.append(loop)
        return tirx.IfThenElse(loop.extent * inner >= minimum, loop, serial)

    body = tvm_ffi.structural_mutate(func.body, [(tirx.For, on_for)])
    return func.with_body(body) if changed else func


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="SerialWhenSmall")
class SerialWhenSmall:
    """Apply :func:`serial_when_small` to every PrimFunc of a module (after scheduling)."""

    def transform_function(self, func, mod, ctx):
        return serial_when_small(func)
