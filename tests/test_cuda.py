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


@needs_nvcc
def test_int8_matmul_compiles_for_cuda_without_tensor_core_tensorization(tmp_path):
    """TVM 0.27's DLight Matmul rule tensorizes a large int8 matmul for tensor cores and the build then aborts
    (``fragment_info_`` check); tvmq turns that tensorization off for 8-bit kernels, keeping the tiled schedule
    (dp4a on the GPU: on an H100 this 512x1024x1024 GEMM equalled the CPU int8 build bit for bit)."""
    import onnx

    from tvmq.testing import matmul_model

    rng = np.random.default_rng(0)
    onnx.save(matmul_model(128, 256, 256), tmp_path / "gemm.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):
        np.save(calib / f"{i}.npy", rng.uniform(-1, 1, (128, 256)).astype(np.float32))
    out = tmp_path / "gemm-cuda"
    assert main(["compile", str(tmp_path / "gemm.onnx"), "--calib", str(calib), "--target", "cuda", "--arch", "sm_90",
                 "-o", str(out)]) == 0
    from tvmq.cuda import library_has_cuda_source

    m = json.loads((out / "manifest.json").read_text())
    assert [k["accumulator"] for k in m["kernels"]] == ["int32"] and not library_has_cuda_source(out / "model.so")
