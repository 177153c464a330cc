"""Calibration: observe activations on sample data and choose their quantization ranges.

Statistics are gathered by compiling the model once with extra outputs (per observed tensor:
its min and max as reductions, or the tensor itself for the histogram methods) and running it
over the samples, not by re-running an interpreter per tensor.

Where it sits: ONNX -> frontend -> **calibrate** (statistics; :func:`tvmq.quantize.calibrate` turns
them into a plan) -> passes -> pipeline -> bundle.

The data-reader protocol is any iterable of ``{input name: array}`` dicts; ``load_samples_dir``
reads a directory of ``.npy`` (single-input models) or ``.npz`` (name -> array) files;
:class:`CalibrationData` is either of them at the API edge (``compile_model(calib=...)``, ``--calib``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Protocol

import numpy as np
from tvm import relax

from tvmq.config import CalibrationMethod
from tvmq.errors import TvmqError

LABELS = "labels.npy"  # in a data folder: one label per sample, not a sample

__all__ = [
    "DataReader",
    "InputSpec",
    "load_samples_dir",
    "CalibrationData",
    "peek_sample",
    "load_eval_data",
    "validate_samples",
    "TensorStats",
    "observe",
    "collect_statistics",
    "channel_statistics",
    "channel_ranges",
    "select_range",
]


class DataReader(Protocol):
    """Calibration data: iterating yields one ``{input name: array}`` dict per sample."""

    def __iter__(self) -> Iterator[Mapping[str, np.ndarray]]: ...


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | str, ...]  # a str names a symbolic dimension
    dtype: str

    def accepts(self, shape, ranges: dict[str, tuple[int, ...]] | None = None) -> bool:
        """Whether an array of ``shape`` fits: same rank, equal static dimensions, and for each
        symbolic name one size, inside its range (and steps) when ``ranges`` gives one: the
        check the bundle's runners make (:func:`tvmq.runtime.shape_problem`)."""
        from tvmq.runtime import shape_problem

        return shape_problem(list(shape), list(self.shape), ranges or {}, {}) is None


def load_samples_dir(path: str | Path, inputs: list[InputSpec],
                     ranges: dict[str, tuple[int, int]] | None = None) -> list[dict[str, np.ndarray]]:
    """Read a calibration directory: one ``.npy`` or ``.npz`` file per sample, sorted by name
    (``labels.npy``, an evaluation folder's labels, is not a sample)."""
    path = Path(path)
    if not path.is_dir():
        raise TvmqError(f"calibration directory {path} does not exist; pass a folder of .npy/.npz samples to --calib")
    files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz") and p.name != LABELS)
    if not files:
        raise TvmqError(f"calibration directory {path} holds no .npy or .npz files; add one file per sample")
    samples = []
    for f in files:
        try:
            if f.suffix == ".npy":
                if len(inputs) != 1:
                    names = ", ".join(i.name for i in inputs)
                    raise TvmqError(
                        f"{f} is a .npy file but the model has {len(inputs)} inputs ({names}); "
                        "use .npz files mapping each input name to its array"
                    )
                samples.append({inputs[0].name: np.load(f, allow_pickle=False)})
            else:
                with np.load(f, allow_pickle=False) as z:
                    samples.append({k: z[k] for k in z.files})
        except TvmqError:
            raise
        except Exception as err:  # numpy raises several types for damaged files
            raise TvmqError(f"cannot read calibration sample {f}: {err}; replace or remove the file") from None
    return validate_samples(samples, inputs, source=str(path), ranges=ranges)


def validate_samples(samples: Iterable[Mapping[str, np.ndarray]], inputs: list[InputSpec], source="calibration data",
                     ranges: dict[str, tuple[int, int]] | None = None):
    """Check names, shapes (dynamic dimensions inside ``ranges``), dtypes and finiteness; return
    the samples as a list of dicts."""
    expected = {i.name: i for i in inputs}
    out = []
    for n, sample in enumerate(samples):
        names = set(sample)
        if names != set(expected):
            missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
            raise TvmqError(
                f"{source}: sample {n} has inputs {sorted(names)} but the model takes {sorted(expected)}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unknown {extra})" if extra else "")
                + "; name each array after a model input"
            )
        fixed = {}
        for name, array in sample.items():
            spec, array = expected[name], np.asarray(array)
            if not spec.accepts(array.shape, ranges):
                span = "".join(f", {d} in {ranges[d][0]}..{ranges[d][1]}"
                               + (f" (multiples of {ranges[d][2]})" if len(ranges[d]) > 2 and ranges[d][2] > 1 else "")
                               for d in spec.shape if d in (ranges or {}))
                raise TvmqError(
                    f"{source}: sample {n} input {name!r} has shape {list(array.shape)}, the model expects "
                    f"{list(spec.shape)}{span}; reshape the data or fix the shape with --shape {name}:"
                    + ",".join(str(d) for d in array.shape)
                )
            if array.dtype.kind != np.dtype(spec.dtype).kind:
                raise TvmqError(
                    f"{source}: sample {n} input {name!r} is {array.dtype}, the model expects {spec.dtype}; "
                    "convert the array before saving it"
                )
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise TvmqError(f"{source}: sample {n} input {name!r} contains NaN or Inf; clean the data")
            fixed[name] = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
        out.append(fixed)
    if not out:
        raise TvmqError(f"{source}: no calibration samples; give at least one (a few hundred is typical)")
    return out


