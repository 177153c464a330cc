"""A row softmax kernel for CPUs: lane-wide partial max and sum, no per-lane predicate.

TVM 0.27 schedules ``topi.nn.fast_softmax`` with DLight's CPU reduction rule, which splits the
row into vectors with a predicate on the last one whenever the row length is not a multiple of
the vector width; TVM then scalarizes every loop of the kernel. PP-OCR's recogniser ends in a
softmax over 6625 classes (5^3 x 53): 588 us single-threaded for 40 rows. This kernel keeps
``lanes`` partial maxima and sums per row over the whole vectors and finishes the remainder
with scalars: 59 us, within 3e-6 (relative) of the exact softmax.

A softmax over another axis (YOLOv8's distribution focal loss head: ``[1, 16, 4, 2100]`` over
its 16 bins) has its contiguous elements across the rows: :func:`column_softmax` runs vectors
along them, every bin one vector operation. ``topi.nn.fast_softmax`` under DLight's rule
reduced each column in scalars: 0.59 ms of YOLOv8n's 11 ms FP32 call (x86 AVX-512, 2 threads).
"""

from __future__ import annotations

import numpy as np

__all__ = ["fast_exp", "row_softmax", "column_softmax"]


def fast_exp(v):
    """TVM's ``topi.fast_exp`` polynomial on one float32 PrimExpr (same constants, same result)."""
    from tvm import tirx
    from tvm.script import tirx as T

    def c(value):
        return tirx.const(value, "float32")

    x = T.max(T.min(v, c(88.376266479492188)), c(-88.376258850097656))
    n = T.floor(x * c(1.4426950216293335) + c(0.5))
    r = x - n * c(0.69314718246459961)
    p = (((((c(0.00019875691214110702) * r + c(0.0013981999363750219)) * r + c(0.008333452045917511)) * r
           + c(0.041665796190500259)) * r + c(0.1666666567325592)) * r + c(0.5)) * r * r + r + c(1.0)
    return T.max(T.reinterpret("float32", T.shift_left(T.Cast("int32", n + c(127.0)), 23)) * p, v)


