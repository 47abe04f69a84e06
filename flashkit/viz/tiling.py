"""FlashAttention's loops drawn as tiles: the step sequence (data), the grid figure, the widgets.

Q is cut into Tr blocks of Br rows, K and V into Tc blocks of Bc rows; one step computes one tile
S_ij = Q_i K_j^T and folds it into O_i. The two papers visit the tiles in different orders:

    FA1 (Algorithm 1 of Dao et al. 2022): for j in K/V blocks: for i in query blocks  (K_j, V_j stay)
    FA2 (Algorithm 1 of Dao 2023):        for i in query blocks: for j in K/V blocks  (Q_i, O_i stay)

`loop_steps` lists the steps of either order for a block map (flashkit.masks.block_map), skipping
the SKIP tiles, with what is in fast memory, what is loaded and written, and which rows of O are final.
It is plain data, tested without plotly; `grid_figure` draws one step and `loop_explorer` is the slider.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashkit.masks import FULL, PARTIAL, SKIP, block_map, effective_window, visible_fraction
from flashkit.tiled import block_sizes

ORDERS = ("FA1", "FA2")


@dataclass(frozen=True)
class TileStep:
    """One computed tile S_ij and the memory traffic around it."""

    t: int  # step number, 0-based
    i: int  # query block (rows i*Br ... of Q and O)
    j: int  # key/value block (rows j*Bc ... of K and V)
    state: int  # PARTIAL or FULL (SKIP tiles are never steps)
    resident: frozenset  # tiles in fast memory during the step, e.g. {("Q", 0), ("K", 2), ("V", 2), ("O", 0)}
    loads: frozenset  # tiles read from slow memory for this step
    writes: frozenset  # tiles written back to slow memory after this step
    final: frozenset  # query blocks whose rows of O are final once this step is done


def _check_order(order):
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}")


def loop_steps(order: str, tiles) -> list:
    """The steps of loop order `order` ("FA1" or "FA2") over a (Tr, Tc) block map of SKIP/PARTIAL/FULL.

    FA2 loads Q_i once per query block and K_j, V_j at every step, and writes O_i once, when its row
    of tiles is done. FA1 loads K_j, V_j once per key block and Q_i, O_i (with l_i, m_i) at every step,
    writing O_i back after each one (paper lines 8 and 12-13).
    """
    _check_order(order)
    tiles = np.asarray(tiles)
    if tiles.ndim != 2 or tiles.size == 0:
        raise ValueError(f"tiles must be a non-empty 2-D block map (Tr, Tc); got shape {tiles.shape}")
    Tr, Tc = tiles.shape
    if order == "FA2":
        visits = [(i, j) for i in range(Tr) for j in range(Tc) if tiles[i, j] != SKIP]
    else:
        visits = [(i, j) for j in range(Tc) for i in range(Tr) if tiles[i, j] != SKIP]
    remaining = {i: int((tiles[i] != SKIP).sum()) for i in range(Tr)}  # computed tiles left per query block
    final = {i for i in range(Tr) if remaining[i] == 0}  # a fully hidden row block is 0 from the start
    steps, prev = [], None
    for t, (i, j) in enumerate(visits):
        remaining[i] -= 1
        if remaining[i] == 0:
            final.add(i)
        resident = frozenset({("Q", i), ("K", j), ("V", j), ("O", i)})
        if order == "FA2":
            new_row = prev is None or prev[0] != i
            loads = {("K", j), ("V", j)} | ({("Q", i)} if new_row else set())
            last_of_row = t + 1 == len(visits) or visits[t + 1][0] != i
            writes = {("O", i)} if last_of_row else set()
        else:
            new_col = prev is None or prev[1] != j
            loads = {("Q", i), ("O", i)} | ({("K", j), ("V", j)} if new_col else set())
            writes = {("O", i)}
        steps.append(TileStep(t, i, j, int(tiles[i, j]), resident, frozenset(loads), frozenset(writes),
                              frozenset(final)))
        prev = (i, j)
    return steps


def traffic(steps) -> dict:
    """Tiles read and written per tensor over a whole loop: {"Q": loads, "K": ..., "V": ..., "O read": ...,
    "O write": ...}. Multiply by the tile's bytes for the slow-memory traffic."""
    count = {"Q": 0, "K": 0, "V": 0, "O read": 0, "O write": 0}
    for st in steps:
        for name, _ in st.loads:
            count["O read" if name == "O" else name] += 1
        count["O write"] += len(st.writes)
    return count


