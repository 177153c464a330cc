"""Precision per layer: sensitivity, budgets, the plan search, overrides, the report and eval."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from onnx import helper

from conftest import make_model, random_samples, sqnr_db
from tvmq import metrics as M
from tvmq import plan_search as PS
from tvmq import sensitivity as S
from tvmq.compile import compile_model
from tvmq.config import DEFAULT_MIN_SQNR, AutoPrecision, LayerRule, QuantConfig, load_rules
from tvmq.errors import TvmqError
from tvmq.plan import QuantPlan
from tvmq.targets import get_preset
from tvmq.runtime import Bundle

OUTLIER = 300.0


def sensitive_model(seed=0):
    """conv0 -> relu -> conv1 -> relu -> conv2, where conv1's input has one channel 300x larger
    than the rest (and conv1 reads it with 1/300 the weight): quantizing conv1's input per tensor
    wipes out the other channels, so conv1 alone is sensitive."""
    rng = np.random.default_rng(seed)
    w0 = rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)
    w0[0] *= OUTLIER
    b0 = rng.uniform(0.05, 0.2, 8).astype(np.float32)
    w1 = rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    w1[:, 0] /= OUTLIER
    w2 = rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    conv = dict(kernel_shape=[3, 3], pads=[1] * 4)
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", **conv),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", **conv),
    ]
    return make_model(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 8, 8, 8])], [("w0", w0), ("b0", b0), ("w1", w1), ("w2", w2)])


@pytest.fixture(autouse=True)
def _per_tensor_activations(monkeypatch):
    """The layers this module plants are sensitive with per-tensor activations; per-channel ones
    take the outlier channel into conv1's weights and make it harmless (test_channel_activations),
    so the search is tested on the per-tensor plans."""
    import tvmq.quantize

    monkeypatch.setattr(tvmq.quantize, "per_channel_inputs", lambda plan, *args, **kwargs: plan)


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory):
    import onnx

    d = tmp_path_factory.mktemp("sensitive")
    onnx.save(sensitive_model(), d / "model.onnx")
    calib = d / "calib"
    calib.mkdir()
    for i, s in enumerate(random_samples([1, 4, 8, 8], n=12, seed=3)):
        np.save(calib / f"{i}.npy", s["x"])
    return d


def _bundle_sqnr(bundle_dir, model_dir):
    """SQNR of the compiled bundle vs the FP32 model on the calibration samples."""
    from tvmq.compile import quantized_module
    from tvmq.execute import HostModule
    from tvmq.targets import get_preset

    fp32 = HostModule(quantized_module(model_dir / "model.onnx", get_preset("x86"), precision="fp32").module)
    bundle = Bundle(bundle_dir)
    xs = [np.load(p) for p in sorted((model_dir / "calib").glob("*.npy"))]
    ref = np.concatenate([fp32(x)[0].ravel() for x in xs])
    out = np.concatenate([bundle.run({"x": x})["y"].ravel() for x in xs])
    return sqnr_db(ref, out)


@pytest.fixture
def steady_timing(monkeypatch):
    """Kernel and whole-model timings that do not depend on this machine's load: every int8
    kernel twice as fast as its fp32 one, and the more int8 layers a candidate has, the faster.
    The tests then check the search and the budget; measured timings are the benchmark's job."""
    import tvmq.precision
    import tvmq.sensitivity

    measure = tvmq.sensitivity.layer_latency

    def layer_latency(float_mod, plan, analysis, preset):
        measure(float_mod, plan, analysis, preset)  # still runs: the report shows its figures
        for layer in analysis.layers:
            layer.fp32_ms, layer.int8_ms, layer.boundary_ms = 1.0, 0.5, 0.01

    def race(candidates, **_):
        for c in candidates:
            c.ms = 1.0 / (1 + c.plan.count("int8"))

    monkeypatch.setattr(tvmq.sensitivity, "layer_latency", layer_latency)
    monkeypatch.setattr(tvmq.precision, "_race", race)


def test_budget_respected_on_a_model_with_a_sensitive_layer(sensitive, tmp_path, steady_timing):
    out = tmp_path / "auto"
    compile_model(sensitive / "model.onnx", out, calib=sensitive / "calib", precision="auto",
                  auto=AutoPrecision(metric="sqnr", min_sqnr=30.0))
    manifest = json.loads((out / "manifest.json").read_text())
    p = manifest["precision"]
    layers = {l["name"]: l for l in p["layers"]}
    # the analysis finds the planted layer: by far the worst alone, and the one that all-int8 lacks
    assert min(layers, key=lambda n: layers[n]["only_int8"]) == "conv1"
    assert layers["conv1"]["only_int8"] < 20 < 30 < min(layers["conv0"]["only_int8"], layers["conv2"]["only_int8"])
    assert p["all_int8"] < 30.0
    assert p["assignment"] == {"conv0": "int8", "conv1": "fp32", "conv2": "int8"}
    assert {k: v["precision"] for k, v in manifest["layers"].items()} == p["assignment"]
    # the budget holds for the compiled integer program itself, not only the simulation
    assert _bundle_sqnr(out, sensitive) >= 30.0
    integer = [k for k in manifest["kernels"] if k["accumulator"] == "int32"]
    operand = get_preset("x86").micro_kernel.operand_dtype  # uint8, or int16 where vpmaddwd reads it widened
    assert len(integer) == 2 and all(k["operands"] == [operand, "int8"] for k in integer)
    # and an all-int8 build of the same model misses it
    allq = tmp_path / "int8"
    compile_model(sensitive / "model.onnx", allq, calib=sensitive / "calib")
    assert _bundle_sqnr(allq, sensitive) < 30.0
    # report: html with its charts, markdown with the same plan
    html = (out / "report.html").read_text()
    for png in ("sensitivity.png", "latency.png", "tradeoff.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png in html
    section = (out / "report.md").read_text().split("## Precision plan")[1]
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in section.splitlines()
            if line.startswith("| conv")}
    assert rows == p["assignment"]


