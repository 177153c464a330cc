"""Tuning: records are verified before use; a database is reused without new trials."""

import json

import numpy as np
import pytest
import tvm

from conftest import conv_model, random_samples
from tvmq.compile import quantized_module
from tvmq.execute import HostModule
from tvmq.targets import get_preset
from tvmq.targets.intrinsics import register as register_intrinsics
from tvmq.targets.schedules import PackedKernelRule
from tvmq.tune import extract_tasks, load_database, tune

# The host's preset where it has AVX-512 VNNI; otherwise AVX2's (pmaddwd micro-kernel), which
# every x86 host these tests run on executes natively: tuning is tested on either ISA.
PRESET = get_preset("x86") if get_preset("x86").dot_product == "vnni" else get_preset("x86-avx2")
needs_vnni = pytest.mark.skipif(PRESET.dot_product != "vnni", reason="the broken kernel is a VNNI intrinsic")


def _broken_intrinsic():
    """A VNNI intrinsic that forgets the accumulator: the kind of bug tuned kernels can carry."""
    from tvm import s_tir
    from tvm.script import tirx as T

    from tvmq.targets.intrinsics import dot_desc

    desc = dot_desc(16, 4, "uint8")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="int8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                T.broadcast(T.int32(0), 16), a, B.vload([0, 0], dtype="int8x64"), dtype="int32x16",
            )

    s_tir.TensorIntrin.register("tvmq_test_broken_16x4", desc, impl, override=True)
    return "tvmq_test_broken_16x4"


@pytest.fixture(scope="module")
def qmodel():
    model, _, _ = conv_model(cin=16, cout=16, k=3, relu=True)
    return quantized_module(model, PRESET, raw=random_samples((1, 16, 8, 8), n=8))


def _trace(func, intrinsics):
    sch = tvm.s_tir.Schedule(func)
    assert PackedKernelRule(intrinsics).schedule(sch, tunable=False)
    return sch.trace


@needs_vnni
def test_a_wrong_tuned_kernel_is_rejected_and_the_next_best_used(qmodel, tmp_path):
    from tvmq._compat import meta_schedule

    ms = meta_schedule()
    good_names = {l: f"tvmq_vnni_{l}x4" for l in (16, 8, 4)}
    register_intrinsics()
    broken = _broken_intrinsic()
    (task,) = extract_tasks(qmodel.module, PRESET)
    bad_trace = _trace(task.mod["main"], {**good_names, 16: broken})
    good_trace = _trace(task.mod["main"], good_names)

    db = ms.database.JSONDatabase(str(tmp_path / "database_workload.json"), str(tmp_path / "database_tuning_record.json"))
    workload = db.commit_workload(task.mod)
    target = PRESET.tvm_target()
    db.commit_tuning_record(ms.database.TuningRecord(bad_trace, workload, [1e-9], target))  # "fastest"
    db.commit_tuning_record(ms.database.TuningRecord(good_trace, workload, [1e-3], target))

    chosen = load_database(tmp_path, qmodel.module, PRESET)
    (record,) = chosen.get_all_tuning_records()
    assert str(record.trace) == str(good_trace)
    rejected = json.loads((tmp_path / "rejected.json").read_text())
    assert len(rejected) == 1 and "outputs differ" in next(iter(rejected.values()))["reason"]

    x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 8, 8)).astype(np.float32)
    untuned = HostModule(qmodel.module)(x)[0]
    np.testing.assert_array_equal(HostModule(qmodel.module, database=chosen)(x)[0], untuned)


