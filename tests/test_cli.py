"""The command line and the bundle it writes."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tvmq.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_bundle_layout_and_manifest(bundle, demo_dir):
    names = sorted(p.name for p in bundle.iterdir())
    assert names == ["manifest.json", "model.so", "plan.json", "report.md", "run.py", "tvmq_run.cc"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o777 & ~umask  # not the staging folder's private 0700
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["inputs"] == [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]
    assert m["versions"]["apache-tvm"] == "0.27.0.post1"
    assert m["target"]["preset"] == "x86" and m["target"]["activation_dtype"] == "uint8"
    # conv0 reads one input channel (9 products per output): its int8 kernel is no faster on x86
    assert {k: v["precision"] for k, v in m["layers"].items()} == {"conv0": "fp32",
                                                                  **dict.fromkeys(["conv1", "conv2", "fc0", "fc1"], "int8")}
    assert m["quantization"]["kept_float_for_speed"] == ["conv0"]
    assert m["layers"]["conv1"]["inputs"][0]["dtype"] == "uint8"
    integer = [k for k in m["kernels"] if k["accumulator"] == "int32"]
    assert len(integer) == 4 and all(k["operands"] in (["uint8", "int8"], ["int16", "int8"]) for k in integer)
    import hashlib

    for name, digest in m["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
    assert "manifest.json" not in m["files"]
    report = (bundle / "report.md").read_text()
    assert "| conv0 | conv2d | fp32 |" in report and "| conv1 | conv2d | int8 |" in report
    assert "kept float where int8 is no faster on" in report


def test_run_npy_and_npz(bundle, tmp_path, demo_dir, capsys):
    x = np.load(demo_dir / "digits_test.npz")["x"][:1]
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", input=x)
    assert main(["run", str(bundle), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "a.npz")]) == 0
    assert main(["run", str(bundle), "--input", str(tmp_path / "x.npz"), "--output", str(tmp_path / "b.npz")]) == 0
    a, b = np.load(tmp_path / "a.npz")["logits"], np.load(tmp_path / "b.npz")["logits"]
    assert a.shape == (1, 10) and np.array_equal(a, b)


def test_runner_needs_only_the_tvm_runtime(bundle, tmp_path, demo_dir):
    """The bundle's run.py, in a fresh interpreter, never imports the tvm package."""
    x = np.load(demo_dir / "digits_test.npz")["x"][:1]
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, runpy; sys.argv = ['run.py', sys.argv[1], '--input', sys.argv[2], '--output', sys.argv[3]];\n"
        "try:\n    runpy.run_path(sys.argv[0] if False else sys.argv[1] + '/run.py', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'tvm' not in sys.modules, 'runner imported tvm'\nprint('tvm-free')\n"
        "import tvm_ffi; print('threads', tvm_ffi.get_global_func('runtime.NumThreads')())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code, str(bundle), str(tmp_path / "x.npy"), str(tmp_path / "y.npz")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tvm-free" in out.stdout
    from tvmq.runtime import physical_cores

    # Unset, TVM 0.27 would use half the CPUs on x86 and read sysfs at every kernel launch.
    assert f"threads {physical_cores()}" in out.stdout
    assert np.load(tmp_path / "y.npz")["logits"].shape == (1, 10)


def _fake_cpus(root, cores):
    for cpu, (package, core) in enumerate(cores):
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")


