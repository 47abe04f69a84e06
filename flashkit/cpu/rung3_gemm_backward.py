"""Backward rung 3, "numba-gemm" backward: FlashAttention-2's Algorithm 2 on all cores, tiles as BLAS GEMMs.

The readable twin is flashkit/tiled.py:fa2_backward_head (the paper's Algorithm 2, line for line). That
loop order, K/V blocks j outside and query blocks i inside, keeps dK_j and dV_j private to one task,
but every j adds into every dQ_i (line 15). Run the j loop in parallel and two threads read-modify-write
the same dQ_i at once: a race (both read dQ_i, both add their dS_ij K_j, the second write erases the
first's update). A GPU settles it with fp32 atomics. On a CPU there are two ways,
both here:

  "two-pass": pass 1 is parallel over K/V blocks and computes dK, dV only; pass 2 is
      parallel over query blocks, recomputes S and P once more and computes dQ. No task writes what
      another writes. Cost: 7 tile GEMMs instead of 5 (S and dP computed twice).
  "partials" (the default, `VARIANT`): one pass over K/V blocks, as in the paper, with dQ accumulated in one private copy per
      thread (numba.get_thread_id()) and the copies summed at the end. 5 GEMMs, but n_threads copies
      of dQ to write and to add up (O(threads * N * d) memory, still linear in N).

Both recompute P = exp(S - lse) from the forward's logsumexp, in base 2 with scale * log2(e) folded
into a copy of Q_i (as the forward rung does): 2^(S' - lse') with S' = Q_i' K_j^T and lse' = lse log2(e).
Since dK_j = scale * dS^T Q_i = dS^T Q_i' ln 2, the scaled copy serves dK_j too.

Measured (benchmarks/cpu_backward.py, results in benchmarks/results/cpu-backward-*.json): see the
README's "CPU backward" table; the two variants side by side are in the same results file.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from flashkit.cpu import threads
from flashkit.cpu.common import FASTMATH, PARTIAL, SKIP, row_window, task_index, tile_map
from flashkit.cpu.threads import one_blas_thread
from flashkit.cpu.simd import fast_exp2

BLOCKS = (128, 128)  # (Br, Bc), as the forward rung: big tiles keep each GEMM efficient
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@njit(fastmath=FASTMATH, cache=True)
def _scaled_rows(X, i0, i1, sc):
    """X[i0:i1] * sc as a fresh C-contiguous (nr, d) array."""
    nr, d = i1 - i0, X.shape[1]
    out = np.empty((nr, d), X.dtype)
    for r in range(nr):
        for k in range(d):
            out[r, k] = X[i0 + r, k] * sc
    return out


@njit(fastmath=FASTMATH, cache=True)
def _tile_dS(S, dP, lse2_i, D_i, i0, j0, state, Nq, Nk, left, right, mask, has_mask, mb, mh, psum_i):
    """In place: S (nr, nc) holding S' = Q_i' K_j^T becomes P = 2^(S' - lse'), and dP becomes
    dS = P * (dP - D_i). Masked scores and rows with lse = -inf give P = 0. Adds rowsum(P) (or the
    count of visible keys where lse = -inf) into psum_i, for the lse check."""
    nr, nc = S.shape
    zero = S.dtype.type(0)
    cap = S.dtype.type(64)  # a wrong lse can make S' - lse' > 0; 2^64 stays finite and fails the check
    for r in range(nr):
        q = i0 + r
        l2, D_r = lse2_i[r], D_i[r]
        if state != PARTIAL and l2 != -np.inf:
            # A FULL tile: no per-element test, one branch-free loop that LLVM vectorises (the exp is
            # the polynomial of simd.fast_exp2), as in the forward rung.
            row_sum = zero
            for c in range(nc):
                # P_ij = exp(S_ij - lse_i) = 2^(S' - lse');   dS_ij = P_ij * (dP_ij - D_i)
                p = fast_exp2(min(S[r, c] - l2, cap))
                S[r, c] = p
                row_sum += p
                dP[r, c] = p * (dP[r, c] - D_r)
            psum_i[r] += row_sum
            continue
        lo, hi = 0, Nk
        if state == PARTIAL:
            lo, hi = row_window(q, Nq, Nk, left, right)
        row_sum = zero
        seen = 0
        for c in range(nc):
            key = j0 + c
            visible = state != PARTIAL or (lo <= key < hi and (not has_mask or mask[mb, mh, q, key]))
            if visible:
                seen += 1
            if not visible or l2 == -np.inf:
                # masked, or a row that saw no key in the forward: nothing flows back through it
                S[r, c] = zero
                dP[r, c] = zero
                continue
            p = fast_exp2(min(S[r, c] - l2, cap))
            S[r, c] = p
            row_sum += p
            dP[r, c] = p * (dP[r, c] - D_r)
        psum_i[r] += seen if l2 == -np.inf else row_sum


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def dkdv_kernel(Q, K, V, dO, lse2, D, scale, left, right, mask, has_mask, bmap, Br, Bc, dK, dV,
                dQ_parts, with_dQ, psum):
    """Pass over K/V blocks: tasks (b, K/V head, j). dK_j, dV_j over every query head of the GQA group.

    with_dQ: also add dS K_j into this thread's copy dQ_parts[thread] (the "partials" variant)."""
    B, Hq, Nq, d = Q.shape
    Hkv, Nk = K.shape[1], K.shape[2]
    group = Hq // Hkv
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    sc = Q.dtype.type(scale * LOG2E)
    for t in prange(B * Hkv * Tc):
        # Key blocks from both ends (0, Tc-1, 1, Tc-2, ...): causal gives early keys the most queries,
        # and the static split of prange should hand each thread the same work (as task_index does).
        b, hk, j = task_index(t, Hkv, Tc)
        j0 = j * Bc
        j1 = min(j0 + Bc, Nk)
        nc = j1 - j0
        K_j, V_j = K[b, hk][j0:j1], V[b, hk][j0:j1]  # (nc, d), C-contiguous (see the forward rung)
        dK_j = np.zeros((nc, d), Q.dtype)  # line 7: dK_j = 0, dV_j = 0 in fast memory
        dV_j = np.zeros((nc, d), Q.dtype)
        S_buf = np.empty(Br * nc, Q.dtype)
        dP_buf = np.empty(Br * nc, Q.dtype)
        T_kv = np.empty((nc, d), Q.dtype)  # a GEMM's result before it is added into dK_j or dV_j
        T_q = np.empty((Br, d), Q.dtype)
        tid = numba.get_thread_id()
        for h in range(hk * group, (hk + 1) * group):  # GQA: the query heads that read K/V head hk
            mb = b if bmap.shape[0] > 1 else 0
            mh = h if bmap.shape[1] > 1 else 0
            for i in range(Tr):  # line 8: inner loop over query blocks
                state = bmap[mb, mh, i, j]
                if state == SKIP:
                    continue
                i0 = i * Br
                i1 = min(i0 + Br, Nq)
                nr = i1 - i0
                Q_i = _scaled_rows(Q[b, h], i0, i1, sc)  # Q_i' = Q_i * scale * log2(e)
                dO_i = dO[b, h][i0:i1]
                S = S_buf[: nr * nc].reshape((nr, nc))
                dP = dP_buf[: nr * nc].reshape((nr, nc))
                # line 10: S_ij = Q_i K_j^T (scaled, base 2)
                np.dot(Q_i, K_j.T, S)
                # line 13: dP_ij = dO_i V_j^T
                np.dot(dO_i, V_j.T, dP)
                # lines 11 and 14: P_ij = exp(S_ij - lse_i), dS_ij = P_ij * (dP_ij - D_i)
                _tile_dS(S, dP, lse2[b, h, i0:i1], D[b, h, i0:i1], i0, j0, state, Nq, Nk, left, right,
                         mask, has_mask, mb, mh, psum[tid, b, h, i0:i1])
                # line 12: dV_j = dV_j + P_ij^T dO_i
                np.dot(S.T, dO_i, T_kv)
                dV_j += T_kv
                # line 16: dK_j = dK_j + dS_ij^T Q_i * scale   (Q_i' carries scale * log2(e); ln2 at the end)
                np.dot(dP.T, Q_i, T_kv)
                dK_j += T_kv
                if with_dQ:
                    # line 15: dQ_i = dQ_i + dS_ij K_j * scale, into this thread's private copy
                    T = T_q[:nr]
                    np.dot(dP, K_j, T)
                    dQ_parts[tid, b, h, i0:i1] += T
        # line 18: write dK_j, dV_j
        dK[b, hk, j0:j1] = dK_j * Q.dtype.type(LN2)
        dV[b, hk, j0:j1] = dV_j


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def dq_kernel(Q, K, V, dO, lse2, D, scale, left, right, mask, has_mask, bmap, Br, Bc, dQ, psum):
    """Pass over query blocks: tasks (b, h, i). Recomputes S, P and dS of every visible tile of row
    block i and accumulates dQ_i = sum_j dS_ij K_j * scale, which this task alone writes."""
    B, Hq, Nq, d = Q.shape
    Hkv, Nk = K.shape[1], K.shape[2]
    group = Hq // Hkv
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    sc = Q.dtype.type(scale * LOG2E)
    for t in prange(B * Hq * Tr):
        b, h, i = task_index(t, Hq, Tr)
        hk = h // group
        mb = b if bmap.shape[0] > 1 else 0
        mh = h if bmap.shape[1] > 1 else 0
        i0 = i * Br
        i1 = min(i0 + Br, Nq)
        nr = i1 - i0
        Q_i = _scaled_rows(Q[b, h], i0, i1, sc)
        dO_i = dO[b, h][i0:i1]
        dQ_i = np.zeros((nr, d), Q.dtype)
        T = np.empty((nr, d), Q.dtype)
        S_buf = np.empty(nr * Bc, Q.dtype)
        dP_buf = np.empty(nr * Bc, Q.dtype)
        for j in range(Tc):
            state = bmap[mb, mh, i, j]
            if state == SKIP:
                continue
            j0 = j * Bc
            j1 = min(j0 + Bc, Nk)
            nc = j1 - j0
            K_j, V_j = K[b, hk][j0:j1], V[b, hk][j0:j1]
            S = S_buf[: nr * nc].reshape((nr, nc))
            dP = dP_buf[: nr * nc].reshape((nr, nc))
            np.dot(Q_i, K_j.T, S)  # S_ij (scaled, base 2)
            np.dot(dO_i, V_j.T, dP)  # dP_ij = dO_i V_j^T
            _tile_dS(S, dP, lse2[b, h, i0:i1], D[b, h, i0:i1], i0, j0, state, Nq, Nk, left, right,
                     mask, has_mask, mb, mh, psum[0, b, h, i0:i1])
            # dQ_i = dQ_i + dS_ij K_j   (times scale at the end)
            np.dot(dP, K_j, T)
            dQ_i += T
        dQ[b, h, i0:i1] = dQ_i * Q.dtype.type(scale)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def rowsum_dO_O(dO, O, D):
    """Line 4: D = rowsum(dO * O), the term every dS_ij needs (it equals rowsum(P * dP))."""
    B, H, N, d = dO.shape
    for t in prange(B * H):
        b, h = t // H, t % H
        for n in range(N):
            acc = dO.dtype.type(0)
            for k in range(d):
                acc += dO[b, h, n, k] * O[b, h, n, k]
            D[b, h, n] = acc


