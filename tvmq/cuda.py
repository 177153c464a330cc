"""Compile CUDA bundles with device code inside, on a build machine without a GPU.

TVM 0.27 compiles CUDA kernels through ``tvm_callback_cuda_compile`` only when its CUDA
runtime library (``libtvm_runtime_cuda.so``) is loaded; otherwise the library keeps the CUDA
*source*, to be compiled on the device at load time (NVRTC, which a board may lack). That
library links against the driver (``libcuda.so.1``), absent where there is no GPU. For a build
machine tvmq loads, in that case only, a stub with the driver's soname whose entry points all
fail: building never calls them (device code is only compiled, with nvcc, and stored), and the
process that builds never runs kernels.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

from tvmq.errors import TvmqError

__all__ = ["prepare_cuda_build", "library_has_cuda_source"]

_STATE = {"ready": False}


def _runtime_cuda_path() -> Path:
    import tvm

    return Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"


def _driver_stub(lib: Path) -> Path:
    from tvmq.crossrt import cache_dir

    stub = cache_dir() / "libcuda_stub.so"
    if stub.exists():
        return stub
    if shutil.which("nm") is None or shutil.which("cc") is None:
        raise TvmqError("building CUDA bundles without a GPU needs binutils and a C compiler: apt-get install build-essential")
    out = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    symbols = sorted({line.split()[-1].split("@")[0] for line in out.splitlines() if line.split()[-1].startswith("cu")})
    stub.parent.mkdir(parents=True, exist_ok=True)
    src = stub.with_suffix(".c")
    # Every entry point returns CUDA_ERROR_NOT_INITIALIZED (3).
    src.write_text("".join(f"int {s}(void) {{ return 3; }}\n" for s in symbols))
    tmp = stub.with_suffix(".so.part")
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)], check=True)
    os.replace(tmp, stub)
    return stub


def prepare_cuda_build() -> None:
    """Make TVM compile CUDA kernels with nvcc into the library (fatbin) during this process."""
    if _STATE["ready"]:
        return
    if shutil.which("nvcc") is None:
        raise TvmqError("nvcc not found: the CUDA target compiles device code at build time; install the CUDA toolkit")
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    lib = _runtime_cuda_path()
    try:
        ctypes.CDLL(str(lib), ctypes.RTLD_GLOBAL)
    except OSError:
        ctypes.CDLL(str(_driver_stub(lib)), ctypes.RTLD_GLOBAL)  # no driver here: build-only stub
        ctypes.CDLL(str(lib), ctypes.RTLD_GLOBAL)
    import tvm.support.nvcc  # noqa: F401  (registers tvm_callback_cuda_compile)

    _STATE["ready"] = True


def library_has_cuda_source(path) -> bool:
    """True when an exported library still embeds CUDA C source (device code not compiled)."""
    return b"__global__" in Path(path).read_bytes()
