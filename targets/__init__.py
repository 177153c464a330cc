"""Target presets: what to compile for, and how to quantize for it.

A preset names a TVM target (as a JSON dict, the only form TVM 0.27 accepts), its int8
micro-kernel (:mod:`tvmq.targets.intrinsics`: the dot-product instruction where the ISA has one,
exact widening multiply-adds where it does not) and the integer types that kernel wants (x86
multiplies u8 x s8, ARM s8 x s8), the cross compiler that links its libraries and the emulator
that can run them here.

The ISA matrix: x86 ``x86-avx2`` (Haswell .. Zen 3), ``x86-avx512`` (Skylake-SP, no VNNI),
``x86-avxvnni`` (Alder Lake and later), ``x86-avx512vnni`` (Cascade Lake, Ice Lake, Zen 4+);
aarch64 ``rpi4`` (ARMv8.0 NEON), ``arm``/``rpi5`` (sdot), ``arm-i8mm`` (smmla); armv7 ``arm32``
(NEON); CUDA.
``x86`` is this machine, with the best x86 micro-kernel its CPU has.

>>> from tvmq.targets import get_preset
>>> get_preset("arm").activation_dtype
'int8'
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from dataclasses import dataclass, field

from tvmq.errors import TvmqError

__all__ = ["TargetPreset", "get_preset", "list_presets", "host_cpu_flags"]


@dataclass(frozen=True, kw_only=True)
class TargetPreset:
    """Everything tvmq needs to know about one deployment target.

    Parameters
    ----------
    name : str
        The ``--target`` name.
    description : str
        One line for ``tvmq targets``.
    target : dict
        TVM target as JSON (``{"kind": "llvm", "mtriple": ...}``).
    activation_dtype : str
        ``"uint8"`` or ``"int8"``: the activation type the int8 dot-product wants.
    weight_dtype : str
        Weight type, ``"int8"`` everywhere.
    int8_kernel : str or None
        The int8 micro-kernel conv2d/matmul are tensorized with (a key of
        :data:`tvmq.targets.intrinsics.MICRO_KERNELS`); None leaves int8 kernels to LLVM.
    vector_registers : int
        Vector registers of the ISA (AVX2 and armv7 NEON: 16; AVX-512 and aarch64: 32): the
        register budget of a kernel's accumulator tile.
    cpu_flags : frozenset of str
        /proc/cpuinfo flags an x86 CPU needs to run the preset's code (``runs_here``).
    cross_compiler : str or None
        Compiler driver that links the library; ``None`` links with the host compiler.
    apt_package : str or None
        Debian package that provides ``cross_compiler``.
    emulator : str or None
        qemu-user binary that runs the target's code here.
    fp16 : bool
        Whether the target has fast native fp16 arithmetic.
    vector_lanes : int
        float32 lanes of one vector register (AVX-512: 16, AVX2: 8, NEON: 4).
    """

    name: str
    description: str
    target: dict = field(default_factory=dict)
    activation_dtype: str = "uint8"
    weight_dtype: str = "int8"
    cross_compiler: str | None = None
    apt_package: str | None = None
    emulator: str | None = None
    fp16: bool = False
    int8_kernel: str | None = None
    vector_lanes: int = 4
    vector_registers: int = 32
    cpu_flags: frozenset = frozenset()

    def __post_init__(self):
        from .intrinsics import MICRO_KERNELS

        if self.activation_dtype not in ("uint8", "int8"):
            raise ValueError(f"activation_dtype must be uint8 or int8, not {self.activation_dtype!r}")
        if self.weight_dtype != "int8":
            raise ValueError(f"weight_dtype must be int8, not {self.weight_dtype!r}")
        if self.int8_kernel is not None:
            if self.int8_kernel not in MICRO_KERNELS:
                raise ValueError(f"unknown int8_kernel {self.int8_kernel!r}; known: {', '.join(MICRO_KERNELS)}")
            if MICRO_KERNELS[self.int8_kernel].activation_dtype != self.activation_dtype:
                raise ValueError(f"int8_kernel {self.int8_kernel!r} takes {MICRO_KERNELS[self.int8_kernel].activation_dtype} "
                                 f"activations, not {self.activation_dtype}")

    @property
    def micro_kernel(self):
        """The :class:`~tvmq.targets.intrinsics.MicroKernel` of ``int8_kernel``, or None."""
        from .intrinsics import MICRO_KERNELS

        return MICRO_KERNELS.get(self.int8_kernel) if self.int8_kernel else None

    @property
    def fast_int8(self) -> bool:
        """Whether the ISA has an int8 dot-product instruction (VNNI, sdot; dp4a/IMMA on CUDA)."""
        kernel = self.micro_kernel
        return kernel.dot_product if kernel is not None else self.kind == "cuda"

    @property
    def dot_product(self) -> str | None:
        """The int8 micro-kernel when it is a 4-way dot-product instruction (``vnni``, ``sdot``)."""
        kernel = self.micro_kernel
        return kernel.name if kernel is not None and kernel.dot_product else None

    @property
    def kind(self) -> str:
        return self.target.get("kind", "llvm")

    @property
    def is_host(self) -> bool:
        """True when libraries built for this preset are for this machine's architecture (x86-64)."""
        return self.kind == "llvm" and self.cross_compiler is None

    @property
    def runs_here(self) -> bool:
        """True when libraries built for this preset run natively on this CPU: its architecture,
        and every ISA extension the preset's code may use (an AVX2 build runs on any AVX-512
        machine; an AVX-VNNI build needs a CPU with AVX-VNNI)."""
        return self.is_host and self.cpu_flags <= host_cpu_flags()

    def tvm_target(self):
        import tvm

        return tvm.target.Target(dict(self.target))

    def with_target(self, **changes) -> "TargetPreset":
        return dataclasses.replace(self, target={**self.target, **changes})

    def warnings(self) -> list[str]:
        """What a user should know before deploying with this preset."""
        notes = []
        if not self.fast_int8:
            kernel = self.micro_kernel
            how = (f"exact widening multiply-adds ({', '.join(kernel.mnemonics)})" if kernel is not None
                   else "widening multiply-adds")
            timed = kernel is not None and (kernel.min_reduction or not kernel.int8_depthwise)
            notes.append(
                f"target {self.name!r} has no int8 dot-product instruction "
                f"({self.target.get('mcpu') or self.target.get('mtriple') or 'this CPU'}): int8 kernels run as {how}, "
                f"at most about {kernel.int8_speedup if kernel else 1.0:g}x the fp32 multiply-add rate; "
                + ("layers whose int8 kernel is no faster (depthwise, short reductions) stay float unless --int8-everywhere"
                   if timed else "its int8 kernels have not been timed on such a CPU, so every layer runs int8")
            )
        return notes

    def check_toolchain(self) -> None:
        """Raise a TvmqError naming the apt line when the cross compiler is missing."""
        if self.cross_compiler and shutil.which(self.cross_compiler) is None:
            raise TvmqError(
                f"cross compiler {self.cross_compiler} for target {self.name!r} not found; "
                f"install it with: apt-get install {self.apt_package}"
            )


