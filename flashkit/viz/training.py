"""Figures of notebook 12, training the tiny model: the loss curve (redrawn live while it trains) and the
attention maps of a layer before and after training.

    from flashkit.viz import training as viz
    history = train(model, callback=viz.live_loss())     # a figure that redraws at every evaluation
    viz.attention_figure(before, after, tokens, layer=1)  # P of every head, untrained against trained
"""
from __future__ import annotations

import numpy as np


def loss_figure(history, title=None):
    """Two panels over the steps: the loss (every step's batch, and the held-out batch) on a log scale,
    and the held-out accuracy. `history` is a flashkit.train.History (possibly still growing)."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("loss (cross-entropy on the answer half)", "held-out accuracy"))
    steps = np.arange(1, history.steps + 1)
    fig.add_trace(go.Scatter(x=steps, y=history.loss, mode="lines", name="training batch (each step)",
                             line=dict(width=1, color="rgba(99,110,250,0.6)")), 1, 1)
    fig.add_trace(go.Scatter(x=history.eval_step, y=history.eval_loss, mode="lines+markers",
                             name="held-out batch (256 sequences)", line=dict(color="#EF553B")), 1, 1)
    fig.add_trace(go.Scatter(x=history.eval_step, y=history.accuracy, mode="lines+markers", showlegend=False,
                             line=dict(color="#EF553B")), 1, 2)
    if history.eval_step:
        n = history.eval_step[-1]
        seconds = history.seconds[n - 1] if n else 0.0
        status = (f"step {n}, {seconds:.1f} s: held-out loss {history.eval_loss[-1]:.3g} nats, "
                  f"accuracy {history.accuracy[-1]:.1%}")
    else:
        status = "not started"
    fig.update_layout(title=title or f"Training on '{history.task}' with backend {history.backend}: {status}",
                      height=400, legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(title_text="step (one batch of sequences each)")
    fig.update_yaxes(title_text="loss (nats per scored token, log scale)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="accuracy (fraction of scored tokens)", range=[0, 1.02], row=1, col=2)
    return fig


def live_loss(title=None):
    """A callback for flashkit.train.train that shows `loss_figure` once and redraws it in place at every
    evaluation (an IPython display handle: it works in JupyterLab and in a notebook run by nbconvert)."""
    import json

    from IPython.display import display

    handle = None

    def update(history):
        nonlocal handle
        # The figure as plotly's mime bundle, given to display() directly: a go.Figure displays itself
        # through _ipython_display_, which drops the display id, and every update would add a new figure.
        bundle = {"application/vnd.plotly.v1+json": json.loads(loss_figure(history, title).to_json()),
                  "text/plain": f"loss curve after step {history.eval_step[-1] if history.eval_step else 0}"}
        if handle is None:
            handle = display(bundle, raw=True, display_id=True)
        else:
            handle.update(bundle, raw=True)

    return update


def attention_figure(before, after, tokens, layer: int, labels=None):
    """The attention weights P (query rows, key columns) of every head of one layer for one sequence,
    untrained (top row) against trained (bottom row). before, after: lists of (B, H, n, n) maps as
    TinyDecoder.attention_maps returns them (sequence 0 is drawn); tokens (n,) the sequence's tokens."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    P0, P1 = np.asarray(before[layer])[0], np.asarray(after[layer])[0]  # (H, n, n)
    H, n = P0.shape[0], P0.shape[1]
    labels = labels or [f"{t}" for t in tokens]
    ticks = [f"{k}:{labels[k]}" for k in range(n)]  # position:token, so repeated tokens stay apart
    fig = make_subplots(rows=2, cols=H, horizontal_spacing=0.02, vertical_spacing=0.12,
                        subplot_titles=[f"{when}, head {h}" for when in ("untrained", "trained") for h in range(H)])
    for r, P in enumerate((P0, P1), start=1):
        for h in range(H):
            fig.add_trace(go.Heatmap(z=P[h], x=np.arange(n), y=ticks, zmin=0, zmax=1, colorscale="Viridis",
                                     showscale=(r == 1 and h == H - 1),
                                     colorbar=dict(title="weight P_ij"),
                                     hovertemplate="query %{y} attends to key %{x}: %{z:.2f}<extra></extra>"), r, h + 1)
            fig.update_yaxes(autorange="reversed", showticklabels=h == 0, dtick=1, tickfont=dict(size=9), row=r, col=h + 1)
            fig.update_xaxes(showticklabels=r == 2, dtick=4, row=r, col=h + 1)
    fig.update_yaxes(title_text="query (position:token)", row=1, col=1)
    fig.update_yaxes(title_text="query (position:token)", row=2, col=1)
    for h in range(H):
        fig.update_xaxes(title_text="key (position)", row=2, col=h + 1)
    fig.update_layout(height=640, title=(f"Layer {layer + 1}'s attention weights P for one sequence, every head: "
                                         "untrained (top) and trained (bottom)"))
    return fig
