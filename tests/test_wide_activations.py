"""int8 weights on 16-bit activations (layer rule / search choice ``int16``): the plan, the
integer kernels each x86 preset runs them on, their exactness, and what the 16 bits buy."""

import subprocess

import numpy as np
import pytest
from conftest import kernel_instructions, make_model, random_samples, sqnr_db
from onnx import helper

from tvmq.compile import compile_model
from tvmq.config import LayerRule, QuantConfig
from tvmq.plan import read_plan
from tvmq.qparams import int16_accumulates_exactly
from tvmq.runtime import Bundle
from tvmq.targets import get_preset

X86_PRESETS = ["x86-avx2", "x86-avx512", "x86-avxvnni", "x86-avx512vnni"]
WIDE_MNEMONIC = {"x86-avx2": "vpmaddwd", "x86-avx512": "vpmaddwd", "x86-avxvnni": "vpdpwssd", "x86-avx512vnni": "vpdpwssd"}


def two_convs(seed=0, cin=6, mid=20, cout=12, hw=10):
    """conv cin->mid 3x3 (pad 1) -> relu -> conv mid->cout 1x1: odd channel counts for k = 2."""
    rng = np.random.default_rng(seed)
    inits = [("w0", rng.normal(0, 0.3, (mid, cin, 3, 3))), ("b0", rng.normal(0, 0.1, mid)),
             ("w1", rng.normal(0, 0.3, (cout, mid, 1, 1))), ("b1", rng.normal(0, 0.1, cout))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["y"], name="conv1", kernel_shape=[1, 1])]
    return make_model(nodes, [("x", [1, cin, hw, hw])], [("y", [1, cout, hw, hw])],
                      [(k, v.astype(np.float32)) for k, v in inits])


