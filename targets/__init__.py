"""Target presets: what to compile for, and how to quantize for it.

A preset names a TVM target (as a JSON dict, the only form TVM 0.27 accepts), the integer
types its dot-product instruction wants (x86 VNNI multiplies u8 x s8, ARM sdot s8 x s8), the
cross compiler that links its libraries and the emulator that can run them here.

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
    fast_int8 : bool
        Whether the ISA has an int8 dot-product instruction (VNNI, sdot, dp4a/IMMA).
    cross_compiler : str or None
        Compiler driver that links the library; ``None`` links with the host compiler.
    apt_package : str or None
        Debian package that provides ``cross_compiler``.
    emulator : str or None
        qemu-user binary that runs the target's code here.
    fp16 : bool
        Whether the target has fast native fp16 arithmetic.
    dot_product : str or None
        The 4-way int8 dot-product instruction tvmq tensorizes with: ``"vnni"`` (x86
        ``vpdpbusd``, u8 x s8), ``"sdot"`` (ARM, s8 x s8), or None (widening multiply-adds).
    vector_lanes : int
        float32 lanes of one vector register (AVX-512: 16, AVX2: 8, NEON: 4).
    """

    name: str
    description: str
    target: dict = field(default_factory=dict)
    activation_dtype: str = "uint8"
    weight_dtype: str = "int8"
    fast_int8: bool = True
    cross_compiler: str | None = None
    apt_package: str | None = None
    emulator: str | None = None
    fp16: bool = False
    dot_product: str | None = None
    vector_lanes: int = 4

    def __post_init__(self):
        if self.activation_dtype not in ("uint8", "int8"):
            raise ValueError(f"activation_dtype must be uint8 or int8, not {self.activation_dtype!r}")
        if self.weight_dtype != "int8":
            raise ValueError(f"weight_dtype must be int8, not {self.weight_dtype!r}")

    @property
    def kind(self) -> str:
        return self.target.get("kind", "llvm")

    @property
    def is_host(self) -> bool:
        """True when libraries built for this preset run natively on this machine."""
        return self.kind == "llvm" and self.cross_compiler is None

    def tvm_target(self):
        import tvm

        return tvm.target.Target(dict(self.target))

    def with_target(self, **changes) -> "TargetPreset":
        return dataclasses.replace(self, target={**self.target, **changes})

    def warnings(self) -> list[str]:
        """What a user should know before deploying with this preset."""
        notes = []
        if not self.fast_int8:
            notes.append(
                f"target {self.name!r} has no int8 dot-product instruction "
                f"({self.target.get('mcpu') or self.target.get('mtriple') or 'this CPU'}): int8 kernels still run, "
                "as widening multiply-adds, and may be no faster than fp32"
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


def _x86_host() -> TargetPreset:
    from tvmq._compat import llvm_host_cpu

    flags = host_cpu_flags()
    vnni = bool({"avx512_vnni", "avx_vnni"} & flags)
    cores = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return TargetPreset(
        name="x86",
        description="this machine's x86-64 CPU (features detected; VNNI u8 x s8 when present)",
        target={"kind": "llvm", "mcpu": llvm_host_cpu(), "num-cores": cores},
        activation_dtype="uint8",
        fast_int8=vnni,
        dot_product="vnni" if "avx512_vnni" in flags and "avx512vl" in flags else None,
        vector_lanes=16 if "avx512f" in flags else 8 if "avx2" in flags else 4,
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
            name="x86-avx512",
            description="any x86-64 CPU with AVX-512 VNNI (Cascade Lake and later, Zen 4 and later)",
            target={"kind": "llvm", "mcpu": "cascadelake"},
            activation_dtype="uint8",
            dot_product="vnni",
            vector_lanes=16,
        ),
        TargetPreset(
            name="arm",
            description="aarch64 Linux with NEON and the dot-product extension (sdot, ARMv8.2+)",
            target={**_AARCH64, "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod", "+fullfp16"]},
            activation_dtype="int8",
            fp16=True,
            dot_product="sdot",
            **_ARM64_CC,
        ),
        TargetPreset(
            name="rpi4",
            description="Raspberry Pi 4 (cortex-a72: NEON, no dot-product)",
            target={**_AARCH64, "mcpu": "cortex-a72", "mattr": ["+neon"]},
            activation_dtype="int8",
            fast_int8=False,
            **_ARM64_CC,
        ),
        TargetPreset(
            name="rpi5",
            description="Raspberry Pi 5 (cortex-a76: NEON, dot-product, fp16)",
            target={**_AARCH64, "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod", "+fullfp16"]},
            activation_dtype="int8",
            fp16=True,
            dot_product="sdot",
            **_ARM64_CC,
        ),
        TargetPreset(
            name="arm32",
            description="armv7-a hard-float with NEON (no int8 dot-product)",
            target=dict(_ARMV7),
            activation_dtype="int8",
            fast_int8=False,
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


def get_preset(name: str) -> TargetPreset:
    """The preset called ``name``; a TvmqError listing the known names otherwise."""
    if name == "x86":
        return _x86_host()
    presets = _static_presets()
    if name not in presets:
        known = ", ".join(["x86", *presets])
        raise TvmqError(f"unknown target {name!r}; choose one of: {known} (see `python -m tvmq targets`)")
    return presets[name]
