"""The TVM runtime for a board, and tvmq's C++ runner built against it.

A board needs ``libtvm_runtime.so`` and ``libtvm_ffi.so`` for its ISA, nothing else of TVM:

* x86-64: the libraries of the installed apache-tvm / apache-tvm-ffi wheels;
* aarch64: the same libraries from PyPI's aarch64 wheels of the pinned versions (downloaded
  once with pip, only the two libraries kept);
* armv7: PyPI has no armv7 build, and the sources inside the x86 wheel lack headers the
  runtime needs (``tvm/support/io.h``, ``serializer.h``), so no runtime can be made here.

``tvmq_run`` (``tvmq/runner/tvmq_run.cc``) needs only tvm-ffi's headers, which the wheel
ships. Everything is cached under ``~/.cache/tvmq/runtime`` (or ``$TVMQ_CACHE/runtime``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tvmq.errors import TvmqError

__all__ = ["runtime_libraries", "build_runner", "build_rpc_server", "cache_dir", "RUNNER_SOURCE", "RPC_SERVER_SOURCE",
           "triple_arch"]

RUNNER_SOURCE = Path(__file__).with_name("runner") / "tvmq_run.cc"
RPC_SERVER_SOURCE = Path(__file__).with_name("runner") / "tvmq_rpc_server.cc"
_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
_WHEEL_PLATFORMS = {
    "aarch64": ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_24_aarch64", "manylinux2014_aarch64"],
}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise TvmqError(f"the {name} package is not installed; pip install -e . brings it")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    return Path(os.environ.get("TVMQ_CACHE", Path.home() / ".cache" / "tvmq")) / "runtime"


def _versions() -> tuple[str, str]:
    from importlib import metadata

    return metadata.version("apache-tvm"), metadata.version("apache-tvm-ffi")


def triple_arch(triple: str | None) -> str:
    """``aarch64-linux-gnu`` -> ``aarch64``; ``armv7a-linux-gnueabihf`` -> ``armv7``; None -> host."""
    if not triple:
        return os.uname().machine
    head = triple.split("-")[0]
    return "armv7" if head.startswith("arm") else head


def runtime_libraries(arch: str) -> list[Path]:
    """``[libtvm_runtime.so, libtvm_ffi.so]`` for ``arch`` (``x86_64``, ``aarch64``)."""
    if arch == os.uname().machine:
        tvm_dir, ffi_dir = _package_dir("tvm"), _package_dir("tvm_ffi")
        libs = [tvm_dir / "lib" / "libtvm_runtime.so", ffi_dir / "lib" / "libtvm_ffi.so"]
        if not all(p.exists() for p in libs):
            raise TvmqError("the installed TVM wheels lack libtvm_runtime.so / libtvm_ffi.so; reinstall apache-tvm")
        return libs
    if arch not in _WHEEL_PLATFORMS:
        raise TvmqError(
            f"no TVM runtime is available for {arch}: PyPI publishes none and the wheel's sources are incomplete; "
            "build libtvm_runtime.so for the board from TVM's source tree"
        )
    tvm_v, ffi_v = _versions()
    out = cache_dir() / f"{arch}-tvm{tvm_v}-ffi{ffi_v}"
    libs = [out / name for name in _LIBS]
    if all(p.exists() for p in libs):
        return libs
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tvmq-wheels-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
               "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}"]
        for platform in _WHEEL_PLATFORMS[arch]:
            cmd += ["--platform", platform]
        cmd += [f"apache-tvm=={tvm_v}", f"apache-tvm-ffi=={ffi_v}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise TvmqError(f"downloading the {arch} TVM wheels failed: {proc.stderr.strip().splitlines()[-1][:300]}")
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                for member in z.namelist():
                    name = Path(member).name
                    if name in _LIBS and member.split("/")[-2] == "lib":
                        part = out / (name + ".part")
                        part.write_bytes(z.read(member))
                        os.replace(part, out / name)
    missing = [p.name for p in libs if not p.exists()]
    if missing:
        raise TvmqError(f"the {arch} TVM wheels did not contain {', '.join(missing)}")
    return libs


def _key(compiler: str, libs: list[Path], source: Path) -> str:
    raw = f"{compiler}|{[str(p) for p in libs]}|{source.read_text()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def build_runner(compiler: str, arch: str) -> Path:
    """Build ``tvmq_run`` for ``arch`` with ``compiler`` (cached); it sits beside copies of the
    runtime libraries it loads (``$ORIGIN`` rpath), so the folder can be copied to a board."""
    return _build(compiler, arch, RUNNER_SOURCE, "runner")


def build_rpc_server(compiler: str, arch: str) -> Path:
    """Build ``tvmq_rpc_server`` (a TVM RPC server without Python) for ``arch`` (cached)."""
    return _build(compiler, arch, RPC_SERVER_SOURCE, "rpc-server")


def _build(compiler: str, arch: str, source: Path, kind: str) -> Path:
    if shutil.which(compiler) is None:
        raise TvmqError(f"compiler {compiler} not found; install it (e.g. apt-get install g++-aarch64-linux-gnu)")
    libs = runtime_libraries(arch)
    out = cache_dir() / f"{kind}-{arch}-{_key(compiler, libs, source)}"
    exe = out / source.stem
    if exe.exists():
        return exe
    out.mkdir(parents=True, exist_ok=True)
    for lib in libs:
        shutil.copyfile(lib, out / lib.name)
    ffi = _package_dir("tvm_ffi")
    cmd = [
        compiler, "-std=c++17", "-O2", str(source), "-o", str(exe) + ".part",
        f"-I{ffi / 'include'}", f"-I{ffi / '3rdparty' / 'dlpack' / 'include'}",
        f"-L{out}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed",
        "-Wl,-rpath,$ORIGIN", "-Wl,--allow-shlib-undefined", "-lpthread", "-ldl",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise TvmqError(f"building {source.stem} with {compiler} failed: {proc.stderr.strip()[:400]}")
    os.replace(str(exe) + ".part", exe)
    return exe
