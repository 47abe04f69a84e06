"""Figures and the slider app of notebook 5: HBM traffic of standard and tiled attention.

Counts come from flashkit.measure.io_model (elements); figures show them as MiB of float32 traffic
(4 bytes an element, 2^20 bytes a MiB) and say so on their axes.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np
import plotly.graph_objects as go

from flashkit.measure import io_model

MiB = 2 ** 20
ITEMSIZE = 4  # float32

# The leading constants of the counts, derived in notebook 5 for M <= 4d^2 (Br = Bc = M / 4d):
# FA1 reads Q_i, O_i and writes O_i for every (j, i): Tc · 3Nd = (4Nd / M) · 3Nd = 12 N^2 d^2 / M;
# FA2 reads K_j, V_j once per query block: Tr · 2Nd = (4Nd / M) · 2Nd = 8 N^2 d^2 / M.
LEADING = {"tiled-fa1": 12.0, "tiled-fa2": 8.0}


def _colors():
    # mid-lightness hues: readable on JupyterLab's light and dark themes
    return {"standard": "hsl(10, 75%, 55%)", "tiled-fa1": "hsl(210, 75%, 55%)", "tiled-fa2": "hsl(140, 60%, 45%)"}


# One colour per array, the same in every figure: a stacked bar has up to 14 (read or write, array)
# series, more than plotly's 10 default colours, so colour says which array and the hatching says
# read (solid) or write (hatched). Mid-lightness: readable on light and dark themes.
ARRAY_COLORS = {"Q": "#636EFA", "K": "#EF553B", "V": "#00CC96", "O": "#AB63FA", "S": "#FFA15A", "P": "#19D3F3",
                "m": "#FF6692", "l": "#B6E880", "lse": "#FECB52"}


def _mib(elements) -> np.ndarray:
    return np.asarray(elements, np.float64) * ITEMSIZE / MiB


def accesses_vs_M_figure(N: int, d: int, Ms: Sequence[int]) -> go.Figure:
    """HBM traffic against the fast-memory size M, with the Θ(N^2 d^2 / M) lines and the crossover."""
    Ms = np.asarray(sorted(set(int(m) for m in Ms)))
    colors = _colors()
    fig = go.Figure()
    standard = io_model.standard_io(N, d).total
    fig.add_scatter(x=Ms, y=_mib(np.full(Ms.size, standard)), mode="lines", name="standard: 4N² + 4Nd",
                    line=dict(color=colors["standard"], width=3))
    for order in io_model.ORDERS:
        name = f"tiled-{order}"
        totals = [io_model.tiled_io(N, d, int(M), order=order).total for M in Ms]
        fig.add_scatter(x=Ms, y=_mib(totals), mode="lines+markers", name=f"{name} (counted)",
                        line=dict(color=colors[name]), marker=dict(size=4))
        theta = LEADING[name] * np.array([io_model.theta_tiled(N, d, int(M)) for M in Ms])
        fig.add_scatter(x=Ms, y=_mib(theta), mode="lines", line=dict(color=colors[name], dash="dot"),
                        name=f"{LEADING[name]:.0f}·N²d²/M")
    # A reference line as a trace (shape annotations misplace on log axes), in a colour for both themes.
    top = max(_mib(standard), _mib(io_model.tiled_io(N, d, int(Ms[0]), order="fa1").total))
    fig.add_scatter(x=[4 * d * d] * 2, y=[_mib(io_model.tiled_io(N, d, int(Ms[-1]), order="fa1").total), top],
                    mode="lines", line=dict(dash="dash", color="hsl(30, 90%, 55%)"),
                    name=f"M = 4d² = {4 * d * d:,}: Br reaches d")
    fig.update_xaxes(type="log", title_text="fast memory M (float32 elements, log scale)")
    fig.update_yaxes(type="log", title_text="HBM reads + writes (MiB of float32, log scale)")
    # The legend beside the plot, not under it: below, its first row sat on the x-axis title.
    fig.update_layout(title=f"HBM traffic against fast-memory size, N = {N:,}, d = {d}",
                      legend=dict(orientation="v", x=1.02, y=1, xanchor="left", yanchor="top"))
    return fig


def breakdown_figure(N: int, d: int, M: int, counts: Optional[Dict[str, io_model.IOCount]] = None) -> go.Figure:
    """Stacked bars: what each algorithm reads and writes, array by array, in MiB of float32."""
    if counts is None:
        counts = {"standard": io_model.standard_io(N, d),
                  "tiled-fa2": io_model.tiled_io(N, d, M, order="fa2"),
                  "tiled-fa1": io_model.tiled_io(N, d, M, order="fa1")}
    fig = go.Figure()
    names = list(counts)
    arrays = []
    for c in counts.values():
        for kind, part in (("read", c.reads), ("write", c.writes)):
            for array in part:
                if (kind, array) not in arrays:
                    arrays.append((kind, array))
    for kind, array in arrays:
        values = [(counts[n].reads if kind == "read" else counts[n].writes).get(array, 0) for n in names]
        fig.add_bar(x=names, y=_mib(values), name=f"{kind} {array}", legendgroup=array,
                    marker=dict(color=ARRAY_COLORS.get(array, "#7F7F7F"), pattern_shape="" if kind == "read" else "/"))
    fig.update_xaxes(title_text="algorithm")
    fig.update_yaxes(title_text="HBM traffic (MiB of float32)")
    c2 = counts.get("tiled-fa2")
    blocks = f", Br = {c2.Br}, Bc = {c2.Bc}" if c2 is not None else ""
    fig.update_layout(barmode="stack", title=f"Reads and writes by array, N = {N:,}, d = {d}, M = {M:,} floats{blocks}",
                      legend=dict(title="solid: read, hatched: write"))
    return fig


def io_summary(N: int, d: int, M: int) -> str:
    """Text beside the sliders: totals, the ratio to standard, and each count over its Θ formula."""
    s = io_model.standard_io(N, d)
    lines = [f"standard : {_mib(s.total):10.2f} MiB   count / (N·d + N²) = {s.total / io_model.theta_standard(N, d):.2f}"]
    for order in io_model.ORDERS:
        t = io_model.tiled_io(N, d, M, order=order)
        lines.append(f"{t.algorithm}: {_mib(t.total):10.2f} MiB   count / (N²d²/M) = "
                     f"{t.total / io_model.theta_tiled(N, d, M):6.2f}   tiled / standard = {t.total / s.total:.2f}"
                     f"   (Br = {t.Br}, Bc = {t.Bc})")
    if M < d or M > N * d:
        lines.append(f"note: the paper's bounds assume d <= M <= N·d ({d} <= M <= {N * d:,}); M = {M:,} is outside")
    return "\n".join(lines)


def explorer_figure(N: int, d: int, M: int) -> go.Figure:
    """The slider app's figure: left, what each algorithm moves at this N (stacked by array); right, the
    three totals over N with this N marked, so a move of N shows where it sits on N² against N²d²/M
    (the bars alone keep their proportions as N grows: only their scale changes)."""
    from plotly.subplots import make_subplots

    bars = breakdown_figure(N, d, M)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.12,
                        subplot_titles=(f"at N = {N:,}: which arrays move", "total over N (this N marked)"))
    for trace in bars.data:
        fig.add_trace(trace, row=1, col=1)
    colors = _colors()
    Ns = np.array([2 ** e for e in range(8, 17)])
    totals = {"standard": lambda n: io_model.standard_io(n, d).total,
              "tiled-fa2": lambda n: io_model.tiled_io(n, d, M, order="fa2").total,
              "tiled-fa1": lambda n: io_model.tiled_io(n, d, M, order="fa1").total}
    for name, total in totals.items():
        ys = _mib([total(int(n)) for n in Ns])
        # Lines labelled at their right end, not in the legend: the legend is the bars' (one colour per array).
        fig.add_scatter(x=Ns, y=ys, mode="lines+text", line=dict(color=colors[name], width=2), showlegend=False,
                        text=[""] * (len(Ns) - 1) + [name], textposition="middle right", row=1, col=2)
        fig.add_scatter(x=[N], y=_mib([total(N)]), mode="markers", showlegend=False, row=1, col=2,
                        marker=dict(size=13, color=colors[name], line=dict(width=2, color="white")),
                        hovertemplate=f"{name} at N = {N:,}: %{{y:.1f}} MiB<extra></extra>")
    fig.update_xaxes(title_text="algorithm", row=1, col=1)
    fig.update_yaxes(title_text="HBM traffic (MiB of float32)", row=1, col=1)
    fig.update_xaxes(type="log", title_text="sequence length N (tokens, log scale)", range=[np.log10(200), 5.3],
                     row=1, col=2)
    fig.update_yaxes(type="log", title_text="HBM reads + writes (MiB, log scale)", row=1, col=2)
    s, f2 = io_model.standard_io(N, d).total, io_model.tiled_io(N, d, M, order="fa2").total
    fig.update_layout(barmode="stack", height=500, width=1050,
                      title=f"N = {N:,}, d = {d}, M = {M:,} floats: tiled-fa2 moves {f2 / s:.2f} x what standard moves",
                      legend=dict(title="solid: read, hatched: write", x=1.02, y=1, xanchor="left"))
    return fig


def io_explorer():
    """Sliders for N, d and M; redraws the breakdown beside the totals over N, and the summary. Errors
    show in the output area (ipywidgets.interactive prints a callback's traceback below the sliders)."""
    import ipywidgets as widgets
    from IPython.display import display

    def show(N, d, M):
        print(io_summary(N, d, M))
        display(explorer_figure(N, d, M))

    powers = lambda lo, hi: [2 ** e for e in range(lo, hi + 1)]  # noqa: E731
    style = {"description_width": "initial"}
    return widgets.interactive(
        show,
        N=widgets.SelectionSlider(options=powers(8, 16), value=4096, description="N (tokens)", style=style),
        d=widgets.SelectionSlider(options=powers(4, 8), value=64, description="d (head size)", style=style),
        M=widgets.SelectionSlider(options=powers(6, 20), value=2 ** 14, description="M (floats of fast memory)",
                                  style=style, layout=widgets.Layout(width="60%")),
    )


# ---------------------------------------------------------------------------------------------
# Measured: a tiled kernel's time as its tiles outgrow the caches
# ---------------------------------------------------------------------------------------------
def working_set_bytes(Br: int, Bc: int, d: int, itemsize: int = 4) -> int:
    """Bytes one worker keeps hot: Q_i and O_i (Br x d), K_j and V_j (Bc x d), S_ij (Br x Bc)."""
    return (2 * Br * d + 2 * Bc * d + Br * Bc) * itemsize


def block_sweep(N: int = 1024, d: int = 64, blocks: Sequence[int] = (8, 16, 32, 64, 128, 256, 512, 1024),
                backend: str = "numba-loops", repeats: int = 5, seed: int = 0) -> list:
    """Time `backend` at Br = Bc = B for each B (one head, float32, one thread) beside what the IO model
    counts for those tiles: rows of B, working-set bytes, time (min and median of `repeats`, ms) and the
    K/V traffic of FA2's loop order (bytes), with that traffic over the min time (GB/s).

    The time is measured; the bytes are counted (a CPU has no portable counter of cache traffic): they
    say how much the loop would move if every tile stayed in fast memory while it is used."""
    from flashkit.measure import timing
    from flashkit.measure.threads import threads_limit

    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 1, N, d), dtype=np.float32) for _ in range(3))
    rows = []
    with threads_limit(1):  # one core: the tiles of one worker against that core's caches
        for B in blocks:
            B = min(int(B), N)
            t = timing.time_attention(q, k, v, backend=backend, block_size=(B, B), warmup=1, repeats=repeats)
            count = io_model.tiled_io(N, d, max(d, 4 * B * d), order="fa2", Br=B, Bc=B)
            moved = count.total * ITEMSIZE
            rows.append({"B": B, "working_set": working_set_bytes(B, B, d), "ms_min": t["ms_min"], "ms": t["ms"],
                         "bytes": moved, "gbps": moved / (t["ms_min"] * 1e-3) / 1e9, "backend": t["backend"]})
    return rows


