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

from .patterns import call_op, rewrite_functions

__all__ = ["Conv1dToConv2d"]


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.rewritten = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call_op(call) != "relax.nn.conv1d":
            return call
        a = call.attrs
        if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout)) != ("NCW", "OIW", "NCW"):
            return call
        data, weight = call.args
        left, right = (int(p) for p in a.padding)
        out_dtype = str(a.out_dtype) if str(a.out_dtype) not in ("", "void", "None") else None
        x = self.builder_.emit(relax.op.expand_dims(data, 2))
        w = self.builder_.emit(relax.op.expand_dims(weight, 2))
        y = self.builder_.emit(relax.op.nn.conv2d(x, w, strides=[1, int(a.strides[0])], padding=[0, left, 0, right],
                                                  dilation=[1, int(a.dilation[0])], groups=int(a.groups),
                                                  out_dtype=out_dtype))
        self.rewritten += 1
        return relax.op.squeeze(y, [2])


@tvm.transform.module_pass(opt_level=0, name="Conv1dToConv2d")
class Conv1dToConv2d:
    """Rewrite every NCW/OIW ``conv1d`` as a height-1 ``conv2d`` between expand_dims and squeeze;
    other layouts are left alone."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        new = rewrite_functions(rewriter, mod, remove_unused=True)
        return new if rewriter.rewritten else mod
