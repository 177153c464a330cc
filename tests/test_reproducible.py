"""Reproducible builds and order-independent calibration."""

import subprocess
import sys

from tvmq.cli import main


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_inputs_give_byte_identical_bundles(tmp_path, demo_dir):
    args = [str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"), "--method", "entropy"]
    assert main(["compile", *args, "-o", str(tmp_path / "a")]) == 0
    assert main(["compile", *args, "-o", str(tmp_path / "b")]) == 0
    # A separate process too: nothing may depend on process state (hash seeds, temp paths).
    subprocess.run([sys.executable, "-m", "tvmq", "compile", *args, "-o", str(tmp_path / "c")], check=True,
                   capture_output=True)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert a[name] == b[name] == c[name], name
    assert b"tmp" not in a["manifest.json"]  # no build paths or timestamps in what is hashed


def test_minmax_scales_do_not_depend_on_sample_order(demo_dir):
    from tvmq.calibrate import load_samples_dir
    from tvmq.frontend import load_onnx
    from tvmq.quantize import calibrate, prepare

    mod, info = load_onnx(demo_dir / "digits.onnx", shapes={"input": [1, 1, 8, 8]})
    mod = prepare(mod)
    samples = load_samples_dir(demo_dir / "digits_calib", list(info.inputs))
    forward = calibrate(mod, samples, input_names=["input"])
    backward = calibrate(mod, samples[::-1], input_names=["input"])
    assert forward.dumps() == backward.dumps()
