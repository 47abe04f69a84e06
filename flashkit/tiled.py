"""FlashAttention in plain NumPy, loop for loop as in the papers: the readable twin of every kernel.

Rung 0 of the CPU ladder. Nothing here is fast (Python loops over tiles); everything here is the
algorithm: Q is cut into Tr blocks of Br rows, K and V into Tc blocks of Bc rows, and the Nq x Nk
score matrix never exists, only one Br x Bc tile S_ij at a time. Memory beyond the inputs: O(N*d).

FlexAttention's hooks (flashkit/mods.py) enter each tile after S_ij = Q_i K_j^T * scale: mask_mod where
the tile is partial, score_mod on every visible score (`HeadMods.apply`); tiles the block mask marks
empty are skipped like causal ones.

The backward (`fa2_backward_head`) is FlashAttention-2's Algorithm 2: K/V blocks outside, query blocks
inside, P recomputed from the forward's lse. Both numpy-tiled backends use it.

Two loop orders of the forward, both selectable as backends:
  FA1 (Dao et al. 2022, Algorithm 1): outer loop over K/V blocks j, inner over query blocks i; O_i, l_i
      and m_i go back to (slow) memory after every tile and O_i is kept normalised.
  FA2 (Dao 2023, Algorithm 1): outer loop over query blocks i, inner over K/V blocks j; the state of
      one query block stays in fast memory, O_i is divided by l_i once at the end, and query blocks are
      independent, which is what the Numba and CUDA kernels parallelise over.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import numpy as np

from flashkit import blockmask, online_softmax
from flashkit.masks import FULL, SKIP, block_map, row_bounds
from flashkit.registry import Backend

BACKENDS = (
    Backend(
        name="numpy-tiled",
        device="cpu",
        summary="NumPy, FlashAttention-2 loop order (query blocks outside): readable, slow",
        runner="flashkit.tiled:run_fa2",
        backward="flashkit.tiled:run_backward",
        mods=True,
        priority=1,
        rung=0,
    ),
    Backend(
        name="numpy-tiled-fa1",
        device="cpu",
        summary="NumPy, FlashAttention-1 loop order (K/V blocks outside): readable, slow",
        runner="flashkit.tiled:run_fa1",
        backward="flashkit.tiled:run_backward",
        mods=True,
        priority=0,
        rung=0,
    ),
)

FAST_MEMORY_FLOATS = 64 * 1024  # M: a 256 KiB fast memory of float32 words (about an L2 share)


def block_sizes(M: int, d: int) -> tuple:
    """The paper's choice for a fast memory of M floats: Bc = ceil(M / 4d), Br = min(Bc, d).

    Four tiles must fit at once (Q_i, K_j, V_j, O_i), hence M / 4d rows per tile.
    """
    Bc = math.ceil(M / (4 * d))
    return min(Bc, d), Bc


def _tile_visibility(lo, hi, mask, rows, cols):
    """(Br, Bc) bool: which scores of tile (rows, cols) are visible (window bounds and custom mask)."""
    j = np.arange(cols.start, cols.stop)
    vis = (j[None, :] >= lo[rows, None]) & (j[None, :] < hi[rows, None])
    if mask is not None:
        vis &= mask[rows, cols]
    return vis


class HeadMods(NamedTuple):
    """FlexAttention's hooks for one (batch b, query head h): the functions and the head's tile states."""

    score_mod: Any
    mask_mod: Any
    b: int
    h: int
    tiles: Optional[np.ndarray]  # (Tr, Tc) of the mask_mod's BlockMask; None without a mask_mod

    def combine(self, tiles):
        """The window/mask tile states and the block mask's: a tile is skipped if either skips it."""
        return tiles if self.tiles is None else np.minimum(tiles, self.tiles)

    def apply(self, S_ij, rows, cols, i, j):
        """S_ij with mask_mod (only if the block mask says tile (i, j) is partial) and score_mod applied."""
        q_idx = np.arange(rows.start, rows.stop)[:, None]  # (Br, 1): positions, raw
        kv_idx = np.arange(cols.start, cols.stop)[None, :]  # (1, Bc)
        partial = self.tiles is not None and self.tiles[i, j] != FULL
        return blockmask.apply_mods(S_ij, self.score_mod, self.mask_mod, self.b, self.h, q_idx, kv_idx,
                                    check_mask=partial)


