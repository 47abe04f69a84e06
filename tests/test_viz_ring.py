"""Notebook 14's figures: the ring's step map is the schedule, the figures are titled with units."""
import numpy as np
import pytest

from flashkit.distributed import work_per_rank
from flashkit.masks import effective_window
from flashkit.viz import ring as vring


@pytest.mark.parametrize("split", ["contiguous", "zigzag"])
def test_step_map_is_the_schedule(split):
    N, size = 29, 4
    steps = vring.step_map(N, size, split, causal=True)
    work = work_per_rank(N, size, split, effective_window(True, None))  # [rank, step]
    owner = vring.owner(N, size, split)
    for t in range(size):
        per_rank = [int(((steps == t) & (owner[:, None] == r)).sum()) for r in range(size)]
        assert per_rank == work[:, t].tolist()
    assert (steps >= 0).sum() == N * (N + 1) // 2  # causal: the lower triangle with the diagonal
    assert np.all(np.diag(steps) == 0)  # a rank's own keys are its first step


def test_figures_are_titled():
    fig = vring.ring_figure(24, 3, 1, split="zigzag")
    assert "step 1" in fig.layout.title.text and fig.layout.xaxis2.title.text == "key position j"
    assert fig.layout.yaxis2.title.text == "query position i"
    bars = vring.work_figure(64, 4)
    assert bars.layout.title.text and "millions" in bars.layout.yaxis.title.text
    assert "max/mean 1.00" in bars.data[1].name  # zigzag: balanced
    with pytest.raises(ValueError, match="step must be between 0 and 2"):
        vring.ring_figure(24, 3, 3)
    lines = vring.measured_figure([{"ranks": 1, "split": "zigzag", "time_min_s": 0.1},
                                   {"ranks": 2, "split": "zigzag", "time_min_s": 0.06}])
    assert "ms" in lines.layout.yaxis.title.text and "ranks" in lines.layout.xaxis.title.text
