"""``tvmq eval``: FP32 vs compiled accuracy and latency of a bundle on the user's data.

The FP32 reference is the ONNX model compiled by TVM without quantization (same machine, same
threads); the compiled side is the bundle itself, loaded with the TVM runtime as in deployment.
"""

from __future__ import annotations

import math
from pathlib import Path


from tvmq.errors import TvmqError

__all__ = ["evaluate_bundle"]


def _display(value: float, metric: str) -> str:
    if metric == "top1":
        return f"{100 * value:.2f}%"
    if metric == "sqnr":
        return "inf dB" if math.isinf(value) else f"{value:.2f} dB"
    return f"{value:.5f}"


def evaluate_bundle(bundle_dir, data_dir, model=None, metric: str | None = None, repeat: int = 50) -> dict:
    """Accuracy (``metric``) and median latency of FP32 TVM and of the bundle on ``data_dir``."""
    from tvmq.bundle import sha256_file
    from tvmq.calibrate import InputSpec, load_eval_data
    from tvmq.compile import quantized_module
    from tvmq.execute import HostModule
    from tvmq.metrics import Metric
    from tvmq.targets import get_preset

    threads, bundle = _open_bundle(Path(bundle_dir), model)
    manifest = bundle.manifest
    names = [i["name"] for i in bundle.inputs]
    specs = [InputSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in bundle.inputs]
    samples, labels = load_eval_data(data_dir, specs)
    metric = metric or ("top1" if labels is not None else "sqnr")
    m = Metric(metric)
    if m.needs_labels and labels is None:
        raise TvmqError(f"metric {metric} needs labels: put labels.npy (one label per sample) in {data_dir}")
    for s in samples:
        bundle.check_inputs(s)  # shape/dtype errors name the input before anything is compiled
    shapes = {i["name"]: list(i["shape"]) for i in bundle.inputs}
    fp32 = HostModule(quantized_module(model, get_preset("x86"), precision="fp32", shapes=shapes).module)
    ref = [tuple(fp32(*[s[n] for n in names])) for s in samples]  # every output: sqnr/cosine take the worst
    out = [tuple(bundle.run(s)[o["name"]] for o in bundle.outputs) for s in samples]
    if m.kind in ("sqnr", "cosine"):
        fp32_score, compiled = m(ref, ref), m(out, ref)
    else:
        fp32_score, compiled = m(ref, ref, labels), m(out, ref, labels)
    lat_f = fp32.latency_ms(*[samples[0][n] for n in names], repeat=repeat)
    lat_c = bundle.latency_ms(samples[0], repeat=repeat)
    precision = manifest.get("precision") or {}
    label = "compiled" if not manifest.get("quantization") else ("plan" if precision else "INT8")
    note = ""
    if manifest.get("model", {}).get("sha256") and sha256_file(model) != manifest["model"]["sha256"]:
        note = "the bundle was compiled from another model file"
    return {
        "metric": m.kind,
        "samples": len(samples),
        "threads": threads,
        "rows": {
            "FP32 (TVM)": {"score": fp32_score, "display": _display(fp32_score, m.kind), "latency_ms": lat_f},
            f"{label} (bundle)": {"score": compiled, "display": _display(compiled, m.kind), "latency_ms": lat_c},
        },
        "change": _change(m.kind, fp32_score, compiled) + (f" ({note})" if note else ""),
        "speedup": lat_f / lat_c,
    }


def _open_bundle(bundle_dir: Path, model):
    """``(threads, Bundle)`` once the bundle runs here and ``model`` names an FP32 model file."""
    from tvmq.runtime import Bundle, BundleError, configure_threads
    from tvmq.targets import get_preset

    try:
        threads = configure_threads()  # the same for the FP32 model and the bundle
        bundle = Bundle(bundle_dir)
    except BundleError as err:
        raise TvmqError(str(err)) from None
    manifest = bundle.manifest
    if manifest.get("target", {}).get("device", "cpu") != "cpu" or not get_preset(manifest["target"]["preset"]).runs_here:
        raise TvmqError(f"{bundle_dir} was built for {manifest['target']['preset']}; eval runs bundles for this machine "
                        "(compile with --target x86 to evaluate here, or run the bundle's runner on the device)")
    if model is None:
        raise TvmqError("pass --model MODEL.onnx, the FP32 model to compare the bundle with")
    if not Path(model).is_file():
        raise TvmqError(f"--model {model}: no such file")
    return threads, bundle


def _change(kind: str, fp32_score: float, compiled: float) -> str:
    """The bundle's score against FP32's, as the eval table prints it."""
    if kind == "top1":
        return f"{100 * (compiled - fp32_score):+.2f} pt"
    if kind == "sqnr":
        return f"SQNR {compiled:.2f} dB vs FP32"
    return f"{compiled - fp32_score:+.5f}"
