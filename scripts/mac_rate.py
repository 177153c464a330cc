"""Multiply-accumulates per second of tvmq's int8 and fp32 kernels, per x86 preset, one run.

A GEMM large enough to be compute-bound (``--m/--k/--n``, default 784 x 512 x 512: a 1x1 conv on a
28x28 feature map) is compiled all-int8 and FP32 for every x86 preset this CPU runs and timed on
one thread (per-core rates), medians of ``--runs`` calls. Next to the measured rates: each ISA's
peak MACs per cycle for int8 and fp32 (from its instructions and issue ports), so the ratio
int8/fp32 reads against what the ISA allows.

Usage: python scripts/mac_rate.py [--presets x86-avx2,x86-avx512,x86-avx512vnni] [--runs 50]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

# MACs per cycle per core: fp32 = 2 FMA ports x lanes; int8 = 2 ports x products per instruction,
# where AVX2/AVX-512 without VNNI need a vpaddd per vpmaddwd (3 vector ports: 2/3 of 2 x products).
PEAKS = {
    "x86-avx2": {"fp32": 16, "int8": round(2 * 16 * 3 / 4), "int8_instruction": "vpmaddwd ymm + vpaddd"},
    "x86-avx512": {"fp32": 32, "int8": round(2 * 32 * 3 / 4), "int8_instruction": "vpmaddwd zmm + vpaddd"},
    "x86-avxvnni": {"fp32": 16, "int8": 64, "int8_instruction": "vpdpbusd ymm"},
    "x86-avx512vnni": {"fp32": 32, "int8": 128, "int8_instruction": "vpdpbusd zmm"},
}


def measure(preset: str, m: int, k: int, n: int, runs: int) -> dict:
    from tvm import relax  # noqa: F401  (TVM first: the frontend needs it initialised)

    from tvmq.execute import HostModule
    from tvmq.frontend import load_onnx
    from tvmq.quantize import calibrate, prepare, quantize_pipeline
    from tvmq.testing import matmul_model

    mod, info = load_onnx(matmul_model(m, k, n))
    mod = prepare(mod)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (m, k)).astype(np.float32)
    plan = calibrate(mod, [{"x": x}], target=preset, input_names=["x"])
    out = {}
    for precision, module in (("fp32", mod), ("int8", quantize_pipeline(plan)(mod))):
        ms = HostModule(module, preset).latency_ms(x, repeat=runs)
        out[precision] = {"ms": round(ms, 4), "gmac_s": round(m * k * n / ms * 1e-6, 1)}
    out["int8_vs_fp32"] = round(out["int8"]["gmac_s"] / out["fp32"]["gmac_s"], 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PEAKS))
    ap.add_argument("--m", type=int, default=784)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = "1"
    from tvmq.targets import get_preset, host_cpu_flags

    print(f"GEMM {args.m} x {args.k} x {args.n}, 1 thread; host ISA: "
          f"{', '.join(sorted(host_cpu_flags() & {'avx2', 'avx512f', 'avx512bw', 'avx512_vnni', 'avx_vnni'}))}")
    print(f"{'preset':<16}{'fp32 GMAC/s':>12}{'int8 GMAC/s':>12}{'int8/fp32':>10}   peak MAC/cycle fp32, int8 (ratio)")
    for name in args.presets.split(","):
        preset = get_preset(name)
        if not preset.runs_here:
            print(f"{name:<16} skipped: this CPU lacks {sorted(preset.cpu_flags - host_cpu_flags())}")
            continue
        r = measure(name, args.m, args.k, args.n, args.runs)
        peak = PEAKS.get(name, {})
        ratio = f"{peak['fp32']}, {peak['int8']} ({peak['int8'] / peak['fp32']:.1f}x, {peak['int8_instruction']})" if peak else ""
        print(f"{name:<16}{r['fp32']['gmac_s']:>12}{r['int8']['gmac_s']:>12}{r['int8_vs_fp32']:>9}x   {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
