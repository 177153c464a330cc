"""SmoothQuant, bias correction and weight-only quantization: accuracy before/after.

Each algorithm on a model where it matters (the synthetic models of ``tests/test_algorithms.py``:
a matmul with outlier activation channels, a conv whose per-channel weight scales are coarse, an
MLP whose weights dominate its size), and on the real models, where tvmq keeps them off by
default: PP-OCR's classifier and recogniser, all-int8, with and without each.

Usage::

    pip install -e ".[bench]"
    python scripts/algo_bench.py [--n-eval 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def synthetic() -> dict:
    import onnx
    from tvmq.metrics import sample_sqnr
    from tvmq.testing import coarse_conv, fp32_and_int8_outputs, mlp, outlier_inputs, outlier_mlp

    from tvmq.cli import main as cli
    from tvmq.config import QuantConfig
    from tvmq.runtime import Bundle

    out = {}
    calib = [{"x": x} for x in outlier_inputs(16, 1)]
    test = outlier_inputs(8, 2)
    plain = float(np.mean([sample_sqnr(q, r) for r, q in fp32_and_int8_outputs(outlier_mlp(), calib, QuantConfig(), test)]))
    smooth = float(np.mean([sample_sqnr(q, r) for r, q in fp32_and_int8_outputs(outlier_mlp(), calib, QuantConfig(smoothquant=0.5), test)]))
    out["smoothquant_outlier_matmul"] = {"sqnr_db_plain": plain, "sqnr_db_smoothquant_0.5": smooth}

    rng = np.random.default_rng(3)
    make = lambda: rng.uniform(0.5, 1.5, (1, 32, 8, 8)).astype(np.float32)  # noqa: E731
    calib, test = [{"x": make()} for _ in range(16)], [make() for _ in range(8)]
    res = {}
    for label, config in (("plain", QuantConfig()), ("bias_correction", QuantConfig(bias_correction=True))):
        outs = fp32_and_int8_outputs(coarse_conv(), calib, config, test)
        err = np.stack([q - r for r, q in outs])
        axes = (0, 1, 2, 3) if err.shape[-1] == 16 else (0, 1, 3, 4)
        res[f"mean_shift_{label}"] = float(np.abs(err.mean(axis=axes)).mean())
        res[f"sqnr_db_{label}"] = float(np.mean([sample_sqnr(q, r) for r, q in outs]))
    out["bias_correction_coarse_conv"] = res

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx.save(mlp(), tmp / "mlp.onnx")
        x = np.random.default_rng(4).normal(0, 1, (4, 256)).astype(np.float32)
        res = {}
        for mode in ("fp32", "int8", "int4"):
            extra = [] if mode == "fp32" else ["--weight-only", mode]
            assert cli(["compile", str(tmp / "mlp.onnx"), "--precision", "fp32", *extra, "-o", str(tmp / mode)]) == 0
            manifest = json.loads((tmp / mode / "manifest.json").read_text())
            res[mode] = (sum(manifest["weight_bytes"]["compiled"].values()), Bundle(tmp / mode).run({"x": x})["y"])
        ref = res["fp32"][1]
        out["weight_only_mlp"] = {mode: {"weight_bytes": b, "sqnr_db": (float("inf") if mode == "fp32" else sample_sqnr(y, ref))}
                                  for mode, (b, y) in res.items()}
    return out


def real(n_eval: int) -> dict:
    from bench import ppocr_cls_case, ppocr_rec_case

    from tvmq.compile import compile_model
    from tvmq.config import QuantConfig
    from tvmq.runtime import Bundle

    configs = {"plain": QuantConfig(), "bias_correction": QuantConfig(bias_correction=True),
               "smoothquant_0.5": QuantConfig(smoothquant=0.5)}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, case in (("ppocr_cls", ppocr_cls_case(n_eval, 64)), ("ppocr_rec", ppocr_rec_case(n_eval, 64))):
            inp, xs = case["input"], case["x"]
            calib = [{inp: c} for c in case["calib"]]
            res = {}
            for name, config in configs.items():
                dest = Path(tmp) / f"{label}-{name}"
                compile_model(case["path"], dest, calib=calib, config=config, shapes={inp: list(xs[0].shape)})
                bundle = Bundle(dest)
                first = bundle.outputs[0]["name"]
                res[name] = case["score"]([bundle.run({inp: x})[first] for x in xs], case["y"])
                print(f"{label:10s} {name:16s} {res[name]}", flush=True)
            out[label] = res
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-eval", type=int, default=150)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--synthetic-only", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    result = {"synthetic": synthetic()}
    s = result["synthetic"]
    print(f"SmoothQuant (alpha 0.5), matmul with outlier channels: SQNR {s['smoothquant_outlier_matmul']['sqnr_db_plain']:.1f}"
          f" -> {s['smoothquant_outlier_matmul']['sqnr_db_smoothquant_0.5']:.1f} dB")
    b = s["bias_correction_coarse_conv"]
    print(f"bias correction, conv with coarse weight scales: mean output shift {b['mean_shift_plain']:.4f} -> "
          f"{b['mean_shift_bias_correction']:.4f}, SQNR {b['sqnr_db_plain']:.1f} -> {b['sqnr_db_bias_correction']:.1f} dB")
    w = s["weight_only_mlp"]
    print(f"weight-only, 2x256x256 MLP: weights {w['fp32']['weight_bytes']} B fp32 -> {w['int8']['weight_bytes']} B int8 "
          f"(SQNR {w['int8']['sqnr_db']:.1f} dB) -> {w['int4']['weight_bytes']} B int4 (SQNR {w['int4']['sqnr_db']:.1f} dB)")
    if not args.synthetic_only:
        result["real"] = real(args.n_eval)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
