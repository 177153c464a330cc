"""WeightOnly: float matmuls with their weights stored as int8 or int4, computed in float.

Runs in :func:`tvmq.quantize.finish`, after InsertQDQ and FoldQDQ (:func:`tvmq.quantize_pipeline`)
and before the lowering passes (:func:`tvmq.pipeline.relax_passes`), when
``QuantConfig(weight_only="int8" | "int4")`` asks for it (off by default). The float matmul
layers left after quantization keep float activations and arithmetic but store their weights
as int8 (per output channel) or int4 (per group of input rows, two per byte), dequantized inside
the kernel: for matmul-heavy models where memory, not compute, is the limit.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te

from tvmq.qparams import quantize_weight
from tvmq.targets.kernel_names import WEIGHT_ONLY_BLOCK, WEIGHT_ONLY_FUNC

from .graph import FunctionGraph, rebind
from .layers import find_layers

__all__ = ["WeightOnly", "pack_int4", "unpack_int4", "WEIGHT_ONLY_BLOCK"]


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
        call = self.builder_.call_te(compute, x, *args, primfunc_name_hint=WEIGHT_ONLY_FUNC.format(bits=self.bits))
        rebind(self, binding.var, call)


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
