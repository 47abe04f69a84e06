"""Ring attention (flashkit.distributed): exact against single-device attention, in the simulated ring
and on real MPI ranks; every rank stops with a clear error when one fails or the ranks disagree."""
import importlib
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

import flashkit
from flashkit import masks
from flashkit.distributed import (RingMismatch, RingPeerError, RingStats, RingTimeout, pair_box, ring_attention,
                                  ring_attention_backward, segments, simulate, split_sequence, unsplit_sequence,
                                  virtual_ranks, work_per_rank)
from flashkit.distributed import mpi as ring_mpi
from tests.conftest import stable_seed

TOL = {np.float64: 1e-12, np.float32: 2e-5}
# (causal, window): plain, causal, a window wider than a chunk on both sides, causal with a left window
MASKS = [(False, None), (True, None), (False, (6, 2)), (True, (9, -1))]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def make(seed, B, Hq, Hkv, Nq, Nk, d, dtype):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, Hq, Nq, d)).astype(dtype), rng.standard_normal((B, Hkv, Nk, d)).astype(dtype),
            rng.standard_normal((B, Hkv, Nk, d)).astype(dtype), rng.standard_normal((B, Hq, Nq, d)).astype(dtype))


def run_ring(q, k, v, do, size, split, causal, window, timeout=20):
    """Forward and backward on `size` virtual ranks; the global o, lse, dq, dk, dv put back together."""
    parts = [split_sequence(x, size, split) for x in (q, k, v, do)]

    def rank(comm):
        q_r, k_r, v_r, do_r = (p[comm.rank] for p in parts)
        o, lse = ring_attention(q_r, k_r, v_r, comm=comm, causal=causal, window=window, split=split, return_lse=True)
        grads = ring_attention_backward(do_r, q_r, k_r, v_r, o, lse, comm=comm, causal=causal, window=window, split=split)
        return (o, lse) + grads

    res = simulate(rank, size, timeout=timeout)
    axes = (-2, -1, -2, -2, -2)
    return [unsplit_sequence([r[i] for r in res], split, axis=ax) for i, ax in enumerate(axes)]


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("split", ["contiguous", "zigzag"])
def test_simulated_ring_is_exact(size, split):
    # N = 23 and 26 are no multiple of 2, 3, 4 or 8; (Hq, Hkv) = (4, 2) is GQA, (2, 1) MQA with Nq != Nk.
    shapes = [(1, 4, 2, 23, 23, 8), (2, 2, 1, 19, 26, 5)]
    for dtype in (np.float64, np.float32):
        for shape in shapes:
            for causal, window in MASKS:
                seed = stable_seed("ring", size, split, dtype.__name__, shape, causal, window)
                q, k, v, do = make(seed, *shape, dtype)
                o_ref, lse_ref = flashkit.attention(q, k, v, causal=causal, window=window, return_lse=True)
                g_ref = flashkit.attention_backward(do, q, k, v, o_ref, lse_ref, causal=causal, window=window)
                o, lse, dq, dk, dv = run_ring(q, k, v, do, size, split, causal, window)
                where = f"seed={seed} size={size} {split} {dtype.__name__} shape={shape} causal={causal} window={window}"
                assert o.dtype == q.dtype and lse.dtype == lse_ref.dtype, where
                assert np.array_equal(np.isneginf(lse), np.isneginf(lse_ref)), where
                fin = np.isfinite(lse_ref)
                assert np.max(np.abs(lse[fin] - lse_ref[fin]), initial=0) <= TOL[dtype] * 10, where
                for name, got, ref in (("o", o, o_ref), ("dq", dq, g_ref[0]), ("dk", dk, g_ref[1]), ("dv", dv, g_ref[2])):
                    assert rel(got, ref) <= TOL[dtype], f"{name}: {rel(got, ref):.2e} {where}"


def test_rows_that_see_nothing_and_one_token_per_rank():
    # causal with Nq > Nk, bottom-right: the first 5 rows see no key at all (o = 0, lse = -inf)
    q, k, v, do = make(7, 1, 2, 2, 9, 4, 3, np.float64)
    o_ref, lse_ref = flashkit.attention(q, k, v, causal=True, return_lse=True)
    assert np.isneginf(lse_ref).any()
    for size in (2, 4):
        o, lse, *_ = run_ring(q, k, v, do, size, "zigzag", True, None)
        assert np.array_equal(o[np.isneginf(lse_ref)], np.zeros_like(o[np.isneginf(lse_ref)]))
        assert rel(o, o_ref) < 1e-12 and np.array_equal(np.isneginf(lse), np.isneginf(lse_ref))
    o, *_ = run_ring(q, k, v, do, 4, "contiguous", True, None)  # 4 ranks, Nk = 4: one key a rank
    assert rel(o, o_ref) < 1e-12