class CalibrationData:
    """Calibration samples as the API and the CLI take them, before the model is read: a folder of
    ``.npy``/``.npz`` files (read once the input names are known) or an iterable of
    ``{input name: array}`` dicts (read once, here). :meth:`first` is what shapes a model with
    dynamic dimensions; :meth:`samples` validates every sample against the model's inputs."""

    def __init__(self, source):
        self.folder = Path(source) if isinstance(source, (str, Path)) else None
        self._samples = None if self.folder is not None else list(source)
        if self.folder is not None and not self.folder.is_dir():
            raise TvmqError(f"calibration directory {self.folder} does not exist; "
                            "pass a folder of .npy/.npz samples to --calib")

    @classmethod
    def of(cls, source) -> CalibrationData | None:
        """``source`` (a folder, samples, calibration data or ``None``) as calibration data;
        ``None`` and calibration data stay as they are."""
        return source if source is None or isinstance(source, CalibrationData) else cls(source)

    def first(self) -> dict | None:
        """The first sample (inputs named ``None`` for a single-input ``.npy``); ``None`` when empty."""
        if self.folder is not None:
            return peek_sample(self.folder)
        return dict(self._samples[0]) if self._samples else None

    def samples(self, inputs: list[InputSpec], ranges: dict[str, tuple[int, int]] | None = None) -> list[dict[str, np.ndarray]]:
        """Every sample, checked against ``inputs`` (names, shapes, dtypes, finite values)."""
        if self.folder is not None:
            return load_samples_dir(self.folder, inputs, ranges)
        return validate_samples(self._samples, inputs, ranges=ranges)