def test_a_user_metric_and_labels_drive_the_budget(sensitive, tmp_path, monkeypatch, steady_timing):
    """python:module:function with labels: the drop in the user's score is what is budgeted."""
    (tmp_path / "usermetric.py").write_text(
        "import numpy as np\n"
        "def mean_abs_err(outputs, labels):\n"
        "    return -float(np.mean([np.abs(o - l).mean() for o, l in zip(outputs, labels)]))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "eval"
    data.mkdir()
    xs = [np.load(p) for p in sorted((sensitive / "calib").glob("*.npy"))]
    from tvmq.compile import quantized_module
    from tvmq.execute import HostModule
    from tvmq.targets import get_preset

    fp32 = HostModule(quantized_module(sensitive / "model.onnx", get_preset("x86"), precision="fp32").module)
    labels = np.stack([fp32(x)[0] for x in xs])  # the FP32 outputs are the "ground truth" here
    for i, x in enumerate(xs):
        np.save(data / f"{i:02d}.npy", x)
    np.save(data / "labels.npy", labels)
    out = tmp_path / "b"
    budget = 0.05 * float(np.mean(np.abs(labels)))
    compile_model(sensitive / "model.onnx", out, calib=sensitive / "calib", precision="auto",
                  auto=AutoPrecision(metric="python:usermetric:mean_abs_err", max_drop=budget, eval_data=data))
    p = json.loads((out / "manifest.json").read_text())["precision"]
    assert p["assignment"]["conv1"] == "fp32" and p["assignment"]["conv0"] == "int8"
    assert p["fp32"] - p["plan"] <= budget < p["fp32"] - p["all_int8"]


def _fake_analysis(layers, fp16=False):
    """An Analysis whose simulation adds the layers' noise powers (the search's own model)."""
    wide = tuple(l.name for l in layers if l.only_int16 is not None)
    a = S.Analysis(M.Metric("sqnr"), float("inf"), 0.0, layers=layers, names=[l.name for l in layers], fp16=fp16,
                   wide=wide)

    def evaluate(assignment):
        if not isinstance(assignment, dict):
            assignment = {n: "int8" for n in assignment}
        noise = sum(10 ** (-l.alone(assignment[l.name]) / 10)
                    for l in layers if assignment.get(l.name, "fp32") != "fp32")
        return float("inf") if noise == 0 else -10 * np.log10(noise)

    a.evaluate = evaluate
    a.all_int8 = evaluate([l.name for l in layers])
    return a


@pytest.mark.parametrize("seed", range(6))
def test_exact_search_is_optimal_and_never_slower_than_greedy_or_fallback(seed):
    rng = np.random.default_rng(seed)
    fp16, wide = seed % 2 == 1, seed % 3 != 0
    layers = []
    for i in range(7):
        fp32_ms = float(rng.uniform(0.1, 2.0))
        layers.append(S.LayerInfo(f"l{i}", "conv2d", only_int8=float(rng.uniform(25, 50)), only_float=0.0,
                                  only_fp16=float(rng.uniform(55, 70)) if fp16 else None,
                                  int8_ms=fp32_ms * float(rng.uniform(0.2, 0.6)), fp32_ms=fp32_ms,
                                  fp16_ms=fp32_ms * 0.6 if fp16 else None,
                                  only_int16=float(rng.uniform(40, 60)) if wide and i % 3 else None,
                                  int16_ms=fp32_ms * float(rng.uniform(0.4, 0.9)) if wide and i % 3 else None))
    a = _fake_analysis(layers, fp16)
    budget = 34.0
    exact, value = PS.search(a, budget, "exact")
    greedy, _ = PS.search(a, budget, "greedy")
    fallback, _, _ = PS.fallback_plan(a, budget)
    assert value >= budget
    def allowed(layer):
        return ["fp32", *(p for p in a.candidates if layer.alone(p) is not None)]

    best = min(PS.latency(a, dict(zip([l.name for l in layers], combo)))
               for combo in itertools.product(*map(allowed, layers))
               if a.evaluate(dict(zip([l.name for l in layers], combo))) >= budget)
    assert PS.latency(a, exact) <= best * 1.01  # knapsack on a discretized budget: within 1%
    assert PS.latency(a, exact) <= PS.latency(a, greedy) + 1e-9
    assert PS.latency(a, exact) <= PS.latency(a, fallback) + 1e-9


def test_int16_takes_the_layers_that_int8_breaks_where_it_beats_float():
    """A layer whose int8 alone breaks the budget goes to int8 on 16-bit activations when that
    holds it and is faster than float; one where 16 bits are no faster than float stays float."""
    layers = [S.LayerInfo("stem", "conv2d", only_int8=14.0, only_float=0.0, int8_ms=0.3, fp32_ms=1.0,
                          only_int16=45.0, int16_ms=0.5),
              S.LayerInfo("slow16", "conv2d", only_int8=15.0, only_float=0.0, int8_ms=0.3, fp32_ms=1.0,
                          only_int16=45.0, int16_ms=1.3),
              S.LayerInfo("body", "conv2d", only_int8=30.0, only_float=0.0, int8_ms=0.2, fp32_ms=0.8,
                          only_int16=50.0, int16_ms=0.4)]
    a = _fake_analysis(layers)
    assert a.candidates == ("int8", "int16")
    assignment, value = PS.search(a, 20.0, "exact")
    assert assignment == {"stem": "int16", "slow16": "fp32", "body": "int8"}
    assert value >= 20.0


def test_layer_latency_counts_the_kernels_fusion_left_after_it():
    """A float conv whose swish runs as a kernel of its own is charged for it, as the int8 conv
    that fused it is; the input's quantization goes to the first layer."""
    measured = {"quantize": 1.0, "conv_a": 10.0, "sigmoid": 3.0, "conv_b": 20.0, "pad": 0.5, "head": 2.0}
    calls = ["quantize", "conv_a", "sigmoid", "conv_b", "pad", "conv_a", "head"]
    assert S._attribute(calls, {"conv_a", "conv_b"}, measured) == [11.0 + 3.0, 20.5, 12.0]
    assert S._attribute(["conv_a"], {"conv_a"}, measured) == [10.0]


def test_a_seed_plan_gives_back_the_int8_layers_that_are_slower_than_float():
    """The fallback quantizes every layer it did not put back in float, even one whose int8 kernel is slower than
    its float one; the exact search starting from it returns that layer to float when the budget still holds."""
    layers = [S.LayerInfo("culprit", "conv2d", 60, 0, int8_ms=0.2, fp32_ms=1.0),
              S.LayerInfo("slow", "conv2d", 60, 0, int8_ms=0.5, fp32_ms=0.3),
              S.LayerInfo("fast", "conv2d", 60, 0, int8_ms=0.1, fp32_ms=0.9)]
    a = S.Analysis(M.Metric("python:none:none"), 100.0, 0.0, layers=layers, names=[l.name for l in layers])
    a.evaluate = lambda assignment: 100.0 if assignment.get("culprit", "fp32") == "fp32" else 98.0
    a.all_int8 = 98.0
    seed = {"culprit": "fp32", "slow": "int8", "fast": "int8"}
    chosen, value = PS.search(a, 0.3, seeds=[seed], max_evaluations=2)
    assert value == 100.0 and chosen == {"culprit": "fp32", "slow": "fp32", "fast": "int8"}
    assert PS.latency(a, chosen) < PS.latency(a, seed)


def test_a_layer_that_loses_a_sample_alone_is_still_tried_with_the_plan_around_it():
    """Exact match on 150 samples: ``big`` alone in int8 loses a borderline sample that the
    quantized ``helper`` wins back (as PP-OCR's recogniser does); ``s1`` loses one in any plan.
    The fallback puts ``big`` and ``s1`` in float; the search starts from it and finds that
    ``big`` can be int8 after all, a plan faster than the fallback's."""
    layers = [S.LayerInfo("big", "conv2d", 100 - 100 / 150, 0, sqnr_int8=20.0, int8_ms=0.2, fp32_ms=1.0),
              S.LayerInfo("s1", "conv2d", 100 - 100 / 150, 0, sqnr_int8=25.0, int8_ms=0.1, fp32_ms=0.3),
              S.LayerInfo("helper", "conv2d", 100.0, 0, sqnr_int8=35.0, int8_ms=0.1, fp32_ms=0.3),
              S.LayerInfo("other", "conv2d", 100.0, 0, sqnr_int8=40.0, int8_ms=0.1, fp32_ms=0.3)]
    a = S.Analysis(M.Metric("python:none:none"), 100.0, 0.0, layers=layers, names=[l.name for l in layers])

    def evaluate(assignment):
        if not isinstance(assignment, dict):
            assignment = {n: "int8" for n in assignment}
        q = {n: assignment.get(n, "fp32") == "int8" for n in a.names}
        lost = int(q["s1"]) + int(q["big"] and not q["helper"])
        return 100.0 - lost * 100 / 150

    a.evaluate = evaluate
    a.all_int8 = evaluate(a.names)
    fallback, value, _ = PS.fallback_plan(a, 0.3)
    assert value == 100.0 and fallback == {"big": "fp32", "s1": "fp32", "helper": "int8", "other": "int8"}
    chosen, value = PS.search(a, 0.3, seeds=[fallback])
    assert value == 100.0 and chosen == {"big": "int8", "s1": "fp32", "helper": "int8", "other": "int8"}
    assert PS.latency(a, chosen) < PS.latency(a, fallback)


def test_slower_int8_kernels_stay_float_and_ties_go_to_int8():
    layers = [S.LayerInfo("fast", "conv2d", 60, 0, int8_ms=0.2, fp32_ms=1.0),
              S.LayerInfo("noise", "conv2d", 60, 0, int8_ms=1.05, fp32_ms=1.0),  # within 10%: a tie
              S.LayerInfo("slow", "matmul", 60, 0, int8_ms=2.0, fp32_ms=1.0)]
    chosen, _ = PS.search(_fake_analysis(layers), 30.0)
    assert chosen == {"fast": "int8", "noise": "int8", "slow": "fp32"}


def test_override_rules_from_a_file_first_match_wins(tmp_path, sensitive):
    cfg = tmp_path / "rules.toml"
    cfg.write_text('[[rules]]\nname = "conv2"\nprecision = "int8"\n\n'
                   '[[rules]]\nop = "conv2d"\nname = "conv[12]"\nprecision = "fp32"\n\n'
                   '[[rules]]\nname = "conv0"\nprecision = "fp16"\n')
    rules = load_rules(cfg)
    assert rules == (LayerRule(name="conv2", precision="int8"), LayerRule(op="conv2d", name="conv[12]", precision="fp32"),
                     LayerRule(name="conv0", precision="fp16"))
    out = tmp_path / "b"
    compile_model(sensitive / "model.onnx", out, calib=sensitive / "calib", config=QuantConfig(rules=rules))
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v["precision"] for k, v in manifest["layers"].items()} == {"conv0": "fp16", "conv1": "fp32", "conv2": "int8"}
    kernels = {tuple(k["operands"]) for k in manifest["kernels"]}
    assert kernels == {("float16", "float16"), ("float32", "float32"), ("uint8", "int8")}
    (tmp_path / "bad.json").write_text('{"rules": [{"name": "x", "precision": "int4"}]}')
    with pytest.raises(ValueError, match="rule 1"):
        load_rules(tmp_path / "bad.json")


