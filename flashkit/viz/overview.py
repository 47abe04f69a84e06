"""Tables and measured costs for the opening notebooks (00 start here, 01 standard attention).

`backends_markdown` turns flashkit.backends() into a Markdown table; `measure` times one backend and
measures its peak memory with tracemalloc (NumPy reports its buffers to tracemalloc); `loglog_figure`
and `cost_figure` draw the measurements; `fit_slope` is the exponent of a power law fitted in log-log.
"""
from __future__ import annotations

import tracemalloc

import numpy as np

import flashkit
from flashkit.measure import timing
from flashkit.measure.memory import fit_loglog_slope
from flashkit.measure.threads import threads_limit
from flashkit.viz import spread


def backends_markdown(rows=None) -> str:
    """flashkit.backends() (or `rows` from it) as a Markdown table: name, device, available or why not,
    rung and summary."""
    rows = flashkit.backends() if rows is None else rows
    lines = ["| backend | device | available here | rung | what it is |", "|---|---|---|---|---|"]
    for r in rows:
        avail = "yes" if r["available"] else f"no: {r['reason']}"
        rung = "" if r["rung"] is None else str(r["rung"])
        cells = [f"`{r['name']}`", r["device"], avail, rung, r["summary"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def random_qkv(N: int, d: int = 64, H: int = 1, seed: int = 0, dtype=np.float32):
    """q, k, v of shape (1, H, N, d) drawn from a standard normal with a fixed seed."""
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((1, H, N, d), dtype=np.float32).astype(dtype, copy=False) for _ in range(3))


def measure(backend: str, N: int, d: int = 64, H: int = 1, causal: bool = False, repeats: int = 3,
            seed: int = 0, window=None, block_size=None, threads=None) -> dict:
    """Wall time (s) of the fastest sample after a warm-up timed apart (the one least disturbed by other
    work on the machine; `timing.time_robust`: at least `repeats` samples, more while 0.2 s lasts), with
    its 75th percentile (`seconds_p75`) and a `noisy` flag, and the peak bytes allocated during one call
    beyond the inputs and the output (tracemalloc, measured in a separate, untimed call).

    threads: None leaves the thread pools as they are; an int limits both the BLAS pool (threadpoolctl)
    and Numba's threads to it for the measurement, then restores them. One thread gives steady numbers
    on a busy machine, where a BLAS thread waiting for a busy core can cost tens of milliseconds.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int; got {repeats!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or a positive int; got {threads!r}")
    with threads_limit(threads):
        return _measure(backend, N, d, H, causal, repeats, seed, window, block_size, threads)


def _measure(backend, N, d, H, causal, repeats, seed, window, block_size, threads):
    q, k, v = random_qkv(N, d, H, seed)
    run = lambda: flashkit.attention(q, k, v, causal=causal, window=window, block_size=block_size,  # noqa: E731
                                     backend=backend)
    # warm-up (caches, Numba's compilation) timed apart; calls per sample by autorange; at least `repeats`
    # samples, more while a 0.2 s budget lasts: the fastest with its p75 and a noisy flag (timing.time_robust)
    t = timing.time_robust(run, warmup=1, budget_s=0.2, min_repeats=repeats, max_repeats=max(repeats, 50))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        o = run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"backend": backend, "N": N, "d": d, "H": H, "causal": causal, "window": window, "block_size": block_size,
            "threads": threads,
            "seconds": t.min_ms / 1e3, "seconds_p75": t.p75_ms / 1e3, "noisy": t.noisy, "repeats": len(t.times_ms),
            "peak_bytes": max(0, peak - o.nbytes)}


# The exponent p of y ≈ c·x^p, fitted by least squares on log(x), log(y).
fit_slope = fit_loglog_slope


def loglog_figure(x, series: dict, title: str, x_title: str, y_title: str, dashed=()):
    """Lines on log-log axes, one per name in `series` (name -> y values); names in `dashed` are
    drawn dashed without markers (analytic models beside measurements)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, y in series.items():
        style = dict(mode="lines", line=dict(dash="dash")) if name in dashed else dict(mode="lines+markers")
        fig.add_trace(go.Scatter(x=list(x), y=list(y), name=name, **style))
    fig.update_layout(title=title, height=420)
    fig.update_xaxes(title_text=x_title, type="log", tickvals=list(x))
    fig.update_yaxes(title_text=y_title, type="log", exponentformat="power")
    return fig


def cost_figure(rows, title: str = "Measured cost of attention on this machine"):
    """Time (ms) and extra memory (MiB) against N, one line per backend, from `measure` rows."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not rows:
        raise ValueError("rows must hold at least one measurement from measure()")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        "time per call (fastest; bar to p75)", "peak memory beyond inputs and output"))
    n_noisy = 0
    colours = ["#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3"]
    for n, name in enumerate(dict.fromkeys(r["backend"] for r in rows)):
        mine = sorted((r for r in rows if r["backend"] == name), key=lambda r: r["N"])
        N = [r["N"] for r in mine]
        c = colours[n % len(colours)]
        ms = [r["seconds"] * 1e3 for r in mine]
        fig.add_trace(go.Scatter(x=N, y=ms, name=name, legendgroup=name, mode="lines+markers", line=dict(color=c),
                                 error_y=spread.bar_up(ms, [r.get("seconds_p75", r["seconds"]) * 1e3 for r in mine])),
                      1, 1)
        noisy = [r for r in mine if r.get("noisy")]
        n_noisy += spread.ring_noisy(fig, [r["N"] for r in noisy], [r["seconds"] * 1e3 for r in noisy],
                                     showlegend=not n_noisy, row=1, col=1)
        fig.add_trace(go.Scatter(x=N, y=[r["peak_bytes"] / 2**20 for r in mine], name=name, legendgroup=name,
                                 showlegend=False, mode="lines+markers", line=dict(color=c)), 1, 2)
    fig.update_layout(title=spread.title(title, n_noisy), height=420)
    for col, y_title in ((1, "time (ms)"), (2, "extra memory (MiB)")):
        fig.update_xaxes(title_text="sequence length N (tokens)", type="log", row=1, col=col,
                         tickvals=sorted({r["N"] for r in rows}))
        fig.update_yaxes(title_text=y_title, type="log", row=1, col=col)
    return fig