def fa2_head(Q, K, V, scale, window, mask, Br, Bc, mods: Optional[HeadMods] = None):
    """One head. Q (Nq, d), K and V (Nk, d), mask None or (Nq, Nk). Returns O (Nq, d), lse (Nq,)."""
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    tiles = block_map(Nq, Nk, Br, Bc, window, mask)  # (Tr, Tc) SKIP / PARTIAL / FULL
    if mods is not None:
        tiles = mods.combine(tiles)
    lo, hi = row_bounds(Nq, Nk, window)
    O = np.empty_like(Q)
    lse = np.empty(Nq, Q.dtype)
    for i in range(Tr):  # each query block is independent: this loop runs in parallel in the kernels
        rows = slice(i * Br, min(Nq, (i + 1) * Br))
        Q_i = Q[rows]  # (Br, d), loaded once into fast memory
        state = online_softmax.init(Q_i.shape[0], d, Q.dtype)  # m_i = -inf, l_i = 0, O_i = 0
        for j in range(Tc):
            if tiles[i, j] == SKIP:
                continue  # causal/window/mask hide this whole tile: no work at all
            cols = slice(j * Bc, min(Nk, (j + 1) * Bc))
            K_j, V_j = K[cols], V[cols]  # (Bc, d) each
            # S_ij = Q_i K_j^T * scale
            S_ij = (Q_i @ K_j.T) * scale  # (Br, Bc)
            if tiles[i, j] != FULL:
                S_ij = np.where(_tile_visibility(lo, hi, mask, rows, cols), S_ij, -np.inf)
            if mods is not None:  # S_ij = score_mod(S_ij) where mask_mod allows, else -inf
                S_ij = mods.apply(S_ij, rows, cols, i, j)
            # m_i, l_i, O_i <- online softmax update with (S_ij, V_j)
            state = online_softmax.update(state, S_ij, V_j)
        # O_i = O_i / l_i;  lse_i = m_i + log(l_i)
        O[rows], lse[rows] = online_softmax.finalize(state)
    return O, lse


def fa1_head(Q, K, V, scale, window, mask, Br, Bc, mods: Optional[HeadMods] = None):
    """One head in FlashAttention-1 order, with the paper's Algorithm 1 lines written out."""
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    tiles = block_map(Nq, Nk, Br, Bc, window, mask)
    if mods is not None:
        tiles = mods.combine(tiles)
    lo, hi = row_bounds(Nq, Nk, window)
    # line 2: O = 0, l = 0, m = -inf, all in slow memory
    O = np.zeros_like(Q)
    l = np.zeros(Nq, Q.dtype)
    m = np.full(Nq, -np.inf, Q.dtype)
    for j in range(Tc):  # line 5: outer loop over K/V blocks
        cols = slice(j * Bc, min(Nk, (j + 1) * Bc))
        K_j, V_j = K[cols], V[cols]  # line 6: load K_j, V_j
        for i in range(Tr):  # line 7: inner loop over query blocks
            if tiles[i, j] == SKIP:
                continue
            rows = slice(i * Br, min(Nq, (i + 1) * Br))
            Q_i, O_i, l_i, m_i = Q[rows], O[rows], l[rows], m[rows]  # line 8: load from slow memory
            # line 9: S_ij = Q_i K_j^T * scale
            S_ij = (Q_i @ K_j.T) * scale
            if tiles[i, j] != FULL:
                S_ij = np.where(_tile_visibility(lo, hi, mask, rows, cols), S_ij, -np.inf)
            if mods is not None:  # S_ij = score_mod(S_ij) where mask_mod allows, else -inf
                S_ij = mods.apply(S_ij, rows, cols, i, j)
            # line 10: m~_ij = rowmax(S_ij), P~_ij = exp(S_ij - m~_ij), l~_ij = rowsum(P~_ij)
            m_ij = S_ij.max(axis=1)
            P_ij = online_softmax._exp_diff(S_ij, m_ij[:, None])
            l_ij = P_ij.sum(axis=1)
            # line 11: m_new = max(m_i, m~_ij), l_new = e^(m_i - m_new) l_i + e^(m~_ij - m_new) l~_ij
            m_new = np.maximum(m_i, m_ij)
            a, b = online_softmax._exp_diff(m_i, m_new), online_softmax._exp_diff(m_ij, m_new)
            l_new = a * l_i + b * l_ij
            # line 12: O_i = diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~_ij - m_new) P~_ij V_j)
            safe = np.where(l_new > 0, l_new, 1.0)
            O[rows] = ((l_i * a)[:, None] * O_i + b[:, None] * (P_ij @ V_j)) / safe[:, None]
            # line 13: write l_i = l_new, m_i = m_new back to slow memory
            l[rows], m[rows] = l_new, m_new
    with np.errstate(divide="ignore"):
        lse = np.where(l > 0, m + np.log(np.where(l > 0, l, 1.0)), -np.inf).astype(Q.dtype)
    return O, lse


