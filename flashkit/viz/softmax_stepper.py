"""The online softmax of one query row, block by block: data, a figure per step, a stepper widget.

Notebook 02 walks a single row of scores s (Nk,) with its values V (Nk, d) through
flashkit.online_softmax one block of `Bc` keys at a time and shows what the running state holds:

    m_new = max(m, max(s_block))           the running max
    alpha = exp(m - m_new)                 how much everything accumulated so far shrinks
    l_new = alpha * l + sum(exp(s_block - m_new))
    O_new = alpha * O + exp(s_block - m_new) @ V_block

`online_steps` is plain data (testable without plotly); `step_figure` draws one step; `stepper` is
the ipywidgets app (a slider and a play button over the steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashkit import online_softmax


@dataclass(frozen=True)
class SoftmaxStep:
    """The state of one row after folding in block `index` (keys [j0, j1))."""

    index: int  # 0-based block number
    j0: int  # first key of this block
    j1: int  # one past the last key of this block
    m_old: float  # running max before the block (-inf before the first one)
    m: float  # running max after it
    alpha: float  # exp(m_old - m): the rescaling applied to l and O (0 before the first block)
    l_old: float
    l: float  # running sum of exp(s_j - m) over keys [0, j1)
    O_old: np.ndarray  # (d,) un-normalised output before the block
    O: np.ndarray  # (d,) un-normalised output after it
    weights: np.ndarray  # (j1,) exp(s_j - m) of every key seen so far, under the current max

    @property
    def output(self) -> np.ndarray:
        """O / l: the row's attention output if the keys seen so far were all the keys."""
        return self.O / self.l if self.l > 0 else np.zeros_like(self.O)


def _check_row(s, V, block):
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"s must be a non-empty 1-D array of scores; got shape {s.shape}")
    V = np.asarray(V, dtype=np.float64)
    if V.ndim != 2 or V.shape[0] != s.size:
        raise ValueError(f"V must have shape (len(s), d) = ({s.size}, d); got {V.shape}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive int; got {block!r}")
    return s, V, int(block)


def online_steps(s, V, block: int) -> list:
    """Fold the scores `s` (Nk,) and values `V` (Nk, d) into flashkit.online_softmax, `block` keys at a
    time; return one SoftmaxStep per block. Inputs are not modified (float64 copies are used)."""
    s, V, block = _check_row(s, V, block)
    d = V.shape[1]
    state = online_softmax.init(1, d)  # one row: m (1,), l (1,), O (1, d)
    steps = []
    for index, j0 in enumerate(range(0, s.size, block)):
        j1 = min(s.size, j0 + block)
        old = state
        state = online_softmax.update(state, s[None, j0:j1], V[j0:j1])
        m = float(state.m[0])
        alpha = float(online_softmax._exp_diff(old.m, state.m)[0])
        steps.append(SoftmaxStep(
            index=index, j0=j0, j1=j1, m_old=float(old.m[0]), m=m, alpha=alpha,
            l_old=float(old.l[0]), l=float(state.l[0]), O_old=old.O[0].copy(), O=state.O[0].copy(),
            weights=np.exp(s[:j1] - m),
        ))
    return steps


