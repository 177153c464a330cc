"""Activations quantized per channel, their scales folded into the weights of the layers reading them."""

import numpy as np
import pytest
from onnx import helper

from conftest import Compiled
from tvmq.config import QuantConfig
from tvmq.testing import make_model

PER_CHANNEL = QuantConfig(int8_everywhere=True, per_channel_activations=True)
PER_TENSOR = QuantConfig(int8_everywhere=True, per_channel_activations=False)


def _wide_channels_model(kind: str, seed: int = 7):
    """A layer whose output channels' ranges differ 40x (two channels' weights scaled up), read
    by a second layer whose weights for them are as much smaller (what a trained network's next
    layer does with such channels): a 3x3 conv (padded: the zero point pads) or a matmul.
    Per-tensor parameters leave the narrow channels a few steps; per channel, each channel its
    own steps, and the folded weights ``W[o, c] * s[c]`` are as even as the products."""
    rng = np.random.default_rng(seed)
    if kind == "conv":
        w1 = rng.normal(0, 0.3, (16, 8, 1, 1)).astype(np.float32)
        w1[:2] *= 40
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="widen", kernel_shape=[1, 1]),
                 helper.make_node("Relu", ["a"], ["r"], name="relu"),
                 helper.make_node("Conv", ["r", "w2"], ["y"], name="fuse", kernel_shape=[3, 3], pads=[1] * 4)]
        w2 = rng.normal(0, 0.3, (8, 16, 3, 3)).astype(np.float32)
        w2[:, :2] /= 40
        inits = [("w1", w1), ("b1", rng.normal(0, 0.1, 16).astype(np.float32)), ("w2", w2)]
        return make_model(nodes, [("x", [1, 8, 12, 12])], [("y", [1, 8, 12, 12])], inits), (1, 8, 12, 12)
    w1 = rng.normal(0, 0.3, (32, 64)).astype(np.float32)
    w1[:, :3] *= 40
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="widen"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fuse")]
    w2 = rng.normal(0, 0.3, (64, 16)).astype(np.float32)
    w2[:3] /= 40
    inits = [("w1", w1), ("w2", w2)]
    return make_model(nodes, [("x", [64, 32])], [("y", [64, 16])], inits), (64, 32)


def _sqnr(got, ref) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((got - ref).astype(np.float64) ** 2)))


def test_one_zero_point_covers_every_channels_range_with_the_finest_steps():
    from tvmq.qparams import activation_qparams, channel_activation_qparams

    lo = np.array([-0.28, -0.28, -0.1, 0.0])
    hi = np.array([3.0, 29.5, 10.0, 0.0])
    qp = channel_activation_qparams(lo, hi, "uint8", axis=3)
    assert qp.per_channel and qp.axis == 3 and len(set(qp.zero_point.tolist())) == 1
    zp = int(qp.zero_point[0])
    assert np.all((qp.qmax - zp) * qp.scale >= hi * (1 - 1e-6)) and np.all((qp.qmin - zp) * qp.scale <= lo * (1 - 1e-6))
    whole = activation_qparams(lo.min(), hi.max(), "uint8")
    # the widest channel pays for the shared zero point with a slightly coarser step; the others gain
    assert qp.scale[1] <= whole.scale * 1.1 and qp.scale[0] < whole.scale / 5 and qp.scale[2] < whole.scale / 2
    assert qp.scale[3] == 1.0  # a channel never seen non-zero
    # the shared zero point is the one whose steps multiply to the least
    cost = [np.sum(np.log(np.maximum(hi[:3] / (255 - z), -lo[:3] / z))) for z in range(1, 255)]
    assert zp == 1 + int(np.argmin(cost))
    cover = qp.covering()
    assert not cover.per_channel and (cover.qmax - int(cover.zero_point)) * float(cover.scale) >= 29.5 * (1 - 1e-6)


