"""Bundle: the last stage, writing a compiled model into a deployable folder.

ONNX -> frontend -> calibrate -> plan -> passes -> pipeline (lowering, build) -> **bundle**.

A bundle holds the library (``model.so``), ``manifest.json`` (target, inputs, outputs, every
layer's precision and scales, the integer kernels, file hashes), ``report.md``, the plan and the
runners (``run.py``, ``tvmq_run.cc``). It is written into a temporary folder beside the output and
renamed into place at the end (:func:`staged_output`), so a failed or interrupted build leaves
nothing behind. :class:`tvmq.runtime.Bundle` is the reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from tvmq.errors import TvmqError
from tvmq.interrupt import interrupt_requested

__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "LIBRARY", "manifest", "prepare_output_dir", "sha256_file", "staged_output",
           "weight_bytes", "write_bundle"]

BUNDLE_FORMAT = "tvmq-bundle"

BUNDLE_VERSION = 1

LIBRARY = "model.so"



def prepare_output_dir(output_dir: Path, force: bool = False) -> None:
    """Refuse a non-empty or unwritable output folder before any work is done."""
    output_dir = Path(output_dir)
    if output_dir.exists():
        if not output_dir.is_dir():
            raise TvmqError(f"output path {output_dir} is a file; choose a folder name for -o")
        if any(output_dir.iterdir()) and not force:
            raise TvmqError(f"output folder {output_dir} is not empty; choose a new folder or remove it first")
    parent = output_dir.resolve().parent
    if not parent.is_dir():
        raise TvmqError(f"cannot create {output_dir}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise TvmqError(f"cannot write to {parent}; choose an output folder you can write to")


@contextlib.contextmanager
def staged_output(output_dir: Path, force: bool = False):
    """Yield a temporary folder beside ``output_dir``; on success it replaces ``output_dir``
    (empty, or any folder with ``force``), on any failure or interrupt it is removed. mkdtemp
    makes it private (0700); the finished folder gets the permissions ``mkdir`` would give it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.resolve().parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        yield tmp
        if interrupt_requested():  # one Python swallowed: still never rename a half-made folder into place
            raise KeyboardInterrupt
        if output_dir.exists():
            if force:
                shutil.rmtree(output_dir)
            else:
                output_dir.rmdir()  # empty, checked by prepare_output_dir
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_bytes(mod) -> dict[str, int]:
    """Bytes of constant tensors in ``mod``'s Relax functions, by dtype."""
    from tvm import relax

    from tvmq._compat import constant_array, is_constant

    sizes: Counter = Counter()
    seen = set()
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue

        def visit(node):
            if is_constant(node) and node.id_ not in seen:
                seen.add(node.id_)
                arr = constant_array(node)
                sizes[str(arr.dtype)] += arr.nbytes

        relax.analysis.post_order_visit(func, visit)
    return dict(sizes)


def versions() -> dict:
    from importlib import metadata

    import tvmq

    out = {"tvmq": tvmq.__version__}
    for dist in ("apache-tvm", "apache-tvm-ffi", "onnx", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def manifest(model, info, preset, plan, float_mod, qmod, kernels, warnings) -> dict:
    """``manifest.json``: what the bundle holds, for its runners, ``tvmq run`` and people."""
    from tvmq.execute import shape_arguments

    model_entry = {"opset": info.opset, "producer": info.producer}
    if isinstance(model, (str, Path)):
        model_entry.update(file=Path(model).name, sha256=sha256_file(model))
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "library": LIBRARY,
        "runner": {"python": "run.py", "cpp": "tvmq_run.cc",
                   "needs": ["libtvm_runtime.so", "libtvm_ffi.so", "numpy + tvm_ffi (run.py only)"]},
        "versions": versions(),
        "model": model_entry,
        "target": _target_entry(preset),
        # a str in a shape is a dynamic dimension: its name (inputs, ranges in "dims") or its expression (outputs)
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in info.inputs],
        "outputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in info.outputs],
        "dims": {name: [lo, hi] + ([step] if step > 1 else []) for name, lo, hi, step in info.dims},
        # sizes compiled as static copies, dispatched inside main (every other size: the dynamic program)
        **({"variants": [dict(v) for v in info.variants]} if info.variants else {}),
        # a stepped dimension's size / step, passed to main after the inputs as one shape argument
        "shape_args": [{"input": info.inputs[i].name, "axis": axis, "step": step}
                       for i, axis, step in shape_arguments(qmod["main"])[1]],
        "quantization": None if plan is None else {
            "method": plan.method,
            "activation_dtype": plan.activation_dtype,
            "requantize": plan.requantize,
            "int8_layers": plan.count("int8"),
            "int16_activation_layers": len(plan.wide_layers()),  # of the int8 layers: 16-bit activations
            "float_layers": plan.count("fp32") + plan.count("fp16"),
            "fp16_layers": plan.count("fp16"),
            # float because the ISA's int8 kernel is no faster there (QuantConfig.int8_everywhere)
            "kept_float_for_speed": [n for n in plan.kept_float if plan.get(n) and not plan.get(n).is_int8],
        },
        "layers": _layer_entries(float_mod, plan),
        "kernels": [
            {"func": k.func, "block": k.block, "operands": list(k.operand_dtypes), "accumulator": k.accum_dtype,
             "intrinsic": k.intrinsic}
            for k in sorted(kernels, key=lambda k: (k.func, k.block))
        ],
        "weight_bytes": {"float_model": weight_bytes(float_mod), "compiled": weight_bytes(qmod)},
        "float_ops": list(info.float_ops),
        "warnings": warnings,
    }


