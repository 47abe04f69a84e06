"""Which keys each query may see: causal alignment, sliding windows and block skipping.

Causal with Nq != Nk is aligned bottom-right, as FlashAttention >= 2.1 does: the last query row sees
every key, so one new token decoded against a KV cache of Nk keys is the same call as a prefill.
With `offset = Nk - Nq`, query row i sees key j when

    i + offset - left  <=  j  <=  i + offset + right        (left/right = -1: unbounded on that side)

and causal is the window (-1, 0). Nq = 3, Nk = 5 (offset 2), causal; `x` may attend:

    bottom-right (flashkit, flash_attn >= 2.1)    top-left (torch is_causal, flash_attn < 2.1)
        k0 k1 k2 k3 k4                                k0 k1 k2 k3 k4
    q0   x  x  x  .  .                            q0   x  .  .  .  .
    q1   x  x  x  x  .                            q1   x  x  .  .  .
    q2   x  x  x  x  x                            q2   x  x  x  .  .

Every kernel decides per (Br x Bc) tile whether it is fully hidden (skip it: no work at all), fully
visible (no per-element test) or partial; `block_map` computes that once, in one place.
"""
from __future__ import annotations

import numpy as np

SKIP, PARTIAL, FULL = 0, 1, 2  # tile states in a block map


def effective_window(causal: bool, window) -> tuple:
    """Fold `causal` into a (left, right) window; -1 means unbounded."""
    left, right = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def row_bounds(Nq: int, Nk: int, window) -> tuple:
    """For every query row, the visible keys [lo, hi) as two int64 arrays (before any custom mask).

    A row with lo >= hi sees no key: its output is 0 and its lse is -inf.
    """
    left, right = window
    offset = Nk - Nq
    i = np.arange(Nq, dtype=np.int64)
    lo = np.zeros(Nq, np.int64) if left < 0 else np.clip(i + offset - left, 0, Nk)
    hi = np.full(Nq, Nk, np.int64) if right < 0 else np.clip(i + offset + right + 1, 0, Nk)
    return lo, np.maximum(hi, lo)


def dense_mask(Nq: int, Nk: int, window) -> np.ndarray:
    """The (Nq, Nk) boolean picture of a window: True where row i may attend to key j."""
    lo, hi = row_bounds(Nq, Nk, window)
    j = np.arange(Nk)
    return (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])


def tile_state(i0: int, i1: int, j0: int, j1: int, Nq: int, Nk: int, window) -> int:
    """SKIP, PARTIAL or FULL for the tile of query rows [i0, i1) and keys [j0, j1)."""
    left, right = window
    offset = Nk - Nq
    # Row i's visible range moves right as i grows, so the tile's extreme rows decide.
    if right >= 0 and j0 > (i1 - 1) + offset + right:
        return SKIP  # every key is right of the last row's range
    if left >= 0 and j1 - 1 < i0 + offset - left:
        return SKIP  # every key is left of the first row's range
    full_right = right < 0 or j1 - 1 <= i0 + offset + right
    full_left = left < 0 or j0 >= (i1 - 1) + offset - left
    return FULL if (full_right and full_left) else PARTIAL


def block_map(Nq: int, Nk: int, Br: int, Bc: int, window, mask=None) -> np.ndarray:
    """(Tr, Tc) int8 array of tile states for a window and an optional bool mask (Nq, Nk).

    `tile_state` for every tile at once (the same tests on arrays of tile corners). A tile the mask
    hides completely is SKIP; one the mask opens completely keeps the window's state.
    """
    left, right = window
    offset = Nk - Nq
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    i0 = (np.arange(Tr) * Br)[:, None]  # first and last+1 row of each query block, as a column
    i1 = np.minimum(Nq, i0 + Br)
    j0 = (np.arange(Tc) * Bc)[None, :]  # first and last+1 key of each key block, as a row
    j1 = np.minimum(Nk, j0 + Bc)
    skip = np.zeros((Tr, Tc), bool)
    full = np.ones((Tr, Tc), bool)
    if right >= 0:
        skip |= j0 > (i1 - 1) + offset + right
        full &= j1 - 1 <= i0 + offset + right
    if left >= 0:
        skip |= j1 - 1 < i0 + offset - left
        full &= j0 >= (i1 - 1) + offset - left
    states = np.where(skip, SKIP, np.where(full, FULL, PARTIAL)).astype(np.int8)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        pad = np.zeros((Tr * Br, Tc * Bc), bool)
        pad[:Nq, :Nk] = m
        any_visible = pad.reshape(Tr, Br, Tc, Bc).any(axis=(1, 3))  # (Tr, Br, Tc, Bc) -> (Tr, Tc)
        pad[Nq:, :] = True  # padding counts as visible for "all visible"
        pad[:, Nk:] = True
        all_visible = pad.reshape(Tr, Br, Tc, Bc).all(axis=(1, 3))
        states = np.where(~any_visible, SKIP, np.where(all_visible, states, np.minimum(states, PARTIAL)))
    return states.astype(np.int8)


def visible_fraction(Nq: int, Nk: int, window) -> float:
    """Fraction of the Nq x Nk score matrix a window leaves visible (1.0 without one, about 0.5 causal)."""
    if tuple(window) == (-1, -1):
        return 1.0
    lo, hi = row_bounds(Nq, Nk, window)
    return float((hi - lo).sum()) / float(Nq * Nk)
