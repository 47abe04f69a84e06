"""Rung 3 with FlexAttention's hooks, "numba-mods": the user's score_mod and mask_mod compiled into the tile loop.

What changed since rung 3: after S_ij = Q_i K_j^T (BLAS) and the causal/window/mask= masking, the tile
goes through a compiled tile function, `apply_mods` (flashkit/cpu/mods_jit.py), that calls mask_mod
where the tile is partial and score_mod on every visible score, with both functions inlined by Numba;
the kernel calls it once per tile through a function pointer. With a score_mod, Q_i is scaled by `scale`
only (score_mod must see q . k * scale in natural units) and the tile function converts to base 2 for
rung 3's exp2; without one, Q_i carries scale * log2(e) as in rung 3 and FULL tiles need no pass at all.
The tile map is rung 3's (causal, window, mask=) combined with the mask_mod's BlockMask: a tile either
skips is skipped, and mask_mod is not called on a FULL tile.
Why: one kernel compiled once per dtype (and cached on disk) serves every mod; a new mod compiles only
its small tile function (about 0.2 s) instead of a whole parallel attention kernel (3 s), and no
Python runs per score. Block sparsity makes a document or sliding-window mask cost the visible tiles.
Expected: a trivial score_mod a few percent over rung 3 (one more pass over each tile, which sits in
L1/L2, and an indirect call per tile), time proportional to the tiles computed.
Measured (benchmarks/cpu_mods.py, Intel Xeon emeraldrapids, AVX-512, 2 cores, fp32, B=1 H=8 d=64,
2026-12-02, benchmarks/results/cpu-mods-intel-xeon-emeraldrapids-2c.json): at N=4096, interleaved, identity
1.14x and softcap 1.42x the time without a mod (the tile pass: 0.4 and 1.2-2 ns a score; negative result:
a NaN test with an early exit per score doubled it, and np.tanh, a libm call, costs 12-18 ns a score). At
N=8192: no mod 938 ms (rung 3's kernel path); 4 documents with a BlockMask 242 ms, 6.4x faster than the
same mask_mod on every tile and at 0.69x torch FlexAttention's time (353 ms, torch.compile on the CPU);
sliding window 256: 56 ms, 19x over every tile, 0.83x FlexAttention's.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types

from flashkit import blockmask
from flashkit.cpu import mods_jit
from flashkit.cpu.common import FASTMATH, NEG, PARTIAL, SKIP, default_block_size, row_window, task_index, tile_map
from flashkit.cpu import threads
from flashkit.cpu.threads import one_blas_thread
from flashkit.cpu.simd import fast_exp2, from_order_key, order_key

BLOCKS = (128, 128)  # rung 3's tiles, FlexAttention's default BLOCK_SIZE


def kernel_signature(dtype):
    """The kernel's explicit signature: the tile function is an argument of a first-class function type,
    so this kernel is compiled once per dtype, whatever mods it is given."""
    dt = mods_jit.NUMBA_TYPES[np.dtype(dtype)]
    ro = dict(readonly=True)
    return types.void(
        types.Array(dt, 4, "C", **ro), types.Array(dt, 4, "C", **ro), types.Array(dt, 4, "C", **ro),  # Q, K, V
        types.float64, types.int64, types.int64,  # q_scale, left, right
        types.Array(types.boolean, 4, "C", **ro), types.boolean,  # mask, has_mask
        types.Array(types.int8, 4, "C", **ro), types.int64, types.int64,  # bmap, Br, Bc
        types.Array(dt, 4, "C"), types.Array(dt, 3, "C"), types.Array(types.int64, 1, "C"),  # O, lse, tiles
        types.FunctionType(mods_jit.tile_signature(dtype)),  # apply_mods(S, b, h, i0, j0, check_mask)
        types.Array(types.int64, 2, "C"),  # errors (tasks, 2): code, key block j
    )


@njit([kernel_signature(np.float32), kernel_signature(np.float64)], parallel=True, fastmath=FASTMATH, cache=True)
def forward_kernel(Q, K, V, q_scale, left, right, mask, has_mask, bmap, Br, Bc, O, lse, tiles, apply_mods, errors):
    B, Hq, Nq, d = Q.shape
    Hkv, Nk = K.shape[1], K.shape[2]
    group = Hq // Hkv
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    zero = Q.dtype.type(0)
    neg = Q.dtype.type(NEG)
    sc = Q.dtype.type(q_scale)  # scale (a score_mod sees q . k * scale, as in FlexAttention) or scale * log2(e)
    ln2 = Q.dtype.type(0.6931471805599453)
    for t in prange(B * Hq * Tr):
        b, h, i = task_index(t, Hq, Tr)
        b, h, i = np.int64(b), np.int64(h), np.int64(i)  # the function pointer's argument types, exactly
        hk = h // group  # GQA: query head h reads K/V head h // group
        mb = b if bmap.shape[0] > 1 else 0  # the combined tile map and the mask= array broadcast apart
        mh = h if bmap.shape[1] > 1 else 0
        xb = b if mask.shape[0] > 1 else 0
        xh = h if mask.shape[1] > 1 else 0
        Qb, Kb, Vb = Q[b, h], K[b, hk], V[b, hk]  # (Nq, d), (Nk, d), (Nk, d); slices stay C-contiguous
        i0 = i * Br
        i1 = min(i0 + Br, Nq)
        nr = i1 - i0
        Q_i = np.empty((nr, d), Q.dtype)  # Q_i * q_scale, once per task
        for r in range(nr):
            for k in range(d):
                Q_i[r, k] = Qb[i0 + r, k] * sc
        S_buf = np.empty(nr * Bc, Q.dtype)  # S_ij, then P_ij, in place
        PV = np.empty((nr, d), Q.dtype)
        O_i = np.zeros((nr, d), Q.dtype)
        m_i = np.full(nr, neg)
        l_i = np.zeros(nr, Q.dtype)
        alpha = np.empty(nr, Q.dtype)
        for j in range(Tc):
            state = bmap[mb, mh, i, j]
            if state == SKIP:
                continue  # causal, window, mask= or the block mask hide this whole tile: no work at all
            tiles[t] += 1
            j0 = j * Bc
            j1 = min(j0 + Bc, Nk)
            nc = j1 - j0
            K_j, V_j = Kb[j0:j1], Vb[j0:j1]  # (nc, d) each
            S = S_buf[: nr * nc].reshape((nr, nc))
            # S_ij = Q_i K_j^T * q_scale            (BLAS)
            np.dot(Q_i, K_j.T, S)
            if state == PARTIAL:  # causal / window / mask=: hidden scores = NEG
                for r in range(nr):
                    q = i0 + r
                    lo, hi = row_window(q, Nq, Nk, left, right)
                    for c in range(nc):
                        key = j0 + c
                        if key < lo or key >= hi or (has_mask and not mask[xb, xh, q, key]):
                            S[r, c] = neg
            # S_ij = score_mod(S_ij) where mask_mod allows, else NEG; then base 2   (the compiled hook)
            code = apply_mods(S, b, h, np.int64(i0), np.int64(j0), state == PARTIAL)
            if code != -1:
                errors[t, 0] = code  # RAISED: Python explains it after the kernel
                errors[t, 1] = j
                break
            for r in range(nr):
                # rowmax(S_ij) on integer order keys (rung 3: LLVM vectorises an integer max)
                key_max = order_key(neg)
                for c in range(nc):
                    key_max = max(key_max, order_key(S[r, c]))
                row_max = from_order_key(key_max)
                # m_new = max(m_i, rowmax(S_ij)),  alpha = 2^(m_i - m_new)
                m_new = max(m_i[r], row_max)
                alpha[r] = fast_exp2(m_i[r] - m_new)
                # P_ij = 2^(S_ij - m_new),  l_i = alpha * l_i + rowsum(P_ij)
                row_sum = zero
                for c in range(nc):
                    p = fast_exp2(S[r, c] - m_new)
                    S[r, c] = p
                    row_sum += p
                l_i[r] = alpha[r] * l_i[r] + row_sum
                m_i[r] = m_new
            # O_i = diag(alpha) O_i + P_ij V_j
            np.dot(S, V_j, PV)
            for r in range(nr):
                a = alpha[r]
                for k in range(d):
                    O_i[r, k] = a * O_i[r, k] + PV[r, k]
        # O_i = diag(l_i)^-1 O_i,  lse_i = m_i ln2 + log(l_i);  no key seen: 0 and -inf
        for r in range(nr):
            if m_i[r] == neg:
                O[b, h, i0 + r, :] = zero
                lse[b, h, i0 + r] = -np.inf
            elif not (m_i[r] < np.inf):  # a score_mod gave NaN or +inf in this row: marked, run() raises
                O[b, h, i0 + r, :] = np.nan
                lse[b, h, i0 + r] = np.nan
            else:
                inv = Q.dtype.type(1) / l_i[r]
                for k in range(d):
                    O[b, h, i0 + r, k] = O_i[r, k] * inv
                lse[b, h, i0 + r] = m_i[r] * ln2 + np.log(l_i[r])


_NO_MASK = np.ones((1, 1, 1, 1), dtype=np.bool_)


def run(problem, stats=False):
    """(O, lse) of a Problem with or without mods; with stats=True also the per-task count of computed tiles."""
    Q, K, V = problem.Q, problem.K, problem.V
    if problem.block_size is not None:
        Br, Bc = (int(x) for x in problem.block_size)
    else:
        Br, Bc = default_block_size(problem.d, Q.dtype.itemsize, *BLOCKS)
    # A tile larger than the problem is the same single tile (Tr, Tc unchanged, so a BlockMask still fits).
    Br, Bc = max(1, min(Br, problem.Nq)), max(1, min(Bc, problem.Nk))
    bmap = tile_map(problem, Br, Bc)  # (Bm, Hm, Tr, Tc): causal, window, mask=
    bm = blockmask.for_problem(problem, Br, Bc)  # the mask_mod's, made here (in parallel) unless passed
    if bm is not None:
        bmap = np.ascontiguousarray(np.minimum(bmap, bm.tiles))  # broadcast over (B|1, H|1)
    apply_mods = mods_jit.tile_function(problem.score_mod, problem.mask_mod, Q.dtype)
    has_mask = problem.mask is not None
    mask = np.ascontiguousarray(problem.mask, dtype=np.bool_) if has_mask else _NO_MASK
    left, right = (int(w) for w in problem.window)
    O, lse = problem.new_outputs()
    Tr = bmap.shape[2]
    tiles = np.zeros(problem.B * problem.Hq * Tr, np.int64)
    errors = np.full((tiles.size, 2), -1, np.int64)
    # S in natural units for a score_mod; else in base 2 straight from the GEMM, as in rung 3
    q_scale = float(problem.scale) * (1.0 if problem.score_mod is not None else mods_jit.LOG2E)
    with threads.for_work(problem.flops()), one_blas_thread():
        forward_kernel(Q, K, V, q_scale, left, right, mask, has_mask, bmap, Br, Bc, O, lse, tiles,
                       apply_mods, errors)
    failed = np.flatnonzero(errors[:, 0] != mods_jit.OK)
    if failed.size:  # an exception inside a mod: raised again from Python, with its position
        t = int(failed[0])
        b, h, i = (int(x) for x in task_index.py_func(t, problem.Hq, Tr))
        j = int(errors[t, 1])
        i0, j0 = i * Br, j * Bc
        mods_jit.explain_raised(problem, b, h, i0, min(i0 + Br, problem.Nq), j0, min(j0 + Bc, problem.Nk))
    if problem.score_mod is not None:  # the kernel marks a row with a NaN or +inf score: lse NaN
        bad = np.isnan(lse)
        if bad.any():
            mods_jit.explain_nonfinite(problem, *(int(x) for x in np.argwhere(bad)[0]))
    return (O, lse, tiles) if stats else (O, lse)