def _target_entry(preset) -> dict:
    target = dict(preset.target)
    host = target.get("host", {}) or {}
    return {
        "preset": preset.name,
        "tvm": target,
        "triple": target.get("mtriple") or host.get("mtriple") or "x86_64-linux-gnu",
        "cpu": target.get("mcpu") or host.get("mcpu"),
        "features": list(target.get("mattr", [])),
        "device": "cuda" if preset.kind == "cuda" else "cpu",
        "activation_dtype": preset.activation_dtype,
        "int8_kernel": preset.int8_kernel,
        "int8_instructions": list(preset.micro_kernel.mnemonics) if preset.micro_kernel else [],
    }


def _layer_entries(float_mod, plan) -> dict:
    """Per layer: kind, precision, the plan's scales and the int8 weights' scale range."""
    from tvmq.passes import find_layers
    from tvmq.passes.insert_qdq import weight_qparams

    layers = {}
    for layer in find_layers(float_mod["main"]):
        entry = {"kind": layer.kind, "precision": "fp32"}
        if plan is not None and layer.name in plan.layers:
            lp = plan.layers[layer.name]
            entry.update(lp.to_json())
            if lp.is_int8 and layer.weight is not None:
                wqp = weight_qparams(layer.weight, layer.weight_axis)
                entry["weight"] = {
                    "dtype": "int8",
                    "per_channel_axis": int(wqp.axis),
                    "scale_min": float(wqp.scale.min()),
                    "scale_max": float(wqp.scale.max()),
                }
        layers[layer.name] = entry
    return layers


def write_bundle(out: Path, model, qm, preset, executable, kernels, tuning=None) -> dict:
    """Write everything but nothing else into ``out`` (a staged folder); return the manifest.

    ``qm`` is the :class:`~tvmq.compile.QuantizedModel` that ``executable`` was built from.
    """
    from tvmq.report import bundle_markdown, precision_markdown, write_html

    lib_path = out / LIBRARY
    if preset.cross_compiler:
        from tvmq._compat import cross_compiler

        executable.export_library(str(lib_path), fcompile=cross_compiler(preset.cross_compiler))
    else:
        executable.export_library(str(lib_path))
    here = Path(__file__).parent
    shutil.copyfile(here / "runtime.py", out / "run.py")
    shutil.copyfile(here / "runner" / "tvmq_run.cc", out / "tvmq_run.cc")
    if qm.plan is not None:
        (out / "plan.json").write_text(qm.plan.dumps() + "\n")

    m = manifest(model, qm.info, preset, qm.plan, qm.float_module, qm.module, kernels, qm.warnings)
    m["tuning"] = tuning
    m["precision"] = qm.precision
    report_md = bundle_markdown(m)
    if qm.precision is not None:
        report_md += precision_markdown(qm.precision)
        write_html(out, m)
    (out / "report.md").write_text(report_md)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    m["files"] = {name: sha256_file(out / name) for name in files}
    (out / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    return m