def test_layouts_and_ranks_of_the_input():
    q, k, v, _ = make(3, 1, 4, 2, 13, 13, 6, np.float64)
    o_ref, lse_ref = flashkit.attention(q, k, v, causal=True, return_lse=True)
    qn, kn, vn = (x.transpose(0, 2, 1, 3).copy() for x in (q, k, v))  # (B, N, H, d)
    parts = [split_sequence(x, 2, "zigzag", axis=-3) for x in (qn, kn, vn)]
    res = simulate(lambda c: ring_attention(*(p[c.rank] for p in parts), comm=c, causal=True, split="zigzag",
                                            layout="bnhd", return_lse=True), 2)
    o = unsplit_sequence([r[0] for r in res], "zigzag", axis=-3)
    assert o.shape == qn.shape and rel(o.transpose(0, 2, 1, 3), o_ref) < 1e-12
    assert res[0][1].shape == (1, 4, 7)  # lse (B, H, N_local), as flash_attn returns it
    # (N, d) input, one head: o (N_local, d), lse (N_local,)
    q2, k2, v2 = q[0, 0], k[0, 0], v[0, 0]
    res = simulate(lambda c: ring_attention(*(split_sequence(x, 3)[c.rank] for x in (q2, k2, v2)), comm=c,
                                            return_lse=True), 3)
    assert res[0][0].shape == (5, 6) and res[0][1].shape == (5,)
    assert rel(np.concatenate([r[0] for r in res]), flashkit.attention(q2, k2, v2)) < 1e-12


