"""Compile a Relax module for this machine and run it on numpy arrays (calibration, evaluation)."""

from __future__ import annotations

import time

import numpy as np
import tvm
from tvm import relax

__all__ = ["HostModule", "build", "to_numpy_list"]


def build(mod: tvm.IRModule, target):
    """``tvm.compile`` through the target's fusing pipeline (see :func:`tvmq.kernels.lower`)."""
    from tvmq.kernels import lower

    return tvm.compile(lower(mod, target), target, relax_pipeline=None)


def to_numpy_list(result) -> list[np.ndarray]:
    if isinstance(result, (list, tuple)) or type(result).__name__ in ("Array", "List"):
        out = []
        for item in result:
            out.extend(to_numpy_list(item))
        return out
    return [result.numpy() if hasattr(result, "numpy") else np.from_dlpack(result)]


class HostModule:
    """``mod`` compiled for the host CPU; call it with numpy arrays, get a list of arrays.

    Parameters
    ----------
    mod : IRModule
        Relax module with a ``main`` function.
    target : tvm.target.Target, optional
        Defaults to the ``x86`` preset (this machine's CPU).
    """

    def __init__(self, mod: tvm.IRModule, target=None, executable=None):
        if target is None:
            from tvmq.targets import get_preset

            target = get_preset("x86").tvm_target()
        self.target = target
        self.executable = executable if executable is not None else build(mod, target)
        self.vm = relax.VirtualMachine(self.executable, tvm.cpu())

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
        return to_numpy_list(self.vm["main"](*args))

    def latency_ms(self, *arrays: np.ndarray, repeat: int = 20, warmup: int = 3) -> float:
        """Median wall time of one call, inputs already on the device."""
        args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
        fn = self.vm["main"]
        for _ in range(warmup):
            fn(*args)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(times))
