"""Fast tests of the helpers of notebooks 00-03: flashkit/viz/{overview,heatmaps,softmax_stepper,tiling}.py."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from flashkit import masks, online_softmax
from flashkit.tiled import block_sizes
from flashkit.viz import heatmaps, overview, softmax_stepper, tiling


def assert_titled(fig):
    """A title, and a title on every x and y axis in the layout."""
    layout = fig.to_plotly_json()["layout"]
    assert layout.get("title", {}).get("text"), "figure has no title"
    axes = [k for k in layout if k.startswith(("xaxis", "yaxis"))]
    assert axes, "figure has no axes"
    for name in axes:
        text = layout[name].get("title", {}).get("text")
        assert text, f"{name} has no title"


# ---------------------------------------------------------------- online softmax stepper

def row(n=11, d=3, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n) * spread, rng.standard_normal((n, d))


def test_stepper_state_is_the_running_max_and_sum():
    s, V = row()
    for step in softmax_stepper.online_steps(s, V, block=4):
        seen = s[:step.j1]
        assert step.m == seen.max()
        np.testing.assert_allclose(step.l, np.exp(seen - seen.max()).sum(), rtol=1e-12)
        np.testing.assert_allclose(step.O, np.exp(seen - seen.max()) @ V[:step.j1], rtol=1e-12)
        np.testing.assert_allclose(step.weights.sum(), step.l, rtol=1e-12)
        # the rescaling factor takes the old state to the new max
        if step.index > 0:
            np.testing.assert_allclose(step.alpha, np.exp(step.m_old - step.m), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), block=st.integers(1, 12), seed=st.integers(0, 1000))
def test_stepper_matches_flashkit_online_softmax(n, block, seed):
    s, V = row(n, seed=seed, spread=10.0)
    steps = softmax_stepper.online_steps(s, V, block)
    assert [(x.j0, x.j1) for x in steps] == [(j, min(n, j + block)) for j in range(0, n, block)]
    state = online_softmax.init(1, V.shape[1])
    for j0 in range(0, n, block):
        state = online_softmax.update(state, s[None, j0:j0 + block], V[j0:j0 + block])
    O, lse = online_softmax.finalize(state)
    np.testing.assert_allclose(steps[-1].output, O[0], rtol=1e-12)
    np.testing.assert_allclose(steps[-1].m + np.log(steps[-1].l), lse[0], rtol=1e-12)
    # and the final weights are the safe softmax of the row
    np.testing.assert_allclose(steps[-1].weights / steps[-1].l, online_softmax.softmax_safe(s), rtol=1e-12)


def test_stepper_does_not_modify_input_and_rejects_bad_input():
    s, V = row()
    s0, V0 = s.copy(), V.copy()
    softmax_stepper.online_steps(s, V, 3)
    assert (s == s0).all() and (V == V0).all()
    with pytest.raises(ValueError, match="block"):
        softmax_stepper.online_steps(s, V, 0)
    with pytest.raises(ValueError, match="V must have shape"):
        softmax_stepper.online_steps(s, V[:-1], 3)
    with pytest.raises(ValueError, match="step"):
        softmax_stepper.step_figure(s, V, 4, 4)  # 3 blocks, numbered 1..3
    with pytest.raises(ValueError, match="counted from 1"):
        softmax_stepper.step_figure(s, V, 4, 0)


def test_step_figure_titled():
    s, V = row()
    for step in (1, 3):
        fig = softmax_stepper.step_figure(s, V, 4, step)
        assert_titled(fig)
        assert f"block {step} of 3" in fig.layout.title.text  # the argument is the number on screen


def test_overflow_table_shows_the_naive_nan():
    rows = dict(softmax_stepper.overflow_table([10.0, 50.0, 100.0]))
    assert np.isnan(rows["naive exp(x)/Σexp(x)"]).any()
    np.testing.assert_allclose(rows["safe (subtract max)"], rows["online, blocks of 2"], rtol=1e-6)
    assert np.isfinite(rows["safe (subtract max)"]).all()


def test_stepper_widget_builds():
    pytest.importorskip("ipywidgets")
    s, V = row()
    box = softmax_stepper.stepper(s, V, 4)
    slider = box.children[0].children[1]
    assert (slider.min, slider.max) == (1, 3)  # blocks numbered from 1 on screen
    slider.value = 3  # drives the callback outside a kernel: an error would raise here


# ---------------------------------------------------------------- tiling

def block_map_for(Nq, Nk, Br, Bc, causal, window):
    return masks.block_map(Nq, Nk, Br, Bc, masks.effective_window(causal, window))


@settings(max_examples=60, deadline=None)
@given(Nq=st.integers(1, 70), Nk=st.integers(1, 70), Br=st.integers(1, 16), Bc=st.integers(1, 16),
       causal=st.booleans(), left=st.integers(-1, 30), order=st.sampled_from(tiling.ORDERS))
def test_steps_cover_every_non_skipped_tile_once(Nq, Nk, Br, Bc, causal, left, order):
    tiles = block_map_for(Nq, Nk, Br, Bc, causal, (left, -1))
    steps = tiling.loop_steps(order, tiles)
    visited = [(s.i, s.j) for s in steps]
    expected = {tuple(ij) for ij in np.argwhere(tiles != masks.SKIP)}
    assert len(visited) == len(set(visited)) == len(expected)
    assert set(visited) == expected
    assert [s.t for s in steps] == list(range(len(steps)))
    assert all(s.state == tiles[s.i, s.j] for s in steps)
    # the loop order: FA2 walks rows of tiles (i outer), FA1 columns (j outer)
    key = (lambda s: (s.i, s.j)) if order == "FA2" else (lambda s: (s.j, s.i))
    assert [key(s) for s in steps] == sorted(key(s) for s in steps)
    # a row of O is final exactly when its last computed tile is done, and stays final
    Tr = tiles.shape[0]
    for n, s in enumerate(steps):
        left_over = {i for i in range(Tr) if any(x.i == i for x in steps[n + 1:])}
        assert s.final == frozenset(range(Tr)) - left_over
    if steps:
        assert steps[-1].final == frozenset(range(Tr))


def test_traffic_of_the_two_orders():
    Tr, Tc = 3, 5
    tiles = np.full((Tr, Tc), masks.FULL, np.int8)
    fa2 = tiling.traffic(tiling.loop_steps("FA2", tiles))
    fa1 = tiling.traffic(tiling.loop_steps("FA1", tiles))
    # FA2: Q_i once per row block, K_j and V_j at every tile, O_i written once
    assert fa2 == {"Q": Tr, "K": Tr * Tc, "V": Tr * Tc, "O read": 0, "O write": Tr}
    # FA1: K_j, V_j once, Q_i and O_i read and O_i written at every tile
    assert fa1 == {"Q": Tr * Tc, "K": Tc, "V": Tc, "O read": Tr * Tc, "O write": Tr * Tc}
    for s in tiling.loop_steps("FA1", tiles) + tiling.loop_steps("FA2", tiles):
        assert s.loads <= s.resident
        assert s.resident == {("Q", s.i), ("K", s.j), ("V", s.j), ("O", s.i)}


def test_causal_fa1_finishes_rows_early_and_skips_half():
    tiles = block_map_for(64, 64, 16, 16, True, None)  # 4 x 4, lower triangle
    steps = tiling.loop_steps("FA1", tiles)
    assert len(steps) == 10
    w = tiling.work_summary(64, 64, 16, 16, causal=True)
    assert (w["skip"], w["partial"], w["full"], w["tiles"]) == (6, 4, 6, 16)
    assert w["computed_fraction"] == 10 / 16
    # FA1 finishes query block 3 (the last row) only at the very end; block 0 after column 0
    first_final = {i: next(s.t for s in steps if i in s.final) for i in range(4)}
    assert first_final[0] < first_final[1] < first_final[2] < first_final[3] == len(steps) - 1


def test_loop_steps_rejects_bad_input():
    with pytest.raises(ValueError, match="order"):
        tiling.loop_steps("FA3", np.ones((2, 2)))
    with pytest.raises(ValueError, match="tiles"):
        tiling.loop_steps("FA2", np.ones(3))


def test_fast_memory_use_matches_block_sizes():
    for M, d in ((1024, 64), (16384, 64), (65536, 128), (100, 16)):
        f = tiling.fast_memory_use(M, d)
        assert (f["Br"], f["Bc"]) == block_sizes(M, d)
        assert f["total"] == 2 * f["Br"] * d + 2 * f["Bc"] * d
        assert f["Bc"] == -(-M // (4 * d)) and f["Br"] == min(f["Bc"], d)


def test_tiling_figures_titled():
    assert_titled(tiling.grid_figure("FA1", 100, 90, 32, 16, 3, causal=True))
    assert_titled(tiling.grid_figure("FA2", 64, 64, 16, 16, 1, window=(8, 0)))
    assert_titled(tiling.block_map_figure(100, 100, 16, 32, causal=True))
    assert_titled(tiling.block_size_figure())
    assert_titled(tiling.fast_memory_figure(16384, 64))
    with pytest.raises(ValueError, match="step"):
        tiling.grid_figure("FA2", 64, 64, 16, 16, 17)  # 16 steps, numbered 1..16
    with pytest.raises(ValueError, match="counted from 1"):
        tiling.grid_figure("FA2", 64, 64, 16, 16, 0)


def test_grid_figure_says_what_is_done_and_tells_unvisited_from_skipped():
    fig = tiling.grid_figure("FA2", 256, 256, 64, 64, 7)
    assert "step 7 of 16" in fig.layout.title.text
    assert "7 of the 16 planned tiles computed so far" in fig.layout.title.text, fig.layout.title.text
    legend = {t.name: t.marker.color for t in fig.data}
    assert legend["not visited yet (slow memory)"] != legend["skipped (mask)"]
    fills = {sh.fillcolor for sh in fig.layout.shapes}
    assert legend["not visited yet (slow memory)"] in fills  # 9 tiles are still to come
    causal = tiling.grid_figure("FA2", 256, 256, 64, 64, 2, causal=True)
    assert "6 of 16 skipped" in causal.layout.title.text, causal.layout.title.text


def test_step_figure_does_not_shrink_by_one():
    """A block whose scores stay below the running max leaves l and O as they are: say that."""
    s = np.array([5.0, 1.0, 0.0, -1.0, 0.5, 0.2])
    V = np.ones((6, 2))
    title = softmax_stepper.step_figure(s, V, 2, 2).layout.title.text
    assert "max unchanged" in title and "shrink" not in title, title
    assert "shrink by" in softmax_stepper.step_figure(s[::-1].copy(), V, 2, 3).layout.title.text


def test_tiling_widgets_build():
    pytest.importorskip("ipywidgets")
    box = tiling.loop_explorer(64, 64, 16, 16)
    order, mask = box.children[0].children
    step = box.children[1].children[1]
    assert (step.min, step.max) == (1, 16)  # steps numbered from 1 on screen
    mask.value = "causal"
    assert step.max == 10
    order.value = "FA1"
    step.value = 10
    tiling.block_size_explorer()


# ---------------------------------------------------------------- heatmaps and overview

def test_heatmaps_titled_and_checked():
    S = np.array([[0.0, 1.0], [-np.inf, 2.0]])
    P = online_softmax.softmax_safe(S)
    assert_titled(heatmaps.attention_heatmaps(S, P))
    assert_titled(heatmaps.matrix_heatmap(P, "P"))
    with pytest.raises(ValueError, match="same shape"):
        heatmaps.attention_heatmaps(S, P[:1])


def test_backends_table_lists_every_backend():
    import flashkit

    table = overview.backends_markdown()
    lines = table.splitlines()
    assert len(lines) == 2 + len(flashkit.backends())
    for b in flashkit.backends():
        assert f"`{b['name']}`" in table


def test_measure_and_cost_figure():
    rows = [overview.measure(b, N, d=16, repeats=1) for b in ("numpy-standard", "numpy-tiled") for N in (64, 128)]
    assert all(r["seconds"] > 0 and r["peak_bytes"] >= 0 for r in rows)
    # the standard backend holds the 128 x 128 float32 score matrix at least
    assert rows[1]["peak_bytes"] >= 128 * 128 * 4
    assert_titled(overview.cost_figure(rows))
    assert_titled(overview.loglog_figure([1, 2], {"a": [1, 4]}, "t", "x (u)", "y (u)"))
    with pytest.raises(ValueError, match="repeats"):
        overview.measure("numpy-standard", 8, repeats=0)


def test_fit_slope():
    N = np.array([64, 128, 256, 512])
    assert overview.fit_slope(N, 3 * N**2.0) == pytest.approx(2.0)
    assert overview.fit_slope(N, 5 * N) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        overview.fit_slope([1], [1])


def test_measure_thread_limit_is_restored():
    import numba
    from threadpoolctl import threadpool_info

    before = (numba.get_num_threads(), [p["num_threads"] for p in threadpool_info()])
    r = overview.measure("numpy-standard", 32, d=8, repeats=1, threads=1)
    assert r["threads"] == 1
    assert (numba.get_num_threads(), [p["num_threads"] for p in threadpool_info()]) == before
    with pytest.raises(ValueError, match="threads"):
        overview.measure("numpy-standard", 32, threads=0)



def test_io_breakdown_series_are_told_apart():
    """Every (read or write, array) series has its own look: the array's colour, hatched for writes;
    the same array keeps its colour across reads and writes."""
    from flashkit.viz import io as vizio

    fig = vizio.breakdown_figure(4096, 64, 2 ** 14)
    looks = [(t.marker.color, t.marker.pattern.shape) for t in fig.data]
    assert len(set(looks)) == len(fig.data) > 10, looks
    by_array = {}
    for t in fig.data:
        by_array.setdefault(t.name.split(" ", 1)[1], set()).add(t.marker.color)
    assert all(len(c) == 1 for c in by_array.values()), by_array
    assert len({c for cs in by_array.values() for c in cs}) == len(by_array)
    legend = vizio.accesses_vs_M_figure(4096, 64, [2 ** 10, 2 ** 14]).layout.legend
    assert legend.orientation == "v" and legend.x >= 1, "the legend must not sit under the x-axis title"
