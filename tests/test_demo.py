"""The embedded digits demo: real data, every calibration method within 0.5 pt of FP32."""

import re
import subprocess
import sys

import numpy as np
import pytest

from tvmq.calibrate import load_samples_dir
from tvmq.config import QuantConfig
from tvmq.execute import HostModule
from tvmq.frontend import load_onnx
from tvmq.quantize import calibrate, prepare, quantize_pipeline


@pytest.fixture(scope="module")
def digits(demo_dir):
    mod, info = load_onnx(demo_dir / "digits.onnx", shapes={"input": [1, 1, 8, 8]})
    mod = prepare(mod)
    samples = load_samples_dir(demo_dir / "digits_calib", list(info.inputs))
    test = np.load(demo_dir / "digits_test.npz")
    return mod, samples, test["x"], test["y"]


def accuracy(module, xs, ys):
    return float(np.mean([module(x[None])[0].argmax() == y for x, y in zip(xs, ys)]))


@pytest.fixture(scope="module")
def fp32_accuracy(digits):
    mod, _, xs, ys = digits
    return accuracy(HostModule(mod), xs, ys)


def test_demo_data_is_a_real_held_out_split(digits, fp32_accuracy):
    _, samples, xs, ys = digits
    assert len(xs) == 450 and len(samples) == 128 and set(ys.tolist()) == set(range(10))
    calib = np.stack([s["input"][0] for s in samples])
    assert not any((calib == x).all(axis=(1, 2, 3)).any() for x in xs[:50])  # disjoint splits
    assert fp32_accuracy > 0.95


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_int8_accuracy_within_half_a_point(digits, fp32_accuracy, method):
    mod, samples, xs, ys = digits
    plan = calibrate(mod, samples, QuantConfig(method=method, int8_everywhere=True), input_names=["input"])
    assert plan.count("int8") == 5
    acc = accuracy(HostModule(quantize_pipeline(plan)(mod)), xs, ys)
    assert acc >= fp32_accuracy - 0.005, (method, acc, fp32_accuracy)


def test_readme_demo_command_prints_accuracy_and_latency():
    out = subprocess.run([sys.executable, "-m", "tvmq", "compile"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    fp32 = re.search(r"FP32 \(TVM\)\s+accuracy\s+([\d.]+)%\s+latency ([\d.]+) ms", out.stdout)
    int8 = re.search(r"INT8 \(tvmq\)\s+accuracy\s+([\d.]+)%\s+latency ([\d.]+) ms", out.stdout)
    assert fp32 and int8, out.stdout
    assert abs(float(fp32.group(1)) - float(int8.group(1))) <= 0.5
