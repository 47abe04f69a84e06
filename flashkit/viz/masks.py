"""Figures of notebooks 9 and 13: which keys each query sees, which tiles are skipped (of a mask or of a
mask_mod's BlockMask), and how GQA shares K/V.

Colours are mid-lightness hues and a translucent grey, readable on JupyterLab's light and dark themes.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flashkit import masks, mods

VISIBLE = "hsl(210, 75%, 55%)"
HIDDEN = "rgba(128, 128, 128, 0.18)"
SKIPPED = "rgba(70, 70, 70, 0.85)"  # dark: a tile never loaded, never computed
# A hidden score inside a computed tile is computed and then thrown away: a hue of its own, since two
# greys (hidden against skipped) were hard to tell apart.
MASKED_IN_TILE = "hsl(350, 75%, 78%)"
MiB = 2 ** 20


def top_left_causal(Nq: int, Nk: int) -> np.ndarray:
    """The other convention (torch's is_causal, flash_attn < 2.1): query i sees keys j <= i."""
    return np.tril(np.ones((Nq, Nk), bool))


def _mask_trace(mask: np.ndarray, showscale: bool = False) -> go.Heatmap:
    m = np.asarray(mask, bool)
    return go.Heatmap(
        z=m.astype(np.int8), x=np.arange(m.shape[1]), y=np.arange(m.shape[0]),
        colorscale=[[0.0, HIDDEN], [0.5, HIDDEN], [0.5, VISIBLE], [1.0, VISIBLE]], zmin=0, zmax=1,
        showscale=showscale, xgap=1, ygap=1,
        hovertemplate="query %{y}, key %{x}: %{z} (1 = may attend)<extra></extra>",
    )


def _axes(fig, Nq: int, Nk: int, row=None, col=None):
    """Square cells, row 0 at the top, no padding around the matrix."""
    fig.update_yaxes(range=[Nq - 0.5, -0.5], constrain="domain", title_text="query row i", row=row, col=col)
    fig.update_xaxes(range=[-0.5, Nk - 0.5], constrain="domain", title_text="key j", row=row, col=col)


def masks_figure(panels: Sequence[Tuple[str, np.ndarray]], title: str) -> go.Figure:
    """Boolean masks side by side (True = query row may attend to key column), one panel each."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[name for name, _ in panels],
                        horizontal_spacing=0.08)
    for c, (_, mask) in enumerate(panels, start=1):
        fig.add_trace(_mask_trace(mask), row=1, col=c)
        fig.update_yaxes(scaleanchor=f"x{c if c > 1 else ''}", row=1, col=c)
        _axes(fig, *np.shape(mask), row=1, col=c)
    # Square cells need room: about 380 px per panel, or the matrices shrink to a sliver.
    fig.update_layout(title=f"{title} (blue: may attend, grey: hidden)", height=460,
                      width=max(560, 380 * len(panels)))
    return fig


def causal_alignment_figure(Nq: int, Nk: int) -> go.Figure:
    """Causal with Nq != Nk: bottom-right (flashkit, flash_attn >= 2.1) against top-left (torch is_causal)."""
    return masks_figure(
        [(f"bottom-right (flashkit): j <= i + {Nk - Nq}", masks.dense_mask(Nq, Nk, (-1, 0))),
         ("top-left (torch is_causal): j <= i", top_left_causal(Nq, Nk))],
        title=f"Causal attention with Nq = {Nq} queries and Nk = {Nk} keys",
    )


def block_mask_figure(Nq: int, Nk: int, Br: int, Bc: int, window=(-1, -1), mask: Optional[np.ndarray] = None,
                      title: str = "Tiles of the score matrix") -> go.Figure:
    """The element mask with its (Br x Bc) tiles drawn: a tile with no visible score is skipped.

    Colours: visible score; hidden score inside a computed tile (masked element by element); hidden
    score inside a skipped tile (never loaded, never computed). Tile borders drawn as lines.
    """
    visible = masks.dense_mask(Nq, Nk, window)
    if mask is not None:
        visible = visible & np.asarray(mask, bool)
    tiles = masks.block_map(Nq, Nk, Br, Bc, window, mask)  # (Tr, Tc) SKIP / PARTIAL / FULL
    return _tiles_figure(visible, tiles, Br, Bc, title)


def mod_block_mask_figure(block_mask, b: int = 0, h: int = 0, title: Optional[str] = None) -> go.Figure:
    """A flashkit.block_mask(mask_mod, ...) drawn like `block_mask_figure`: the mask_mod's scores (evaluated
    in NumPy for batch b, head h) with the tiles it classified, skipped ones dark. For small Nq, Nk."""
    visible = block_mask.dense(b, h)
    name = getattr(block_mask.mask_mod, "__qualname__", "mask_mod")
    return _tiles_figure(visible, block_mask.plane(b, h), block_mask.Br, block_mask.Bc,
                         title or f"Block mask of {name}")


def _tiles_figure(visible: np.ndarray, tiles: np.ndarray, Br: int, Bc: int, title: str) -> go.Figure:
    """The picture both figures above draw: visible scores, masked ones, skipped tiles, tile borders."""
    Nq, Nk = visible.shape
    skipped = np.repeat(np.repeat(tiles == masks.SKIP, Br, axis=0), Bc, axis=1)[:Nq, :Nk]
    z = np.where(visible, 2, np.where(skipped, 0, 1)).astype(np.int8)
    fig = go.Figure(go.Heatmap(
        z=z, colorscale=[[0, SKIPPED], [1 / 3, SKIPPED], [1 / 3, MASKED_IN_TILE], [2 / 3, MASKED_IN_TILE],
                         [2 / 3, VISIBLE], [1, VISIBLE]],
        zmin=0, zmax=2, showscale=False,
        hovertemplate="query %{y}, key %{x}: %{z} (2 visible, 1 masked in a computed tile, 0 in a skipped tile)<extra></extra>",
    ))
    for r in range(1, -(-Nq // Br)):
        fig.add_hline(y=r * Br - 0.5, line_width=1, line_color="hsl(30, 90%, 55%)")
    for c in range(1, -(-Nk // Bc)):
        fig.add_vline(x=c * Bc - 0.5, line_width=1, line_color="hsl(30, 90%, 55%)")
    n_skip, n_full = int((tiles == masks.SKIP).sum()), int((tiles == masks.FULL).sum())
    n_part = tiles.size - n_skip - n_full
    # A colour key as legend entries (a heatmap has none of its own).
    for name, colour in (("visible score", VISIBLE), ("masked score in a computed tile (computed, then discarded)",
                                                     MASKED_IN_TILE), ("skipped tile (never computed)", SKIPPED)):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 marker=dict(size=12, symbol="square", color=colour)))
    fig.update_yaxes(scaleanchor="x")
    _axes(fig, Nq, Nk)
    # An explicit size: with square cells and the default height, the matrix came out about 150 px wide.
    fig.update_layout(title=f"{title}: {n_skip} of {tiles.size} tiles skipped<br><sup>{n_part} partial, {n_full} full; "
                            f"Br = {Br}, Bc = {Bc}</sup>",
                      width=640, height=640, legend=dict(orientation="h", y=-0.12, x=0), plot_bgcolor="rgba(0,0,0,0)")
    return fig


def explorer_mask(N: int, documents: int, window: int, causal: bool):
    """The mask_mod `block_mask_explorer` draws: `documents` documents of (nearly) equal length packed in
    N tokens, causal if asked, and a sliding window of `window` keys on each side (back only if causal;
    0 = no window). flashkit.mods.and_masks of the library's mods."""
    parts = []
    if documents > 1:
        parts.append(mods.document_mask(np.diff(np.linspace(0, N, documents + 1).round().astype(int))))
    if causal:
        parts.append(mods.causal(N, N))
    if window > 0:
        parts.append(mods.sliding_window(N, N, window, 0 if causal else window))
    return mods.and_masks(*parts) if parts else mods.sliding_window(N, N, -1, -1)  # (-1, -1): every key