def work_summary(Nq: int, Nk: int, Br: int, Bc: int, causal=False, window=None, mask=None) -> dict:
    """Tile counts and the fraction of work skipped for a mask: what block skipping saves."""
    win = effective_window(causal, window)
    tiles = block_map(Nq, Nk, Br, Bc, win, mask)
    n = {name: int((tiles == s).sum()) for name, s in (("skip", SKIP), ("partial", PARTIAL), ("full", FULL))}
    total = tiles.size
    computed = n["partial"] + n["full"]
    return {
        "Tr": tiles.shape[0], "Tc": tiles.shape[1], "tiles": total, **n,
        "computed_fraction": computed / total,
        "visible_fraction": visible_fraction(Nq, Nk, win) if mask is None else float(np.mean(mask)),
    }


def fast_memory_use(M: int, d: int) -> dict:
    """The paper's block sizes for a fast memory of M floats and what the four tiles occupy (floats)."""
    Br, Bc = block_sizes(M, d)
    use = {"Q_i": Br * d, "K_j": Bc * d, "V_j": Bc * d, "O_i": Br * d}
    return {"Br": Br, "Bc": Bc, "use": use, "total": sum(use.values()), "M": M}


# ---------------------------------------------------------------- figures (plotly imported lazily)

_COL = {  # mid-tone colours that read on light and dark backgrounds
    "pending": "rgba(255,255,255,0)",  # not visited yet (or in slow memory): only the outline, never grey
    "skip": "rgba(80,80,80,0.8)",  # skipped by the mask: dark, so it cannot pass for "not yet"
    "done": "rgba(99,110,250,0.45)",
    "current": "#EF553B",
    "fast": "#FFA15A",
    "final": "#00CC96",
    "partial_row": "rgba(0,204,150,0.25)",
}
_EDGE = dict(color="rgba(128,128,128,0.9)", width=1)


def _rect(x0, x1, y0, y1, fill):
    return dict(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, fillcolor=fill, line=_EDGE, layer="below")


