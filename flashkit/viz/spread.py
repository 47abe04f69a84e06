"""How a live figure shows the spread of a timing (flashkit.measure.timing.time_robust): the point is the
fastest sample, an error bar reaches the 75th percentile, and a noisy point (timing.NOISY_SPREAD) is
ringed in red and counted in the figure's title. One place for it, used by every live figure.

    fig.add_trace(go.Scatter(x=N, y=ms, error_y=spread.bar_up(ms, p75)))
    spread.ring_noisy(fig, xs, ys)                 # the rings and their legend entry
    fig.update_layout(title=spread.title(title, n_noisy))
"""
from __future__ import annotations

from typing import Optional, Sequence

import plotly.graph_objects as go

from flashkit.measure.timing import NOISY_SPREAD

NOISY_COLOUR = "#B22222"  # a red outside plotly's default palette, so it is never a line's colour
NOISY_NAME = f"noisy: p75 > {1 + NOISY_SPREAD:g}x fastest"


def bar_up(fastest: Sequence[float], p75: Sequence[Optional[float]]) -> dict:
    """error_y for a time: from the point (the fastest) up to the 75th percentile."""
    return dict(type="data", symmetric=False, array=[(s if s is not None else f) - f for f, s in zip(fastest, p75)],
                arrayminus=[0.0] * len(fastest), thickness=1.5, width=4)


def bar_down(best: Sequence[float], at_p75: Sequence[Optional[float]]) -> dict:
    """error_y for a rate (GFLOP/s, GB/s): from the point (the rate of the fastest) down to the rate
    of the 75th percentile."""
    return dict(type="data", symmetric=False, array=[0.0] * len(best),
                arrayminus=[b - (s if s is not None else b) for b, s in zip(best, at_p75)], thickness=1.5, width=4)


def ring_noisy(fig: go.Figure, x: Sequence, y: Sequence, showlegend: bool = True, **where) -> int:
    """Ring the noisy points (x, y) in red, with one legend entry; returns how many there are."""
    if len(x):
        fig.add_trace(go.Scatter(x=list(x), y=list(y), mode="markers", name=NOISY_NAME, legendgroup="noisy",
                                 showlegend=showlegend, hoverinfo="skip",
                                 marker=dict(symbol="circle-open", size=16, color=NOISY_COLOUR, line=dict(width=2.5))),
                      **where)
    return len(x)


def warning(n_noisy: int) -> str:
    """'' for no noisy point, else a sentence saying how many and what to do."""
    if not n_noisy:
        return ""
    return (f"\u26a0 {n_noisy} noisy point{'s' if n_noisy > 1 else ''} (p75 > {1 + NOISY_SPREAD:g}x the "
            "fastest): other work shared the cores; close it and run again")


def title(text: str, n_noisy: int) -> str:
    """The figure's title, with the warning on a second line when any point is noisy."""
    w = warning(n_noisy)
    return text + (f"<br><sup style='color:{NOISY_COLOUR}'>{w}</sup>" if w else "")