def block_sweep_figure(rows: Sequence[dict], caches: Dict[str, int], title: str) -> go.Figure:
    """Left axis: measured time (min, error bar up to the median) against the working set, log x, with the
    caches as vertical lines; right axis: the counted traffic of the same tiles."""
    from plotly.subplots import make_subplots

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    x = [r["working_set"] / 1024 for r in rows]
    fig.add_scatter(x=x, y=[r["ms_min"] for r in rows], mode="lines+markers", name="time, measured (min; bar to median)",
                    text=[f"Br = Bc = {r['B']}" for r in rows], marker=dict(size=9, color="hsl(10, 75%, 55%)"),
                    error_y=dict(type="data", symmetric=False, array=[r["ms"] - r["ms_min"] for r in rows],
                                 arrayminus=[0] * len(rows)),
                    hovertemplate="%{text}: %{y:.1f} ms<extra></extra>")
    fig.add_scatter(x=x, y=[r["bytes"] / MiB for r in rows], mode="lines+markers", name="K/V traffic, counted (MiB)",
                    line=dict(dash="dot", color="hsl(210, 75%, 55%)"), secondary_y=True)
    top = max(r["ms"] for r in rows) * 1.1
    for (name, size), color in zip(caches.items(), ("hsl(140, 60%, 40%)", "hsl(280, 50%, 55%)", "hsl(30, 90%, 50%)")):
        fig.add_scatter(x=[size / 1024] * 2, y=[0, top], mode="lines", line=dict(dash="dash", color=color),
                        name=f"{name}: {size // 1024:,} KiB")
    fig.update_xaxes(type="log", title_text="working set of one tile step, Q_i O_i K_j V_j S_ij (KiB, log scale)")
    fig.update_yaxes(title_text="time of one call (ms)", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="K/V traffic counted (MiB)", rangemode="tozero", secondary_y=True)
    fig.update_layout(title=title, height=480, legend=dict(orientation="h", y=-0.25))
    return fig


