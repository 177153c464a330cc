"""tvmq's Relax passes. Each is a ``tvm.transform.Pass`` and composes in ``tvm.transform.Sequential``.

>>> seq = tvm.transform.Sequential([InsertQDQ(plan), FoldQDQ()])   # doctest: +SKIP
"""

from .arith import DivideToMultiply, FastSoftmax, FoldAffineChains
from .fast_math import FastMath
from .conv1d import Conv1dToConv2d
from .conv_transpose import ConvTransposeToConv
from .fold_constants import FoldConstantsNumpy
from .fold_qdq import FoldQDQ
from .insert_qdq import InsertQDQ
from .layout import ConvertToNHWC
from .pack_kernels import PackKernels
from .patterns import count_ops, find_layers

__all__ = ["Conv1dToConv2d", "ConvTransposeToConv", "DivideToMultiply", "FastMath", "FastSoftmax", "FoldAffineChains", "InsertQDQ", "FoldQDQ", "FoldConstantsNumpy", "ConvertToNHWC", "PackKernels", "find_layers", "count_ops"]
