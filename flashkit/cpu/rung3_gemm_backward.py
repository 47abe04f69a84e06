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

FlexAttention's hooks (score_mod, mask_mod, a BlockMask) reach the backward through the tile step
`tile_dS`, as they reach the forward through rung3_gemm.online_softmax_tile: mask_mod hides scores of a
partial tile, score_mod f gives the score the softmax saw, and the chain rule through it multiplies dS
by f'(s), which flashkit.mods_grad writes from the function's source (exact, not finite differences).
With a score_mod, Q_i carries `scale` only (f must see q . k * scale), so dK_j's factor is 1, not ln 2.

Measured (benchmarks/cpu_backward.py, results in benchmarks/results/cpu-backward-*.json): see the
README's "CPU backward" table; the two variants side by side are in the same results file.
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange, types

from flashkit import blockmask
from flashkit.cpu import threads
from flashkit.cpu.common import FASTMATH, NEG, PARTIAL, SKIP, row_window, task_index, tile_map
from flashkit.cpu.rung3_gemm import NUMBA_TYPES, OK, blocks_of, every_key, no_score_mod
from flashkit.cpu.simd import fast_exp2
from flashkit.cpu.threads import one_blas_thread

BLOCKS = (128, 128)  # (Br, Bc), as the forward rung: big tiles keep each GEMM efficient
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@njit(inline="always")
def unit_slope(score, b, h, q_idx, kv_idx):
    return 1.0


# The hooks tile_dS calls (rung 3 itself: none); flashkit.cpu.mods_jit compiles copies of tile_dS with
# the user's score_mod, its derivative (flashkit.mods_grad) and mask_mod in their place.
SCORE_MOD, D_SCORE_MOD, MASK_MOD = no_score_mod, unit_slope, every_key
HAS_SCORE_MOD, HAS_MASK_MOD = False, False


@njit(fastmath=FASTMATH, cache=True)
def _scaled_rows(X, i0, i1, sc):
    """X[i0:i1] * sc as a fresh C-contiguous (nr, d) array."""
    nr, d = i1 - i0, X.shape[1]
    out = np.empty((nr, d), X.dtype)
    for r in range(nr):
        for k in range(d):
            out[r, k] = X[i0 + r, k] * sc
    return out


def tile_dS(S, dP, lse2, D, psum, part, b, h, i0, j0, state, Nq, Nk, left, right, mask, has_mask, xb, xh):
    """In place: S (nr, nc) holding S' = Q_i' K_j^T becomes P = 2^(S' - lse'), and dP becomes
    dS = P * (dP - D_i) (times f'(s) with a score_mod f). Masked scores and rows with lse = -inf give
    P = 0. Adds rowsum(P) (or the count of visible keys where lse = -inf) into psum[part, b, h, rows],
    for the lse check. Returns OK (RAISED from mods_jit's guard, when a mod raised)."""
    nr, nc = S.shape
    zero = S.dtype.type(0)
    neg = S.dtype.type(NEG)
    to_base2 = S.dtype.type(LOG2E)
    cap = S.dtype.type(64)  # a wrong lse can make S' - lse' > 0; 2^64 stays finite and fails the check
    for r in range(nr):
        q = i0 + r
        l2, D_r = lse2[b, h, q], D[b, h, q]
        if state != PARTIAL and l2 != -np.inf:
            # A FULL tile: no per-element test, one branch-free loop that LLVM vectorises (the exp is
            # the polynomial of simd.fast_exp2), as in the forward rung.
            row_sum = zero
            for c in range(nc):
                s = S[r, c]
                t = s
                if HAS_SCORE_MOD:
                    t = max(SCORE_MOD(s, b, h, q, j0 + c) * to_base2, neg)  # base 2; -inf: hidden
                # P_ij = exp(S_ij - lse_i) = 2^(S' - lse');   dS_ij = P_ij * (dP_ij - D_i)
                p = fast_exp2(min(t - l2, cap))
                S[r, c] = p
                row_sum += p
                g = p * (dP[r, c] - D_r)
                if HAS_SCORE_MOD:  # chain rule through f: times f'(s); nothing flows where P = 0
                    g = zero if p == zero else g * D_SCORE_MOD(s, b, h, q, j0 + c)
                dP[r, c] = g
            psum[part, b, h, q] += row_sum
            continue
        lo, hi = 0, Nk
        if state == PARTIAL:
            lo, hi = row_window(q, Nq, Nk, left, right)
        row_sum = zero
        seen = 0
        for c in range(nc):
            key = j0 + c
            s = S[r, c]
            t = s
            visible = state != PARTIAL or (lo <= key < hi and (not has_mask or mask[xb, xh, q, key]))
            if HAS_MASK_MOD and visible and state == PARTIAL:
                visible = MASK_MOD(b, h, q, key)
            if HAS_SCORE_MOD and visible:
                t = SCORE_MOD(s, b, h, q, key) * to_base2
                visible = t > neg  # -inf from score_mod hides the score, as in the forward
            if visible:
                seen += 1
            if not visible or l2 == -np.inf:
                # masked, or a row that saw no key in the forward: nothing flows back through it
                S[r, c] = zero
                dP[r, c] = zero
                continue
            p = fast_exp2(min(t - l2, cap))
            S[r, c] = p
            row_sum += p
            g = p * (dP[r, c] - D_r)
            if HAS_SCORE_MOD:
                g = zero if p == zero else g * D_SCORE_MOD(s, b, h, q, key)
            dP[r, c] = g
        psum[part, b, h, q] += seen if l2 == -np.inf else row_sum
    return OK


