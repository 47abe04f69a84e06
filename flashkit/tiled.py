"""FlashAttention in plain NumPy, loop for loop as in the papers: the readable twin of every kernel.

Rung 0 of the CPU ladder. Nothing here is fast (Python loops over tiles); everything here is the
algorithm: Q is cut into Tr blocks of Br rows, K and V into Tc blocks of Bc rows, and the Nq x Nk
score matrix never exists, only one Br x Bc tile S_ij at a time. Memory beyond the inputs: O(N*d).

Two loop orders, both selectable as backends:
  FA1 (Dao et al. 2022, Algorithm 1): outer loop over K/V blocks j, inner over query blocks i; O_i, l_i
      and m_i go back to (slow) memory after every tile and O_i is kept normalised.
  FA2 (Dao 2023, Algorithm 1): outer loop over query blocks i, inner over K/V blocks j; the state of
      one query block stays in fast memory, O_i is divided by l_i once at the end, and query blocks are
      independent, which is what the Numba and CUDA kernels parallelise over.
"""
from __future__ import annotations

import math

import numpy as np

from flashkit import online_softmax
from flashkit.masks import FULL, SKIP, block_map, row_bounds
from flashkit.registry import Backend

BACKENDS = (
    Backend(
        name="numpy-tiled",
        device="cpu",
        summary="NumPy, FlashAttention-2 loop order (query blocks outside): readable, slow",
        runner="flashkit.tiled:run_fa2",
        priority=1,
        rung=0,
    ),
    Backend(
        name="numpy-tiled-fa1",
        device="cpu",
        summary="NumPy, FlashAttention-1 loop order (K/V blocks outside): readable, slow",
        runner="flashkit.tiled:run_fa1",
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


def fa2_head(Q, K, V, scale, window, mask, Br, Bc):
    """One head. Q (Nq, d), K and V (Nk, d), mask None or (Nq, Nk). Returns O (Nq, d), lse (Nq,)."""
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    tiles = block_map(Nq, Nk, Br, Bc, window, mask)  # (Tr, Tc) SKIP / PARTIAL / FULL
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
            # m_i, l_i, O_i <- online softmax update with (S_ij, V_j)
            state = online_softmax.update(state, S_ij, V_j)
        # O_i = O_i / l_i;  lse_i = m_i + log(l_i)
        O[rows], lse[rows] = online_softmax.finalize(state)
    return O, lse


def fa1_head(Q, K, V, scale, window, mask, Br, Bc):
    """One head in FlashAttention-1 order, with the paper's Algorithm 1 lines written out."""
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    tiles = block_map(Nq, Nk, Br, Bc, window, mask)
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
    O, lse = problem.new_outputs()
    for b in range(B):
        for h in range(Hq):
            mask = None
            if problem.mask is not None:
                Bm, Hm = problem.mask.shape[:2]
                mask = problem.mask[b if Bm > 1 else 0, h if Hm > 1 else 0]
            O[b, h], lse[b, h] = head_fn(
                problem.Q[b, h], problem.K[b, h // g], problem.V[b, h // g],
                problem.scale, problem.window, mask, Br, Bc,
            )
    return O, lse


def run_fa2(problem):
    return _run(problem, fa2_head)


def run_fa1(problem):
    return _run(problem, fa1_head)
