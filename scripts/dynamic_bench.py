"""Dynamic shapes on a real model: PP-OCRv4's recogniser on text lines of any width.

One bundle compiled with ``--shape x:1,3,48,W --dim W=32..1280`` against

* static bundles compiled from the same plan for single widths (a sweep): same outputs? how
  much slower is the dynamic bundle, and one carrying static copies for a few widths
  (``--dim W=32..1280@160,320,640``)?
* PP-OCR's text-orientation classifier with a dynamic batch (``N=1..8``): time per image;
* the whole recognition step on rendered text lines of varied length, resized as the PP-OCR
  pipeline does (height 48, aspect kept), each at its own width: throughput and exact-string
  accuracy of tvmq INT8 (dynamic), tvmq FP32 (dynamic), ONNX Runtime FP32 and ONNX Runtime
  INT8 (``quantize_static``, QDQ, per-channel, the same calibration lines), same threads, one run.

Usage: ``python scripts/dynamic_bench.py [--lines 150] [--widths 48,96,...] [--copies 160,320,640] [--json out.json]``
(needs the ``bench`` extra). Figures depend on the host's ISA: it is printed with them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import ort_quantize, ort_session  # noqa: E402
from ocrdata import (  # noqa: E402
    binary_map_iou, cls_set, ctc_decode, det_set, ppocr_model, random_text, rec_charset, render_line,
)

RANGE = (32, 1280)


def host_isa() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm") if f in flags)


def text_line(rng, width: int | None = None):
    """``(x [1, 3, 48, W], text)``: a rendered line resized to height 48, aspect kept (W clamped
    to the range), scaled to [-1, 1] as PP-OCR's ``resize_norm_img`` does, without padding."""
    from PIL import Image

    text = random_text(rng)
    img = render_line(text, rng)
    w = width or min(RANGE[1], max(RANGE[0], int(math.ceil(48 * img.width / img.height))))
    arr = np.asarray(img.resize((w, 48), Image.BILINEAR)).astype(np.float32).transpose(2, 0, 1) / 255.0
    return ((arr - 0.5) / 0.5)[None], text


def median_of(run, x, repeat: int) -> float:
    for _ in range(3):
        run(x)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def sweep(model, work: Path, widths, dyn, repeat: int, copies=None, alternations: int = 9) -> list[dict]:
    """Each width: the dynamic bundle (and ``copies``, the one with static copies, if given) vs a
    static bundle for that width from the same plan."""
    from tvmq.compile import compile_model
    from tvmq.runtime import Bundle

    rows = []
    rng = np.random.default_rng(7)
    for w in widths:
        compile_model(model, work / f"static{w}", plan=work / "int8" / "plan.json", shapes={"x": [1, 3, 48, w]})
        static = Bundle(work / f"static{w}")
        x, _ = text_line(rng, w)
        a, b = dyn.run({"x": x}), static.run({"x": x})
        out, ref = next(iter(a.values())), next(iter(b.values()))
        t_dyn, t_static, t_copies = [], [], []
        for _ in range(alternations):  # alternate, so a slow period of the machine hits all; the best median
            t_dyn.append(median_of(lambda v: dyn.run({"x": v}), x, repeat))
            t_static.append(median_of(lambda v, s=static: s.run({"x": v}), x, repeat))
            if copies is not None:
                t_copies.append(median_of(lambda v: copies.run({"x": v}), x, repeat))
        row = {"width": w, "bit_equal": bool(np.array_equal(out, ref)), "max_abs_diff": float(np.abs(out - ref).max()),
               "argmax_agree": float((out.argmax(-1) == ref.argmax(-1)).mean()),
               "dynamic_ms": min(t_dyn), "static_ms": min(t_static)}
        row["ratio"] = row["dynamic_ms"] / row["static_ms"]
        extra = ""
        if copies is not None:
            with_copies = next(iter(copies.run({"x": x}).values()))
            row.update(copies_ms=min(t_copies), copies_ratio=min(t_copies) / row["static_ms"],
                       copies_bit_equal=bool(np.array_equal(with_copies, ref)))
            extra = f"  | with copies x{row['copies_ratio']:.2f} bit-equal {row['copies_bit_equal']}"
        rows.append(row)
        print(f"  W={w:5d}  dynamic {row['dynamic_ms']:7.3f} ms  static {row['static_ms']:7.3f} ms  "
              f"x{row['ratio']:.2f}  bit-equal {row['bit_equal']}  max |diff| {row['max_abs_diff']:.2e}  "
              f"argmax agree {row['argmax_agree']:.3f}{extra}", flush=True)
    return rows


