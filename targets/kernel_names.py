"""Names of the kernels tvmq's passes emit, and of the blocks tvmq's schedule rules look for.

:class:`~tvmq.passes.PackKernels` (and FastSoftmax, WeightOnly) name the PrimFuncs and TE blocks
they emit with these; :mod:`tvmq.targets.schedules` recognises a packed kernel by its block
name. Both import them from here: this module imports nothing, so ``tvmq.targets`` does not
depend on ``tvmq.passes``.
"""

__all__ = [
    "CONV_BLOCK",
    "MATMUL_BLOCK",
    "FMA_CONV_BLOCK",
    "FMA_MATMUL_BLOCK",
    "DEPTHWISE_BLOCK",
    "CROP_BLOCK",
    "UNPAIR_BLOCK",
    "WEIGHT_ONLY_BLOCK",
    "CONV_FUNC",
    "MATMUL_FUNC",
    "FMA_CONV_FUNC",
    "FMA_MATMUL_FUNC",
    "DEPTHWISE_FUNC",
    "SOFTMAX_FUNC",
    "WEIGHT_ONLY_FUNC",
]

# Blocks (TE compute names). The schedule rules find a kernel's main block by these.
CONV_BLOCK = "tvmq_dot_conv2d"  # int8 conv2d, packed weights, dot-product micro-kernel
MATMUL_BLOCK = "tvmq_dot_matmul"  # int8 matmul, packed weights, dot-product micro-kernel
FMA_CONV_BLOCK = "tvmq_fma_conv2d"  # float conv2d, weights packed one vector of channels a tap
FMA_MATMUL_BLOCK = "tvmq_fma_matmul"  # float matmul, weights packed the same way
DEPTHWISE_BLOCK = "tvmq_depthwise"  # depthwise conv2d (int8 or float), weights [KH, KW, C]
CROP_BLOCK = "tvmq_crop"  # output channels padded up to a lane multiple, cropped back
UNPAIR_BLOCK = "tvmq_unpair"  # two-pixel (smmla) accumulators back to [..., X, O]
WEIGHT_ONLY_BLOCK = "tvmq_weight_only_matmul"  # float matmul on int8 / int4 weights

# PrimFuncs (name hints; fusion prefixes them, e.g. ``fused_tvmq_conv2d_...``).
CONV_FUNC = "tvmq_conv2d"
MATMUL_FUNC = "tvmq_matmul"
FMA_CONV_FUNC = "tvmq_fma_conv2d"
FMA_MATMUL_FUNC = "tvmq_fma_matmul"
DEPTHWISE_FUNC = "tvmq_depthwise"
SOFTMAX_FUNC = "tvmq_softmax"  # tvmq.targets.softmax.row_softmax
WEIGHT_ONLY_FUNC = "tvmq_weight_only_int{bits}"  # .format(bits=8 or 4)
