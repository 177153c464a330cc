"""Conv1dToConv2d: a 1-D convolution as a 2-D one of height 1.

Runs in :func:`tvmq.prepare`, before calibration and layout conversion. TVM 0.27 has no CPU
schedule for ``conv1d`` and tvmq packs, tunes and quantizes ``conv2d`` only, so an audio model's
conv1d layers ran as naive loops (Silero VAD spent 7.2 of its 7.5 ms in four of them) and stayed
float under every plan. As ``[N, C, 1, W]`` by ``[O, C/g, 1, K]`` convolutions they are ordinary
conv2d layers: packed, vectorized, made int8 like any other.

    conv1d(x, w, stride s, padding (l, r), dilation d, groups g)
      = squeeze(conv2d(expand_dims(x, 2), expand_dims(w, 2),
                       strides (1, s), padding (0, l, 0, r), dilation (1, d), groups g), 2)
"""

from __future__ import annotations

import tvm
from tvm import relax

from .graph import out_dtype_attr, rewrite_calls

__all__ = ["Conv1dToConv2d"]


def _as_conv2d(mutator, call):
    a = call.attrs
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout)) != ("NCW", "OIW", "NCW"):
        return None
    data, weight = call.args
    left, right = (int(p) for p in a.padding)
    x = mutator.builder_.emit(relax.op.expand_dims(data, 2))
    w = mutator.builder_.emit(relax.op.expand_dims(weight, 2))
    y = mutator.builder_.emit(relax.op.nn.conv2d(x, w, strides=[1, int(a.strides[0])], padding=[0, left, 0, right],
                                                 dilation=[1, int(a.dilation[0])], groups=int(a.groups),
                                                 out_dtype=out_dtype_attr(a)))
    return relax.op.squeeze(y, [2])


@tvm.transform.module_pass(opt_level=0, name="Conv1dToConv2d")
class Conv1dToConv2d:
    """Rewrite every NCW/OIW ``conv1d`` as a height-1 ``conv2d`` between expand_dims and squeeze;
    other layouts are left alone."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return rewrite_calls(mod, "relax.nn.conv1d", _as_conv2d)
