"""Property-based fuzzing of the passes on random small graphs (fast profile; see scripts/fuzz.py).

For every drawn graph: the whole pipeline runs without raising; the integer program agrees with
the Q/DQ float simulation to within one output quantization step everywhere, plus what a final
float-output layer makes of its int8 inputs' one-step differences (its weights' L1 gain times the
input step; see ``check_graph``), and SQNR >= 40 dB overall (the only differences are where the
simulation's float arithmetic lands on the other side of a rounding tie than the integer
arithmetic, and the bias rounded to int32); and it stays close to FP32 (SQNR >= 20 dB).
"""

from hypothesis import HealthCheck, given, settings

from tvmq.testing import check_graph, graphs

SIM_SQNR_DB = 40.0
FP32_SQNR_DB = 20.0


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(graphs())
def test_random_graphs_quantize_within_bounds(case):
    r = check_graph(case)
    assert r.max_steps_vs_simulation <= r.step_bound, (case.description, r)
    assert r.sqnr_vs_simulation >= SIM_SQNR_DB, (case.description, r)
    assert r.sqnr_vs_fp32 >= FP32_SQNR_DB, (case.description, r)
