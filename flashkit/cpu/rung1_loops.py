"""Rung 1, "numba-loops": FlashAttention-2 in plain Numba loops, one query row at a time.

What changed: the NumPy tiled algorithm (flashkit.tiled) written as explicit loops, parallel over
(batch, head, query block) with prange; the inner loops over d are left for LLVM to vectorise.
Why: to see what the compiler does by itself. Expected: far above NumPy-tiled, well below BLAS: every
score is its own dot product (a horizontal sum at the end), and np.exp is a scalar libm call per score.
Measured (AMD EPYC znver3, AVX2, fp32, B=1 H=4 N=2048 d=64, one core, CPU time): 20 GFLOP/s (18.5
causal); the dot products vectorise (vfmadd231ps ymm), exp does not: with simd.fast_exp instead, 25.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from flashkit.cpu.common import FASTMATH, NEG, PARTIAL, SKIP, launch, row_window, task_index

BLOCKS = (64, 128)  # preferred (Br, Bc) before the L2 rule; S holds one row of Bc scores at a time


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def forward_kernel(Q, K, V, scale, left, right, mask, has_mask, bmap, Br, Bc, O, lse, tiles):
    B, Hq, Nq, d = Q.shape
    Hkv, Nk = K.shape[1], K.shape[2]
    group = Hq // Hkv
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    zero = Q.dtype.type(0)
    neg = Q.dtype.type(NEG)
    sc = Q.dtype.type(scale)
    for t in prange(B * Hq * Tr):
        b, h, i = task_index(t, Hq, Tr)
        hk = h // group  # GQA: query head h reads K/V head h // group
        mb = b if bmap.shape[0] > 1 else 0
        mh = h if bmap.shape[1] > 1 else 0
        Qb, Kb, Vb = Q[b, h], K[b, hk], V[b, hk]  # (Nq, d), (Nk, d), (Nk, d)
        i0 = i * Br
        i1 = min(i0 + Br, Nq)
        S = np.empty(Bc, Q.dtype)  # one row of S_ij (then of P_ij)
        O_i = np.zeros((i1 - i0, d), Q.dtype)
        m_i = np.full(i1 - i0, neg)
        l_i = np.zeros(i1 - i0, Q.dtype)
        for j in range(Tc):
            state = bmap[mb, mh, i, j]
            if state == SKIP:
                continue  # every score of this tile is masked: no work at all
            tiles[t] += 1
            j0 = j * Bc
            j1 = min(j0 + Bc, Nk)
            for r in range(i1 - i0):
                q = i0 + r
                # S_ij = Q_i K_j^T * scale   (row r; masked scores = NEG)
                lo, hi = row_window(q, Nq, Nk, left, right)
                row_max = neg
                for c in range(j1 - j0):
                    s = zero
                    for k in range(d):
                        s += Qb[q, k] * Kb[j0 + c, k]
                    s *= sc
                    if state == PARTIAL:
                        key = j0 + c
                        if key < lo or key >= hi or (has_mask and not mask[mb, mh, q, key]):
                            s = neg
                    S[c] = s
                    row_max = max(row_max, s)
                # m_new = max(m_i, rowmax(S_ij))
                m_new = max(m_i[r], row_max)
                alpha = np.exp(m_i[r] - m_new)
                # P_ij = exp(S_ij - m_new),  l_i = alpha * l_i + rowsum(P_ij)
                row_sum = zero
                for c in range(j1 - j0):
                    p = np.exp(S[c] - m_new)
                    S[c] = p
                    row_sum += p
                l_i[r] = alpha * l_i[r] + row_sum
                m_i[r] = m_new
                # O_i = diag(alpha) O_i + P_ij V_j
                for k in range(d):
                    O_i[r, k] *= alpha
                for c in range(j1 - j0):
                    p = S[c]
                    for k in range(d):
                        O_i[r, k] += p * Vb[j0 + c, k]
        # O_i = diag(l_i)^-1 O_i,  lse_i = m_i + log(l_i);  a row that saw no key: 0 and -inf
        for r in range(i1 - i0):
            if m_i[r] == neg:
                O[b, h, i0 + r, :] = zero
                lse[b, h, i0 + r] = -np.inf
            else:
                inv = Q.dtype.type(1) / l_i[r]
                for k in range(d):
                    O[b, h, i0 + r, k] = O_i[r, k] * inv
                lse[b, h, i0 + r] = m_i[r] + np.log(l_i[r])


def run(problem, stats=False):
    """(O, lse) of a Problem; with stats=True also the per-task count of computed tiles."""
    O, lse, tiles = launch(forward_kernel, problem, BLOCKS)
    return (O, lse, tiles) if stats else (O, lse)
