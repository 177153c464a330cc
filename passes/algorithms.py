"""Algorithms that rescue hard models: SmoothQuant, bias correction, weight-only quantization.

All are off by default (``QuantConfig`` switches them on), as each can also cost accuracy on a
model that does not need it.

* :class:`SmoothQuant` (Xiao et al., 2023): for a matmul ``x @ W`` whose input has outlier
  channels, divide input channel ``k`` by ``s_k = max|x_k|^a / max|W_k|^(1-a)`` and multiply
  weight row ``k`` by it. The product is unchanged; the activation range the per-tensor scale
  must cover shrinks, and the weights (per output channel) absorb it.
* bias correction (Nagel et al., 2019): quantizing weights shifts the mean output of channel
  ``c`` by ``sum_k (W - W_q)[c, k] * E[x_k]``; the correction adds it back to the bias. Computed in
  :func:`bias_corrections`, applied by :class:`~tvmq.passes.InsertQDQ` from the plan.
* :class:`WeightOnly`: float matmul layers keep float activations and arithmetic but store their
  weights as int8 (per output channel) or int4 (per group of input rows, two per byte),
  dequantized inside the kernel. For matmul-heavy models where memory, not compute, is the limit.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te

from tvmq.qparams import QParams, quantize_weight

from .patterns import FunctionGraph, evaluate_constant, find_layers, static_shape

__all__ = ["SmoothQuant", "smoothing_factors", "bias_corrections", "WeightOnly", "WEIGHT_ONLY_BLOCK"]

WEIGHT_ONLY_BLOCK = "tvmq_weight_only_matmul"


def smoothing_factors(x_absmax: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """Per input channel ``s_k = max|x_k|^alpha / max|W_k|^(1-alpha)`` for ``w`` shaped [K, N]."""
    w_absmax = np.abs(w).max(axis=1)
    s = np.power(np.maximum(x_absmax, 1e-5), alpha) / np.power(np.maximum(w_absmax, 1e-5), 1 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


@relax.expr_functor.mutator
class _Smoother(relax.PyExprMutator):
    def __init__(self, mod, targets):
        super().__init__(mod)
        self.targets = targets  # anchor var -> (smoothing factors, smoothed weight)

    def visit_var_binding_(self, binding):
        if binding.var not in self.targets:
            return super().visit_var_binding_(binding)
        s, w = self.targets[binding.var]
        call = binding.value
        x = self.visit_expr(call.args[0])
        shape = [1] * (len(static_shape(call.args[0])) - 1) + [-1]
        scaled = self.builder_.emit(relax.op.multiply(x, relax.const((1.0 / s).reshape(shape), "float32")))
        new = self.builder_.emit(relax.Call(call.op, [scaled, relax.const(w, "float32")], call.attrs), binding.var.name)
        self.set_var_remap(binding.var, new)


@tvm.transform.module_pass(opt_level=0, name="SmoothQuant")
class SmoothQuant:
    """Migrate activation outliers of the named matmul layers into their weights.

    Parameters
    ----------
    factors : dict
        ``{layer name: per-input-channel factors}`` (see :func:`smoothing_factors`).
    """

    def __init__(self, factors: dict[str, np.ndarray]):
        self.factors = factors

    def transform_module(self, mod, ctx):
        func = mod["main"]
        graph = FunctionGraph(func)
        targets = {}
        for layer in find_layers(func, graph):
            if layer.kind == "matmul" and layer.name in self.factors:
                s = np.asarray(self.factors[layer.name], np.float32)
                targets[layer.chain.anchor] = (s, (layer.weight * s[:, None]).astype(np.float32))
        if not targets:
            return mod
        mod = mod.clone()
        mod["main"] = _Smoother(mod, targets).visit_expr(func)
        return mod


def bias_corrections(layer, weight_qp: QParams | None, input_mean: np.ndarray) -> np.ndarray:
    """Per output channel, the mean output shift that quantizing ``layer``'s weights causes."""
    w = layer.weight.astype(np.float64)
    if weight_qp is not None:
        w_hat = weight_qp.dequantize(weight_qp.quantize(layer.weight)).astype(np.float64)
    else:
        q, qp = quantize_weight(layer.weight, layer.weight_axis)
        w_hat = qp.dequantize(q).astype(np.float64)
    delta = w - w_hat
    mean = np.asarray(input_mean, np.float64)
    if layer.kind == "matmul":  # [K, N]
        return (mean @ delta).astype(np.float32)
    # conv, OHWI (NHWC graph) or OIHW: sum the taps, then contract input channels
    layout = str(layer.chain.call.attrs.kernel_layout)
    per_in = delta.sum(axis=(1, 2)) if layout == "OHWI" else delta.sum(axis=(2, 3))
    groups = int(layer.chain.call.attrs.groups)
    if groups == 1:
        return (per_in @ mean).astype(np.float32)
    # grouped / depthwise: output channel c reads its own group's input channels
    cout, cin_g = per_in.shape
    out = np.empty(cout)
    per_group = cout // groups
    for c in range(cout):
        g = c // per_group
        out[c] = per_in[c] @ mean[g * cin_g : (g + 1) * cin_g]
    return out.astype(np.float32)