def _run(problem, head_fn):
    """Apply a one-head function to every (batch, head), sharing K/V heads for GQA."""
    B, Hq, g = problem.B, problem.Hq, problem.group
    Br, Bc = problem.block_size or block_sizes(FAST_MEMORY_FLOATS, problem.d)
    # the mask_mod's tile classification, evaluated in NumPy block row by block row (the definition)
    bm = blockmask.for_problem(problem, Br, Bc, engine="numpy")
    O, lse = problem.new_outputs()
    for b in range(B):
        for h in range(Hq):
            mask = None
            if problem.mask is not None:
                Bm, Hm = problem.mask.shape[:2]
                mask = problem.mask[b if Bm > 1 else 0, h if Hm > 1 else 0]
            mods = None
            if problem.has_mods:
                mods = HeadMods(problem.score_mod, problem.mask_mod, b, h, None if bm is None else bm.plane(b, h))
            O[b, h], lse[b, h] = head_fn(
                problem.Q[b, h], problem.K[b, h // g], problem.V[b, h // g],
                problem.scale, problem.window, mask, Br, Bc, mods=mods,
            )
    return O, lse


def run_fa2(problem):
    return _run(problem, fa2_head)


def run_fa1(problem):
    return _run(problem, fa1_head)


def fa2_backward_head(Q, K, V, O, dO, lse, scale, window, mask, Br, Bc, dK, dV):
    """One query head of FlashAttention-2's backward (Dao 2023, Algorithm 2), lines as in the paper.

    Q, O, dO (Nq, d), lse (Nq,), K, V (Nk, d), mask None or (Nq, Nk). Returns dQ (Nq, d) and the row
    sums of the recomputed P (for the lse check); ADDS this head's dK_j, dV_j into dK, dV (Nk, d), so the
    query heads of a GQA group sum into their shared K/V head.
    """
    Nq, d = Q.shape
    Nk = K.shape[0]
    # line 1-2: Q, O, dO, lse cut into Tr blocks of Br rows; K, V into Tc blocks of Bc rows
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    tiles = block_map(Nq, Nk, Br, Bc, window, mask)
    lo, hi = row_bounds(Nq, Nk, window)
    # line 3: dQ = 0 in slow memory
    dQ = np.zeros_like(Q)
    # line 4: D = rowsum(dO * O), once, before any tile (it is rowsum(P * dP): the softmax's Jacobian term)
    D = (dO * O).sum(axis=1)  # (Nq,)
    empty = np.isneginf(lse)  # rows that saw no key: P = 0, nothing flows back
    lse_safe = np.where(empty, 0.0, lse).astype(Q.dtype)
    psum = np.zeros(Nq, Q.dtype)  # rowsum(P), or visible keys where lse = -inf: the lse check
    for j in range(Tc):  # line 5: outer loop over K/V blocks (parallel in the kernels: dK_j, dV_j are private)
        cols = slice(j * Bc, min(Nk, (j + 1) * Bc))
        K_j, V_j = K[cols], V[cols]  # line 6: load K_j, V_j
        dK_j = np.zeros_like(K_j)  # line 7: dK_j = 0, dV_j = 0 in fast memory
        dV_j = np.zeros_like(V_j)
        for i in range(Tr):  # line 8: inner loop over query blocks
            if tiles[i, j] == SKIP:
                continue
            rows = slice(i * Br, min(Nq, (i + 1) * Br))
            # line 9: load Q_i, O_i, dO_i, dQ_i, lse_i, D_i
            Q_i, dO_i, L_i, D_i = Q[rows], dO[rows], lse_safe[rows], D[rows]
            # line 10: S_ij = Q_i K_j^T * scale
            S_ij = (Q_i @ K_j.T) * scale
            if tiles[i, j] != FULL:
                S_ij = np.where(_tile_visibility(lo, hi, mask, rows, cols), S_ij, -np.inf)
            # line 11: P_ij = exp(S_ij - L_i): the forward's softmax, recomputed, already normalised
            P_ij = np.where(empty[rows, None], 0.0, np.exp(S_ij - L_i[:, None])).astype(Q.dtype)
            psum[rows] += np.where(empty[rows], np.isfinite(S_ij).sum(axis=1), P_ij.sum(axis=1))
            # line 12: dV_j = dV_j + P_ij^T dO_i
            dV_j += P_ij.T @ dO_i
            # line 13: dP_ij = dO_i V_j^T
            dP_ij = dO_i @ V_j.T
            # line 14: dS_ij = P_ij * (dP_ij - D_i)
            dS_ij = P_ij * (dP_ij - D_i[:, None])
            # line 15: dQ_i = dQ_i + dS_ij K_j * scale   (read-modify-write of slow memory: the race
            #          that parallel kernels must avoid, since every j touches every dQ_i)
            dQ[rows] += (dS_ij @ K_j) * scale
            # line 16: dK_j = dK_j + dS_ij^T Q_i * scale
            dK_j += (dS_ij.T @ Q_i) * scale
        # line 18: write dK_j, dV_j to slow memory (added: a GQA group's heads share K/V head)
        dK[cols] += dK_j
        dV[cols] += dV_j
    return dQ, psum


def run_backward(problem):
    """(dQ, dK, dV) of a Problem from validate.check_backward, one query head at a time."""
    from flashkit import validate

    B, Hq, g = problem.B, problem.Hq, problem.group
    Br, Bc = problem.block_size or block_sizes(FAST_MEMORY_FLOATS, problem.d)
    dQ, dK, dV = problem.new_grads()
    dK[...] = 0  # accumulated over the query heads of each K/V group
    dV[...] = 0
    psum = np.empty(problem.lse.shape, problem.dtype)
    for b in range(B):
        for h in range(Hq):
            mask = None
            if problem.mask is not None:
                Bm, Hm = problem.mask.shape[:2]
                mask = problem.mask[b if Bm > 1 else 0, h if Hm > 1 else 0]
            dQ[b, h], psum[b, h] = fa2_backward_head(
                problem.Q[b, h], problem.K[b, h // g], problem.V[b, h // g], problem.O[b, h],
                problem.dO[b, h], problem.lse[b, h], problem.scale, problem.window, mask, Br, Bc,
                dK[b, h // g], dV[b, h // g],
            )
    validate.check_lse_rowsums(psum, problem.lse, problem.dtype)
    return dQ, dK, dV
