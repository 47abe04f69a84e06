"""Notebook 07's tensor-core lesson: which lane of a warp holds which element of `mma.sync.m16n8k16`,
and a NumPy emulation of one warp's mma built from the 32 lanes' fragments.

    D (16 x 8, fp32) = A (16 x 16, fp16, row-major) @ B (16 x 8, fp16, "col") + C (16 x 8, fp32)

One warp issues the instruction together; no lane holds a whole matrix. Each of the 32 lanes, numbered
lane = 4 g + t (g = lane // 4, its row group; t = lane % 4, its place in the group), holds in registers
(PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"; the same layout rungs 4-6 write
in flashkit/gpu/kernels/4_mma.cu):

    A: 8 halves a0..a7    a_i at row g + 8 * (i in {2, 3, 6, 7}), column 2 t + (i % 2) + 8 * (i >= 4)
    B: 4 halves b0..b3    b_i at row 2 t + (i % 2) + 8 * (i >= 2), column g
    C, D: 4 floats c0..c3 c_i at row g + 8 * (i >= 2),             column 2 t + (i % 2)

Pairs of halves travel as one 32-bit register (a0 a1 is register 0, ...). The emulation below gathers
each lane's fragments from A, B and C (what ldmatrix or plain loads do), then does what the tensor core
does with them: every element of A and B is read from the lane that owns it, products in fp32, and each
lane gets back its own four elements of D.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import plotly.graph_objects as go

M, N, K = 16, 8, 16  # the instruction's shape: m16n8k16
LANES = 32
SHAPES = {"A": (M, K), "B": (K, N), "C": (M, N)}
PER_LANE = {"A": 8, "B": 4, "C": 4}  # elements each lane holds


def position(matrix: str, lane: int, i: int) -> tuple:
    """(row, column) of element i of `lane`'s fragment of `matrix` ("A", "B" or "C"; D as C)."""
    if matrix not in SHAPES:
        raise ValueError(f"matrix must be 'A', 'B' or 'C'; got {matrix!r}")
    if not 0 <= lane < LANES:
        raise ValueError(f"lane must be in 0..31; got {lane!r}")
    if not 0 <= i < PER_LANE[matrix]:
        raise ValueError(f"i must be in 0..{PER_LANE[matrix] - 1} for {matrix}; got {i!r}")
    g, t = lane // 4, lane % 4
    if matrix == "A":
        return g + 8 * (i in (2, 3, 6, 7)), 2 * t + i % 2 + 8 * (i >= 4)
    if matrix == "B":
        return 2 * t + i % 2 + 8 * (i >= 2), g
    return g + 8 * (i >= 2), 2 * t + i % 2


def owners(matrix: str) -> tuple:
    """(lane, index) arrays shaped like the matrix: who holds each element, and as which register half."""
    lane = np.full(SHAPES[matrix], -1)
    index = np.full(SHAPES[matrix], -1)
    for ln in range(LANES):
        for i in range(PER_LANE[matrix]):
            r, c = position(matrix, ln, i)
            lane[r, c], index[r, c] = ln, i
    return lane, index


def load_fragments(X, matrix: str) -> np.ndarray:
    """(32, elements) array: row `lane` is what that lane holds of X (its fragment)."""
    X = np.asarray(X)
    if X.shape != SHAPES[matrix]:
        raise ValueError(f"{matrix} must be {SHAPES[matrix]}; got {X.shape}")
    return np.array([[X[position(matrix, ln, i)] for i in range(PER_LANE[matrix])] for ln in range(LANES)])


def assemble(fragments, matrix: str, lanes: Optional[Sequence[int]] = None) -> np.ndarray:
    """The matrix put back together from the fragments of `lanes` (default all 32); NaN where no lane
    of those has contributed yet, so stepping lane by lane shows the matrix filling in."""
    fragments = np.asarray(fragments, np.float64)
    X = np.full(SHAPES[matrix], np.nan)
    for ln in (range(LANES) if lanes is None else lanes):
        for i in range(PER_LANE[matrix]):
            X[position(matrix, ln, i)] = fragments[ln, i]
    return X


