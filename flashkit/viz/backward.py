"""Figures of notebook 11, the backward pass: its data flow, Algorithm 2's loops step by step, and the
measured backward/forward time ratio.

FlashAttention-2's backward (Algorithm 2 of Dao 2023; flashkit.tiled.fa2_backward_head) loops over
K/V blocks j outside and query blocks i inside:

    for j in K/V blocks:                      dK_j = dV_j = 0 in fast memory
        for i in query blocks:                load Q_i, dO_i, lse_i, D_i
            S_ij = Q_i K_j^T * scale;  P_ij = exp(S_ij - lse_i)        recomputed, never stored
            dV_j += P_ij^T dO_i;  dP_ij = dO_i V_j^T;  dS_ij = P_ij * (dP_ij - D_i)
            dQ_i += dS_ij K_j * scale         a read-modify-write of slow memory, once per (i, j)
            dK_j += dS_ij^T Q_i * scale
        write dK_j, dV_j                      once per j

`backward_steps` lists those steps for a block map (plain data, tested without plotly), `step_figure`
draws one, `stepper` is the slider; `dataflow_figure` shows what the forward stores and the backward
recomputes; `ratio_figure` plots measured backward/forward time ratios against the FLOP count's 2.5.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashkit.masks import SKIP, block_map, effective_window


@dataclass(frozen=True)
class BackwardStep:
    """One tile (i, j) of Algorithm 2 and the state of the gradients after it."""

    t: int  # step number, 0-based
    j: int  # K/V block: the outer loop (dK_j, dV_j accumulate in fast memory)
    i: int  # query block: the inner loop (dQ_i is updated in slow memory)
    state: int  # PARTIAL or FULL (SKIP tiles are never steps)
    dq_updates: tuple  # for every query block, the dQ_i read-modify-writes done so far (this step's included)
    dkv_written: frozenset  # K/V blocks whose dK_j, dV_j have been written to slow memory
    last_of_j: bool  # this step ends K/V block j's column: dK_j, dV_j are written after it


def backward_steps(tiles) -> list:
    """The steps of Algorithm 2 over a (Tr, Tc) block map of SKIP/PARTIAL/FULL: K/V blocks outside,
    query blocks inside, skipped tiles left out."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 2 or tiles.size == 0:
        raise ValueError(f"tiles must be a non-empty 2-D block map (Tr, Tc); got shape {tiles.shape}")
    Tr, Tc = tiles.shape
    visits = [(i, j) for j in range(Tc) for i in range(Tr) if tiles[i, j] != SKIP]
    updates = [0] * Tr
    written = set()
    steps = []
    for t, (i, j) in enumerate(visits):
        updates[i] += 1
        last = t + 1 == len(visits) or visits[t + 1][1] != j
        steps.append(BackwardStep(t, j, i, int(tiles[i, j]), tuple(updates), frozenset(written), last))
        if last:
            written.add(j)
    return steps


# ---------------------------------------------------------------- figures (plotly imported lazily)
_COL = {  # the colours of flashkit.viz.tiling, so the forward's and the backward's grids read alike
    "pending": "rgba(128,128,128,0.12)",
    "skip": "rgba(128,128,128,0.45)",
    "done": "rgba(99,110,250,0.45)",
    "current": "#EF553B",
    "fast": "#FFA15A",
    "written": "#00CC96",
}
_EDGE = dict(color="rgba(128,128,128,0.9)", width=1)


def _rect(x0, x1, y0, y1, fill, line=_EDGE):
    return dict(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, fillcolor=fill, line=line, layer="below")


def _dq_fill(n, most):
    """dQ_i's colour: the more updates it has had, the stronger (an update is a slow-memory round trip)."""
    if n == 0:
        return _COL["pending"]
    return f"rgba(171,99,250,{0.2 + 0.7 * n / max(most, 1):.2f})"


