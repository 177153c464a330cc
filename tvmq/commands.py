"""The CLI's commands: each ``cmd_*`` takes the parsed arguments (:mod:`tvmq.cli` builds the
parser), does its work through the same API a Python user calls (:func:`tvmq.compile.compile_model`,
:func:`tvmq.compile.quantized_module`, :class:`tvmq.runtime.Bundle`, ...) and prints the result.
Input errors are raised as :class:`~tvmq.errors.TvmqError`; :func:`tvmq.cli.main` prints them.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

from tvmq.errors import TvmqError

__all__ = ["DEMO_DIR", "cmd_compile", "cmd_eval", "cmd_export", "cmd_run", "cmd_runtime", "cmd_targets", "cmd_tune"]

DEMO_DIR = Path(__file__).with_name("demo")


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
                           int8_everywhere=getattr(args, "int8_everywhere", False),
                           per_channel_activations=getattr(args, "per_channel_activations", None))
    except ValueError as err:
        raise TvmqError(f"{err}") from None


def cmd_compile(args) -> int:
    from tvmq.frontend import parse_dim_spec, parse_shape_arg

    shapes = dict(parse_shape_arg(s) for s in args.shape)
    specs = [parse_dim_spec(d) for d in args.dim]
    dims = {name: bounds for name, bounds, _ in specs}
    variants = {name: sizes for name, _, sizes in specs if sizes}
    config = _config_from_args(args)
    if args.model is None:
        return _demo(args, config)
    if not args.output:
        raise TvmqError("no output folder; pass -o OUT (the bundle folder to create)")
    from tvmq.compile import compile_model
    from tvmq.config import TuneOptions

    result = compile_model(
        args.model,
        args.output,
        target=_target(args),
        calib=args.calib,
        config=config,
        shapes=shapes,
        dims=dims,
        precision=args.precision,
        plan=args.plan,
        force=args.force,
        progress=args.verbose or bool(args.tune),
        tuning=TuneOptions(db=args.db, trials=args.tune, max_tasks=args.max_tasks),
        auto=_auto_from_args(args),
        variants=variants,
    )
    _print_summary(result)
    return 0


def _auto_from_args(args):
    """The ``--precision auto`` settings; budget flags without auto are a mistake worth naming."""
    from tvmq.config import AutoPrecision

    budget = args.max_drop is not None or args.min_sqnr is not None
    if args.precision != "auto":
        if (budget or args.metric or args.eval_data or args.output_slice or args.input_noise is not None
                or args.clip_ranges or args.int16_activations):
            raise TvmqError("--max-drop/--min-sqnr/--metric/--eval-data/--output-slice/--input-noise/--clip-ranges/"
                            "--int16-activations choose a plan; add --precision auto")
        return None
    if args.max_drop is not None and args.min_sqnr is not None:
        raise TvmqError("give one budget: --max-drop POINTS (with --metric) or --min-sqnr DB")
    metric = args.metric or ("sqnr" if args.max_drop is None else "top1")
    for value, flag in ((args.max_drop, "--max-drop"), (args.min_sqnr, "--min-sqnr"), (args.input_noise, "--input-noise")):
        if value is not None and not (value >= 0 and value == value and value != float("inf")):
            raise TvmqError(f"{flag} {value} is not a finite, non-negative number")
    if args.min_sqnr is not None and metric != "sqnr":
        raise TvmqError(f"--min-sqnr is an SQNR budget; with --metric {metric} use --max-drop POINTS")
    if args.eval_data is not None and not Path(args.eval_data).is_dir():
        raise TvmqError(f"--eval-data {args.eval_data}: no such folder (samples as for --calib, plus labels.npy)")
    if args.output_slice and metric not in ("sqnr", "cosine"):
        raise TvmqError(f"--output-slice parts are judged by sqnr or cosine, not {metric}; use --metric sqnr|cosine")
    return AutoPrecision(metric=metric, max_drop=args.max_drop, min_sqnr=args.min_sqnr, eval_data=args.eval_data,
                         output_slices=tuple(args.output_slice),
                         input_noise=1.0 if args.input_noise is None else args.input_noise, clip_ranges=args.clip_ranges,
                         int16_activations=args.int16_activations)


def cmd_tune(args) -> int:
    from tvmq.compile import quantized_module
    from tvmq.frontend import parse_dim_arg, parse_shape_arg
    from tvmq.targets import get_preset
    from tvmq.tune import (GENERIC_MIN_SHARE, GENERIC_MIN_US, TRIALS, TRIALS_WITH_TIME, parse_duration, prior_path,
                           require_board_runner, tune)

    preset = get_preset(args.target)
    budget = parse_duration(args.time) if args.time else None
    trials = args.trials or (TRIALS_WITH_TIME if budget else TRIALS)
    shapes = dict(parse_shape_arg(s) for s in args.shape)
    dims = dict(parse_dim_arg(d) for d in args.dim)
    runner = None
    if args.rpc_tracker:
        from tvmq.remote import RemoteTarget, rpc_runner

        runner = rpc_runner(RemoteTarget(tracker=args.rpc_tracker, key=args.rpc_key))
    require_board_runner(preset, runner)  # before calibrating, which takes a while
    prior_path(args.cost_model, preset)  # a missing file is an error before calibrating too
    qm = quantized_module(args.model, preset, raw=args.calib, config=_config_from_args(args), shapes=shapes,
                          precision=args.precision, plan=args.plan, dims=dims)
    report = tune(qm.module, preset, args.db, trials=trials, max_tasks=args.max_tasks, progress=True,
                  runner=runner, time_budget=budget, cost_model=args.cost_model)
    for t in report.tasks:
        if t["best_us"] is not None:
            best = f"{t['best_us']:.1f} us"
        elif t["error"] is None:
            best = "not reached (the --time budget ran out first)" if report.out_of_time else "no candidate measured"
        else:
            best = f"no valid candidate ({t['error']})"
        untuned = f"  untuned {t['untuned_us']:.1f} us ({100 * t['share']:.0f}% of the kernel time)" \
            if t.get("share") is not None else ""
        kind = "  (generic space)" if t.get("generic") else ""
        print(f"{t['name'][:60]:<60} x{t['weight']}{untuned}  best {best}{kind}")
    print(f"tuned {len(report.tasks)} kernels, {report.trials} trials -> {args.db}"
          + (f" (stopped by --time {args.time})" if report.out_of_time else "")
          + f"; cost model prior: {report.cost_model}")
    if report.kernel_ms:
        print(f"those kernels in the model: {report.kernel_ms[0]:.3f} ms untuned, {report.kernel_ms[1]:.3f} ms with the "
              "best candidates (each used only if it agrees with the untuned kernel)")
    if not report.tasks:
        kernel = preset.micro_kernel
        print(f"warning: nothing to tune for target {preset.name!r}: tvmq tunes its packed conv2d/matmul kernels "
              f"(int8 with the {kernel.name if kernel else 'preset'}'s micro-kernel, float with vector FMAs) and "
              "depthwise kernels, and other kernels over static shapes that take at least "
              f"{100 * GENERIC_MIN_SHARE:g}% of the kernel time and {GENERIC_MIN_US:g} us on this machine; this model "
              "compiled to none of them"
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
        wide = q.get("int16_activation_layers", 0)
        layers = f"{q['int8_layers']} int8 layers{f' ({wide} on 16-bit activations)' if wide else ''}, {half} fp16, " \
                 f"{q['float_layers'] - half} fp32"
    print(f"compiled {m['model'].get('file', 'model')} for {m['target']['preset']} -> {result.output_dir} "
          f"({m['library']} {size / 1024:.0f} KiB): {layers}")
    integer = sum(1 for k in m["kernels"] if k["accumulator"] == "int32")
    line = f"kernels: {integer} of {len(m['kernels'])} multiply-accumulate kernels compute in integers"
    if integer and m["target"].get("int8_kernel"):
        from tvmq.targets.intrinsics import MICRO_KERNELS

        kernel = MICRO_KERNELS.get(m["target"]["int8_kernel"])
        # layers on 16-bit activations run the ISA's kernel for them, where it is another one
        wide = MICRO_KERNELS.get(kernel.wide) if kernel is not None and kernel.wide != kernel.name else None
        on_wide = [k for k in m["kernels"] if wide is not None and k.get("intrinsic") and k["operands"][:1] == ["int16"]]
        tensorized = [k["intrinsic"] for k in m["kernels"] if k["accumulator"] == "int32" and k.get("intrinsic")
                      and k not in on_wide]
        line += (f"; {len(tensorized)} of {integer} use the {m['target']['int8_kernel']} micro-kernel "
                 f"({' + '.join(m['target']['int8_instructions'])})")
        if on_wide:
            line += f", {len(on_wide)} its {wide.name} kernel for 16-bit activations ({' + '.join(wide.mnemonics)})"
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

    from tvmq.compile import compile_model
    from tvmq.execute import HostModule
    from tvmq.runtime import Bundle

    if args.calib or args.shape or args.dim or args.plan:
        raise TvmqError("the demo brings its own model, calibration data and shapes; pass a MODEL to use "
                        "--calib/--shape/--dim/--plan")
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
    from tvmq.compile import quantized_module
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
    from tvmq.bundle import prepare_output_dir, staged_output
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
        int8 += f", s16 x s8 {kernel.wide}" if kernel is not None and kernel.wide else ""
        here = " [runs here]" if p.runs_here else ""
        print(f"{p.name:<15} {int8:<36} {p.description}{here}")
    return 0

