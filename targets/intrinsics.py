"""Tensor intrinsics tvmq registers itself, with the signatures TVM 0.27's LLVM (22) accepts.

All compute ``C[i] += sum_k A[k] * B[i, k]`` for ``lanes`` int32 accumulators: x86 VNNI
(``vpdpbusd``: uint8 activations, int8 weights) at 512/256/128 bits and ARM ``sdot`` (int8 x
int8, 128 bits). The weights must be packed so each lane's 4 weights are adjacent, which is the
layout :mod:`tvmq.passes.pack_kernels` writes; TVM's own ARM intrinsic was seen to return wrong
results when fed other layouts, which is why tuned kernels are verified before use.


TVM's own ``dot_16x4_vnni`` passes 32-bit lanes to ``llvm.x86.avx512.vpdpbusd.512``, which
LLVM 22 rejects ("Call parameter type does not match function signature"): it wants the two
multiplicands as byte vectors. These are the same descriptions with byte-vector operands, at
512, 256 and 128 bits, so that 8- and 4-channel output blocks (common in mobile networks)
also use VNNI.

``C[i] += sum_k A[k] * B[i, k]``: A is 4 uint8 activations broadcast to every lane, B holds
``lanes`` x 4 int8 weights (packed so each lane's 4 weights are adjacent), C is ``lanes`` int32.
"""

from __future__ import annotations

import functools

__all__ = ["register", "vnni_intrin", "sdot_intrin"]


def _make(lanes: int, kind: str = "vnni"):
    from tvm.script import tirx as T

    bits = lanes * 32
    acc_t = f"int32x{lanes}"
    byte_t = f"int8x{lanes * 4}"
    a_dtype = "uint8" if kind == "vnni" else "int8"
    a_x4 = f"{a_dtype}x4"
    if kind == "vnni":
        intrinsic = f"llvm.x86.avx512.vpdpbusd.{bits}"
    elif kind == "sdot" and lanes == 4:
        intrinsic = "llvm.aarch64.neon.sdot.v4i32.v16i8"
    else:
        raise ValueError(f"no {kind} intrinsic with {lanes} lanes")

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            # meta_var: inline expressions. A plain assignment makes TVMScript allocate a local
            # buffer, which is lowered to a workspace alloc/free pair per tile inside parallel loops.
            a_i32 = T.meta_var(T.reinterpret(A.vload([0], a_x4), dtype="int32"))
            a = T.meta_var(T.reinterpret(T.broadcast(a_i32, lanes), dtype=byte_t))
            b = T.meta_var(B.vload([0, 0], dtype=byte_t))
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic), C.vload([0], dtype=acc_t), a, b, dtype=acc_t
            )

    return desc, impl


def vnni_intrin(lanes: int) -> str:
    return f"tvmq_vnni_{lanes}x4"


def sdot_intrin(lanes: int = 4) -> str:
    return f"tvmq_sdot_{lanes}x4"


@functools.lru_cache(maxsize=None)
def register() -> tuple[str, ...]:
    """Register tvmq's intrinsics (idempotent); return their names.

    Must run before a tuning database that mentions them is read.
    """
    from tvm import s_tir

    names = []
    for lanes in (16, 8, 4):
        desc, impl = _make(lanes, "vnni")
        s_tir.TensorIntrin.register(vnni_intrin(lanes), desc, impl, override=True)
        names.append(vnni_intrin(lanes))
    desc, impl = _make(4, "sdot")
    s_tir.TensorIntrin.register(sdot_intrin(4), desc, impl, override=True)
    names.append(sdot_intrin(4))
    return tuple(names)