def tile_signature(dtype):
    """int64 tile_dS(S, dP, lse2, D, psum, part, b, h, i0, j0, state, Nq, Nk, left, right, mask, has_mask, xb, xh)."""
    dt = NUMBA_TYPES[np.dtype(dtype)]
    i64 = types.int64
    return i64(types.Array(dt, 2, "C"), types.Array(dt, 2, "C"), types.Array(dt, 3, "C", readonly=True),
               types.Array(dt, 3, "C", readonly=True), types.Array(dt, 4, "C"), i64, i64, i64, i64, i64, types.int8,
               i64, i64, i64, i64, types.Array(types.boolean, 4, "C", readonly=True), types.boolean, i64, i64)


@functools.cache
def plain_tile(dtype):
    """Rung 3's own backward tile step (no mods) for `dtype`, compiled on first use and cached on disk."""
    return njit(tile_signature(dtype), fastmath=FASTMATH, cache=True)(tile_dS)


def _kernel_signature(dtype, pass_):
    dt = NUMBA_TYPES[np.dtype(dtype)]
    ro = dict(readonly=True)
    i64 = types.int64
    common = (types.Array(dt, 4, "C", **ro),) * 4 + (types.Array(dt, 3, "C", **ro),) * 2 + (  # Q K V dO, lse2 D
        types.float64, types.float64, i64, i64, types.Array(types.boolean, 4, "C", **ro), types.boolean,  # q_scale..
        types.Array(types.int8, 4, "C", **ro), i64, i64)  # bmap, Br, Bc
    tile = (types.FunctionType(tile_signature(dtype)), types.Array(i64, 2, "C"))  # tile_dS, errors
    if pass_ == "dkdv":  # dK, dV, dQ_parts, with_dQ, psum
        outs = (types.Array(dt, 4, "C"), types.Array(dt, 4, "C"), types.Array(dt, 5, "C"), types.boolean,
                types.Array(dt, 4, "C"))
    else:  # dQ, psum
        outs = (types.Array(dt, 4, "C"), types.Array(dt, 4, "C"))
    return types.void(*common, *outs, *tile)


