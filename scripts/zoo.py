"""Model zoo: real pretrained ONNX models from PyPI wheels, compiled by tvmq, judged per output.

Models (none of them tuned for): PP-OCR's text-orientation classifier, PP-OCRv4 recogniser and
DB text detector (``rapidocr-onnxruntime``, the ``bench`` extra) and, from the ``ddddocr``
wheel (fetched with ``pip download --no-deps`` into ``--cache``; only its ONNX files are used),
a CNN + bidirectional-LSTM captcha recogniser and a YOLOX-style detector. Inputs are rendered
(text lines, pages of text: ``scripts/ocrdata.py``).

Per model, same threads: TVM FP32, tvmq's default plan (int8 where it pays), tvmq with every
layer int8 (``--int8-everywhere``) and ONNX Runtime FP32: median latency (each engine alone in
fresh processes, in rounds, as ``bench.py`` times them), and
accuracy vs FP32 *per output part* (cosine; a detector's boxes and scores apart, the DB
detector's text mask as IoU), so a damaged part cannot hide behind an accurate one.

Usage: python scripts/zoo.py [--models ...] [--target x86] [--json zoo.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

DDDDOCR = "ddddocr==1.6.1"


def wheel_member(requirement: str, member: str, cache: Path) -> Path:
    """``member`` of the wheel of ``requirement`` (downloaded once, without dependencies)."""
    name = requirement.split("==")[0]
    target = cache / name / Path(member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", requirement, "--no-deps", "-q", "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            target.write_bytes(z.read(member))
    return target


def _cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _lines(n, seed, height, width, gray, norm):
    from PIL import Image

    from ocrdata import random_text, render_line

    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(n):
        img = render_line(random_text(rng), rng)
        w = min(width, max(8, img.width * height // img.height))
        img = img.resize((w, height), Image.BILINEAR)
        arr = np.asarray(img.convert("L") if gray else img).astype(np.float32) / 255.0
        arr = arr[None] if gray else arr.transpose(2, 0, 1)
        out = np.full((arr.shape[0], height, width), 1.0, np.float32)  # light background to the right
        out[:, :, :w] = arr
        xs.append(norm(out)[None])
    return xs


def _pages(n, seed, size):
    from ocrdata import DET_MEAN, DET_STD, det_set

    # det_set normalizes for PP-OCR; YOLOX takes raw 0..255 pixels
    return [((x[0] * DET_STD + DET_MEAN) * 255.0)[None].astype(np.float32) for x in det_set(n, seed, size)]


def models(cache: Path) -> dict:
    """name -> (onnx path, input name, sample maker (n, seed) -> list of arrays, parts of the outputs)."""
    from ocrdata import CLS_SHAPE, REC_SHAPE, det_set, ppocr_model

    def parts_whole(outs):
        return {f"output{i}": o for i, o in enumerate(outs)}

    def yolo_parts(outs):  # [1, anchors, 4 box + objectness + classes]
        return {"boxes": outs[0][..., :4], "scores": outs[0][..., 4:]}

    zoo = {
        "ppocr_cls": (ppocr_model("cls"), "x",
                      lambda n, s: _lines(n, s, CLS_SHAPE[1], CLS_SHAPE[2], False, lambda a: (a - 0.5) / 0.5), parts_whole),
        "ppocr_rec": (ppocr_model("rec"), "x",
                      lambda n, s: _lines(n, s, REC_SHAPE[1], REC_SHAPE[2], False, lambda a: (a - 0.5) / 0.5), parts_whole),
        "ppocr_det": (ppocr_model("det"), "x", lambda n, s: list(det_set(n, s, 320)), parts_whole),
    }
    try:
        zoo["ddddocr_lstm"] = (wheel_member(DDDDOCR, "ddddocr/common.onnx", cache), "input1",
                               lambda n, s: _lines(n, s, 64, 256, True, lambda a: a), parts_whole)
        zoo["ddddocr_yolox"] = (wheel_member(DDDDOCR, "ddddocr/common_det.onnx", cache), "images",
                                lambda n, s: _pages(n, s, 416), yolo_parts)
    except (subprocess.CalledProcessError, KeyError, StopIteration) as err:
        print(f"ddddocr models unavailable ({err}); skipping them", file=sys.stderr)
    return zoo


def measure(name, path, input_name, make, parts, target, runs, n_calib, n_eval) -> dict:
    from tvmq.build import quantized_module
    from tvmq.config import QuantConfig
    from tvmq.execute import HostModule
    from tvmq.targets import get_preset

    preset = get_preset(target)
    calib = [{input_name: x} for x in make(n_calib, 1)]
    evals = make(n_eval, 2)
    shapes = {input_name: list(evals[0].shape)}
    t0 = time.perf_counter()
    fp32 = HostModule(quantized_module(str(path), preset, precision="fp32", shapes=shapes).module, preset)
    builds = {}
    for label, config in (("default", QuantConfig()), ("all_int8", QuantConfig(int8_everywhere=True))):
        qm = quantized_module(str(path), preset, raw=calib, config=config, shapes=shapes)
        builds[label] = (HostModule(qm.module, preset), qm.plan.count("int8"))
    compile_s = time.perf_counter() - t0
    ref = [parts(fp32(x)) for x in evals]
    out = {"compile_s": round(compile_s, 1)}
    for label, (module, n_int8) in builds.items():
        got = [parts(module(x)) for x in evals]
        acc = {}
        for part in ref[0]:
            if name == "ppocr_det":  # the text mask is what the detector is used for
                from ocrdata import binary_map_iou

                acc["mask_iou"] = float(np.mean([binary_map_iou(g[part], r[part]) for g, r in zip(got, ref)]))
            else:
                acc[part] = min(_cosine(g[part], r[part]) for g, r in zip(got, ref))
        out[label] = {"int8_layers": n_int8, "accuracy": acc}
    # each engine timed alone in fresh processes, in rounds (bench.py's isolated_medians: two
    # runtimes in one process slow each other down)
    from bench import export_executable, input_files, isolated_medians

    with tempfile.TemporaryDirectory() as tmp:
        feed = input_files(Path(tmp) / "x", {input_name: evals[0]})
        engines = {"ort_fp32": {"ort": str(path), "inputs": feed},
                   "tvm_fp32": {"tvm": export_executable(fp32, Path(tmp) / "fp32.so"), "inputs": feed}}
        for label, (module, _) in builds.items():
            engines[label] = {"tvm": export_executable(module, Path(tmp) / f"{label}.so"), "inputs": feed}
        ms = isolated_medians(engines, runs, int(os.environ.get("TVM_NUM_THREADS", "2")))
    out["ort_fp32_ms"], out["tvm_fp32_ms"] = ms["ort_fp32"], ms["tvm_fp32"]
    for label in builds:
        out[label]["ms"] = ms[label]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated subset (default: all available)")
    ap.add_argument("--target", default="x86", help="an x86 preset this machine runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tvmq" / "zoo")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    zoo = models(args.cache)
    chosen = args.models.split(",") if args.models else list(zoo)
    results = {}
    for name in chosen:
        path, input_name, make, parts = zoo[name]
        print(f"[{name}] compiling and measuring...", file=sys.stderr, flush=True)
        results[name] = measure(name, path, input_name, make, parts, args.target, args.runs, args.n_calib, args.n_eval)
    from tvmq.targets import get_preset, host_cpu_flags

    isa = ", ".join(sorted(host_cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni"}))
    print(f"\nmedian latency (ms, batch 1, {args.threads} threads), target {args.target} "
          f"({get_preset(args.target).int8_kernel}), host ISA: {isa}; accuracy vs TVM FP32 per output part")
    print(f"{'model':<15}{'ORT fp32':>10}{'TVM fp32':>10}{'tvmq':>10}{'all-int8':>10}  int8 layers  accuracy (default | all-int8)")
    for name, r in results.items():
        acc = "; ".join(f"{p} {r['default']['accuracy'][p]:.4f} | {r['all_int8']['accuracy'][p]:.4f}"
                        for p in r["default"]["accuracy"])
        print(f"{name:<15}{r['ort_fp32_ms']:>10.2f}{r['tvm_fp32_ms']:>10.2f}{r['default']['ms']:>10.2f}"
              f"{r['all_int8']['ms']:>10.2f}  {r['default']['int8_layers']:>4}/{r['all_int8']['int8_layers']:<6} {acc}")
    if args.json:
        args.json.write_text(json.dumps({"target": args.target, "host_isa": isa, "models": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
