"""The x86 ISA matrix: every preset's int8 program computes the same integers, with its own
micro-kernel in every int8 conv/matmul kernel, and carries no instruction its CPU lacks.

The builds of presets this CPU can run are run here and compared bit for bit; the others are
checked in their machine code. An AVX2 build also runs under ``qemu-x86_64 -cpu Haswell``,
which stops at the first AVX-512 instruction (SIGILL): the proof that it carries none.
"""

import shutil
import subprocess

import numpy as np
import pytest
from conftest import conv_model, kernel_instructions, make_model, random_samples
from onnx import helper

from tvmq.compile import compile_model
from tvmq.config import QuantConfig
from tvmq.runtime import Bundle
from tvmq.targets import get_preset

X86_PRESETS = ["x86-avx2", "x86-avx512", "x86-avxvnni", "x86-avx512vnni"]


def odd_channels_model(seed=0):
    """conv 3->5 (pad 1) -> relu -> conv 5->12 stride 2 -> relu -> flatten -> matmul 108->7: channel
    counts that are multiples of neither k (2, 4) nor the lanes (4, 8, 16)."""
    rng = np.random.default_rng(seed)
    inits = [("w0", rng.normal(0, 0.4, (5, 3, 3, 3))), ("b0", rng.normal(0, 0.1, 5)),
             ("w1", rng.normal(0, 0.3, (12, 5, 3, 3))), ("b1", rng.normal(0, 0.1, 12)),
             ("w2", rng.normal(0, 0.1, (108, 7))), ("b2", rng.normal(0, 0.1, 7)),
             ("shape", np.array([1, 108], np.int64))]
    inits = [(k, v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in inits]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Reshape", ["r1", "shape"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w2"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "b2"], ["y"], name="bias"),
    ]
    return make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 7])], inits)


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_dir):
    """(onnx path, calibration samples, test inputs) for the demo and two synthetic models."""
    import onnx

    root = tmp_path_factory.mktemp("isa-models")
    digits = np.load(demo_dir / "digits_test.npz")["x"]
    out = {"digits": (demo_dir / "digits.onnx", [{"input": x[None]} for x in digits[-16:]], digits[:8, None])}
    for name, model, shape in (("odd", odd_channels_model(), (1, 3, 6, 6)), ("conv", conv_model(cin=6, cout=20, k=3)[0], (1, 6, 8, 8))):
        path = root / f"{name}.onnx"
        onnx.save(model, str(path))
        out[name] = (path, random_samples(shape, n=8), np.stack([s["x"] for s in random_samples(shape, n=4, seed=9)]))
    return out


@pytest.fixture(scope="module")
def x86_bundles(tmp_path_factory, models):
    """{(model, preset): bundle folder}: every x86 preset, with the plan of the first one."""
    root = tmp_path_factory.mktemp("isa")
    bundles = {}
    for model, (path, calib, _) in models.items():
        plan = None
        for preset in X86_PRESETS:
            out = root / f"{model}-{preset}"
            name = "input" if model == "digits" else "x"
            if plan is None:
                res = compile_model(path, out, target=preset, calib=calib, shapes={name: list(calib[0][name].shape)},
                                    config=QuantConfig(int8_everywhere=True))
                plan = out / "plan.json"
            else:
                res = compile_model(path, out, target=preset, plan=plan, shapes={name: list(calib[0][name].shape)})
            assert res.manifest["target"]["int8_kernel"] == get_preset(preset).int8_kernel
            bundles[model, preset] = out
    return bundles


@pytest.mark.parametrize("preset", X86_PRESETS)
def test_every_int8_kernel_uses_the_presets_micro_kernel(x86_bundles, models, preset):
    p = get_preset(preset)
    for model in models:
        lib = x86_bundles[model, preset] / "model.so"
        counts = kernel_instructions("objdump", lib, p.micro_kernel.mnemonics[0])
        layers = {"digits": 5, "odd": 3, "conv": 1}[model]
        assert len(counts) == layers and all(n > 0 for n in counts.values()), (model, counts)
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                             check=True).stdout
        if p.vector_registers == 16:  # AVX2 and AVX-VNNI CPUs have no AVX-512
            assert "%zmm" not in asm and "%k1" not in asm, model
        if preset == "x86-avxvnni":
            assert "{vex} vpdpbusd" in asm  # the VEX (AVX-VNNI) encoding, not the EVEX (AVX-512) one


def test_every_x86_preset_gives_the_same_integers(x86_bundles, models):
    """Bit for bit, on every preset this CPU runs (an AVX-512 VNNI machine runs all but AVX-VNNI)."""
    runnable = [p for p in X86_PRESETS if get_preset(p).runs_here]
    assert "x86-avx2" in runnable  # every x86-64 machine these tests run on has AVX2
    for model, (_, _, xs) in models.items():
        outputs = {}
        for preset in runnable:
            bundle = Bundle(x86_bundles[model, preset])
            name = bundle.inputs[0]["name"]
            outputs[preset] = [list(bundle.run({name: x}).values())[0] for x in xs]
        for preset in runnable[1:]:
            for a, b in zip(outputs[runnable[0]], outputs[preset]):
                np.testing.assert_array_equal(a, b, err_msg=f"{model}: {preset} vs {runnable[0]}")


@pytest.mark.skipif(not shutil.which("qemu-x86_64"), reason="needs qemu-user")
def test_avx2_bundle_runs_on_a_haswell_cpu_and_gives_the_same_integers(x86_bundles, models, tmp_path):
    """qemu-x86_64 -cpu Haswell has AVX2 and no AVX-512: an AVX-512 instruction would stop the run
    with SIGILL. The control: the AVX-512 build does stop there."""
    from tvmq.crossrt import build_runner

    runner = build_runner("g++", "x86_64")
    x = models["digits"][2][0]
    np.save(tmp_path / "x.npy", x)
    ref = Bundle(x86_bundles["digits", "x86-avx2"])
    expected = list(ref.run({"input": x}).values())[0]
    run = lambda preset: subprocess.run(  # noqa: E731
        ["qemu-x86_64", "-cpu", "Haswell", str(runner), str(x86_bundles["digits", preset] / "model.so"),
         str(tmp_path / "x.npy"), "-o", str(tmp_path / f"{preset}_")], capture_output=True, text=True, timeout=300)
    done = run("x86-avx2")
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "x86-avx2_0.npy"), expected)
    assert run("x86-avx512").returncode != 0  # SIGILL: the emulated CPU really lacks AVX-512
