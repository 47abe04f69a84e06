"""flashkit.viz.backward: Algorithm 2's steps as data (the loop order, the dQ updates, the dK/dV writes),
and its figures built with titles and labelled axes."""
import numpy as np
import pytest

from flashkit.masks import FULL, PARTIAL, SKIP, block_map, effective_window
from flashkit.viz import backward as vb


def test_steps_follow_algorithm_2():
    tiles = block_map(200, 256, 32, 64, effective_window(True, None))  # causal, bottom-right, tails in both
    steps = vb.backward_steps(tiles)
    visible = [(i, j) for j in range(tiles.shape[1]) for i in range(tiles.shape[0]) if tiles[i, j] != SKIP]
    assert [(s.i, s.j) for s in steps] == visible  # K/V blocks outside, query blocks inside, skips left out
    assert list(steps[-1].dq_updates) == [int((row != SKIP).sum()) for row in tiles]  # one update per visible tile
    last = [s.j for s in steps if s.last_of_j]
    assert last == sorted(set(s.j for s in steps))  # each K/V block ends once, in order
    for s in steps:  # dK_j, dV_j are written only after their column is done
        assert s.j not in s.dkv_written and all(j < s.j for j in s.dkv_written)
        assert s.state in (PARTIAL, FULL)


def test_skipped_columns_and_bad_input():
    tiles = np.array([[FULL, SKIP, FULL], [FULL, SKIP, PARTIAL]])
    steps = vb.backward_steps(tiles)
    assert [(s.i, s.j) for s in steps] == [(0, 0), (1, 0), (0, 2), (1, 2)]
    assert steps[-1].dq_updates == (2, 2)
    with pytest.raises(ValueError, match="non-empty 2-D block map"):
        vb.backward_steps(np.zeros((0, 3)))


def test_figures_have_titles_and_axes():
    fig = vb.step_figure(100, 130, 32, 64, 3, causal=True)
    assert "step 4 of" in fig.layout.title.text and "tokens" in fig.layout.xaxis.title.text
    with pytest.raises(ValueError, match="step must be an int"):
        vb.step_figure(100, 130, 32, 64, 99)
    flow = vb.dataflow_figure(N=4096, d=64)
    assert "64.0 MiB" in flow.layout.title.text and "16 KiB" in flow.layout.title.text  # P against lse, one head
    rows = [dict(backend="a", N=n, fwd_ms=1.0, bwd_ms=2.5 * n / 256) for n in (256, 512)]
    ratio = vb.ratio_figure(rows)
    assert list(ratio.data[0].y) == [2.5, 5.0] and "2.5" in ratio.data[-1].name
    assert "unitless" in ratio.layout.yaxis.title.text