def warp_mma(a_frag, b_frag, c_frag) -> np.ndarray:
    """One warp's mma.sync.m16n8k16 on fragments: (32, 4) fragments of D = A @ B + C.

    The inputs are the lanes' registers, (32, 8) halves of A, (32, 4) halves of B, (32, 4) floats of C.
    The products run in float32 from fp16 inputs, as the tensor core's fp32 accumulation does (its
    internal order of additions may differ: results agree to float32 rounding)."""
    A = assemble(np.asarray(a_frag, np.float16).astype(np.float32), "A").astype(np.float32)
    B = assemble(np.asarray(b_frag, np.float16).astype(np.float32), "B").astype(np.float32)
    C = assemble(np.asarray(c_frag, np.float32), "C").astype(np.float32)
    D = A @ B + C  # (16, 8): every lane's elements, computed together, as the warp does
    return load_fragments(D, "C").astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The figure and its lane slider
# ---------------------------------------------------------------------------------------------
HIGHLIGHT = "hsl(30, 90%, 55%)"


def layout_figure(lane: int = 0) -> go.Figure:
    """A, B and C/D side by side; every cell labelled with the lane that holds it, `lane`'s cells
    highlighted and labelled with their register name (a0..a7, b0..b3, c0..c3)."""
    from plotly.subplots import make_subplots

    if not 0 <= int(lane) < LANES:
        raise ValueError(f"lane must be in 0..31; got {lane!r}")
    fig = make_subplots(rows=1, cols=3, column_widths=[0.46, 0.27, 0.27], horizontal_spacing=0.07,
                        subplot_titles=("A (16 x 16, fp16): 8 halves a lane", "B (16 x 8, fp16): 4 halves a lane",
                                        "C and D (16 x 8, fp32): 4 floats a lane"))
    g, t = lane // 4, lane % 4
    for col, (matrix, letter) in enumerate((("A", "a"), ("B", "b"), ("C", "c")), start=1):
        who, idx = owners(matrix)
        mine = who == lane
        text = np.where(mine, np.char.add(letter, idx.astype(str)), who.astype(str))
        fig.add_trace(go.Heatmap(z=mine.astype(int), text=text, texttemplate="%{text}", textfont=dict(size=9),
                                 colorscale=[[0, "hsl(210, 15%, 88%)"], [1, HIGHLIGHT]], zmin=0, zmax=1,
                                 showscale=False, xgap=1, ygap=1,
                                 customdata=who, hovertemplate=f"{matrix}[%{{y}}, %{{x}}]: lane %{{customdata}}"
                                                               "<extra></extra>"), row=1, col=col)
        rows, cols = SHAPES[matrix]
        fig.update_yaxes(range=[rows - 0.5, -0.5], title_text="row", row=1, col=col, constrain="domain")
        fig.update_xaxes(range=[-0.5, cols - 0.5], title_text="column", row=1, col=col, constrain="domain")
        fig.update_yaxes(scaleanchor=f"x{col if col > 1 else ''}", row=1, col=col)
    fig.update_layout(title=dict(text=f"mma.sync.m16n8k16: lane {lane} (row group g = {g}, t = {t}) holds the orange "
                                      "cells; the others show their lane", y=0.97),
                      margin=dict(t=110), height=520, width=1100)
    return fig


def layout_explorer(lane: int = 0):
    """A lane slider redrawing layout_figure, with the lane's fragments printed as (row, column) lists."""
    import ipywidgets as widgets
    from IPython.display import display

    slider = widgets.IntSlider(value=lane, min=0, max=LANES - 1, description="lane", continuous_update=False)

    def show(lane):
        for matrix, letter in (("A", "a"), ("B", "b"), ("C", "c")):
            cells = ", ".join(f"{letter}{i}{position(matrix, lane, i)}" for i in range(PER_LANE[matrix]))
            print(f"lane {lane:2d} {matrix}: {cells}")
        display(layout_figure(lane))

    out = widgets.interactive_output(show, {"lane": slider})
    return widgets.VBox([slider, out])