def test_plan_round_trips_through_json_and_rebuilds_the_same_library(sensitive, tmp_path):
    a = tmp_path / "a"
    compile_model(sensitive / "model.onnx", a, calib=sensitive / "calib", precision="auto",
                  auto=AutoPrecision(metric="sqnr", min_sqnr=30.0))
    text = (a / "plan.json").read_text()
    plan = QuantPlan.loads(text)
    assert QuantPlan.loads(plan.dumps()) == plan and plan.dumps() + "\n" == text
    b = tmp_path / "b"
    compile_model(sensitive / "model.onnx", b, plan=a / "plan.json")
    assert (a / "model.so").read_bytes() == (b / "model.so").read_bytes()


def test_fp16_precision_computes_in_half(tmp_path, sensitive):
    out = tmp_path / "h"
    res = compile_model(sensitive / "model.onnx", out, precision="fp16")
    kernels = json.loads((out / "manifest.json").read_text())["kernels"]
    assert [tuple(k["operands"]) for k in kernels] == [("float16", "float16")] * 3
    assert all(k["accumulator"] == "float32" for k in kernels)
    assert any("no fast fp16" in w for w in res.warnings)
    # fp16 operands, fp32 accumulation: relative error near fp16's 2^-11 per operand
    assert _bundle_sqnr(out, sensitive) > 50


def test_fp16_candidate_in_the_simulation(sensitive):
    """With fp16 as a candidate, the sensitive layer is nearly harmless in fp16."""
    from tvmq.frontend import load_onnx
    from tvmq.quantize import calibrate, prepare

    import onnx

    mod, _ = load_onnx(onnx.load(sensitive / "model.onnx"))
    float_mod = prepare(mod)
    samples = random_samples([1, 4, 8, 8], n=6, seed=3)
    plan = calibrate(float_mod, samples, input_names=["x"])
    a = S.analyse(float_mod, plan, samples, ["x"], M.Metric("sqnr"), measure_latency=False, fp16=True)
    conv1 = next(l for l in a.layers if l.name == "conv1")
    assert conv1.only_int8 < 20 and conv1.only_fp16 > 50
    assert a.evaluate({"conv1": "fp16", "conv0": "int8", "conv2": "int8"}) > 30


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tvmq", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_cli_budget_errors_are_one_line(tmp_path, sensitive):
    model = str(sensitive / "model.onnx")
    cases = [
        (["--precision", "auto", "--metric", "top1"], "needs --max-drop"),
        (["--max-drop", "1"], "add --precision auto"),
        (["--precision", "auto", "--metric", "python:nosuchmod:f", "--max-drop", "1"], "cannot be loaded"),
        (["--precision", "auto", "--metric", "f1", "--max-drop", "1"], "unknown metric"),
        (["--precision", "auto", "--min-sqnr", "30", "--max-drop", "1"], "give one budget"),
        (["--precision", "auto", "--metric", "top1", "--max-drop", "1"], "needs labels"),
        (["--config", str(tmp_path / "missing.toml")], "cannot be read"),
    ]
    for extra, message in cases:
        out = tmp_path / "o"
        r = _cli("compile", model, "-o", str(out), "--calib", str(sensitive / "calib"), *extra)
        assert r.returncode == 2, (extra, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (extra, r.stderr)
        assert not out.exists()


def test_eval_command_reports_fp32_vs_bundle(tmp_path, sensitive):
    out = tmp_path / "b"
    r = _cli("compile", str(sensitive / "model.onnx"), "-o", str(out), "--calib", str(sensitive / "calib"),
             "--precision", "auto", "--min-sqnr", "30")
    assert r.returncode == 0, r.stderr
    r = _cli("eval", str(out), "--model", str(sensitive / "model.onnx"), "--data", str(sensitive / "calib"), "--repeat", "5")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("plan (bundle)"))
    assert float(row.split()[2]) >= 30.0  # "plan (bundle)  NN.NN dB  x.xxx ms"
    r = _cli("eval", str(out), "--data", str(sensitive / "calib"))
    assert r.returncode == 2 and r.stderr.startswith("error: pass --model")


