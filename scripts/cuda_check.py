"""The CUDA path on a GPU machine that has only the TVM runtime (no compiler, no apache-tvm).

Two steps, two machines:

    python scripts/cuda_check.py build DIR      # here: CUDA bundles (sm_90) + CPU int8 references
    python scripts/cuda_check.py run DIR        # on the GPU machine: needs numpy, tvm_ffi, torch (optional),
                                                # libtvm_runtime.so + libtvm_runtime_cuda.so (DIR/lib, or
                                                # TVMQ_RUNTIME_LIB) and libcudart on LD_LIBRARY_PATH

``build`` compiles the demo CNN, PP-OCR's classifier and a 512x1024x1024 GEMM for ``--target
cuda --arch sm_90`` in int8, fp16 and fp32, and the same int8 plans for the host CPU, whose
outputs are the references. ``run`` loads each bundle with ``tvmq/runtime.py`` alone, compares
its outputs with the CPU int8 build's, times it (kernels, synchronized; and a whole call with
the host copies), counts int8 instructions in its SASS (``cuobjdump``), times cuBLAS int8 /
fp16 / fp32 on the same GEMM through PyTorch, and writes ``gpu.json`` ($OUT or DIR).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def build(root: Path) -> None:
    import onnx

    from bench import ppocr_cls_case
    from tvmq.cli import main as cli
    from tvmq.commands import DEMO_DIR
    from tvmq.runtime import Bundle
    from tvmq.testing import matmul_model

    B = root / "bundles"
    B.mkdir(parents=True, exist_ok=True)
    work = root / "work"
    work.mkdir(exist_ok=True)

    def compile_one(name, model, calib, prec, shape):
        out = B / f"{name}-cuda-{prec}"
        shutil.rmtree(out, ignore_errors=True)
        args = ["compile", str(model), "--target", "cuda", "--arch", "sm_90", "--precision", prec, "-o", str(out)]
        args += ["--calib", str(calib)] if prec == "int8" else ["--shape", shape]
        if cli(args) != 0:
            raise SystemExit(f"compiling {name} {prec} for CUDA failed")
        return out

    def reference(model, cuda_bundle, xs, inp):
        cpu = work / f"{cuda_bundle.name}-cpu"  # one folder per model: dlopen keeps a path's first library
        shutil.rmtree(cpu, ignore_errors=True)
        if cli(["compile", str(model), "--plan", str(cuda_bundle / "plan.json"), "-o", str(cpu)]) != 0:
            raise SystemExit(f"compiling the CPU reference of {model} failed")
        b = Bundle(cpu)
        return np.stack([b.run({inp: x})[b.outputs[0]["name"]] for x in xs])

    rng = np.random.default_rng(0)
    cls = ppocr_cls_case(32, 32)
    cls_calib = work / "cls_calib"
    cls_calib.mkdir(exist_ok=True)
    for i, c in enumerate(cls["calib"]):
        np.save(cls_calib / f"{i:03d}.npy", c)
    onnx.save(matmul_model(512, 1024, 1024), work / "gemm.onnx")
    gemm_calib = work / "gemm_calib"
    gemm_calib.mkdir(exist_ok=True)
    for i in range(8):
        np.save(gemm_calib / f"{i}.npy", rng.uniform(-1, 1, (512, 1024)).astype(np.float32))
    cases = [
        ("digits", DEMO_DIR / "digits.onnx", DEMO_DIR / "digits_calib",
         np.load(DEMO_DIR / "digits_test.npz")["x"][:64, None].astype(np.float32), "input", "input:1,1,8,8"),
        ("ppocr_cls", cls["path"], cls_calib, np.stack(cls["x"]).astype(np.float32), "x", "x:1,3,48,192"),
        ("gemm", work / "gemm.onnx", gemm_calib, rng.uniform(-1, 1, (1, 512, 1024)).astype(np.float32), "x", "x:512,1024"),
    ]
    for name, model, calib, xs, inp, shape in cases:
        for prec in ("int8", "fp16", "fp32"):
            out = compile_one(name, model, calib, prec, shape)
            if prec == "int8":
                np.savez(B / f"{name}-ref.npz", x=xs, ref=reference(model, out, xs, inp))
    shutil.rmtree(work)
    lib = root / "lib"
    lib.mkdir(exist_ok=True)
    import tvm

    for f in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copyfile(Path(tvm.__file__).parent / "lib" / f, lib / f)
    print(f"wrote {root}: bundles/, lib/ (add libcudart if the GPU machine lacks it)")


def timed(fn, sync, runs=200, warm=0.5):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warm:
        fn()
    sync()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ts))


def run(root: Path) -> dict:
    if not os.environ.get("TVMQ_RUNTIME_LIB") and (root / "lib" / "libtvm_runtime.so").exists():
        os.environ["TVMQ_RUNTIME_LIB"] = str(root / "lib" / "libtvm_runtime.so")
    sys.path.insert(0, str(HERE.parent / "tvmq"))  # runtime.py alone: no tvmq package, no TVM compiler
    import tvm_ffi
    from runtime import Bundle, copy_to  # noqa: E402

    B = root / "bundles"
    dev = tvm_ffi.device("cuda", 0)
    out = {}
    for name in ("digits", "ppocr_cls", "gemm"):
        ref_file = B / f"{name}-ref.npz"
        if not ref_file.exists():
            continue
        z = np.load(ref_file)
        xs, ref = z["x"], z["ref"]
        row = {}
        for prec in ("int8", "fp16", "fp32"):
            try:
                b = Bundle(B / f"{name}-cuda-{prec}")
                spec = b.inputs[0]
                inp, oname = spec["name"], b.outputs[0]["name"]
                got = np.stack([b.run({inp: x.reshape(spec["shape"])})[oname] for x in xs]).reshape(ref.shape)
                r = {"max_abs_vs_cpu_int8": float(np.max(np.abs(got - ref))), "equal_fraction": float(np.mean(got == ref)),
                     "argmax_agree": float(np.mean(got.reshape(len(xs), -1).argmax(-1) == ref.reshape(len(xs), -1).argmax(-1))),
                     "kernels_int32": sum(1 for k in b.manifest["kernels"] if k["accumulator"] == "int32")}
                vm, _ = b._load()
                args = [copy_to(tvm_ffi.from_dlpack(a), dev) for a in b.check_inputs({inp: xs[0].reshape(spec["shape"])})]
                main, stream_sync = vm["main"], tvm_ffi.get_global_func("runtime.Device_StreamSync")
                r["median_ms"] = timed(lambda: main(*args), lambda: stream_sync(dev, 0))  # noqa: B023 (called here)
                x0 = {inp: xs[0].reshape(spec["shape"])}
                r["run_ms_with_copies"] = timed(lambda: b.run(x0), lambda: None, runs=100)  # noqa: B023 (called here)
            except Exception as err:  # report and go on
                r = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
            row[prec] = r
            print(name, prec, r, flush=True)
        out[name] = row
    try:
        import torch

        a = torch.randint(-128, 127, (512, 1024), dtype=torch.int8, device="cuda")
        w = torch.randint(-128, 127, (1024, 1024), dtype=torch.int8, device="cuda")
        f16a, f16w, f32a, f32w = a.half(), w.half(), a.float(), w.float()
        out["torch"] = {
            "int_mm_512x1024x1024_ms": timed(lambda: torch._int_mm(a, w), torch.cuda.synchronize),
            "fp16_mm_512x1024x1024_ms": timed(lambda: f16a @ f16w, torch.cuda.synchronize),
            "fp32_mm_512x1024x1024_ms": timed(lambda: f32a @ f32w, torch.cuda.synchronize),
            "device": torch.cuda.get_device_name(0),
        }
        print(out["torch"], flush=True)
    except Exception as err:  # noqa: BLE001
        out["torch"] = {"error": str(err)[:300]}
    out["sass"] = {}
    for b in sorted(B.glob("*-cuda-*")):
        data = (b / "model.so").read_bytes()
        i = data.find(bytes.fromhex("50ed55ba"))  # fatbin header: magic, version, header size, size
        if i < 0:
            continue
        header, size = struct.unpack_from("<HQ", data, i + 6)
        fat = Path("/tmp") / f"{b.name}.fatbin"
        fat.write_bytes(data[i:i + header + size])
        text = subprocess.run(["cuobjdump", "-sass", str(fat)], capture_output=True, text=True).stdout
        ops = {op: text.count(op) for op in ("IDP.4A", "IMMA", "HMMA", "IMAD", "FFMA", "HFMA2")}
        functions = text.split("Function :")[1:]
        ops["kernels"] = len(functions)
        # int8 kernels (int32 accumulators, from the manifest) whose device code has dp4a or IMMA
        integer = {k["func"] for k in json.loads((b / "manifest.json").read_text())["kernels"] if k["accumulator"] == "int32"}
        dot = {f.split()[0] for f in functions if "IDP.4A" in f or "IMMA" in f}
        ops["int8_kernels_with_dp4a"] = f"{sum(1 for k in integer if any(d.startswith(k) for d in dot))}/{len(integer)}"
        out["sass"][b.name] = ops
        print(b.name, ops, flush=True)
    dest = Path(os.environ.get("OUT") or root) / "gpu.json"
    dest.write_text(json.dumps(out, indent=1))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("build", "run"):
        print(__doc__)
        return 2
    (build if argv[0] == "build" else run)(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
