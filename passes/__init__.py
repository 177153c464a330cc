"""tvmq's Relax passes. Each is a ``tvm.transform.Pass`` and composes in ``tvm.transform.Sequential``.

>>> seq = tvm.transform.Sequential([InsertQDQ(plan), FoldQDQ()])   # doctest: +SKIP
"""

from .fold_constants import FoldConstantsNumpy
from .fold_qdq import FoldQDQ
from .insert_qdq import InsertQDQ
from .patterns import count_ops, find_layers

__all__ = ["InsertQDQ", "FoldQDQ", "FoldConstantsNumpy", "find_layers", "count_ops"]