def block_mask_explorer(N: int = 256, block: int = 16):
    """Sliders for the number of packed documents and a sliding window, a causal toggle: the mask_mod's
    block mask (flashkit.block_mask) redrawn, with the share of tiles a kernel skips."""
    import ipywidgets as widgets
    from IPython.display import display

    from flashkit.blockmask import block_mask

    documents = widgets.IntSlider(value=4, min=1, max=8, description="documents", continuous_update=False)
    window = widgets.IntSlider(value=0, min=0, max=N, step=8, description="window", continuous_update=False)
    causal = widgets.Checkbox(value=True, description="causal")

    def show(documents, window, causal):
        bm = block_mask(explorer_mask(N, documents, window, causal), None, None, N, N, block_size=block)
        c = bm.counts()
        print(f"{bm.sparsity:.0%} of the tiles skipped: a kernel computes {c['partial'] + c['full']} of {c['total']} "
              f"({c['partial']} masked element by element, {c['full']} without a test)")
        display(mod_block_mask_figure(bm, title=f"{documents} documents, window {window or 'none'}"
                                                + (", causal" if causal else "")))

    out = widgets.interactive_output(show, {"documents": documents, "window": window, "causal": causal})
    return widgets.VBox([widgets.HBox([documents, window, causal]), out])


