"""Heatmaps of the matrices of standard attention: the scores S = QKᵀ·scale and the weights P = softmax(S).

Used by notebooks 01 (standard attention) and 02 (online softmax). Diverging colours centred on 0 for S
(logits can be of either sign), a sequential scale from 0 for P (probabilities); both colour scales
read on JupyterLab's light and dark themes.
"""
from __future__ import annotations

import numpy as np


def _as_matrix(name, A):
    A = np.asarray(A)
    if A.ndim != 2 or A.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array; got shape {A.shape}")
    return A


def matrix_heatmap(A, title: str, x_title: str = "key index j (token)", y_title: str = "query index i (token)",
                   z_title: str = "value", colorscale="Viridis", zmid=None):
    """One matrix as a heatmap, row 0 at the top (as the matrix is written)."""
    import plotly.graph_objects as go

    A = _as_matrix("A", A)
    fig = go.Figure(go.Heatmap(z=A, colorscale=colorscale, zmid=zmid, colorbar=dict(title=z_title),
                               hovertemplate="i=%{y}, j=%{x}: %{z:.4g}<extra></extra>"))
    fig.update_layout(title=title, height=420)
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title, autorange="reversed")
    return fig


def attention_heatmaps(S, P, title: str = "Standard attention: scores S and weights P = softmax(S)"):
    """S and P side by side, each with its own colour bar: S diverging around 0, P from 0 to its max."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    S, P = _as_matrix("S", S), _as_matrix("P", P)
    if S.shape != P.shape:
        raise ValueError(f"S and P must have the same shape; got {S.shape} and {P.shape}")
    finite = S[np.isfinite(S)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.16, subplot_titles=(
        "S = Q Kᵀ · scale (logits)", "P = softmax(S), each row sums to 1"))
    fig.add_trace(go.Heatmap(z=np.where(np.isfinite(S), S, np.nan), colorscale="RdBu", zmid=0, zmin=-bound, zmax=bound,
                             colorbar=dict(title="logit", x=0.42), hovertemplate="i=%{y}, j=%{x}: S=%{z:.3f}<extra></extra>"), 1, 1)
    fig.add_trace(go.Heatmap(z=P, colorscale="Viridis", zmin=0, colorbar=dict(title="weight", x=1.0),
                             hovertemplate="i=%{y}, j=%{x}: P=%{z:.3f}<extra></extra>"), 1, 2)
    fig.update_layout(title=title, height=420)
    for col in (1, 2):
        fig.update_xaxes(title_text="key index j (token)", row=1, col=col)
        fig.update_yaxes(title_text="query index i (token)", autorange="reversed", row=1, col=col)
    return fig