def step_figure(Nq: int, Nk: int, Br: int, Bc: int, step: int, causal=False, window=None):
    """The tile grid of S (Nq x Nk tokens) at step `step` of Algorithm 2, with the strips around it: dQ on
    the left (shaded by how many updates each block has had), Q_i, dO_i, lse_i, D_i on the right, K_j, V_j
    and dK_j, dV_j on top."""
    import plotly.graph_objects as go

    tiles = block_map(Nq, Nk, Br, Bc, effective_window(causal, window))
    steps = backward_steps(tiles)
    if not steps:
        raise ValueError("every tile is skipped: nothing to draw")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < len(steps):
        raise ValueError(f"step must be an int in [0, {len(steps) - 1}]; got {step!r}")
    st = steps[step]
    Tr, Tc = tiles.shape
    most = max(steps[-1].dq_updates)
    done = {(s.i, s.j) for s in steps[:step]}
    gap, wq, wk = 0.04 * Nk, 0.1 * Nk, 0.1 * Nq  # strip widths, in tokens of the S grid
    rows = lambda i: (i * Br, min(Nq, (i + 1) * Br))  # noqa: E731
    cols = lambda j: (j * Bc, min(Nk, (j + 1) * Bc))  # noqa: E731
    shapes, annotations = [], []
    for i in range(Tr):
        y0, y1 = rows(i)
        for j in range(Tc):
            x0, x1 = cols(j)
            fill = (_COL["current"] if (i, j) == (st.i, st.j) else _COL["skip"] if tiles[i, j] == SKIP
                    else _COL["done"] if (i, j) in done else _COL["pending"])
            shapes.append(_rect(x0, x1, y0, y1, fill))
        n = st.dq_updates[i]
        line = dict(color=_COL["current"], width=3) if i == st.i else _EDGE
        shapes.append(_rect(-gap - wq, -gap, y0, y1, _dq_fill(n, most), line))
        annotations.append(dict(x=-gap - wq / 2, y=(y0 + y1) / 2, text=str(n), showarrow=False))
        shapes.append(_rect(Nk + gap, Nk + gap + wq, y0, y1, _COL["fast"] if i == st.i else _COL["pending"]))
    for j in range(Tc):
        x0, x1 = cols(j)
        kv = _COL["fast"] if j == st.j else _COL["pending"]
        dkv = _COL["fast"] if j == st.j else _COL["written"] if j in st.dkv_written else _COL["pending"]
        shapes.append(_rect(x0, x1, -gap - wk, -gap, kv))  # K_j, V_j
        shapes.append(_rect(x0, x1, -2 * gap - 2 * wk, -2 * gap - wk, dkv))  # dK_j, dV_j
    fig = go.Figure()
    # Invisible markers give the legend its colour key (shapes have no legend entries of their own).
    for name, colour in (("recomputing S_ij, P_ij", _COL["current"]), ("in fast memory", _COL["fast"]),
                         ("tile done", _COL["done"]), ("skipped (mask)", _COL["skip"]),
                         ("dK_j, dV_j written", _COL["written"]), ("dQ_i updates so far", _dq_fill(most, most))):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 marker=dict(size=12, symbol="square", color=colour)))
    annotations += [
        dict(x=-gap - wq / 2, y=-gap - wk / 2, text="K_j, V_j →", showarrow=False),
        dict(x=-gap - wq / 2, y=-2 * gap - 1.5 * wk, text="dK_j, dV_j →", showarrow=False),
        dict(x=-gap - wq / 2, y=Nq + 2 * gap, text="dQ ↑", showarrow=False),
        dict(x=Nk + gap + wq / 2, y=Nq + 2 * gap, text="Q, dO, lse, D ↑", showarrow=False),
    ]
    writes = (f"; then dK_{st.j}, dV_{st.j} are written (once)" if st.last_of_j else "")
    fig.update_layout(
        shapes=shapes, annotations=annotations, height=540, legend=dict(orientation="h", y=-0.12),
        title=(f"FA2 backward (Algorithm 2), step {step + 1} of {len(steps)}: tile (i, j) = ({st.i}, {st.j}); "
               f"dK_{st.j}, dV_{st.j} += in fast memory,<br>dQ_{st.i} += in slow memory "
               f"(update {st.dq_updates[st.i]} of {steps[-1].dq_updates[st.i]}){writes}"),
    )
    ticks_x = sorted({0, Nk, *[c * Bc for c in range(Tc)]})
    ticks_y = sorted({0, Nq, *[r * Br for r in range(Tr)]})
    fig.update_xaxes(title_text="key index (tokens; blocks of Bc = K_j, V_j, the outer loop)",
                     range=[-2 * gap - wq, Nk + 2 * gap + wq], tickvals=ticks_x, showgrid=False, zeroline=False)
    fig.update_yaxes(title_text="query index (tokens; blocks of Br = Q_i, the inner loop)",
                     range=[Nq + 3 * gap, -3 * gap - 2 * wk], tickvals=ticks_y, showgrid=False, zeroline=False)
    return fig


