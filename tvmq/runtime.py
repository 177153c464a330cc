"""Run a tvmq bundle with only the TVM runtime: no compiler, no ``import tvm``.

This file is copied into every bundle as ``run.py``; it depends on numpy, ``tvm_ffi`` and the
shared library ``libtvm_runtime.so`` (from the apache-tvm wheel, or next to the bundle in
``lib/``). ``import tvm`` itself cannot be used on a board: in TVM 0.27 it needs the compiler
library even with ``TVM_USE_RUNTIME_LIB=1``.

Usage::

    python run.py BUNDLE_DIR --input x.npy [--output y.npz]
    python run.py BUNDLE_DIR --input inputs.npz --output y.npz   # name -> array
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["Bundle", "BundleError", "configure_threads", "find_runtime_library", "init_vm", "load_runtime", "main", "median_ms",
           "physical_cores"]

MANIFEST = "manifest.json"
_DEVICE = {"cpu": 1, "cuda": 2}
_POOLED_ALLOCATOR = 2


def shape_problem(shape: list[int], expected: list, dims: dict, sizes: dict) -> str | None:
    """Why ``shape`` does not fit ``expected`` (ints, and names of dynamic dimensions whose ranges
    ``dims`` holds; ``sizes`` collects their values across the inputs): None when it fits, else
    the text to append to the error (empty when the mismatch is plain)."""
    if len(shape) != len(expected):
        return ""
    for got, want in zip(shape, expected):
        if isinstance(want, str):
            lo, hi, *step = dims.get(want, (1, 2**62))
            if not lo <= got <= hi or (step and got % step[0]):
                multiple = f", multiples of {step[0]}" if step else ""
                return (f" with {want} in {lo}..{hi}{multiple} (the range it was compiled for; recompile with a "
                        f"wider --dim {want}=..)")
            if sizes.setdefault(want, got) != got:
                return f" ({want} is {sizes[want]} in another input: one size per dimension)"
        elif got != want:
            return ""
    return None


class BundleError(Exception):
    """A bundle that cannot be used as it is (missing, altered, or for another machine)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def physical_cores(sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores this process may run on: CPUs in its affinity mask, SMT siblings counted once."""
    if not hasattr(os, "sched_getaffinity"):
        return os.cpu_count() or 1
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:  # no topology (some containers, emulators): count the CPU itself
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def configure_threads(threads: int | None = None) -> int:
    """Set how many threads the TVM runtime runs kernels on; returns the number in effect.

    ``threads`` sets it; ``None`` keeps ``TVM_NUM_THREADS`` / ``OMP_NUM_THREADS`` when the user set
    one, else uses :func:`physical_cores` (what ONNX Runtime uses). Left unset, TVM 0.27 runs on half
    the CPUs on x86 (one core of a 2-core machine) and calls ``std::thread::hardware_concurrency()``
    at every parallel kernel launch, which glibc answers by reading sysfs: about 6 us per kernel,
    more than doubling the latency of small models. Takes effect in threads that have not run a
    parallel kernel yet (TVM sizes each thread's pool once).
    """
    if threads is not None:
        if threads < 1:
            raise BundleError(f"--threads must be at least 1, not {threads}")
        os.environ["TVM_NUM_THREADS"] = str(threads)
    elif not (os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
    value = os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    try:
        return max(1, int(value))
    except ValueError:
        raise BundleError(f"TVM_NUM_THREADS/OMP_NUM_THREADS is {value!r}; set a whole number of threads") from None


def find_runtime_library(bundle: Path | None = None) -> list[Path]:
    """``libtvm_runtime.so`` (plus the CUDA runtime when present), bundle-local first."""
    candidates = []
    if os.environ.get("TVMQ_RUNTIME_LIB"):
        candidates.append(Path(os.environ["TVMQ_RUNTIME_LIB"]))
    if bundle is not None:
        candidates.append(bundle / "lib" / "libtvm_runtime.so")
    spec = importlib.util.find_spec("tvm")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "lib" / "libtvm_runtime.so")
    for lib in candidates:
        if lib.exists():
            return [lib]
    raise BundleError(
        "libtvm_runtime.so not found; pip install apache-tvm (or copy the library into the bundle's lib/ "
        "folder, or set TVMQ_RUNTIME_LIB)"
    )


def load_runtime(device: str = "cpu", bundle: Path | None = None) -> None:
    """Load ``libtvm_runtime.so`` (and, for ``device="cuda"``, its CUDA part) into the process,
    unless the full ``tvm`` package, which has them, is imported."""
    if "tvm" in sys.modules:
        return
    for lib in find_runtime_library(bundle):
        ctypes.CDLL(str(lib), ctypes.RTLD_GLOBAL)
        if device == "cuda":
            ctypes.CDLL(str(lib.with_name("libtvm_runtime_cuda.so")), ctypes.RTLD_GLOBAL)


def init_vm(module, device: str = "cpu"):
    """``(vm, device type)``: the Relax VM of a loaded library, on ``device``, pooled allocator."""
    vm = module["vm_load_executable"]()
    code = _DEVICE.get(device, 1)
    if code == 1:
        vm["vm_initialization"](code, 0, _POOLED_ALLOCATOR)
    else:
        vm["vm_initialization"](code, 0, _POOLED_ALLOCATOR, 1, 0, _POOLED_ALLOCATOR)
    return vm, code


_LOADED: dict[str, str] = {}  # library path -> sha256 of what was loaded from it in this process


def _load_library(tvm_ffi, path: Path):
    """``tvm_ffi.load_module(path)``, also when ``path`` was loaded before in this process and
    has been replaced since (a model recompiled into the same folder): dlopen returns the
    library already mapped for a path it has seen, so a changed file is loaded from a private
    copy, removed again once mapped."""
    key, digest = str(path.resolve()), sha256_file(path)
    if _LOADED.setdefault(key, digest) == digest:
        return tvm_ffi.load_module(str(path))
    fd, copy = tempfile.mkstemp(prefix="tvmq-", suffix=path.suffix)
    os.close(fd)
    try:
        shutil.copyfile(path, copy)
        return tvm_ffi.load_module(copy)
    finally:
        os.unlink(copy)


class Bundle:
    """A compiled model folder: ``model.so`` + ``manifest.json``.

    Parameters
    ----------
    path : str or Path
        The bundle folder.
    verify : bool
        Check every file's sha256 against the manifest before loading (default True).
    """

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise BundleError(f"{self.path} is not a tvmq bundle (no {MANIFEST}); pass the folder `tvmq compile -o` wrote")
        try:
            self.manifest = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise BundleError(f"{manifest} is damaged ({err}); recompile the model") from None
        if verify:
            self.verify()
        self._vm = None
        self.threads = None  # set when the runtime is loaded

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.manifest["outputs"]

    @property
    def library(self) -> Path:
        """The compiled model's shared library in this folder."""
        return self.path / self.manifest.get("library", "model.so")

    def verify(self) -> None:
        for name, expected in sorted(self.manifest.get("files", {}).items()):
            f = self.path / name
            if not f.is_file():
                raise BundleError(f"bundle file {name} is missing from {self.path}; recompile or copy the whole folder")
            if sha256_file(f) != expected:
                raise BundleError(
                    f"bundle file {name} does not match its checksum in {MANIFEST} (altered or truncated copy); "
                    "copy the bundle again or recompile"
                )

    def _load(self):
        if self._vm is not None:
            return self._vm
        import tvm_ffi

        self.threads = configure_threads()
        device_kind = self.manifest.get("target", {}).get("device", "cpu")
        load_runtime(device_kind, self.path)
        lib_path = self.library
        try:
            module = _load_library(tvm_ffi, lib_path)
        except Exception as err:  # wrong ISA, missing symbols, ...
            raise BundleError(
                f"cannot load {lib_path} on this machine ({str(err).splitlines()[0][:200]}); "
                f"it was built for {self.manifest.get('target', {}).get('triple', 'another target')}"
            ) from None
        self._vm = init_vm(module, device_kind)
        return self._vm

    def check_inputs(self, inputs: dict) -> list[np.ndarray]:
        arrays, sizes = [], {}  # sizes: the dynamic dimensions' values, equal across inputs
        names = [i["name"] for i in self.inputs]
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            raise BundleError(f"unknown input(s) {unknown}; the model takes {names}")
        for spec in self.inputs:
            if spec["name"] not in inputs:
                raise BundleError(f"missing input {spec['name']!r}; the model takes {names}")
            a = np.asarray(inputs[spec["name"]])
            problem = shape_problem(list(a.shape), spec["shape"], self.manifest.get("dims", {}), sizes)
            if problem is not None:
                raise BundleError(f"input {spec['name']!r} has shape {list(a.shape)}, the bundle expects "
                                  f"{spec['shape']}{problem}")
            if a.dtype.kind != np.dtype(spec["dtype"]).kind:
                raise BundleError(f"input {spec['name']!r} is {a.dtype}, the bundle expects {spec['dtype']}")
            arrays.append(aligned(a.astype(spec["dtype"], copy=False)))
        return arrays

    def shape_argument(self, arrays) -> list:
        """``[ShapeTuple]`` for a bundle whose dimensions are dynamic in steps (``--dim H=..:32``):
        each such dimension's size / step, after the inputs; ``[]`` otherwise."""
        import tvm_ffi

        names = [i["name"] for i in self.inputs]
        spec = self.manifest.get("shape_args") or []
        return [tvm_ffi.Shape([int(arrays[names.index(a["input"])].shape[a["axis"]]) // int(a["step"]) for a in spec])] \
            if spec else []

    def run(self, inputs: dict) -> dict:
        """``{input name: array}`` -> ``{output name: array}``."""
        import tvm_ffi

        vm, device = self._load()
        # Keep the aligned copies referenced until the call has returned.
        arrays = self.check_inputs(inputs)
        args = [tvm_ffi.from_dlpack(a) for a in arrays]
        if device != 1:
            args = [copy_to(a, tvm_ffi.device("cuda", 0)) for a in args]
        result = vm["main"](*args, *self.shape_argument(arrays))
        values = _flatten(result, host=device != 1)
        del arrays
        return {spec["name"]: v for spec, v in zip(self.outputs, values)}

    def prepared(self, inputs: dict):
        """A zero-argument callable running the model on ``inputs`` (converted once), for timing."""
        import tvm_ffi

        vm, _ = self._load()
        arrays = self.check_inputs(inputs)
        args = [tvm_ffi.from_dlpack(a) for a in arrays] + self.shape_argument(arrays)
        fn = vm["main"]

        def call(_keep=arrays):  # the aligned arrays live as long as the callable
            return fn(*args)

        return call

    def latency_ms(self, inputs: dict, repeat: int = 50, warmup: int = 5) -> float:
        return median_ms(self.prepared(inputs), repeat, warmup)


def median_ms(call, repeat: int, warmup: int) -> float:
    """Median wall time (ms) of ``call()`` over ``repeat`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def aligned(a: np.ndarray, alignment: int = 64) -> np.ndarray:
    """``a`` as a C-contiguous array whose data starts on an ``alignment``-byte boundary.

    TVM's generated code assumes 64-byte aligned tensors (what its own allocator returns) and
    uses aligned vector loads; numpy only guarantees 16 bytes, and a misaligned input passed
    zero-copy through DLPack crashes the kernel with SIGSEGV.
    """
    if a.flags.c_contiguous and a.ctypes.data % alignment == 0:
        return a
    raw = np.empty(a.nbytes + alignment, dtype=np.uint8)
    offset = (-raw.ctypes.data) % alignment
    out = raw[offset : offset + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def copy_to(tensor, device):
    """A copy of ``tensor`` on ``device`` (runtime-only API: no ``tvm`` package needed)."""
    import tvm_ffi

    alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
    copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")
    out = alloc(tvm_ffi.Shape(tensor.shape), tensor.dtype, device, "global")
    copy(tensor, out)  # (from, to): TVM 0.27's runtime takes no stream argument here
    return out


def _flatten(result, host: bool = False) -> list[np.ndarray]:
    if isinstance(result, (list, tuple)) or type(result).__name__ in ("Array", "List"):
        out = []
        for item in result:
            out.extend(_flatten(item, host))
        return out
    if host:
        import tvm_ffi

        result = copy_to(result, tvm_ffi.device("cpu", 0))
    if hasattr(result, "numpy"):
        return [result.numpy()]
    return [np.from_dlpack(result).copy()]


def read_inputs(path: Path, bundle: Bundle) -> dict:
    if not path.is_file():
        raise BundleError(f"input file {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        with open(path, "rb") as f:  # numpy ignores bytes after the data; a file that has them is damaged
            array = np.lib.format.read_array(f, allow_pickle=False)
            extra = os.fstat(f.fileno()).st_size - f.tell()
    except Exception as err:
        raise BundleError(f"cannot read {path} as numpy data ({type(err).__name__}); save it with numpy.save/savez") from None
    if extra:
        raise BundleError(f"{path}: shape {array.shape} of {array.dtype} needs {array.nbytes} data bytes, the file has "
                          f"{array.nbytes + extra} (trailing bytes); save it again with numpy.save")
    if len(bundle.inputs) != 1:
        names = [i["name"] for i in bundle.inputs]
        raise BundleError(f"the model has {len(names)} inputs {names}; pass an .npz mapping each name to its array")
    return {bundle.inputs[0]["name"]: array}


def run_cli(bundle_dir, input_path, output_path=None, verify=True, stdout=None, threads=None) -> int:
    configure_threads(threads)
    bundle = Bundle(bundle_dir, verify=verify)
    outputs = bundle.run(read_inputs(Path(input_path), bundle))
    write_outputs(outputs, output_path, stdout)
    return 0


def write_outputs(outputs: dict, output_path=None, stdout=None) -> None:
    """Save ``outputs`` to an .npz (atomically), or print them."""
    stdout = stdout or sys.stdout
    if output_path:
        output_path = Path(output_path)
        tmp = output_path.with_name(output_path.name + ".part")
        with open(tmp, "wb") as f:
            np.savez(f, **outputs)
        os.replace(tmp, output_path)
        print(f"wrote {output_path}: " + ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in outputs.items()), file=stdout)
    else:
        for name, value in outputs.items():
            with np.printoptions(precision=5, suppress=True, threshold=64):
                print(f"{name} {list(value.shape)} {value.dtype}\n{value}", file=stdout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="run.py", description="Run a tvmq bundle with only the TVM runtime.")
    parser.add_argument("bundle", nargs="?", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--input", required=True, help=".npy (single input) or .npz (name -> array)")
    parser.add_argument("--output", help="write outputs to this .npz")
    parser.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    parser.add_argument("--threads", type=int, help="CPU threads (default: TVM_NUM_THREADS, else the physical cores)")
    args = parser.parse_args(argv)
    try:
        return run_cli(args.bundle, args.input, args.output, verify=not args.no_verify, threads=args.threads)
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
