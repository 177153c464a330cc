"""Time every kernel of a compiled model on its own (the VM's profiler is gone in TVM 0.27).

Usage: python scripts/profile_kernels.py MODEL.onnx --shape x:1,3,48,192 [--fp32] [--top 25] [--target x86-avx2]
       [--threads 2]
Prints each fused PrimFunc's median time times the calls ``main`` makes to it (an unrolled LSTM
calls its step kernels once per time step), sorted, and the sum per inference. The kernels run
on ``--threads`` threads (default as ``tvmq compile`` sets them: ``TVM_NUM_THREADS``, else the
physical cores); left to TVM's own default, the pool ran one thread on a 2-core VM and every
figure came out about doubled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def time_primfuncs(lowered, target, repeat=50):
    import tvm

    from tvmq.kernels import kernel_funcs, random_argument

    dev = tvm.cpu()
    rows = []
    for name, func in kernel_funcs(lowered).items():
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target).jit()
        rng = np.random.default_rng(0)
        # 0.27: PrimFunc params are buffer-typed vars
        args = [tvm.runtime.tensor(random_argument(rng, [int(s) for s in p.shape], str(p.dtype)), dev) for p in func.params]
        timer = lib.time_evaluator("main", dev, number=10, repeat=repeat)
        ms = float(np.median(timer(*args).results)) * 1e3
        rows.append((ms, name))
    return sorted(rows, reverse=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--shape", action="append", default=[])
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--target", default="x86", help="an x86 preset this machine runs")
    ap.add_argument("--threads", type=int, help="CPU threads (default: TVM_NUM_THREADS, else the physical cores)")
    args = ap.parse_args(argv)

    from tvmq.runtime import configure_threads

    print(f"{configure_threads(args.threads)} threads")  # before TVM's thread pool starts

    from collections import Counter

    from tvmq.frontend import load_onnx, parse_shape_arg
    from tvmq.kernels import call_order
    from tvmq.pipeline import lower
    from tvmq.quantize import calibrate, prepare, quantize_pipeline
    from tvmq.recurrent import FLOAT_LOOP_MAX_BYTES
    from tvmq.targets import get_preset

    shapes = dict(parse_shape_arg(s) for s in args.shape)
    # as tvmq.compile imports a float build
    mod, info = load_onnx(args.model, shapes=shapes, lstm_loop_bytes=FLOAT_LOOP_MAX_BYTES if args.fp32 else None)
    mod = prepare(mod)
    if not args.fp32:
        rng = np.random.default_rng(0)
        samples = [{s.name: rng.uniform(-1, 1, s.shape).astype(s.dtype) for s in info.inputs} for _ in range(args.calib)]
        plan = calibrate(mod, samples, target=args.target, input_names=[s.name for s in info.inputs])
        mod = quantize_pipeline(plan)(mod)
    target = get_preset(args.target).tvm_target()
    lowered = lower(mod, args.target)
    calls = Counter(call_order(lowered))
    rows = sorted(((ms * calls.get(name, 1), ms, name) for ms, name in time_primfuncs(lowered, target)), reverse=True)
    total = sum(ms for ms, _, _ in rows)
    for ms, each, name in rows[: args.top]:
        print(f"{ms:8.4f} ms {100 * ms / total:5.1f}%  {calls.get(name, 1):3d} x {each:.4f}  {name}")
    print(f"{total:8.4f} ms per inference over {len(rows)} kernels")


if __name__ == "__main__":
    main()