def step_figure(s, V, block: int, step: int):
    """Three panels after block number `step`, counted from 1 as in the title (step=3 is "block 3"): the
    scores with the running max m, the weights exp(s_j - m) under the current max (their sum is l), and
    the output O/l so far against the final one."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    steps = online_steps(s, V, block)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 1 <= step <= len(steps):
        raise ValueError(f"step must be a block number in [1, {len(steps)}] (counted from 1); got {step!r}")
    step = int(step) - 1  # 0-based from here on
    st, last = steps[step], steps[-1]
    s = np.asarray(s, dtype=np.float64)
    keys = np.arange(s.size)
    seen, current = keys < st.j0, (keys >= st.j0) & (keys < st.j1)
    colours = np.where(current, "#EF553B", np.where(seen, "#636EFA", "rgba(128,128,128,0.35)"))

    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
        f"scores s_j; running max m = {st.m:.3g}",
        f"weights exp(s_j − m); l = Σ = {st.l:.4g}",
        "output O / l so far vs final",
    ))
    fig.add_trace(go.Bar(x=keys, y=s, marker_color=list(colours), name="score s_j", showlegend=False), 1, 1)
    fig.add_hline(y=st.m, line_dash="dash", line_color="#FFA15A", row=1, col=1)
    w = np.full(s.size, np.nan)
    w[:st.j1] = st.weights
    fig.add_trace(go.Bar(x=keys, y=w, marker_color=list(colours), name="exp(s_j − m)", showlegend=False), 1, 2)
    if step > 0:  # the same earlier weights under the old max: multiplying them by alpha gives the bars
        fig.add_trace(go.Scatter(x=keys[:st.j0], y=np.exp(s[:st.j0] - st.m_old), mode="markers",
                                 marker=dict(symbol="x", size=9, color="#AB63FA"),
                                 name="earlier weights before rescaling by α"), 1, 2)
    dims = np.arange(st.O.size)
    fig.add_trace(go.Bar(x=dims, y=st.output, name=f"after block {step + 1}", marker_color="#00CC96"), 1, 3)
    fig.add_trace(go.Bar(x=dims, y=last.output, name="final (all keys)", marker_color="rgba(128,128,128,0.6)"), 1, 3)
    if step == 0:
        rescale = "first block: nothing to rescale"
    elif st.m == st.m_old:  # alpha is exactly 1: nothing shrinks, say so instead of "shrink by 1"
        rescale = f"max unchanged (m = {st.m:.3g}): l and O are kept as they are (α = 1) and the block is added"
    else:
        rescale = f"old max {st.m_old:.3g} → new max {st.m:.3g}, so l and O shrink by α = exp(m_old − m) = {st.alpha:.3g}"
    fig.update_layout(
        title=f"Online softmax, block {step + 1} of {len(steps)} (keys {st.j0}–{st.j1 - 1}, Bc = {block}):<br>{rescale}",
        barmode="group", height=420, legend=dict(orientation="h", y=-0.25),
    )
    fig.update_xaxes(title_text="key index j (token)", row=1, col=1)
    fig.update_xaxes(title_text="key index j (token)", row=1, col=2)
    fig.update_xaxes(title_text="output dimension (of d)", row=1, col=3)
    fig.update_yaxes(title_text="score (logit, nats)", row=1, col=1)
    fig.update_yaxes(title_text="weight (unitless, ≤ 1)", row=1, col=2)
    fig.update_yaxes(title_text="value (units of V)", row=1, col=3)
    return fig


def stepper(s, V, block: int):
    """A slider (and play button) over the blocks of one row; the figure and the state (m, l, alpha)
    update with it. A failing update shows its traceback in the widget's output area."""
    import ipywidgets as widgets
    from IPython.display import display

    steps = online_steps(s, V, block)  # bad input fails here, before any widget is built
    # Blocks are numbered from 1 on screen, as in the figure's title.
    slider = widgets.IntSlider(value=1, min=1, max=len(steps), description="block", continuous_update=False)
    play = widgets.Play(value=1, min=1, max=len(steps), interval=1200, description="play")
    widgets.jslink((play, "value"), (slider, "value"))

    def show(block_number):
        st = steps[block_number - 1]
        print(f"block {block_number} of {len(steps)}: keys [{st.j0}, {st.j1})   m: {st.m_old:.4g} -> {st.m:.4g}   "
              f"alpha = {st.alpha:.4g}   l: {st.l_old:.4g} -> {st.l:.4g}")
        display(step_figure(s, V, block, block_number))

    out = widgets.interactive_output(show, {"block_number": slider})  # Output shows any traceback
    return widgets.VBox([widgets.HBox([play, slider]), out])


def overflow_table(logits, dtype=np.float32) -> list:
    """Rows (method, result) of naive, safe and online softmax of `logits` in `dtype`, with the
    floating-point warnings silenced so the NaNs show in the table instead of on stderr."""
    x = np.asarray(logits, dtype=dtype)
    rows = []
    with np.errstate(over="ignore", invalid="ignore"):
        rows.append(("naive exp(x)/Σexp(x)", online_softmax.softmax_naive(x)))
        rows.append(("safe (subtract max)", online_softmax.softmax_safe(x)))
        rows.append(("online, blocks of 2", online_softmax.softmax_online(x, 2)))
    return rows