def grid_figure(order: str, Nq: int, Nk: int, Br: int, Bc: int, step: int, causal=False, window=None):
    """The tile grid of S (Nq x Nk, in tokens) with Q and O strips on the left/right and K, V strips on
    top, at step number `step` of `order`, counted from 1 as in the title: the tile being computed in
    red, the tiles in fast memory in orange, tiles done in blue, tiles not visited yet white (outlined),
    tiles the mask skips dark grey, and finished rows of O in green."""
    import plotly.graph_objects as go

    tiles = block_map(Nq, Nk, Br, Bc, effective_window(causal, window))
    steps = loop_steps(order, tiles)
    if not steps:
        raise ValueError("every tile is skipped: nothing to draw")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 1 <= step <= len(steps):
        raise ValueError(f"step must be a step number in [1, {len(steps)}] (counted from 1); got {step!r}")
    step = int(step) - 1  # 0-based from here on
    st = steps[step]
    Tr, Tc = tiles.shape
    done = {(s.i, s.j) for s in steps[:step]}
    gap, wq, wk = 0.04 * Nk, 0.1 * Nk, 0.1 * Nq  # strip widths, in tokens of the S grid
    rows = lambda i: (i * Br, min(Nq, (i + 1) * Br))  # noqa: E731
    cols = lambda j: (j * Bc, min(Nk, (j + 1) * Bc))  # noqa: E731
    shapes = []
    for i in range(Tr):
        y0, y1 = rows(i)
        for j in range(Tc):
            x0, x1 = cols(j)
            if (i, j) == (st.i, st.j):
                fill = _COL["current"]
            elif tiles[i, j] == SKIP:
                fill = _COL["skip"]
            elif (i, j) in done:
                fill = _COL["done"]
            else:
                fill = _COL["pending"]
            shapes.append(_rect(x0, x1, y0, y1, fill))
        q_fill = _COL["fast"] if ("Q", i) in st.resident else _COL["pending"]
        shapes.append(_rect(-gap - wq, -gap, y0, y1, q_fill))
        o_fill = _COL["fast"] if ("O", i) in st.resident else (
            _COL["final"] if i in st.final else _COL["pending"])
        shapes.append(_rect(Nk + gap, Nk + gap + wq, y0, y1, o_fill))
    for j in range(Tc):
        x0, x1 = cols(j)
        for name, (y0, y1) in (("V", (-2 * gap - 2 * wk, -2 * gap - wk)), ("K", (-gap - wk, -gap))):
            fill = _COL["fast"] if (name, j) in st.resident else _COL["pending"]
            shapes.append(_rect(x0, x1, y0, y1, fill))
    fig = go.Figure()
    # Invisible markers give the legend its colour key (shapes have no legend entries of their own).
    for name, key in (("computing S_ij", "current"), ("in fast memory", "fast"), ("tile done", "done"),
                      ("not visited yet (slow memory)", "pending"), ("skipped (mask)", "skip"), ("O rows final", "final")):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 marker=dict(size=12, symbol="square", color=_COL[key], line=_EDGE)))
    annotations = [
        dict(x=-gap - wq / 2, y=-gap - wk / 2, text="K →", showarrow=False),
        dict(x=-gap - wq / 2, y=-2 * gap - 1.5 * wk, text="V →", showarrow=False),
        dict(x=Nk + gap + wq / 2, y=-gap - wk / 2, text="O ↓", showarrow=False),
        dict(x=-gap - wq / 2, y=Nq + 2 * gap, text="Q ↑", showarrow=False),
    ]
    fig.update_layout(
        shapes=shapes, annotations=annotations, height=520,
        title=(f"{order} loop order, step {step + 1} of {len(steps)}: S_ij with (i, j) = ({st.i}, {st.j}) "
               f"(Br = {Br}, Bc = {Bc}; {step + 1} of the {len(steps)} planned tiles computed so far, "
               f"{Tr * Tc - len(steps)} of {Tr * Tc} skipped)"),
        legend=dict(orientation="h", y=-0.12),
    )
    ticks_x = sorted({0, Nk, *[c * Bc for c in range(Tc)]})
    ticks_y = sorted({0, Nq, *[r * Br for r in range(Tr)]})
    fig.update_xaxes(title_text="key index (tokens; blocks of Bc = K_j, V_j)", range=[-2 * gap - wq, Nk + 2 * gap + wq],
                     tickvals=ticks_x, showgrid=False, zeroline=False)
    fig.update_yaxes(title_text="query index (tokens; blocks of Br = Q_i, O_i)", range=[Nq + 3 * gap, -3 * gap - 2 * wk],
                     tickvals=ticks_y, showgrid=False, zeroline=False)
    return fig