@pytest.mark.parametrize("kind", ["conv", "matmul"])
def test_a_tensor_whose_channels_differ_40x_is_quantized_per_channel_into_integer_kernels(kind):
    """The reader folds the channels' scales into its weights and still multiplies 8-bit integers
    into int32; the writer requantizes per channel. Its output gains >= 6 dB over per-tensor
    parameters, and stays within one input step of the fake-quantized simulation."""
    from tvm import relax

    from tvmq.execute import HostModule
    from tvmq.passes import InsertQDQ
    from tvmq.passes.graph import call_op, dtype_of
    from tvmq.testing import _float_output_gain

    model, shape = _wide_channels_model(kind)
    rng = np.random.default_rng(1)
    samples = [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(8)]
    tests = [rng.normal(0, 1, shape).astype(np.float32) for _ in range(4)]
    per_tensor = Compiled(model, samples, PER_TENSOR)
    c = Compiled(model, samples, PER_CHANNEL)
    lp = c.plan.layers
    assert lp["fuse"].inputs[0].per_channel and lp["widen"].output == lp["fuse"].inputs[0]
    assert not per_tensor.plan.layers["fuse"].inputs[0].per_channel

    calls = []
    relax.analysis.post_order_visit(c.qmod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    anchors = [e for e in calls if call_op(e) in ("relax.nn.conv2d", "relax.matmul")]
    assert len(anchors) == 2
    for e in anchors:
        assert dtype_of(e) == "int32" and {dtype_of(a) for a in e.args} <= {"uint8", "int8"}
    assert not [e for e in calls if call_op(e) in ("relax.quantize", "relax.dequantize")]

    simulation = HostModule(InsertQDQ(c.plan)(c.float_mod))
    bound = _float_output_gain(c.float_mod, c.plan) * (1 + 1e-4) + 1e-4
    for x in tests:
        ref = np.asarray(c.fp32(x)[0])
        got = np.asarray(c.int8(x)[0])
        assert np.abs(got - np.asarray(simulation(x)[0])).max() <= bound
        assert _sqnr(got, ref) >= _sqnr(np.asarray(per_tensor.int8(x)[0]), ref) + 6.0


def test_by_default_they_are_kept_where_the_simulated_model_does_better():
    """Default: the per-channel plan is simulated against the per-tensor one on the calibration
    samples and kept only where its worst sample is better and its median no worse."""
    import dataclasses

    from tvmq.qparams import QParams
    from tvmq.quantize import _simulated_better

    model, shape = _wide_channels_model("conv")
    rng = np.random.default_rng(5)
    samples = [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(6)]
    default, per_tensor = Compiled(model, samples), Compiled(model, samples, PER_TENSOR)
    assert default.plan.layers["fuse"].inputs[0].per_channel
    assert _simulated_better(default.float_mod, per_tensor.plan, default.plan, samples, ["x"])
    # a plan whose per-channel steps are 64x too coarse (coarser than per tensor) simulates worse: not kept
    qp = default.plan.layers["fuse"].inputs[0]
    coarse = QParams(qp.scale * 64, qp.zero_point, qp.dtype, qp.axis)
    layers = {**default.plan.layers, "fuse": dataclasses.replace(default.plan.layers["fuse"], inputs=(coarse,)),
              "widen": dataclasses.replace(default.plan.layers["widen"], output=coarse)}
    worse = dataclasses.replace(default.plan, layers=layers)
    assert not _simulated_better(default.float_mod, per_tensor.plan, worse, samples, ["x"])


def test_the_precision_search_simulates_per_channel_inputs_with_real_values():
    """The sensitivity analysis' switchable module reads the tensor dequantized with its channels'
    scales and the weights with those scales divided out again: with every layer switched to int8
    it computes what the compiled integer-step program computes."""
    from tvmq.execute import HostModule
    from tvmq.passes import InsertQDQ
    from tvmq.passes.insert_qdq import insert_switchable_qdq, quantized_tensors

    model, shape = _wide_channels_model("conv")
    rng = np.random.default_rng(2)
    samples = [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(8)]
    c = Compiled(model, samples, PER_CHANNEL)
    assert c.plan.layers["fuse"].inputs[0].per_channel
    switchable, names = insert_switchable_qdq(c.float_mod, c.plan)
    sim = HostModule(switchable)
    stepped = HostModule(InsertQDQ(c.plan)(c.float_mod))
    mask = np.ones(len(names), np.float32)
    widths = np.ones(max(1, len(quantized_tensors(c.float_mod["main"], c.plan))), np.float32)
    for s in samples[:3]:
        want = np.asarray(stepped(s["x"])[0])
        got = np.asarray(sim(s["x"], mask, widths)[0])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_tensor_also_read_in_float_keeps_per_tensor_parameters():
    """A tensor that a float op or a model output also reads is not in integer steps anywhere."""
    model, shape = _wide_channels_model("conv")
    model.graph.output.append(helper.make_tensor_value_info("r", 1, [1, 16, 12, 12]))
    rng = np.random.default_rng(4)
    samples = [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(4)]
    c = Compiled(model, samples, PER_CHANNEL)
    assert not c.plan.layers["fuse"].inputs[0].per_channel


def test_compile_per_channel_activations_writes_them_into_the_plan_and_the_bundle_runs(tmp_path):
    """``--per-channel-activations``: the bundle's plan.json keeps each channel's scale (a plan
    reused with ``--plan`` rebuilds the same program), and the bundle computes what the fp32
    model computes within the 8-bit budget; ``export-qdq`` writes them per tensor."""
    import json

    import onnx
    import onnxruntime as ort

    from tvmq.cli import main

    model, shape = _wide_channels_model("conv")
    rng = np.random.default_rng(3)
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    for i in range(8):
        np.save(tmp_path / "calib" / f"{i}.npy", rng.normal(0, 1, shape).astype(np.float32))
    out = tmp_path / "b"
    assert main(["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib"), "--per-channel-activations",
                 "--int8-everywhere", "-o", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    fuse = next(lp for name, lp in plan["layers"].items() if name == "fuse")
    assert len(fuse["inputs"][0]["scale"]) == 16 and fuse["inputs"][0]["axis"] == 3
    x = rng.normal(0, 1, shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(out), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npz")]) == 0
    got = np.load(tmp_path / "y.npz")["y"]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert _sqnr(got, ref) >= 28.0
    off = tmp_path / "off"
    assert main(["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib"), "--no-per-channel-activations",
                 "--int8-everywhere", "-o", str(off)]) == 0
    assert "axis" not in json.loads((off / "plan.json").read_text())["layers"]["fuse"]["inputs"][0]
    again = tmp_path / "again"
    assert main(["compile", str(tmp_path / "m.onnx"), "--plan", str(out / "plan.json"), "-o", str(again)]) == 0
    assert main(["run", str(again), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "z.npz")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "z.npz")["y"], got)
    assert main(["export-qdq", str(tmp_path / "m.onnx"), "--plan", str(out / "plan.json"),
                 "-o", str(tmp_path / "q.onnx")]) == 0
    q = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert 16.0 <= _sqnr(q, ref) <= _sqnr(got, ref) - 6.0  # the channels' ranges joined, per tensor


def test_the_planted_outlier_channel_is_harmless_per_channel():
    """test_precision's sensitive model (conv1's input has one channel 300x the others, read with
    1/300 the weight): per tensor, all-int8 misses 30 dB and the search keeps conv1 float; with the
    default per-channel choice, conv1's input is per channel and all-int8 clears it."""
    from test_precision import sensitive_model

    rng = np.random.default_rng(6)
    samples = [{"x": rng.normal(0, 1, (1, 4, 8, 8)).astype(np.float32)} for _ in range(12)]
    default, per_tensor = Compiled(sensitive_model(), samples), Compiled(sensitive_model(), samples, PER_TENSOR)
    assert default.plan.layers["conv1"].inputs[0].per_channel
    for x in (rng.normal(0, 1, (1, 4, 8, 8)).astype(np.float32) for _ in range(4)):
        ref = np.asarray(default.fp32(x)[0])
        assert _sqnr(np.asarray(per_tensor.int8(x)[0]), ref) < 30.0 <= _sqnr(np.asarray(default.int8(x)[0]), ref)
