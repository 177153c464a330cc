"""Pre-quantized models in, QDQ out: tvmq vs ONNX Runtime on the same files.

1. PP-OCR's classifier quantized by ONNX Runtime (QDQ, per-channel, MinMax) is compiled by tvmq
   with the file's own scales (no calibration): agreement with ONNX Runtime running the same
   file (logits in units of their quantization step, top-1, probabilities), accuracy, and
   latency of both, each timed alone (bench.isolated_medians).
2. Round trip: tvmq calibrates the demo and the classifier, exports them as ONNX QDQ
   (``export-qdq``), and ONNX Runtime runs the export; its accuracy is compared with tvmq's own
   compiled artifact.

Usage::

    pip install -e ".[bench]"
    python scripts/qdq_bench.py [--n-eval 300] [--runs 60] [--threads 2] [--json out.json]
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


def logits_model(path, out_path):
    """``path`` cut before its Softmax (outputs: the Softmax input) and that tensor's quantization step."""
    import onnx

    from tvmq.export import onnx_constants

    model = onnx.load(str(path))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    producer = {o: n for n in model.graph.node for o in n.output}
    dq = producer[softmax.input[0]]
    if dq.op_type != "DequantizeLinear":
        raise SystemExit(f"the Softmax input comes from {dq.op_type}, not a DequantizeLinear")
    consts = onnx_constants(model)
    dead = {softmax.output[0]}
    for node in model.graph.node:  # graph order: everything downstream of the Softmax
        if any(i in dead for i in node.input):
            dead.update(node.output)
    kept = [n for n in model.graph.node if n is not softmax and not any(i in dead for i in n.input)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    del model.graph.output[:]
    model.graph.output.extend([onnx.helper.make_empty_tensor_value_info(softmax.input[0])])
    onnx.save(model, str(out_path))
    return out_path, float(consts[dq.input[1]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from bench import digits_case, input_files, isolated_medians, ort_quantize, ort_session, ppocr_cls_case

    from tvmq.compile import compile_model
    from tvmq.cli import main as cli
    from tvmq.runtime import Bundle

    out = {}
    with tempfile.TemporaryDirectory(prefix="tvmq-qdq-") as tmp:
        tmp = Path(tmp)
        cls = ppocr_cls_case(args.n_eval, args.n_calib)
        xs, ys, inp = cls["x"], cls["y"], cls["input"]

        # 1. ONNX Runtime's QDQ file, compiled by tvmq with its own scales
        qdq = ort_quantize(cls["path"], inp, cls["calib"], tmp)
        res = compile_model(qdq, tmp / "cls-from-ort", shapes={inp: list(xs[0].shape)})
        bundle, sess = Bundle(tmp / "cls-from-ort"), ort_session(qdq, args.threads)
        name = bundle.outputs[0]["name"]
        ours = np.stack([bundle.run({inp: x})[name] for x in xs])
        theirs = np.stack([sess.run(None, {inp: x})[0] for x in xs])
        diff = np.abs(ours - theirs)
        feed = input_files(tmp / "x", {inp: xs[0]})
        medians = isolated_medians({"tvmq": {"tvm": str(bundle.library), "inputs": feed},
                                    "ort": {"ort": str(qdq), "inputs": feed}}, args.runs, args.threads)
        # Element-wise, in output quantization steps: the same file cut before its Softmax, whose
        # input is a DequantizeLinear (the logits' step), run by both.
        cut, step = logits_model(qdq, tmp / "cls-logits.onnx")
        compile_model(cut, tmp / "cls-logits", shapes={inp: list(xs[0].shape)})
        lb, ls = Bundle(tmp / "cls-logits"), ort_session(cut, args.threads)
        lname = lb.outputs[0]["name"]
        steps = np.abs(np.stack([lb.run({inp: x})[lname] for x in xs]) - np.stack([ls.run(None, {inp: x})[0] for x in xs]))
        steps = steps / step
        out["ort_qdq_cls"] = {
            "logits_within_1_step": float(np.mean(steps <= 1 + 1e-5)), "logits_within_half_step": float(np.mean(steps <= 0.5 + 1e-5)),
            "logits_max_steps": float(steps.max()), "logits_step": step,
            "integer_kernels": sum(1 for k in res.manifest["kernels"] if k["accumulator"] == "int32"),
            "kernels": len(res.manifest["kernels"]),
            "top1_agreement": float(np.mean(ours.reshape(len(xs), -1).argmax(1) == theirs.reshape(len(xs), -1).argmax(1))),
            "prob_abs_diff_mean": float(diff.mean()), "prob_abs_diff_max": float(diff.max()),
            "accuracy_tvmq": float(np.mean(ours.reshape(len(xs), -1).argmax(1) == ys)),
            "accuracy_ort": float(np.mean(theirs.reshape(len(xs), -1).argmax(1) == ys)),
            "median_ms_tvmq": medians["tvmq"], "median_ms_ort": medians["ort"],
        }

        # 2. tvmq -> ONNX QDQ -> ONNX Runtime, vs tvmq's own artifact
        for label, case in (("digits", digits_case(args.n_eval, args.n_calib)), ("ppocr_cls", cls)):
            inp, xs, ys = case["input"], case["x"], case["y"]
            calib_dir = tmp / f"{label}-calib"
            calib_dir.mkdir()
            for i, c in enumerate(case["calib"]):
                np.save(calib_dir / f"{i:04d}.npy", c)
            exported = tmp / f"{label}.qdq.onnx"
            shape = f"{inp}:{','.join(map(str, xs[0].shape))}"
            # The user's route: export-qdq writes the model and its plan; compile --plan builds the same plan.
            assert cli(["export-qdq", str(case["path"]), "--calib", str(calib_dir), "--shape", shape,
                        "-o", str(exported)]) == 0
            assert cli(["compile", str(case["path"]), "--plan", str(exported.with_suffix(".plan.json")),
                        "--shape", shape, "-o", str(tmp / f"{label}-int8")]) == 0
            b, s = Bundle(tmp / f"{label}-int8"), ort_session(exported, args.threads)
            name = b.outputs[0]["name"]
            acc_tvmq = float(np.mean([np.argmax(b.run({inp: x})[name]) == y for x, y in zip(xs, ys)]))
            acc_ort = float(np.mean([np.argmax(s.run(None, {inp: x})[0]) == y for x, y in zip(xs, ys)]))
            out[f"round_trip_{label}"] = {"accuracy_tvmq": acc_tvmq, "accuracy_ort_on_export": acc_ort,
                                          "difference_pt": 100 * (acc_ort - acc_tvmq), "samples": len(ys)}

    r = out["ort_qdq_cls"]
    print(f"ONNX Runtime's QDQ classifier compiled by tvmq: {r['integer_kernels']}/{r['kernels']} integer kernels; "
          f"logits within 1 step of ORT's {100 * r['logits_within_1_step']:.1f}% (within half a step "
          f"{100 * r['logits_within_half_step']:.1f}%, at most {r['logits_max_steps']:.1f} steps of {r['logits_step']:.3g}); "
          f"top-1 agreement {100 * r['top1_agreement']:.1f}%, |p_tvmq - p_ort| mean {r['prob_abs_diff_mean']:.2e} "
          f"max {r['prob_abs_diff_max']:.2e}; accuracy tvmq {100 * r['accuracy_tvmq']:.2f}% vs ORT "
          f"{100 * r['accuracy_ort']:.2f}%; latency tvmq {r['median_ms_tvmq']:.3f} ms vs ORT {r['median_ms_ort']:.3f} ms "
          f"({r['median_ms_tvmq'] / r['median_ms_ort']:.2f}x)")
    for label in ("digits", "ppocr_cls"):
        r = out[f"round_trip_{label}"]
        print(f"round trip {label}: tvmq artifact {100 * r['accuracy_tvmq']:.2f}%, ONNX Runtime on the exported QDQ "
              f"{100 * r['accuracy_ort_on_export']:.2f}% ({r['difference_pt']:+.2f} pt, {r['samples']} samples)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