def block_map_figure(Nq: int, Nk: int, Br: int, Bc: int, causal=False, window=None, mask=None, title=None):
    """The (Tr, Tc) block map as a heatmap: skipped, partial (masked per element) and full tiles."""
    import plotly.graph_objects as go

    tiles = block_map(Nq, Nk, Br, Bc, effective_window(causal, window), mask)
    w = work_summary(Nq, Nk, Br, Bc, causal, window, mask)
    colours = [[0, _COL["skip"]], [1 / 3, _COL["skip"]], [1 / 3, "#FFA15A"], [2 / 3, "#FFA15A"],
               [2 / 3, "#636EFA"], [1, "#636EFA"]]
    names = np.array(["skip", "partial", "full"])[tiles]
    fig = go.Figure(go.Heatmap(
        z=tiles, zmin=-0.5, zmax=2.5, colorscale=colours, xgap=1, ygap=1, text=names,
        hovertemplate="query block i=%{y}, key block j=%{x}: %{text}<extra></extra>",
        colorbar=dict(title="tile", tickvals=[0, 1, 2], ticktext=["skip", "partial", "full"]),
    ))
    fig.update_layout(title=title or (
        f"Block map Nq={Nq}, Nk={Nk}, Br={Br}, Bc={Bc}:<br>{w['partial'] + w['full']} of {w['tiles']} tiles "
        f"computed ({w['computed_fraction']:.0%}), {w['visible_fraction']:.0%} of scores visible"), height=420)
    fig.update_xaxes(title_text=f"key block j (Bc = {Bc} tokens each)")
    fig.update_yaxes(title_text=f"query block i (Br = {Br} tokens each)", autorange="reversed")
    return fig


def block_size_figure(d_values=(32, 64, 128), M_values=None):
    """Bc = ceil(M / 4d) and Br = min(Bc, d) against the fast-memory size M, one line pair per d."""
    import plotly.graph_objects as go

    M_values = M_values or [2 ** p for p in range(10, 19)]
    colours = ["#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A"]
    fig = go.Figure()
    for n, d in enumerate(d_values):
        sizes = [block_sizes(M, d) for M in M_values]
        c = colours[n % len(colours)]
        fig.add_trace(go.Scatter(x=M_values, y=[bc for _, bc in sizes], name=f"Bc, d={d}", mode="lines+markers",
                                 line=dict(color=c)))
        fig.add_trace(go.Scatter(x=M_values, y=[br for br, _ in sizes], name=f"Br, d={d}", mode="lines+markers",
                                 line=dict(color=c, dash="dot"), marker=dict(symbol="diamond")))
    fig.update_layout(title="Block sizes from the fast-memory size M: Bc = ⌈M/4d⌉, Br = min(Bc, d)", height=420)
    fig.update_xaxes(title_text="fast memory M (float32 words; 1 word = 4 bytes)", type="log",
                     tickvals=M_values, ticktext=[f"{M // 1024}Ki" if M >= 1024 else str(M) for M in M_values])
    fig.update_yaxes(title_text="block size (rows of a tile)", type="log", tickvals=[2 ** p for p in range(0, 13)])
    return fig


_TILE_COLOURS = {"Q_i": "#636EFA", "K_j": "#EF553B", "V_j": "#00CC96", "O_i": "#AB63FA"}


