"""CUDA bundles carry compiled device code; running them needs a GPU (marker ``gpu``)."""

import json
import shutil

import numpy as np
import pytest

from tvmq.cli import main

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA toolkit (nvcc)")


def _has_gpu() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def cuda_bundle(tmp_path_factory, demo_dir):
    if shutil.which("nvcc") is None:
        pytest.skip("needs the CUDA toolkit (nvcc)")
    out = tmp_path_factory.mktemp("cuda") / "digits-cuda"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"),
                 "--target", "cuda", "--arch", "sm_90", "-o", str(out)]) == 0
    return out


@needs_nvcc
def test_cuda_bundle_holds_a_fatbin_and_no_cuda_source(cuda_bundle):
    from tvmq.cuda import library_has_cuda_source

    data = (cuda_bundle / "model.so").read_bytes()
    assert not library_has_cuda_source(cuda_bundle / "model.so")
    assert bytes.fromhex("50ed55ba") in data  # fatbin header magic
    m = json.loads((cuda_bundle / "manifest.json").read_text())
    assert m["target"]["device"] == "cuda" and m["target"]["tvm"]["arch"] == "sm_90"
    assert all(k["accumulator"] == "int32" for k in m["kernels"])


def test_arch_is_validated(tmp_path, capsys, demo_dir):
    assert main(["compile", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"),
                 "--target", "cuda", "--arch", "90", "-o", str(tmp_path / "o")]) == 2
    assert "sm_90" in capsys.readouterr().err
    assert main(["compile", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"),
                 "--target", "x86", "--arch", "sm_90", "-o", str(tmp_path / "o")]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA device")
def test_cuda_bundle_runs_and_matches_the_cpu_build(cuda_bundle, tmp_path, demo_dir):
    from tvmq.runtime import Bundle

    cpu = tmp_path / "cpu"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--plan", str(cuda_bundle / "plan.json"), "-o", str(cpu)]) == 0
    x = np.load(demo_dir / "digits_test.npz")["x"][:1]
    got = Bundle(cuda_bundle).run({"input": x})["logits"]
    want = Bundle(cpu).run({"input": x})["logits"]
    np.testing.assert_array_equal(got, want)
