"""Cross-compiled bundles: aarch64 runs under qemu-user and matches the x86 build bit for bit."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import board_runtime_or_skip, kernel_instructions, lstm_model, make_model
from onnx import helper

from tvmq.cli import main

needs_aarch64 = pytest.mark.skipif(
    not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
    reason="needs g++-aarch64-linux-gnu and qemu-user",
)
needs_armhf = pytest.mark.skipif(not shutil.which("arm-linux-gnueabihf-g++"), reason="needs g++-arm-linux-gnueabihf")
needs_armv7_run = pytest.mark.skipif(
    not (shutil.which("arm-linux-gnueabihf-g++") and shutil.which("qemu-arm")), reason="needs g++-arm-linux-gnueabihf and qemu-user"
)
pytestmark = pytest.mark.arm

EM_AARCH64, EM_ARM = 0xB7, 0x28


def elf_machine(path) -> int:
    header = open(path, "rb").read(20)
    assert header[:4] == b"\x7fELF"
    return int.from_bytes(header[18:20], "little")


def assert_board_equals_x86(emulator: list[str], runner, bundle, x86_bundle, xs, tmp_path, cpu: str = "max") -> None:
    """Each input through the x86 build (native runner) and the board build (runner under qemu-user):
    the int8 outputs must be the same numbers exactly."""
    from tvmq.crossrt import build_runner

    runner_x86 = build_runner("g++", "x86_64")
    for i, x in enumerate(xs):
        np.save(tmp_path / f"x{i}.npy", x[None])
        subprocess.run([str(runner_x86), str(x86_bundle / "model.so"), str(tmp_path / f"x{i}.npy"), "-o",
                        str(tmp_path / f"ref{i}_")], check=True, capture_output=True)
        subprocess.run([*emulator, "-cpu", cpu, str(runner), str(bundle / "model.so"), str(tmp_path / f"x{i}.npy"),
                        "-o", str(tmp_path / f"arm{i}_")], check=True, capture_output=True, timeout=120)
        np.testing.assert_array_equal(np.load(tmp_path / f"arm{i}_0.npy"), np.load(tmp_path / f"ref{i}_0.npy"))


@pytest.fixture(scope="module")
def arm_bundle(tmp_path_factory, demo_dir):
    out = tmp_path_factory.mktemp("arm") / "digits-arm"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"),
                 "--target", "arm", "-o", str(out)]) == 0
    return out


@needs_aarch64
def test_arm_bundle_is_aarch64_and_every_int8_kernel_uses_sdot(arm_bundle):
    assert elf_machine(arm_bundle / "model.so") == EM_AARCH64
    m = json.loads((arm_bundle / "manifest.json").read_text())
    assert m["target"]["triple"] == "aarch64-linux-gnu" and "+dotprod" in m["target"]["features"]
    assert m["target"]["activation_dtype"] == "int8"
    counts = kernel_instructions("aarch64-linux-gnu-objdump", arm_bundle / "model.so", "sdot")
    assert len(counts) == 5, counts  # 3 conv + 2 matmul
    assert all(n > 0 for n in counts.values()), counts


@needs_aarch64
def test_arm_bundle_under_qemu_equals_x86_build_bit_for_bit(arm_bundle, tmp_path, demo_dir):
    from tvmq.crossrt import build_runner

    # The same plan (int8 activations, as on ARM) compiled for this machine is the reference.
    x86 = tmp_path / "x86"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--plan", str(arm_bundle / "plan.json"), "-o", str(x86)]) == 0
    xs = np.load(demo_dir / "digits_test.npz")["x"][:6]
    assert_board_equals_x86(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"], build_runner("aarch64-linux-gnu-g++", "aarch64"),
                            arm_bundle, x86, xs, tmp_path)


def _model_calib_inputs(model, tmp_path, demo_dir):
    """(onnx path, calibration folder, test inputs) of the demo or the odd-channels model."""
    import onnx
    from test_isa import odd_channels_model

    if model == "digits":
        return demo_dir / "digits.onnx", demo_dir / "digits_calib", np.load(demo_dir / "digits_test.npz")["x"][:4]
    if model == "odd":
        onnx_model, shape = odd_channels_model(), (3, 6, 6)
    else:  # "rows": a matmul over 4 rows of 40 features (a token sequence), 40 -> 6, relu
        rng = np.random.default_rng(5)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("Add", ["m", "b"], ["a"], name="bias"),
                 helper.make_node("Relu", ["a"], ["y"], name="relu")]
        onnx_model = make_model(nodes, [("x", [1, 4, 40])], [("y", [1, 4, 6])],
                                [("w", rng.normal(0, 0.2, (40, 6)).astype(np.float32)),
                                 ("b", rng.normal(0, 0.1, 6).astype(np.float32))])
        shape = (4, 40)
    path, calib = tmp_path / f"{model}.onnx", tmp_path / "calib"
    onnx.save(onnx_model, str(path))
    calib.mkdir()
    rng = np.random.default_rng(3)
    for i in range(8):
        np.save(calib / f"{i}.npy", rng.uniform(-1, 1, (1, *shape)).astype(np.float32))
    return path, calib, rng.uniform(-1, 1, (4, *shape)).astype(np.float32)


@needs_aarch64
@pytest.mark.parametrize("model", ["digits", "odd"])
def test_rpi4_bundle_uses_smull_sadalp_and_equals_x86_on_a_cortex_a72(tmp_path, demo_dir, model):
    """ARMv8.0 (no dot product): every int8 kernel is the smull + sadalp micro-kernel, and under
    qemu's cortex-a72 (which has no sdot: a dot-product instruction would stop it) it gives the
    integers of the x86 build of the same plan."""
    from tvmq.crossrt import build_runner

    path, calib, xs = _model_calib_inputs(model, tmp_path, demo_dir)
    rpi4, x86 = tmp_path / "rpi4", tmp_path / "x86"
    assert main(["compile", str(path), "--calib", str(calib), "--target", "rpi4", "-o", str(rpi4)]) == 0
    assert main(["compile", str(path), "--plan", str(rpi4 / "plan.json"), "-o", str(x86)]) == 0
    for mnemonic in ("smull", "sadalp"):
        counts = kernel_instructions("aarch64-linux-gnu-objdump", rpi4 / "model.so", mnemonic)
        assert len(counts) == (5 if model == "digits" else 3) and all(n > 0 for n in counts.values()), (mnemonic, counts)
    assert kernel_instructions("aarch64-linux-gnu-objdump", rpi4 / "model.so", "sdot") == dict.fromkeys(counts, 0)
    assert_board_equals_x86(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"], build_runner("aarch64-linux-gnu-g++", "aarch64"),
                            rpi4, x86, xs, tmp_path, cpu="cortex-a72")


@needs_aarch64
@pytest.mark.parametrize("model, smmla, sdot", [
    ("digits", {"conv2d", "conv2d1", "conv2d2"}, {"matmul", "matmul1"}),  # even-width convs; one-row matmuls
    ("odd", {"conv2d"}, {"conv2d1", "matmul"}),  # conv0 pairs pixels; the stride-2 conv and the matmul do not
    ("rows", {"matmul"}, set()),  # 4 rows: two pairs
])
def test_arm_i8mm_pairs_pixels_with_smmla_and_equals_x86(tmp_path, demo_dir, model, smmla, sdot):
    """ARMv8.6 i8mm: layers whose output pixels pair up (stride-1 convs of even output width,
    matmuls of even row count) run the two-pixel smmla micro-kernel, the others sdot; under qemu's
    max CPU the integers equal the x86 build of the same plan, and qemu's cortex-a76 (dot product,
    no i8mm) stops at the first smmla: the proof that the library executes it."""
    from tvmq.crossrt import build_runner

    path, calib, xs = _model_calib_inputs(model, tmp_path, demo_dir)
    i8mm, x86 = tmp_path / "i8mm", tmp_path / "x86"
    assert main(["compile", str(path), "--calib", str(calib), "--target", "arm-i8mm", "-o", str(i8mm)]) == 0
    assert main(["compile", str(path), "--plan", str(i8mm / "plan.json"), "-o", str(x86)]) == 0
    kind = lambda name: re.match(r"fused_tvmq_((?:conv2d|matmul)\d*)_", name).group(1)  # noqa: E731
    for mnemonic, expected in (("smmla", smmla), ("sdot", sdot)):
        counts = kernel_instructions("aarch64-linux-gnu-objdump", i8mm / "model.so", mnemonic)
        assert {kind(k) for k, n in counts.items() if n > 0} == expected, (mnemonic, counts)
    runner = build_runner("aarch64-linux-gnu-g++", "aarch64")
    assert_board_equals_x86(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"], runner, i8mm, x86, xs, tmp_path)
    np.save(tmp_path / "x.npy", xs[:1])
    stopped = subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", "cortex-a76", str(runner),
                              str(i8mm / "model.so"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "a76_")],
                             capture_output=True, timeout=120)
    assert stopped.returncode != 0  # SIGILL: cortex-a76 has no smmla


@needs_aarch64
def test_fp32_arm_bundle_matches_x86_within_1e5(tmp_path, demo_dir):
    from tvmq.crossrt import build_runner

    arm, x86 = tmp_path / "arm", tmp_path / "x86"
    for target, out in (("arm", arm), ("x86", x86)):
        assert main(["compile", str(demo_dir / "digits.onnx"), "--precision", "fp32", "--shape", "input:1,1,8,8",
                     "--target", target, "-o", str(out)]) == 0
    x = np.load(demo_dir / "digits_test.npz")["x"][:1]
    np.save(tmp_path / "x.npy", x)
    subprocess.run([str(build_runner("g++", "x86_64")), str(x86 / "model.so"), str(tmp_path / "x.npy"), "-o",
                    str(tmp_path / "ref_")], check=True, capture_output=True)
    subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", "max", str(build_runner("aarch64-linux-gnu-g++", "aarch64")),
                    str(arm / "model.so"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "arm_")], check=True, capture_output=True)
    np.testing.assert_allclose(np.load(tmp_path / "arm_0.npy"), np.load(tmp_path / "ref_0.npy"), rtol=1e-5, atol=1e-5)


@needs_aarch64
def test_fp32_lstm_loop_kernel_in_threads_under_qemu_equals_x86(tmp_path):
    """An LSTM whose chunks run in threads (hidden 136: recurrent weights over 256 KB) asks the
    runtime for its thread count from inside the kernel: the aarch64 bundle, 2 threads under
    qemu, gives the x86 build's outputs (all three) exactly."""
    import os

    from tvmq.crossrt import build_runner

    model = tmp_path / "lstm.onnx"
    model.write_bytes(lstm_model(steps=5, hidden=136, initial=True).SerializeToString())
    for target in ("arm", "x86"):
        assert main(["compile", str(model), "--precision", "fp32", "--target", target, "-o", str(tmp_path / target)]) == 0
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(0, 1, (5, 1, 8)).astype(np.float32))
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    for target, runner in (("x86", [str(build_runner("g++", "x86_64"))]),
                           ("arm", ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", "max",
                                    str(build_runner("aarch64-linux-gnu-g++", "aarch64"))])):
        subprocess.run([*runner, str(tmp_path / target / "model.so"), str(tmp_path / "x.npy"),
                        "-o", str(tmp_path / f"{target}_")], check=True, capture_output=True, env=env, timeout=120)
    for i in range(3):
        want = np.load(tmp_path / f"x86_{i}.npy")
        assert np.abs(want).max() > 0
        np.testing.assert_array_equal(np.load(tmp_path / f"arm_{i}.npy"), want)