def test_tune_then_reuse_the_database_without_trials(qmodel, tmp_path):
    report = tune(qmodel.module, PRESET, tmp_path, trials=2, max_tasks=1, progress=False, time_budget=3600)
    assert len(report.tasks) == 1 and report.tasks[0]["best_us"] is not None
    assert report.trials == 2 and not report.out_of_time  # a budget that is not spent changes nothing
    # the task was timed under the default schedule first (tasks are tuned by their share of the time)
    assert report.tasks[0]["untuned_us"] > 0 and 0 < report.tasks[0]["share"] <= 1
    untuned_ms, tuned_ms = report.kernel_ms  # the estimate never counts a candidate slower than the default
    assert 0 < tuned_ms <= untuned_ms == pytest.approx(report.tasks[0]["untuned_us"] * report.tasks[0]["weight"] / 1e3)
    records = (tmp_path / "database_tuning_record.json").read_text().strip().splitlines()
    assert len(records) >= 1
    db = load_database(tmp_path, qmodel.module, PRESET)
    assert len(db.get_all_tuning_records()) == 1
    x = np.random.default_rng(1).uniform(-1, 1, (1, 16, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(HostModule(qmodel.module, database=db)(x)[0], HostModule(qmodel.module)(x)[0])
    # Reading the database again runs no trials and adds no records.
    load_database(tmp_path, qmodel.module, PRESET)
    assert (tmp_path / "database_tuning_record.json").read_text().strip().splitlines() == records


def test_the_default_schedule_is_a_measured_candidate_and_the_fastest_record_is_used(qmodel, tmp_path):
    from tvmq._compat import meta_schedule
    from tvmq.tune import _default_sch

    report = tune(qmodel.module, PRESET, tmp_path, trials=2, max_tasks=1, progress=False)
    (task,) = extract_tasks(qmodel.module, PRESET)
    db = meta_schedule().database.JSONDatabase(str(tmp_path / "database_workload.json"),
                                               str(tmp_path / "database_tuning_record.json"))
    records = [(str(r.trace), [float(t) for t in r.run_secs]) for r in db.get_all_tuning_records()]
    default = str(_default_sch(task.mod["main"], PRESET).trace)
    assert len({trace for trace, _ in records}) >= 2  # the default beside the candidates
    # The default's record holds the very runs that timed the untuned kernel (no second timing,
    # which a busy machine would make differ): its median is the report's untuned figure.
    untuned_us = report.tasks[0]["untuned_us"]
    assert any(trace == default and np.median(runs) * 1e6 == pytest.approx(untuned_us, rel=1e-6)
               for trace, runs in records)
    (chosen,) = load_database(tmp_path, qmodel.module, PRESET).get_all_tuning_records()
    assert float(np.mean([float(t) for t in chosen.run_secs])) == pytest.approx(min(np.mean(r) for _, r in records))


@pytest.mark.parametrize("precision, orders", [("int8", ["pixels", "weights"]),
                                               ("fp32", ["pixels", "weights", "chunked"])])
def test_each_loop_order_is_a_design_space_and_every_sample_computes_the_default(precision, orders):
    """The tuner searches loop orders as well as tiles: a packed kernel has one design space per
    order (a float conv also its input-channel chunks), and any tiles sampled in any of them
    compute what the default schedule does (exactly for int8)."""
    from tvmq.pipeline import dot_intrinsics
    from tvmq.tune import _default_schedule, _design_space, verify_schedule

    model, _, _ = conv_model(cin=16, cout=64, k=3, relu=True, hw=12)
    qm = quantized_module(model, PRESET, raw=random_samples((1, 16, 12, 12), n=4), precision=precision)
    (task,) = extract_tasks(qm.module, PRESET)
    rule = PackedKernelRule(dot_intrinsics(PRESET), PRESET.vector_registers, PRESET.vector_lanes)
    assert rule.orders(tvm.s_tir.Schedule(task.mod)) == orders
    spaces = _design_space(PRESET)(tvm.s_tir.Schedule(task.mod))
    assert len(spaces) == len(orders) and len({str(s.mod) for s in spaces}) == len(orders)
    reference = _default_schedule(task.mod["main"], PRESET)
    rng = np.random.default_rng(0)
    for design in spaces:
        for _ in range(2):  # the search's replay: the trace with fresh random decisions
            sch = tvm.s_tir.Schedule(task.mod, seed=int(rng.integers(1, 1 << 30)))
            design.trace.apply_to_schedule(sch, remove_postproc=False, decision_provider=lambda inst, ins, atts, dec: None)
            assert verify_schedule(reference, sch.mod["main"], PRESET.tvm_target()) is None


def test_unreadable_database_is_an_error(tmp_path, qmodel):
    from tvmq.errors import TvmqError

    (tmp_path / "database_workload.json").write_text("{not json")
    (tmp_path / "database_tuning_record.json").write_text("")
    with pytest.raises(TvmqError, match="tuning database"):
        load_database(tmp_path, qmodel.module, PRESET)
    with pytest.raises(TvmqError, match="does not exist"):
        load_database(tmp_path / "missing", qmodel.module, PRESET)


def test_tensorized_int8_kernel_allocates_nothing_per_tile(qmodel):
    """The dot-product intrinsic's operands are expressions, not buffers: a local buffer inside the
    parallel tile loop is lowered to a heap workspace alloc/free pair per tile, which made the
    int8 kernels of PP-OCR's classifier slower than their float versions."""
    from tvmq.pipeline import lower
    from tvmq.testing import kernel_asm, primfuncs

    lowered = lower(qmodel.module, PRESET)
    kernels = primfuncs(lowered, "tvmq_conv2d")
    assert kernels
    (mnemonic,) = PRESET.micro_kernel.mnemonics  # vpdpbusd (VNNI) or vpmaddwd (AVX2)
    for name, func in kernels.items():
        asm = kernel_asm(func, PRESET.tvm_target())
        assert mnemonic in asm and "TVMBackendAllocWorkspace" not in asm, name


def test_a_time_budget_ends_the_search_after_the_batch_in_flight(qmodel, tmp_path):
    """``--time``: no batch of candidates starts once the budget is spent; the report says so."""
    report = tune(qmodel.module, PRESET, tmp_path, trials=8, max_tasks=1, progress=False, time_budget=0.01, batch=2)
    assert report.out_of_time
    assert report.trials == 2  # the first batch measured, the other three never started
    assert report.tasks[0]["best_us"] is not None


def test_tasks_are_tuned_by_their_measured_share_of_the_kernel_time(demo_dir):
    """``--max-tasks``: the kernels that take the most time, timed under the default schedule, not
    the ones with the biggest buffers."""
    from tvmq.tune import _cost, _order

    qm = quantized_module(str(demo_dir / "digits.onnx"), PRESET, raw=str(demo_dir / "digits_calib"))
    tasks = _order(extract_tasks(qm.module, PRESET), PRESET)
    assert len(tasks) >= 3 and all(t.untuned_s and t.untuned_s > 0 for t in tasks)
    shares = [t.untuned_s * t.weight for t in tasks]
    assert shares == sorted(shares, reverse=True)
    # the digits model's first matmul has the biggest buffers (its 8640 weights) and runs in
    # about 0.1 us; the convs take 7-12 us each
    assert tasks[0].name != max(tasks, key=_cost).name


def test_candidates_are_built_in_the_tuning_process(qmodel):
    """No process pool per batch (TVM's LocalBuilder starts one, each worker importing TVM): the
    candidate is compiled here into an artifact MetaSchedule's runner loads and times."""
    from tvmq._compat import meta_schedule
    from tvmq.tune import _in_process_builder

    ms = meta_schedule()
    task = extract_tasks(qmodel.module, PRESET)[0]
    built, = _in_process_builder(ms).build([ms.builder.BuilderInput(task.mod, PRESET.tvm_target())])
    assert built.error_msg is None and built.artifact_path.endswith(".tar")
    runner = ms.runner.LocalRunner(timeout_sec=60)
    args = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    result, = [f.result() for f in runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args)])]
    assert result.error_msg is None and min(float(s) for s in result.run_secs) > 0


