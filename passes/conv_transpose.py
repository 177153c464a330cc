"""ConvTransposeToConv: a transposed convolution whose kernel equals its stride, as a 1x1 conv.

Runs in :func:`tvmq.prepare`, before calibration and layout conversion. With kernel size equal to
the stride, no padding and no dilation (the 2x2 stride-2 upsampling of DB text detectors, U-Nets
and FPN heads), every output pixel receives exactly one input pixel:

    y[n, o, s*i + a, s*j + b] = sum_c x[n, c, i, j] * w[c, o, a, b]

so the layer is a 1x1 convolution to ``O*kh*kw`` channels followed by a depth-to-space
rearrangement (reshape, transpose, reshape). The 1x1 conv is an ordinary conv2d layer: packed,
vectorized and quantized like any other. TVM 0.27 has no schedule for ``conv2d_transpose`` on
CPU: PP-OCRv4's detector spent 114 of its 121 ms in two such layers.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvmq._compat import expr_type

from .graph import bound_constant, out_dtype_attr, rewrite_calls, static_shape

__all__ = ["ConvTransposeToConv"]


def _symbolic_shape(expr):
    ty = expr_type(expr)
    shape = getattr(ty, "shape", None)
    return list(shape.values) if shape is not None and hasattr(shape, "values") else None


def _as_conv(mutator, call):
    a = call.attrs
    data, weight = call.args
    w = bound_constant(mutator, weight)
    shape = static_shape(data) or _symbolic_shape(data)  # a dynamic page size stays symbolic
    if w is None or shape is None or w.ndim != 4:
        return None
    kh, kw = int(w.shape[2]), int(w.shape[3])
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout)) != ("NCHW", "IOHW", "NCHW") \
            or int(a.groups) != 1 or [int(s) for s in a.strides] != [kh, kw] \
            or any(int(p) for p in a.padding) or any(int(p) for p in a.output_padding) \
            or any(int(d) != 1 for d in a.dilation):
        return None
    c_in, c_out = int(w.shape[0]), int(w.shape[1])
    n, _, h, width = shape
    # W'[(o*kh + a)*kw + b, c, 0, 0] = w[c, o, a, b]
    w1 = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(c_out * kh * kw, c_in, 1, 1))
    out_dtype = out_dtype_attr(a) or str(w.dtype)
    z = mutator.builder_.emit(relax.op.nn.conv2d(data, relax.const(w1, str(w.dtype)), out_dtype=out_dtype))
    z = mutator.builder_.emit(relax.op.reshape(z, [n, c_out, kh, kw, h, width]))
    z = mutator.builder_.emit(relax.op.permute_dims(z, [0, 1, 4, 2, 5, 3]))
    return relax.op.reshape(z, [n, c_out, h * kh, width * kw])


@tvm.transform.module_pass(opt_level=0, name="ConvTransposeToConv")
class ConvTransposeToConv:
    """Rewrite stride == kernel transposed convolutions (NCHW, constant weights) as 1x1 conv2d +
    depth-to-space; every other transposed convolution is left alone."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return rewrite_calls(mod, "relax.nn.conv2d_transpose", _as_conv)
