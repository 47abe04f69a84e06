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


# --- live timings: a fake clock makes them fast and deterministic ------------------------------
class FakeClock:
    """A clock the timed function advances: call k (from 0) takes durations[k] seconds."""

    def __init__(self, durations):
        self.now, self.calls, self.durations = 0.0, 0, list(durations)

    def __call__(self):
        return self.now

    def fn(self):
        self.now += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1


def test_autorange_grows_the_sample_as_timeit_does():
    clock = FakeClock([1e-4])  # 0.1 ms a call: 1, 2, 5 calls are too short, 10 calls last 1 ms
    number, seconds = timing.autorange(clock.fn, min_sample_s=1e-3, clock=clock)
    assert number == 10 and seconds == pytest.approx(1e-3) and clock.calls == 1 + 2 + 5 + 10
    clock = FakeClock([0.5])
    assert timing.autorange(clock.fn, min_sample_s=1e-3, clock=clock) == (1, 0.5) and clock.calls == 1


def test_time_robust_excludes_the_warmup_and_reports_the_fastest_sample():
    # A 3 s "compile" on the first call, then 10 ms calls, one of them disturbed (50 ms).
    clock = FakeClock([3.0, 0.010, 0.010, 0.050, 0.010, 0.010, 0.010])
    t = timing.time_robust(clock.fn, warmup=1, budget_s=0.0, min_repeats=5, clock=clock)
    assert t.warmup_ms == pytest.approx(3000.0)
    assert t.number == 1 and len(t.times_ms) == 5
    assert t.min_ms == pytest.approx(10.0) and t.p75_ms == pytest.approx(10.0)
    assert max(t.times_ms) == pytest.approx(50.0) and not t.noisy  # one outlier does not move min or p75


def test_time_robust_samples_until_the_budget_is_spent():
    clock = FakeClock([1 / 64])  # 15.625 ms calls (exact in binary), a budget of 0.125 s: 8 samples
    t = timing.time_robust(clock.fn, warmup=0, budget_s=0.125, min_repeats=3, clock=clock)
    assert len(t.times_ms) == 8
    clock = FakeClock([0.010])
    t = timing.time_robust(clock.fn, warmup=0, budget_s=100.0, min_repeats=3, max_repeats=7, clock=clock)
    assert len(t.times_ms) == 7  # never more than max_repeats
    clock = FakeClock([2.0])  # a slow call: the budget is spent by the first sample, min_repeats still hold
    t = timing.time_robust(clock.fn, warmup=0, budget_s=0.1, min_repeats=3, clock=clock)
    assert len(t.times_ms) == 3 and t.min_ms == pytest.approx(2000.0)


def test_time_robust_divides_a_sample_by_its_calls():
    clock = FakeClock([2e-4])  # 0.2 ms a call: 5 calls a sample reach 1 ms
    t = timing.time_robust(clock.fn, warmup=0, budget_s=0.0, min_repeats=4, clock=clock)
    assert t.number == 5 and t.times_ms == pytest.approx((0.2,) * 4)


def test_spread_quantiles_and_the_noisy_flag():
    t = timing.Timing((1.0, 1.1, 1.2, 1.3, 5.0))
    assert t.min_ms == 1.0 and t.median_ms == 1.2 and t.p75_ms == pytest.approx(1.3)
    assert t.quantile_ms(0.0) == 1.0 and t.quantile_ms(1.0) == 5.0 and t.quantile_ms(0.1) == pytest.approx(1.04)
    assert t.spread == pytest.approx(0.3) and not t.noisy
    busy = timing.Timing((1.0, 1.0, 3.0, 4.0, 6.0))  # a busy machine: most samples far above the fastest
    assert busy.spread == pytest.approx(3.0) and busy.noisy
    assert timing.Timing((1.0, 1.0)).noisy  # two samples cannot tell
    with pytest.raises(ValueError, match="q must be"):
        t.quantile_ms(1.5)


@pytest.mark.parametrize("kw, name", [({"min_repeats": 0}, "min_repeats"), ({"warmup": -1}, "warmup"),
                                      ({"min_repeats": 5, "max_repeats": 2}, "max_repeats"),
                                      ({"budget_s": -1.0}, "budget_s")])
def test_time_robust_bad_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        timing.time_robust(lambda: None, **kw)


def test_time_attention_live_form_reports_min_and_spread():
    q = np.random.default_rng(0).standard_normal((1, 2, 24, 8)).astype(np.float32)
    r = timing.time_attention(q, q, q, backend="numpy-standard", warmup=1, repeats=3, budget_s=0.01)
    assert r["ms"] <= r["ms_p75"] and r["ms"] <= r["ms_median"] and r["repeats"] >= 3 and r["calls"] >= 1
    assert r["gflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e9)


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
