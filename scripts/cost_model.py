"""The cost model prior ``tvmq tune`` starts from: collect tuning records, train it, measure it.

MetaSchedule's XGBoost cost model ranks the candidates the search measures. Fresh, it ranks them
at random until it holds 100 measurements; tvmq ships one per ISA (``tvmq/costmodels/<isa>.tar.gz``)
trained on the records of zoo models tuned on that ISA, so that tuning a new model ranks its
first candidates with what those kernels taught (the records' features and measured speeds
stay in the file, and each batch measured on the new model is added to them).

    python scripts/cost_model.py collect --models ppocr_rec,yolov8n,lcnet_orient,ppocr_det --time 4m --db db_x86
    python scripts/cost_model.py train --db db_x86            # -> tvmq/costmodels/<this host's ISA>.tar.gz
    python scripts/cost_model.py eval --model yolox --trials 480 --json out.json

``eval`` tunes a model outside the training set twice from the same seed, with the prior and
without, and reports after how many measured candidates each run's tuned kernels (their time in
the model, occurrences counted) reached 90% of the best speed either run found, and 50% / 90% of
its gain over the untuned kernels. Needs the ``bench``
extra (the zoo's models). Figures depend on the host's ISA: it is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import CACHE, host_isa, models  # noqa: E402


def build(name: str, plan: str, preset, n_calib: int = 8):
    """The Relax module of zoo model ``name`` for ``plan`` (``default``: tvmq's int8 plan; ``fp32``)."""
    from tvmq.compile import quantized_module

    family, source, path, make, parts, judge = models(CACHE)[name]
    samples = make(n_calib, 1)
    shapes = {k: list(v.shape) for k, v in samples[0].items()}
    if plan == "fp32":
        return quantized_module(str(path()), preset, precision="fp32", shapes=shapes).module
    return quantized_module(str(path()), preset, raw=samples, shapes=shapes).module


def collect(args, preset) -> None:
    from tvmq.tune import parse_duration, tune

    budget = parse_duration(args.time)
    for name in args.models.split(","):
        for plan in args.plans.split(","):
            t = time.perf_counter()
            report = tune(build(name, plan, preset), preset, args.db, trials=1000, time_budget=budget,
                          progress=False, cost_model=None)
            print(f"{name} {plan}: {report.trials} candidates, {len(report.tasks)} kernels, "
                  f"{time.perf_counter() - t:.0f} s -> {args.db}", flush=True)


def train(args, preset) -> None:
    from tvmq.tune import COST_MODELS, isa_key, train_cost_model

    out = Path(args.out or COST_MODELS / f"{isa_key(preset)}.tar.gz")
    t = time.perf_counter()
    stats = train_cost_model(args.db, preset, out)
    print(f"{out}: {stats['records']} records of {stats['workloads']} kernels, {stats['bytes'] / 1e6:.2f} MB, "
          f"trained in {time.perf_counter() - t:.0f} s")


def trials_to(history, untuned: float, target: float):
    """Candidates measured until the tuned kernels ran ``target`` times faster than untuned
    (``untuned / ms``); None if they never did."""
    for measured, ms in history:
        if untuned / ms >= target:
            return measured
    return None


def summary(out: dict, checkpoints) -> None:
    """The table of :func:`evaluate`'s runs. Each run is judged by its speed-up over its own
    untuned kernels: the two runs time the same default kernels minutes apart, and this
    machine's speed drifts between them (5% in the first measurement)."""
    runs = out["runs"]
    best = max(r["untuned_ms"] / r["final_ms"] for r in runs.values())  # the best speed-up either run found
    overlap = out.get("overlap")
    print(f"\n{out['model']} ({out['plan']}), held out"
          + ("" if overlap is None else f" ({overlap[0]} of {overlap[1]} kernels also in the training records)")
          + f"; host ISA: {out['host_isa']}; prior {out['prior']}; best speed-up of the tuned kernels {best:.3f}x")
    print("| run | candidates | untuned ms | final ms | speed-up | to 90% of the best speed | to 50% / 90% of the best gain | "
          + " | ".join(f"after {n}" for n in checkpoints) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(checkpoints))
    for label, r in runs.items():
        untuned, hist = r["untuned_ms"], r["history"]
        r["to_90_speed"] = trials_to(hist, untuned, 0.9 * best)
        r["to_50_gain"] = trials_to(hist, untuned, 1 + 0.5 * (best - 1))
        r["to_90_gain"] = trials_to(hist, untuned, 1 + 0.9 * (best - 1))
        at = []
        for n in checkpoints:
            seen = [ms for m, ms in hist if m <= n]
            at.append(f"{untuned / seen[-1]:.3f}x" if seen else "-")
        print(f"| {label} | {r['trials']} | {untuned:.3f} | {r['final_ms']:.3f} | {untuned / r['final_ms']:.3f}x | "
              f"{r['to_90_speed']} | {r['to_50_gain']} / {r['to_90_gain']} | " + " | ".join(at) + " |")


def evaluate(args, preset) -> dict:
    from tvmq.tune import extract_tasks, prior_path, tune

    prior = prior_path(args.cost_model, preset)
    if prior is None:
        raise SystemExit(f"error: no cost model for this ISA to evaluate; run `{sys.argv[0]} train` first")
    mod = build(args.model, args.plan, preset)
    overlap = None
    if args.train_db:
        from tvmq.tune import _json_database

        seen = [_json_database(Path(d)) for d in args.train_db]
        tasks = extract_tasks(mod, preset)
        overlap = sum(any(db.has_workload(t.mod) for db in seen) for t in tasks), len(tasks)
    runs = {}
    order = [("without prior", None), ("with prior", prior)]
    for label, model in order[::-1] if args.prior_first else order:
        with tempfile.TemporaryDirectory() as db:
            t = time.perf_counter()
            report = tune(mod, preset, db, trials=args.trials, progress=False, cost_model=model, seed=args.seed)
            runs[label] = {"seconds": round(time.perf_counter() - t, 1), "trials": report.trials,
                           "untuned_ms": report.kernel_ms[0], "final_ms": report.kernel_ms[1],
                           "history": report.history}
        print(f"{label}: {report.trials} candidates in {runs[label]['seconds']} s, kernels "
              f"{report.kernel_ms[0]:.3f} -> {report.kernel_ms[1]:.3f} ms", flush=True)
    out = {"model": args.model, "plan": args.plan, "host_isa": host_isa(), "prior": str(prior), "overlap": overlap,
           "runs": runs}
    summary(out, args.checkpoints)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="x86", help="a preset this machine runs (default: x86, this CPU)")
    p.add_argument("--threads", type=int, default=2)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="tune zoo models into one database")
    c.add_argument("--models", required=True)
    c.add_argument("--plans", default="default,fp32", help="builds to tune: default (int8), fp32")
    c.add_argument("--time", default="4m", help="search time per model and build")
    c.add_argument("--db", required=True)
    t = sub.add_parser("train", help="train the prior on databases")
    t.add_argument("--db", action="append", required=True)
    t.add_argument("--out", help="default: tvmq/costmodels/<ISA>.tar.gz, the file tvmq tune uses")
    e = sub.add_parser("eval", help="tune a held-out model with and without the prior")
    e.add_argument("--model", required=True)
    e.add_argument("--plan", default="default")
    e.add_argument("--trials", type=int, default=32, help="measured candidates per kernel")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--prior-first", action="store_true", help="tune with the prior first (the machine may drift)")
    e.add_argument("--cost-model", default="auto")
    e.add_argument("--train-db", action="append", help="the databases the prior was trained on (to count shared kernels)")
    e.add_argument("--checkpoints", type=lambda s: [int(v) for v in s.split(",")], default=[64, 128, 256, 512])
    e.add_argument("--json")
    e.add_argument("--replay", help="print the table of an earlier --json instead of tuning")
    args = p.parse_args(argv)

    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from tvmq.runtime import configure_threads
    from tvmq.targets import get_preset

    configure_threads()
    preset = get_preset(args.target)
    if args.cmd == "collect":
        collect(args, preset)
    elif args.cmd == "train":
        train(args, preset)
    elif args.replay:
        summary(json.loads(Path(args.replay).read_text()), args.checkpoints)
    else:
        out = evaluate(args, preset)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
