"""flashkit.measure.timing: one timed call, the benchmarks' median with a budget, the FLOP formula."""
import numpy as np
import pytest

from flashkit import problem, registry, validate
from flashkit.measure import timing


# --- one call -------------------------------------------------------------------------------
def test_time_call_counts_warmup_and_repeats():
    calls = []
    t = timing.time_call(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7
    assert len(t.times_ms) == 5 and all(x >= 0 for x in t.times_ms)
    assert t.min_ms <= t.median_ms <= max(t.times_ms)


def test_time_call_median_of_known_times(monkeypatch):
    # perf_counter returns 0, 1, 0, 5, 0, 2 (seconds): calls take 1000, 5000 and 2000 ms.
    ticks = iter([0.0, 1.0, 0.0, 5.0, 0.0, 2.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    t = timing.time_call(lambda: None, warmup=0, repeats=3)
    assert t.times_ms == (1000.0, 5000.0, 2000.0)
    assert t.median_ms == 2000.0 and t.min_ms == 1000.0


@pytest.mark.parametrize("kw, name", [({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"),
                                      ({"repeats": 2.5}, "repeats"), ({"repeats": True}, "repeats")])
def test_time_call_bad_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        timing.time_call(lambda: None, **kw)


def test_flop_formula():
    """One formula (flashkit.problem.flops): 4·B·H·Nq·Nk·d times the visible fraction; backward 2.5x."""
    assert problem.flops(2, 3, 5, 7, 11) == 4 * 2 * 3 * 5 * 7 * 11
    N = 64
    causal = problem.flops(1, 4, N, N, 32, (-1, 0))
    assert causal == pytest.approx(4 * 4 * N * N * 32 * (N + 1) / (2 * N))
    band = problem.flops(1, 1, 10, 10, 8, (1, 1))  # 3 keys a row, 2 on the first and last rows
    assert band == pytest.approx(4 * 10 * 10 * 8 * 28 / 100)
    assert problem.backward_flops(1, 4, N, N, 32, (-1, 0)) == 2.5 * causal
    q = np.zeros((1, 4, N, 32), np.float32)
    p = validate.check(q, q, q, causal=True)
    assert p.flops() == causal and p.backward_flops() == 2.5 * causal
    assert timing.attention_flops(1, 4, N, N, 32, causal=True) == causal


def test_time_attention_reports_consistent_numbers():
    q = np.random.default_rng(0).standard_normal((1, 2, 24, 8)).astype(np.float32)
    q_before = q.copy()
    r = timing.time_attention(q, q, q, backend="numpy-standard", causal=True, warmup=0, repeats=2)
    assert r["backend"] == "numpy-standard" and r["repeats"] == 2
    assert r["ms"] > 0 and r["ms_min"] <= r["ms"]
    assert r["flops"] == timing.attention_flops(1, 2, 24, 24, 8, causal=True)
    assert r["gflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e9)
    np.testing.assert_array_equal(q, q_before)  # inputs untouched


def test_time_attention_auto_names_the_backend_it_ran():
    q = np.ones((8, 4), np.float32)
    expected = registry.choose(validate.check(q, q, q), "auto").name
    assert timing.time_attention(q, q, q, warmup=0, repeats=1)["backend"] == expected


def test_median_time_stops_at_the_budget_but_not_before_three_runs():
    calls = []
    t = timing.median_time(lambda: calls.append(1), repeats=50, budget_s=0.0, warmup=2)
    assert len(calls) == 2 + 3 and len(t["runs_s"]) == 3  # budget spent at once: the minimum of three
    t = timing.median_time(lambda: None, repeats=7, budget_s=60.0, warmup=0)
    assert len(t["runs_s"]) == 7
    assert t["min_s"] <= t["median_s"] <= max(t["runs_s"]) and t["cpu_median_s"] >= 0


def test_median_time_takes_each_run_from_time_call(monkeypatch):
    """One clock: median_time's runs are time_call samples (so CUDA events reach the benchmarks too)."""
    samples = iter([3.0, 1.0, 2.0])
    seen = []

    def fake_time_call(fn, *, warmup, repeats, cuda):
        seen.append((warmup, repeats, cuda))
        fn()
        return timing.Timing((next(samples),))

    monkeypatch.setattr(timing, "time_call", fake_time_call)
    t = timing.median_time(lambda: None, repeats=3, warmup=0, cuda=True)
    assert seen == [(0, 1, True)] * 3
    assert t["runs_s"] == [3e-3, 1e-3, 2e-3] and t["median_s"] == 2e-3 and t["min_s"] == 1e-3