@needs_armhf
def test_arm32_bundle_is_an_armv7_elf(tmp_path, demo_dir, capsys):
    out = tmp_path / "arm32"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"),
                 "--target", "arm32", "-o", str(out)]) == 0
    assert elf_machine(out / "model.so") == EM_ARM
    assert "no int8 dot-product instruction" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["triple"] == "armv7a-linux-gnueabihf"
    # NEON in every int8 kernel: 16-bit products (vmull.s8, or vmul.i16 where LLVM widened an
    # operand once for many uses) pairwise-accumulated into int32 (vpadal.s16); no scalar smlabb
    count = lambda mnemonic: kernel_instructions("arm-linux-gnueabihf-objdump", out / "model.so", mnemonic)  # noqa: E731
    accumulate, vmull, vmul = count("vpadal.s16"), count("vmull.s8"), count("vmul.i16")
    assert len(accumulate) == 5 and all(n > 0 for n in accumulate.values()), accumulate
    assert all(vmull[k] + vmul[k] > 0 for k in accumulate), (vmull, vmul)
    assert sum(vmull.values()) > sum(vmul.values())
    assert set(count("smlabb").values()) == {0}


@needs_armv7_run
def test_arm32_bundle_under_qemu_equals_x86_build_bit_for_bit(tmp_path, demo_dir):
    """armv7 has no TVM wheel: `tvmq runtime` cross-compiles it from source, and the int8 bundle run
    with it under qemu-arm gives the x86 build's integers exactly."""
    board_runtime_or_skip("armv7")
    arm, x86 = tmp_path / "arm32", tmp_path / "x86"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"),
                 "--target", "arm32", "-o", str(arm)]) == 0
    assert main(["compile", str(demo_dir / "digits.onnx"), "--plan", str(arm / "plan.json"), "-o", str(x86)]) == 0
    board = tmp_path / "board"  # what gets copied onto the board
    assert main(["runtime", "--target", "arm32", "-o", str(board)]) == 0
    names = ["libtvm_ffi.so", "libtvm_runtime.so", "tvmq_rpc_server", "tvmq_run"]
    assert sorted(p.name for p in board.iterdir()) == names
    assert all(elf_machine(board / name) == EM_ARM for name in names)
    xs = np.load(demo_dir / "digits_test.npz")["x"][:4]
    assert_board_equals_x86(["qemu-arm", "-L", "/usr/arm-linux-gnueabihf"], board / "tvmq_run", arm, x86, xs, tmp_path)


def test_missing_cross_compiler_names_the_apt_package(tmp_path, capsys, demo_dir, monkeypatch):
    import tvmq.targets as targets

    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    out = tmp_path / "o"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"),
                 "--target", "rpi4", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "apt-get install g++-aarch64-linux-gnu" in err and not out.exists()


@needs_armhf
def test_runtime_without_the_source_download_is_one_error_line(tmp_path, capsys, monkeypatch):
    """armv7's runtime needs tvm-ffi's sources from PyPI: unreachable, the command says so and writes nothing."""
    monkeypatch.setenv("TVMQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TVMQ_PYPI_SIMPLE", "http://127.0.0.1:9/simple")
    out = tmp_path / "board"
    assert main(["runtime", "--target", "arm32", "-o", str(out)]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "tvm-ffi's sources" in err[0] and "TVMQ_PYPI_SIMPLE" in err[0], err
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []  # no board folder, no staging folder