def _tile_records(task):
    """Every tiling of ``task``'s tunable schedule in its first loop order (each split of its
    pixel and channel-block loops), each with a made-up time that falls as its register tile
    grows: ``(traces, seconds)``."""
    import itertools

    from tvmq.tune import _design_space

    trace = _design_space(PRESET)(tvm.s_tir.Schedule(task.mod))[0].trace
    samples = [inst for inst in trace.decisions if inst.kind.name == "SamplePerfectTile"]
    extents = [int(np.prod([int(v) for v in trace.decisions[inst]])) for inst in samples]
    limits = [int(inst.attrs[1]) for inst in samples]  # max_innermost_factor
    choices = [[[e // f, f] for f in range(1, min(e, m) + 1) if e % f == 0] for e, m in zip(extents, limits)]
    traces, seconds = [], []
    for tiles in itertools.product(*choices):
        t = trace
        for inst, tile in zip(samples, tiles):
            t = t.with_decision(inst, tile, remove_postproc=False)
        traces.append(t)
        seconds.append(1e-4 / float(np.prod([inner for _, inner in tiles])))
    return traces, seconds


def test_a_cost_model_prior_ranks_the_kernels_it_was_trained_on(qmodel, tmp_path):
    """``train_cost_model`` learns the records of a database (here: times that fall with the
    tile's size); loaded as a prior, the XGBoost model ranks those schedules by that time from
    its first prediction (a fresh one guesses at random until it holds 100 measurements), and
    ``tune`` reports the prior it started from."""
    from tvmq._compat import meta_schedule
    from tvmq.errors import TvmqError
    from tvmq.tune import _xgb_model, prior_path, train_cost_model

    ms = meta_schedule()
    register_intrinsics()
    model, _, _ = conv_model(cin=16, cout=64, k=3, relu=True, hw=16)
    (task,) = extract_tasks(quantized_module(model, PRESET, raw=random_samples((1, 16, 16, 16), n=4)).module, PRESET)
    traces, seconds = _tile_records(task)
    assert len(traces) >= 12 and len(set(seconds)) >= 5  # 16 pixels x 4 channel blocks, split every way
    traces, seconds = traces * (120 // len(traces) + 1), seconds * (120 // len(traces) + 1)  # 100+ records
    (tmp_path / "db").mkdir()
    db = ms.database.JSONDatabase(str(tmp_path / "db" / "database_workload.json"),
                                  str(tmp_path / "db" / "database_tuning_record.json"), allow_missing=True)
    workload = db.commit_workload(task.mod)
    args = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    for trace, secs in zip(traces, seconds):
        db.commit_tuning_record(ms.database.TuningRecord(trace, workload, [secs], PRESET.tvm_target(), args))
    db.commit_tuning_record(ms.database.TuningRecord(traces[0], workload, [1e10], PRESET.tvm_target(), args))  # failed
    prior = tmp_path / "x86.tar.gz"
    stats = train_cost_model([tmp_path / "db"], PRESET, prior)
    assert stats == {"workloads": 1, "records": len(traces), "bytes": prior.stat().st_size}

    context = ms.TuneContext(mod=task.mod, target=PRESET.tvm_target(), num_threads=1)
    candidates = []
    for trace in traces:
        sch = tvm.s_tir.Schedule(task.mod)
        trace.apply_to_schedule(sch, remove_postproc=False)
        candidates.append(ms.MeasureCandidate(sch, args))
    scores = _xgb_model(ms, prior).predict(context, candidates)
    speed = min(seconds) / np.array(seconds)  # what MetaSchedule's model predicts: 1 for the fastest
    assert np.corrcoef(scores, speed)[0, 1] > 0.9

    report = tune(qmodel.module, PRESET, tmp_path / "tuned", trials=2, max_tasks=1, progress=False, cost_model=prior)
    assert report.cost_model == str(prior) and report.trials == 2
    assert report.history and report.history[-1] == (2, pytest.approx(report.kernel_ms[1]))
    assert prior_path("none", PRESET) is None
    with pytest.raises(TvmqError, match="does not exist"):
        prior_path(tmp_path / "missing.tar.gz", PRESET)


def test_an_unreadable_prior_is_an_error_unless_it_is_the_shipped_one(qmodel, tmp_path, monkeypatch):
    """A damaged ``--cost-model`` file stops the search with one error; the shipped prior, if this
    installation cannot read it (another xgboost), only costs the search its prior, and the report says so."""
    import tvmq.tune
    from tvmq.errors import TvmqError
    from tvmq.tune import isa_key

    bad = tmp_path / "prior" / f"{isa_key(PRESET)}.tar.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"not a cost model")
    with pytest.raises(TvmqError, match="unreadable"):
        tune(qmodel.module, PRESET, tmp_path / "a", trials=1, max_tasks=1, progress=False, cost_model=bad)
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(tvmq.tune, "COST_MODELS", bad.parent)
    report = tune(qmodel.module, PRESET, tmp_path / "b", trials=1, max_tasks=1, progress=False)
    assert report.cost_model == f"none ({bad.name} unreadable here)" and report.trials == 1


def test_kernels_outside_the_packed_schedules_are_tuned_in_metaschedules_own_space(tmp_path):
    """An elementwise swish and a mean over rows (no packed kernel in the model): where they take a
    share of the model's kernel time they are tuned in MetaSchedule's generic design space, the
    default schedule recorded beside the candidates; the records are verified before use and the
    tuned model computes what the untuned one does."""
    from onnx import helper

    from conftest import make_model
    from tvmq.tune import GENERIC_MIN_SHARE

    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sigmoid"),
             helper.make_node("Mul", ["x", "s"], ["w"], name="swish"),
             helper.make_node("ReduceMean", ["w"], ["m"], name="mean", axes=[-1], keepdims=1),
             helper.make_node("Sub", ["w", "m"], ["y"], name="center")]
    model = make_model(nodes, [("x", [64, 2048])], [("y", [64, 2048])])
    mod = quantized_module(model, PRESET, precision="fp32").module
    assert extract_tasks(mod, PRESET) == []  # nothing of tvmq's packed kernels
    generic = extract_tasks(mod, PRESET, generic=True)
    assert generic and all(t.generic for t in generic)
    report = tune(mod, PRESET, tmp_path, trials=4, progress=False)
    # both kernels, each with a candidate of its own measured (a small space may hold few)
    assert len(report.tasks) == 2 and all(t["generic"] for t in report.tasks) and report.trials >= 2
    assert all(t["share"] >= GENERIC_MIN_SHARE and t["best_us"] > 0 for t in report.tasks)
    untuned_ms, tuned_ms = report.kernel_ms
    assert 0 < tuned_ms <= untuned_ms  # the default is a candidate: never slower
    db = load_database(tmp_path, mod, PRESET)
    assert len(db.get_all_tuning_records()) == len(report.tasks)
    x = np.random.default_rng(1).normal(0, 3, (64, 2048)).astype(np.float32)
    np.testing.assert_allclose(HostModule(mod, database=db)(x)[0], HostModule(mod)(x)[0], rtol=1e-5, atol=1e-6)


def test_a_kernel_the_model_calls_twice_weighs_twice():
    """Two convs of one shape share one kernel, which ``main`` calls twice: its share of the
    model's time (what orders the tasks and sums the model's tuned time) counts both calls.
    (Two branches over one input: a conv whose output the other reads padded would write that
    pad itself, another kernel.)"""
    from onnx import helper

    from conftest import make_model

    rng = np.random.default_rng(0)
    conv = dict(kernel_shape=[3, 3], pads=[1] * 4)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", **conv),
             helper.make_node("Relu", ["c0"], ["y0"], name="relu0"),
             helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", **conv),
             helper.make_node("Relu", ["c1"], ["y1"], name="relu1")]
    model = make_model(nodes, [("x", [1, 16, 8, 8])], [("y0", [1, 16, 8, 8]), ("y1", [1, 16, 8, 8])],
                       [(f"w{i}", rng.normal(0, 0.3, (16, 16, 3, 3)).astype(np.float32)) for i in range(2)])
    (task,) = extract_tasks(quantized_module(model, PRESET, precision="fp32").module, PRESET)
    assert task.weight == 2