def test_discrete_metric_budget_is_searched_on_measurements_not_assumed():
    """Exact-match accuracy: no layer alone loses a sample, together they lose several. The
    additive model would either take every layer (and miss) or none; the allowance search finds
    the fastest plan that measures within budget."""
    rng = np.random.default_rng(7)
    layers = [S.LayerInfo(f"l{i}", "conv2d", only_int8=100.0, only_float=0.0, sqnr_int8=float(rng.uniform(30, 45)),
                          int8_ms=0.3, fp32_ms=1.0 + i * 0.1) for i in range(12)]
    a = S.Analysis(M.Metric("python:none:none"), 100.0, 0.0, layers=layers, names=[l.name for l in layers])

    def evaluate(assignment):
        if not isinstance(assignment, dict):
            assignment = {n: "int8" for n in assignment}
        noise = sum(10 ** (-l.sqnr_int8 / 10) for l in layers if assignment.get(l.name) == "int8")
        return 100.0 - np.floor(noise * 2e3) * (100 / 150)  # samples flip as the noise grows

    a.evaluate = evaluate
    a.all_int8 = evaluate([l.name for l in layers])
    assert 100 - a.all_int8 > 0.3
    chosen, value = PS.search(a, 0.3)
    assert 100 - value <= 0.3
    n_int8 = sum(p == "int8" for p in chosen.values())
    assert 0 < n_int8 < len(layers)
    fallback, _, _ = PS.fallback_plan(a, 0.3)
    assert PS.latency(a, chosen) <= PS.latency(a, fallback)


def _auto_with_candidate(candidate_class, sensitive, tmp_path, monkeypatch):
    """``--precision auto`` (min SQNR 30) on the sensitive model with compiled candidates made by
    ``candidate_class``: the manifest's precision section and the bundle folder."""
    import tvmq.precision

    monkeypatch.setattr(tvmq.precision, "_Candidate", candidate_class)
    out = tmp_path / "auto"
    compile_model(sensitive / "model.onnx", out, calib=sensitive / "calib", precision="auto",
                  auto=AutoPrecision(metric="sqnr", min_sqnr=30.0))
    return json.loads((out / "manifest.json").read_text())["precision"], out


def test_an_exact_plan_that_misses_as_an_integer_program_is_repaired(sensitive, tmp_path, monkeypatch, steady_timing):
    """The simulation and the integer program can disagree by a rounding; when a proposal's integer program (the
    exact plan's, the fallback's) misses the budget, its most sensitive int8 layers go back to float one at a time
    until it meets it."""
    import tvmq.precision

    real = tvmq.precision._Candidate

    class Disagreeing(real):
        """The integer program misses whenever conv0 and conv2 are both int8 (the simulation does not)."""

        def __init__(self, float_mod, plan, *args):
            super().__init__(float_mod, plan, *args)
            if all(plan.layers[n].is_int8 for n in ("conv0", "conv2")):
                self.metric = 0.0

    p, _ = _auto_with_candidate(Disagreeing, sensitive, tmp_path, monkeypatch)
    # The search proposes conv1 alone in float (the other tests' plan); repaired, one more layer is float.
    assert p["chosen_from"] == "exact search" and p["race"]["exact search"]["passes"]
    assert p["assignment"]["conv1"] == "fp32" and sorted(p["assignment"].values()) == ["fp32", "fp32", "int8"]
    # The INC-style fallback is judged on its integer program too, as INC judges the quantized model.
    fallback = p["race"]["fallback (INC-style)"]
    assert fallback["passes"] and fallback["repaired_layers"] == 1
    assert sorted(p["fallback"]["assignment"].values()) == ["fp32", "fp32", "int8"]


def test_the_winners_float_layers_are_tried_again_as_integer_programs(sensitive, tmp_path, monkeypatch, steady_timing):
    """The simulation keeps conv1 in float (its SQNR alone breaks the budget); when its integer program says
    otherwise (here: every integer program meets it), the refinement quantizes it, races the result against the
    winner and keeps the faster plan, which the report shows."""
    import tvmq.precision

    real = tvmq.precision._Candidate

    class Generous(real):
        def __init__(self, *args):
            super().__init__(*args)
            self.metric = 99.0

    p, out = _auto_with_candidate(Generous, sensitive, tmp_path, monkeypatch)
    assert p["refined_layers"] == ["conv1"] and p["chosen_from"] == "refined"
    assert set(p["assignment"].values()) == {"int8"} and p["refined"]["int8_layers"] == 3
    assert "refined on integer programs (+1 quantized)" in (out / "report.md").read_text()


@pytest.mark.parametrize("preset, measured", [("x86-avx2", True), ("rpi4", False), ("arm", False)])
def test_layer_latency_is_measured_on_presets_this_cpu_runs_and_estimated_per_isa_elsewhere(sensitive, preset, measured):
    """An AVX2 build runs here, so its kernels are timed (an AVX2-only host used to get a MAC count with the same
    figure for int8 and fp32, and every plan tied); a board's are estimated from MACs at its ISA's int8/fp32 rate:
    widening smull+sadalp about as fast as fp32, sdot four times."""
    from tvmq.compile import quantized_module
    from tvmq.quantize import calibrate
    from tvmq.targets import get_preset

    p = get_preset(preset)
    float_mod = quantized_module(sensitive / "model.onnx", p, precision="fp32").module
    samples = [{"x": np.load(f)} for f in sorted((sensitive / "calib").glob("*.npy"))]
    plan = calibrate(float_mod, samples, target=preset, input_names=["x"])
    a = S.Analysis(M.Metric("sqnr"), 100.0, 0.0, layers=[S.LayerInfo(n, plan.layers[n].kind, 0, 0) for n in plan.layers],
                   names=list(plan.layers))
    S.layer_latency(float_mod, plan, a, p)
    assert all(l.estimated != measured and l.int8_ms > 0 and l.fp32_ms > 0 for l in a.layers)
    if not measured:
        assert [l.fp32_ms / l.int8_ms for l in a.layers] == pytest.approx([p.micro_kernel.int8_speedup] * len(a.layers))
        assert all(l.boundary_ms > 0 for l in a.layers)  # a float layer amid int8 pays for conversions


def test_cross_target_estimate_knows_where_the_isas_int8_does_not_pay():
    """The estimate for a target this machine cannot time follows the ISA's rules: on AVX2
    (vpmaddwd, no dot product) a depthwise conv, reductions of 27 and 16 and a one-pixel conv are
    estimated slower in int8 than in float, a 64-long reduction faster; with VNNI none of them;
    conversions scale with the tensors a layer reads and writes."""
    from tvmq.frontend import load_onnx
    from tvmq.passes.layers import find_layers
    from tvmq.quantize import prepare

    mod, _ = load_onnx(mobile_block_model())
    layers = {l.name: l for l in find_layers(prepare(mod)["main"])}
    for preset, slower in (("x86-avx2", {"stem", "dw", "expand", "head"}), ("x86-avx512vnni", set())):
        est = {n: S.estimated_ms(l, get_preset(preset)) for n, l in layers.items()}
        assert {n for n, (fp32, int8, _) in est.items() if int8 > fp32} == slower, preset
        assert all(b == pytest.approx(S.CONVERSION_MACS * layers[n].io_elements * 1e-6) for n, (_, _, b) in est.items())


# --- the default plan keeps float the layers whose int8 kernel is no faster on the ISA ---------