def long_tailed_samples(n, seed, peak=60.0):
    """Mostly small values with a rare large one (``peak``) per sample: an 8-bit grid over the
    whole range leaves the small ones a few steps (what an early, high-resolution layer of a
    detector sees); ``peak=0``: an input with none."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(0, 0.5, (1, 6, 10, 10)).astype(np.float32)
        if peak:
            x[0, rng.integers(6), rng.integers(10), rng.integers(10)] = peak
        out.append({"x": x})
    return out


def _wide(*names):
    return QuantConfig(int8_everywhere=True, rules=tuple(LayerRule(name=n, precision="int16") for n in names))


@pytest.fixture(scope="module")
def wide_bundles(tmp_path_factory):
    """{preset: bundle}: both convs int16 (one plan, made for the first preset, reused by the others)."""
    import onnx

    root = tmp_path_factory.mktemp("wide")
    path = root / "two_convs.onnx"
    onnx.save(two_convs(), str(path))
    out, plan = {}, None
    for preset in X86_PRESETS:
        kwargs = {"plan": plan} if plan else {"calib": long_tailed_samples(8, 1), "config": _wide("conv*")}
        compile_model(path, root / preset, target=preset, shapes={"x": [1, 6, 10, 10]}, **kwargs)
        plan = plan or root / preset / "plan.json"
        out[preset] = root / preset
    return path, out


def test_an_int16_rule_gives_the_layer_16_bit_inputs_and_its_producer_16_bit_outputs():
    from tvmq.frontend import load_onnx
    from tvmq.quantize import calibrate, prepare

    mod = prepare(load_onnx(two_convs())[0])
    plan = calibrate(mod, long_tailed_samples(4, 1), _wide("conv1"), input_names=["x"])
    assert plan.wide_layers() == ["conv1"]
    assert plan.get("conv0").inputs[0].dtype == "uint8" and plan.get("conv0").output.dtype == "int16"
    assert plan.get("conv1").inputs[0].dtype == "int16" and plan.get("conv1").precision == "int8"
    eight = calibrate(mod, long_tailed_samples(4, 1), QuantConfig(int8_everywhere=True), input_names=["x"])
    lo8, lo16 = (float(p.get("conv1").inputs[0].scale) for p in (eight, plan))
    assert lo16 == pytest.approx(lo8 * 255 / 65535, rel=1e-3)  # the same range in 256x finer steps
    # a target without a kernel for 16-bit activations keeps them 8-bit
    arm = calibrate(mod, long_tailed_samples(4, 1), _wide("conv1"), target="arm", input_names=["x"])
    assert arm.wide_layers() == []


def test_16_bit_activations_are_refused_where_the_int32_sums_could_overflow():
    """576 weights of the same magnitude per output channel quantize to +-127 each: 73,152 > 2^15."""
    from tvmq.frontend import load_onnx
    from tvmq.quantize import calibrate, prepare

    rng = np.random.default_rng(0)
    w = (np.sign(rng.normal(size=(8, 64, 3, 3))) * 0.1).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="wide_sum", kernel_shape=[3, 3], pads=[1] * 4)],
                       [("x", [1, 64, 6, 6])], [("y", [1, 8, 6, 6])], [("w", w)])
    assert not int16_accumulates_exactly(np.round(w / 0.1 * 127).astype(np.int8), 0)
    mod = prepare(load_onnx(model)[0])
    plan = calibrate(mod, random_samples((1, 64, 6, 6), n=2), _wide("*"), input_names=["x"])
    assert plan.wide_layers() == [] and plan.get("wide_sum").inputs[0].dtype == "uint8"


@pytest.mark.parametrize("preset", X86_PRESETS)
def test_int16_layers_run_on_the_presets_16_bit_kernel(wide_bundles, preset):
    """Every conv reads int16 activations and int8 weights into int32 sums, on vpdpwssd where the
    ISA has VNNI and vpmaddwd elsewhere, and the AVX2 builds carry no AVX-512 register."""
    import json

    bundle = wide_bundles[1][preset]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["int16_activation_layers"] == 2
    convs = [k for k in manifest["kernels"] if k["accumulator"] == "int32"]
    assert len(convs) == 2 and all(k["operands"] == ["int16", "int8"] for k in convs), manifest["kernels"]
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(bundle / "model.so")], capture_output=True,
                         text=True, check=True).stdout
    counts = kernel_instructions("objdump", bundle / "model.so", WIDE_MNEMONIC[preset])
    assert len(counts) == 2 and all(n > 0 for n in counts.values()), counts
    if get_preset(preset).vector_registers == 16:
        assert "%zmm" not in asm
    if preset == "x86-avxvnni":
        assert "{vex} vpdpwssd" in asm


def _integer_reference(plan, x):
    """numpy's int64 program of the two layers: conv0 on the int16 input, requantized to conv1's
    int16 input (round half up, as the fixed-point requantize), conv1 scaled back to float."""
    from tvmq.qparams import fixed_point_multiplier, quantize_weight, requantize_reference

    model = two_convs()
    w = {i.name: np.frombuffer(i.raw_data, np.float32).reshape(i.dims) for i in model.graph.initializer}

    def conv(q, qp, weight, bias, pad):
        """int64 sums of (q - zero point) x int8 weights plus the bias in their units; their scale."""
        qw, wqp = quantize_weight(weight, 0)
        q = np.pad(q.astype(np.int64) - int(qp.zero_point), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        k = weight.shape[-1]
        cols = np.stack([q[:, :, i:i + q.shape[2] - k + 1, j:j + q.shape[3] - k + 1] for i in range(k) for j in range(k)], 2)
        acc = np.einsum("nckhw,ock->nohw", cols, qw.astype(np.int64).reshape(qw.shape[0], qw.shape[1], -1))
        scale = float(qp.scale) * wqp.scale.astype(np.float64)
        assert np.abs(acc).max() < 2**31  # what the kernel's int32 sums hold
        return acc + np.round(bias / scale).astype(np.int64)[None, :, None, None], scale

    p0, p1 = plan.get("conv0"), plan.get("conv1")
    acc0, s0 = conv(p0.inputs[0].quantize(x), p0.inputs[0], w["w0"], w["b0"], 1)
    m0, shift = fixed_point_multiplier(s0 / float(p0.output.scale))
    q1 = requantize_reference(acc0, m0[None, :, None, None], shift[None, :, None, None]) + int(p0.output.zero_point)
    q1 = np.clip(q1, int(p0.output.zero_point), 32767)  # relu: nothing below the real zero
    acc1, s1 = conv(q1, p1.inputs[0], w["w1"], w["b1"], 0)
    return acc1.astype(np.float32) * s1.astype(np.float32)[None, :, None, None]


def test_int16_layers_compute_the_exact_integer_program(wide_bundles):
    """On every preset this CPU runs: the same bits, and numpy's integer program of the plan to
    within float32 rounding of the last scaling (int32 sums of 16 x 8-bit products, no saturation)."""
    plan = read_plan(wide_bundles[1]["x86-avx2"] / "plan.json")
    xs = [s["x"] for s in long_tailed_samples(3, 7)]
    outs = {}
    for preset in [p for p in X86_PRESETS if get_preset(p).runs_here]:
        bundle = Bundle(wide_bundles[1][preset])
        outs[preset] = [list(bundle.run({"x": x}).values())[0] for x in xs]
    first = next(iter(outs.values()))
    for preset, got in outs.items():
        for a, b in zip(first, got):
            np.testing.assert_array_equal(a, b, err_msg=preset)
    for x, y in zip(xs, first):
        ref = _integer_reference(plan, x)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_16_bit_activations_recover_what_an_8_bit_grid_loses(wide_bundles, tmp_path):
    """Calibrated on long-tailed inputs, run on inputs without the rare peak: 8 bits over the
    range leave their values (sigma 0.5) about 2 steps each side (~17 dB); 16 bits ~500 steps,
    which leaves the int8 weights (~40 dB) as the limit."""
    from tvmq.execute import HostModule
    from tvmq.frontend import load_onnx
    from tvmq.quantize import prepare

    path, bundles = wide_bundles
    compile_model(path, tmp_path / "int8", target="x86-avx2", shapes={"x": [1, 6, 10, 10]},
                  calib=long_tailed_samples(8, 1), config=QuantConfig(int8_everywhere=True))
    ref = HostModule(prepare(load_onnx(str(path))[0]), "x86-avx2")
    xs = [s["x"] for s in long_tailed_samples(4, 7, peak=0)]
    wide, eight = Bundle(bundles["x86-avx2"]), Bundle(tmp_path / "int8")
    sq16 = min(sqnr_db(ref(x)[0], list(wide.run({"x": x}).values())[0]) for x in xs)
    sq8 = min(sqnr_db(ref(x)[0], list(eight.run({"x": x}).values())[0]) for x in xs)
    assert sq16 >= 30.0 and sq16 >= sq8 + 15.0, (sq16, sq8)


def test_the_search_gives_16_bit_activations_to_a_layer_8_bits_break(tmp_path):
    """With --int16-activations, a conv whose 8-bit input breaks the budget alone (a long-tailed
    input) is planned int8 on 16-bit activations instead of being left float, and the compiled
    plan meets the budget on every sample."""
    import json

    import onnx

    from tvmq.config import AutoPrecision

    rng = np.random.default_rng(3)
    inits = [("w0", rng.normal(0, 0.2, (32, 6, 3, 3))), ("b0", rng.normal(0, 0.1, 32)),
             ("w1", rng.normal(0, 0.1, (32, 32, 3, 3))), ("b1", rng.normal(0, 0.1, 32))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["y"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4)]
    path = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [("x", [1, 6, 48, 48])], [("y", [1, 32, 48, 48])],
                         [(k, v.astype(np.float32)) for k, v in inits]), str(path))
    # half the samples carry the rare peak (the calibrated range), half do not (judged at 8 bits: ~17 dB;
    # not an 8-bit image, so no input-rounding slack)
    calib = [{"x": np.tile(s["x"], (1, 1, 5, 5))[:, :, :48, :48]}
             for s in long_tailed_samples(4, 1) + long_tailed_samples(4, 2, peak=0)]
    res = compile_model(path, tmp_path / "out", target="x86-avx2", calib=calib, shapes={"x": [1, 6, 48, 48]},
                        precision="auto", auto=AutoPrecision(min_sqnr=30.0, input_noise=0.0, int16_activations=True))
    p = json.loads((tmp_path / "out" / "manifest.json").read_text())["precision"]
    conv0 = next(l for l in p["layers"] if l["name"] == "conv0")
    assert "int16" in p["candidates"]
    assert conv0["sqnr_int8"] < 30.0 <= conv0["sqnr_int16"], conv0
    assert p["assignment"]["conv0"] == "int16" and p["plan"] >= 30.0, p["assignment"]
    assert res.manifest["quantization"]["int16_activation_layers"] >= 1


def test_onnx_runtimes_16_bit_qdq_model_runs_on_16_bit_kernels_with_its_numbers(tmp_path):
    """ONNX Runtime's A16W8 QDQ model (QuantType.QInt16 activations, int8 weights) compiles to
    the int16 x int8 kernels and gives ONNX Runtime's reference Q/DQ outputs to the bit."""
    import json

    import onnx

    ort = pytest.importorskip("onnxruntime")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(long_tailed_samples(8, 1))

        def get_next(self):
            return next(self.samples, None)

    onnx.save(two_convs(), str(tmp_path / "f.onnx"))
    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt16, weight_type=QuantType.QInt8)
    res = compile_model(tmp_path / "q.onnx", tmp_path / "out", target="x86-avx2", shapes={"x": [1, 6, 10, 10]})
    assert res.manifest["quantization"]["int16_activation_layers"] == 2
    kernels = json.loads((tmp_path / "out" / "manifest.json").read_text())["kernels"]
    assert [k["operands"] for k in kernels if k["accumulator"] == "int32"] == [["int16", "int8"]] * 2
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # its reference Q/DQ semantics
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options)
    bundle = Bundle(tmp_path / "out")
    for s in long_tailed_samples(3, 7, peak=0):
        np.testing.assert_array_equal(list(bundle.run(s).values())[0], session.run(None, s)[0])
