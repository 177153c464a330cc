"""InsertQDQ: wrap the layers a plan marks int8 in quantize/dequantize pairs.

After this pass the module is a *fake-quantized* float program: it runs, and its numbers are
what the integer program will compute (up to accumulation order), which makes it the
reference :class:`FoldQDQ` is checked against.

For every int8 layer of the plan:

* each activation input gets ``dequantize(quantize(x))`` with the layer's input parameters.
  The pair is placed at the input's *root* (before any max-pool / reshape / transpose between
  the producer and the layer), so those ops later run on integers too;
* the weight becomes ``dequantize(const int8, per-channel scale, 0, axis)``;
* the output gets ``dequantize(quantize(y))`` when the plan gives output parameters, i.e. when
  an int8 layer reads it.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq.plan import QuantPlan
from tvmq.qparams import QParams, quantize_weight

from .patterns import FunctionGraph, find_layers, rebuild_call

__all__ = ["InsertQDQ"]


def qparams_args(qp: QParams):
    return relax.const(qp.scale, "float32"), relax.const(qp.zero_point, "int32")


@relax.expr_functor.mutator
class _Inserter(relax.PyExprMutator):
    def __init__(self, mod, func, plan: QuantPlan):
        super().__init__(mod)
        self.graph = FunctionGraph(func)
        self.anchors = {}
        self.outputs = {}
        self.corrections = {}
        for layer in find_layers(func, self.graph):
            lp = plan.get(layer.name)
            if lp is None or not lp.is_int8 or lp.kind != layer.kind:
                continue
            self.anchors[layer.chain.anchor] = (layer, lp)
            if lp.output is not None:
                self.outputs[layer.output] = lp.output
            if lp.bias_correction is not None and layer.kind != "add":
                key = layer.chain.bias_var if layer.chain.bias_var is not None else layer.chain.anchor
                self.corrections[key] = (layer, np.asarray(lp.bias_correction, np.float32))
        self.memo = {}

    def _emit_like(self, var, expr, suffix=""):
        """Emit ``expr`` as a variable of the same kind (dataflow or not) as ``var``."""
        name = f"{var.name}{suffix}" if hasattr(var, "name") else ""
        if isinstance(var, relax.DataflowVar) or not self.builder_.current_block_is_dataflow():
            return self.builder_.emit(expr, name)
        return self.builder_.emit_output(expr, name)

    def _fake_quant(self, expr, qp: QParams, like=None):
        scale, zp = qparams_args(qp)
        q = self.builder_.emit(relax.op.quantize(expr, scale, zp, axis=qp.axis, out_dtype=qp.dtype))
        dq = relax.op.dequantize(q, scale, zp, axis=qp.axis)
        return self.builder_.emit(dq) if like is None else self._emit_like(like, dq, "_dq")

    def _quantized_input(self, x, qp: QParams):
        key = (x, qp.key())
        if key in self.memo:
            return self.memo[key]
        root, path = self.graph.root(x)
        root_key = (root, qp.key())
        if root_key not in self.memo:
            self.memo[root_key] = self._fake_quant(self.visit_expr(root), qp)
        cur = self.memo[root_key]
        for var, call in path:
            visited = self.visit_expr(call)
            cur = self.builder_.emit(rebuild_call(visited, cur))
        self.memo[key] = cur
        return cur

    def visit_var_binding_(self, binding):
        var = binding.var
        if var in self.anchors:
            layer, lp = self.anchors[var]
            call = binding.value
            if layer.kind == "add":
                args = [self._quantized_input(x, qp) for x, qp in zip(layer.inputs, lp.inputs)]
            else:
                if lp.weight is not None:  # honour given parameters (a pre-quantized model's)
                    wqp = lp.weight
                    wq = wqp.quantize(layer.weight) if not wqp.per_channel or wqp.axis == layer.weight_axis else None
                if lp.weight is None or wq is None:
                    wq, wqp = quantize_weight(layer.weight, layer.weight_axis)
                scale, zp = qparams_args(wqp)
                weight = relax.op.dequantize(relax.const(wq, "int8"), scale, zp, axis=wqp.axis)
                args = [self._quantized_input(layer.inputs[0], lp.inputs[0]), self.builder_.emit(weight)]
            new = self._emit_like(var, relax.Call(call.op, args, call.attrs))
            self.set_var_remap(var, new)
        elif var in self.corrections and self.corrections[var][0].chain.bias_var is not None:
            layer, corr = self.corrections[var]  # the bias add: bias + correction
            chain = layer.chain
            shape = [1] * len(chain.out_shape)
            shape[chain.channel_axis] = -1
            bias = (chain.bias + corr).reshape(shape)
            self.set_var_remap(var, self._emit_like(var, relax.op.add(self.visit_expr(chain.anchor), relax.const(bias, "float32"))))
        else:
            super().visit_var_binding_(binding)
        if var in self.corrections and self.corrections[var][0].chain.bias_var is None:
            layer, corr = self.corrections[var]  # no bias to correct: add one
            shape = [1] * len(layer.chain.out_shape)
            shape[layer.chain.channel_axis] = -1
            self.set_var_remap(var, self._emit_like(var, relax.op.add(self.visit_expr(var), relax.const(corr.reshape(shape), "float32"))))
        if var in self.outputs:
            qp = self.outputs[var]
            dq = self._fake_quant(self.visit_expr(var), qp, var)
            self.memo[(var, qp.key())] = dq
            self.set_var_remap(var, dq)


@tvm.transform.module_pass(opt_level=0, name="InsertQDQ")
class InsertQDQ:
    """Insert quantize/dequantize pairs for the int8 layers of ``plan``.

    Parameters
    ----------
    plan : QuantPlan
        Layer name -> precision and tensor parameters (see :func:`tvmq.calibrate`).
        Layers the plan does not name, or names fp32, are left untouched.
    """

    def __init__(self, plan: QuantPlan):
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            inserter = _Inserter(mod, func, self.plan)
            if not inserter.anchors:
                continue
            new_func = inserter.visit_expr(func)
            updates[gv] = relax.analysis.remove_all_unused(new_func)
        if not updates:
            return mod
        mod = mod.clone()
        for gv, func in updates.items():
            mod[gv] = func
        return mod


def weight_qparams(weight: np.ndarray, axis: int) -> QParams:
    """Per-channel weight parameters InsertQDQ will use (for reports and manifests)."""
    return quantize_weight(weight, axis)[1]
