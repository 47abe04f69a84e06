"""flashkit.measure.sweep and threads: the points of a sweep, rows one at a time, clear argument errors,
the thread limit."""
import types

import pytest

import flashkit
from flashkit import registry
from flashkit.measure import export, threads, timing
from flashkit.measure import sweep as sweeps
from flashkit.registry import Backend

TINY = dict(N=[16, 40], d=[8], heads=[2], repeats=2, warmup=1, seconds_per_point=0.01)


# --- the sweep ------------------------------------------------------------------------------
def test_sweep_points_order_and_count():
    spec = sweeps.Sweep(backends=["numpy-standard", "numpy-tiled"], causal=[False, True], **TINY)
    points = spec.points()
    assert len(spec) == len(points) == 2 * 2 * 2
    assert [p["N"] for p in points[:2]] == [16, 40]  # N innermost: one line grows at a time
    assert [p["backend"] for p in points[:4]] == ["numpy-standard"] * 2 + ["numpy-tiled"] * 2


def test_sweep_yields_rows_one_at_a_time():
    gen = sweeps.sweep(backends=["numpy-standard", "numpy-tiled"], causal=[False, True], threads=[1], **TINY)
    assert isinstance(gen, types.GeneratorType)
    first = next(gen)
    assert first["backend"] == "numpy-standard" and first["N"] == 16
    rows = [first, *gen]
    assert len(rows) == 8
    for r in rows:
        assert tuple(r) == sweeps.COLUMNS
        assert r["ms"] > 0 and r["gflops"] > 0 and r["skipped"] == ""
        assert r["ms"] <= r["ms_p75"] and r["ms"] <= r["ms_median"] and isinstance(r["noisy"], bool)
        assert r["repeats"] >= 2 and r["calls"] >= 1 and r["warmup_ms"] >= 0
        assert r["gflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e9)  # at the fastest sample
        assert r["threads"] == 1 and r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["flops"] == timing.attention_flops(1, 2, r["N"], r["N"], 8, causal=r["causal"])
        assert r["machine"]


def test_default_backends_are_available_cpu_backends():
    names = sweeps.default_backends()
    assert names
    by_name = {b["name"]: b for b in flashkit.backends()}
    assert all(by_name[n]["available"] and by_name[n]["device"] == "cpu" for n in names)
    assert sweeps.Sweep().backends == tuple(names)


def test_sweep_skips_a_point_the_backend_cannot_serve(monkeypatch):
    """A backend limited to d=128 gets a 'skipped' row at d=8, not a crash, and is timed at d=128."""
    only128 = Backend(name="test-d128", device="cpu", summary="test", runner="flashkit.reference:standard_attention",
                      head_dims=(128,))
    real = registry.all_backends
    monkeypatch.setattr(registry, "all_backends", lambda: real() + (only128,))
    rows = list(sweeps.sweep(backends=["test-d128"], N=[16], d=[8, 128], heads=[1], repeats=1, warmup=0))
    skipped, timed = rows
    assert skipped["ms"] is None and skipped["gflops"] is None and "d=8" in skipped["skipped"]
    assert timed["ms"] > 0 and timed["skipped"] == ""
    table = export.format_table(rows)
    assert "note" in table.splitlines()[0] and skipped["skipped"] in table


@pytest.mark.parametrize("kw, message", [
    ({"backends": ["no-such"]}, "backends must be names"),
    ({"backends": []}, "backends must not be empty"),
    ({"N": [0]}, "N must be a positive integer"),
    ({"d": [2.5]}, "d must be a positive integer"),
    ({"heads": [-1]}, "heads must be a positive integer"),
    ({"dtype": ["int8"]}, "dtype must be one of"),
    ({"causal": ["yes"]}, "causal must be"),
    ({"threads": [10_000]}, "threads must be between 1 and"),
    ({"repeats": 0}, "repeats must be a positive integer"),
    ({"batch": 0}, "batch must be a positive integer"),
    ({"budget_s": -1}, "budget_s must be a number of seconds"),
    ({"seconds_per_point": "fast"}, "seconds_per_point must be a number of seconds"),
    ({"peers": ["no-such"]}, "peers must be names from PEERS"),
])
def test_sweep_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        sweeps.Sweep(**kw)


def test_sweep_unavailable_backend_says_why(monkeypatch):
    broken = Backend(name="test-broken", device="cpu", summary="test", runner="flashkit.reference:standard_attention",
                     probe="flashkit.measure.timing:_no_such_probe")
    real = registry.all_backends
    monkeypatch.setattr(registry, "all_backends", lambda: real() + (broken,))
    with pytest.raises(ValueError, match="'test-broken' is not available"):
        sweeps.Sweep(backends=["test-broken"])


def test_a_spent_budget_skips_the_remaining_points_and_says_so():
    """The whole sweep's timing is bounded: past budget_s, points are skipped with that reason."""
    rows = list(sweeps.sweep(backends=["numpy-standard"], N=[16, 24, 32], d=[8], heads=[1], repeats=3,
                             warmup=0, seconds_per_point=0.05, budget_s=0.01))
    assert rows[0]["ms"] > 0  # the first point starts inside the budget and finishes
    assert all(r["ms"] is None and "time budget" in r["skipped"] for r in rows[1:])
    assert "time budget" in export.format_table(rows)


def test_torch_cpu_peer_is_timed_on_the_same_points():
    pytest.importorskip("torch")
    rows = list(sweeps.sweep(backends=["numpy-standard"], peers=["torch-sdpa-cpu"], N=[16], d=[8], heads=[1],
                             causal=[False, True], repeats=3, warmup=1, seconds_per_point=0.01, threads=[1]))
    peer = [r for r in rows if r["backend"] == "torch-sdpa-cpu"]
    assert len(peer) == 2 and all(r["ms"] > 0 and r["device"] == "cpu" and r["threads"] == 1 for r in peer)
    assert sweeps.default_peers() == ["torch-sdpa-cpu"]


def test_one_value_stands_for_a_list():
    spec = sweeps.Sweep(backends="numpy-standard", N=32, d=8, heads=1, causal=True, dtype="float64")
    assert spec.N == (32,) and spec.causal == (True,) and spec.dtype == ("float64",)


def test_threads_limit_sets_and_restores_numba_threads():
    numba = pytest.importorskip("numba")
    before = numba.get_num_threads()
    with threads.threads_limit(1):
        assert numba.get_num_threads() == 1 == threads.current_threads()
    assert numba.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        with threads.threads_limit(0):
            pass