_NO_MASK = np.ones((1, 1, 1, 1), dtype=np.bool_)


VARIANT = "partials"  # the faster of the two on the machines measured (benchmarks/cpu_backward.py)


def run(problem, variant: str = VARIANT):
    """(dQ, dK, dV) of a Problem from validate.check_backward. variant: "partials" or "two-pass"."""
    from flashkit import validate
    from flashkit.cpu.common import default_block_size

    if variant not in ("two-pass", "partials"):
        raise ValueError(f"variant must be 'two-pass' or 'partials'; got {variant!r}")
    Q, K, V, dO, O = (np.ascontiguousarray(x) for x in (problem.Q, problem.K, problem.V, problem.dO, problem.O))
    dtype = Q.dtype
    if problem.block_size is not None:
        Br, Bc = (int(x) for x in problem.block_size)
    else:
        Br, Bc = default_block_size(problem.d, dtype.itemsize, *BLOCKS)
    Br, Bc = max(1, min(Br, problem.Nq)), max(1, min(Bc, problem.Nk))
    bmap = tile_map(problem, Br, Bc)
    has_mask = problem.mask is not None
    mask = np.ascontiguousarray(problem.mask, dtype=np.bool_) if has_mask else _NO_MASK
    left, right = (int(w) for w in problem.window)
    lse2 = (problem.lse * LOG2E).astype(dtype)  # lse' = lse * log2(e); -inf stays -inf
    D = np.empty(problem.lse.shape, dtype)
    dQ, dK, dV = problem.new_grads()
    args = (Q, K, V, dO, lse2, D, float(problem.scale), left, right, mask, has_mask, bmap, Br, Bc)
    with threads.for_work(problem.backward_flops()), one_blas_thread():
        n_threads = numba.get_num_threads()
        rowsum_dO_O(dO, O, D)
        if variant == "two-pass":
            psum = np.zeros((1,) + problem.lse.shape, dtype)
            dkdv_kernel(*args, dK, dV, np.empty((1, 1, 1, 1, 1), dtype), False,
                        np.zeros((n_threads,) + problem.lse.shape, dtype))
            dq_kernel(*args, dQ, psum)
        else:
            parts = np.zeros((n_threads,) + Q.shape, dtype)
            psum = np.zeros((n_threads,) + problem.lse.shape, dtype)
            dkdv_kernel(*args, dK, dV, parts, True, psum)
            np.multiply(parts.sum(axis=0), dtype.type(problem.scale), out=dQ)  # dQ = scale * sum_j dS_ij K_j
    validate.check_lse_rowsums(psum.sum(axis=0), problem.lse, dtype)
    return dQ, dK, dV