def pipeline(engines: dict, lines, charset, rounds: int) -> dict:
    """Every line through every engine, ``rounds`` times alternating; the median total time."""
    results = {}
    totals = {name: [] for name in engines}
    for _ in range(rounds):
        for name, run in engines.items():
            t = time.perf_counter()
            outs = [run(x) for x, _ in lines]
            totals[name].append(time.perf_counter() - t)
            results[name] = [ctc_decode(o, charset).strip() for o in outs]
    return {name: {"total_s": float(np.median(totals[name])), "texts": results[name]} for name in engines}


def dynamic_batch(work: Path, repeat: int) -> dict:
    """PP-OCR's text-orientation classifier with a dynamic batch ``N=1..8``: the same outputs as
    a static batch-1 bundle, image by image, and the time per image at each batch size."""
    from tvmq.compile import compile_model
    from tvmq.runtime import Bundle

    x, _ = cls_set(24, seed=3)
    calib = [{"x": x[i]} for i in range(8)] + [{"x": np.concatenate(list(x[8:16]))}]  # batches of 1 and 8
    compile_model(ppocr_model("cls"), work / "clsN", calib=calib, shapes={"x": ["N", 3, 48, 192]}, dims={"N": (1, 8)})
    compile_model(ppocr_model("cls"), work / "cls1", plan=work / "clsN" / "plan.json", shapes={"x": [1, 3, 48, 192]})
    dyn, one = Bundle(work / "clsN"), Bundle(work / "cls1")
    batch = np.concatenate(list(x[16:24]))
    whole = next(iter(dyn.run({"x": batch}).values()))
    single = np.concatenate([next(iter(one.run({"x": batch[i:i + 1]}).values())) for i in range(8)])
    out = {"bit_equal_to_static_batch1": bool(np.array_equal(whole, single)),
           "static_batch1_ms": min(one.latency_ms({"x": batch[:1]}, repeat=repeat) for _ in range(3))}
    print(f"dynamic batch (PP-OCR cls, N=1..8): batch 8 equals 8 static batch-1 calls: {out['bit_equal_to_static_batch1']}; "
          f"static batch-1 bundle {out['static_batch1_ms']:.3f} ms/image")
    for n in (1, 2, 4, 8):
        ms = min(dyn.latency_ms({"x": batch[:n]}, repeat=repeat) for _ in range(3))
        out[f"batch{n}_ms_per_image"] = ms / n
        print(f"  N={n}: {ms:.3f} ms per call, {ms / n:.3f} ms per image")
    return out