@functools.lru_cache(maxsize=1)
def host_cpu_flags() -> frozenset[str]:
    """CPU feature flags of this machine (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def x86_int8_kernel(flags) -> str | None:
    """The best x86 int8 micro-kernel a CPU with these /proc/cpuinfo flags runs."""
    avx512 = {"avx512f", "avx512bw", "avx512vl"} <= flags
    if avx512 and "avx512_vnni" in flags:
        return "vnni"
    if "avx_vnni" in flags:
        return "avxvnni"
    if avx512:
        return "pmaddwd"
    if "avx2" in flags:
        return "pmaddwd256"
    return None


# LLVM tunes its Intel AVX-512 CPUs (Skylake-SP to Emerald Rapids) to prefer 256-bit vectors and
# then splits every 512-bit operation it is free to: an int8 kernel's requantize epilogue ran as
# pairs of ymm operations beside its zmm vpdpbusd (its SiLU: 6 ymm divisions per 3 vectors). tvmq
# writes its vector widths itself, so the AVX-512 presets turn the preference off.
_FULL_WIDTH = {"mattr": ["-prefer-256-bit"]}


def _x86_host() -> TargetPreset:
    from tvmq._compat import llvm_host_cpu

    flags = host_cpu_flags()
    kernel = x86_int8_kernel(flags)
    avx512 = "avx512f" in flags
    cores = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return TargetPreset(
        name="x86",
        description=f"this machine's x86-64 CPU (features detected; int8 micro-kernel here: {kernel or 'none'})",
        target={"kind": "llvm", "mcpu": llvm_host_cpu(), "num-cores": cores, **(_FULL_WIDTH if avx512 else {})},
        activation_dtype="uint8",
        int8_kernel=kernel,
        vector_lanes=16 if avx512 else 8 if "avx2" in flags else 4,
        vector_registers=32 if avx512 else 16,
    )


_AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
_ARMV7 = {
    "kind": "llvm",
    "mtriple": "armv7a-linux-gnueabihf",
    "mattr": ["+neon", "+vfp4", "+thumb2"],
    "mfloat-abi": "hard",
}
_CUDA = {
    "kind": "cuda",
    "max_threads_per_block": 1024,
    "max_shared_memory_per_block": 49152,
    "thread_warp_size": 32,
    "registers_per_block": 65536,
}
_ARM64_CC = dict(cross_compiler="aarch64-linux-gnu-g++", apt_package="g++-aarch64-linux-gnu", emulator="qemu-aarch64")


def _static_presets() -> dict[str, TargetPreset]:
    presets = [
        TargetPreset(
            name="x86-avx2",
            description="x86-64 with AVX2 and FMA (Haswell .. Comet Lake, Zen 1-3): exact int8 as vpmaddwd ymm",
            target={"kind": "llvm", "mcpu": "haswell"},
            activation_dtype="uint8",
            int8_kernel="pmaddwd256",
            vector_lanes=8,
            vector_registers=16,
            cpu_flags=frozenset({"avx2", "fma", "bmi2"}),
        ),
        TargetPreset(
            name="x86-avx512",
            description="x86-64 with AVX-512 but no VNNI (Skylake-SP, Cascade Lake's predecessors): vpmaddwd zmm",
            target={"kind": "llvm", "mcpu": "skylake-avx512", **_FULL_WIDTH},
            activation_dtype="uint8",
            int8_kernel="pmaddwd",
            vector_lanes=16,
            cpu_flags=frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}),
        ),
        TargetPreset(
            name="x86-avxvnni",
            description="x86-64 with AVX-VNNI, no AVX-512 (Alder Lake and later client CPUs): vpdpbusd ymm",
            target={"kind": "llvm", "mcpu": "alderlake"},
            activation_dtype="uint8",
            int8_kernel="avxvnni",
            vector_lanes=8,
            vector_registers=16,
            cpu_flags=frozenset({"avx2", "fma", "avx_vnni"}),
        ),
        TargetPreset(
            name="x86-avx512vnni",
            description="x86-64 with AVX-512 VNNI (Cascade Lake and later, Zen 4 and later): vpdpbusd zmm",
            target={"kind": "llvm", "mcpu": "cascadelake", **_FULL_WIDTH},
            activation_dtype="uint8",
            int8_kernel="vnni",
            vector_lanes=16,
            cpu_flags=frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni"}),
        ),
        TargetPreset(
            name="arm",
            description="aarch64 Linux with NEON and the dot-product extension (sdot, ARMv8.2+)",
            target={**_AARCH64, "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod", "+fullfp16"]},
            activation_dtype="int8",
            fp16=True,
            int8_kernel="sdot",
            **_ARM64_CC,
        ),
        TargetPreset(
            name="arm-i8mm",
            description="aarch64 with the int8 matrix-multiply extension (smmla, ARMv8.6 i8mm: Graviton 3, "
                        "Neoverse V1/N2, Cortex-A710 and later): two pixels per instruction, sdot elsewhere",
            target={**_AARCH64, "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod", "+fullfp16", "+i8mm"]},
            activation_dtype="int8",
            fp16=True,
            int8_kernel="smmla",
            **_ARM64_CC,
        ),
        TargetPreset(
            name="rpi4",
            description="Raspberry Pi 4 / any ARMv8.0 (cortex-a72: NEON, no dot-product): exact int8 as smull+sadalp",
            target={**_AARCH64, "mcpu": "cortex-a72", "mattr": ["+neon"]},
            activation_dtype="int8",
            int8_kernel="smull",
            **_ARM64_CC,
        ),
        TargetPreset(
            name="rpi5",
            description="Raspberry Pi 5 (cortex-a76: NEON, dot-product, fp16)",
            target={**_AARCH64, "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod", "+fullfp16"]},
            activation_dtype="int8",
            fp16=True,
            int8_kernel="sdot",
            **_ARM64_CC,
        ),
        TargetPreset(
            name="arm32",
            description="armv7-a hard-float with NEON (no int8 dot-product): exact int8 as vmull.s8+vpadal.s16",
            target=dict(_ARMV7),
            activation_dtype="int8",
            int8_kernel="vmull",
            vector_registers=16,
            cross_compiler="arm-linux-gnueabihf-g++",
            apt_package="g++-arm-linux-gnueabihf",
            emulator="qemu-arm",
        ),
        TargetPreset(
            name="cuda",
            description="NVIDIA GPU (--arch sm_XX, default sm_90): int8 tensor cores / dp4a",
            target={**_CUDA, "arch": "sm_90"},
            activation_dtype="int8",
            fp16=True,
        ),
        TargetPreset(
            name="jetson-orin",
            description="NVIDIA Jetson Orin (aarch64 host + CUDA sm_87)",
            target={**_CUDA, "arch": "sm_87", "host": {**_AARCH64, "mcpu": "cortex-a78", "mattr": ["+neon", "+dotprod"]}},
            activation_dtype="int8",
            fp16=True,
            **_ARM64_CC,
        ),
    ]
    return {p.name: p for p in presets}


def list_presets() -> list[TargetPreset]:
    return [_x86_host(), *_static_presets().values()]


def get_preset(name: str | TargetPreset) -> TargetPreset:
    """The preset called ``name`` (a preset is returned as it is); a TvmqError listing the known names otherwise."""
    if isinstance(name, TargetPreset):
        return name
    if name == "x86":
        return _x86_host()
    presets = _static_presets()
    if name not in presets:
        known = ", ".join(["x86", *presets])
        raise TvmqError(f"unknown target {name!r}; choose one of: {known} (see `python -m tvmq targets`)")
    return presets[name]
