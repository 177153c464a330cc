"""Latency and accuracy: TVM FP32 vs tvmq INT8 vs ONNX Runtime FP32 and INT8, in one run.

Same machine, same thread count, same calibration samples for both quantizers, medians of
``--runs`` timed calls (batch 1) after warm-up. Models:

* ``digits``    the embedded demo CNN, accuracy on its held-out test split;
* ``ppocr_cls`` PP-OCR's text-orientation classifier (rapidocr-onnxruntime wheel), accuracy on
  rendered text lines, half of them rotated by 180 degrees;
* ``ppocr_rec`` PP-OCRv4's text recogniser (same wheel), exact-string accuracy (and character
  error rate) on rendered text lines, greedy CTC decoding;
* ``ppocr_det`` PP-OCRv4's text detector (same wheel; ConvTranspose and Resize in its DB head),
  on rendered 320x320 pages: "accuracy" is the text mask's IoU with ONNX Runtime FP32's
  (``--models ppocr_det``; not in the default set).

Each engine is timed in a process of its own, as in deployment (two runtimes in one process
disturb each other, see ``isolated_medians``), in rounds: every engine in turn, so drift in a
shared machine's speed hits all of them alike.

ONNX Runtime INT8 is its ``quantize_static`` in QDQ format with per-channel int8 weights and
uint8 activations (its fastest INT8 configuration on x86), MinMax calibration.

Usage::

    pip install -e ".[bench]"
    python scripts/bench.py [--models digits,ppocr_cls,ppocr_rec] [--runs 50] [--threads 2] [--json out.json]
    python scripts/bench.py --tune 16 --max-tasks 12     # tune FP32 and INT8 with the same budget first
    python scripts/bench.py --auto 0.3                   # also --precision auto (max drop 0.3 pt) and
                                                         # INC-style fallback, on a separate validation set

With ``--auto``, the plan is searched on a labelled validation set (digits: the last 150 test
images, which are then left out of the evaluation; PP-OCR: lines rendered with another seed)
and scored, like every engine, on the evaluation set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENGINES = ("tvm_fp32", "tvmq_int8", "ort_fp32", "ort_int8")
AUTO_ENGINES = ("tvmq_plan", "tvmq_fallback")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def isolated_medians(engines: dict, runs: int, threads: int, rounds: int = 10) -> dict:
    """``{name: engine}`` -> ``{name: median ms}``, each engine timed alone in a fresh process.

    An engine is ``{"tvm": library path}`` (a bundle's ``model.so`` or an exported executable) or
    ``{"ort": model path}``, plus ``"inputs": [[name, .npy path], ...]`` in the model's order.
    Two runtimes in one process disturb each other: ONNX Runtime's idle workers spin and TVM
    pins its workers to cores. Measured on the PP-OCR classifier: tvmq 0.22 ms alone, 0.45 ms
    with ONNX Runtime sessions in the process (timed in turns, the first call of each turn
    untimed); with their spinning turned off, tvmq 0.22 ms and ONNX Runtime 0.55 -> 0.92 ms. So
    each engine runs alone, as in deployment: ``rounds`` rounds, each engine in turn in a new
    process (warm-up, then ``runs / rounds`` timed calls); the median of all its calls.
    """
    samples = {name: [] for name in engines}
    per_round = max(1, -(-runs // rounds))
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    for _ in range(rounds):
        for name, engine in engines.items():
            spec = json.dumps({**engine, "runs": per_round, "threads": threads})
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--time-worker", spec],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                raise RuntimeError(f"timing {name} failed: {proc.stderr.strip()[-800:]}")
            samples[name] += json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: float(np.median(v)) for name, v in samples.items()}


def _time_worker(spec: dict) -> list[float]:
    """One engine's call times (ms) in this process: what ``isolated_medians`` runs."""
    inputs = [(name, np.load(path)) for name, path in spec["inputs"]]
    if "ort" in spec:
        sess = ort_session(spec["ort"], spec["threads"])
        feed = dict(inputs)

        def call():
            sess.run(None, feed)
    else:
        import tvm_ffi

        from tvmq.runtime import aligned, configure_threads, init_vm, load_runtime

        configure_threads(spec["threads"])
        load_runtime()
        vm, _ = init_vm(tvm_ffi.load_module(spec["tvm"]))
        arrays = [aligned(a) for _, a in inputs]
        args, main = [tvm_ffi.from_dlpack(a) for a in arrays], vm["main"]

        def call():
            main(*args)

    # Warm up for a while, not a few calls: with 5 warm-up calls a fresh process's timed calls
    # were sometimes twice as slow as the same engine's after 0.3 s of calls.
    start = time.perf_counter()
    while time.perf_counter() - start < 0.3:
        call()
    times = []
    for _ in range(spec["runs"]):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def input_files(folder: Path, inputs: dict) -> list:
    """``{name: array}`` saved as .npy files, as ``isolated_medians`` takes them."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (name, array) in enumerate(inputs.items()):
        np.save(folder / f"{i}.npy", np.ascontiguousarray(array))
        out.append([name, str(folder / f"{i}.npy")])
    return out


def top1(outputs, labels) -> dict:
    return {"accuracy": float(np.mean([np.argmax(o) == y for o, y in zip(outputs, labels)]))}


# ----------------------------------------------------------------------------- models
def digits_case(n_eval, n_calib):
    from tvmq.commands import DEMO_DIR

    test = np.load(DEMO_DIR / "digits_test.npz")
    calib = [np.load(p) for p in sorted((DEMO_DIR / "digits_calib").glob("*.npy"))][:n_calib]
    n_eval = min(n_eval, len(test["y"]) - 150)  # the last 150 images: validation for --auto
    xs, ys = test["x"][:n_eval, None], test["y"][:n_eval]
    return {"path": DEMO_DIR / "digits.onnx", "input": "input", "calib": calib, "x": xs, "y": ys, "score": top1,
            "val": (test["x"][-150:, None], test["y"][-150:]), "metric": "top1"}


def ppocr_cls_case(n_eval, n_calib):
    from ocrdata import cls_set, ppocr_model

    x, y = cls_set(n_eval, seed=1)
    calib, _ = cls_set(n_calib, seed=2)
    return {"path": ppocr_model("cls"), "input": "x", "calib": list(calib), "x": x, "y": y, "score": top1,
            "val": cls_set(150, seed=3), "metric": "top1"}


def ppocr_rec_case(n_eval, n_calib):
    from ocrdata import ctc_decode, edit_distance, ppocr_model, rec_charset, rec_set

    charset = rec_charset(ppocr_model("rec"))
    x, texts = rec_set(n_eval, seed=1)
    calib, _ = rec_set(n_calib, seed=2)

    def score(outputs, labels):
        pred = [ctc_decode(o, charset).strip() for o in outputs]
        errors = sum(edit_distance(p, t) for p, t in zip(pred, labels))
        return {"accuracy": float(np.mean([p == t for p, t in zip(pred, labels)])),
                "cer": errors / sum(len(t) for t in labels)}

    return {"path": ppocr_model("rec"), "input": "x", "calib": list(calib), "x": x, "y": texts, "score": score,
            "val": rec_set(150, seed=3), "metric": "python:ocrdata:rec_exact"}


def ppocr_det_case(n_eval, n_calib):
    """PP-OCRv4's text detector (DB head: ConvTranspose, Resize) on 320x320 pages; its score is the
    text mask's IoU with ONNX Runtime FP32's (threshold 0.3), averaged over the pages."""
    from ocrdata import binary_map_iou, det_set, ppocr_model

    x = det_set(min(n_eval, 40), seed=1)
    calib = det_set(min(n_calib, 16), seed=2)
    reference = ort_session(ppocr_model("det"), 2)
    maps = [reference.run(None, {"x": xi})[0] for xi in x]

    def score(outputs, labels):
        return {"accuracy": float(np.mean([binary_map_iou(o, r) for o, r in zip(outputs, labels)]))}

    return {"path": ppocr_model("det"), "input": "x", "calib": list(calib), "x": x, "y": maps, "score": score,
            "val": None, "metric": None}


CASES = {"digits": digits_case, "ppocr_cls": ppocr_cls_case, "ppocr_rec": ppocr_rec_case, "ppocr_det": ppocr_det_case}


# ----------------------------------------------------------------------------- engines
def ort_session(path, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_quantize(path, name, calib, out_dir):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(c if isinstance(c, dict) else {name: c} for c in calib)  # samples or input dicts

        def get_next(self):
            return next(self.it, None)

    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ONNX Runtime's recommended pre-processing (shape inference, BatchNormalization folded, weights
    # held in Constant nodes made initializers). Without it, PaddlePaddle exports keep their weights
    # in Constant nodes, which the quantizer then treats as activations: uint8, per tensor.
    # Per-channel weights need opset 13 (PP-OCR's models are opset 11).
    import onnx

    from tvmq.export import with_opset_13

    opset13 = Path(out_dir) / "ort_opset13.onnx"
    onnx.save(with_opset_13(onnx.load(str(path))), str(opset13))
    prepped = Path(out_dir) / "ort_prepped.onnx"
    quant_pre_process(str(opset13), str(prepped), skip_symbolic_shape=True)
    out = Path(out_dir) / "ort_int8.onnx"
    quantize_static(str(prepped), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def export_executable(module, path: Path) -> str:
    """A HostModule's compiled executable as a library file (for ``isolated_medians``)."""
    module.executable.export_library(str(path))
    return str(path)


def count_int8_instructions(lib: Path, preset, kernels=()) -> dict:
    """The preset's int8 micro-kernel instructions in a compiled library (objdump): how many, per
    register width on x86, and how many of ``kernels`` (function names) contain its first
    mnemonic (``vpdpbusd``, ``vpmaddwd``, ``sdot``, ``smull``, ``vmull.s8``); plus whether any
    zmm register is used at all (an AVX2 library must have none)."""
    kernel = preset.micro_kernel
    objdump = {"aarch64": "aarch64-linux-gnu-objdump", "armv7a": "arm-linux-gnueabihf-objdump"}.get(
        str(preset.target.get("mtriple", "x86_64")).split("-")[0], "objdump")
    try:
        asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    from tvmq.testing import kernel_instructions

    counts = {"micro_kernel": preset.int8_kernel, "zmm_instructions": len(re.findall(r"%zmm", asm))}
    if kernel is None:
        return counts
    mnemonic = re.escape(kernel.mnemonics[0])
    for reg in ("zmm", "ymm", "xmm"):
        counts[f"{kernel.mnemonics[0]}_{reg}"] = len(re.findall(rf"\s{mnemonic}\s+%{reg}", asm))
    counts[kernel.mnemonics[0]] = len(re.findall(rf"\s{mnemonic}\s", asm))
    per_function = kernel_instructions(asm, kernel.mnemonics[0], functions=".")
    counts["kernels_with_it"] = f"{sum(1 for k in kernels if per_function.get(k, 0) > 0)}/{len(kernels)}"
    return counts


def bench_model(name, case, args, workdir) -> dict:
    from tvmq.compile import compile_model
    from tvmq.config import QuantConfig, TuneOptions
    from tvmq.targets import get_preset
    from tvmq.execute import HostModule
    from tvmq.runtime import Bundle

    inp, xs, ys = case["input"], case["x"], case["y"]
    shape = list(xs[0].shape)
    results = {}

    out = workdir / f"{name}-int8"
    calib = [{inp: c} for c in case["calib"]]
    t0 = time.perf_counter()
    res = compile_model(case["path"], out, target=args.target, calib=calib, shapes={inp: shape},
                        config=QuantConfig(method=args.method))
    compile_s = time.perf_counter() - t0
    fp32 = HostModule(res.float_module, args.target)
    bundle = Bundle(out)
    feed = input_files(workdir / f"{name}-x", {inp: xs[0]})
    untuned = {}
    if args.tune:
        # Same budget for both precisions: trials per kernel and number of kernels.
        from tvmq.tune import load_database, tune

        db_root = args.db_root or workdir
        int8_db, fp32_db = Path(db_root) / f"{name}-int8", Path(db_root) / f"{name}-fp32"
        t0 = time.perf_counter()
        tuned_out = workdir / f"{name}-int8-tuned"
        compile_model(case["path"], tuned_out, target=args.target, plan=res.plan, shapes={inp: shape},
                      tuning=TuneOptions(db=int8_db, trials=args.tune, max_tasks=args.max_tasks), progress=True)
        tune(res.float_module, args.target, fp32_db, trials=args.tune, max_tasks=args.max_tasks, progress=True)
        tune_s = time.perf_counter() - t0
        untuned = {"tvm_fp32": {"tvm": export_executable(fp32, workdir / f"{name}-fp32-untuned.so"), "inputs": feed},
                   "tvmq_int8": {"tvm": str(bundle.library), "inputs": feed}}
        fp32 = HostModule(res.float_module, args.target, database=load_database(fp32_db, res.float_module, args.target))
        bundle = Bundle(tuned_out)
    out_name = bundle.outputs[0]["name"]
    auto_bundles, auto_info = {}, {}
    if args.auto is not None:
        auto_bundles, auto_info = plan_bundles(name, case, args, workdir, calib, shape)
    sess32 = ort_session(case["path"], args.threads)
    ort8_path = ort_quantize(case["path"], inp, case["calib"], workdir)
    sess8 = ort_session(ort8_path, args.threads)

    engines = {
        "tvm_fp32": lambda x: fp32(x)[0],
        "tvmq_int8": lambda x: bundle.run({inp: x})[out_name],
        "ort_fp32": lambda x: sess32.run(None, {inp: x})[0],
        "ort_int8": lambda x: sess8.run(None, {inp: x})[0],
    }
    calls = {
        "tvm_fp32": {"tvm": export_executable(fp32, workdir / f"{name}-fp32.so"), "inputs": feed},
        "tvmq_int8": {"tvm": str(bundle.library), "inputs": feed},
        "ort_fp32": {"ort": str(case["path"]), "inputs": feed},
        "ort_int8": {"ort": str(ort8_path), "inputs": feed},
    }
    calls.update({f"{k}_untuned": v for k, v in untuned.items()})
    for engine, b in auto_bundles.items():
        engines[engine] = lambda x, b=b: b.run({inp: x})[out_name]
        calls[engine] = {"tvm": str(b.library), "inputs": feed}
    medians = isolated_medians(calls, args.runs, args.threads)
    for engine in ENGINES + tuple(auto_bundles):
        scores = case["score"]([engines[engine](x) for x in xs], ys)
        results[engine] = {"median_ms": round(medians[engine], 4), **{k: round(v, 4) for k, v in scores.items()}}
    integer = [k["func"] for k in res.manifest["kernels"] if k["accumulator"] == "int32"]
    results["_info"] = {
        "int8_layers": res.manifest["quantization"]["int8_layers"],
        "float_layers": res.manifest["quantization"]["float_layers"],
        "integer_kernels": len(integer),
        "kernels": len(res.manifest["kernels"]),
        "int8_instructions": count_int8_instructions(out / "model.so", get_preset(args.target), integer),
        "library_bytes": (out / "model.so").stat().st_size,
        "compile_s": round(compile_s, 1),
        "eval_samples": len(ys),
        "calib_samples": len(case["calib"]),
    }
    if auto_info:
        results["_info"]["auto"] = auto_info
    if args.tune:
        results["_info"].update(
            tune_trials_per_kernel=args.tune, tune_max_tasks=args.max_tasks, tune_s=round(tune_s, 1),
            untuned_ms={k: round(medians[f"{k}_untuned"], 4) for k in untuned},
        )
    return results


def plan_bundles(name, case, args, workdir, calib, shape):
    """``--precision auto`` and the INC-style fallback plan, compiled as bundles."""
    from ocrdata import write_eval_folder

    from tvmq.compile import compile_model
    from tvmq.config import AutoPrecision, QuantConfig
    from tvmq.plan_search import config_for
    from tvmq.runtime import Bundle

    inp = case["input"]
    val = write_eval_folder(workdir / f"{name}-val", *case["val"])
    out = workdir / f"{name}-plan"
    t0 = time.perf_counter()
    res = compile_model(case["path"], out, target=args.target, calib=calib, shapes={inp: shape},
                        config=QuantConfig(method=args.method), precision="auto", auto=AutoPrecision(metric=case["metric"], max_drop=args.auto, eval_data=val),
                        progress=True)
    search_s = time.perf_counter() - t0
    p = res.manifest["precision"]
    fallback_out = workdir / f"{name}-fallback"
    compile_model(case["path"], fallback_out, target=args.target, calib=calib, shapes={inp: shape},
                  config=config_for(QuantConfig(method=args.method), p["fallback"]["assignment"]))
    counts = lambda a: {k: list(a.values()).count(k) for k in ("int8", "fp16", "fp32")}  # noqa: E731
    info = {
        "metric": p["metric"], "max_drop": args.auto, "validation_samples": p["samples"], "search_s": round(search_s, 1),
        "evaluations": p["evaluations"], "fallback_evaluations": p["fallback"]["evaluations"],
        "validation": {"fp32": p["fp32"], "all_int8": p["all_int8"], "plan": p["plan"],
                       "fallback": p["fallback"]["metric"], "greedy": p["greedy"]["metric"]},
        "estimated_ms": {"plan": p["latency_ms"]["plan"], "fallback": p["fallback"]["latency_ms"],
                         "greedy": p["greedy"]["latency_ms"], "all_int8": p["latency_ms"]["all_int8"],
                         "fp32": p["latency_ms"]["fp32"]},
        "plan_layers": counts(p["assignment"]), "fallback_layers": counts(p["fallback"]["assignment"]),
        "same_assignment": p["assignment"] == p["fallback"]["assignment"],
        "report": str(out / "report.html"),
    }
    if args.keep:
        import shutil

        shutil.copytree(out, args.keep / f"{name}-plan", dirs_exist_ok=True)
        info["report"] = str(args.keep / f"{name}-plan" / "report.html")
    return {"tvmq_plan": Bundle(out), "tvmq_fallback": Bundle(fallback_out)}, info


def print_table(results: dict, threads: int) -> None:
    print(f"\nmedian latency (ms, batch 1, {threads} threads) and accuracy")
    print(f"{'model':<11}" + "".join(f"{e:>22}" for e in ENGINES) + f"{'int8 vs ort best':>18}{'int8 vs tvm fp32':>18}")
    for model, r in results.items():
        cells = "".join(f"{r[e]['median_ms']:>10.3f} ms {100 * r[e]['accuracy']:>6.2f}%" for e in ENGINES)
        ort_best = min(r["ort_fp32"]["median_ms"], r["ort_int8"]["median_ms"])
        q = r["tvmq_int8"]["median_ms"]
        print(f"{model:<11}{cells}{q / ort_best:>17.2f}x{r['tvm_fp32']['median_ms'] / q:>17.2f}x")
        if "cer" in r["tvmq_int8"]:
            print(f"{'':<11}character error rate: " + ", ".join(f"{e} {r[e]['cer']:.4f}" for e in ENGINES + AUTO_ENGINES
                                                            if e in r))
        info = r["_info"]
        if "untuned_ms" in info:
            u = info["untuned_ms"]
            print(f"{'':<11}untuned: tvm_fp32 {u['tvm_fp32']:.3f} ms, tvmq_int8 {u['tvmq_int8']:.3f} ms "
                  f"(tuned is {u['tvmq_int8'] / r['tvmq_int8']['median_ms']:.2f}x faster for int8); "
                  f"{info['tune_trials_per_kernel']} trials x {info['tune_max_tasks'] or 'all'} kernels, {info['tune_s']} s")
        if "auto" in info:
            a = info["auto"]
            print(f"{'':<11}--precision auto (max drop {a['max_drop']}, {a['metric']}, {a['validation_samples']} validation "
                  f"samples, search {a['search_s']} s): plan {a['plan_layers']} "
                  f"{r['tvmq_plan']['median_ms']:.3f} ms {100 * r['tvmq_plan']['accuracy']:.2f}%; INC-style fallback "
                  f"{a['fallback_layers']} {r['tvmq_fallback']['median_ms']:.3f} ms "
                  f"{100 * r['tvmq_fallback']['accuracy']:.2f}% ({a['fallback_evaluations']} evaluations)"
                  + ("; the SAME assignment, so their latency difference is measurement noise"
                     if a.get("same_assignment") else ""))
        print(f"{'':<11}int8 layers {info['int8_layers']}, float {info['float_layers']}; integer kernels "
              f"{info['integer_kernels']}/{info['kernels']}; int8 instructions {info['int8_instructions']}; "
              f"library {info['library_bytes'] / 1024:.0f} KiB; compile {info['compile_s']} s")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--time-worker"]:
        print(json.dumps(_time_worker(json.loads(argv[1]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,ppocr_cls,ppocr_rec")
    ap.add_argument("--target", default="x86",
                    help="x86 preset that TVM FP32 and tvmq INT8 are compiled for (x86, x86-avx2, x86-avx512, "
                         "x86-avxvnni, x86-avx512vnni); it must run on this machine")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per engine (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--tune", type=int, default=0, metavar="N",
                    help="tune TVM FP32 and tvmq INT8 with N trials per kernel (same budget) before timing")
    ap.add_argument("--max-tasks", type=int, help="with --tune: tune only the largest kernels")
    ap.add_argument("--db-root", type=Path, help="keep tuning databases here (default: a temporary folder)")
    ap.add_argument("--auto", type=float, metavar="DROP",
                    help="also compile --precision auto with this max drop (points) and the INC-style fallback plan")
    ap.add_argument("--keep", type=Path, help="with --auto: copy the plans' bundles and reports here")
    args = ap.parse_args(argv)
    from tvmq.targets import get_preset, host_cpu_flags

    preset = get_preset(args.target)
    if not preset.runs_here:
        ap.error(f"--target {args.target} does not run on this machine (needs {sorted(preset.cpu_flags - host_cpu_flags())})")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)

    results = {}
    with tempfile.TemporaryDirectory(prefix="tvmq-bench-") as tmp:
        for name in args.models.split(","):
            print(f"[{name}] compiling and measuring...", flush=True)
            case = CASES[name](args.n_eval, args.n_calib)
            results[name] = bench_model(name, case, args, Path(tmp))
    print_table(results, args.threads)
    isa = {"target": args.target, "int8_kernel": preset.int8_kernel, "mcpu": preset.target.get("mcpu"),
           "host_isa": sorted(host_cpu_flags() & {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"})}
    print(f"target {args.target} (mcpu {isa['mcpu']}, int8 micro-kernel {preset.int8_kernel}); host ISA: {', '.join(isa['host_isa'])}")
    if args.json:
        args.json.write_text(json.dumps({**results, "_isa": isa}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
