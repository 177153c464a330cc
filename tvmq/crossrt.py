"""The TVM runtime for a board, and tvmq's C++ runner built against it.

A board needs ``libtvm_runtime.so`` and ``libtvm_ffi.so`` for its ISA, nothing else of TVM:

* x86-64: the libraries of the installed apache-tvm / apache-tvm-ffi wheels;
* aarch64: the same libraries from PyPI's aarch64 wheels of the pinned versions (downloaded
  once with pip, only the two libraries kept);
* armv7: PyPI has no armv7 build, so both libraries are cross-compiled here: TVM's runtime from
  the sources inside the installed wheel (plus the few headers it omits, kept in
  ``runner/tvm_headers``) and tvm-ffi from its source distribution on PyPI (sha256 checked).

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
    """``[libtvm_runtime.so, libtvm_ffi.so]`` for ``arch`` (``x86_64``, ``aarch64``, ``armv7``)."""
    if arch == os.uname().machine:
        tvm_dir, ffi_dir = _package_dir("tvm"), _package_dir("tvm_ffi")
        libs = [tvm_dir / "lib" / "libtvm_runtime.so", ffi_dir / "lib" / "libtvm_ffi.so"]
        if not all(p.exists() for p in libs):
            raise TvmqError("the installed TVM wheels lack libtvm_runtime.so / libtvm_ffi.so; reinstall apache-tvm")
        return libs
    if arch in _SOURCE_BUILDS:
        return _runtime_from_source(arch)
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


# ISAs without PyPI wheels: the runtime is cross-compiled from source with these flags.
_SOURCE_BUILDS = {
    "armv7": ("arm-linux-gnueabihf-g++", ["-march=armv7-a", "-mfpu=neon", "-mfloat-abi=hard"], "g++-arm-linux-gnueabihf"),
}
# tvm-ffi's source distribution for each pinned version: (sha256, PyPI file name).
_FFI_SDIST_SHA256 = {"0.1.14.post1": "8ebd92dc97cdcb22ab494aa252c868ddd6a9b6c89be69188562e0f236652429f"}
_FFI_SOURCES = [
    "backtrace.cc", "object.cc", "error.cc", "function.cc", "tensor.cc", "dtype.cc", "container.cc", "init_once.cc",
    "custom_allocator.cc", "extra/structural_equal.cc", "extra/structural_hash.cc", "extra/structural_visit.cc",
    "extra/structural_mutate.cc", "extra/visit_error_context.cc", "extra/json_parser.cc", "extra/json_writer.cc",
    "extra/serialization.cc", "extra/dataclass.cc", "extra/reflection_extra.cc", "extra/module.cc",
    "extra/library_module.cc", "extra/library_module_system_lib.cc", "extra/library_module_dynamic_lib.cc",
    "extra/env_context.cc", "extra/env_c_api.cc",
]
# What a tvmq bundle needs of TVM's runtime: tensors, modules, the CPU device, threads, the Relax VM
# and the RPC server side.
_RUNTIME_SOURCES = [
    "builtin_fp16.cc", "const_loader_module.cc", "cpu_device_api.cc", "device_api.cc", "file_utils.cc", "logging.cc",
    "memory/memory_manager.cc", "module.cc", "static_library.cc", "tensor.cc", "thread_pool.cc",
    "threading_backend.cc", "timer.cc", "workspace_pool.cc", "vm/attn_backend.cc", "vm/builtin.cc", "vm/bytecode.cc",
    "vm/executable.cc", "vm/kv_state.cc", "vm/lm_support.cc", "vm/paged_kv_cache.cc", "vm/rnn_state.cc",
    "vm/tensor_cache_support.cc", "vm/vm.cc",
    "rpc/rpc_channel.cc", "rpc/rpc_device_api.cc", "rpc/rpc_endpoint.cc", "rpc/rpc_event_impl.cc",
    "rpc/rpc_local_session.cc", "rpc/rpc_module.cc", "rpc/rpc_server_env.cc", "rpc/rpc_session.cc",
    "rpc/rpc_socket_impl.cc",
]
_VENDORED_HEADERS = Path(__file__).with_name("runner") / "tvm_headers"


def _ffi_sdist(version: str) -> Path:
    """tvm-ffi's source tree for ``version``, downloaded once from PyPI and checked."""
    import tarfile
    import urllib.request

    src = cache_dir() / "src" / f"apache_tvm_ffi-{version}"
    if (src / "src" / "ffi").is_dir():
        return src
    digest = _FFI_SDIST_SHA256.get(version)
    if digest is None:
        raise TvmqError(f"no known source distribution of apache-tvm-ffi {version}; pin apache-tvm-ffi==0.1.14.post1")
    index = os.environ.get("TVMQ_PYPI_SIMPLE", "https://pypi.org/simple")
    name = f"apache_tvm_ffi-{version}.tar.gz"
    try:
        with urllib.request.urlopen(f"{index}/apache-tvm-ffi/", timeout=60) as resp:
            page = resp.read().decode()
        start = page.index(name)
        href = page[page.rindex('href="', 0, start) + 6:page.index('"', start)].split("#")[0].replace("&amp;", "&")
        with urllib.request.urlopen(urllib.parse.urljoin(f"{index}/apache-tvm-ffi/", href), timeout=300) as resp:
            data = resp.read()
    except (OSError, ValueError) as err:
        raise TvmqError(f"downloading tvm-ffi's sources ({name}) from {index} failed: {err}; "
                        "check the network or set TVMQ_PYPI_SIMPLE to a PyPI mirror") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise TvmqError(f"{name} from {index} does not have the expected sha256; refusing to build from it")
    src.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        archive = Path(tmp) / name
        archive.write_bytes(data)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.split("/")[1:2] in (["src"], ["include"], ["3rdparty"]) and (m.isfile() or m.isdir())]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **safe)  # noqa: S202  (checked archive, regular files only)
        os.replace(Path(tmp) / f"apache_tvm_ffi-{version}", src)
    return src


