"""Figures of notebook 4: attention's working memory measured against N, and where it stops fitting.

Every figure shows bytes in MiB (2^20 bytes) and says so on its axis.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import plotly.graph_objects as go

MiB = 2 ** 20


def _fit_curve(fit: dict, N) -> np.ndarray:
    return fit["a"] + fit["b"] * np.asarray(N, np.float64) ** fit["p"]


def text_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """A plain-text table (right-aligned numbers) for print(): no dependency, deterministic."""
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else f"{c:,.2f}" if isinstance(c, float) else str(c)
                                           for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def loglog_figure(N: Sequence[int], measured: Dict[str, Sequence[int]], fits: Optional[Dict[str, dict]] = None,
                  title: str = "Working memory of one attention call, measured") -> go.Figure:
    """Measured bytes beyond inputs and output (markers) and the fitted a + b·N^p (dashed), log-log."""
    fig = go.Figure()
    N_fine = np.geomspace(min(N), max(N), 64)
    for idx, (name, values) in enumerate(measured.items()):
        color = f"hsl({(idx * 137 + 210) % 360}, 70%, 55%)"  # mid lightness: readable on light and dark
        fig.add_scatter(x=list(N), y=[v / MiB for v in values], mode="markers", name=f"{name} (measured)",
                        marker=dict(size=9, color=color))
        if fits and name in fits:
            f = fits[name]
            fig.add_scatter(x=N_fine, y=_fit_curve(f, N_fine) / MiB, mode="lines", line=dict(dash="dash", color=color),
                            name=f"{name} fit: {f['a'] / MiB:.2f} MiB + {f['b']:.3g} B·N^{f['p']:.2f}")
    fig.update_xaxes(type="log", title_text="sequence length N (tokens, log scale)")
    fig.update_yaxes(type="log", title_text="peak memory beyond inputs and output (MiB, log scale)")
    fig.update_layout(title=title, legend=dict(orientation="h", y=-0.25))
    return fig


def comparison_figure(labels: Sequence[str], columns: Dict[str, Sequence[Optional[float]]],
                      title: str) -> go.Figure:
    """Grouped bars: one group per label (backend), one bar per column (claimed, counted, measured), MiB."""
    fig = go.Figure()
    for name, values in columns.items():
        fig.add_bar(x=list(labels), y=[np.nan if v is None else v for v in values], name=name,
                    text=["n/a" if v is None else f"{v:.2f}" for v in values], textposition="outside")
    fig.update_xaxes(title_text="backend")
    fig.update_yaxes(title_text="memory beyond inputs and output (MiB)")
    fig.update_layout(title=title, barmode="group")
    return fig


def projection_figure(fits: Dict[str, dict], ram_bytes: int, N_limit: int, N_max: int,
                      runs: Iterable[tuple] = (),
                      title: str = "Where standard attention stops fitting in this machine's RAM") -> go.Figure:
    """The fitted memory models extended to large N, the machine's RAM, and measured runs.

    runs: (label, N, bytes) points drawn as markers (e.g. the tiled run past the limit).
    """
    fig = go.Figure()
    N = np.geomspace(256, N_max, 128)
    for idx, (name, f) in enumerate(fits.items()):
        color = f"hsl({(idx * 137 + 210) % 360}, 70%, 55%)"
        fig.add_scatter(x=N, y=_fit_curve(f, N) / MiB, mode="lines", name=f"{name} (fitted model)", line=dict(color=color))
    for label, n, b in runs:
        fig.add_scatter(x=[n], y=[max(b, 1) / MiB], mode="markers", name=label, marker=dict(size=12, symbol="star"))
    # Reference lines as traces (shape annotations misplace on log axes), in a colour for both themes.
    ref = "hsl(30, 90%, 55%)"
    fig.add_scatter(x=[N[0], N[-1]], y=[ram_bytes / MiB] * 2, mode="lines", line=dict(dash="dot", color=ref),
                    name=f"this machine's RAM: {ram_bytes / MiB:,.0f} MiB")
    y_all = np.concatenate([_fit_curve(f, N) for f in fits.values()]) / MiB
    fig.add_scatter(x=[N_limit] * 2, y=[max(y_all.min(), 1e-3), y_all.max()], mode="lines",
                    line=dict(dash="dash", color=ref), name=f"standard attention stops fitting: N = {N_limit:,}")
    fig.update_xaxes(type="log", title_text="sequence length N (tokens, log scale)")
    fig.update_yaxes(type="log", title_text="memory beyond inputs and output (MiB, log scale)")
    fig.update_layout(title=title, legend=dict(orientation="h", y=-0.25))
    return fig