def test_pair_box_reproduces_the_global_mask():
    """The box and window of every block pair describe exactly the global mask's visible scores."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        Nq, Nk = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        left, right = (int(x) for x in rng.integers(-1, 8, size=2))
        causal = bool(rng.integers(2))
        window = masks.effective_window(causal, (left, right))
        dense = masks.dense_mask(Nq, Nk, window)
        qs, ks = sorted(rng.integers(0, Nq + 1, size=2)), sorted(rng.integers(0, Nk + 1, size=2))
        box = pair_box(tuple(qs), tuple(ks), Nq, Nk, window)
        want = dense[qs[0]:qs[1], ks[0]:ks[1]]
        got = np.zeros_like(want)
        if box is not None:
            sub = masks.dense_mask(box.r1 - box.r0, box.c1 - box.c0, (-1, -1) if box.window is None else box.window)
            got[box.r0:box.r1, box.c0:box.c1] = sub
            assert box.visible == want.sum()
        assert np.array_equal(got, want), f"trial {trial}: Nq={Nq} Nk={Nk} window={window} q={qs} k={ks} box={box}"


def test_splits_and_causal_work_per_rank():
    x = np.arange(2 * 3 * 31 * 2).reshape(2, 3, 31, 2)
    for split in ("contiguous", "zigzag"):
        for size in (1, 2, 3, 4):
            parts = split_sequence(x, size, split)
            assert sum(p.shape[-2] for p in parts) == 31
            assert np.array_equal(unsplit_sequence(parts, split), x)
    assert segments(10, 2, 0, "zigzag") == ((0, 3), (8, 10)) and segments(10, 2, 1, "zigzag") == ((3, 6), (6, 8))
    causal = masks.effective_window(True, None)
    total = int(masks.dense_mask(64, 64, causal).sum())
    contiguous, zigzag = (work_per_rank(64, 4, s, causal).sum(axis=1) for s in ("contiguous", "zigzag"))
    assert contiguous.sum() == zigzag.sum() == total
    assert contiguous.max() / contiguous.min() > 5  # the last rank does ~7x the first's work
    assert zigzag.max() / zigzag.min() < 1.1  # zigzag: balanced to a few scores
    with pytest.raises(ValueError, match="size must be between 1 and the sequence length"):
        split_sequence(x, 32)
    with pytest.raises(ValueError, match="split must be one of"):
        segments(10, 2, 0, "striped")


def test_stats_count_the_work_and_the_skipped_pairs():
    q, k, v, _ = make(5, 1, 2, 2, 40, 40, 4, np.float64)
    parts = [split_sequence(x, 4) for x in (q, k, v)]
    stats = [RingStats() for _ in range(4)]
    simulate(lambda c: ring_attention(*(p[c.rank] for p in parts), comm=c, causal=True, stats=stats[c.rank]), 4)
    assert [len(s.steps) for s in stats] == [4, 4, 4, 4]
    assert sum(s.visible_scores for s in stats) == 2 * masks.dense_mask(40, 40, (-1, 0)).sum()
    assert stats[0].steps[1]["skipped"] == 1  # rank 0's queries see nothing of rank 3's keys
    assert all(s.bytes_sent == 3 * 2 * 10 * 2 * 4 * 8 for s in stats)  # 3 hops of K and V, (1, 2, 10, 4) float64
    assert 0.0 <= stats[3].hidden_fraction(1e-3) <= 1.0


def _every_rank(fn, size, timeout=10):
    """fn(comm) on each virtual rank; the exception (or result) of every rank."""
    comms = virtual_ranks(size, timeout)
    out = [None] * size

    def go(r):
        try:
            out[r] = fn(comms[r])
        except Exception as exc:  # noqa: BLE001
            out[r] = exc
            if not isinstance(exc, (RingMismatch, RingPeerError)):  # as simulate() does
                comms[r].abort(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=go, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return out


def test_mismatch_raises_on_every_rank():
    q, k, v, _ = make(2, 1, 2, 2, 12, 12, 4, np.float64)
    parts = [split_sequence(x, 3) for x in (q, k, v)]

    def wrong_chunk(c):  # rank 1 holds one query too many
        q_r = parts[0][c.rank] if c.rank != 1 else np.concatenate([parts[0][1], parts[0][1][..., :1, :]], axis=-2)
        return ring_attention(q_r, parts[1][c.rank], parts[2][c.rank], comm=c)

    for exc in _every_rank(wrong_chunk, 3):
        assert isinstance(exc, RingMismatch) and "do not form a contiguous split" in str(exc) and "[4, 5, 4]" in str(exc)

    def other_options(c):  # rank 2 asks for causal, rank 0 for zigzag
        return ring_attention(*(p[c.rank] for p in parts), comm=c, causal=c.rank == 2)

    for exc in _every_rank(other_options, 3):
        assert isinstance(exc, RingMismatch) and "disagree on causal" in str(exc) and "rank 2: causal=True" in str(exc)


def test_bad_input_on_one_rank_stops_every_rank():
    q, k, v, _ = make(4, 1, 2, 2, 12, 12, 4, np.float64)
    parts = [split_sequence(x, 3) for x in (q, k, v)]

    def nan_on_rank_1(c):
        q_r = parts[0][c.rank].copy()
        if c.rank == 1:
            q_r[0, 0, 0, 0] = np.nan
        return ring_attention(q_r, parts[1][c.rank], parts[2][c.rank], comm=c)

    out = _every_rank(nan_on_rank_1, 3)
    assert isinstance(out[1], ValueError) and "q contains NaN" in str(out[1])
    for r in (0, 2):  # the error reaches them by the agreement step or, if rank 1 stopped first, by its abort
        assert isinstance(out[r], RingPeerError) and re.search(r"rank 1(:| failed:) ValueError: q contains NaN",
                                                               str(out[r])), str(out[r])


def test_a_rank_failing_mid_ring_or_never_calling_stops_the_others():
    q, k, v, _ = make(6, 1, 2, 2, 12, 12, 4, np.float64)
    parts = [split_sequence(x, 3) for x in (q, k, v)]

    def fail_at_step_1(c):
        if c.rank == 2:
            original = c.isendrecv
            calls = []

            def isendrecv(*a, **kw):
                calls.append(1)
                if len(calls) == 3:  # two agreement steps, then the first block exchange
                    raise RuntimeError("injected")
                return original(*a, **kw)

            c.isendrecv = isendrecv
        return ring_attention(*(p[c.rank] for p in parts), comm=c)

    out = _every_rank(fail_at_step_1, 3)
    assert isinstance(out[2], RuntimeError)
    assert all(isinstance(out[r], RingPeerError) and "rank 2 failed: RuntimeError: injected" in str(out[r]) for r in (0, 1))

    def rank_1_never_calls(c):
        if c.rank == 1:
            return None
        return ring_attention(*(p[c.rank] for p in parts), comm=c)

    out = _every_rank(rank_1_never_calls, 3, timeout=0.5)
    # the first rank to time out tells the other, which may stop on that notice before its own timeout
    assert any(isinstance(out[r], RingTimeout) for r in (0, 2)), out
    for r in (0, 2):
        assert isinstance(out[r], (RingTimeout, RingPeerError)) and "did not complete within 0.5 s" in str(out[r]), out


def test_bad_arguments_name_what_was_expected():
    q, k, v, _ = make(8, 1, 2, 2, 8, 8, 4, np.float64)
    (c,) = virtual_ranks(1)
    with pytest.raises(TypeError, match="comm must be a flashkit.distributed Communicator"):
        ring_attention(q, k, v, comm=object())
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, k, v, comm=c, layout="bsnd")
    with pytest.raises(ValueError, match="split must be one of"):
        ring_attention(q, k, v, comm=c, split="striped")
    with pytest.raises(ValueError, match="window must be a pair"):
        ring_attention(q, k, v, comm=c, window=(-3, 1))
    with pytest.raises(ValueError, match="in layout 'bnhd'"):
        ring_attention(q[0, 0], k[0, 0], v[0, 0], comm=c, layout="bnhd")
    with pytest.raises(TypeError, match="stats must be None or a RingStats"):
        ring_attention(q, k, v, comm=c, stats={})
    with pytest.raises(ValueError, match="lse must have shape"):
        ring_attention_backward(q, q, k, v, q, np.zeros(3), comm=c)
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        virtual_ranks(2, timeout=0)
    before = [x.copy() for x in (q, k, v)]
    ring_attention(q, k, v, comm=c, causal=True)
    assert all(np.array_equal(a, b) for a, b in zip(before, (q, k, v))), "inputs modified"


# --- real MPI ranks ------------------------------------------------------------------------------------

needs_mpi = pytest.mark.skipif(not ring_mpi.available(), reason="mpi4py is not installed (pip install 'flashkit[distributed]')")


def _mpi_check(n, *args, timeout=120):
    cmd = ring_mpi.mpiexec(n) + [sys.executable, "-m", "flashkit.distributed.check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@needs_mpi
def test_mpi_ranks_are_exact():
    out = _mpi_check(3)
    assert out.returncode == 0 and "RING-CHECK OK ranks=3 cases=20" in out.stdout, out.stdout + out.stderr
    assert sum(f"rank {r} of 3: 20 cases" in out.stdout for r in range(3)) == 3, out.stdout


@needs_mpi
def test_mpi_rank_that_raises_stops_every_rank():
    out = _mpi_check(2, "--fault", "raise", "--timeout", "10", timeout=60)
    assert out.returncode != 0
    assert "rank 1: RuntimeError: injected failure" in out.stdout, out.stdout + out.stderr
    assert "rank 0: RingPeerError: rank 0 of 2 stops: rank 1 failed: RuntimeError: injected failure" in out.stdout, out.stdout


@needs_mpi
def test_mpi_rank_that_stalls_times_out_and_ends_the_job():
    out = _mpi_check(3, "--fault", "stall", "--timeout", "2", timeout=60)
    assert out.returncode != 0
    assert "RingTimeout" in out.stdout and "did not complete within 2 s" in out.stdout, out.stdout + out.stderr
    for r in (0, 2):  # each timed out itself or stopped on the notice of the one that did
        assert (f"rank {r}: RingTimeout: rank {r} of 3:" in out.stdout
                or f"rank {r}: RingPeerError: rank {r} of 3 stops" in out.stdout), out.stdout


def test_gpu_check_says_clearly_that_there_is_no_gpu(tmp_path):
    from flashkit.distributed import nccl

    ok, why = nccl.available()
    if ok:
        pytest.skip("a GPU with NCCL is here: benchmarks/gpu_ring_check.py runs for real")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_ring_check", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "gpu_ring_check: no GPU" in out.stderr, out.stdout + out.stderr


def test_pieces_for_transport_progress_give_the_same_answer(monkeypatch):
    """MPIComm computes block pairs in pieces of query rows (to poll MPI between them): same answer."""
    ring_module = importlib.import_module("flashkit.distributed.ring")

    monkeypatch.setattr(ring_module, "PIECE_MIN_ROWS", 2)
    q, k, v, do = make(9, 1, 4, 2, 31, 31, 4, np.float64)
    o_ref, lse_ref = flashkit.attention(q, k, v, causal=True, window=(7, 3), return_lse=True)
    g_ref = flashkit.attention_backward(do, q, k, v, o_ref, lse_ref, causal=True, window=(7, 3))
    parts = [split_sequence(x, 3, "zigzag") for x in (q, k, v, do)]
    stats = RingStats()

    def rank(comm):
        comm.progress_pieces = 3
        q_r, k_r, v_r, do_r = (p[comm.rank] for p in parts)
        o, lse = ring_attention(q_r, k_r, v_r, comm=comm, causal=True, window=(7, 3), split="zigzag", return_lse=True,
                                stats=stats if comm.rank == 0 else None)
        return (o,) + ring_attention_backward(do_r, q_r, k_r, v_r, o, lse, comm=comm, causal=True, window=(7, 3),
                                              split="zigzag")

    res = simulate(rank, 3)
    assert max(st["pairs"] for st in stats.steps[:-1]) > 4  # more calls than the 4 segment pairs
    for i, ref in enumerate((o_ref,) + g_ref):
        assert rel(unsplit_sequence([r[i] for r in res], "zigzag"), ref) < 1e-12
