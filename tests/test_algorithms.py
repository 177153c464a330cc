"""SmoothQuant, bias correction and weight-only quantization, each on a model where it matters."""

import numpy as np
import onnx

from conftest import sqnr_db
from tvmq.config import QuantConfig
from tvmq.testing import coarse_conv, fp32_and_int8_outputs, mlp, outlier_inputs, outlier_mlp


def test_smoothquant_rescues_a_matmul_with_outlier_channels():
    model = outlier_mlp()
    calib = [{"x": x} for x in outlier_inputs(16, 1)]
    test = outlier_inputs(8, 2)
    plain = np.mean([sqnr_db(r, q) for r, q in fp32_and_int8_outputs(model, calib, QuantConfig(), test)])
    smoothed = np.mean([sqnr_db(r, q) for r, q in fp32_and_int8_outputs(model, calib, QuantConfig(smoothquant=0.5), test)])
    assert smoothed >= plain + 6, (plain, smoothed)


def test_bias_correction_removes_the_mean_shift_of_coarse_weights():
    rng = np.random.default_rng(3)
    make = lambda: rng.uniform(0.5, 1.5, (1, 32, 8, 8)).astype(np.float32)  # noqa: E731 - post-ReLU-like, mean 1
    calib, test = [{"x": make()} for _ in range(16)], [make() for _ in range(8)]
    model = coarse_conv()

    def mean_shift(config):
        outs = fp32_and_int8_outputs(model, calib, config, test)
        err = np.stack([q - r for r, q in outs])  # [n, 1, H, W, C] (NHWC) or NCHW output
        return float(np.abs(err.mean(axis=(0, 1, 2, 3) if err.shape[-1] == 16 else (0, 1, 3, 4))).mean()), \
            float(np.mean([sqnr_db(r, q) for r, q in outs]))

    shift_plain, sqnr_plain = mean_shift(QuantConfig())
    shift_corrected, sqnr_corrected = mean_shift(QuantConfig(bias_correction=True))
    assert shift_corrected < shift_plain / 2, (shift_plain, shift_corrected)
    assert sqnr_corrected > sqnr_plain, (sqnr_plain, sqnr_corrected)


def test_weight_only_int8_and_int4_shrink_weights_and_keep_accuracy(tmp_path):
    import json

    from tvmq.cli import main

    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (4, 256)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    results = {}
    for mode in ("fp32", "int8", "int4"):
        out = tmp_path / mode
        extra = [] if mode == "fp32" else ["--weight-only", mode]
        assert main(["compile", str(path), "--precision", "fp32", *extra, "-o", str(out)]) == 0
        m = json.loads((out / "manifest.json").read_text())
        from tvmq.runtime import Bundle

        results[mode] = (sum(m["weight_bytes"]["compiled"].values()), Bundle(out).run({"x": x})["y"])
    fp32_bytes, ref = results["fp32"]
    int8_bytes, y8 = results["int8"]
    int4_bytes, y4 = results["int4"]
    assert int8_bytes <= fp32_bytes / 4 * 1.05  # int8 weights + per-channel scales
    assert int4_bytes <= fp32_bytes / 8 * 1.3  # two weights a byte + per-group scales
    assert sqnr_db(ref, y8) >= 35 and sqnr_db(ref, y4) >= 15, (sqnr_db(ref, y8), sqnr_db(ref, y4))


def test_int4_packing_round_trips():
    from tvmq.passes.weight_only import pack_int4, unpack_int4

    rng = np.random.default_rng(5)
    w = rng.normal(0, 1, (70, 33)).astype(np.float32)
    packed, scale = pack_int4(w, 32)
    assert packed.dtype == np.uint8 and packed.shape == (70, 17) and scale.shape == (3, 33)
    back = unpack_int4(packed, scale, 33, 32)
    rows = np.arange(70) // 32
    assert np.all(np.abs(back - w) <= scale[rows] / 2 + 1e-6)