def dkdv(Q, K, V, dO, lse2, D, q_scale, scale, left, right, mask, has_mask, bmap, Br, Bc, dK, dV,
         dQ_parts, with_dQ, psum, tile, errors):
    """Pass over K/V blocks: tasks (b, K/V head, j). dK_j, dV_j over every query head of the GQA group.

    with_dQ: also add dS K_j into this thread's copy dQ_parts[thread] (the "partials" variant)."""
    B, Hq, Nq, d = Q.shape
    Hkv, Nk = K.shape[1], K.shape[2]
    group = Hq // Hkv
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    sc = Q.dtype.type(q_scale)  # scale * log2(e) (scale alone with a score_mod)
    dk_factor = Q.dtype.type(scale / q_scale)  # dK = scale dS^T Q = dS^T Q_i' (scale / q_scale)
    for t in prange(B * Hkv * Tc):
        # Key blocks from both ends (0, Tc-1, 1, Tc-2, ...): causal gives early keys the most queries,
        # and the static split of prange should hand each thread the same work (as task_index does).
        b, hk, j = task_index(t, Hkv, Tc)
        b, hk, j = np.int64(b), np.int64(hk), np.int64(j)
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
        tid = np.int64(numba.get_thread_id())
        for h in range(hk * group, (hk + 1) * group):  # GQA: the query heads that read K/V head hk
            mb = b if bmap.shape[0] > 1 else 0
            mh = h if bmap.shape[1] > 1 else 0
            xb = b if mask.shape[0] > 1 else 0
            xh = h if mask.shape[1] > 1 else 0
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
                code = tile(S, dP, lse2, D, psum, tid, b, np.int64(h), np.int64(i0), j0, state, Nq, Nk, left, right,
                            mask, has_mask, np.int64(xb), np.int64(xh))
                if code != OK:
                    errors[t, 0], errors[t, 1], errors[t, 2], errors[t, 3], errors[t, 4] = code, b, h, i, j
                    break
                # line 12: dV_j = dV_j + P_ij^T dO_i
                np.dot(S.T, dO_i, T_kv)
                dV_j += T_kv
                # line 16: dK_j = dK_j + dS_ij^T Q_i * scale   (Q_i' carries q_scale; the factor at the end)
                np.dot(dP.T, Q_i, T_kv)
                dK_j += T_kv
                if with_dQ:
                    # line 15: dQ_i = dQ_i + dS_ij K_j * scale, into this thread's private copy
                    T = T_q[:nr]
                    np.dot(dP, K_j, T)
                    dQ_parts[tid, b, h, i0:i1] += T
        # line 18: write dK_j, dV_j
        dK[b, hk, j0:j1] = dK_j * dk_factor
        dV[b, hk, j0:j1] = dV_j


def dq(Q, K, V, dO, lse2, D, q_scale, scale, left, right, mask, has_mask, bmap, Br, Bc, dQ, psum, tile, errors):
    """Pass over query blocks: tasks (b, h, i). Recomputes S, P and dS of every visible tile of row
    block i and accumulates dQ_i = sum_j dS_ij K_j * scale, which this task alone writes."""
    B, Hq, Nq, d = Q.shape
    Hkv, Nk = K.shape[1], K.shape[2]
    group = Hq // Hkv
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    sc = Q.dtype.type(q_scale)
    for t in prange(B * Hq * Tr):
        b, h, i = task_index(t, Hq, Tr)
        b, h, i = np.int64(b), np.int64(h), np.int64(i)
        hk = h // group
        mb = b if bmap.shape[0] > 1 else 0
        mh = h if bmap.shape[1] > 1 else 0
        xb = np.int64(b if mask.shape[0] > 1 else 0)
        xh = np.int64(h if mask.shape[1] > 1 else 0)
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
            np.dot(Q_i, K_j.T, S)  # S_ij (scaled)
            np.dot(dO_i, V_j.T, dP)  # dP_ij = dO_i V_j^T
            code = tile(S, dP, lse2, D, psum, np.int64(0), b, h, np.int64(i0), np.int64(j0), state, Nq, Nk, left,
                        right, mask, has_mask, xb, xh)
            if code != OK:
                errors[t, 0], errors[t, 1], errors[t, 2], errors[t, 3], errors[t, 4] = code, b, h, i, j
                break
            # dQ_i = dQ_i + dS_ij K_j   (times scale at the end)
            np.dot(dP, K_j, T)
            dQ_i += T
        dQ[b, h, i0:i1] = dQ_i * Q.dtype.type(scale)


