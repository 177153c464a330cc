"""tvmq's Relax passes. Each is a ``tvm.transform.Pass`` and composes in ``tvm.transform.Sequential``.

>>> seq = tvm.transform.Sequential([InsertQDQ(plan), FoldQDQ()])   # doctest: +SKIP
"""

from .smooth_quant import SmoothQuant
from .specialize import Specialize
from .weight_only import WeightOnly
from .divide_to_multiply import DivideToMultiply
from .fast_softmax import FastSoftmax
from .fold_affine_chains import FoldAffineChains
from .fast_math import FastMath
from .conv1d import Conv1dToConv2d
from .conv_transpose import ConvTransposeToConv
from .fold_constants import FoldConstantsNumpy
from .fold_qdq import FoldQDQ
from .insert_qdq import InsertQDQ
from .layout import ConvertToNHWC
from .pack_kernels import PackKernels
from .separable_pool import SeparableMaxPool
from .split_to_slices import SplitToSlices
from .graph import count_ops
from .layers import find_layers
from .strip_qdq import has_qdq, strip_qdq
from .unroll_lstm import UnrollLSTM

__all__ = ["Conv1dToConv2d", "ConvTransposeToConv", "DivideToMultiply", "FastMath", "FastSoftmax", "FoldAffineChains", "InsertQDQ", "FoldQDQ", "FoldConstantsNumpy", "ConvertToNHWC", "PackKernels", "SeparableMaxPool", "SplitToSlices", "SmoothQuant", "Specialize", "WeightOnly", "find_layers", "count_ops", "has_qdq", "strip_qdq", "UnrollLSTM"]
