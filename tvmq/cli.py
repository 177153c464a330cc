"""``python -m tvmq``: compile, run and inspect quantized models.

Every user-facing failure is one ``error:`` line on stderr and exit code 2 (130 when
interrupted); ``-v`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import tempfile
from pathlib import Path

from tvmq.config import DEFAULT_MIN_SQNR
from tvmq.errors import TvmqError

__all__ = ["main"]

DEMO_DIR = Path(__file__).with_name("demo")
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_compile(sub):
    p = sub.add_parser(
        "compile",
        help="quantize and compile an ONNX model into a bundle (no model: the embedded digits demo)",
        description="Quantize an ONNX model into int8 kernels and compile it for a target. "
        "Without MODEL, compiles the embedded digits CNN and prints its FP32 vs INT8 accuracy and latency.",
    )
    p.add_argument("model", nargs="?", help="FP32 (or QDQ) ONNX model; omit for the demo")
    p.add_argument("-o", "--output", help="bundle folder to create (must not exist or be empty)")
    p.add_argument("--target", default="x86", help="target preset (see `tvmq targets`; default: x86)")
    p.add_argument("--arch", help="CUDA targets: GPU architecture, e.g. sm_90 (default: the preset's)")
    p.add_argument("--calib", help="calibration folder: one .npy (single input) or .npz (name -> array) per sample")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D0,D1,..",
                   help="fix an input's dynamic shape (repeatable)")
    p.add_argument("--method", default="minmax", choices=["minmax", "percentile", "entropy", "mse"],
                   help="activation range calibration (default: minmax)")
    p.add_argument("--percentile", type=float, default=99.999, help="kept %% for --method percentile")
    p.add_argument("--precision", default="int8", choices=["int8", "fp16", "fp32", "auto"],
                   help="int8 (default), fp16, fp32 (no quantization), or auto: per layer, the fastest plan within "
                        "the budget (--max-drop or --min-sqnr; default: every output >= "
                        f"{DEFAULT_MIN_SQNR:g} dB SQNR vs FP32)")
    p.add_argument("--int8-everywhere", action="store_true",
                   help="quantize every layer, also those (depthwise, short reductions) whose int8 kernel is no "
                        "faster than float on the target's ISA, which stay float by default")
    p.add_argument("--keep-float", action="append", default=[], metavar="GLOB",
                   help="leave layers whose name matches in float (repeatable; sugar for a --config rule)")
    p.add_argument("--config", help="JSON/TOML file of layer rules (op type | name glob) -> int8|fp16|fp32|skip, "
                                    "first match wins")
    p.add_argument("--plan", help="reuse a plan.json from an earlier build instead of calibrating")
    _add_budget_flags(p)
    p.add_argument("--requantize", choices=["fixed_point", "float"],
                   help="integer fixed-point or float scaling of accumulators (default: fixed_point, and for "
                        "pre-quantized models float computed as ONNX Runtime does)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    _add_algorithm_flags(p)
    p.add_argument("--db", help="tuning database folder: use its (verified) kernels")
    p.add_argument("--tune", type=int, default=0, metavar="N", help="tune each kernel with N trials first (needs --db)")
    p.add_argument("--max-tasks", type=int, help="with --tune: tune only the largest kernels")
    p.set_defaults(func=cmd_compile)


def _add_metric_flags(p):
    p.add_argument("--metric", default=None, help="top1 | cosine | sqnr | python:MODULE:FUNCTION (outputs, labels) -> score")
    p.add_argument("--eval-data", help="labelled evaluation folder: samples as for --calib plus labels.npy")


def _add_budget_flags(p):
    _add_metric_flags(p)
    p.add_argument("--max-drop", type=float, help="--precision auto: largest allowed metric drop from FP32 "
                                                  "(top1: percentage points)")
    p.add_argument("--min-sqnr", type=float, help="--precision auto: smallest allowed SQNR vs FP32 (dB) of every "
                                                  "output and output part, worst sample (default with no budget flag: "
                                                  f"{DEFAULT_MIN_SQNR:g} dB, about cosine 0.995)")
    p.add_argument("--output-slice", action="append", default=[], metavar="NAME:[AXIS:]START:STOP",
                   help="--precision auto: judge this part of an output on its own (axis 1 unless given; e.g. "
                        "output0:4: for a YOLO head's class scores); the inputs of an output's final Concat "
                        "are judged apart anyway")


def _add_algorithm_flags(p):
    p.add_argument("--bias-correction", action="store_true", help="correct biases for the mean shift of weight quantization")
    p.add_argument("--smoothquant", type=float, metavar="ALPHA", help="migrate matmul input outliers into weights (alpha, e.g. 0.5)")
    p.add_argument("--weight-only", choices=["int8", "int4"], help="matmuls left in float store int8/int4 weights")
    p.add_argument("--group", type=int, default=32, help="input rows per scale for --weight-only int4 (default 32)")


def _add_tune(sub):
    p = sub.add_parser("tune", help="tune a model's kernels with MetaSchedule into a database")
    p.add_argument("model", help="ONNX model")
    p.add_argument("--db", required=True, help="tuning database folder (created if missing, reused if present)")
    p.add_argument("--target", default="x86", help="target preset (default: x86)")
    p.add_argument("--calib", help="calibration folder (as for compile); omit with --precision fp32")
    p.add_argument("--plan", help="reuse a plan.json instead of calibrating")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D0,D1,..")
    p.add_argument("--precision", default="int8", choices=["int8", "fp32"])
    p.add_argument("--method", default="minmax", choices=["minmax", "percentile", "entropy", "mse"])
    p.add_argument("--percentile", type=float, default=99.999)
    p.add_argument("--keep-float", action="append", default=[], metavar="GLOB")
    p.add_argument("--int8-everywhere", action="store_true", help="as for compile")
    p.add_argument("--requantize", choices=["fixed_point", "float"])
    p.add_argument("--trials", type=int, default=32, help="measured candidates per kernel (default 32)")
    p.add_argument("--max-tasks", type=int, help="tune only the largest kernels")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on boards registered with this TVM RPC tracker")
    p.add_argument("--rpc-key", default="", help="with --rpc-tracker: the kind of board (the servers' --key)")
    p.set_defaults(func=cmd_tune)


def _add_export(sub):
    p = sub.add_parser("export-qdq", help="calibrate and write the model as a standard ONNX QDQ file")
    p.add_argument("model", help="FP32 ONNX model")
    p.add_argument("-o", "--output", required=True, help="QDQ .onnx file to write (its plan goes beside it)")
    p.add_argument("--calib", help="calibration folder (as for compile)")
    p.add_argument("--plan", help="export this plan.json instead of calibrating")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D0,D1,..")
    p.add_argument("--method", default="minmax", choices=["minmax", "percentile", "entropy", "mse"])
    p.add_argument("--percentile", type=float, default=99.999)
    p.add_argument("--keep-float", action="append", default=[], metavar="GLOB")
    p.add_argument("--requantize", choices=["fixed_point", "float"])
    p.add_argument("--target", default="x86", help="preset whose activation dtype to use (default: x86, uint8)")
    p.set_defaults(func=cmd_export)


def _add_eval(sub):
    p = sub.add_parser("eval", help="FP32 vs compiled accuracy and latency of a bundle on your data")
    p.add_argument("bundle", help="folder written by `tvmq compile`")
    p.add_argument("--model", help="the FP32 ONNX model to compare with (default: the one named in the manifest)")
    p.add_argument("--data", required=True, help="folder of samples (.npy/.npz, as for --calib), with labels.npy for top1")
    p.add_argument("--metric", default=None, help="top1 | cosine | sqnr | python:MODULE:FUNCTION "
                                                  "(default: top1 with labels, else sqnr)")
    p.add_argument("--repeat", type=int, default=50, help="latency runs (median reported; default 50)")
    p.set_defaults(func=cmd_eval)


def _add_run(sub):
    p = sub.add_parser("run", help="run a bundle on inputs (TVM runtime only)")
    p.add_argument("bundle", help="folder written by `tvmq compile`")
    p.add_argument("--input", required=True, help=".npy (single input) or .npz (name -> array)")
    p.add_argument("--output", help="write outputs to this .npz (default: print them)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="run on a board's TVM RPC server instead of here")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="run on a board from this TVM RPC tracker")
    p.add_argument("--rpc-key", default="", help="the board's key (with --rpc-tracker, or a keyed --rpc server)")
    p.add_argument("--repeat", type=int, default=0, help="also time N runs (on the board with --rpc) and print the median")
    p.add_argument("--threads", type=int, help="CPU threads here (default: TVM_NUM_THREADS, else the physical cores)")
    p.set_defaults(func=cmd_run)


def _add_runtime(sub):
    p = sub.add_parser("runtime", help="write what a board needs to run bundles: TVM runtime + C++ runner/RPC server",
                       description="Write the TVM runtime libraries for a target's ISA (armv7: built from source, "
                       "a few minutes once), tvmq_run and tvmq_rpc_server into a folder to copy onto the board.")
    p.add_argument("-o", "--output", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--target", default="x86", help="target preset (default: x86)")
    p.set_defaults(func=cmd_runtime)


def _add_targets(sub):
    p = sub.add_parser("targets", help="list target presets")
    p.set_defaults(func=cmd_targets)


def build_parser() -> argparse.ArgumentParser:
    from tvmq import __version__

    parser = argparse.ArgumentParser(prog="tvmq", description="Compiler-based INT8 quantization for Apache TVM.")
    parser.add_argument("--version", action="version", version=f"tvmq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress, details and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_compile(sub)
    _add_tune(sub)
    _add_export(sub)
    _add_run(sub)
    _add_eval(sub)
    _add_runtime(sub)
    _add_targets(sub)
    return parser


def _config_from_args(args):
    from tvmq.config import LayerRule, QuantConfig

    from tvmq.config import load_rules

    rules = tuple(LayerRule(name=glob, precision="fp32") for glob in args.keep_float)
    try:
        if getattr(args, "config", None):
            rules += load_rules(args.config)
        return QuantConfig(method=args.method, percentile=args.percentile, requantize=args.requantize, rules=rules,
                           bias_correction=getattr(args, "bias_correction", False),
                           smoothquant=getattr(args, "smoothquant", None),
                           weight_only=getattr(args, "weight_only", None),
                           weight_only_group=getattr(args, "group", 32),
                           int8_everywhere=getattr(args, "int8_everywhere", False))
    except ValueError as err:
        raise TvmqError(f"{err}") from None


def cmd_compile(args) -> int:
    from tvmq.frontend import parse_shape_arg

    shapes = dict(parse_shape_arg(s) for s in args.shape)
    config = _config_from_args(args)
    if args.model is None:
        return _demo(args, config)
    if not args.output:
        raise TvmqError("no output folder; pass -o OUT (the bundle folder to create)")
    from tvmq.build import compile_model

    result = compile_model(
        args.model,
        args.output,
        target=_target(args),
        calib=args.calib,
        config=config,
        shapes=shapes,
        precision=args.precision,
        plan=args.plan,
        force=args.force,
        progress=args.verbose or bool(args.tune),
        db=args.db,
        tune_trials=args.tune,
        tune_max_tasks=args.max_tasks,
        auto=_auto_from_args(args),
    )
    _print_summary(result)
    return 0


def _auto_from_args(args):
    """The ``--precision auto`` settings; budget flags without auto are a mistake worth naming."""
    from tvmq.build import AutoPrecision

    budget = args.max_drop is not None or args.min_sqnr is not None
    if args.precision != "auto":
        if budget or args.metric or args.eval_data or args.output_slice:
            raise TvmqError("--max-drop/--min-sqnr/--metric/--eval-data/--output-slice choose a plan; "
                            "add --precision auto")
        return None
    if args.max_drop is not None and args.min_sqnr is not None:
        raise TvmqError("give one budget: --max-drop POINTS (with --metric) or --min-sqnr DB")
    metric = args.metric or ("sqnr" if args.max_drop is None else "top1")
    for value, flag in ((args.max_drop, "--max-drop"), (args.min_sqnr, "--min-sqnr")):
        if value is not None and not (value >= 0 and value == value and value != float("inf")):
            raise TvmqError(f"{flag} {value} is not a finite, non-negative number")
    if args.min_sqnr is not None and metric != "sqnr":
        raise TvmqError(f"--min-sqnr is an SQNR budget; with --metric {metric} use --max-drop POINTS")
    if args.eval_data is not None and not Path(args.eval_data).is_dir():
        raise TvmqError(f"--eval-data {args.eval_data}: no such folder (samples as for --calib, plus labels.npy)")
    if args.output_slice and metric not in ("sqnr", "cosine"):
        raise TvmqError(f"--output-slice parts are judged by sqnr or cosine, not {metric}; use --metric sqnr|cosine")
    return AutoPrecision(metric=metric, max_drop=args.max_drop, min_sqnr=args.min_sqnr, eval_data=args.eval_data,
                         output_slices=tuple(args.output_slice))


def cmd_tune(args) -> int:
    from tvmq.build import quantized_module
    from tvmq.frontend import parse_shape_arg
    from tvmq.targets import get_preset
    from tvmq.tune import require_board_runner, tune

    preset = get_preset(args.target)
    shapes = dict(parse_shape_arg(s) for s in args.shape)
    runner = None
    if args.rpc_tracker:
        from tvmq.remote import RemoteTarget, rpc_runner

        runner = rpc_runner(RemoteTarget(tracker=args.rpc_tracker, key=args.rpc_key))
    require_board_runner(preset, runner)  # before calibrating, which takes a while
    qm = quantized_module(args.model, preset, raw=args.calib, config=_config_from_args(args), shapes=shapes,
                          precision=args.precision, plan=args.plan)
    report = tune(qm.module, preset, args.db, trials=args.trials, max_tasks=args.max_tasks, progress=True,
                  runner=runner)
    for t in report.tasks:
        best = f"{t['best_us']:.1f} us" if t["best_us"] is not None else f"no valid candidate ({t['error']})"
        print(f"{t['name'][:60]:<60} x{t['weight']}  best {best}")
    print(f"tuned {len(report.tasks)} kernels, {report.trials} trials -> {args.db}")
    if not report.tasks:
        kernel = preset.micro_kernel
        print(f"warning: nothing to tune for target {preset.name!r}: tvmq tunes its packed conv2d/matmul kernels "
              f"(int8 with the {kernel.name if kernel else 'preset'}'s micro-kernel, float with vector FMAs) and "
              "depthwise kernels, and this model compiled to none of them"
              + ("" if kernel or preset.kind != "llvm" else f"; {preset.name} has no int8 micro-kernel"), file=sys.stderr)
    return 0


def _target(args):
    """The preset for ``--target`` (with ``--arch`` applied to CUDA presets)."""
    from tvmq.targets import get_preset

    preset = get_preset(args.target)
    if getattr(args, "arch", None):
        if preset.kind != "cuda":
            raise TvmqError(f"--arch applies to CUDA targets; {preset.name!r} is {preset.kind}")
        if not args.arch.startswith("sm_") or not args.arch[3:].isdigit():
            raise TvmqError(f"--arch {args.arch!r} is not a CUDA architecture like sm_90")
        preset = preset.with_target(arch=args.arch)
    return preset


def _print_summary(result) -> None:
    m = result.manifest
    q = m["quantization"]
    size = (result.output_dir / m["library"]).stat().st_size
    layers = "fp32 (not quantized)"
    if q:
        half = q.get("fp16_layers", 0)
        layers = f"{q['int8_layers']} int8 layers, {half} fp16, {q['float_layers'] - half} fp32"
    print(f"compiled {m['model'].get('file', 'model')} for {m['target']['preset']} -> {result.output_dir} "
          f"({m['library']} {size / 1024:.0f} KiB): {layers}")
    integer = sum(1 for k in m["kernels"] if k["accumulator"] == "int32")
    line = f"kernels: {integer} of {len(m['kernels'])} multiply-accumulate kernels compute in integers"
    if integer and m["target"].get("int8_kernel"):
        from tvmq.targets.intrinsics import MICRO_KERNELS

        kernel = MICRO_KERNELS.get(m["target"]["int8_kernel"])
        tensorized = [k["intrinsic"] for k in m["kernels"] if k["accumulator"] == "int32" and k.get("intrinsic")]
        line += (f"; {len(tensorized)} of {integer} use the {m['target']['int8_kernel']} micro-kernel "
                 f"({' + '.join(m['target']['int8_instructions'])})")
        if kernel is not None and kernel.fallback:  # two-pixel kernel: the layers whose pixels do not pair
            fallback = sum(1 for name in tensorized if kernel.name not in name)
            line = line.replace(f"{len(tensorized)} of {integer} use", f"{len(tensorized) - fallback} of {integer} use")
            line += f", {fallback} its {kernel.fallback} fallback (pixels that do not pair up)"
    print(line)
    if q and q.get("kept_float_for_speed"):
        from tvmq.targets.intrinsics import MICRO_KERNELS

        n, kernel = len(q["kept_float_for_speed"]), m["target"]["int8_kernel"]
        print(f"kept {n} layer{'s' * (n != 1)} float where int8 is no faster than float on {kernel} "
              f"({MICRO_KERNELS[kernel].float_rules()}; --int8-everywhere quantizes them)")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)


def _demo(args, config) -> int:
    import numpy as np

    from tvmq.build import compile_model
    from tvmq.execute import HostModule
    from tvmq.runtime import Bundle

    if args.calib or args.shape or args.plan:
        raise TvmqError("the demo brings its own model, calibration data and shapes; pass a MODEL to use --calib/--shape/--plan")
    if args.target != "x86" and not args.output:
        raise TvmqError(f"the demo runs its bundle here; for --target {args.target} pass -o OUT to keep the bundle")
    model = DEMO_DIR / "digits.onnx"
    test = np.load(DEMO_DIR / "digits_test.npz")
    xs, ys = test["x"], test["y"]
    tmpdir = None
    if args.output:
        out = Path(args.output)
    else:
        tmpdir = tempfile.TemporaryDirectory(prefix="tvmq-demo-")
        out = Path(tmpdir.name) / "digits-int8"
    try:
        result = compile_model(model, out, target=args.target, calib=DEMO_DIR / "digits_calib", config=config,
                               precision=args.precision, force=args.force, progress=args.verbose,
                               auto=_auto_from_args(args))
        n_calib = len(list((DEMO_DIR / "digits_calib").glob("*.npy")))
        print(f"demo: digits CNN trained on scikit-learn's load_digits; {len(ys)} held-out test images, "
              f"{n_calib} calibration samples, method {config.method.value}")
        _print_summary(result)
        if args.target != "x86":
            return 0
        fp32 = HostModule(result.float_module)
        bundle = Bundle(result.output_dir)
        name = bundle.inputs[0]["name"]
        acc_f = float(np.mean([fp32(x[None])[0].argmax() == y for x, y in zip(xs, ys)]))
        acc_q = float(np.mean([bundle.run({name: x[None]})[bundle.outputs[0]["name"]].argmax() == y for x, y in zip(xs, ys)]))
        lat_f = fp32.latency_ms(xs[:1], repeat=200)
        lat_q = bundle.latency_ms({name: xs[:1]}, repeat=200)
        label = {"int8": "INT8 (tvmq)", "auto": "plan (tvmq)", "fp16": "FP16 bundle"}.get(args.precision, "FP32 bundle")
        print(f"{'FP32 (TVM)':<12} accuracy {acc_f * 100:6.2f}%   latency {lat_f:.3f} ms (median, batch 1)")
        print(f"{label:<12} accuracy {acc_q * 100:6.2f}%   latency {lat_q:.3f} ms (median, batch 1)")
        print(f"accuracy change {100 * (acc_q - acc_f):+.2f} pt; speed-up {lat_f / lat_q:.2f}x")
        if tmpdir is None:
            print(f"bundle kept in {result.output_dir}; run it with: python -m tvmq run {result.output_dir} --input x.npy")
        return 0
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


def cmd_export(args) -> int:
    from tvmq.build import quantized_module
    from tvmq.export import export_qdq
    from tvmq.frontend import is_prequantized, parse_shape_arg
    from tvmq.passes import find_layers
    from tvmq.targets import get_preset

    out = Path(args.output)
    if out.exists():
        raise TvmqError(f"{out} exists; choose another file name for -o")
    if not out.resolve().parent.is_dir():
        raise TvmqError(f"cannot write {out}: folder {out.resolve().parent} does not exist")
    if is_prequantized(args.model):
        raise TvmqError(f"{args.model} is already quantized (QDQ); export-qdq takes a float model")
    shapes = dict(parse_shape_arg(s) for s in args.shape)
    # A QDQ file is for any runtime: every layer the rules allow is quantized, whatever tvmq's
    # kernels would prefer on --target (which only picks the activation dtype here).
    config = dataclasses.replace(_config_from_args(args), int8_everywhere=True)
    qm = quantized_module(args.model, get_preset(args.target), raw=args.calib, config=config,
                          shapes=shapes, plan=args.plan)
    names = [layer.name for layer in find_layers(qm.float_module["main"])]
    plan_path = out.with_suffix(".plan.json")
    try:
        counts = export_qdq(args.model, qm.plan, out, names)
        plan_path.write_text(qm.plan.dumps() + "\n")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    print(f"wrote {out} ({counts['int8_layers']} of {counts['layers']} layers int8) and {plan_path}")
    return 0


def cmd_eval(args) -> int:
    from tvmq.evaluate import evaluate_bundle

    rows = evaluate_bundle(args.bundle, args.data, model=args.model, metric=args.metric, repeat=args.repeat)
    print(f"{'':<16}{rows['metric']:>12}{'latency (median)':>20}")
    for label, row in rows["rows"].items():
        print(f"{label:<16}{row['display']:>12}{row['latency_ms']:>17.3f} ms")
    print(f"change {rows['change']}; speed-up {rows['speedup']:.2f}x on {rows['samples']} samples "
          f"({rows['threads']} threads)")
    return 0


def cmd_run(args) -> int:
    from tvmq.runtime import Bundle, BundleError, configure_threads, read_inputs, write_outputs

    remote = None
    if args.rpc or args.rpc_tracker:
        from tvmq.remote import RemoteTarget

        remote = RemoteTarget(rpc=args.rpc, tracker=args.rpc_tracker, key=args.rpc_key)
    try:
        configure_threads(args.threads)
        bundle = Bundle(args.bundle)
        inputs = read_inputs(Path(args.input), bundle)
        if remote is None:
            outputs = bundle.run(inputs)
            latency = bundle.latency_ms(inputs, repeat=args.repeat) if args.repeat > 0 else None
        else:
            from tvmq.remote import run_remote

            outputs, latency = run_remote(bundle.path, inputs, remote, repeat=args.repeat)
    except BundleError as err:
        raise TvmqError(str(err)) from None
    write_outputs(outputs, args.output)
    if latency is not None:
        where = (remote.rpc or f"a {remote.key} board") if remote else f"this machine, {bundle.threads} threads"
        print(f"latency {latency:.3f} ms (median of {args.repeat} runs on {where})")
    return 0


def cmd_runtime(args) -> int:
    import shutil

    from tvmq import crossrt
    from tvmq.build import prepare_output_dir, staged_output
    from tvmq.targets import get_preset

    preset = get_preset(args.target)
    if preset.kind != "llvm":
        raise TvmqError(f"target {preset.name!r} runs on a CUDA device: install the apache-tvm wheel (with CUDA) on "
                        "its host, or use `tvmq run --rpc` against it; `tvmq runtime` writes CPU board runtimes")
    preset.check_toolchain()
    out = Path(args.output)
    prepare_output_dir(out)
    arch = crossrt.triple_arch(preset.target.get("mtriple") if not preset.is_host else None)
    compiler = preset.cross_compiler or "g++"
    with staged_output(out) as tmp:
        for exe in (crossrt.build_runner(compiler, arch), crossrt.build_rpc_server(compiler, arch)):
            shutil.copy2(exe, tmp / exe.name)
        for lib in crossrt.runtime_libraries(arch):
            shutil.copyfile(lib, tmp / lib.name)
    names = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out}/ for {preset.name} ({arch}): {names}")
    print("on the board: ./tvmq_run model.so x.npy -o out_   or   ./tvmq_rpc_server --port 9090")
    return 0


def cmd_targets(args) -> int:
    from tvmq.targets import list_presets

    for p in list_presets():
        kernel = p.micro_kernel
        int8 = f"{p.activation_dtype[0]}8 x s8 " + (f"{kernel.name}" if kernel else "dp4a" if p.kind == "cuda" else "-")
        here = " [runs here]" if p.runs_here else ""
        print(f"{p.name:<15} {int8:<20} {p.description}{here}")
    return 0


def _interrupted() -> int:
    print("error: interrupted; nothing was written (partial output removed)", file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from tvmq import build
    from tvmq.runtime import BundleError, configure_threads

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT)
    try:
        # From here on SIGINT raises KeyboardInterrupt and is also remembered: TVM turns an interrupt
        # inside a Python callback into a RuntimeError, which must still read as an interruption.
        configure_threads()  # before TVM runs a kernel: calibration and latency measurement use them too
        build.import_compiler()
        return args.func(args)
    except (TvmqError, BundleError) as err:
        if build.interrupt_requested():
            return _interrupted()
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as err:  # pylint: disable=broad-except
        if build.interrupt_requested():
            return _interrupted()
        if args.verbose:
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"error: internal error ({type(err).__name__}: {first}); rerun with -v and report it", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