def fast_memory_figure(M: int, d: int):
    """Left: stacked bar of the floats the four tiles Q_i, K_j, V_j, O_i occupy next to the budget M.
    Right: the tiles' shapes to scale (rows x d). Once d is large enough that Br = Bc, every tile holds
    M/4 floats whatever d is, so the bar alone stops changing with d; the shapes show what d still
    changes: how many rows (tokens) a tile holds at that width."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    f = fast_memory_use(M, d)
    rows = {"Q_i": f["Br"], "K_j": f["Bc"], "V_j": f["Bc"], "O_i": f["Br"]}
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.12,
                        subplot_titles=("floats held", "tile shapes to scale: rows x d"))
    for name, n in f["use"].items():
        fig.add_trace(go.Bar(y=["tiles"], x=[n], name=f"{name}: {rows[name]} x {d} = {n:,} floats", orientation="h",
                             marker_color=_TILE_COLOURS[name], legendgroup=name), 1, 1)
    fig.add_trace(go.Bar(y=["budget M"], x=[M], name=f"M = {M:,} floats", orientation="h",
                         marker_color="rgba(128,128,128,0.5)"), 1, 1)
    x0, gap = 0, max(d // 4, 2)
    for name, n_rows in rows.items():  # rectangles d wide and n_rows tall, side by side
        fig.add_shape(type="rect", x0=x0, x1=x0 + d, y0=0, y1=n_rows, fillcolor=_TILE_COLOURS[name], opacity=0.6,
                      line=dict(color=_TILE_COLOURS[name]), row=1, col=2)
        fig.add_trace(go.Scatter(x=[x0 + d / 2], y=[n_rows], mode="text", text=[f"{name}<br>{n_rows} x {d}"],
                                 textposition="top center", showlegend=False, hoverinfo="skip"), 1, 2)
        x0 += d + gap
    fig.update_layout(barmode="stack", height=380, legend=dict(orientation="h", y=-0.3), title=(
        f"M = {M:,} floats, d = {d}: Br = {f['Br']}, Bc = {f['Bc']};<br>tiles Q_i, K_j, V_j, O_i use {f['total']:,} floats "
        f"({f['total'] / M:.0%} of M)"))
    fig.update_xaxes(title_text="fast memory (float32 words)", row=1, col=1)
    fig.update_yaxes(title_text="fast-memory contents", row=1, col=1)
    top = max(rows.values())
    fig.update_xaxes(title_text="columns (head size d, floats)", range=[-gap, x0], constrain="domain", row=1, col=2)
    fig.update_yaxes(title_text="rows (tokens)", range=[0, top * 1.35], scaleanchor="x2", scaleratio=1,
                     constrain="domain", row=1, col=2)  # one row as tall as one column is wide: to scale
    return fig


# ---------------------------------------------------------------- widgets

def loop_explorer(Nq: int = 256, Nk: int = 256, Br: int = 64, Bc: int = 64):
    """Order (FA1/FA2), mask (none/causal/window) and a step slider with a play button over the grid."""
    import ipywidgets as widgets
    from IPython.display import display

    order = widgets.ToggleButtons(options=ORDERS, value="FA2", description="order")
    mask = widgets.Dropdown(options=["none", "causal", "window (left=64)"], value="none", description="mask")
    # Steps are numbered from 1 on screen, as in the figure's title.
    step = widgets.IntSlider(value=1, min=1, max=1, description="step", continuous_update=False)
    play = widgets.Play(value=1, min=1, max=1, interval=700, description="play")
    widgets.jslink((play, "value"), (step, "value"))

    def options(m):
        return {"none": (False, None), "causal": (True, None), "window (left=64)": (True, (64, 0))}[m]

    def resize(_=None):
        causal, window = options(mask.value)
        n = len(loop_steps(order.value, block_map(Nq, Nk, Br, Bc, effective_window(causal, window))))
        step.max = play.max = max(1, n)

    def show(order, mask, step):
        causal, window = options(mask)
        st = loop_steps(order, block_map(Nq, Nk, Br, Bc, effective_window(causal, window)))
        step = min(step, len(st))  # counted from 1, as on screen
        s = st[step - 1]
        fmt = lambda tiles: ", ".join(f"{n}_{k}" for n, k in sorted(tiles)) or "nothing"  # noqa: E731
        print(f"step {step}/{len(st)}: loads {fmt(s.loads)}; writes {fmt(s.writes)}; "
              f"query blocks with final rows of O: {sorted(s.final) or 'none yet'}")
        display(grid_figure(order, Nq, Nk, Br, Bc, step, causal, window))

    resize()
    order.observe(resize, "value")
    mask.observe(resize, "value")
    out = widgets.interactive_output(show, {"order": order, "mask": mask, "step": step})
    return widgets.VBox([widgets.HBox([order, mask]), widgets.HBox([play, step]), out])


def block_size_explorer():
    """Sliders for M and d; shows Br, Bc and how the four tiles fill the fast memory."""
    import ipywidgets as widgets
    from IPython.display import display

    M = widgets.SelectionSlider(options=[2 ** p for p in range(10, 19)], value=2 ** 14,
                                description="M (floats)", continuous_update=False)
    d = widgets.SelectionSlider(options=[16, 32, 64, 128, 256], value=64, description="d",
                                continuous_update=False)

    def show(M, d):
        display(fast_memory_figure(M, d))

    out = widgets.interactive_output(show, {"M": M, "d": d})
    return widgets.VBox([widgets.HBox([M, d]), out])
