"""Which part of the sequence each rank holds, and which keys of a held block a query chunk may see.

A sequence of N tokens is cut into chunks by NumPy's `array_split` rule (the first N % parts chunks one
token longer), so N need not be a multiple of the rank count:

- contiguous: P chunks, rank r holds chunk r. With causal attention rank 0 sees almost nothing and the
  last rank sees almost everything: the last rank does about 2P - 1 times the work of rank 0.
- zigzag: 2P chunks, rank r holds chunk r (early) and chunk 2P - 1 - r (late), so every rank holds one
  cheap and one expensive chunk and causal work is balanced (Brandon et al. 2023, "Striped Attention";
  the zigzag variant of ring-flash-attention and Llama 3's context parallelism).

A rank's local array is its segments concatenated along the sequence axis. `pair_box` decides, for a
segment of queries and a segment of keys at their global positions, whether the pair is hidden
entirely (skip it), fully visible, or partial, and turns the global causal/window rule into a window of
the same (left, right) kind that flashkit.attention takes on the smallest box of the pair that holds
every visible score: no mask array, O(1) memory per pair.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

SPLITS = ("contiguous", "zigzag")


def check_split(split) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    return split


def chunk_bounds(N: int, parts: int) -> list:
    """[(start, stop)] of `parts` chunks covering range(N), the first N % parts one longer (array_split)."""
    base, extra = divmod(N, parts)
    bounds, start = [], 0
    for c in range(parts):
        stop = start + base + (1 if c < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def segments(N: int, size: int, rank: int, split: str = "contiguous") -> Tuple[Tuple[int, int], ...]:
    """The global ranges [start, stop) that `rank` of `size` holds, in the order they sit locally."""
    check_split(split)
    if split == "contiguous":
        return (chunk_bounds(N, size)[rank],)
    c = chunk_bounds(N, 2 * size)
    return (c[rank], c[2 * size - 1 - rank])


def local_length(N: int, size: int, rank: int, split: str = "contiguous") -> int:
    return sum(b - a for a, b in segments(N, size, rank, split))


def split_sequence(x, size: int, split: str = "contiguous", axis: int = -2) -> list:
    """The local arrays of ranks 0..size-1: x cut along `axis` (the sequence axis) as `segments` says."""
    N = x.shape[axis]
    if size < 1 or size > N:
        raise ValueError(f"size must be between 1 and the sequence length {N} (one token a rank at least); got {size}")
    xp = _xp(x)
    out = []
    for r in range(size):
        parts = [_take(x, a, b, axis) for a, b in segments(N, size, r, split)]
        out.append(xp.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0].copy())
    return out


def unsplit_sequence(parts, split: str = "contiguous", axis: int = -2):
    """The global array back from the ranks' local arrays (the inverse of split_sequence)."""
    size = len(parts)
    if size == 0:
        raise ValueError("parts must hold one local array per rank")
    N = sum(p.shape[axis] for p in parts)
    xp = _xp(parts[0])
    pieces = []  # (global start, piece)
    for r, p in enumerate(parts):
        segs = segments(N, size, r, split)
        if p.shape[axis] != sum(b - a for a, b in segs):
            raise ValueError(f"parts[{r}] holds {p.shape[axis]} positions; a {split} split of {N} over {size} ranks "
                             f"gives it {sum(b - a for a, b in segs)}")
        at = 0
        for a, b in segs:
            pieces.append((a, _take(p, at, at + b - a, axis)))
            at += b - a
    return xp.concatenate([piece for _, piece in sorted(pieces, key=lambda t: t[0])], axis=axis)


class Box(NamedTuple):
    """The visible part of one (query segment, key segment) pair, in the segments' local indices."""

    r0: int  # query rows [r0, r1) of the segment see at least one key of the other segment
    r1: int
    c0: int  # keys [c0, c1) of the segment are seen by at least one of those rows
    c1: int
    window: Optional[Tuple[int, int]]  # flashkit.attention's window on the box; None = every score visible
    visible: int  # number of visible scores (the pair's work, in scores per head)
    full: bool  # the whole pair is visible (no trimming, no window)


def pair_box(q_seg, k_seg, Nq: int, Nk: int, window) -> Optional[Box]:
    """The box of visible scores of queries at global positions q_seg and keys at k_seg, or None (skip).

    `window` is (left, right) with causal folded in (masks.effective_window), around the bottom-right
    diagonal of the WHOLE Nq x Nk problem: global query p sees key j when
    p + off - left <= j <= p + off + right, off = Nk - Nq. Inside the box the last row sees the last key
    and the first row the first key, so the band contains the box's own bottom-right diagonal and the
    rule is a window (L, R) with L, R >= 0 (or -1 unbounded), which flashkit.attention accepts.
    """
    (qs, qe), (ks, ke) = q_seg, k_seg
    if qe <= qs or ke <= ks:
        return None
    left, right = window
    off = Nk - Nq
    p = np.arange(qs, qe, dtype=np.int64)
    lo = np.full(p.shape, ks, np.int64) if left < 0 else np.clip(p + off - left, ks, ke)
    hi = np.full(p.shape, ke, np.int64) if right < 0 else np.clip(p + off + right + 1, ks, ke)
    seen = hi > lo
    if not seen.any():
        return None
    rows = np.flatnonzero(seen)  # a contiguous range: both bounds grow with p
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    c0, c1 = int(lo[r0:r1].min()), int(hi[r0:r1].max())
    visible = int((hi - lo)[seen].sum())
    nq, nk = r1 - r0, c1 - c0
    full = visible == (qe - qs) * (ke - ks)
    if visible == nq * nk:
        win = None
    else:
        D = (qs + r0) + off - c0  # the global diagonal, in box coordinates: box row a sees box key a + D
        c = nk - nq  # the box's own bottom-right diagonal
        L = -1 if left < 0 else c - D + left
        R = -1 if right < 0 else D + right - c
        assert (left < 0 or L >= 0) and (right < 0 or R >= 0), (L, R)  # proved in the docstring
        win = (int(L), int(R))
    return Box(r0, r1, c0 - ks, c1 - ks, win, visible, full)


def work_per_rank(N: int, size: int, split: str, window, Nk: Optional[int] = None) -> np.ndarray:
    """(size, size) visible scores: [rank, step] = scores rank computes at ring step `step` (per head)."""
    Nk = N if Nk is None else Nk
    work = np.zeros((size, size), np.int64)
    for r in range(size):
        for t in range(size):
            src = (r - t) % size
            for qseg in segments(N, size, r, split):
                for kseg in segments(Nk, size, src, split):
                    box = pair_box(qseg, kseg, N, Nk, window)
                    work[r, t] += 0 if box is None else box.visible
    return work


def _xp(x):
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def _take(x, a, b, axis):
    index = [slice(None)] * x.ndim
    index[axis] = slice(a, b)
    return x[tuple(index)]