def crossover_figure(N: int, ds: Sequence[int], Ms: Sequence[int]) -> go.Figure:
    """The smallest M at which tiling moves no more than standard attention, against d, with 2d² and 3d²."""
    colors = _colors()
    fig = go.Figure()
    ds = list(ds)
    for order, k in (("fa2", 2), ("fa1", 3)):
        found = [io_model.crossover_M(N, d, Ms, order=order) for d in ds]
        fig.add_scatter(x=ds, y=[np.nan if f is None else f for f in found], mode="markers", name=f"tiled-{order}: counted",
                        marker=dict(size=10, color=colors[f"tiled-{order}"]))
        fig.add_scatter(x=ds, y=[k * d * d for d in ds], mode="lines", name=f"{k}d²",
                        line=dict(dash="dot", color=colors[f"tiled-{order}"]))
    fig.update_xaxes(type="log", title_text="head size d (log scale)")
    fig.update_yaxes(type="log", title_text="crossover fast memory M (float32 elements, log scale)")
    fig.update_layout(title=f"Below this M, tiling moves more data than standard attention (N = {N:,})")
    return fig


def cpu_caches() -> Dict[str, int]:
    """This machine's data caches from Linux sysfs as {"L1d": bytes, "L2": bytes, ...} (empty elsewhere)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    out = {}
    if not os.path.isdir(base):
        return out
    for entry in sorted(os.listdir(base)):
        path = os.path.join(base, entry)
        try:
            level = open(os.path.join(path, "level")).read().strip()
            kind = open(os.path.join(path, "type")).read().strip()
            size = open(os.path.join(path, "size")).read().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        factor = {"K": 1024, "M": 2 ** 20}.get(size[-1], 1)
        out[f"L{level}" + ("d" if kind == "Data" else "")] = int(size.rstrip("KM")) * factor
    return out