def peek_sample(path: Path) -> dict | None:
    """The first sample of a data folder (inputs named ``None`` for a single-input ``.npy``), read before the model."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz") and p.name != LABELS)
    if not files:
        raise TvmqError(f"calibration directory {path} holds no .npy or .npz files; add one file per sample")
    f = files[0]
    try:
        if f.suffix == ".npz":
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        arr = np.load(f, allow_pickle=False)
    except Exception as err:  # numpy raises several types for damaged files
        raise TvmqError(f"cannot read calibration sample {f}: {err}; replace or remove the file") from None
    return {None: arr}  # the single input, named once the model is read


def load_eval_data(path, inputs) -> tuple[list[dict], np.ndarray | None]:
    """Samples of a data folder (as for calibration) and its ``labels.npy`` if present."""
    path = Path(path)
    samples = load_samples_dir(path, inputs)
    labels = None
    if (path / "labels.npy").exists():
        labels = np.load(path / "labels.npy", allow_pickle=False)
        if len(labels) != len(samples):
            raise TvmqError(f"{path}/labels.npy has {len(labels)} labels for {len(samples)} samples; give one per sample")
    return samples, labels


# ---------------------------------------------------------------------------- statistics
@dataclass(eq=False)
class TensorStats:
    """Running min/max and a histogram over [-bound, bound] that doubles its range as needed."""

    num_bins: int = 2048  # per side of zero
    min: float = math.inf
    max: float = -math.inf
    count: int = 0
    bound: float = 0.0
    hist: np.ndarray | None = field(default=None, repr=False)

    def update_range(self, lo: float, hi: float) -> None:
        self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))
        self.count += 1

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        self.update_range(x.min(), x.max())
        amax = float(max(abs(self.min), abs(self.max)))
        nb = 2 * self.num_bins
        if self.hist is None:
            self.hist = np.zeros(nb, dtype=np.int64)
            self.bound = amax if amax > 0 else 1.0
        while amax > self.bound:
            # Double the range: pairs of bins merge into the middle half.
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.zeros(nb, dtype=np.int64)
            self.hist[nb // 4 : nb // 4 + merged.size] = merged
            self.bound *= 2
        idx = np.floor((x.astype(np.float64) + self.bound) * (nb / (2 * self.bound))).astype(np.int64)
        np.clip(idx, 0, nb - 1, out=idx)
        self.hist += np.bincount(idx, minlength=nb)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.bound, self.bound, 2 * self.num_bins + 1)


def _minmax(bb, t):
    return [bb.emit(relax.op.min(t)), bb.emit(relax.op.max(t))]


def _per_channel(bb, t):
    """abs-max and mean over every axis but the last (channels, in NHWC / [.., K] layouts)."""
    from tvmq.passes.graph import static_shape

    axes = list(range(len(static_shape(t)) - 1))
    return [bb.emit(relax.op.max(relax.op.abs(t), axis=axes)), bb.emit(relax.op.mean(t, axis=axes))]


def _channel_minmax(bb, t):
    """min, max and mean square over every axis but the last (channels)."""
    from tvmq.passes.graph import dims

    axes = list(range(len(dims(t)) - 1))
    return [bb.emit(relax.op.min(t, axis=axes)), bb.emit(relax.op.max(t, axis=axes)),
            bb.emit(relax.op.mean(relax.op.multiply(t, t), axis=axes))]


def observe(mod, tensors: list, histogram: bool, reducer=None):
    """``mod`` with ``main`` returning ``(original output, *observations)``.

    Per tensor: ``min, max`` reductions, or (``histogram=True``) the tensor itself, or whatever
    ``reducer(block_builder, tensor) -> [exprs]`` emits.
    """
    func = mod["main"]
    blocks = list(func.body.blocks)
    bb = relax.BlockBuilder()
    with bb.function("main", list(func.params)):
        with bb.dataflow():
            for block in blocks:
                if not isinstance(block, relax.DataflowBlock):
                    raise TvmqError("calibration needs a model without control flow (If/Loop); export it with static control flow")
                for binding in block.bindings:
                    bb.emit_normalized(binding)
            extra = []
            for t in tensors:
                if reducer is not None:
                    extra.extend(reducer(bb, t))
                elif histogram:
                    extra.append(t)
                else:
                    extra.extend(_minmax(bb, t))
            out = bb.emit_output(relax.Tuple([func.body.body, *extra]))
        bb.emit_func_output(out)
    new_mod = mod.clone()
    new_mod["main"] = bb.get()["main"].with_attrs(func.attrs) if func.attrs else bb.get()["main"]
    return new_mod


def collect_statistics(mod, tensors: list, samples: list[dict], input_names: list[str], *,
                       histogram: bool, num_bins: int = 2048, progress: bool = False) -> list[TensorStats]:
    """Run the instrumented model over ``samples``; one :class:`TensorStats` per tensor."""
    from tvmq.execute import HostModule

    stats = [TensorStats(num_bins=num_bins) for _ in tensors]
    if not tensors:
        return stats
    runner = HostModule(observe(mod, tensors, histogram))
    n_out = _count_outputs(mod["main"].body.body)
    iterator = samples
    if progress:
        from tqdm import tqdm

        iterator = tqdm(samples, desc="calibrating", unit="sample", leave=False)
    for sample in iterator:
        outs = runner(*[sample[name] for name in input_names])[n_out:]
        for i, st in enumerate(stats):
            if histogram:
                st.update(outs[i])
            else:
                st.update_range(outs[2 * i], outs[2 * i + 1])
    return stats


def channel_statistics(mod, tensors: list, samples: list[dict], input_names: list[str]):
    """Per tensor, ``(abs-max, mean)`` over the samples of each channel (last axis)."""
    from tvmq.execute import HostModule

    if not tensors:
        return []
    runner = HostModule(observe(mod, tensors, False, reducer=_per_channel))
    n_out = _count_outputs(mod["main"].body.body)
    absmax = [None] * len(tensors)
    total = [None] * len(tensors)
    for sample in samples:
        outs = runner(*[sample[name] for name in input_names])[n_out:]
        for i in range(len(tensors)):
            a, m = outs[2 * i].astype(np.float64), outs[2 * i + 1].astype(np.float64)
            absmax[i] = a if absmax[i] is None else np.maximum(absmax[i], a)
            total[i] = m if total[i] is None else total[i] + m
    return [(a, t / len(samples)) for a, t in zip(absmax, total)]


def channel_ranges(mod, tensors: list, samples: list[dict], input_names: list[str]):
    """Per tensor, ``(min, max, mean square)`` of each channel (last axis) over the samples."""
    from tvmq.execute import HostModule

    if not tensors:
        return []
    runner = HostModule(observe(mod, tensors, False, reducer=_channel_minmax))
    n_out = _count_outputs(mod["main"].body.body)
    lo, hi, sq = [None] * len(tensors), [None] * len(tensors), [0.0] * len(tensors)
    for sample in samples:
        outs = runner(*[sample[name] for name in input_names])[n_out:]
        for i in range(len(tensors)):
            a, b, m = (outs[3 * i + j].astype(np.float64) for j in range(3))
            lo[i] = a if lo[i] is None else np.minimum(lo[i], a)
            hi[i] = b if hi[i] is None else np.maximum(hi[i], b)
            sq[i] = sq[i] + m / len(samples)
    return list(zip(lo, hi, sq))


def _count_outputs(expr) -> int:
    from tvmq._compat import TupleType, expr_type

    ty = expr_type(expr)
    if isinstance(ty, TupleType):
        return sum(_count_outputs_ty(f) for f in ty.fields)
    return 1


def _count_outputs_ty(ty) -> int:
    from tvmq._compat import TupleType

    return sum(_count_outputs_ty(f) for f in ty.fields) if isinstance(ty, TupleType) else 1


# ---------------------------------------------------------------------------- range selection
def select_range(stats: TensorStats, method: CalibrationMethod, *, percentile: float = 99.999,
                 dtype: str = "uint8", symmetric: bool = False) -> tuple[float, float]:
    """The ``(lo, hi)`` range to quantize a tensor to, by ``method``."""
    lo, hi = min(stats.min, 0.0), max(stats.max, 0.0)
    method = CalibrationMethod(method)
    if method == CalibrationMethod.MINMAX or stats.hist is None or hi - lo == 0:
        return lo, hi
    if method == CalibrationMethod.PERCENTILE:
        return _percentile_range(stats, percentile, lo, hi)
    if method == CalibrationMethod.ENTROPY:
        t = _entropy_threshold(stats, unsigned=stats.min >= 0)
        return max(lo, -t), min(hi, t)
    if method == CalibrationMethod.MSE:
        return _mse_range(stats, lo, hi, dtype, symmetric)
    raise ValueError(method)


def _percentile_range(stats, percentile, lo, hi):
    cdf = np.cumsum(stats.hist)
    total = cdf[-1]
    edges = stats.edges
    tail = (100.0 - percentile) / 100.0 * total
    hi_i = int(np.searchsorted(cdf, total - tail, side="left"))
    p_hi = min(hi, edges[min(hi_i + 1, len(edges) - 1)])
    if stats.min >= 0:
        return lo, max(p_hi, 0.0)
    lo_i = int(np.searchsorted(cdf, tail, side="right"))
    p_lo = max(lo, edges[lo_i])
    return min(p_lo, 0.0), max(p_hi, 0.0)


def _entropy_threshold(stats, unsigned: bool) -> float:
    """TensorRT's calibrator: the |x| threshold whose clipped distribution loses least (KL)."""
    nb = stats.num_bins
    hist = stats.hist
    absolute = hist[nb:].astype(np.float64) + hist[:nb][::-1]
    levels = 256 if unsigned else 128
    width = stats.bound / nb
    if unsigned:
        # The spike of exact zeros after a ReLU is represented exactly (zero point 0) whatever
        # the threshold; left in, it dominates the distribution and KL clips far too hard.
        absolute = absolute.copy()
        absolute[0] = 0
    nonzero = np.nonzero(absolute)[0]
    if nonzero.size == 0:
        return stats.bound
    last = int(nonzero[-1]) + 1
    if last <= levels:
        return last * width
    best_i, best_kl = last, math.inf
    step = max(1, (last - levels) // 512)
    for i in range(levels, last + 1, step):
        p = absolute[:i].copy()
        p[-1] += absolute[i:].sum()
        # Merge the i reference bins into `levels` quantized bins, spread back over non-empty bins.
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        mass = np.bincount(groups, weights=absolute[:i], minlength=levels)
        nonempty = np.bincount(groups, weights=(absolute[:i] > 0).astype(np.float64), minlength=levels)
        q = np.where(absolute[:i] > 0, mass[groups] / np.maximum(nonempty[groups], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i * width


def _kl(p, q) -> float:
    p = p / p.sum()
    qs = q.sum()
    if qs == 0:
        return math.inf
    q = q / qs
    mask = p > 0
    q = np.where(q > 0, q, 1e-12)
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _mse_range(stats, lo, hi, dtype, symmetric):
    """Shrink ``[lo, hi]`` by the factor that minimises the expected squared error."""
    from tvmq.qparams import activation_qparams

    edges = stats.edges
    centers = (edges[:-1] + edges[1:]) / 2
    mask = stats.hist > 0
    centers, weights = centers[mask], stats.hist[mask].astype(np.float64)
    best, best_err = (lo, hi), math.inf
    for f in np.linspace(1.0, 0.3, 71):
        qp = activation_qparams(lo * f, hi * f, dtype, symmetric)
        err = float(np.sum(weights * (qp.dequantize(qp.quantize(centers)) - centers) ** 2))
        if err < best_err * (1 - 1e-9):  # ties keep the wider range
            best_err, best = err, (lo * f, hi * f)
    return best
