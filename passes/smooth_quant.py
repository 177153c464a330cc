"""SmoothQuant (Xiao et al., 2023): migrate matmul activation outliers into the weights.

Runs in :func:`tvmq.quantize.smooth`, after :func:`tvmq.prepare` and before calibration, when
``QuantConfig(smoothquant=alpha)`` asks for it (off by default: a model that does not need it
can lose accuracy). For a matmul ``x @ W`` whose input has outlier channels, input channel
``k`` is divided by ``s_k = max|x_k|^a / max|W_k|^(1-a)`` and weight row ``k`` multiplied by
it. The product is unchanged; the activation range the per-tensor scale must cover shrinks, and
the weights (per output channel) absorb it. :func:`smoothing_factors` computes ``s`` from the
calibration statistics; :class:`SmoothQuant` rewrites the layers.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .graph import FunctionGraph, rebind, static_shape
from .layers import find_layers

__all__ = ["SmoothQuant", "smoothing_factors"]


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
        rebind(self, binding.var, relax.Call(call.op, [scaled, relax.const(w, "float32")], call.attrs))


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