def detector(work: Path, args) -> list[dict]:
    """PP-OCRv4's text detector compiled once for pages of H x W in 64..1280, multiples of 32
    (``--dim H=64..1280:32``), run at three page sizes: text-mask IoU vs ONNX Runtime FP32 and
    latency vs ONNX Runtime FP32 / INT8 (calibrated on the same pages) at each size."""
    from tvmq.compile import compile_model
    from tvmq.runtime import Bundle

    model = ppocr_model("det")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.pages.split(",")]
    calib_sizes = [(320, 320), (480, 640), (640, 480), (736, 1280), (960, 960), (320, 960), (1280, 736), (640, 640)]
    calib = [{"x": det_set(1, seed=10 + i, size=h, width=w)[0]} for i, (h, w) in enumerate(calib_sizes[:args.det_calib])]
    dims = {"H": (64, 1280, 32), "W": (64, 1280, 32)}
    t = time.time()
    compile_model(model, work / "det", calib=calib, shapes={"x": [1, 3, "H", "W"]}, dims=dims, force=True,
                  precision=args.det_precision)
    print(f"detector: one {args.det_precision} bundle for H, W in 64..1280 (multiples of 32), compiled in "
          f"{time.time() - t:.0f} s; calibration pages {calib_sizes[:args.det_calib]}")
    bundle = Bundle(work / "det")
    ort_fp32 = ort_session(model, args.threads)
    ort_int8 = ort_session(ort_quantize(model, "x", calib, work / "det_ort"), args.threads) if _mkdir(work / "det_ort") else None
    print(f"| page | tvmq {args.det_precision} ms | ORT FP32 ms | ORT INT8 ms | vs ORT faster | IoU vs FP32: tvmq / ORT INT8 |")
    print("|---|---|---|---|---|---|")
    rows = []
    for h, w in sizes:
        pages = det_set(4, seed=h * 7 + w, size=h, width=w)
        ref = [ort_fp32.run(None, {"x": p})[0] for p in pages]
        iou = float(np.mean([binary_map_iou(next(iter(bundle.run({"x": p}).values())), r) for p, r in zip(pages, ref)]))
        iou_ort = float(np.mean([binary_map_iou(ort_int8.run(None, {"x": p})[0], r) for p, r in zip(pages, ref)]))
        times = {"tvmq": [], "ort_fp32": [], "ort_int8": []}
        for _ in range(3):
            times["tvmq"].append(median_of(lambda v: bundle.run({"x": v}), pages[0], args.repeat))
            times["ort_fp32"].append(median_of(lambda v: ort_fp32.run(None, {"x": v}), pages[0], args.repeat))
            times["ort_int8"].append(median_of(lambda v: ort_int8.run(None, {"x": v}), pages[0], args.repeat))
        row = {"page": f"{h}x{w}", "iou": iou, "ort_int8_iou": iou_ort, **{k: min(v) for k, v in times.items()}}
        row["vs_ort_faster"] = row["tvmq"] / min(row["ort_fp32"], row["ort_int8"])
        rows.append(row)
        print(f"| {row['page']} | {row['tvmq']:.2f} | {row['ort_fp32']:.2f} | {row['ort_int8']:.2f} | "
              f"{row['vs_ort_faster']:.2f}x | {iou:.4f} / {iou_ort:.4f} |", flush=True)
    return rows


