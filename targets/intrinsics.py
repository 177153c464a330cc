"""The int8 micro-kernels: one tensor intrinsic per ISA, registered with TVM 0.27's LLVM (22).

Every micro-kernel computes ``C[i] += sum_k A[k] * B[i, k]`` for ``lanes`` int32 accumulators
(one per output channel): A is ``k`` activations of one pixel, broadcast to every lane, and B
holds ``lanes x k`` int8 weights, packed so each lane's ``k`` weights are adjacent (the layout
:mod:`tvmq.passes.pack_kernels` writes). What differs per ISA is ``k`` and the instructions:

========== ==== =========== ===================================================================
kernel      k   lanes        instructions (operands)
========== ==== =========== ===================================================================
vnni        4   16, 8, 4     ``vpdpbusd`` zmm/ymm/xmm (u8 x s8, AVX-512 VNNI)
avxvnni     4   8, 4         ``{vex} vpdpbusd`` ymm/xmm (u8 x s8, Alder Lake and later)
pmaddwd     2   16, 8, 4     ``vpmovsxbw`` + ``vpmaddwd`` zmm/ymm/xmm (AVX-512BW, AVX2, SSE2)
dpwssd      2   16, 8, 4     ``vpdpwssd`` zmm/ymm/xmm (s16 x s8 widened, AVX-512 VNNI; 16-bit activations)
dpwssd256   2   8, 4         ``{vex} vpdpwssd`` ymm/xmm (the same, AVX-VNNI)
sdot        4   4            ``sdot`` (s8 x s8, ARMv8.2 dot product)
smmla       8   2 (x 2 px)   ``smmla`` (s8 x s8, ARMv8.6 i8mm: a 2x8 by 8x2 matrix product)
smull       2   8, 4         ``smull`` + ``sadalp`` (s8 x s8, any aarch64 NEON)
vmull       2   8, 4         ``vmull.s8`` + ``vpadal.s16`` (s8 x s8, armv7 NEON)
========== ==== =========== ===================================================================

``smmla`` computes two pixels at once: its first operand holds 8 input channels of each of two
neighbouring output pixels (two 8-byte loads), its second 8 weights of each of two output
channels, and its accumulator the 2 x 2 sums (32 multiply-accumulates per instruction, twice
``sdot``'s). Where pixels cannot pair up (an odd output width, a strided conv, a one-row matmul)
its preset falls back to ``sdot``: ``MicroKernel.fallback``.

The widening kernels (``pmaddwd``, ``smull``, ``vmull``) are exact for every int8 input: each
product is formed in 16 bits from sign/zero-extended bytes (``|u8 x s8| <= 255 * 128 = 32640``,
``|s8 x s8| <= 16384``, both inside int16 — ``vpmaddwd`` multiplies 16-bit values into 32-bit
products outright) and every sum is taken in 32 bits: ``vpmaddwd`` adds a pair of products in
int32, ``sadalp``/``vpadal`` add a pair of int16 products into int32. Nothing can saturate,
unlike ``vpmaddubsw``, whose u8 x s8 pair sums saturate in int16 (up to 2 * 255 * 127 = 64770):
that is what makes ONNX Runtime's AVX2 int8 kernels inexact. ``k = 2`` because each of these
instructions sums exactly two products per 32-bit lane; packing pairs keeps every lane's result
in its own accumulator, with no horizontal adds.

The x86 kernels also serve layers whose plan gives them 16-bit activations (int8 weights, for
accuracy at twice an int8 step's cost): ``MicroKernel.wide`` names the kernel that reads int16
activations directly, ``vpdpwssd`` on VNNI (two s16 x s16 products added into each int32 lane,
the weights sign-extended as for ``vpmaddwd``), the ``vpmaddwd`` kernels themselves elsewhere.
A 16-bit activation times a weight in [-127, 127] can reach 2^22, so the plan offers 16 bits only
where each output channel's absolute weights sum below 2^15: the products then fill at most half
of the int32 accumulator, the bias the other half (:func:`tvmq.qparams.int16_accumulates_exactly`).

TVM's own ``dot_16x4_vnni`` passes 32-bit lanes to ``llvm.x86.avx512.vpdpbusd.512``, which
LLVM 22 rejects ("Call parameter type does not match function signature"): it wants byte
vectors. These descriptions take byte-vector operands; TVM's own ARM intrinsic was seen to
return wrong results when fed other layouts, which is why tuned kernels are verified before use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["MicroKernel", "MICRO_KERNELS", "register", "intrinsic_name", "dot_desc", "int8_pays"]


@dataclass(frozen=True, kw_only=True)
class MicroKernel:
    """One ISA's int8 multiply-accumulate step, as a TVM tensor intrinsic per lane count.

    Parameters
    ----------
    name : str
        Registry key (a preset's ``int8_kernel``).
    k : int
        Input channels per step; packed weights are ``[..., K/k, lanes, k]``.
    lanes : tuple of int
        Output-channel block sizes (int32 accumulators per step), preferred first.
    activation_dtype : str
        ``uint8`` or ``int8``: what the plan quantizes activations to.
    operand_dtype : str
        What the kernel reads the activations as: the activation dtype, or ``int16`` where the
        activations are widened once, before the kernel (``vpmaddwd`` multiplies 16-bit values:
        a pre-widened pair is one ``vpbroadcastd`` from memory, where widening it in the kernel
        took six instructions per pixel and output block).
    mnemonics : tuple of str
        Instructions that must appear in every int8 kernel's machine code (the disassembly
        check of tests and ``scripts/bench.py``).
    dot_product : bool
        A 4-way dot-product instruction (True) or widening multiply-adds (False).
    int8_speedup : float
        Peak int8 multiply-accumulates per fp32 fused multiply-add of the same ISA (from the
        instructions' MACs and issue rates): what a cross target's latency estimate assumes.
    min_reduction : int
        Multiply-accumulates per output (input channels x kernel taps) below which the int8
        kernel is no faster than the float one, requantize and widening included; the default
        plan keeps such layers float. Measured with ``scripts/int8_breakeven.py``; 0 where
        nobody has timed the ISA (every layer runs int8).
    int8_depthwise : bool
        Whether int8 depthwise convolutions are at least as fast as float ones (they have no
        dot product to gain from; the default plan keeps them float where they are slower).
    pixels : int
        Output pixels per step: 1, or 2 for ``smmla`` (whose description is
        ``C[p, i] += sum_k A[p, k] * B[i, k]`` over two pixels ``p``).
    fallback : str or None
        The one-pixel micro-kernel used for layers whose pixels do not pair up.
    wide : str or None
        The micro-kernel of layers with 16-bit activations (``operand_dtype`` int16, ``k`` 2), or
        None where the ISA has none (the plan then offers no 16-bit activations).
    min_pixels : int
        Output pixels of a conv below which int8 does not pay: a conv on a pooled 1x1 map
        (a squeeze-excite gate, a classifier head) is a matrix-vector product with too little
        work to repay quantizing its input, and an int8 gate moves the feature-map multiply out
        of the next kernel into a requantizing pass of its own.
    """

    name: str
    k: int
    lanes: tuple[int, ...]
    activation_dtype: str
    mnemonics: tuple[str, ...]
    dot_product: bool
    int8_speedup: float
    operand_dtype: str = ""
    min_reduction: int = 0
    int8_depthwise: bool = True
    min_pixels: int = 1
    pixels: int = 1
    fallback: str | None = None
    wide: str | None = None

    def __post_init__(self):
        if not self.operand_dtype:
            object.__setattr__(self, "operand_dtype", self.activation_dtype)

    def float_rules(self) -> str:
        """Which layers the default plan keeps float with this kernel, in words."""
        rules = [f"reductions < {self.min_reduction}"] if self.min_reduction else []
        rules += [] if self.int8_depthwise else ["depthwise convs"]
        if self.min_pixels > 1:
            rules.append("one-pixel convs" if self.min_pixels == 2 else f"convs of fewer than {self.min_pixels} pixels")
        return ", ".join(rules) or "none"


# min_reduction / int8_depthwise on x86: scripts/int8_breakeven.py on an AVX-512 VNNI host (Zen 5
# class, 2 threads), int8/fp32 speed of a 1x1 conv amid int8 layers by reduction length K:
#   x86-avx2        K8 0.67-0.91  K16 0.74-0.79  K32 1.00  K64 1.17  K128 1.32-1.36
#   x86-avx512      K8 0.77-1.02  K16 0.74-0.90  K32 0.93-1.03  K64 1.11-1.16  K128 1.15-1.46
#   x86-avx512vnni  K8 0.89-1.07  K16 1.07-1.08  K32 1.45-1.65  K64 1.85-1.95  K128 2.43-2.59
# and depthwise 3x3/5x5 int8 at 0.41-0.97x of float on all three; squeeze-excite gate convs (one
# output pixel) of the PP-OCR classifier at 0.07-0.37x on AVX2. Whole models decide where kernel
# timings and end-to-end disagree (scripts/zoo.py, each engine alone in fresh processes): on
# AVX2, depthwise and gates in float made the PP-OCR detector faster (7.27 vs 8.52 ms all-int8)
# and left the classifier and recogniser even (0.60 vs 0.61, 7.55 vs 7.41 ms); on VNNI they made
# both slower (classifier 0.49 vs 0.34 ms, detector 4.89 vs 4.03): the float tensors around a
# float depthwise cost more memory traffic than its kernel saves. So VNNI keeps them int8. AVX-VNNI (no such CPU here)
# is taken as VNNI; the ARM kernels run only under qemu here, which cannot time them.
MICRO_KERNELS = {
    m.name: m
    for m in (
        MicroKernel(name="vnni", k=4, lanes=(16, 8, 4), activation_dtype="uint8", mnemonics=("vpdpbusd",), dot_product=True,
                    int8_speedup=4.0, min_reduction=16, wide="dpwssd"),
        MicroKernel(name="avxvnni", k=4, lanes=(8, 4), activation_dtype="uint8", mnemonics=("vpdpbusd",), dot_product=True,
                    int8_speedup=4.0, min_reduction=16, wide="dpwssd256"),
        MicroKernel(name="dpwssd", k=2, lanes=(16, 8, 4), activation_dtype="int16", mnemonics=("vpdpwssd",),
                    dot_product=False, int8_speedup=2.0),
        MicroKernel(name="dpwssd256", k=2, lanes=(8, 4), activation_dtype="int16", mnemonics=("vpdpwssd",),
                    dot_product=False, int8_speedup=2.0),
        MicroKernel(name="pmaddwd", k=2, lanes=(16, 8, 4), activation_dtype="uint8", mnemonics=("vpmaddwd",),
                    dot_product=False, int8_speedup=1.5, operand_dtype="int16", min_reduction=32, int8_depthwise=False,
                    min_pixels=2, wide="pmaddwd"),
        MicroKernel(name="pmaddwd256", k=2, lanes=(8, 4), activation_dtype="uint8", mnemonics=("vpmaddwd",),
                    dot_product=False, int8_speedup=1.5, operand_dtype="int16", min_reduction=32, int8_depthwise=False,
                    min_pixels=2, wide="pmaddwd256"),
        MicroKernel(name="sdot", k=4, lanes=(4,), activation_dtype="int8", mnemonics=("sdot",), dot_product=True, int8_speedup=4.0),
        MicroKernel(name="smmla", k=8, lanes=(2,), activation_dtype="int8", mnemonics=("smmla",), dot_product=True,
                    int8_speedup=8.0, pixels=2, fallback="sdot"),
        MicroKernel(name="smull", k=2, lanes=(8, 4), activation_dtype="int8", mnemonics=("smull", "sadalp"),
                    dot_product=False, int8_speedup=1.0),
        MicroKernel(name="vmull", k=2, lanes=(8, 4), activation_dtype="int8", mnemonics=("vmull.s8", "vpadal.s16"),
                    dot_product=False, int8_speedup=1.0),
    )
}


def int8_pays(kernel: MicroKernel | None, reduction: int, depthwise: bool, pixels: int | None = None) -> bool:
    """Whether ``kernel``'s int8 version of a layer (``reduction`` multiply-accumulates per
    output; for a conv, ``pixels`` output pixels) is expected at least as fast as its float one:
    what the default plan decides per layer (``QuantConfig(int8_everywhere=False)``)."""
    if kernel is None:
        return True
    if pixels is not None and pixels < kernel.min_pixels:
        return False
    if depthwise:
        return kernel.int8_depthwise
    return reduction >= kernel.min_reduction


def intrinsic_name(kernel: str, lanes: int) -> str:
    return f"tvmq_{kernel}_{lanes}x{MICRO_KERNELS[kernel].k}"


def dot_desc(lanes: int, k: int, a_dtype: str):
    """The description every micro-kernel shares: ``C[i] += sum_k A[k] * B[i, k]``."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((k,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, k), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:k], B[0:lanes, 0:k])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for kk in T.serial(0, k):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, kk])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _dot4_impl(lanes: int, a_dtype: str, intrinsic: str):
    """VNNI / sdot: 4 activation bytes broadcast as one int32, one instruction."""
    from tvm.script import tirx as T

    acc_t, byte_t, a_x4 = f"int32x{lanes}", f"int8x{lanes * 4}", f"{a_dtype}x4"

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

    return impl


