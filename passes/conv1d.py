"""Conv1dToConv2d: a 1-D convolution as a 2-D one of height 1.

Runs in :func:`tvmq.prepare`, before calibration and layout conversion. TVM 0.27 has no CPU
schedule for ``conv1d`` and tvmq packs, tunes and quantizes ``conv2d`` only, so an audio model's
conv1d layers ran as naive loops (Silero VAD spent 7.2 of its 7.5 ms in four of them) and stayed
float under every plan. As ``[N, C, 1, W]`` by ``[O, C/g, 1, K]`` convolutions they are ordinary
conv2d layers: packed, vectorized, made int8 like any other.

    conv1d(x, w, stride s, padding (l, r), dilation d, groups g)
      = squeeze(conv2d(expand_dims(x, 2), expand_dims(w, 2),
                       strides (1, s), padding (0, l, 0, r), dilation (1, d), groups g), 2)

A conv1d over few input channels whose kernel is a whole number of strides (an STFT as a conv:
Silero VAD's 258 filters of 256 taps at stride 128 over one channel) first becomes a stride-1
conv over the stride's phases as channels (space to depth):

    x [N, C, L] -> [N, C*s, L/s] (x'[n, c*s + p, t] = x[n, c, t*s + p]),
    w [O, C, m*s] -> [O, C*s, m] (w'[o, c*s + p, j] = w[o, c, j*s + p])

so its reduction runs over ``C*s`` channels, which the packed float and int8 kernels vectorize,
instead of over one channel padded to a vector (Silero VAD's STFT conv, 16 x 258 x 5 outputs of 256
taps: int8 78 -> 22 us in the model; its float kernel was as fast either way, 64 us).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .graph import out_dtype_attr, rewrite_calls, static_shape

__all__ = ["Conv1dToConv2d"]


# Space to depth where the input has fewer channels than this (a vector's worth of reduction)
_FEW_CHANNELS = 16


def _space_to_depth(bb, data, weight, attrs):
    """``(x', w')`` for the stride-1 conv over the stride's phases (module docstring), or None
    where the conv is not one that pays for it (static shapes, groups 1, dilation 1, a kernel of
    whole strides, few input channels)."""
    stride, dilation, groups = int(attrs.strides[0]), int(attrs.dilation[0]), int(attrs.groups)
    shape, wshape = static_shape(data), static_shape(weight)
    if stride < 2 or dilation != 1 or groups != 1 or shape is None or wshape is None:
        return None
    n, c, length = shape
    out_c, _, k = wshape
    if k % stride or c >= _FEW_CHANNELS:
        return None
    left, right = (int(p) for p in attrs.padding)
    if left or right:
        data = bb.emit(relax.op.nn.pad(data, [0, 0, 0, 0, left, right]))
        length += left + right
    if length < k:
        return None
    blocks = (length - k) // stride + k // stride  # the phases' length the outputs read
    if blocks * stride < length:
        data = bb.emit(relax.op.strided_slice(data, [2], [0], [blocks * stride]))
    x = bb.emit(relax.op.reshape(relax.op.permute_dims(relax.op.reshape(data, [n, c, blocks, stride]), [0, 1, 3, 2]),
                                 [n, c * stride, blocks]))
    w = bb.emit(relax.op.reshape(relax.op.permute_dims(relax.op.reshape(weight, [out_c, c, k // stride, stride]),
                                                       [0, 1, 3, 2]), [out_c, c * stride, k // stride]))
    return x, w


def _as_conv2d(mutator, call):
    a = call.attrs
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout)) != ("NCW", "OIW", "NCW"):
        return None
    data, weight = call.args
    left, right = (int(p) for p in a.padding)
    stride = int(a.strides[0])
    phases = _space_to_depth(mutator.builder_, data, weight, a)
    if phases is not None:
        (data, weight), left, right, stride = phases, 0, 0, 1
    x = mutator.builder_.emit(relax.op.expand_dims(data, 2))
    w = mutator.builder_.emit(relax.op.expand_dims(weight, 2))
    y = mutator.builder_.emit(relax.op.nn.conv2d(x, w, strides=[1, stride], padding=[0, left, 0, right],
                                                 dilation=[1, int(a.dilation[0])], groups=int(a.groups),
                                                 out_dtype=out_dtype_attr(a)))
    return relax.op.squeeze(y, [2])


@tvm.transform.module_pass(opt_level=0, name="Conv1dToConv2d")
class Conv1dToConv2d:
    """Rewrite every NCW/OIW ``conv1d`` as a height-1 ``conv2d`` between expand_dims and squeeze;
    other layouts are left alone."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return rewrite_calls(mod, "relax.nn.conv1d", _as_conv2d)