def _mkdir(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=150)
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--widths", default="48,96,160,240,320,480,640,960,1280")
    p.add_argument("--copies", default="160,320,640",
                   help="widths of the static copies in a second rec bundle (--dim W=..@160,320,640); '' for none")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--alternations", type=int, default=9,
                   help="sweep: bundles timed in turn this many times, the best median kept (this machine's "
                        "slow periods move one median by 10%%)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pages", default="320x320,480x640,736x1280", help="detector page sizes, HxW (multiples of 32)")
    p.add_argument("--det-calib", type=int, default=8, help="detector calibration pages (of several sizes)")
    p.add_argument("--det-precision", default="auto", choices=["int8", "auto"],
                   help="the detector's --precision (default auto: all-int8 loses the text mask on large pages)")
    p.add_argument("--only", choices=["rec", "det", "batch"], help="run one part")
    p.add_argument("--work", help="folder for the bundles (default: a temporary one)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    import os

    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from tvmq.runtime import configure_threads

    configure_threads()
    work = Path(args.work or tempfile.mkdtemp(prefix="tvmq-dynamic-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"host ISA: {host_isa()}; {args.threads} threads")
    figures = {"host_isa": host_isa(), "threads": args.threads}
    if args.only in (None, "rec"):
        figures.update(recogniser(work, args))
    if args.only in (None, "det"):
        figures["detector"] = detector(work, args)
    if args.only in (None, "batch"):
        figures["dynamic_batch"] = dynamic_batch(work, args.repeat * 2)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def recogniser(work: Path, args) -> dict:
    """The width sweep and the variable-width pipeline (see the module's docstring)."""
    from tvmq.compile import compile_model
    from tvmq.runtime import Bundle

    model = ppocr_model("rec")
    charset = rec_charset(model)
    rng = np.random.default_rng(0)
    calib = [{"x": text_line(rng)[0]} for _ in range(args.calib)]
    lines = [text_line(np.random.default_rng(1000 + i)) for i in range(args.lines)]
    widths = sorted(x.shape[3] for x, _ in lines)
    print(f"PP-OCRv4 rec, W in {RANGE[0]}..{RANGE[1]}; calibration widths {sorted(c['x'].shape[3] for c in calib)}; "
          f"{len(lines)} lines, widths {widths[0]}..{widths[-1]} (median {widths[len(widths) // 2]})")
    dims = {"W": RANGE}
    t = time.time()
    compile_model(model, work / "int8", calib=calib, shapes={"x": [1, 3, 48, "W"]}, dims=dims, force=True)
    print(f"dynamic int8 bundle compiled in {time.time() - t:.0f} s")
    compile_model(model, work / "fp32", precision="fp32", shapes={"x": [1, 3, 48, "W"]}, dims=dims, force=True)
    dyn, fp32 = Bundle(work / "int8"), Bundle(work / "fp32")
    copies = None
    if args.copies:
        sizes = [int(w) for w in args.copies.split(",")]
        t = time.time()
        compile_model(model, work / "int8_copies", plan=work / "int8" / "plan.json", shapes={"x": [1, 3, 48, "W"]},
                      dims=dims, variants={"W": sizes}, force=True)
        print(f"int8 bundle with static copies at W={args.copies} (--dim W={RANGE[0]}..{RANGE[1]}@{args.copies}) "
              f"compiled in {time.time() - t:.0f} s")
        copies = Bundle(work / "int8_copies")

    print("sweep: the dynamic bundle vs a static bundle per width (same plan)")
    rows = sweep(model, work, [int(w) for w in args.widths.split(",")], dyn, args.repeat, copies, args.alternations)

    ort_fp32 = ort_session(model, args.threads)
    ort_int8 = ort_session(ort_quantize(model, "x", calib, work), args.threads)
    engines = {
        "tvmq INT8 (dynamic)": lambda x: next(iter(dyn.run({"x": x}).values())),
        **({f"tvmq INT8 (dynamic, copies @{args.copies})": lambda x: next(iter(copies.run({"x": x}).values()))}
           if copies is not None else {}),
        "tvmq FP32 (dynamic)": lambda x: next(iter(fp32.run({"x": x}).values())),
        "ORT FP32": lambda x: ort_fp32.run(None, {"x": x})[0],
        "ORT INT8": lambda x: ort_int8.run(None, {"x": x})[0],
    }
    res = pipeline(engines, lines, charset, args.rounds)
    truth = [text for _, text in lines]
    reference = res["ORT FP32"]["texts"]
    best_ort = min(res["ORT FP32"]["total_s"], res["ORT INT8"]["total_s"])
    print(f"pipeline: {len(lines)} variable-width lines, median of {args.rounds} rounds")
    print("| engine | total s | lines/s | vs ORT faster | exact string vs truth | same string as FP32 |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, r in res.items():
        exact = 100.0 * np.mean([a == b for a, b in zip(r["texts"], truth)])
        same = 100.0 * np.mean([a == b for a, b in zip(r["texts"], reference)])
        summary[name] = {"total_s": r["total_s"], "lines_per_s": len(lines) / r["total_s"], "exact_pct": exact,
                         "same_as_fp32_pct": same}
        print(f"| {name} | {r['total_s']:.3f} | {len(lines) / r['total_s']:.1f} | {r['total_s'] / best_ort:.2f}x | "
              f"{exact:.1f}% | {same:.1f}% |")
    return {"sweep": rows, "pipeline": summary}


if __name__ == "__main__":
    sys.exit(main())