def dataflow_figure(N: int = 4096, d: int = 64, itemsize: int = 4):
    """What crosses from the forward to the backward: Q, K, V, O and lse are stored; S and P (N x N)
    are thrown away and recomputed tile by tile. Box labels give each tensor's bytes for one head."""
    import plotly.graph_objects as go

    def size(words):
        b = words * itemsize
        return f"{b / 2**20:,.1f} MiB" if b >= 2**20 else f"{b / 2**10:,.0f} KiB"

    nd, nn = size(N * d), size(N * N)
    stored, dropped, recomputed, grad = "#00CC96", "rgba(128,128,128,0.35)", "#FFA15A", "#AB63FA"
    # (label, x, y, colour): x in columns, y in rows (forward on top, backward below)
    boxes = {
        "Q": (f"Q, K, V<br>(N×d, {nd} each)", 0, 3, stored),
        "S": (f"S = QKᵀ·scale<br>(N×N, {nn})", 1.3, 3, dropped),
        "P": (f"P = softmax(S)<br>(N×N, {nn})", 2.6, 3, dropped),
        "O": (f"O = PV (N×d, {nd})<br>lse = m + log l (N, {size(N)})", 3.9, 3, stored),
        "D": (f"D = rowsum(dO∘O)<br>(N, {size(N)}), before any tile", 3.9, 1.5, recomputed),
        "dO": (f"dO (N×d, {nd})<br>from the layer above", 3.9, 0, grad),
        "Sij": ("S_ij = Q_i K_jᵀ·scale<br>P_ij = exp(S_ij − lse_i)<br>(Br×Bc, in fast memory)", 1.95, 1.5, recomputed),
        "dS": ("dV_j += P_ijᵀ dO_i<br>dP_ij = dO_i V_jᵀ<br>dS_ij = P_ij∘(dP_ij − D_i)", 1.95, 0, recomputed),
        "grads": ("dQ_i += dS_ij K_j·scale<br>dK_j += dS_ijᵀ Q_i·scale<br>(dQ, dK, dV: N×d each)", 0, 0, grad),
    }
    arrows = [("Q", "S"), ("S", "P"), ("P", "O"), ("Q", "Sij"), ("O", "Sij"), ("O", "D"), ("dO", "D"),
              ("Sij", "dS"), ("D", "dS"), ("dO", "dS"), ("dS", "grads")]
    fig = go.Figure()
    for name, colour in (("stored by the forward (N·d or N)", stored), ("thrown away (N×N)", dropped),
                         ("computed in the backward", recomputed), ("gradients", grad)):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 marker=dict(size=14, symbol="square", color=colour)))
    w, h = 0.58, 0.5
    shapes = [dict(type="rect", x0=x - w, x1=x + w, y0=y - h, y1=y + h, fillcolor=c, opacity=0.8,
                   line=dict(color="rgba(128,128,128,0.9)", dash="dot" if c == dropped else "solid"), layer="below")
              for _, x, y, c in boxes.values()]
    annotations = [dict(x=x, y=y, text=label, showarrow=False, font=dict(size=11)) for label, x, y, _ in boxes.values()]
    for a, b in arrows:
        (_, xa, ya, _), (_, xb, yb, _) = boxes[a], boxes[b]
        # from the edge of box a towards box b, ending at b's edge
        dx, dy = xb - xa, yb - ya
        t = min(w / abs(dx) if dx else np.inf, h / abs(dy) if dy else np.inf)
        annotations.append(dict(x=xb - dx * t, y=yb - dy * t, ax=xa + dx * t, ay=ya + dy * t, xref="x", yref="y",
                                axref="x", ayref="y", showarrow=True, arrowhead=3, arrowwidth=1.5, text=""))
    annotations += [dict(x=-0.6, y=3.75, text="<b>forward</b>", showarrow=False, xanchor="left"),
                    dict(x=-0.6, y=2.25, text="<b>backward</b>: for each tile (i, j)", showarrow=False, xanchor="left")]
    fig.update_layout(
        shapes=shapes, annotations=annotations, height=520, legend=dict(orientation="h", y=-0.05),
        title=(f"What the backward reads: O and lse are stored, S and P recomputed (one head, N = {N:,}, d = {d}, "
               f"{itemsize}-byte floats):<br>keeping P for the backward would cost {nn} a head; lse costs {size(N)}"),
    )
    fig.update_xaxes(visible=False, range=[-0.7, 4.6])
    fig.update_yaxes(visible=False, range=[-0.7, 3.9])
    return fig