def tile_counts(Nq: int, Nk: int, Br: int, Bc: int, window=(-1, -1), mask=None) -> dict:
    """How many tiles are skipped, partial and full, and the fraction of score work skipped."""
    tiles = masks.block_map(Nq, Nk, Br, Bc, window, mask)
    counts = {name: int((tiles == state).sum()) for name, state in
              (("skip", masks.SKIP), ("partial", masks.PARTIAL), ("full", masks.FULL))}
    counts["total"] = int(tiles.size)
    counts["skipped_fraction"] = counts["skip"] / counts["total"]
    return counts


def gqa_sharing_figure(Hq: int, Hkv: int) -> go.Figure:
    """Which K/V head each query head reads: query head h uses K/V head h // (Hq / Hkv)."""
    if Hq % Hkv:
        raise ValueError(f"Hq must be a multiple of Hkv; got Hq={Hq}, Hkv={Hkv}")
    g = Hq // Hkv
    uses = np.zeros((Hq, Hkv), np.int8)
    uses[np.arange(Hq), np.arange(Hq) // g] = 1
    fig = go.Figure(go.Heatmap(z=uses, x=[f"K/V {j}" for j in range(Hkv)], y=[f"Q {h}" for h in range(Hq)],
                               colorscale=[[0, HIDDEN], [0.5, HIDDEN], [0.5, VISIBLE], [1, VISIBLE]],
                               zmin=0, zmax=1, showscale=False, xgap=2, ygap=2,
                               hovertemplate="%{y} reads %{x}: %{z}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title_text="query head")
    fig.update_xaxes(title_text="K/V head (shared by a group of query heads)")
    fig.update_layout(title=f"Grouped-query attention: {Hq} query heads, {Hkv} K/V heads, groups of {g}")
    return fig


def kv_memory_figure(Hq: int, Hkvs: Sequence[int], kv_bytes: Sequence[int], N: int, d: int, dtype: str) -> go.Figure:
    """K and V memory (MiB) for several numbers of K/V heads (Hkv = Hq is multi-head, 1 is multi-query)."""
    labels = [("MHA" if h == Hq else "MQA" if h == 1 else "GQA") + f", {h} K/V heads" for h in Hkvs]
    fig = go.Figure(go.Bar(x=labels, y=[b / MiB for b in kv_bytes], marker_color=VISIBLE,
                           text=[f"{b / MiB:.1f}" for b in kv_bytes], textposition="outside"))
    fig.update_xaxes(title_text="attention variant")
    fig.update_yaxes(title_text="K and V memory (MiB)")
    fig.update_layout(title=f"K/V memory for {Hq} query heads, N = {N:,}, d = {d}, {dtype}")
    return fig
