"""tvmq: compiler-based INT8 quantization for Apache TVM.

The public API is imported lazily, so ``python -m tvmq run`` (and a deployed bundle's runner)
works with only the TVM runtime installed.

>>> import tvmq
>>> qmod = tvmq.quantize(mod, calib_data=samples, config=tvmq.QuantConfig())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "quantize": "tvmq.quantize",
    "calibrate": "tvmq.quantize",
    "prepare": "tvmq.quantize",
    "quantize_pipeline": "tvmq.quantize",
    "QuantConfig": "tvmq.config",
    "CalibrationMethod": "tvmq.config",
    "ActivationSpec": "tvmq.config",
    "LayerRule": "tvmq.config",
    "Precision": "tvmq.config",
    "RequantizeMode": "tvmq.config",
    "QuantPlan": "tvmq.plan",
    "LayerPlan": "tvmq.plan",
    "QParams": "tvmq.qparams",
    "load_onnx": "tvmq.frontend",
    "compile_model": "tvmq.compile",
    "AutoPrecision": "tvmq.config",
    "TuneOptions": "tvmq.config",
    "TvmqError": "tvmq.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tvmq' has no attribute {name!r}")
