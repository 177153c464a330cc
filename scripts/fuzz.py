"""Long fuzzing run of tvmq's passes on random graphs (the CI runs a 50-case profile).

Usage: python scripts/fuzz.py [--cases 500] [--seed 0] [--save DIR]

Prints every failing case (graph, seed, agreement figures) and a summary with the bounds used:
integer program vs Q/DQ float simulation within one output step plus a final float layer's gain
on its inputs' one-step differences (SQNR >= 40 dB), and SQNR vs
FP32 >= 20 dB. Exits 1 if any case fails or raises.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(argv=None) -> int:
    from hypothesis import HealthCheck, given, seed, settings

    from test_fuzz import FP32_SQNR_DB, SIM_SQNR_DB
    from tvmq.testing import check_graph, graphs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, help="write each failing graph here as fail-SEED.onnx (+ its input range)")
    args = ap.parse_args(argv)

    stats = {"cases": 0, "failures": 0, "errors": 0, "min_sim_sqnr": float("inf"), "min_fp32_sqnr": float("inf"),
             "max_steps": 0.0, "max_ratio": 0.0}
    t0 = time.time()

    @seed(args.seed)
    @settings(max_examples=args.cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(graphs())
    def run(case):
        stats["cases"] += 1
        try:
            r = check_graph(case)
        except Exception:  # report and keep fuzzing
            stats["errors"] += 1
            print(f"ERROR seed={case.seed} {case.description}\n{traceback.format_exc()}", flush=True)
            return
        stats["min_sim_sqnr"] = min(stats["min_sim_sqnr"], r.sqnr_vs_simulation)
        stats["min_fp32_sqnr"] = min(stats["min_fp32_sqnr"], r.sqnr_vs_fp32)
        stats["max_steps"] = max(stats["max_steps"], r.max_steps_vs_simulation)
        stats["max_ratio"] = max(stats["max_ratio"], r.max_steps_vs_simulation / r.step_bound)
        if r.max_steps_vs_simulation > r.step_bound or r.sqnr_vs_simulation < SIM_SQNR_DB or r.sqnr_vs_fp32 < FP32_SQNR_DB:
            stats["failures"] += 1
            print(f"FAIL seed={case.seed} {case.description}: {r}", flush=True)
            if args.save:
                import onnx

                args.save.mkdir(parents=True, exist_ok=True)
                onnx.save(case.model, args.save / f"fail-{case.seed}.onnx")
                (args.save / f"fail-{case.seed}.txt").write_text(f"{case.low} {case.high} {case.input_shape}\n")

    run()
    print(f"{stats['cases']} cases in {time.time() - t0:.0f} s: {stats['failures']} out of bounds, {stats['errors']} errors; "
          f"min SQNR vs simulation {stats['min_sim_sqnr']:.1f} dB (bound {SIM_SQNR_DB}), max |int - sim| "
          f"{stats['max_steps']:.3f} steps (at most {stats['max_ratio']:.2f} of each case's bound), min SQNR vs FP32 {stats['min_fp32_sqnr']:.1f} dB "
          f"(bound {FP32_SQNR_DB})")
    return 1 if stats["failures"] or stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
