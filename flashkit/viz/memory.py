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


# ---------------------------------------------------------------------------------------------
# The N slider of notebook 4: measured and counted memory side by side, standard against tiled
# ---------------------------------------------------------------------------------------------
EXPLORER_NS = (128, 256, 512, 1024, 2048)
EXPLORER_BLOCKS = (128, 256)  # (Br, Bc) of the tiled call: big tiles, few Python steps, a quick slider


def measured_and_counted(N: int, d: int = 64, seed: int = 0) -> Dict[str, dict]:
    """{backend: {"measured": bytes, "counted": bytes, "method": ...}} for one head of float32 at N.

    Measured: flashkit.measure.memory.attention_peak (tracemalloc: the NumPy backends' every buffer).
    Counted: S and P for standard attention (analytic_standard); for tiled, the tile working set at
    (Br, Bc) = EXPLORER_BLOCKS plus numpy-tiled's per-row bookkeeping (O and lse of the head, two int64
    key bounds per row: 4d + 4 + 16 bytes a row), the count notebook 4's fit confirms."""
    from flashkit.measure import memory

    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 1, N, d), dtype=np.float32) for _ in range(3))
    Br, Bc = (min(b, N) for b in EXPLORER_BLOCKS)
    counted = {"numpy-standard": sum(memory.analytic_standard(1, 1, N, N).values()),
               "numpy-tiled": sum(memory.analytic_tiled(d, Br, Bc).values()) + (4 * d + 4 + 16) * N}
    kwargs = {"numpy-standard": {}, "numpy-tiled": {"block_size": EXPLORER_BLOCKS}}
    out = {}
    for name, count in counted.items():
        report = memory.attention_peak(q, k, v, backend=name, method="tracemalloc", **kwargs[name])
        out[name] = {"measured": report.extra_bytes, "counted": int(count), "method": report.method}
    return out


def explorer_figure(N: int, d: int, values: Dict[str, dict], history: Dict[int, Dict[str, dict]]) -> go.Figure:
    """Left: measured and counted bytes at this N (grouped bars, log axis); right: every N measured so far
    against the counts over N (N² against N), so moving the slider draws the two growth laws."""
    from plotly.subplots import make_subplots

    colors = {"numpy-standard": "hsl(10, 75%, 55%)", "numpy-tiled": "hsl(210, 75%, 55%)"}
    fig = make_subplots(rows=1, cols=2, column_widths=[0.42, 0.58], horizontal_spacing=0.14,
                        subplot_titles=(f"at N = {N:,}", "over N: every N you measured"))
    names = list(values)
    for kind, pattern in (("counted", "/"), ("measured", "")):
        ys = [values[n][kind] / MiB for n in names]
        fig.add_bar(x=names, y=ys, name=f"{kind} (MiB)", row=1, col=1, text=[f"{y:.2f}" for y in ys],
                    textposition="outside", marker=dict(color=[colors[n] for n in names], pattern_shape=pattern),
                    legendgroup=kind)
    Ns = np.array(sorted(set(EXPLORER_NS) | set(history)))
    for name in names:
        per_n = values[name]["counted"] / (N * N if name == "numpy-standard" else 1)
        if name == "numpy-standard":
            curve = per_n * Ns.astype(float) ** 2
        else:  # fixed tiles plus a linear part: rebuild from the two points the count defines
            fixed = values[name]["counted"] - (4 * d + 20) * N
            curve = fixed + (4 * d + 20) * Ns.astype(float)
        fig.add_scatter(x=Ns, y=curve / MiB, mode="lines", line=dict(color=colors[name], dash="dash"),
                        name=f"{name} counted", row=1, col=2)
        seen = sorted(history)
        fig.add_scatter(x=seen, y=[history[n][name]["measured"] / MiB for n in seen], mode="markers",
                        marker=dict(size=10, color=colors[name]), name=f"{name} measured", row=1, col=2)
    fig.update_yaxes(type="log", title_text="memory beyond inputs and output (MiB, log scale)", row=1, col=1)
    fig.update_xaxes(title_text="backend (hatched: counted, solid: measured)", row=1, col=1)
    fig.update_yaxes(type="log", title_text="MiB (log scale)", row=1, col=2)
    fig.update_xaxes(type="log", title_text="sequence length N (tokens, log scale)", row=1, col=2)
    s, t = values["numpy-standard"], values["numpy-tiled"]
    fig.update_layout(title=f"One head, d = {d}, float32: standard {s['measured'] / MiB:.2f} MiB measured, tiled "
                            f"{t['measured'] / MiB:.2f} MiB ({s['measured'] / max(t['measured'], 1):.0f}x less)",
                      height=480, width=1000, legend=dict(orientation="h", y=-0.22))
    return fig


def memory_explorer(d: int = 64):
    """An N slider: each move measures one standard and one tiled call at that N (tracemalloc, a second
    at most) and redraws the measured and counted memory side by side."""
    import ipywidgets as widgets
    from IPython.display import display

    history: Dict[int, Dict[str, dict]] = {}
    N = widgets.SelectionSlider(options=list(EXPLORER_NS), value=512, description="N (tokens)",
                                continuous_update=False, style={"description_width": "initial"})

    def show(N):
        values = measured_and_counted(N, d)
        history[N] = values
        display(explorer_figure(N, d, values, history))

    out = widgets.interactive_output(show, {"N": N})
    return widgets.VBox([N, out])