def row_softmax(rows: int | None, n: int | None, lanes: int = 16, shape=None):
    """A scheduled PrimFunc ``(x[rows, n]) -> y[rows, n]``: softmax of each row, rows in parallel.
    ``rows=None`` / ``n=None``: any number of rows / any row length (dynamic dimensions), the same
    arithmetic per row as the kernel for those sizes.

    Three passes per row: lane-wise maxima over the whole vectors (the maximum is exact, in any
    order); ``fast_exp(x - max)`` into ``y`` with lane-wise sums, the remainder in scalars; ``y /
    sum``. With ``shape`` (``rows`` x ``n`` elements, last axis ``n``) the parameters have that
    shape and the kernel views them as rows: no reshape around the call, which TVM would run as a
    copy where the result is the model's output.
    """
    from tvm.script import tirx as T

    from tvmq._compat import tir

    if rows is None or n is None:  # dynamic: the parameters are [rows, n], their sizes defined by them
        rows = tir.Var("rows", "int64") if rows is None else rows
        n = tir.Var("n", "int64") if n is None else n
        shape = (rows, n)
    else:
        shape = tuple(int(d) for d in (shape or (rows, n)))
        if shape[-1] != n or int(np.prod(shape, dtype=np.int64)) != rows * n:
            raise ValueError(f"shape {shape} does not hold {rows} rows of {n}")
    whole, tail = n // lanes, n % lanes
    # the vector part runs once if the row holds a whole vector (a loop of 0 or 1 for a dynamic length)
    vectors = min(whole, 1) if isinstance(whole, int) else T.min(whole, 1)

    @T.prim_func(private=True, s_tir=True)
    def tvmq_softmax(x_in: T.Buffer(shape, "float32"), y_out: T.Buffer(shape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        # One opaque root block: TVM's reshape detection (RewriteDataflowReshape) requires a root block.
        with T.sblock("root"):
            x = T.decl_buffer((rows, n), "float32", data=x_in.data)
            y = T.decl_buffer((rows, n), "float32", data=y_out.data)
            # Allocated once per call, outside the parallel loop (inside it, TVM would allocate per row).
            acc = T.sblock_alloc_buffer((rows, lanes), "float32")
            top = T.sblock_alloc_buffer((rows,), "float32")
            total = T.sblock_alloc_buffer((rows,), "float32")
            for r in T.parallel(rows):
                top[r] = x[r, 0]
                for _ in range(vectors):
                    for l in T.vectorized(lanes):
                        acc[r, l] = x[r, l]
                    for ko in range(1, whole):
                        for l in T.vectorized(lanes):
                            acc[r, l] = T.max(acc[r, l], x[r, ko * lanes + l])
                    for l in range(lanes):
                        top[r] = T.max(top[r], acc[r, l])
                for t in range(tail):
                    top[r] = T.max(top[r], x[r, whole * lanes + t])
                for l in T.vectorized(lanes):
                    acc[r, l] = T.float32(0)
                for ko in range(whole):
                    for l in T.vectorized(lanes):
                        y[r, ko * lanes + l] = fast_exp(x[r, ko * lanes + l] - top[r])
                        acc[r, l] = acc[r, l] + y[r, ko * lanes + l]
                total[r] = T.float32(0)
                for t in range(tail):
                    y[r, whole * lanes + t] = fast_exp(x[r, whole * lanes + t] - top[r])
                    total[r] = total[r] + y[r, whole * lanes + t]
                for l in range(lanes):
                    total[r] = total[r] + acc[r, l]
                for ko in range(whole):
                    for l in T.vectorized(lanes):
                        y[r, ko * lanes + l] = y[r, ko * lanes + l] / total[r]
                for t in range(tail):
                    y[r, whole * lanes + t] = y[r, whole * lanes + t] / total[r]

    return tvmq_softmax


def column_softmax(shape, axis: int, lanes: int = 16):
    """A scheduled PrimFunc ``(x) -> y`` of static ``shape``: softmax over ``axis``, which is not
    the last; the tensor viewed as ``[outer, n, inner]`` (``n`` the softmax axis), vectors of
    ``lanes`` along ``inner``, in parallel, and the ``inner % lanes`` remainder in scalars. The
    same three passes per column as :func:`row_softmax` (maximum; ``fast_exp(x - max)`` and the
    sum; ``y / sum``), the sum in the order of the axis."""
    from tvm.script import tirx as T

    shape = tuple(int(d) for d in shape)
    axis = axis % len(shape)
    if axis == len(shape) - 1:
        raise ValueError("column_softmax is for a softmax over an axis other than the last")
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    n = shape[axis]
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    whole, tail = inner // lanes, inner % lanes

    @T.prim_func(private=True, s_tir=True)
    def tvmq_softmax(x_in: T.Buffer(shape, "float32"), y_out: T.Buffer(shape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        with T.sblock("root"):
            x = T.decl_buffer((outer, n, inner), "float32", data=x_in.data)
            y = T.decl_buffer((outer, n, inner), "float32", data=y_out.data)
            # one maximum and one sum per column, allocated once per call (outside the parallel loop)
            top = T.sblock_alloc_buffer((outer, inner), "float32")
            total = T.sblock_alloc_buffer((outer, inner), "float32")
            for ov in T.parallel(outer * whole):
                for l in T.vectorized(lanes):
                    top[ov // whole, ov % whole * lanes + l] = x[ov // whole, 0, ov % whole * lanes + l]
                for j in range(1, n):
                    for l in T.vectorized(lanes):
                        top[ov // whole, ov % whole * lanes + l] = T.max(
                            top[ov // whole, ov % whole * lanes + l], x[ov // whole, j, ov % whole * lanes + l])
                for l in T.vectorized(lanes):
                    total[ov // whole, ov % whole * lanes + l] = T.float32(0)
                for j in range(n):
                    for l in T.vectorized(lanes):
                        y[ov // whole, j, ov % whole * lanes + l] = fast_exp(
                            x[ov // whole, j, ov % whole * lanes + l] - top[ov // whole, ov % whole * lanes + l])
                        total[ov // whole, ov % whole * lanes + l] = (
                            total[ov // whole, ov % whole * lanes + l] + y[ov // whole, j, ov % whole * lanes + l])
                for j in range(n):
                    for l in T.vectorized(lanes):
                        y[ov // whole, j, ov % whole * lanes + l] = (
                            y[ov // whole, j, ov % whole * lanes + l] / total[ov // whole, ov % whole * lanes + l])
            for o in range(outer):
                for t in range(tail):
                    top[o, whole * lanes + t] = x[o, 0, whole * lanes + t]
                    for j in range(1, n):
                        top[o, whole * lanes + t] = T.max(top[o, whole * lanes + t], x[o, j, whole * lanes + t])
                    total[o, whole * lanes + t] = T.float32(0)
                    for j in range(n):
                        y[o, j, whole * lanes + t] = fast_exp(x[o, j, whole * lanes + t] - top[o, whole * lanes + t])
                        total[o, whole * lanes + t] = total[o, whole * lanes + t] + y[o, j, whole * lanes + t]
                    for j in range(n):
                        y[o, j, whole * lanes + t] = y[o, j, whole * lanes + t] / total[o, whole * lanes + t]

    return tvmq_softmax