# ----------------------------------------------------------------------------- weight-only
def _wo_int8_compute(out_features):
    def compute(x, wq, scale):
        k = te.reduce_axis((0, wq.shape[0]), "k")
        return te.compute(
            (*x.shape[:-1], out_features),
            lambda *i: te.sum(x[(*i[:-1], k)] * (wq[k, i[-1]].astype("float32") * scale[i[-1]]), axis=[k]),
            name=WEIGHT_ONLY_BLOCK,
        )

    return compute


def _wo_int4_compute(out_features, group):
    def compute(x, packed, scale):
        k = te.reduce_axis((0, packed.shape[0]), "k")

        def weight(kk, n):
            byte = packed[kk, n // 2].astype("int32")
            nibble = te.if_then_else(n % 2 == 0, byte & 15, (byte >> 4) & 15)
            return (nibble - 8).astype("float32") * scale[kk // group, n]

        return te.compute(
            (*x.shape[:-1], out_features),
            lambda *i: te.sum(x[(*i[:-1], k)] * weight(k, i[-1]), axis=[k]),
            name=WEIGHT_ONLY_BLOCK,
        )

    return compute


def pack_int4(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """``[K, N]`` float -> (uint8 ``[K, ceil(N/2)]`` two nibbles a byte, scales ``[ceil(K/g), N]``).

    Symmetric per group of ``group`` input rows per output column, values in [-7, 7] stored
    with an offset of 8.
    """
    k, n = w.shape
    groups = -(-k // group)
    padded = np.zeros((groups * group, n), np.float32)
    padded[:k] = w
    blocks = padded.reshape(groups, group, n)
    scale = np.abs(blocks).max(axis=1) / 7.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.round(blocks / scale[:, None, :]), -7, 7).astype(np.int32).reshape(groups * group, n)[:k] + 8
    if n % 2:
        q = np.concatenate([q, np.full((k, 1), 8, np.int32)], axis=1)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale


def unpack_int4(packed: np.ndarray, scale: np.ndarray, n: int, group: int) -> np.ndarray:
    """The float weights ``pack_int4`` stores (for tests and size reports)."""
    lo, hi = (packed & 15).astype(np.int32) - 8, (packed >> 4).astype(np.int32) - 8
    q = np.empty((packed.shape[0], packed.shape[1] * 2), np.int32)
    q[:, 0::2], q[:, 1::2] = lo, hi
    q = q[:, :n]
    rows = np.arange(q.shape[0]) // group
    return (q * scale[rows]).astype(np.float32)


@relax.expr_functor.mutator
class _WeightOnly(relax.PyExprMutator):
    def __init__(self, mod, targets, bits, group):
        super().__init__(mod)
        self.targets, self.bits, self.group = targets, bits, group

    def visit_var_binding_(self, binding):
        w = self.targets.get(binding.var)
        if w is None:
            return super().visit_var_binding_(binding)
        x = self.visit_expr(binding.value.args[0])
        n = w.shape[1]
        if self.bits == 8:
            q, qp = quantize_weight(w, 1)
            args = [relax.const(q, "int8"), relax.const(qp.scale, "float32")]
            compute = _wo_int8_compute(n)
        else:
            packed, scale = pack_int4(w, self.group)
            args = [relax.const(packed, "uint8"), relax.const(scale, "float32")]
            compute = _wo_int4_compute(n, self.group)
        call = self.builder_.call_te(compute, x, *args, primfunc_name_hint=f"tvmq_weight_only_int{self.bits}")
        new = self.builder_.emit(call, binding.var.name)
        self.set_var_remap(binding.var, new)


@tvm.transform.module_pass(opt_level=0, name="WeightOnly")
class WeightOnly:
    """Store float matmul weights as int8 (per channel) or int4 (per group); compute in float.

    Parameters
    ----------
    bits : int
        8 or 4.
    group : int
        Input rows per int4 scale.
    skip : set of str
        Layer names to leave alone (e.g. the ones already quantized to int8).
    """

    def __init__(self, bits: int = 8, group: int = 32, skip=()):
        if bits not in (8, 4):
            raise ValueError(f"weight-only quantization takes 8 or 4 bits, not {bits}")
        self.bits, self.group, self.skip = bits, group, set(skip)

    def transform_module(self, mod, ctx):
        func = mod["main"]
        graph = FunctionGraph(func)
        targets = {
            layer.chain.anchor: layer.weight
            for layer in find_layers(func, graph)
            if layer.kind == "matmul" and layer.name not in self.skip
        }
        if not targets:
            return mod
        mutator = _WeightOnly(mod, targets, self.bits, self.group)
        new = mutator.visit_expr(func)
        mutator.builder_.update_func(mod.get_global_var("main"), relax.analysis.remove_all_unused(new))
        return mutator.builder_.get()
