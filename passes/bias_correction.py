"""Bias correction (Nagel et al., 2019): the mean output shift that quantizing weights causes.

Not a pass: numbers for the plan. Quantizing a layer's weights shifts the mean output of channel
``c`` by ``sum_k (W - W_q)[c, k] * E[x_k]``. :func:`tvmq.quantize.calibrate` (with
``QuantConfig(bias_correction=True)``; off by default) computes it with :func:`bias_corrections`
from the channel means of each int8 layer's input and stores it in the layer's
:class:`~tvmq.plan.LayerPlan`; :class:`~tvmq.passes.InsertQDQ` adds it to the layer's bias (or
adds a bias), which :class:`~tvmq.passes.FoldQDQ` then folds into the int32 accumulator bias.
"""

from __future__ import annotations

import numpy as np

from tvmq.qparams import QParams, quantize_weight

__all__ = ["bias_corrections"]


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
