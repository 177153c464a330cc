"""Quantization arithmetic and calibration statistics."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvmq.calibrate import InputSpec, TensorStats, load_samples_dir, select_range, validate_samples
from tvmq.config import CalibrationMethod, LayerRule, QuantConfig
from tvmq.errors import TvmqError
from tvmq.qparams import QParams, activation_qparams, fixed_point_multiplier, quantize_weight, requantize_reference


@given(st.floats(-50, 0), st.floats(0.01, 50), st.sampled_from(["uint8", "int8"]))
def test_activation_qparams_cover_range_and_represent_zero(lo, hi, dtype):
    qp = activation_qparams(lo, hi, dtype)
    assert qp.dequantize(qp.quantize(np.float32([0.0])))[0] == 0.0
    xs = np.linspace(lo, hi, 101, dtype=np.float32)
    tol = float(qp.scale) / 2 * (1 + 1e-4) + 1e-6 * max(-lo, hi)  # float32 rounding of x / scale
    assert np.abs(qp.dequantize(qp.quantize(xs)) - xs).max() <= tol


def test_quantize_weight_is_symmetric_per_channel():
    w = np.array([[1.0, -0.5], [0.25, 2.0]], np.float32)
    q, qp = quantize_weight(w, axis=0)
    assert q.dtype == np.int8 and np.all(np.abs(q) <= 127)
    np.testing.assert_allclose(qp.scale, [1 / 127, 2 / 127], rtol=1e-6)
    assert np.all(qp.zero_point == 0)
    assert np.abs(qp.dequantize(q) - w).max() <= qp.scale.max() / 2


@settings(max_examples=300)
@given(st.floats(1e-6, 100.0), st.integers(-(2**30), 2**30))
def test_fixed_point_requantize_matches_real_multiply(m, acc):
    m0, shift = fixed_point_multiplier(np.array([m]))
    got = int(requantize_reference(np.array([acc]), m0, shift)[0])
    exact = acc * m
    # 31-bit multiplier: relative error 2**-31 plus the final rounding.
    assert abs(got - exact) <= 0.5 + abs(exact) * 2.0**-30 + 1e-9


def test_tiny_multipliers_keep_precision_within_int64():
    m0, shift = fixed_point_multiplier(np.array([1e-12, 3e-3, 0.9]))
    assert np.all(shift <= 62) and np.all(m0 < 2**31)
    assert requantize_reference(np.array([2**30]), m0[:1], shift[:1])[0] == 0


def test_histogram_doubles_range_without_losing_counts():
    st_ = TensorStats(num_bins=128)
    st_.update(np.linspace(-1, 1, 1000))
    st_.update(np.array([7.5, -3.0]))
    assert st_.hist.sum() == 1002 and st_.bound >= 7.5
    assert st_.min == -3.0 and st_.max == 7.5


def _stats(values, bins=2048):
    s = TensorStats(num_bins=bins)
    for chunk in np.array_split(values, 8):
        s.update(chunk)
    return s


def test_range_methods_on_a_distribution_with_outliers():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 100_000), [40.0, -35.0]]).astype(np.float32)
    s = _stats(values)
    mm = select_range(s, CalibrationMethod.MINMAX)
    assert mm == (pytest.approx(-35.0), pytest.approx(40.0))
    for method in (CalibrationMethod.PERCENTILE, CalibrationMethod.ENTROPY):
        lo, hi = select_range(s, method, percentile=99.99, dtype="int8")
        assert -35 <= lo < -2.5 and 2.5 < hi < 20, (method, lo, hi)


def test_mse_range_lowers_the_squared_error():
    rng = np.random.default_rng(3)
    values = rng.laplace(0, 1, 200_000).astype(np.float32)  # long tails, no single outlier
    lo, hi = select_range(_stats(values), CalibrationMethod.MSE, dtype="int8")
    assert hi < values.max() and lo > values.min()

    def mse(lo_, hi_):
        qp = activation_qparams(lo_, hi_, "int8")
        return float(np.mean((qp.dequantize(qp.quantize(values)) - values) ** 2))

    assert mse(lo, hi) < mse(values.min(), values.max())


def test_entropy_keeps_the_range_of_a_uniform_relu_output():
    rng = np.random.default_rng(1)
    values = np.maximum(rng.uniform(-1, 1, 50_000), 0).astype(np.float32)  # half exact zeros
    lo, hi = select_range(_stats(values), CalibrationMethod.ENTROPY, dtype="uint8")
    assert lo == 0 and hi > 0.9


def test_minmax_is_independent_of_sample_order():
    rng = np.random.default_rng(2)
    chunks = [rng.normal(0, s, 1000).astype(np.float32) for s in (0.5, 3.0, 1.0)]
    a, b = TensorStats(), TensorStats()
    for c in chunks:
        a.update(c)
    for c in reversed(chunks):
        b.update(c)
    assert select_range(a, "minmax") == select_range(b, "minmax")


SPEC = [InputSpec("x", (1, 4), "float32")]


def test_validate_samples_reports_each_problem():
    good = {"x": np.zeros((1, 4), np.float32)}
    assert len(validate_samples([good], SPEC)) == 1
    cases = [
        ([{"y": good["x"]}], "missing"),
        ([{"x": np.zeros((2, 4), np.float32)}], "shape"),
        ([{"x": np.zeros((1, 4), np.int32)}], "float32"),
        ([{"x": np.full((1, 4), np.nan, np.float32)}], "NaN"),
        ([], "no calibration samples"),
    ]
    for samples, needle in cases:
        with pytest.raises(TvmqError, match=needle):
            validate_samples(samples, SPEC)


def test_load_samples_dir_reads_npy_and_npz(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((1, 4), np.float32))
    np.savez(tmp_path / "b.npz", x=np.zeros((1, 4), np.float32))
    (tmp_path / "notes.txt").write_text("ignored")
    samples = load_samples_dir(tmp_path, SPEC)
    assert [s["x"].sum() for s in samples] == [4.0, 0.0]
    (tmp_path / "c.npy").write_bytes(b"not numpy")
    with pytest.raises(TvmqError, match="cannot read calibration sample"):
        load_samples_dir(tmp_path, SPEC)


def test_config_validates_and_rules_match_first():
    with pytest.raises(ValueError):
        QuantConfig(percentile=20)
    with pytest.raises(ValueError):
        LayerRule(precision="int4", name="*")
    cfg = QuantConfig(rules=(LayerRule(name="fc*", precision="fp32"), LayerRule(op="matmul", precision="int8")))
    assert cfg.precision_for("fc1", "matmul") == "fp32"
    assert cfg.precision_for("proj", "matmul") == "int8"
    assert cfg.precision_for("conv0", "conv2d") == "int8"


def test_qparams_json_round_trip():
    for qp in (QParams(np.float32(0.1), np.int32(3), "uint8"), QParams(np.array([0.1, 0.2]), np.array([0, 0]), "int8", 0)):
        assert QParams.from_json(qp.to_json()) == qp
