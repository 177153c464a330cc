"""UnrollLSTM: an LSTM's loop kernel as per-step Relax ops, for targets it was not written for.

:func:`tvmq.targets.recurrence.lstm_recurrence` is a CPU kernel (vector loops, a parallel loop
over chunks of hidden units). A GPU build cannot run it as it is; this pass, in
:func:`tvmq.pipeline.lower` for non-LLVM targets, replaces each call of it with what it computes
step by step (``take`` of the projected input, ``matmul`` with the recurrent weights unpacked
from their chunked layout, ``sigmoid``/``tanh`` and the cell update), which TVM's own schedules
cover on any target.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq._compat import constant_array, expr_type, is_constant, tir
from tvmq.targets.recurrence import LSTM_ATTR

from .graph import map_functions

__all__ = ["UnrollLSTM"]


@relax.expr_functor.mutator
class _Unroller(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod = mod

    def _loop_attrs(self, call):
        if call.op != tvm.ir.Op.get("relax.call_tir"):
            return None
        callee = self.mod[call.args[0]] if isinstance(call.args[0], tvm.ir.GlobalVar) else None
        if not isinstance(callee, tir.PrimFunc) or callee.attrs is None or LSTM_ATTR not in callee.attrs:
            return None
        return callee.attrs[LSTM_ATTR]

    def visit_call_(self, call):
        call = super().visit_call_(call)
        attrs = self._loop_attrs(call)
        if attrs is None:
            return call
        proj, packed, h, c = call.args[1].fields
        if not is_constant(packed):
            return call
        chunks, hidden, _, chunk = constant_array(packed).shape
        padded = chunks * chunk
        # packed[n, k, g, l] = R^T[k, g * padded + n * chunk + l]; the padded rows of h are 0
        r_t = np.zeros((padded, 4 * padded), np.float32)
        r_t[:hidden] = constant_array(packed).transpose(1, 2, 0, 3).reshape(hidden, 4 * padded)
        r_t = relax.const(r_t)
        steps = int(expr_type(proj).shape.values[0])
        emit = self.builder_.emit
        ys = [None] * steps
        order = range(steps - 1, -1, -1) if int(attrs["reverse"]) else range(steps)
        for t in order:
            gates = emit(relax.op.add(relax.op.take(proj, relax.const(t, "int64"), axis=0), relax.op.matmul(h, r_t)))
            i, o, f, cand = (relax.op.strided_slice(gates, [1], [g * padded], [(g + 1) * padded]) for g in range(4))
            c = emit(relax.op.add(relax.op.multiply(relax.op.sigmoid(f), c),
                                  relax.op.multiply(relax.op.sigmoid(i), relax.op.tanh(cand))))
            h = emit(relax.op.multiply(relax.op.sigmoid(o), relax.op.tanh(c)))
            ys[t] = relax.op.expand_dims(h, 0)
        y = relax.op.concat(ys, axis=0) if steps > 1 else ys[0]
        return relax.Tuple([emit(y), h, c])


@tvm.transform.module_pass(opt_level=0, name="UnrollLSTM")
class UnrollLSTM:
    """Calls of tvmq's LSTM loop kernel as per-step Relax ops (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        unroller = _Unroller(mod)
        mod = map_functions(mod, unroller.visit_expr, builder=unroller.builder_)
        return relax.transform.DeadCodeElimination()(mod)  # the loop kernels no call uses