def ratio_figure(rows, flop_ratio: float = 2.5):
    """Measured backward time / forward time against N, one line per backend, beside the FLOP count's
    ratio. rows: dicts with backend, N, fwd_ms, bwd_ms (the fastest samples) and, when the spread was
    measured, fwd_p75, bwd_p75 and noisy: the error bar spans the ratios the four times allow, and a noisy
    point is ringed (flashkit.viz.spread)."""
    import plotly.graph_objects as go

    from flashkit.viz import spread

    def span(r):
        ratios = [b / f for b in (r["bwd_ms"], r.get("bwd_p75", r["bwd_ms"]))
                  for f in (r["fwd_ms"], r.get("fwd_p75", r["fwd_ms"]))]
        return min(ratios), max(ratios)

    fig = go.Figure()
    n_noisy = 0
    for backend in dict.fromkeys(r["backend"] for r in rows):
        rs = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["N"])
        y = [r["bwd_ms"] / r["fwd_ms"] for r in rs]
        lo_hi = [span(r) for r in rs]
        fig.add_trace(go.Scatter(x=[r["N"] for r in rs], y=y, mode="lines+markers", name=backend,
                                 error_y=dict(type="data", symmetric=False, array=[hi - v for v, (_, hi) in zip(y, lo_hi)],
                                              arrayminus=[v - lo for v, (lo, _) in zip(y, lo_hi)], thickness=1.5, width=4),
                                 customdata=[[r["fwd_ms"], r["bwd_ms"]] for r in rs],
                                 hovertemplate="N=%{x}: backward %{customdata[1]:.1f} ms / forward "
                                               "%{customdata[0]:.1f} ms = %{y:.2f}<extra></extra>"))
        noisy = [(r["N"], v) for r, v in zip(rs, y) if r.get("noisy")]
        n_noisy += spread.ring_noisy(fig, [n for n, _ in noisy], [v for _, v in noisy], showlegend=not n_noisy)
    Ns = [r["N"] for r in rows]
    fig.add_trace(go.Scatter(x=[min(Ns), max(Ns)], y=[flop_ratio] * 2, mode="lines", line=dict(dash="dash"),
                             name=f"FLOP count: 5 matmuls / 2 = {flop_ratio}"))
    fig.update_layout(title=spread.title("Backward time / forward time, measured on this machine, against the FLOP "
                                         "ratio 2.5", n_noisy),
                      height=420, legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(title_text="sequence length N (tokens, log scale)", type="log", tickvals=sorted(set(Ns)))
    fig.update_yaxes(title_text="backward / forward (time ratio, unitless)", rangemode="tozero")
    return fig


# ---------------------------------------------------------------- widgets
def stepper(Nq: int = 200, Nk: int = 256, Br: int = 32, Bc: int = 64):
    """A causal toggle and a step slider with a play button over Algorithm 2's tiles."""
    import ipywidgets as widgets
    from IPython.display import display

    causal = widgets.ToggleButtons(options=["causal", "no mask"], value="causal", description="mask")
    # Steps are numbered from 1 on screen, as in the figure's title.
    step = widgets.IntSlider(value=1, min=1, max=1, description="step", continuous_update=False)
    play = widgets.Play(value=1, min=1, max=1, interval=700, description="play")
    widgets.jslink((play, "value"), (step, "value"))

    def count(mask):
        return len(backward_steps(block_map(Nq, Nk, Br, Bc, effective_window(mask == "causal", None))))

    def resize(_=None):
        step.max = play.max = max(1, count(causal.value))

    def show(mask, step):
        steps = backward_steps(block_map(Nq, Nk, Br, Bc, effective_window(mask == "causal", None)))
        s = steps[min(step, len(steps)) - 1]
        print(f"step {s.t + 1}/{len(steps)}: outer j = {s.j}, inner i = {s.i}; dQ_i updates so far per query "
              f"block: {list(s.dq_updates)}; dK_j, dV_j written for j in {sorted(s.dkv_written) or 'none yet'}")
        display(step_figure(Nq, Nk, Br, Bc, s.t, causal=mask == "causal"))

    resize()
    causal.observe(resize, "value")
    out = widgets.interactive_output(show, {"mask": causal, "step": step})
    return widgets.VBox([causal, widgets.HBox([play, step]), out])