def mobile_block_model(seed=0):
    """What mobile CNNs are made of: stem conv 3x3 (3 -> 16, reduction 27), depthwise 3x3, 1x1
    expand 16 -> 64 (reduction 16), 1x1 project 64 -> 32 (reduction 64), global pool -> 1x1 conv
    on the pooled map (one pixel: a squeeze-excite gate / classifier head)."""
    rng = np.random.default_rng(seed)
    shapes = {"stem": (16, 3, 3, 3), "dw": (16, 1, 3, 3), "expand": (64, 16, 1, 1), "project": (32, 64, 1, 1),
              "head": (8, 32, 1, 1)}
    inits = []
    for name, shape in shapes.items():
        inits += [(f"{name}_w", rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape).astype(np.float32)),
                  (f"{name}_b", rng.normal(0, 0.1, shape[0]).astype(np.float32))]
    conv3 = dict(kernel_shape=[3, 3], pads=[1] * 4)
    nodes = [
        helper.make_node("Conv", ["x", "stem_w", "stem_b"], ["s"], name="stem", **conv3),
        helper.make_node("Relu", ["s"], ["s_r"], name="stem_relu"),
        helper.make_node("Conv", ["s_r", "dw_w", "dw_b"], ["d"], name="dw", group=16, **conv3),
        helper.make_node("Relu", ["d"], ["d_r"], name="dw_relu"),
        helper.make_node("Conv", ["d_r", "expand_w", "expand_b"], ["e"], name="expand"),
        helper.make_node("Relu", ["e"], ["e_r"], name="expand_relu"),
        helper.make_node("Conv", ["e_r", "project_w", "project_b"], ["p"], name="project"),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="pool"),
        helper.make_node("Conv", ["g", "head_w", "head_b"], ["y"], name="head"),
    ]
    return make_model(nodes, [("x", [1, 3, 16, 16])], [("y", [1, 8, 1, 1])], inits)


def _plan(model, config=None, target="x86-avx2"):
    from tvmq.frontend import load_onnx
    from tvmq.quantize import calibrate, prepare

    mod, _ = load_onnx(model)
    mod = prepare(mod)
    return calibrate(mod, random_samples([1, 3, 16, 16], n=2), config, target=target, input_names=["x"])


def _precisions(plan):
    from tvmq.passes.layers import find_layers  # noqa: F401  (names are the ONNX node names)

    return {name: lp.precision for name, lp in plan.layers.items() if lp.kind != "add"}


@pytest.mark.parametrize("target, int8", [
    ("x86-avx2", {"project"}),  # vpmaddwd: reductions >= 32
    ("x86-avx512", {"project"}),
    ("x86-avx512vnni", {"stem", "dw", "expand", "project", "head"}),  # vpdpbusd: reductions >= 16
    ("rpi4", {"stem", "dw", "expand", "project", "head"}),  # not timed on the ISA: every layer
])
def test_default_plan_keeps_float_where_int8_does_not_pay(target, int8):
    """Short reductions stay float on x86, and on the widening ISAs depthwise and one-pixel convs
    too (measured slower there: scripts/int8_breakeven.py, scripts/zoo.py); the plan says which."""
    plan = _plan(mobile_block_model(), target=target)
    precisions = _precisions(plan)
    assert {n for n, p in precisions.items() if p == "int8"} == int8
    assert set(plan.kept_float) == set(precisions) - int8
    assert QuantPlan.loads(plan.dumps()).kept_float == plan.kept_float


def test_int8_everywhere_and_rules_override_the_speed_rule():
    everywhere = _precisions(_plan(mobile_block_model(), QuantConfig(int8_everywhere=True)))
    assert set(everywhere.values()) == {"int8"}
    ruled = _plan(mobile_block_model(), QuantConfig(rules=(LayerRule(name="dw", precision="int8"),)))
    assert _precisions(ruled)["dw"] == "int8" and "dw" not in ruled.kept_float
    assert _precisions(ruled)["expand"] == "fp32" and "expand" in ruled.kept_float


def test_int8_pays_thresholds():
    from tvmq.targets.intrinsics import MICRO_KERNELS, int8_pays

    avx2 = MICRO_KERNELS["pmaddwd256"]
    assert not int8_pays(avx2, avx2.min_reduction - 1, False, 100)
    assert int8_pays(avx2, avx2.min_reduction, False, 100)
    assert not int8_pays(avx2, 9, True, 100) and not int8_pays(avx2, 512, False, 1)
    assert int8_pays(avx2, 512, False)  # a matmul: no pixel rule
    assert int8_pays(None, 1, True, 1)  # no micro-kernel: nothing to decide with


def test_compile_reports_layers_kept_float(tmp_path):
    import onnx

    onnx.save(mobile_block_model(), tmp_path / "m.onnx")
    samples = random_samples([1, 3, 16, 16], n=2)
    result = compile_model(tmp_path / "m.onnx", tmp_path / "out", target="x86-avx2", calib=samples)
    q = result.manifest["quantization"]
    assert set(q["kept_float_for_speed"]) == {"stem", "dw", "expand", "head"} and q["int8_layers"] == 1
    assert "kept float where int8 is no faster on `pmaddwd256`" in (tmp_path / "out" / "report.md").read_text()
    proc = subprocess.run([sys.executable, "-m", "tvmq", "compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o2"),
                           "--target", "x86-avx2", "--calib", str(_calib_dir(tmp_path, samples)), "--int8-everywhere"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert m["quantization"]["int8_layers"] == 5 and m["quantization"]["kept_float_for_speed"] == []
    assert "kept" not in proc.stdout


def _calib_dir(tmp_path, samples):
    d = tmp_path / "calib"
    d.mkdir(exist_ok=True)
    for i, s in enumerate(samples):
        np.save(d / f"{i}.npy", s["x"])
    return d


# --- every output counts --------------------------------------------------------------------


def test_sqnr_and_cosine_judge_each_output_apart():
    """A small, damaged output (a detector's scores) must not hide behind a large, accurate one
    (its boxes): the worst output is the metric, not the concatenation."""
    rng = np.random.default_rng(0)
    big = [rng.normal(0, 100, 64) for _ in range(4)]
    small = [rng.normal(0, 1, 16) for _ in range(4)]
    out = [(b + rng.normal(0, 0.01, 64), s + rng.normal(0, 0.5, 16)) for b, s in zip(big, small)]
    ref = list(zip(big, small))
    worst = M.sqnr_db([o[1] for o in out], small)
    assert M.Metric("sqnr")(out, ref) == pytest.approx(worst) and worst < 10
    assert M.sqnr_db([np.concatenate(o) for o in out], [np.concatenate(r) for r in ref]) > 40  # what hid it
    assert M.Metric("cosine")(out, ref) == pytest.approx(M.Metric("cosine")([o[1] for o in out], small))
    labels = [int(np.argmax(b)) for b in big]
    assert M.Metric("top1")(out, ref, labels) == 1.0  # top1 reads the first output


def test_precision_search_sees_every_output():
    """The simulation reports every output: a second, accurate output does not lift conv1's
    damage to the first one out of sight."""
    import onnx
    from onnx import helper as h

    from tvmq.frontend import load_onnx
    from tvmq.quantize import calibrate, prepare

    model = sensitive_model()
    model.graph.node.append(h.make_node("Relu", ["r0"], ["big"], name="tap"))
    model.graph.output.append(h.make_tensor_value_info("big", onnx.TensorProto.FLOAT, [1, 8, 8, 8]))
    mod, _ = load_onnx(model)
    float_mod = prepare(mod)
    samples = random_samples([1, 4, 8, 8], n=6, seed=3)
    plan = calibrate(float_mod, samples, QuantConfig(int8_everywhere=True), input_names=["x"])
    a = S.analyse(float_mod, plan, samples, ["x"], M.Metric("sqnr"), measure_latency=False)
    assert all(len(r) == 2 for r in a.reference)
    outs = a.outputs(list(plan.layers))
    first, second = (M.sqnr_db([o[i] for o in outs], [r[i] for r in a.reference]) for i in (0, 1))
    assert a.all_int8 == pytest.approx(min(first, second)) and first < second


def yolo_head(tmp_path):
    """x [1,4,8,8] -> box conv -> x300 and class conv -> sigmoid -> Concat -> [1, 7, 64]. The
    input's channel 0 spans +-100 (the boxes read it), channels 1-3 +-1 (only the classes read
    them): int8 input steps of ~0.8 erase the classes' signal while the boxes stay accurate."""
    import onnx

    rng = np.random.default_rng(0)
    wb = rng.normal(0, 0.02, (4, 4, 1, 1)).astype(np.float32)
    wb[:, 0] = rng.uniform(0.5, 1, (4, 1, 1))
    wc = rng.normal(0, 2, (3, 4, 1, 1)).astype(np.float32)
    wc[:, 0] = 0
    nodes = [helper.make_node("Conv", ["x", "wb"], ["box"], name="box_conv", kernel_shape=[1, 1]),
             helper.make_node("Mul", ["box", "stride"], ["boxs"], name="box_scale"),
             helper.make_node("Conv", ["x", "wc"], ["cls"], name="cls_conv", kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["cls"], ["score"], name="cls_sigmoid"),
             helper.make_node("Concat", ["boxs", "score"], ["head"], name="head", axis=1),
             helper.make_node("Reshape", ["head", "shape"], ["y"], name="flatten")]
    model = make_model(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 7, 64])],
                       [("wb", wb), ("wc", wc), ("stride", np.float32(3)), ("shape", np.array([1, 7, 64], np.int64))])
    onnx.save(model, tmp_path / "yolo.onnx")
    samples = []
    for _ in range(8):
        x = rng.uniform(-1, 1, (1, 4, 8, 8)).astype(np.float32)
        x[:, 0] *= 100
        samples.append({"x": x})
    return tmp_path / "yolo.onnx", samples