def _pair_impl(lanes: int, intrinsic: str, accumulates: bool):
    """x86, int16 activations x int8 weights, two products per int32 lane: the activation pair
    (two int16 as one int32, broadcast) and the weights sign-extended to int16 (``vpmovsxbw``,
    once per tile row: LLVM hoists it out of the unrolled pixels). ``vpdpwssd`` (VNNI,
    ``accumulates``) adds both products into the accumulator in one instruction; ``vpmaddwd``
    (AVX2 / AVX-512 without VNNI) adds them in int32 and a ``vpaddd`` accumulates. The int16
    activations are the layer's own (16-bit activations) or 8-bit ones widened once, before the
    kernel (``MicroKernel.operand_dtype``)."""
    from tvm.script import tirx as T

    acc_t, w16_t, w8_t = f"int32x{lanes}", f"int16x{lanes * 2}", f"int8x{lanes * 2}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((2,), "int16", offset_factor=1),
        B: T.Buffer((lanes, 2), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            pair = T.meta_var(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"))
            a = T.meta_var(T.reinterpret(T.broadcast(pair, lanes), dtype=w16_t))
            b = T.meta_var(T.cast(B.vload([0, 0], dtype=w8_t), w16_t))
            if accumulates:
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(intrinsic), C.vload([0], dtype=acc_t), a, b, dtype=acc_t
                )
            else:
                C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=acc_t) + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(intrinsic), a, b, dtype=acc_t
                )

    return impl


