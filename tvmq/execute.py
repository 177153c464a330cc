"""Compile a Relax module for this machine and run it on numpy arrays (calibration, evaluation)."""

from __future__ import annotations


import numpy as np
import tvm
from tvm import relax

__all__ = ["HostModule", "to_numpy_list"]




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
    preset : str or TargetPreset
        A preset that runs here; defaults to ``x86`` (this machine's CPU).
    database : MetaSchedule database, optional
        Tuned kernels to use.
    """

    def __init__(self, mod: tvm.IRModule, preset="x86", executable=None, database=None):
        from tvmq.pipeline import build

        self.executable = executable if executable is not None else build(mod, preset, database)
        self.vm = relax.VirtualMachine(self.executable, tvm.cpu())

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
        return to_numpy_list(self.vm["main"](*args))

    def prepared(self, *arrays: np.ndarray):
        """A zero-argument callable running the model on ``arrays`` (copied to the device once)."""
        args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
        fn = self.vm["main"]
        return lambda: fn(*args)

    def latency_ms(self, *arrays: np.ndarray, repeat: int = 20, warmup: int = 3) -> float:
        """Median wall time of one call, inputs already on the device."""
        from tvmq.runtime import median_ms

        return median_ms(self.prepared(*arrays), repeat, warmup)
