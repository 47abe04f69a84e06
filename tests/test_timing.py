"""flashkit.measure.timing: one timed call, the FLOP formula, the sweep generator, atomic exports."""
import csv
import io
import json
import os
import types

import numpy as np
import pytest

import flashkit
from flashkit import problem, registry, validate
from flashkit.measure import timing
from flashkit.registry import Backend

TINY = dict(N=[16, 40], d=[8], heads=[2], repeats=2, warmup=1)


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


# --- the sweep ------------------------------------------------------------------------------
def test_sweep_points_order_and_count():
    spec = timing.Sweep(backends=["numpy-standard", "numpy-tiled"], causal=[False, True], **TINY)
    points = spec.points()
    assert len(spec) == len(points) == 2 * 2 * 2
    assert [p["N"] for p in points[:2]] == [16, 40]  # N innermost: one line grows at a time
    assert [p["backend"] for p in points[:4]] == ["numpy-standard"] * 2 + ["numpy-tiled"] * 2


def test_sweep_yields_rows_one_at_a_time():
    gen = timing.sweep(backends=["numpy-standard", "numpy-tiled"], causal=[False, True], threads=[1], **TINY)
    assert isinstance(gen, types.GeneratorType)
    first = next(gen)
    assert first["backend"] == "numpy-standard" and first["N"] == 16
    rows = [first, *gen]
    assert len(rows) == 8
    for r in rows:
        assert tuple(r) == timing.COLUMNS
        assert r["ms"] > 0 and r["gflops"] > 0 and r["skipped"] == ""
        assert r["threads"] == 1 and r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["flops"] == timing.attention_flops(1, 2, r["N"], r["N"], 8, causal=r["causal"])
        assert r["machine"]


def test_default_backends_are_available_cpu_backends():
    names = timing.default_backends()
    assert names
    by_name = {b["name"]: b for b in flashkit.backends()}
    assert all(by_name[n]["available"] and by_name[n]["device"] == "cpu" for n in names)
    assert timing.Sweep().backends == tuple(names)


def test_sweep_skips_a_point_the_backend_cannot_serve(monkeypatch):
    """A backend limited to d=128 gets a 'skipped' row at d=8, not a crash, and is timed at d=128."""
    only128 = Backend(name="test-d128", device="cpu", summary="test", runner="flashkit.reference:standard_attention",
                      head_dims=(128,))
    real = registry.all_backends
    monkeypatch.setattr(registry, "all_backends", lambda: real() + (only128,))
    rows = list(timing.sweep(backends=["test-d128"], N=[16], d=[8, 128], heads=[1], repeats=1, warmup=0))
    skipped, timed = rows
    assert skipped["ms"] is None and skipped["gflops"] is None and "d=8" in skipped["skipped"]
    assert timed["ms"] > 0 and timed["skipped"] == ""
    table = timing.format_table(rows)
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
])
def test_sweep_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        timing.Sweep(**kw)


def test_sweep_unavailable_backend_says_why(monkeypatch):
    broken = Backend(name="test-broken", device="cpu", summary="test", runner="flashkit.reference:standard_attention",
                     probe="flashkit.measure.timing:_no_such_probe")
    real = registry.all_backends
    monkeypatch.setattr(registry, "all_backends", lambda: real() + (broken,))
    with pytest.raises(ValueError, match="'test-broken' is not available"):
        timing.Sweep(backends=["test-broken"])


def test_one_value_stands_for_a_list():
    spec = timing.Sweep(backends="numpy-standard", N=32, d=8, heads=1, causal=True, dtype="float64")
    assert spec.N == (32,) and spec.causal == (True,) and spec.dtype == ("float64",)


def test_threads_limit_sets_and_restores_numba_threads():
    numba = pytest.importorskip("numba")
    before = numba.get_num_threads()
    with timing.threads_limit(1):
        assert numba.get_num_threads() == 1 == timing.current_threads()
    assert numba.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        with timing.threads_limit(0):
            pass


# --- exports --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rows():
    return list(timing.sweep(backends=["numpy-standard"], N=[16], d=[8], heads=[1], causal=[False, True],
                             repeats=1, warmup=0))


def test_write_json_structure(tmp_path, rows):
    path = timing.write_json(rows, tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "results"}
    assert data["results"] == rows
    meta = data["meta"]
    assert {"created", "commit", "info", "load_average", "blas"} <= set(meta)
    assert meta["info"]["flashkit"] == flashkit.info()["flashkit"] and "numpy" in meta["info"]["versions"]
    assert meta["commit"] is None or len(meta["commit"].split("-")[0]) == 40


def test_write_csv_is_one_plain_table(tmp_path, rows):
    path = timing.write_csv(rows, tmp_path / "r.csv")
    table = list(csv.DictReader(io.StringIO(path.read_text())))
    assert len(table) == len(rows)
    assert list(table[0])[: len(timing.COLUMNS)] == list(timing.COLUMNS)
    assert {"flashkit", "numpy", "commit"} <= set(table[0])
    assert float(table[0]["ms"]) == pytest.approx(rows[0]["ms"])
    assert table[1]["causal"] == "True"


def test_metadata_records_the_sweep():
    spec = timing.Sweep(backends=["numpy-standard"], N=[16], d=[8])
    meta = timing.metadata(spec)
    assert meta["sweep"]["N"] == (16,) and meta["sweep"]["backends"] == ("numpy-standard",)
    json.dumps(meta, default=list)


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    timing.write_atomic(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(timing.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        timing.write_atomic(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_atomic_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        timing.write_atomic(tmp_path / "nope" / "x.json", "{}")


def test_format_table_lists_every_row(rows):
    text = timing.format_table(rows).splitlines()
    assert len(text) == 2 + len(rows)
    assert text[0].split()[:2] == ["backend", "B"]
    assert all("numpy-standard" in line for line in text[2:])