def test_output_slices_parse_and_cut():
    names = ["output0", "scores"]
    s = M.parse_output_slice("output0:4:", names)
    assert (s.output, s.axis, s.start, s.stop) == (0, 1, 4, None)
    s = M.parse_output_slice("scores:-1:2:5", names)
    assert (s.output, s.axis, s.start, s.stop) == (1, -1, 2, 5)
    for bad in ("nosuch:4:", "output0:x:", "output0"):
        with pytest.raises(TvmqError, match="--output-slice"):
            M.parse_output_slice(bad, names)
    parts = M.OutputParts(("output0",), (M.parse_output_slice("output0:4:", names),))
    y = np.arange(2 * 7 * 3).reshape(2, 7, 3)
    whole, cut = parts((y,))
    assert parts.labels == ["output0", "output0:4:"] and whole is y and np.array_equal(cut, y[:, 4:])


def test_auto_judges_the_parts_of_a_final_concat_and_protects_the_class_scores(tmp_path, steady_timing):
    """A YOLO head's one output: judged whole, all-int8 passes the default budget on the boxes'
    range; judged per Concat input, the class scores miss it, so --precision auto (default
    budget, no flag) keeps the class conv float and the boxes int8."""
    from tvmq.compile import quantized_module
    from tvmq.frontend import load_onnx

    path, samples = yolo_head(tmp_path)
    mod, info = load_onnx(str(path))
    slices = M.concat_slices(mod["main"], ["y"])  # through the Reshape that keeps axis 1
    assert [(s.axis, s.start, s.stop) for s in slices] == [(1, 0, 4), (1, 4, 7)]
    qm = quantized_module(str(path), get_preset("x86"), raw=samples, precision="auto", auto=AutoPrecision(),
                          config=QuantConfig(int8_everywhere=True))  # 4-channel convs: int8 only when asked
    p = qm.precision
    assert p["budget"] == DEFAULT_MIN_SQNR == 17.0  # the default, stated in --help and the README
    boxes, scores = "y[:, 0:4]", "y[:, 4:7]"
    assert p["parts"]["all_int8"]["y"] >= 17 and p["parts"]["all_int8"][scores] < 17  # the damage hides
    assert p["assignment"] == {"box_conv": "int8", "cls_conv": "fp32"}
    assert min(p["parts"]["plan"][k] for k in ("y", boxes, scores)) >= 17
    # the class channels' own 8-bit grid moves no score beyond the budget: no sample is forgiven
    assert p["input_noise"] == 1.0 and p["held_samples"] == []
    from tvmq.report import precision_markdown

    assert "| y[:, 4:7] |" in precision_markdown(p)