def _runtime_from_source(arch: str) -> list[Path]:
    """Cross-compile ``libtvm_ffi.so`` and ``libtvm_runtime.so`` for ``arch`` (cached; a few minutes)."""
    import concurrent.futures

    compiler, flags, package = _SOURCE_BUILDS[arch]
    if shutil.which(compiler) is None:
        raise TvmqError(f"compiler {compiler} not found; install it (apt-get install {package})")
    tvm_v, ffi_v = _versions()
    out = cache_dir() / f"{arch}-tvm{tvm_v}-ffi{ffi_v}"
    libs = [out / name for name in _LIBS]
    if all(p.exists() for p in libs):
        return libs
    ffi = _ffi_sdist(ffi_v)
    wheel = _package_dir("tvm")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"tvmq-rt-{arch}-") as tmp:
        tree = Path(tmp) / "tvm"
        # The wheel's runtime sources and headers, with the headers it omits laid over them.
        shutil.copytree(wheel / "include", tree / "include")
        shutil.copytree(wheel / "src" / "runtime", tree / "src" / "runtime", ignore=shutil.ignore_patterns("extra"))
        shutil.copytree(_VENDORED_HEADERS, tree, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))
        common = [compiler, "-std=c++17", "-O2", "-fPIC", *flags,
                  f"-I{ffi / 'include'}", f"-I{ffi / '3rdparty' / 'dlpack' / 'include'}", "-DTVM_FFI_EXPORTS",
                  "-DTVM_FFI_USE_LIBBACKTRACE=0", "-DTVM_FFI_BACKTRACE_ON_SEGFAULT=0"]
        jobs = [(ffi / "src" / "ffi" / f, Path(tmp) / "ffi" / (f.replace("/", "_") + ".o"), []) for f in _FFI_SOURCES]
        jobs += [(tree / "src" / "runtime" / f, Path(tmp) / "rt" / (f.replace("/", "_") + ".o"),
                  [f"-I{tree / 'include'}", f"-I{tree / 'src'}", f"-I{tree / '3rdparty' / 'compiler-rt'}",
                   "-DTVM_RUNTIME_EXPORTS", "-DTVM_INDEX_DEFAULT_I64=1"]) for f in _RUNTIME_SOURCES]

        def compile_one(job):
            source, obj, extra = job
            obj.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run([*common, *extra, "-c", str(source), "-o", str(obj)], capture_output=True, text=True)
            if proc.returncode:
                raise TvmqError(f"building TVM's runtime for {arch}: {source.name} failed: {proc.stderr.strip()[:400]}")

        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(compile_one, jobs))
        links = [
            ("libtvm_ffi.so", sorted((Path(tmp) / "ffi").glob("*.o")), []),
            ("libtvm_runtime.so", sorted((Path(tmp) / "rt").glob("*.o")), [f"-L{tmp}", "-ltvm_ffi"]),
        ]
        for name, objs, extra in links:
            cmd = [compiler, "-shared", "-s", *flags, "-o", str(Path(tmp) / name), *map(str, objs), *extra,
                   f"-Wl,-soname,{name}", "-lpthread", "-ldl"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise TvmqError(f"linking {name} for {arch} failed: {proc.stderr.strip()[:400]}")
        for name in _LIBS:
            shutil.copyfile(Path(tmp) / name, out / (name + ".part"))
            os.replace(out / (name + ".part"), out / name)
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
