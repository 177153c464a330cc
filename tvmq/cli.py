"""``python -m tvmq``: compile, run and inspect quantized models (the parser and ``main``;
the commands themselves are in :mod:`tvmq.commands`).

Every user-facing failure is one ``error:`` line on stderr and exit code 2 (130 when
interrupted); ``-v`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from tvmq.config import DEFAULT_MIN_SQNR, CalibrationMethod, Precision, RequantizeMode
from tvmq import commands
from tvmq.errors import TvmqError

__all__ = ["main"]

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
                   help="fix an input's dynamic shape (repeatable); a dimension given by name stays dynamic "
                        "over its --dim range, e.g. --shape x:1,3,48,W --dim W=32..1280")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=LO..HI[:STEP][@S1,S2]",
                   help="the sizes a named --shape dimension may take: one bundle runs them all (repeatable); "
                        "STEP: multiples of it only; @S1,S2: also compile static copies for those sizes, "
                        "run when called with them (as fast as a bundle for that size alone)")
    p.add_argument("--method", default="minmax", choices=[m.value for m in CalibrationMethod],
                   help="activation range calibration (default: minmax)")
    p.add_argument("--percentile", type=float, default=99.999, help="kept %% for --method percentile")
    p.add_argument("--precision", default="int8", choices=[p.value for p in Precision],
                   help="int8 (default), fp16, fp32 (no quantization), or auto: per layer, the fastest plan within "
                        "the budget (--max-drop or --min-sqnr; default: every output >= "
                        f"{DEFAULT_MIN_SQNR:g} dB SQNR vs FP32)")
    p.add_argument("--int8-everywhere", action="store_true",
                   help="quantize every layer, also those (depthwise, short reductions) whose int8 kernel is no "
                        "faster than float on the target's ISA, which stay float by default")
    p.add_argument("--keep-float", action="append", default=[], metavar="GLOB",
                   help="leave layers whose name matches in float (repeatable; sugar for a --config rule)")
    p.add_argument("--per-channel-activations", action=argparse.BooleanOptionalAction, default=None,
                   help="one scale per channel for the activations that only int8 convs/matmuls read, where their "
                        "channels' ranges differ enough to halve the rounding noise of the readers' outputs (the "
                        "scales are folded into the readers' int8 weights). Default: where the simulated model "
                        "also does better on the calibration samples; --per-channel-activations: wherever the noise "
                        "halves; --no-per-channel-activations: never")
    p.add_argument("--config", help="JSON/TOML file of layer rules (op type | name glob) -> int8|int16|fp16|fp32|skip, "
                                    "first match wins (int16: int8 weights on 16-bit activations, x86 targets)")
    p.add_argument("--plan", help="reuse a plan.json from an earlier build instead of calibrating")
    _add_budget_flags(p)
    p.add_argument("--requantize", choices=[m.value for m in RequantizeMode],
                   help="integer fixed-point or float scaling of accumulators (default: fixed_point, and for "
                        "pre-quantized models float computed as ONNX Runtime does)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    _add_algorithm_flags(p)
    p.add_argument("--db", help="tuning database folder: use its (verified) kernels")
    p.add_argument("--tune", type=int, default=0, metavar="N", help="tune each kernel with N trials first (needs --db)")
    p.add_argument("--max-tasks", type=int, help="with --tune: tune only the largest kernels")
    p.set_defaults(func=commands.cmd_compile)


def _add_metric_flags(p):
    p.add_argument("--metric", default=None, help="top1 | cosine | sqnr | python:MODULE:FUNCTION (outputs, labels) -> score")
    p.add_argument("--eval-data", help="labelled evaluation folder: samples as for --calib plus labels.npy")


def _add_budget_flags(p):
    _add_metric_flags(p)
    p.add_argument("--max-drop", type=float, help="--precision auto: largest allowed metric drop from FP32 "
                                                  "(top1: percentage points)")
    p.add_argument("--min-sqnr", type=float, help="--precision auto: smallest allowed SQNR vs FP32 (dB) of every "
                                                  "output and output part, worst sample (default with no budget flag: "
                                                  f"{DEFAULT_MIN_SQNR:g} dB, about cosine 0.99)")
    p.add_argument("--output-slice", action="append", default=[], metavar="NAME:[AXIS:]START:STOP",
                   help="--precision auto: judge this part of an output on its own (axis 1 unless given; e.g. "
                        "output0:4: for a YOLO head's class scores); the inputs of an output's final Concat "
                        "are judged apart anyway")
    p.add_argument("--input-noise", type=float, metavar="STEPS",
                   help="--precision auto: a sample whose FP32 output moves beyond the budget when each channel of an "
                        "image input moves within its 8-bit step (uniform noise STEPS steps wide; default 1) is judged "
                        "against twice that noise, not the budget, and listed in the report; 0 holds every sample "
                        "to the budget")
    p.add_argument("--clip-ranges", action="store_true",
                   help="--precision auto: try narrower ranges (0.85-0.4 of the calibrated one) for the activations "
                        "whose int8 readers come within 6 dB of the budget alone, and keep one where the simulated "
                        "all-int8 plan gains and neither half of the samples nor the median one loses; chosen on "
                        "the calibration samples, so check held-out data")
    p.add_argument("--int16-activations", action="store_true",
                   help="--precision auto: also offer each conv/matmul int8 weights on 16-bit activations (x86 "
                        "targets: 256x finer activation steps at about twice an int8 kernel's time), between int8 "
                        "and float")


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
    p.add_argument("--dim", action="append", default=[], metavar="NAME=LO..HI", help="as for compile")
    p.add_argument("--precision", default="int8", choices=[Precision.INT8.value, Precision.FP32.value])
    p.add_argument("--method", default="minmax", choices=[m.value for m in CalibrationMethod])
    p.add_argument("--percentile", type=float, default=99.999)
    p.add_argument("--keep-float", action="append", default=[], metavar="GLOB")
    p.add_argument("--int8-everywhere", action="store_true", help="as for compile")
    p.add_argument("--requantize", choices=[m.value for m in RequantizeMode])
    p.add_argument("--trials", type=int, help="measured candidates per kernel (default 32; with --time, 1000: "
                                               "the time ends the search)")
    p.add_argument("--time", help="search budget, e.g. 10m, 90s, 1h: no new batch of candidates starts after it")
    p.add_argument("--max-tasks", type=int, help="tune only the largest kernels")
    p.add_argument("--cost-model", default="auto", metavar="FILE|none",
                   help="prior of the search's cost model: a file from scripts/cost_model.py train, or none "
                        "(default: the one tvmq ships for the target's ISA, if any)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on boards registered with this TVM RPC tracker")
    p.add_argument("--rpc-key", default="", help="with --rpc-tracker: the kind of board (the servers' --key)")
    p.set_defaults(func=commands.cmd_tune)


def _add_export(sub):
    p = sub.add_parser("export-qdq", help="calibrate and write the model as a standard ONNX QDQ file")
    p.add_argument("model", help="FP32 ONNX model")
    p.add_argument("-o", "--output", required=True, help="QDQ .onnx file to write (its plan goes beside it)")
    p.add_argument("--calib", help="calibration folder (as for compile)")
    p.add_argument("--plan", help="export this plan.json instead of calibrating")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D0,D1,..")
    p.add_argument("--method", default="minmax", choices=[m.value for m in CalibrationMethod])
    p.add_argument("--percentile", type=float, default=99.999)
    p.add_argument("--keep-float", action="append", default=[], metavar="GLOB")
    p.add_argument("--requantize", choices=[m.value for m in RequantizeMode])
    p.add_argument("--target", default="x86", help="preset whose activation dtype to use (default: x86, uint8)")
    p.set_defaults(func=commands.cmd_export)


def _add_eval(sub):
    p = sub.add_parser("eval", help="FP32 vs compiled accuracy and latency of a bundle on your data")
    p.add_argument("bundle", help="folder written by `tvmq compile`")
    p.add_argument("--model", help="the FP32 ONNX model to compare with (default: the one named in the manifest)")
    p.add_argument("--data", required=True, help="folder of samples (.npy/.npz, as for --calib), with labels.npy for top1")
    p.add_argument("--metric", default=None, help="top1 | cosine | sqnr | python:MODULE:FUNCTION "
                                                  "(default: top1 with labels, else sqnr)")
    p.add_argument("--repeat", type=int, default=50, help="latency runs (median reported; default 50)")
    p.set_defaults(func=commands.cmd_eval)


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
    p.set_defaults(func=commands.cmd_run)


def _add_runtime(sub):
    p = sub.add_parser("runtime", help="write what a board needs to run bundles: TVM runtime + C++ runner/RPC server",
                       description="Write the TVM runtime libraries for a target's ISA (armv7: built from source, "
                       "a few minutes once), tvmq_run and tvmq_rpc_server into a folder to copy onto the board.")
    p.add_argument("-o", "--output", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--target", default="x86", help="target preset (default: x86)")
    p.set_defaults(func=commands.cmd_runtime)


def _add_targets(sub):
    p = sub.add_parser("targets", help="list target presets")
    p.set_defaults(func=commands.cmd_targets)


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
    from tvmq import interrupt
    from tvmq.runtime import BundleError, configure_threads

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT)
    try:
        # From here on SIGINT raises KeyboardInterrupt and is also remembered: TVM turns an interrupt
        # inside a Python callback into a RuntimeError, which must still read as an interruption.
        configure_threads()  # before TVM runs a kernel: calibration and latency measurement use them too
        interrupt.import_compiler()
        return args.func(args)
    except (TvmqError, BundleError) as err:
        if interrupt.interrupt_requested():
            return _interrupted()
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as err:  # pylint: disable=broad-except
        if interrupt.interrupt_requested():
            return _interrupted()
        if args.verbose:
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"error: internal error ({type(err).__name__}: {first}); rerun with -v and report it", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)

