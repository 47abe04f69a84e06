"""flashkit.measure: measured peak memory, the analytic counts, and the HBM-traffic model (fast)."""
import numpy as np
import pytest

from flashkit.measure import io_model, memory

MiB = 2 ** 20


# ------------------------------------------------------------------------------------ measured memory
def test_tracemalloc_sees_a_numpy_buffer_and_subtracts_the_output():
    def make_and_drop():
        tmp = np.ones((512, 1024), np.float64)  # 4 MiB, freed before returning
        return np.zeros(1024, np.float32) + tmp[0, :1024].astype(np.float32)

    out, report = memory.measure(make_and_drop)
    assert report.method == "tracemalloc"
    assert report.output_bytes == out.nbytes == 4096
    assert 4 * MiB <= report.extra_bytes < 4 * MiB + 64 * 1024


def test_standard_attention_measures_one_score_matrix_per_head():
    rng = np.random.default_rng(0)
    H, N, d = 2, 384, 32
    q, k, v = (rng.standard_normal((1, H, N, d), dtype=np.float32) for _ in range(3))
    report = memory.attention_peak(q, k, v, backend="numpy-standard")
    scores = H * N * N * 4  # S, with P computed in its buffer
    assert scores <= report.extra_bytes <= 1.2 * scores
    assert report.output_bytes == q.nbytes + H * N * 4  # O and lse are returned and subtracted


def test_tiled_memory_does_not_grow_with_heads_and_stays_far_below_standard():
    rng = np.random.default_rng(1)
    N, d = 512, 32
    q1 = rng.standard_normal((1, 1, N, d), dtype=np.float32)
    q4 = rng.standard_normal((1, 4, N, d), dtype=np.float32)
    one = memory.attention_peak(q1, q1, q1, backend="numpy-tiled").extra_bytes
    four = memory.attention_peak(q4, q4, q4, backend="numpy-tiled").extra_bytes
    standard = memory.attention_peak(q4, q4, q4, backend="numpy-standard").extra_bytes
    assert four < 1.5 * one  # heads run one after the other: the working set is reused
    assert four < standard / 5


def test_inputs_are_not_modified():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 1, 64, 16), dtype=np.float32) for _ in range(3))
    copies = [a.copy() for a in (q, k, v)]
    memory.attention_peak(q, k, v, backend="numpy-tiled", causal=True)
    for a, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.skipif(not memory.rss_available(), reason="needs Linux /proc/self/clear_refs")
