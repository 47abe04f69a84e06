"""Rung 3, "numba-gemm": the two products of a tile as BLAS GEMMs (np.dot), the exp as a vector polynomial.

What changed since rung 2: S_ij = Q_i K_j^T and P_ij V_j are np.dot calls (Numba hands them to SciPy's
OpenBLAS, pinned to one thread per task); np.exp (a scalar libm call) becomes simd.fast_exp2, a
polynomial LLVM vectorises, with scale*log2(e) folded into Q_i; the row max runs on integer order keys.
Why: BLAS keeps a packed, register-blocked micro-kernel near the FMA limit, which loops in Numba do not
reach; once the GEMMs are fast, the scalar exp and the scalar max are what is left.
Measured (AMD EPYC znver3, AVX2, fp32, B=1 H=4 N=2048 d=64, one core, CPU time): 60 GFLOP/s (54 causal);
the two GEMMs alone 69 (OpenBLAS reaches 55-75 on tile-sized GEMMs, 89 on 2048^2). The integer-key max
gained 8%, exp2 with the folded scale ~2%. Negative results: S^T = K_j Q_i^T (so the row max becomes an
elementwise vector max) was 10-15% slower, the transposed GEMMs being slower; tiles 256x128, 128x256,
64x512, 128x512 were slower than 128x128 (256x128: +5% non-causal once, -6% causal).

FlexAttention's hooks live here too (backend "numba-mods"; "numba" runs its forward on rung 4's micro-tiles
instead, flashkit/cpu/mods_jit.py, and its backward here): the
softmax step of a tile, `online_softmax_tile`, calls SCORE_MOD and MASK_MOD on each score before the row
max. Rung 3 compiles it with the identity hooks (Numba drops the dead branches: no pass at all); for a
user's functions flashkit/cpu/mods_jit.py compiles a copy of the same function with those functions in
their place, inlined. The kernel calls the tile step through a function pointer, so it is compiled once
per dtype (and cached on disk) whatever the mods, and a new mod compiles only its tile step. With a
score_mod, Q_i carries `scale` only (a score_mod sees q . k * scale in natural units, as in
FlexAttention) and the tile step converts to base 2; a tile that causal, window, mask= or the BlockMask
hide entirely is skipped. Measured with the mods (benchmarks/cpu_mods.py, Intel Xeon emeraldrapids,
2 cores shared with other work at load 5-17, fp32 B=1 H=8 d=64, 2026-12-02): what a score_mod costs,
interleaved at N=4096, identity 0.96-0.98x and softcap 1.21-1.48x the time without one (before, 1.14x
and 1.42x: the bounds checks of the tile function covered S itself and stopped LLVM from vectorising
the loop; they now cover the user's functions only). N=16384, 8 documents: the BlockMask 1.36 s, 11.4x
faster than the same mask_mod on every tile and 2.7x faster than the mask as an (N, N) array; a call's
peak memory rises 256 MiB with the array, 32 MiB (the output) with the block mask (its tiles: 16 KiB).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange, types

from flashkit import blockmask
from flashkit.cpu import threads
from flashkit.cpu.common import FASTMATH, NEG, PARTIAL, SKIP, default_block_size, row_window, task_index, tile_map
from flashkit.cpu.simd import fast_exp2, from_order_key, order_key
from flashkit.cpu.threads import one_blas_thread

BLOCKS = (128, 128)  # preferred (Br, Bc) before the L2 rule: big tiles keep each GEMM efficient
OK, RAISED = -1, -2  # what the tile step returns: done, or an exception in a mod was caught
LOG2E = 1.4426950408889634
NUMBA_TYPES = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64}


# ---------------------------------------------------------------------------------------------
# The hooks, and the softmax step of one tile that calls them
# ---------------------------------------------------------------------------------------------
@njit(inline="always")
def no_score_mod(score, b, h, q_idx, kv_idx):
    return score


@njit(inline="always")
def every_key(b, h, q_idx, kv_idx):
    return True


# What online_softmax_tile calls: rung 3 itself runs with these. mods_jit compiles copies of the function
# with other globals (the user's functions, True); Numba reads globals as constants, so a False here
# removes its branch from the compiled code.
SCORE_MOD, MASK_MOD = no_score_mod, every_key
HAS_SCORE_MOD, HAS_MASK_MOD = False, False


def online_softmax_tile(S, b, h, i0, j0, partial, m_i, l_i, alpha):
    """One tile's step of the online softmax, in place: S (nr, nc) holds the scores of rows i0.., keys
    j0.. (NEG where causal, window or mask= hide them; base-2 units unless there is a score_mod) and
    becomes P = 2^(S - m_new); m_i, l_i, alpha (nr,) are updated. The hooks first: mask_mod where the
    tile is `partial`, score_mod on every visible score. Returns OK (RAISED from mods_jit's guard)."""
    nr, nc = S.shape
    zero = S.dtype.type(0)
    neg = S.dtype.type(NEG)
    inf = S.dtype.type(np.inf)
    to_base2 = S.dtype.type(LOG2E)
    for r in range(nr):
        q_idx = i0 + r
        # score_mod and mask_mod, row by row (the row stays in L1 for the passes below). A NaN or +inf
        # from score_mod is stored as +inf: the row max becomes +inf and the kernel marks the output row
        # NaN, which run() explains (a test with an early exit per score halved the loop's speed).
        if HAS_SCORE_MOD and not partial:
            for c in range(nc):  # every score visible: no test per score, LLVM vectorises the hook
                t = SCORE_MOD(S[r, c], b, h, q_idx, j0 + c) * to_base2
                u = neg if t < neg else t  # -inf from score_mod: hidden
                S[r, c] = u if u == u else inf
        elif HAS_SCORE_MOD:
            for c in range(nc):  # asked only about visible scores
                s = S[r, c]
                if s != neg:
                    if HAS_MASK_MOD and not MASK_MOD(b, h, q_idx, j0 + c):
                        S[r, c] = neg
                    else:
                        t = SCORE_MOD(s, b, h, q_idx, j0 + c) * to_base2
                        u = neg if t < neg else t
                        S[r, c] = u if u == u else inf
        elif HAS_MASK_MOD and partial:
            for c in range(nc):  # no branch per score: mask_mod is defined on every position
                s = S[r, c]
                S[r, c] = s if (s != neg) & MASK_MOD(b, h, q_idx, j0 + c) else neg
        # rowmax(S_ij), taken over integer order keys: LLVM vectorises an integer max but leaves a
        # float max reduction scalar (measured: the whole kernel 8% faster)
        key_max = order_key(neg)
        for c in range(nc):
            key_max = max(key_max, order_key(S[r, c]))
        row_max = from_order_key(key_max)
        # m_new = max(m_i, rowmax(S_ij)),  alpha = exp(m_i - m_new)  = 2^(m_i' - m_new')
        m_new = max(m_i[r], row_max)
        alpha[r] = fast_exp2(m_i[r] - m_new)
        # P_ij = exp(S_ij - m_new),  l_i = alpha * l_i + rowsum(P_ij)   (vectorised exp2)
        row_sum = zero
        for c in range(nc):
            p = fast_exp2(S[r, c] - m_new)
            S[r, c] = p
            row_sum += p
        l_i[r] = alpha[r] * l_i[r] + row_sum
        m_i[r] = m_new
    return OK


def tile_signature(dtype):
    """int64 online_softmax_tile(S (nr, nc), b, h, i0, j0, partial, m_i, l_i, alpha)."""
    dt = NUMBA_TYPES[np.dtype(dtype)]
    vec = types.Array(dt, 1, "C")
    return types.int64(types.Array(dt, 2, "C"), types.int64, types.int64, types.int64, types.int64, types.boolean,
                       vec, vec, vec)


@functools.cache
def plain_tile(dtype):
    """Rung 3's own tile step (no mods) for `dtype`, compiled on first use and cached on disk."""
    return njit(tile_signature(dtype), fastmath=FASTMATH, cache=True)(online_softmax_tile)


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------
def kernel_signature(dtype):
    """The kernel's explicit signature: the tile step is an argument of a first-class function type (a
    function pointer), so the kernel is compiled once per dtype, with or without mods."""
    dt = NUMBA_TYPES[np.dtype(dtype)]
    ro = dict(readonly=True)
    return types.void(
        types.Array(dt, 4, "C", **ro), types.Array(dt, 4, "C", **ro), types.Array(dt, 4, "C", **ro),  # Q, K, V
        types.float64, types.int64, types.int64,  # q_scale, left, right
        types.Array(types.boolean, 4, "C", **ro), types.boolean,  # mask, has_mask
        types.Array(types.int8, 4, "C", **ro), types.int64, types.int64,  # bmap, Br, Bc
        types.Array(dt, 4, "C"), types.Array(dt, 3, "C"), types.Array(types.int64, 1, "C"),  # O, lse, tiles
        types.FunctionType(tile_signature(dtype)),  # softmax_tile: online_softmax_tile with its hooks
        types.Array(types.int64, 2, "C"),  # errors (tasks, 2): code, key block j
    )


def forward(Q, K, V, q_scale, left, right, mask, has_mask, bmap, Br, Bc, O, lse, tiles, softmax_tile, errors):
    """Every task (b, h, query block i) on all cores. The body is inside the prange loop, not a function
    called from it: that function was compiled on its own and again inside the parfor's gufunc (measured
    once, on the loaded 2-core machine: a first call of 103 s cold against 67 s this way)."""
    B, Hq, Nq, d = Q.shape
    Hkv, Nk = K.shape[1], K.shape[2]
    group = Hq // Hkv
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    zero = Q.dtype.type(0)
    neg = Q.dtype.type(NEG)
    sc = Q.dtype.type(q_scale)  # scale * log2(e): scores in base-2 units (scale alone for a score_mod)
    ln2 = Q.dtype.type(0.6931471805599453)
    for t in prange(B * Hq * Tr):
        b, h, i = task_index(t, Hq, Tr)
        b, h, i = np.int64(b), np.int64(h), np.int64(i)  # the function pointer's argument types, exactly
        hk = h // group  # GQA: query head h reads K/V head h // group
        mb = b if bmap.shape[0] > 1 else 0  # the tile map and the mask= array broadcast apart
        mh = h if bmap.shape[1] > 1 else 0
        xb = b if mask.shape[0] > 1 else 0
        xh = h if mask.shape[1] > 1 else 0
        # Kb = K[b, hk] then Kb[j0:j1] stays C-contiguous; K[b, hk, j0:j1] would be layout 'A' and
        # np.dot would copy it on every call.
        Qb, Kb, Vb = Q[b, h], K[b, hk], V[b, hk]  # (Nq, d), (Nk, d), (Nk, d)
        i0 = i * Br
        i1 = min(i0 + Br, Nq)
        nr = i1 - i0
        # Q_i * scale * log2(e), once per task: S_ij comes out of the GEMM scaled, in base-2 units, so
        # e^(S - m) = 2^(S' - m') and no pass over S multiplies by the scale.
        Q_i = np.empty((nr, d), Q.dtype)  # (nr, d)
        for r in range(nr):
            for k in range(d):
                Q_i[r, k] = Qb[i0 + r, k] * sc
        S_buf = np.empty(nr * Bc, Q.dtype)  # S_ij, then P_ij, in place
        PV = np.empty((nr, d), Q.dtype)
        # O_i = 0, m_i = -inf (NEG), l_i = 0: np.empty and a loop, since each NumPy constructor (zeros, full)
        # is one more function for Numba to compile on the first call
        O_i = np.empty((nr, d), Q.dtype)
        m_i = np.empty(nr, Q.dtype)
        l_i = np.empty(nr, Q.dtype)
        alpha = np.empty(nr, Q.dtype)
        for r in range(nr):
            m_i[r] = neg
            l_i[r] = zero
            for k in range(d):
                O_i[r, k] = zero
        for j in range(Tc):
            state = bmap[mb, mh, i, j]
            if state == SKIP:
                continue  # every score of this tile is masked: no work at all
            tiles[t] += 1
            j0 = j * Bc
            j1 = min(j0 + Bc, Nk)
            nc = j1 - j0
            K_j, V_j = Kb[j0:j1], Vb[j0:j1]  # (nc, d) each
            S = S_buf[: nr * nc].reshape((nr, nc))  # a C-contiguous view: np.dot writes into it
            # S_ij = Q_i K_j^T            (BLAS sgemm/dgemm, K_j^T passed as a transposed operand)
            np.dot(Q_i, K_j.T, S)
            if state == PARTIAL:  # masked scores = NEG
                for r in range(nr):
                    q = i0 + r
                    lo, hi = row_window(q, Nq, Nk, left, right)
                    for c in range(nc):
                        key = j0 + c
                        if key < lo or key >= hi or (has_mask and not mask[xb, xh, q, key]):
                            S[r, c] = neg
            # the mods, then P_ij = exp(S_ij - m_new), m_i, l_i and alpha   (the tile step)
            code = softmax_tile(S, b, h, np.int64(i0), np.int64(j0), state == PARTIAL, m_i, l_i, alpha)
            if code != -1:
                errors[t, 0] = code  # RAISED: Python explains it after the kernel
                errors[t, 1] = j
                break
            # O_i = diag(alpha) O_i + P_ij V_j     (the product in BLAS, the rescale here)
            np.dot(S, V_j, PV)
            for r in range(nr):
                a = alpha[r]
                for k in range(d):
                    O_i[r, k] = a * O_i[r, k] + PV[r, k]
        # O_i = diag(l_i)^-1 O_i,  lse_i = m_i + log(l_i) = m_i' ln2 + log(l_i);  no key seen: 0 and -inf
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


@functools.cache
def forward_kernel(dtype):
    """The kernel for `dtype`, compiled on first use (only the dtype asked for) and cached on disk."""
    return njit(kernel_signature(dtype), parallel=True, fastmath=FASTMATH, cache=True)(forward)


_NO_MASK = np.ones((1, 1, 1, 1), dtype=np.bool_)


def blocks_of(problem):
    """(Br, Bc) of a call: the user's (or the block mask's), else BLOCKS under the L2 rule; never larger
    than the problem (a tile larger than it is the same single tile, so a BlockMask still fits)."""
    if problem.block_size is not None:
        Br, Bc = (int(x) for x in problem.block_size)
    else:
        Br, Bc = default_block_size(problem.d, problem.dtype.itemsize, *BLOCKS)
    return max(1, min(Br, problem.Nq)), max(1, min(Bc, problem.Nk))


def tiles_to_run(problem, Br, Bc):
    """The (Bm, Hm, Tr, Tc) tile states of a call: causal, window and mask= (common.tile_map) and the
    mask_mod's BlockMask (made here, in parallel, unless the call passed one) combined."""
    bmap = tile_map(problem, Br, Bc)
    bm = blockmask.for_problem(problem, Br, Bc)
    if bm is not None:
        bmap = np.ascontiguousarray(np.minimum(bmap, bm.tiles))  # broadcast over (B|1, H|1)
    return bmap


def run(problem, stats=False):
    """(O, lse) of a Problem, with or without mods; with stats=True also the per-task count of computed tiles."""
    Q, K, V = problem.Q, problem.K, problem.V
    Br, Bc = blocks_of(problem)
    bmap = tiles_to_run(problem, Br, Bc)
    if problem.has_mods:
        from flashkit.cpu import mods_jit

        softmax_tile = mods_jit.tile_function(problem.score_mod, problem.mask_mod, Q.dtype)
    else:
        softmax_tile = plain_tile(Q.dtype)
    has_mask = problem.mask is not None
    mask = np.ascontiguousarray(problem.mask, dtype=np.bool_) if has_mask else _NO_MASK
    left, right = (int(w) for w in problem.window)
    O, lse = problem.new_outputs()
    Tr = bmap.shape[2]
    tiles = np.zeros(problem.B * problem.Hq * Tr, np.int64)
    errors = np.full((tiles.size, 2), OK, np.int64)
    # S in natural units for a score_mod (it must see q . k * scale); else in base 2 straight from the GEMM
    q_scale = float(problem.scale) * (1.0 if problem.score_mod is not None else LOG2E)
    with threads.for_work(problem.flops()), one_blas_thread():
        forward_kernel(Q.dtype)(Q, K, V, q_scale, left, right, mask, has_mask, bmap, Br, Bc, O, lse, tiles,
                                softmax_tile, errors)
    if problem.has_mods:
        from flashkit.cpu import mods_jit

        mods_jit.explain_errors(problem, errors, Br, Bc, Tr, lse)
    return (O, lse, tiles) if stats else (O, lse)