def test_default_threads_are_the_physical_cores(tmp_path, monkeypatch):
    from tvmq.runtime import BundleError, configure_threads, physical_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    _fake_cpus(tmp_path / "smt", [(0, 0), (0, 0), (0, 1), (0, 1)])  # 2 cores x 2 SMT threads
    _fake_cpus(tmp_path / "two", [(0, 0), (1, 0), (0, 1), (1, 1)])  # 2 packages x 2 cores
    assert physical_cores(tmp_path / "smt") == 2
    assert physical_cores(tmp_path / "two") == 4
    assert physical_cores(tmp_path / "none") == 4  # no topology: one per CPU
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2})
    assert physical_cores(tmp_path / "smt") == 1

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert configure_threads() == 3 and "TVM_NUM_THREADS" not in os.environ  # the user's setting is kept
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert configure_threads() == physical_cores() == int(os.environ["TVM_NUM_THREADS"])
    assert configure_threads(5) == 5 and os.environ["TVM_NUM_THREADS"] == "5"
    for bad in ("0", "-1"):
        with pytest.raises(BundleError, match="at least 1"):
            configure_threads(int(bad))
    monkeypatch.setenv("TVM_NUM_THREADS", "many")
    with pytest.raises(BundleError, match="whole number"):
        configure_threads()


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [l for l in err if l.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_errors_are_one_line_exit_2_and_leave_nothing(tmp_path, capsys, demo_dir):
    out = tmp_path / "out"
    cases = [
        (["compile", str(tmp_path / "nope.onnx"), "--calib", str(demo_dir / "digits_calib"), "-o", str(out)], "does not exist"),
        (["compile", str(demo_dir / "digits.onnx"), "-o", str(out)], "needs calibration data"),
        (["compile", str(demo_dir / "digits.onnx"), "--calib", str(tmp_path / "nocalib"), "-o", str(out)], "calibration directory"),
        (["compile", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"), "--target", "z80", "-o", str(out)], "unknown target"),
        (["compile", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"), "--shape", "input", "-o", str(out)], "--shape"),
        (["run", str(tmp_path), "--input", "x.npy"], "not a tvmq bundle"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        assert needle in error_line(capsys)
        assert not out.exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_wrong_calibration_data_is_reported(tmp_path, capsys, demo_dir):
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "0.npy", np.zeros((1, 1, 9, 9), np.float32))
    out = tmp_path / "out"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--calib", str(calib), "-o", str(out)]) == 2
    assert "has shape [1, 1, 9, 9]" in error_line(capsys)
    assert not out.exists() and len(list(tmp_path.iterdir())) == 1


def test_non_empty_output_is_refused_and_kept(tmp_path, capsys, demo_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compile", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"), "-o", str(out)]) == 2
    assert "not empty" in error_line(capsys)
    assert (out / "keep.txt").read_text() == "mine"


def test_corrupt_bundle_is_refused(bundle, tmp_path, capsys, demo_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "model.so", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    assert main(["run", str(copy), "--input", str(tmp_path / "x.npy")]) == 2
    assert "checksum" in error_line(capsys)


def test_keep_float_and_plan_reuse(tmp_path, demo_dir):
    calib = str(demo_dir / "digits_calib")
    a = tmp_path / "a"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--calib", calib, "--keep-float", "fc*", "-o", str(a)]) == 0
    m = json.loads((a / "manifest.json").read_text())
    assert m["layers"]["fc0"]["precision"] == "fp32" and m["layers"]["conv2"]["precision"] == "int8"
    assert "output" not in m["layers"]["conv2"]  # its consumer stays float, so it is not requantized
    b = tmp_path / "b"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--plan", str(a / "plan.json"), "-o", str(b)]) == 0
    assert (a / "plan.json").read_text() == (b / "plan.json").read_text()
    assert (a / "model.so").read_bytes() == (b / "model.so").read_bytes()


def test_targets_lists_presets(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("x86", "arm", "arm32", "rpi4", "rpi5", "cuda", "jetson-orin"):
        assert f"\n{name} " in "\n" + out


def test_python_m_tvmq_entry_point():
    out = subprocess.run([sys.executable, "-m", "tvmq", "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith("tvmq ")


def test_runtime_copy_between_devices_calls_the_runtime_as_0_27_declares_it():
    """``run.py`` moves CUDA bundles' inputs and outputs with ``runtime.TVMTensorCopyFromTo`` (from, to); it was
    called with a third (stream) argument, which TVM 0.27's runtime refuses: every CUDA bundle failed on a GPU.
    The same call copies host to host here."""
    import tvm  # noqa: F401  (loads the runtime's global functions)
    import tvm_ffi

    from tvmq.runtime import copy_to, aligned

    a = aligned(np.arange(12, dtype=np.float32).reshape(3, 4))
    copy = copy_to(tvm_ffi.from_dlpack(a), tvm_ffi.device("cpu", 0))
    np.testing.assert_array_equal(np.from_dlpack(copy), a)


def test_tune_says_so_when_the_model_has_nothing_to_tune(tmp_path, capsys):
    """A model without conv/matmul kernels: `tune` reports 0 kernels and says why, instead of a silent 0."""
    from conftest import make_model, random_samples
    from onnx import helper

    model = make_model([helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Add", ["r", "c"], ["y"], name="add")],
                       [("x", [1, 16])], [("y", [1, 16])], [("c", np.ones(16, np.float32))])
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    for i, s in enumerate(random_samples([1, 16], n=4)):
        np.save(tmp_path / "calib" / f"{i}.npy", s["x"])
    assert main(["tune", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib"), "--db", str(tmp_path / "db"),
                 "--trials", "1", "--target", "x86-avx2"]) == 0
    out = capsys.readouterr()
    assert "tuned 0 kernels" in out.out and "warning: nothing to tune for target 'x86-avx2'" in out.err
    assert "cost model prior: none" in out.out  # no prior ships for AVX2's micro-kernel
    # a prior that is not there: one error line, before anything is calibrated or tuned
    assert main(["tune", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib"), "--db", str(tmp_path / "db2"),
                 "--cost-model", str(tmp_path / "missing.tar.gz")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cost model") and "--cost-model none" in err[0]
    assert not (tmp_path / "db2").exists()


def test_tune_time_budgets_parse_or_give_one_error():
    from tvmq.errors import TvmqError
    from tvmq.tune import parse_duration

    assert parse_duration("10m") == 600 and parse_duration("90s") == 90 and parse_duration("1h") == 3600
    assert parse_duration("45") == 45
    for bad in ("", "m", "-5m", "ten minutes", "0s"):
        with pytest.raises(TvmqError, match="--time"):
            parse_duration(bad)