def test_rss_sees_touched_pages():
    def touch():
        a = np.empty(16 * MiB // 8)
        a.fill(1.0)  # pages count only once written
        return None

    _, report = memory.measure(touch, method="rss")
    assert report.method == "rss" and report.output_bytes == 0
    assert 15 * MiB <= report.extra_bytes <= 24 * MiB


def test_cupy_pool_peak_on_the_gpu():
    cp = pytest.importorskip("cupy")
    try:
        x = cp.ones((4096, 256), cp.float32)
    except Exception as exc:  # CuPy installed but no usable GPU
        pytest.skip(f"no GPU: {exc}")
    out, report = memory.measure(lambda a: (a @ a.T).sum(axis=1), x)  # a 4096 x 4096 float32 temporary
    assert report.method == "cupy-pool" and report.output_bytes == out.nbytes == 4096 * 4
    assert 64 * MiB <= report.extra_bytes <= 65 * MiB


def test_default_method_by_backend():
    assert memory.default_method("numpy-standard") == "tracemalloc"
    expected = "rss" if memory.rss_available() else "tracemalloc"
    assert memory.default_method("numba") == expected


def test_bad_method_is_named():
    with pytest.raises(ValueError, match="method"):
        memory.measure(np.ones, 3, method="valgrind")


# ------------------------------------------------------------------------------------ analytic counts
def test_analytic_counts_by_hand():
    # N = 512, 8 heads, float32: S and P are 8 * 512^2 * 4 bytes = 8 MiB each (the seed's "16 MB").
    assert memory.analytic_standard(1, 8, 512, 512) == {"S": 8 * MiB, "P": 8 * MiB}
    # d = 64, Br = 64, Bc = 256: Q_i, O_i 64*64; K_j, V_j 256*64; m_i, l_i 64; S_ij 64*256 (words of 4 bytes)
    tiles = memory.analytic_tiled(64, 64, 256)
    assert tiles["Q_i"] == tiles["O_i"] == 64 * 64 * 4
    assert tiles["K_j"] == tiles["V_j"] == 256 * 64 * 4
    assert tiles["m_i"] == tiles["l_i"] == 64 * 4 and tiles["S_ij"] == 64 * 256 * 4
    assert sum(memory.analytic_tiled(64, 64, 256, workers=2).values()) == 2 * sum(tiles.values())
    with pytest.raises(ValueError, match="Br"):
        memory.analytic_tiled(64, 0, 256)


def test_fits_recover_known_growth():
    N = np.array([256, 512, 1024, 2048, 4096])
    assert memory.fit_loglog_slope(N, 4.0 * N ** 2) == pytest.approx(2.0)
    fit = memory.fit_power_law(N, 200_000 + 300.0 * N)
    assert fit["p"] == pytest.approx(1.0, abs=0.02)
    assert fit["a"] == pytest.approx(200_000, rel=0.05) and fit["b"] == pytest.approx(300, rel=0.1)
    with pytest.raises(ValueError, match="positive"):
        memory.fit_loglog_slope([1, 2], [0, 1])


def test_largest_n_that_fits():
    assert memory.largest_n_that_fits(4.0, 4 * 100 ** 2) == 100
    assert memory.largest_n_that_fits(4.0, 4 * 100 ** 2 + 100 * 10, bytes_per_n=10) == 100
    assert memory.total_ram_bytes() > 0


# ------------------------------------------------------------------------------------ HBM-traffic model
def test_standard_io_by_hand():
    # N = 8, d = 2. Reads: Q 16 + K 16 (step 1), S 64 (step 2), P 64 + V 16 (step 3) = 176.
    # Writes: S 64 (step 1), P 64 (step 2), O 16 (step 3) = 144. Total 320 = 4(N d + N^2).
    c = io_model.standard_io(8, 2)
    assert c.reads == {"Q": 16, "K": 16, "S": 64, "P": 64, "V": 16}
    assert c.writes == {"S": 64, "P": 64, "O": 16}
    assert c.total == 320 == 4 * io_model.theta_standard(8, 2)


def test_tiled_io_by_hand():
    # N = 8, d = 2, M = 16: Bc = ceil(16 / (4*2)) = 2, Br = min(2, 2) = 2, Tr = Tc = 4.
    # FA2: Q read once (16); K and V read once per query block: 4 * 8 rows * 2 = 64 each;
    #      O written once (16), lse once (8). Total 144 + 24 = 168.
    fa2 = io_model.tiled_io(8, 2, 16, order="fa2")
    assert (fa2.Br, fa2.Bc) == (2, 2)
    assert fa2.reads == {"Q": 16, "K": 64, "V": 64} and fa2.writes == {"O": 16, "lse": 8}
    # FA1: line 2 writes O, l, m (16 + 8 + 8); K, V read once (16 + 16); each of the 16 tiles reads
    #      Q_i, O_i (4 + 4), l_i, m_i (2 + 2) and writes O_i (4), l_i, m_i (2 + 2): 16 * 12 + 16 * 8.
    fa1 = io_model.tiled_io(8, 2, 16, order="fa1")
    assert fa1.reads == {"K": 16, "V": 16, "Q": 64, "O": 64, "l": 32, "m": 32}
    assert fa1.writes == {"O": 16 + 64, "l": 8 + 32, "m": 8 + 32}
    assert fa1.total == 384


def test_tiled_io_ragged_and_causal_by_hand():
    # N = 5, d = 2, M = 16: blocks of 2, 2, 1 rows (Tr = 3): K, V read 3 times over 5 rows: 30 each.
    ragged = io_model.tiled_io(5, 2, 16)
    assert ragged.reads == {"Q": 10, "K": 30, "V": 30} and ragged.writes == {"O": 10, "lse": 5}
    # N = 4, d = 2, M = 16, causal: tiles (0,0), (1,0), (1,1) visible, (0,1) skipped.
    # Query block 0 loads K_0, V_0 (2 rows, 4 elements each); block 1 loads all 4 rows (8 each).
    causal = io_model.tiled_io(4, 2, 16, causal=True)
    assert causal.reads == {"Q": 8, "K": 12, "V": 12} and causal.writes == {"O": 8, "lse": 4}


def test_counts_scale_as_the_theorem_says():
    d, M = 64, 4096  # d <= M <= 4 d^2: Br = Bc = M / 4d = 16
    for N in (1024, 4096):
        s1, s2 = io_model.standard_io(N, d).total, io_model.standard_io(2 * N, d).total
        assert s2 / s1 == pytest.approx(4, rel=0.05)  # Θ(N d + N^2): quadratic once N >> d
        for order in io_model.ORDERS:
            t1, t2 = (io_model.tiled_io(n, d, M, order=order).total for n in (N, 2 * N))
            assert t2 / t1 == pytest.approx(4, rel=0.05)  # N^2
            # half the fast memory, twice the traffic; twice d, four times (M fixed): Θ(N^2 d^2 / M)
            assert io_model.tiled_io(N, d, M // 2, order=order).total / t1 == pytest.approx(2, rel=0.05)
            assert io_model.tiled_io(N, 2 * d, M, order=order).total / t1 == pytest.approx(4, rel=0.1)
    # Over a grid with d <= M <= N d, count / (N^2 d^2 / M) stays inside fixed bounds (FA1 order).
    ratios = [io_model.tiled_io(N, d, M, order="fa1").total / io_model.theta_tiled(N, d, M)
              for N in (256, 1024, 4096) for d in (16, 64) for M in (2 ** e for e in range(4, 19)) if d <= M <= N * d]
    assert 2 < min(ratios) and max(ratios) < 20


def test_fa2_stops_improving_past_4d2_and_crossover_near_2d2():
    N, d = 4096, 64
    flat = {io_model.tiled_io(N, d, M).total for M in (4 * d * d, 8 * d * d, 64 * d * d)}
    assert len(flat) == 1  # Br is capped at d: K and V are read N/d times whatever M is
    Ms = [2 ** e for e in range(6, 20)] + [3 * 2 ** e for e in range(6, 19)]
    cross = io_model.crossover_M(N, d, Ms, order="fa2")
    assert 1.5 * d * d <= cross <= 2.5 * d * d
    assert io_model.crossover_M(N, d, [64, 128]) is None


def test_io_model_rejects_bad_input():
    with pytest.raises(ValueError, match="N"):
        io_model.standard_io(0, 64)
    with pytest.raises(ValueError, match="order"):
        io_model.tiled_io(64, 16, 1024, order="fa3")
    with pytest.raises(ValueError, match="M"):
        io_model.tiled_io(64, 16, 2.5)


# ------------------------------------------------------------------------------------ figures
def test_memory_and_io_figures_are_titled_with_units():
    from flashkit.viz import io as vizio
    from flashkit.viz import memory as vizmem

    N = [256, 512, 1024, 2048]
    figs = [
        vizmem.loglog_figure(N, {"a": [4 * n * n for n in N]}, {"a": memory.fit_power_law(N, [4 * n * n + 1 for n in N])}),
        vizmem.projection_figure({"a": {"a": 0.0, "b": 4.0, "p": 2.0}}, 2 ** 34, 65536, 131072, runs=[("run", 100000, MiB)]),
        vizio.accesses_vs_M_figure(1024, 64, [64, 1024, 16384]),
        vizio.breakdown_figure(1024, 64, 4096),
        vizio.crossover_figure(1024, [32, 64], [2 ** e for e in range(5, 18)]),
    ]
    for fig in figs:
        assert fig.layout.title.text
        assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    assert "MiB" in figs[0].layout.yaxis.title.text and "MiB" in figs[3].layout.yaxis.title.text
    assert figs[0].data[0].y[-1] == pytest.approx(4 * 2048 ** 2 / MiB)
