"""Figures of notebook 14, ring attention: the ring at each step, the scores each step computes, and
the causal work of each rank with contiguous and zigzag chunks.

`step_map` says, for every score (i, j) of the global N x N matrix, at which ring step it is computed
(the rank holding query i meets the K/V block of key j's rank at step (rank_q - rank_k) mod P), or -1
where causal/window hide it (plain data, tested without plotly). `ring_figure` draws step t: the ranks
on a circle with the blocks they hold and where they send them, beside the score matrix coloured by the
rank computing each score now. `stepper` is the slider; `work_figure` the bar chart of work per rank.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flashkit.distributed.split import segments, work_per_rank
from flashkit.masks import dense_mask, effective_window

RANK_COLORS = ["hsl(210, 70%, 50%)", "hsl(30, 85%, 55%)", "hsl(140, 55%, 42%)", "hsl(350, 70%, 55%)",
               "hsl(270, 50%, 58%)", "hsl(50, 85%, 48%)", "hsl(180, 55%, 40%)", "hsl(320, 55%, 55%)"]
HIDDEN, DONE, LATER = "rgb(70, 70, 70)", "rgb(200, 200, 200)", "rgb(245, 245, 245)"


def owner(N: int, size: int, split: str) -> np.ndarray:
    """(N,) the rank that holds each position."""
    out = np.empty(N, np.int64)
    for r in range(size):
        for a, b in segments(N, size, r, split):
            out[a:b] = r
    return out


def step_map(N: int, size: int, split: str, causal: bool = True, window=None) -> np.ndarray:
    """(N, N) int: the ring step at which score (i, j) is computed, -1 where it is hidden."""
    rank = owner(N, size, split)
    step = (rank[:, None] - rank[None, :]) % size
    return np.where(dense_mask(N, N, effective_window(causal, window)), step, -1)


def ring_figure(N: int, size: int, step: int, split: str = "zigzag", causal: bool = True) -> go.Figure:
    """Step `step` of the ring: who holds which block and sends it where; the scores computed now."""
    if not 0 <= step < size:
        raise ValueError(f"step must be between 0 and {size - 1}; got {step}")
    fig = make_subplots(1, 2, column_widths=[0.42, 0.58], horizontal_spacing=0.08,
                        subplot_titles=(f"step {step}: rank r holds the K/V block of rank (r - {step}) mod {size}",
                                        "scores of the N x N matrix (query i, key j)"))
    angle = np.pi / 2 - 2 * np.pi * np.arange(size) / size  # rank 0 on top, clockwise
    x, y = np.cos(angle), np.sin(angle)
    for r in range(size):
        src = (r - step) % size
        chunks = ", ".join(f"{a}..{b - 1}" for a, b in segments(N, size, r, split))
        fig.add_trace(go.Scatter(x=[x[r]], y=[y[r]], mode="markers+text", text=[f"rank {r}"], textposition="middle center",
                                 marker=dict(size=64, color=RANK_COLORS[r % len(RANK_COLORS)]),
                                 textfont=dict(color="white"), showlegend=False,
                                 hovertext=f"rank {r}: queries {chunks}; holds K/V of rank {src}", hoverinfo="text"),
                      row=1, col=1)
        fig.add_annotation(x=x[r] * 1.45, y=y[r] * 1.45, text=f"Q {chunks}<br>K/V of rank {src}", showarrow=False,
                           font=dict(size=11), row=1, col=1)
        if size > 1 and step < size - 1:  # the block moves on to the next rank: an arrow along the chord
            nxt = (r + 1) % size
            dx, dy = x[nxt] - x[r], y[nxt] - y[r]
            px, py = dy * 0.06, -dx * 0.06  # a little to the side, so that 2 ranks' arrows do not overlap
            fig.add_annotation(x=x[r] + 0.7 * dx + px, y=y[r] + 0.7 * dy + py, ax=x[r] + 0.3 * dx + px,
                               ay=y[r] + 0.3 * dy + py, xref="x", yref="y", axref="x", ayref="y", showarrow=True,
                               arrowhead=3, arrowwidth=2, arrowcolor="rgb(90, 90, 90)", text="")
    fig.update_xaxes(visible=False, range=[-1.9, 1.9], row=1, col=1)
    fig.update_yaxes(visible=False, range=[-1.9, 1.9], scaleanchor="x", row=1, col=1)

    steps = step_map(N, size, split, causal)
    rank_q = np.broadcast_to(owner(N, size, split)[:, None], steps.shape)
    # colour codes: 0 hidden, 1 computed at an earlier step, 2 at a later one, 3 + r now by rank r
    z = np.where(steps < 0, 0, np.where(steps < step, 1, np.where(steps > step, 2, 3 + rank_q)))
    palette = [HIDDEN, DONE, LATER] + RANK_COLORS[:size]
    n = len(palette)
    scale = [[v, palette[c]] for c in range(n) for v in (c / n, (c + 1) / n)]
    label = np.array(["hidden", "an earlier step", "a later step"] + [f"now, by rank {r}" for r in range(size)])
    fig.add_trace(go.Heatmap(z=z, zmin=0, zmax=n, colorscale=scale, showscale=False, customdata=label[z],
                             hovertemplate="query %{y}, key %{x}: %{customdata}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="key position j", row=1, col=2)
    fig.update_yaxes(title_text="query position i", autorange="reversed", row=1, col=2)
    now = int((steps == step).sum())
    fig.update_layout(title=f"Ring attention, {size} ranks, {split} split, N = {N}{', causal' if causal else ''}: "
                            f"step {step} of {size - 1} computes {now} of {int((steps >= 0).sum())} visible scores",
                      width=980, height=470, margin=dict(t=90))
    return fig


def work_figure(N: int, size: int, causal: bool = True, measured: dict | None = None) -> go.Figure:
    """Visible scores each rank computes, contiguous against zigzag (and measured seconds if given)."""
    window = effective_window(causal, None)
    fig = go.Figure()
    for split, color in (("contiguous", RANK_COLORS[1]), ("zigzag", RANK_COLORS[0])):
        work = work_per_rank(N, size, split, window).sum(axis=1)
        fig.add_trace(go.Bar(name=f"{split} (max/mean {work.max() / work.mean():.2f})", x=[f"rank {r}" for r in range(size)],
                             y=work / 1e6, marker_color=color))
    fig.update_layout(barmode="group", title=f"Work per rank, N = {N}, {size} ranks{', causal' if causal else ''}: "
                                             "the slowest rank sets the pace",
                      xaxis_title="rank", yaxis_title="visible scores per head (millions)", width=760, height=420)
    return fig


def measured_figure(rows) -> go.Figure:
    """Time of one ring call against the number of ranks, for each split (rows of flashkit.measure.ring.run)."""
    fig = go.Figure()
    for split in sorted({r["split"] for r in rows}):
        pts = sorted((r["ranks"], r["time_min_s"] * 1e3) for r in rows if r["split"] == split)
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=split))
    fig.update_layout(title="Measured here: one causal ring call on MPI ranks of this machine",
                      xaxis_title="MPI ranks (processes)", yaxis_title="time of one call (ms, fastest of the runs)",
                      width=720, height=400)
    fig.update_xaxes(dtick=1)
    return fig


def stepper(N: int = 48, size: int = 4):
    """A split toggle and a step slider (with play) over the ring's steps."""
    import ipywidgets as widgets
    from IPython.display import display

    split = widgets.ToggleButtons(options=["zigzag", "contiguous"], value="zigzag", description="split")
    step = widgets.IntSlider(value=0, min=0, max=size - 1, description="step", continuous_update=False)
    play = widgets.Play(value=0, min=0, max=size - 1, interval=1200, description="play")
    widgets.jslink((play, "value"), (step, "value"))

    def show(split, step):
        per_rank = work_per_rank(N, size, split, effective_window(True, None))[:, step]
        print(f"step {step}: scores computed by rank 0..{size - 1}: {per_rank.tolist()}; "
              f"blocks sent on: {'none (the last step)' if step == size - 1 else size}")
        display(ring_figure(N, size, step, split=split, causal=True))

    out = widgets.interactive_output(show, {"split": split, "step": step})
    return widgets.VBox([split, widgets.HBox([play, step]), out])
