"""Figures for notebook 10 (attention in a model): the causal alignment of prefill and decode, their
costs, the KV cache's memory, split-K on a timeline, and decoding bandwidth.

Every function takes measured rows (lists of dicts) and returns a plotly Figure with a title and axis
titles with units; colours come from the default template, so figures read in light and dark themes.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flashkit.viz import spread


def causal_alignment_figure(n_new: int, n_cached: int) -> go.Figure:
    """Two masks side by side: a prefill of n_cached tokens and one decoding step (1 query, bottom row)."""
    from flashkit.masks import dense_mask

    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.12,
                        subplot_titles=(f"prefill: {n_new} queries x {n_new} keys",
                                        f"decode: 1 query x {n_cached} cached keys"))
    for col, (nq, nk) in enumerate(((n_new, n_new), (1, n_cached)), start=1):
        m = dense_mask(nq, nk, (-1, 0)).astype(int)  # causal, bottom-right aligned
        fig.add_trace(go.Heatmap(z=m, x=list(range(nk)), y=[f"q{i + nk - nq}" for i in range(nq)], zmin=0, zmax=1,
                                 colorscale=[[0, "rgba(128,128,128,0.15)"], [1, "#636efa"]], showscale=False,
                                 xgap=1, ygap=1, hovertemplate="key %{x}, %{y}: %{z}<extra></extra>"), 1, col)
        fig.update_xaxes(title_text="key position j (token)", row=1, col=col)
        fig.update_yaxes(title_text="query (its position)", autorange="reversed", row=1, col=col)
    fig.update_layout(title="Causal attention aligned bottom-right: decoding is the last row of a prefill",
                      height=330)
    return fig


COST_SERIES = (("prefill", "prefill of N tokens"), ("recompute", "next token without a cache (prefill of N+1)"),
               ("decode", "next token with the KV cache (1 query)"))


def cost_figure(rows) -> go.Figure:
    """rows: dicts with N, prefill_ms, decode_ms, recompute_ms (time to add token N+1 without a cache),
    each the fastest sample; optional <name>_p75_ms and <name>_noisy (flashkit.measure.timing.time_robust)
    add the error bars and the rings of noisy points (flashkit.viz.spread)."""
    N = [r["N"] for r in rows]
    fig = go.Figure()
    ring_x, ring_y = [], []
    for key, name in COST_SERIES:
        fastest = [r[f"{key}_ms"] for r in rows]
        p75 = [r.get(f"{key}_p75_ms") for r in rows]
        fig.add_trace(go.Scatter(x=N, y=fastest, mode="lines+markers", name=name,
                                 error_y=spread.bar_up(fastest, p75) if any(v is not None for v in p75) else None))
        for r in rows:
            if r.get(f"{key}_noisy"):
                ring_x.append(r["N"])
                ring_y.append(r[f"{key}_ms"])
    n_noisy = spread.ring_noisy(fig, ring_x, ring_y)
    fig.update_layout(title=spread.title("One more token: recompute everything, or read the cache (measured, "
                                         "fastest sample, bar to p75)", n_noisy),
                      xaxis_title="tokens already in the sequence, N (tokens, log scale)", yaxis_title="time per call (ms, log scale)",
                      xaxis_type="log", yaxis_type="log", legend=dict(x=0.01, y=0.99), height=450)
    return fig


def cache_growth_figure(configs, max_tokens: int, measured=None) -> go.Figure:
    """Left: K + V bytes of model configs (dicts with name, bytes_per_token) up to max_tokens.
    Right (if measured = (tokens, used_bytes, allocated_bytes)): a real KVCache filling up."""
    cols = 2 if measured is not None else 1
    fig = make_subplots(rows=1, cols=cols, horizontal_spacing=0.15,
                        subplot_titles=("32-layer fp16 models (computed)", "the tiny model (measured)")[:cols])
    t = np.linspace(0, max_tokens, 65)
    for c in configs:
        fig.add_trace(go.Scatter(x=t, y=t * c["bytes_per_token"] / 2**30, mode="lines", name=c["name"]), 1, 1)
    fig.update_xaxes(title_text="cache length (tokens)", row=1, col=1)
    fig.update_yaxes(title_text="K + V memory (GiB)", row=1, col=1)
    if measured is not None:
        tokens, used, allocated = measured
        fig.add_trace(go.Scatter(x=tokens, y=np.asarray(used) / 2**10, mode="lines+markers", name="used_bytes (filled rows)"), 1, 2)
        fig.add_trace(go.Scatter(x=[min(tokens), max(tokens)], y=[allocated / 2**10] * 2, mode="lines", line_dash="dash",
                                 name="nbytes (preallocated)"), 1, 2)
        fig.update_xaxes(title_text="cache length (tokens)", row=1, col=2)
        fig.update_yaxes(title_text="K + V memory, all layers (KiB)", row=1, col=2)
    fig.update_layout(title="KV cache memory grows linearly with the tokens kept", legend=dict(orientation="h", y=-0.25))
    return fig


def splitk_timeline_figure(runs) -> go.Figure:
    """runs: list of (label, events, merge_s) where events are dicts with thread, split, start_s, end_s
    (flashkit.cpu.decode.traced_partials) and merge_s the measured time of the merge after them."""
    fig = go.Figure()
    palette = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880"]
    for label, events, merge_s in runs:
        for e in events:
            fig.add_trace(go.Bar(x=[(e["end_s"] - e["start_s"]) * 1e3], base=[e["start_s"] * 1e3],
                                 y=[f"{label} · thread {e['thread']}"], orientation="h",
                                 marker_color=palette[e["split"] % len(palette)], showlegend=False,
                                 text=f"split {e['split']}", textposition="inside",
                                 hovertemplate=f"split {e['split']}: keys {e['j0']}..{e['j1'] - 1}<br>%{{base:.2f}} ms + %{{x:.2f}} ms<extra></extra>"))
        end = max(e["end_s"] for e in events)
        fig.add_trace(go.Bar(x=[merge_s * 1e3], base=[end * 1e3], y=[f"{label} · merge"], orientation="h",
                             marker_color="#888888", showlegend=False, text="merge", textposition="outside",
                             hovertemplate="online_softmax.merge: %{x:.3f} ms<extra></extra>"))
    fig.update_layout(title="Split-K on a timeline: chunks of one head's cache on all threads, then an exact merge",
                      xaxis_title="time since launch (ms)", yaxis_title="run and thread", barmode="overlay", height=360)
    fig.update_yaxes(autorange="reversed")
    return fig


def bandwidth_figure(rows, copy_GBps: float, title_suffix: str = "") -> go.Figure:
    """rows: dicts with method, L, kv_GBps (at the fastest sample); optional kv_GBps_p75 (at the 75th
    percentile) and noisy add the error bars and rings (flashkit.viz.spread). A horizontal line at the
    measured copy bandwidth."""
    fig = go.Figure()
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        best, at_p75 = [r["kv_GBps"] for r in sel], [r.get("kv_GBps_p75") for r in sel]
        fig.add_trace(go.Scatter(x=[r["L"] for r in sel], y=best, mode="lines+markers", name=method,
                                 error_y=spread.bar_down(best, at_p75) if any(v is not None for v in at_p75) else None))
    noisy = [r for r in rows if r.get("noisy")]
    n_noisy = spread.ring_noisy(fig, [r["L"] for r in noisy], [r["kv_GBps"] for r in noisy])
    fig.add_hline(y=copy_GBps, line_dash="dash", annotation_text=f"copy bandwidth {copy_GBps:.1f} GB/s")
    fig.update_layout(title=spread.title(f"Decoding reads the whole cache: K + V bytes per second{title_suffix}", n_noisy),
                      xaxis_title="cache length L (tokens, log scale)", yaxis_title="K + V read (GB/s; bar down to p75)",
                      xaxis_type="log", height=450)
    return fig
