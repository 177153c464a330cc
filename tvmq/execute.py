"""Compile a Relax module for this machine and run it on numpy arrays (calibration, evaluation)."""

from __future__ import annotations


import numpy as np
import tvm
from tvm import relax

__all__ = ["HostModule", "to_numpy_list"]




def dim_variable(dim):
    """``(variable, step)`` of an input dimension made by :func:`tvmq.frontend.load_onnx`: a
    dynamic one is a variable (step 1), a stepped one ``step * variable``; None for the others."""
    from tvmq._compat import IntImm, tir

    if isinstance(dim, tir.Var):
        return dim, 1
    if isinstance(dim, tir.Mul):
        for var, step in ((dim.a, dim.b), (dim.b, dim.a)):
            if isinstance(var, tir.Var) and isinstance(step, IntImm):
                return var, int(step.value)
    return None


def shape_arguments(func) -> tuple[int, list[tuple[int, int, int]]]:
    """Where ``main`` takes its shape argument (``R.Shape([H_32, ...])``, made for stepped dynamic
    dimensions by :func:`tvmq.frontend.load_onnx`) and what it holds: ``(position, [(array, axis,
    step), ...])``, each value the size / step of ``array``'s (the call's other arguments, in
    order) ``axis``. ``(-1, [])`` when ``main`` takes none."""
    from tvmq._compat import expr_type

    types = [expr_type(p) for p in func.params]
    position = next((i for i, t in enumerate(types) if not hasattr(t, "dtype") and getattr(t, "values", None)), -1)
    if position < 0:
        return -1, []
    stepped = []  # (variable, (array, axis, step)) for each stepped input dimension, in order
    for i, t in enumerate(t for i, t in enumerate(types) if i != position):
        shape = getattr(t, "shape", None)
        for axis, d in enumerate(shape.values if shape is not None else []):
            var, step = dim_variable(d) or (None, 1)
            if step > 1:
                stepped.append((var, (i, axis, step)))
    entries = []
    for var in types[position].values:
        entry = next((e for v, e in stepped if v.same_as(var)), None)
        if entry is None:
            raise ValueError(f"main's shape argument {var} is no input's size / step")
        entries.append(entry)
    return position, entries


def shape_argument(shape_args, shapes):
    """The ``ShapeTuple`` for main's shape argument, from the input arrays' shapes."""
    import tvm_ffi

    return tvm_ffi.Shape([int(shapes[i][axis]) // step for i, axis, step in shape_args])


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
        self.shape_args = shape_arguments(mod["main"])

    def _args(self, arrays) -> list:
        args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
        position, entries = self.shape_args
        if entries:
            args.insert(position, shape_argument(entries, [np.shape(a) for a in arrays]))
        return args

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        return to_numpy_list(self.vm["main"](*self._args(arrays)))

    def prepared(self, *arrays: np.ndarray):
        """A zero-argument callable running the model on ``arrays`` (copied to the device once)."""
        args = self._args(arrays)
        fn = self.vm["main"]
        return lambda: fn(*args)

    def latency_ms(self, *arrays: np.ndarray, repeat: int = 20, warmup: int = 3) -> float:
        """Median wall time of one call, inputs already on the device."""
        from tvmq.runtime import median_ms

        return median_ms(self.prepared(*arrays), repeat, warmup)