@functools.cache
def kernel(pass_, dtype):
    """The "dkdv" or "dq" kernel for `dtype`, compiled on first use (only the pass and dtype asked for)
    and cached on disk."""
    fn = {"dkdv": dkdv, "dq": dq}[pass_]
    return njit(_kernel_signature(dtype, pass_), parallel=True, fastmath=FASTMATH, cache=True)(fn)


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
    """(dQ, dK, dV) of a Problem from validate.check_backward, with or without mods.
    variant: "partials" or "two-pass"."""
    from flashkit import validate

    if variant not in ("two-pass", "partials"):
        raise ValueError(f"variant must be 'two-pass' or 'partials'; got {variant!r}")
    Q, K, V, dO, O = (np.ascontiguousarray(x) for x in (problem.Q, problem.K, problem.V, problem.dO, problem.O))
    dtype = Q.dtype
    Br, Bc = blocks_of(problem)
    bmap = tile_map(problem, Br, Bc)
    bm = blockmask.for_problem(problem, Br, Bc)  # the mask_mod's tiles: those it hides are skipped here too
    if bm is not None:
        bmap = np.ascontiguousarray(np.minimum(bmap, bm.tiles))
    if problem.has_mods:
        from flashkit.cpu import mods_jit

        tile = mods_jit.backward_tile_function(problem.score_mod, problem.mask_mod, dtype)
    else:
        tile = plain_tile(dtype)
    has_mask = problem.mask is not None
    mask = np.ascontiguousarray(problem.mask, dtype=np.bool_) if has_mask else _NO_MASK
    left, right = (int(w) for w in problem.window)
    # lse' = lse * log2(e), the base-2 units of S'; -inf stays -inf. With a score_mod, S is natural
    # (q . k * scale) and the tile step converts f(S) to base 2.
    lse2 = (problem.lse * LOG2E).astype(dtype)
    q_scale = float(problem.scale) * (1.0 if problem.score_mod is not None else LOG2E)
    D = np.empty(problem.lse.shape, dtype)
    dQ, dK, dV = problem.new_grads()
    args = (Q, K, V, dO, lse2, D, q_scale, float(problem.scale), left, right, mask, has_mask, bmap, Br, Bc)
    with threads.for_work(problem.backward_flops()), one_blas_thread():
        n_threads = numba.get_num_threads()
        rowsum_dO_O(dO, O, D)
        psum = np.zeros((n_threads,) + problem.lse.shape, dtype)
        if variant == "two-pass":
            errors = np.full((problem.B * problem.Hkv * bmap.shape[3], 5), OK, np.int64)
            kernel("dkdv", dtype)(*args, dK, dV, np.empty((1, 1, 1, 1, 1), dtype), False, np.zeros_like(psum), tile,
                                  errors)
            _explain(problem, errors, Br, Bc)
            errors = np.full((problem.B * problem.Hq * bmap.shape[2], 5), OK, np.int64)
            kernel("dq", dtype)(*args, dQ, psum, tile, errors)
        else:
            parts = np.zeros((n_threads,) + Q.shape, dtype)
            errors = np.full((problem.B * problem.Hkv * bmap.shape[3], 5), OK, np.int64)
            kernel("dkdv", dtype)(*args, dK, dV, parts, True, psum, tile, errors)
            np.multiply(parts.sum(axis=0), dtype.type(problem.scale), out=dQ)  # dQ = scale * sum_j dS_ij K_j
    _explain(problem, errors, Br, Bc)
    validate.check_lse_rowsums(psum.sum(axis=0), problem.lse, dtype)
    if problem.score_mod is not None:
        from flashkit.cpu import mods_jit

        mods_jit.check_gradients(problem, dQ, dK, dV)
    return dQ, dK, dV


def _explain(problem, errors, Br, Bc):
    """Raise the exception a mod raised in a kernel (errors[t] = code, b, h, i, j), from Python."""
    failed = np.flatnonzero(errors[:, 0] != OK)
    if failed.size:
        from flashkit.cpu import mods_jit

        _, b, h, i, j = (int(x) for x in errors[failed[0]])
        i0, j0 = i * Br, j * Bc
        mods_jit.explain_raised(problem, b, h, i0, min(i0 + Br, problem.Nq), j0, min(j0 + Bc, problem.Nk),
                                backward=True)
