"""SeparableMaxPool: a KH x KW max-pool becomes a 1 x KW pool and then a KH x 1 one.

Runs in :func:`tvmq.pipeline.relax_passes` (CPU targets), before legalization. The largest value of
a window is the largest of its rows' largest values, so a pool over ``KH * KW`` taps per output is
the same as one over ``KW`` taps along the width followed by one over ``KH`` along the height, each
with its own dimension's stride and padding (padding is the dtype's lowest value, which no real
value loses to, and output sizes are computed per dimension, ``ceil_mode`` included): the numbers
are the same bits. The SPP blocks of YOLO necks pool 5x5, 9x9 and 13x13 windows over the last
stage (YOLOX-style: three pools of a 13x13x192 uint8 map took 0.14 ms, 169 taps for the largest),
YOLOv8's SPPF three 5x5 ones in a row.

A small window (3x3: 9 taps against 3 + 3 and a second pass over memory) is left as it is: the
pool is split where ``KH * KW >= 2 * (KH + KW)``, from 4x4 up.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from .graph import rewrite_pattern

__all__ = ["SeparableMaxPool"]


def _split(call) -> relax.Expr | None:
    """The two pools ``call`` (a ``relax.nn.max_pool2d``) becomes, or None where it stays."""
    attrs = call.attrs
    kh, kw = (int(k) for k in attrs.pool_size)
    if kh < 2 or kw < 2 or kh * kw < 2 * (kh + kw) or any(int(d) != 1 for d in attrs.dilation):
        return None
    sh, sw = (int(s) for s in attrs.strides)
    top, left, bottom, right = (int(p) for p in attrs.padding)
    common = {"ceil_mode": bool(attrs.ceil_mode), "layout": str(attrs.layout), "out_layout": str(attrs.out_layout)}
    rows = relax.op.nn.max_pool2d(call.args[0], pool_size=(1, kw), strides=(1, sw), padding=(0, left, 0, right), **common)
    return relax.op.nn.max_pool2d(rows, pool_size=(kh, 1), strides=(sh, 1), padding=(top, 0, bottom, 0), **common)


@tvm.transform.module_pass(opt_level=0, name="SeparableMaxPool")
class SeparableMaxPool:
    """Split every max-pool of a large window into a row pool and a column pool."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        pattern = is_op("relax.nn.max_pool2d")(wildcard())

        def rewrite(expr, matches):
            split = _split(matches[pattern])  # the pool call itself (``expr`` may be a variable bound to it)
            return expr if split is None else split

        return rewrite_pattern(mod, pattern, rewrite)