def _neon_widening_impl(lanes: int, pairwise: str, accumulates: bool):
    """ARM NEON without a dot product: per group of 4 lanes, 8 signed byte products in int16
    (``smull`` / ``vmull.s8``: sign-extended multiply, which LLVM selects from the casts) and a
    pairwise add-accumulate into int32 (``sadalp``, which LLVM selects from ``saddlp`` + add;
    ``vpadal.s16``, which armv7 has to be asked for: ``accumulates``)."""
    from tvm.script import tirx as T

    groups = lanes // 4

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((2,), "int8", offset_factor=1),
        B: T.Buffer((lanes, 2), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            a16 = T.meta_var(T.reinterpret(A.vload([0], "int8x2"), dtype="int16"))
            a = T.meta_var(T.cast(T.reinterpret(T.broadcast(a16, 4), dtype="int8x8"), "int16x8"))
            for g in T.unroll(groups):
                acc = T.meta_var(C.vload([g * 4], dtype="int32x4"))
                prod = T.meta_var(a * T.cast(B.vload([g * 4, 0], dtype="int8x8"), "int16x8"))
                if accumulates:
                    C[T.ramp(g * 4, 1, 4)] = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(pairwise), acc, prod,
                                                                     dtype="int32x4")
                else:
                    C[T.ramp(g * 4, 1, 4)] = acc + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(pairwise), prod,
                                                                           dtype="int32x4")

    return impl