def test_output_slice_flag_errors_are_one_line(tmp_path):
    path, samples = yolo_head(tmp_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, s in enumerate(samples):
        np.save(calib / f"{i}.npy", s["x"])
    for extra, message in ((["--precision", "auto", "--output-slice", "nosuch:4:"], "--output-slice 'nosuch:4:'"),
                           (["--output-slice", "y:4:"], "add --precision auto"),
                           (["--precision", "auto", "--metric", "top1", "--max-drop", "1", "--output-slice", "y:4:"],
                            "judged by sqnr or cosine"),
                           (["--input-noise", "1"], "add --precision auto"),
                           (["--clip-ranges"], "add --precision auto"),
                           (["--precision", "auto", "--input-noise", "-1"], "--input-noise -1.0 is not a finite")):
        out = tmp_path / "o"
        r = _cli("compile", str(path), "-o", str(out), "--calib", str(calib), *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
        assert not out.exists()


def test_clip_ranges_is_off_unless_asked():
    from tvmq.cli import build_parser
    from tvmq.commands import _auto_from_args

    parser = build_parser()
    base = ["compile", "m.onnx", "-o", "out", "--precision", "auto", "--min-sqnr", "20"]
    assert not AutoPrecision().clip_ranges
    assert not _auto_from_args(parser.parse_args(base)).clip_ranges
    assert _auto_from_args(parser.parse_args([*base, "--clip-ranges"])).clip_ranges


def test_a_sample_fp32_cannot_hold_is_held_to_its_own_stability():
    """Metric.slack: a sample whose FP32 output moves to 13 dB under input rounding is held to
    twice that noise (3 dB below), not to the 17 dB budget; a stable sample is held to 17."""
    sqnr, margin = M.Metric("sqnr"), 10 * np.log10(M.STABILITY_MARGIN)
    slack = sqnr.slack([(40.0,), (13.0,)], 17.0)
    assert slack[0] == (0.0,) and slack[1][0] == pytest.approx(17 - 13 + margin)
    ref = [np.ones(100), np.ones(100)]

    def at(db):  # an output whose SQNR vs ``ref`` is ``db``
        return np.ones(100) + np.sqrt(10 ** (-db / 10))

    assert M.sample_sqnr(at(11.0), ref[0]) == pytest.approx(11.0)
    assert sqnr([at(20.0), at(11.0)], ref, slack=slack) >= 17  # 11 dB >= 13 - 3
    assert sqnr([at(20.0), at(9.0)], ref, slack=slack) < 17
    assert sqnr([at(16.0), at(30.0)], ref, slack=slack) < 17  # the stable sample still binds
    assert sqnr([at(20.0), at(11.0)], ref) < 17  # without slack: the budget for every sample
    cosine = M.Metric("cosine")  # a cosine drop of 0.01 allowed; FP32 itself at 0.96: held to 0.92
    slack = cosine.slack([(1.0,), (0.96,)], 0.01)
    assert slack[0] == (0.0,) and slack[1][0] == pytest.approx(0.99 - 0.92)
    with pytest.raises(TvmqError, match="per-sample"):
        M.Metric("top1").slack([(1.0,)], 0.01)


def test_input_rounding_moves_each_image_channel_within_its_own_grid():
    """The noise FP32's stability is measured under: each channel of a 4-D float input within half
    a step of an 8-bit grid over that channel's range; other inputs untouched."""
    rng = np.random.default_rng(0)
    samples = [{"img": (rng.uniform(0, 1, (1, 3, 4, 4)) * np.array([1, 100, 0]).reshape(1, 3, 1, 1)).astype(np.float32),
                "audio": rng.normal(0, 1, (1, 64)).astype(np.float32), "ids": np.arange(5)} for _ in range(3)]
    seen = S.input_rounding_outputs(lambda *xs: xs, samples, ["img", "audio", "ids"], draws=2)
    assert len(seen) == 2 and len(seen[0]) == 3
    for draw in seen:
        for s, (img, audio, ids) in zip(samples, draw):
            moved = np.abs(img - s["img"]).max(axis=(0, 2, 3))
            width = [np.ptp([t["img"][:, c] for t in samples]) for c in range(3)]
            assert 0 < moved[0] <= width[0] / 510 * 1.0001 and moved[1] <= width[1] / 510 * 1.0001
            assert moved[1] > 10 * moved[0] and moved[2] == 0  # each channel its own step
            assert audio is s["audio"] and ids is s["ids"]
    again = S.input_rounding_outputs(lambda *xs: xs, samples, ["img", "audio", "ids"], draws=2)
    assert np.array_equal(again[1][2][0], seen[1][2][0])  # seeded


def knife_edge(tmp_path):
    """x [1,3,8,8] -> conv -> relu -> mean -> matmul (2 logits) -> x3000 -> softmax, and 8
    samples: 7 whose logits differ by > 0.5 (a certain class) and one on the tie between two of
    them, whose FP32 output swings between the classes when its pixels move by less than one
    8-bit step: its reading is not determined by the image, and any int8 layer moves it too."""
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    body = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1] * 4),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool"),
            helper.make_node("Flatten", ["g"], ["f"], name="flat"),
            helper.make_node("MatMul", ["f", "wh"], ["z"], name="head")]
    inits = [("w", rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)), ("b", rng.normal(0, 0.1, 8).astype(np.float32)),
             ("wh", rng.normal(0, 1, (8, 2)).astype(np.float32))]
    logits = ort.InferenceSession(make_model(body, [("x", [1, 3, 8, 8])], [("z", [1, 2])], inits).SerializeToString(),
                                  providers=["CPUExecutionProvider"])
    margin = lambda x: float(np.diff(logits.run(None, {"x": x})[0][0])[0])  # noqa: E731
    images = []
    for _ in range(60):  # 8-bit images, each channel around its own brightness
        x = np.clip(rng.uniform(0, 1, (1, 3, 1, 1)) + rng.normal(0, 0.15, (1, 3, 8, 8)), 0, 1)
        images.append((np.round(x * 255) / 255).astype(np.float32))
    margins = np.array([margin(x) for x in images])
    a, b = images[int(np.argmax(margins))], images[int(np.argmin(margins))]
    lo, hi = 0.0, 1.0
    for _ in range(50):  # the tie on the line between the two most certain images
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if margin((a + mid * (b - a)).astype(np.float32)) > 0 else (lo, mid)
    certain = [x for x, m in zip(images, margins) if m < -0.5][:4] + [x for x, m in zip(images, margins) if m > 0.5][:3]
    assert len(certain) == 7
    model = make_model(body + [helper.make_node("Mul", ["z", "t"], ["zt"], name="temperature"),
                               helper.make_node("Softmax", ["zt"], ["y"], name="softmax", axis=-1)],
                       [("x", [1, 3, 8, 8])], [("y", [1, 2])], inits + [("t", np.float32(3000))])
    onnx.save(model, tmp_path / "knife.onnx")
    return tmp_path / "knife.onnx", [{"x": (a + lo * (b - a)).astype(np.float32)}] + [{"x": x} for x in certain]


def test_auto_judges_a_sample_fp32_cannot_hold_against_its_own_stability(tmp_path, steady_timing):
    """The tie sample: FP32 itself moves to ~0 dB when its pixels move within their 8-bit steps,
    so no int8 plan can hold it to 17 dB. Held to every sample, the budget keeps every layer
    float (--input-noise 0); by default that sample is judged against FP32's own stability and
    listed, and the plan quantizes while the 7 certain samples still meet the budget."""
    from tvmq.compile import quantized_module

    path, samples = knife_edge(tmp_path)
    preset, config = get_preset("x86"), QuantConfig(int8_everywhere=True)
    strict = quantized_module(str(path), preset, raw=samples, precision="auto", auto=AutoPrecision(input_noise=0),
                              config=config).precision
    assert strict["held_samples"] == [] and strict["input_noise"] == 0
    assert set(strict["assignment"].values()) == {"fp32"} and strict["all_int8"] < 17

    qm = quantized_module(str(path), preset, raw=samples, precision="auto", auto=AutoPrecision(), config=config)
    p = qm.precision
    [held] = p["held_samples"]
    assert held["sample"] == 0 and held["part"] == "y" and held["fp32_under_input_rounding"] < 10
    assert p["all_int8"] >= 17 and p["assignment"] == {"conv": "int8", "head": "int8"}
    from tvmq.execute import HostModule

    int8, fp32 = HostModule(qm.module), HostModule(qm.float_module)
    got, ref = [int8(s["x"]) for s in samples], [fp32(s["x"]) for s in samples]
    assert min(M.sample_sqnr(g, r) for g, r in zip(got[1:], ref[1:])) >= 17  # the certain samples: the budget
    assert M.sample_sqnr(got[0], ref[0]) < 17  # the tie: moved, as FP32 moves it
    from tvmq.report import precision_markdown

    assert "FP32 itself cannot hold" in precision_markdown(p) and "| 0 | y |" in precision_markdown(p)


def long_tail(n, seed, channels=32):
    """A model whose one conv reads a long-tailed input (log-normal magnitudes, sign at random:
    a few values 100x the typical one) and whose output is clipped to [-3, 3], so the tail's exact
    size does not matter downstream: an 8-bit grid over the whole observed range spends its
    steps on the tail, and a narrower range serves the rest better. Returns the model and ``n``
    samples."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (channels, channels, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip")]
    shape = [1, channels, 16, 16]
    model = make_model(nodes, [("x", shape)], [("y", shape)], [("w", w), ("lo", np.float32(-3)), ("hi", np.float32(3))])
    samples = [{"x": (np.exp(rng.normal(0, 1.2, shape)) * rng.choice([-1, 1], shape)).astype(np.float32)} for _ in range(n)]
    return model, samples


def test_a_range_factor_that_lifts_the_worst_sample_but_not_the_median_is_not_kept():
    """Clipping a real tail refines the step for most inputs; a factor that lifts the worst
    sample while the median one falls (each half's worst holding) is a chance gain: the search
    keeps the factor that lifts both, not the one that lifts the worst most."""
    table = {1.0: [10, 30, 30, 30, 30, 30, 30, 30],
             0.85: [11, 31, 31, 31, 31, 31, 31, 31],
             0.7: [20, 30, 25, 30, 25, 30, 25, 30],  # worst +10 dB, odd half as before, median 30 -> 27.5
             0.55: [10, 30, 30, 30, 30, 30, 30, 30],
             0.4: [10, 30, 30, 30, 30, 30, 30, 30]}
    ref = np.linspace(1.0, 2.0, 64)

    def runner(i, mask, widths):  # sample i's output at its table's SQNR for the width
        return [ref * (1 + 10 ** (-table[round(float(widths[0]), 2)][int(i)] / 20))]

    a = S.Analysis(M.Metric("sqnr"), np.inf, 0.0, names=["conv"], runner=runner, input_names=["x"],
                   samples=[{"x": i} for i in range(8)], reference=[(ref,)] * 8, widths=np.ones(1, np.float32),
                   tensors={"t": ["conv"]})
    assert S.narrow_ranges(a, {"conv": 12.0}, 17.0) == ["conv"]
    (narrowed,) = a.narrowed
    assert narrowed["width"] == 0.85 and narrowed["all_int8_db"] == [pytest.approx(10), pytest.approx(11)]
    assert a.narrowed_ranges() == {"t": pytest.approx(0.85)}


def test_the_search_narrows_a_long_tailed_range_and_the_integer_program_follows():
    """Where a tensor's quantization alone comes near the budget, the search tries narrower
    ranges in the simulation (one input, no recompiling) and keeps the best when all-int8 gains;
    the simulation with a width equals the fake-quantized module of the narrowed plan, and the
    integer program of that plan gains on its worst sample as the simulation said."""
    from tvmq.execute import HostModule
    from tvmq.frontend import load_onnx
    from tvmq.passes import InsertQDQ
    from tvmq.passes.insert_qdq import insert_switchable_qdq, quantized_tensors
    from tvmq.quantize import calibrate, narrow, prepare, quantize_pipeline

    model, samples = long_tail(12, 1)
    mod, _ = load_onnx(model, {"x": [1, 32, 16, 16]})
    float_mod = prepare(mod)
    plan = calibrate(float_mod, samples, input_names=["x"])
    metric = M.Metric("sqnr")
    a = S.analyse(float_mod, plan, samples, ["x"], metric, measure_latency=False, budget=40.0, input_noise=0,
                  clip_ranges=True)
    assert not S.analyse(float_mod, plan, samples, ["x"], metric, measure_latency=False, budget=40.0,
                         input_noise=0).narrowed  # analyse narrows only when asked
    (narrowed,) = a.narrowed
    before, after = narrowed["all_int8_db"]
    assert narrowed["readers"] == ["conv"] and narrowed["width"] in S.WIDTHS and after >= before + S.NARROW_GAIN_DB
    assert a.all_int8 == pytest.approx(after)
    assert a.layers[0].sqnr_int8 == pytest.approx(after)  # the layer's figures are re-measured with the width
    (tensor,) = quantized_tensors(float_mod["main"], plan)
    assert a.narrowed_ranges() == {tensor: pytest.approx(narrowed["width"])}
    new = narrow(plan, float_mod, a.narrowed_ranges())
    assert new.layers["conv"].inputs[0].scale == pytest.approx(plan.layers["conv"].inputs[0].scale * narrowed["width"])
    assert new.layers["conv"].inputs[0].zero_point == plan.layers["conv"].inputs[0].zero_point
    # the switch and the width reproduce the narrowed plan's fake-quantized program exactly
    switchable, _ = insert_switchable_qdq(float_mod, plan)
    sim, fake = HostModule(switchable), HostModule(InsertQDQ(new)(float_mod))
    for s in samples[:3]:
        np.testing.assert_array_equal(sim(s["x"], np.ones(1, np.float32), a.widths)[0], fake(s["x"])[0])
    # the integer programs: the narrowed plan's worst sample gains too (within requantization)
    ref = [a.reference[i][0] for i in range(len(samples))]
    worst = {label: min(M.sample_sqnr(HostModule(quantize_pipeline(p)(float_mod))(s["x"])[0], r)
                        for s, r in zip(samples, ref)) for label, p in (("calibrated", plan), ("narrowed", new))}
    assert worst["narrowed"] >= worst["calibrated"] + S.NARROW_GAIN_DB
    assert worst["narrowed"] == pytest.approx(after, abs=0.5)


def test_auto_keeps_a_layer_int8_by_narrowing_its_input_and_reports_it(tmp_path, steady_timing):
    """End to end: at a budget the calibrated range misses (worst sample 18 dB < 21), the
    clipped range meets it (23.6 dB), so the plan keeps the conv int8; the manifest's plan carries the
    clipped scale, the bundle meets the budget, and report.md lists the range."""
    import onnx

    model, samples = long_tail(12, 1)
    onnx.save(model, tmp_path / "model.onnx")
    calib = _calib_dir(tmp_path, samples)
    out = tmp_path / "auto"
    compile_model(tmp_path / "model.onnx", out, calib=calib, precision="auto",
                  auto=AutoPrecision(metric="sqnr", min_sqnr=21.0, input_noise=0, clip_ranges=True))
    manifest = json.loads((out / "manifest.json").read_text())
    p = manifest["precision"]
    (narrowed,) = p["narrowed_ranges"]
    assert narrowed["all_int8_db"][0] < 21.0 <= narrowed["all_int8_db"][1]
    assert p["assignment"] == {"conv": "int8"}
    scale = manifest["layers"]["conv"]["inputs"][0]["scale"]
    calibrated = (max(s["x"].max() for s in samples) - min(s["x"].min() for s in samples)) / 255  # minmax, uint8
    assert scale == pytest.approx(calibrated * narrowed["width"], rel=0.02)
    bundle = Bundle(out)
    worst = min(M.sample_sqnr(bundle.run(s)["y"], np.clip(_conv1x1(model, s["x"]), -3, 3)) for s in samples)
    assert worst >= 21.0
    report = (out / "report.md").read_text()
    assert "activation range(s) clipped" in report and f"| conv | {narrowed['width']:g} |" in report


def _conv1x1(model, x):
    from onnx import numpy_helper

    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))[:, :, 0, 0]
    return np.einsum("oc,nchw->nohw", w, x)