def smmla_desc():
    """``C[p, i] += sum_k A[p, k] * B[i, k]``: two pixels ``p`` (rows of the activations, any
    stride apart), two output channels ``i``, eight input channels ``k``; C contiguous."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2, 8), "int8", offset_factor=1, strides=[T.int32(), 1])
        B = T.match_buffer(b, (2, 8), "int8", offset_factor=1)
        C = T.match_buffer(c, (2, 2), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
            T.writes(C[0:2, 0:2])
            for p, i, kk in T.grid(2, 2, 8):
                with T.sblock("update"):
                    vp, vi, vk = T.axis.remap("SSR", [p, i, kk])
                    C[vp, vi] = C[vp, vi] + T.cast(A[vp, vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _smmla_impl():
    """One ``smmla``: the two pixels' 8 bytes side by side (rows of the 2x8 matrix), the two
    output channels' 8 weights (columns of the 8x2 one, packed adjacent), the accumulators as
    ``[p0 i0, p0 i1, p1 i0, p1 i1]``."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2, 8), "int8", offset_factor=1, strides=[T.int32(), 1])
        B = T.match_buffer(b, (2, 8), "int8", offset_factor=1)
        C = T.match_buffer(c, (2, 2), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
            T.writes(C[0:2, 0:2])
            rows = T.meta_var(T.vectorcombine("int8x16", A.vload([0, 0], "int8x8"), A.vload([1, 0], "int8x8")))
            # C is contiguous (the kernel keeps its accumulators in this 2 x 2 order): one vector
            C[0, T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smmla.v4i32.v16i8"),
                C.vload([0, 0], "int32x4"), rows, B.vload([0, 0], "int8x16"), dtype="int32x4")

    return impl


def _impl(kernel: MicroKernel, lanes: int):
    if kernel.name in ("vnni", "avxvnni"):
        return _dot4_impl(lanes, "uint8", f"llvm.x86.avx512.vpdpbusd.{lanes * 32}")
    if kernel.name == "sdot":
        return _dot4_impl(lanes, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8")
    if kernel.name.startswith("pmaddwd"):
        intrinsic = {16: "llvm.x86.avx512.pmaddw.d.512", 8: "llvm.x86.avx2.pmadd.wd", 4: "llvm.x86.sse2.pmadd.wd"}[lanes]
        return _pair_impl(lanes, intrinsic, accumulates=False)
    if kernel.name.startswith("dpwssd"):
        return _pair_impl(lanes, f"llvm.x86.avx512.vpdpwssd.{lanes * 32}", accumulates=True)
    if kernel.name == "smull":
        return _neon_widening_impl(lanes, "llvm.aarch64.neon.saddlp.v4i32.v8i16", accumulates=False)
    if kernel.name == "vmull":
        return _neon_widening_impl(lanes, "llvm.arm.neon.vpadals.v4i32.v8i16", accumulates=True)
    raise ValueError(f"no implementation for micro-kernel {kernel.name!r}")


@functools.lru_cache(maxsize=None)
def register() -> tuple[str, ...]:
    """Register every micro-kernel's intrinsics (idempotent); return their names.

    Must run before a tuning database that mentions them is read.
    """
    from tvmq._compat import s_tir

    names = []
    for kernel in MICRO_KERNELS.values():
        for lanes in kernel.lanes:
            name = intrinsic_name(kernel.name, lanes)
            if kernel.pixels == 2:
                s_tir.TensorIntrin.register(name, smmla_desc(), _smmla_impl(), override=True)
            else:
                s_tir.TensorIntrin.register(name, dot_desc(lanes, kernel.k, kernel.operand_dtype), _impl(kernel, lanes),
                                            override=True)
            names.append(name)
    return tuple(names)
