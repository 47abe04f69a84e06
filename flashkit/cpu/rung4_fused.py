"""Rung 4, "numba-fused": no BLAS; packed K/V panels, a register-tiled micro-kernel, the softmax fused on it.

What a BLAS does inside (rung 3 borrows it through np.dot): it copies ("packs") its operands into
panels laid out in the order the inner loop reads them, then runs a micro-kernel that keeps an
MR x NR tile of C in vector registers while it streams the panels: per step k, NR/W vector loads of
B, MR broadcasts of A and MR * NR/W FMAs, no load or store of C at all. The cache blocking around it
keeps the panels in L1/L2. What rung 3 still pays for is everything around the two GEMMs: S_ij goes
to memory, is read back for the row max, read and written again for exp and the row sum, then read by
the second GEMM; each np.dot call re-packs K_j or V_j; Q_i is re-packed for every tile.

What changed since rung 3: the same three steps written here (flashkit/cpu/vec.py gives Numba vector
registers), with the softmax moved into the micro-kernel:

  * K and V are packed once per call (`pack_kv`, parallel over heads): K_j transposed into panels of
    NR keys (d x NR, contiguous, zero-padded), V with d rounded up to 2 registers; Q_i once per task,
    scaled by scale * log2(e), in panels of MR rows (d x MR).
  * S = Q K^T: an MR x NR tile (MR rows x 2 registers) per micro-kernel call, d steps of 2 loads +
    MR broadcasts + 2 MR FMAs (`vfmadd231ps`, tests/test_cpu_kernels.py reads the asm). MR = 8 with
    AVX-512 (16 accumulators of 32 zmm registers), 6 with AVX2 (12 of 16 ymm: 8 rows spilled there).
  * While the tile is in registers: the mask where a panel needs one (a window or causal diagonal, or
    the end of the tile: integer compares of key indices, vec.keep_range; a custom mask goes through
    the scalar cold path), then per row the online softmax with a lazy maximum (FlashAttention-4's trick): P = 2^(S - m_ref) with the row's reference m_ref,
    changed (and O, l and this tile's P rescaled) only when a score exceeds m_ref + TAU. P <= 2^TAU,
    so nothing overflows, and the rescale, rare, costs nothing in the common case: no row max pass.
    exp2 (vec.exp2) is a degree-5 polynomial on a whole register, scaled by 2^n with one vscalefps
    where there is AVX-512; the row sums stay vectors until the end.
  * O += P V: an MR x 2-register tile of O per pass over the tile's keys, P broadcast from L1.
  * In causal and window tiles, a panel no row sees is skipped (P = 0, no S computed), and only panels a
    window boundary crosses are masked; the others run the unmasked path.
  * With a score_mod / mask_mod (backend "numba"), the kernel takes mod_tile, a function pointer to the
    mods compiled by flashkit/cpu/mods_jit.py, and calls it on each micro-tile through the scratch Sb
    (on every micro-tile with a score_mod, on PARTIAL tiles for a mask_mod alone), passing pointers
    (vec.address), not arrays; without it the branch is not compiled at all.
  * The threads take tasks (a block of Br query rows of one head) from a shared counter (`fetch_add`),
    each with its own buffers, instead of prange's static split: a causal call's tasks differ in
    size, and on a machine shared with other work a thread the OS deschedules no longer holds back
    the call: the other takes more tasks.

Blocks: Bc from the L1 cache (`l1_keys`: K_j, V_j and one row panel's Q, P and O fit in L1, since every
row panel streams all of K_j and V_j), Br from common.default_block_size (the L2 budget the notebooks
teach); rounded to the micro-tile (Br to MR rows, Bc to NR keys); any block_size works (ragged panels
are masked). Here (48 KiB L1, 2 MiB L2, d = 64, float32): 128 x 64.

Measured on a shared 2-core Intel Xeon (Emerald Rapids, AVX-512, 48 KiB L1 and 2 MiB L2 a core),
fp32, B=1, d=64. Other jobs kept the load average at 3-5 on the 2 cores, so the per-core numbers
below are process CPU time, min of 15-25 interleaved rounds in one process, one thread (that is
what the load disturbs least), against sgemm on one thread (1024^2, the same rounds); the table is
of the rung before the last step (the mask in registers, measured below):
                                      N=2048, H=2           N=4096, H=1
    AVX-512: GF/cpu-s (% of sgemm's 144.5; time / torch SDPA's)
      this rung                       129 (89%; 0.90x)      129 (89%; 0.90x)
        causal                        108 (75%; 0.84x)      119 (82%; 0.85x)
      the rung before these steps     115 (80%; 1.01x)      119 (83%; 0.98x)
        causal                         99 (68%; 0.92x)      108 (75%; 0.94x)
      torch SDPA                      116 (80%)             116 (81%)
        causal                         91 (63%)             101 (70%)
    AVX2 (cpu_forward.py --isa avx2's settings: Numba for Haswell, torch, oneDNN and MKL at AVX2,
    OpenBLAS's Haswell kernels; sgemm 73-74 GF/cpu-s)
      this rung                       64.0 (87%; 0.98x)     60.6 (84%; 1.04x)
        causal                        57.3 (78%; 0.89x)     57.7 (80%; 0.94x)
      the rung before (8 rows spill)  41.4 (56%; 1.51x)     46.3 (64%; 1.36x)
        causal                        39.9 (54%; 1.28x)     39.2 (54%; 1.38x)
      torch SDPA                      62.6 (85%)            63.0 (87%)
        causal                        51.2 (69%)            54.1 (75%)

  * Both cores, N=2048, H=8, min of 11 wall-clock rounds at a quiet moment (load average 1.4; the
    2-thread sgemm 2048^2 of the same rounds 274 GFLOP/s, 2 x its one-thread rate): 241 GFLOP/s,
    88% of sgemm, 0.57x torch SDPA's time (torch 50% of sgemm), causal 208 GFLOP/s, 76%, 0.82x; the
    rung before these steps 56% (0.89x) and 70% (0.89x): its static split left a core idle while
    the other finished. The same harness under load averages of 3-4 gave 0.71-0.82x (causal
    0.73-1.11x).
  * benchmarks/cpu_forward.py --ns 2048,4096 (medians, load average 2.5-4.5;
    benchmarks/results/cpu-intel-xeon-emeraldrapids-2c.json): time / torch's 1.32 and 1.30, causal
    0.86 and 0.85; with --isa avx2 (...-2c-avx2.json, load 4.5-5.2) 1.07 and 1.02, causal 0.97 and 0.88.
    The sgemm of those runs ran at 104 and 43 GFLOP/s: on 2 cores shared with other jobs a 2-thread
    median says more about the jobs than about the kernels; a quiet machine's run is not here yet.
  * The goal (>= 85% of the 2-thread sgemm at N >= 2048, <= 0.85x torch's time, causal and not):
    on both cores at the quiet moment above, met without a mask (88%, 0.57x) and for the causal time
    (0.82x), not for the causal sgemm share (76%: the diagonal tiles' masked panels, and the shorter
    tasks). Per core with AVX-512: 89% and 0.90x without a mask, 75-82% and 0.84-0.85x causal. With
    AVX2, per core: 84-87% and 0.98-1.04x without a mask, 78-80% and 0.89-0.94x causal (not met).
  * Steps, each measured on one thread as above: Bc from L1 (128 x 64 instead of 128 x 256: the
    panels of K_j and V_j were read from L2 by every row panel): N=4096 107 -> 121 GF/cpu-s, causal
    106 -> 111, N=2048 119 -> 127; exp2 by a degree-5 polynomial and vscalefps (13 -> 8 vector
    instructions a register of P): 127 -> 129 at 128 x 64, at the noise level; the task queue: no
    change on one thread (by design: it only balances threads); AVX2's 6-row tile: 41-46 -> 61-64
    GF/cpu-s (the 8-row tile spilled 4 accumulators in both inner loops); the causal and window mask in
    registers (keep_range) instead of the scalar cold path: causal 103 -> 108 GF/cpu-s at N=2048,
    80 -> 83 at N=1024, 116 -> 119 at N=4096, in 3 runs of 4 (the fourth, -11%, within the +-6%
    that unchanged code moved between runs here). Cold compile time in a
    new process (CPU seconds, empty cache, load 5-8): 14.9-21.2 s, the rung before 15.0-17.8 s.
  * Earlier steps that paid (previous session, one thread): the vector registers themselves (the same
    tile as loops over a small array: scalar code, 4.6 GFLOP/s; as 16 Vec values 131 GFLOP/s alone);
    moving the rare rescale out of line (a call inside the hot path made LLVM spill all 16
    accumulators around it: 74 -> 86 GFLOP/s together with the next step); broadcasting Q and P
    straight from memory (bcast: no negative-index test, 3-4 fewer integer instructions per FMA
    group); skipping and not masking causal panels (causal 49 -> 69 GFLOP/s).
  * What is left: packing K and V takes 1.9% of a call at N=4096 (measured, one thread); the
    softmax's vector instructions (exp2, the m_ref test, the row sums) are about 180 for every 2048
    FMAs of the two products at d=64 (counted from the code, not timed), on the same two ports.
    The backward has its own rung (rung4_fused_backward.py).
  * On a native AVX2 machine (2-core AMD EPYC znver3, 16 ymm, 512 KiB L2 a core, 2026-12-02, commit ebe5a4d,
    benchmarks/cpu_forward.py --ns 2048,4096 --impls numpy-standard,numba-gemm,numba-fused,torch-sdpa, load
    average 0.8-1.6, 2-thread sgemm 135.5 GFLOP/s; that run's file was not kept, its lines are these): 87.2 and
    97.3 GFLOP/s at N=2048 and 4096, 64% and 72% of sgemm, 0.89x and 1.00x torch's time; causal 84.6 and 88.5,
    62% and 65%, 0.91x and 0.98x. One thread, fastest of 7 rounds at N=2048 H=2: 66.1 GF/cpu-s, 89% of the
    one-thread sgemm (74.4), causal 77%; at H=8 the same call ran 46-54 GF/cpu-s in other runs minutes apart
    (this VM's speed moves by 15% or more), 89 GFLOP/s on both cores against 46 on one. Issue 14's goal
    (>= 85% of sgemm, <= 0.85x torch's time) is not met there.
"""
from __future__ import annotations

import numpy as np
import numba
from numba import njit, prange

from flashkit.cpu import threads
from flashkit.cpu.common import NEG, PARTIAL, SKIP, _NO_MASK, cache_bytes, default_block_size, row_window, task_index, tile_map
from flashkit.cpu.simd import fast_exp2
from flashkit.cpu.vec import VECTOR_BYTES, address, any_gt, fetch_add, bcast, exp2, fma, hsum, keep_range, lanes, load, splat, store, vmax

BLOCKS = (128, 256)  # the largest (Br, Bc) before the cache rules (blocks)
# Query rows per micro-tile: 8 rows x 2 registers = 16 accumulators of the 32 zmm registers (AVX-512);
# with AVX2's 16 ymm registers 6 rows (12 accumulators, 2 of K or V, 1 broadcast: 15), since 8 spilled
# accumulators in the inner loop (the asm showed 6 loads and stores a step and 20 register moves).
MR = 8 if VECTOR_BYTES == 64 else 6
TAU = 8.0  # base-2 units: P = 2^(S - m_ref) <= 2^8 before m_ref must move




# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def pack_kv(K, V, Bc, BcP, Dp, KP, VP):
    """KP[b, hk] <- K_j^T in panels of NR = 2W keys: index ((j * BcP/NR + p) * d + k) * NR + c holds
    K[b, hk, j * Bc + p * NR + c, k]; VP[b, hk] <- V as rows of Dp floats: index (j * BcP + c) * Dp + k
    holds V[b, hk, j * Bc + c, k]. Keys past the tile or the sequence, and features past d: zeros."""
    B, Hkv, Nk, d = K.shape
    NR = 2 * lanes(KP[0, 0])
    Tc = (Nk + Bc - 1) // Bc
    n_panels = BcP // NR
    for t in prange(B * Hkv * Tc):
        b, hk, j = t // (Hkv * Tc), (t // Tc) % Hkv, t % Tc
        Kp, Vp = KP[b, hk], VP[b, hk]
        for cc in range(BcP):
            key = j * Bc + cc
            ok = cc < Bc and key < Nk
            p, c = cc // NR, cc % NR
            base = (j * n_panels + p) * d * NR + c
            row = (j * BcP + cc) * Dp
            for k in range(d):
                Kp[base + k * NR] = K[b, hk, key, k] if ok else 0
                Vp[row + k] = V[b, hk, key, k] if ok else 0
            for k in range(d, Dp):
                Vp[row + k] = 0


# ---------------------------------------------------------------------------------------------
# The online softmax of one row of a micro-tile, in registers
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def fix_tile(Sb, W, must_mask, q0, key0, nr_left, nc_left, Nq, Nk, left, right, mask, has_mask, mb, mh,
             row0, m, lv, O_acc, Pb, n_done, BcP, Dp, tau):
    """The cold path of a micro-tile, through the scratch Sb (MR rows of NR = 2W scores): with a custom
    mask, set masked scores to NEG (the mask, the window, keys past the tile), then move m_ref of each row whose largest
    score exceeds it by more than tau: its row sums, O and this tile's P so far times 2^(m_ref - m_new).
    Not inlined: the hot path keeps its accumulators in registers, only this branch spills them."""
    NR = 2 * W
    neg = Sb.dtype.type(NEG)
    for r in range(MR):
        if must_mask:
            q = q0 + r
            lo, hi = row_window(q, Nq, Nk, left, right)
            for c in range(NR):
                key = key0 + c
                if c >= nc_left or r >= nr_left or key < lo or key >= hi or (has_mask and not mask[mb, mh, q, key]):
                    Sb[r * NR + c] = neg
        top = neg
        for c in range(NR):
            top = max(top, Sb[r * NR + c])
        row = row0 + r
        if top > m[row] + tau:
            alpha = fast_exp2(m[row] - top)  # 0 when m_ref was NEG: what a row summed before seeing a key goes
            for k in range(W):
                lv[row * W + k] *= alpha
            for k in range(Dp):
                O_acc[row * Dp + k] *= alpha
            for c in range(n_done):
                Pb[r * BcP + c] *= alpha
            m[row] = top


@njit(inline="always")
def window_row(a0, a1, q, key0, key_end, Nq, Nk, left, right, W, neg):
    """The scores of query row q for keys key0 .. key0 + 2W (registers a0, a1), NEG outside the row's
    window and past key_end (the tile's last key): the causal or window mask, in registers."""
    lo, hi = row_window(q, Nq, Nk, left, right)
    hi = min(hi, key_end)
    return keep_range(a0, key0, lo, hi, neg), keep_range(a1, key0 + W, lo, hi, neg)


@njit(inline="always")
def over(a0, a1, m_row, tau):
    """Whether a score of the row (registers a0, a1) exceeds its m_ref by more than tau."""
    return any_gt(vmax(a0, a1), m_row + tau)


@njit(inline="always")
def softmax_row(a0, a1, row, r, col, m, lv, Pb, BcP, W):
    """P = 2^(S - m_ref) for the 2 registers of one row (S = a0, a1 for keys col .. col + 2W), added to
    the row's W partial sums and stored in P_b for the P V product."""
    mr = splat(m[row])
    p0 = exp2(a0 - mr)
    p1 = exp2(a1 - mr)
    store(lv, row * W, load(lv, row * W) + (p0 + p1))
    store(Pb, r * BcP + col, p0)
    store(Pb, r * BcP + col + W, p1)


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def forward_kernel(Q, KP, VP, Nk, scale, left, right, mask, has_mask, bmap, Br, Bc, BcP, Dp, O, lse, tiles, workers,
                   mod_tile=None, mod_every_tile=False, errors=None):
    # mod_tile: FlexAttention's hooks (flashkit/cpu/mods_jit.py: a function pointer, the user's score_mod and
    # mask_mod compiled into it), called on the scratch tile of PARTIAL tiles, of every tile with
    # mod_every_tile; errors[t] = (code, j) of the first tile where it failed. None: the branch is not compiled.
    B, Hq, Nq, d = Q.shape
    Hkv = KP.shape[1]
    group = Hq // Hkv
    dt = Q.dtype.type
    W = lanes(KP[0, 0])
    NR = 2 * W
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    n_rp = (Br + MR - 1) // MR  # row panels of a task
    BrP = n_rp * MR
    n_panels = BcP // NR
    neg = dt(NEG)
    tau = dt(TAU)
    sc = dt(scale * 1.4426950408889634)  # scores in base-2 units
    ln2 = dt(0.6931471805599453)
    n_tasks = B * Hq * Tr
    n_workers = max(1, min(workers, n_tasks))  # workers: Numba's thread count (a call to it here could not be cached)
    next_task = np.zeros(1, np.int64)  # the task queue: a counter every worker takes its next task from
    for _ in prange(n_workers):
        # per worker, reused by all its tasks
        QP = np.empty(BrP * d, Q.dtype)  # Q_i * scale * log2(e) in panels of MR rows: QP[(rp * d + k) * MR + r]
        O_acc = np.empty(BrP * Dp, Q.dtype)  # O_i, not yet divided by l
        m = np.empty(BrP, Q.dtype)  # m_ref of every row
        lv = np.empty(BrP * W, Q.dtype)  # row sums, W partial sums a row
        Pb = np.empty(MR * BcP, Q.dtype)  # P of one row panel, MR rows of BcP keys
        Sb = np.empty(MR * NR, Q.dtype)  # a micro-tile to mask
        task_ctx = np.empty(7, np.int64)  # for mod_tile: what is constant during a task
        t = fetch_add(next_task, 1)
        while t < n_tasks:
            b, h, i = task_index(t, Hq, Tr)
            hk = h // group
            mb = b if bmap.shape[0] > 1 else 0
            mh = h if bmap.shape[1] > 1 else 0
            Kp, Vp = KP[b, hk], VP[b, hk]
            i0 = i * Br
            if mod_tile is not None:
                task_ctx[0], task_ctx[1], task_ctx[2], task_ctx[3] = b, h, Nq, Nk
                task_ctx[4], task_ctx[5], task_ctx[6] = left, right, has_mask
                mask_plane = address(mask, (mb * mask.shape[1] + mh) * mask.shape[2] * mask.shape[3] if has_mask else 0)
            nr = min(Br, Nq - i0)
            QP[:] = 0  # padding rows 0
            for r in range(nr):
                rp, rr = r // MR, r % MR
                for k in range(d):
                    QP[(rp * d + k) * MR + rr] = Q[b, h, i0 + r, k] * sc
            O_acc[:] = 0
            m[:] = neg
            lv[:] = 0
            for j in range(Tc):
                state = bmap[mb, mh, i, j]
                if state == SKIP:
                    continue
                tiles[t] += 1
                j0 = j * Bc
                nc = min(Bc, Nk - j0)
                np_j = (nc + NR - 1) // NR  # key panels of this tile
                for rp in range((nr + MR - 1) // MR):  # row panels holding rows of this task
                    row0 = rp * MR
                    qb = rp * d * MR
                    # rows of this panel that are written out: a window's bounds are monotone in the row
                    q_first, q_last = i0 + row0, i0 + min(row0 + MR, nr) - 1
                    lo_first, hi_first = row_window(q_first, Nq, Nk, left, right)
                    lo_last, hi_last = row_window(q_last, Nq, Nk, left, right)
                    for p in range(np_j):
                        col = p * NR
                        key0, key1 = j0 + col, j0 + min(col + NR, nc)  # the panel's keys [key0, key1)
                        must_mask = col + NR > nc  # a ragged last panel: keys past the tile
                        if state == PARTIAL:
                            if key1 <= lo_first or key0 >= hi_last:
                                # no row of the panel sees any of its keys: P = 0, no S computed
                                for r in range(MR):
                                    for c in range(0, NR, W):
                                        store(Pb, r * BcP + col + c, splat(dt(0)))
                                continue
                            must_mask = must_mask or has_mask or key0 < lo_last or key1 > hi_first
                        # ---- S = Q K^T on an MR x NR tile: 2 * MR accumulators in registers. Rows 4-5 and
                        # 6-7 exist where MR says (a compile-time constant: LLVM drops the others' code)
                        kb = (j * n_panels + p) * d * NR
                        z = splat(dt(0))
                        a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = z
                        a40 = a41 = a50 = a51 = a60 = a61 = a70 = a71 = z
                        for k in range(d):
                            k0 = load(Kp, kb + k * NR)
                            k1 = load(Kp, kb + k * NR + W)
                            qk = qb + k * MR
                            q = bcast(QP, qk)
                            a00 = fma(q, k0, a00)
                            a01 = fma(q, k1, a01)
                            q = bcast(QP, qk + 1)
                            a10 = fma(q, k0, a10)
                            a11 = fma(q, k1, a11)
                            q = bcast(QP, qk + 2)
                            a20 = fma(q, k0, a20)
                            a21 = fma(q, k1, a21)
                            q = bcast(QP, qk + 3)
                            a30 = fma(q, k0, a30)
                            a31 = fma(q, k1, a31)
                            if MR > 4:
                                q = bcast(QP, qk + 4)
                                a40 = fma(q, k0, a40)
                                a41 = fma(q, k1, a41)
                                q = bcast(QP, qk + 5)
                                a50 = fma(q, k0, a50)
                                a51 = fma(q, k1, a51)
                            if MR > 6:
                                q = bcast(QP, qk + 6)
                                a60 = fma(q, k0, a60)
                                a61 = fma(q, k1, a61)
                                q = bcast(QP, qk + 7)
                                a70 = fma(q, k0, a70)
                                a71 = fma(q, k1, a71)
                        if mod_tile is not None:
                            if mod_every_tile or state == PARTIAL:  # the mods, on the micro-tile in Sb
                                for x, a in enumerate((a00, a01, a10, a11, a20, a21, a30, a31,
                                                       a40, a41, a50, a51, a60, a61, a70, a71)):
                                    if x < 2 * MR:
                                        store(Sb, x * W, a)
                                # pointers, not arrays: an array argument travels as 7-13 words, most
                                # on the stack (measured, an empty hook: 16 arguments with 2 arrays
                                # 1.13-1.19x the time without a hook, 6 arguments 1.05x; mods_jit header)
                                code = mod_tile(address(Sb, 0), np.int64(i0 + row0), np.int64(j0 + col),
                                                np.int64(nr - row0), np.int64(nc - col), state == PARTIAL,
                                                address(task_ctx, 0), mask_plane)
                                if code != -1 and errors[t, 0] == -1:
                                    errors[t, 0] = code
                                    errors[t, 1] = j
                                a00, a01, a10, a11 = load(Sb, 0), load(Sb, W), load(Sb, 2 * W), load(Sb, 3 * W)
                                a20, a21, a30, a31 = load(Sb, 4 * W), load(Sb, 5 * W), load(Sb, 6 * W), load(Sb, 7 * W)
                                if MR > 4:
                                    a40, a41 = load(Sb, 8 * W), load(Sb, 9 * W)
                                    a50, a51 = load(Sb, 10 * W), load(Sb, 11 * W)
                                if MR > 6:
                                    a60, a61 = load(Sb, 12 * W), load(Sb, 13 * W)
                                    a70, a71 = load(Sb, 14 * W), load(Sb, 15 * W)
                        # ---- a window or causal diagonal, or the end of the tile: masked in registers
                        if must_mask and not has_mask:
                            q0, k_end = i0 + row0, j0 + nc
                            a00, a01 = window_row(a00, a01, q0, key0, k_end, Nq, Nk, left, right, W, neg)
                            a10, a11 = window_row(a10, a11, q0 + 1, key0, k_end, Nq, Nk, left, right, W, neg)
                            a20, a21 = window_row(a20, a21, q0 + 2, key0, k_end, Nq, Nk, left, right, W, neg)
                            a30, a31 = window_row(a30, a31, q0 + 3, key0, k_end, Nq, Nk, left, right, W, neg)
                            if MR > 4:
                                a40, a41 = window_row(a40, a41, q0 + 4, key0, k_end, Nq, Nk, left, right, W, neg)
                                a50, a51 = window_row(a50, a51, q0 + 5, key0, k_end, Nq, Nk, left, right, W, neg)
                            if MR > 6:
                                a60, a61 = window_row(a60, a61, q0 + 6, key0, k_end, Nq, Nk, left, right, W, neg)
                                a70, a71 = window_row(a70, a71, q0 + 7, key0, k_end, Nq, Nk, left, right, W, neg)
                            must_mask = False
                        # ---- the cold path: a custom mask, or a row whose m_ref must move (through a scratch tile)
                        hot = not must_mask
                        hot = hot and not over(a00, a01, m[row0], tau) and not over(a10, a11, m[row0 + 1], tau)
                        hot = hot and not over(a20, a21, m[row0 + 2], tau) and not over(a30, a31, m[row0 + 3], tau)
                        if MR > 4:
                            hot = hot and not over(a40, a41, m[row0 + 4], tau) and not over(a50, a51, m[row0 + 5], tau)
                        if MR > 6:
                            hot = hot and not over(a60, a61, m[row0 + 6], tau) and not over(a70, a71, m[row0 + 7], tau)
                        if not hot:
                            for x, a in enumerate((a00, a01, a10, a11, a20, a21, a30, a31,
                                                   a40, a41, a50, a51, a60, a61, a70, a71)):
                                if x < 2 * MR:
                                    store(Sb, x * W, a)
                            fix_tile(Sb, W, must_mask, i0 + row0, j0 + col, nr - row0, nc - col, Nq, Nk, left,
                                     right, mask, has_mask, mb, mh, row0, m, lv, O_acc, Pb, col, BcP, Dp, tau)
                            a00, a01, a10, a11 = load(Sb, 0), load(Sb, W), load(Sb, 2 * W), load(Sb, 3 * W)
                            a20, a21, a30, a31 = load(Sb, 4 * W), load(Sb, 5 * W), load(Sb, 6 * W), load(Sb, 7 * W)
                            if MR > 4:
                                a40, a41 = load(Sb, 8 * W), load(Sb, 9 * W)
                                a50, a51 = load(Sb, 10 * W), load(Sb, 11 * W)
                            if MR > 6:
                                a60, a61 = load(Sb, 12 * W), load(Sb, 13 * W)
                                a70, a71 = load(Sb, 14 * W), load(Sb, 15 * W)
                        # ---- P = 2^(S - m_ref), row sums, P to L1: from the registers
                        softmax_row(a00, a01, row0, 0, col, m, lv, Pb, BcP, W)
                        softmax_row(a10, a11, row0 + 1, 1, col, m, lv, Pb, BcP, W)
                        softmax_row(a20, a21, row0 + 2, 2, col, m, lv, Pb, BcP, W)
                        softmax_row(a30, a31, row0 + 3, 3, col, m, lv, Pb, BcP, W)
                        if MR > 4:
                            softmax_row(a40, a41, row0 + 4, 4, col, m, lv, Pb, BcP, W)
                            softmax_row(a50, a51, row0 + 5, 5, col, m, lv, Pb, BcP, W)
                        if MR > 6:
                            softmax_row(a60, a61, row0 + 6, 6, col, m, lv, Pb, BcP, W)
                            softmax_row(a70, a71, row0 + 7, 7, col, m, lv, Pb, BcP, W)
                    # ---- O += P V_j: an MR x 2-register tile of O per pass over the keys
                    n_keys = np_j * NR  # P of the padding keys is 0, their V rows 0
                    for dc in range(0, Dp, NR):
                        ob = row0 * Dp + dc
                        o00, o01 = load(O_acc, ob), load(O_acc, ob + W)
                        o10, o11 = load(O_acc, ob + Dp), load(O_acc, ob + Dp + W)
                        o20, o21 = load(O_acc, ob + 2 * Dp), load(O_acc, ob + 2 * Dp + W)
                        o30, o31 = load(O_acc, ob + 3 * Dp), load(O_acc, ob + 3 * Dp + W)
                        o40 = o41 = o50 = o51 = o60 = o61 = o70 = o71 = o00
                        if MR > 4:
                            o40, o41 = load(O_acc, ob + 4 * Dp), load(O_acc, ob + 4 * Dp + W)
                            o50, o51 = load(O_acc, ob + 5 * Dp), load(O_acc, ob + 5 * Dp + W)
                        if MR > 6:
                            o60, o61 = load(O_acc, ob + 6 * Dp), load(O_acc, ob + 6 * Dp + W)
                            o70, o71 = load(O_acc, ob + 7 * Dp), load(O_acc, ob + 7 * Dp + W)
                        for c in range(n_keys):
                            vb = (j * BcP + c) * Dp + dc
                            v0 = load(Vp, vb)
                            v1 = load(Vp, vb + W)
                            p = bcast(Pb, c)
                            o00 = fma(p, v0, o00)
                            o01 = fma(p, v1, o01)
                            p = bcast(Pb, BcP + c)
                            o10 = fma(p, v0, o10)
                            o11 = fma(p, v1, o11)
                            p = bcast(Pb, 2 * BcP + c)
                            o20 = fma(p, v0, o20)
                            o21 = fma(p, v1, o21)
                            p = bcast(Pb, 3 * BcP + c)
                            o30 = fma(p, v0, o30)
                            o31 = fma(p, v1, o31)
                            if MR > 4:
                                p = bcast(Pb, 4 * BcP + c)
                                o40 = fma(p, v0, o40)
                                o41 = fma(p, v1, o41)
                                p = bcast(Pb, 5 * BcP + c)
                                o50 = fma(p, v0, o50)
                                o51 = fma(p, v1, o51)
                            if MR > 6:
                                p = bcast(Pb, 6 * BcP + c)
                                o60 = fma(p, v0, o60)
                                o61 = fma(p, v1, o61)
                                p = bcast(Pb, 7 * BcP + c)
                                o70 = fma(p, v0, o70)
                                o71 = fma(p, v1, o71)
                        store(O_acc, ob, o00)
                        store(O_acc, ob + W, o01)
                        store(O_acc, ob + Dp, o10)
                        store(O_acc, ob + Dp + W, o11)
                        store(O_acc, ob + 2 * Dp, o20)
                        store(O_acc, ob + 2 * Dp + W, o21)
                        store(O_acc, ob + 3 * Dp, o30)
                        store(O_acc, ob + 3 * Dp + W, o31)
                        if MR > 4:
                            store(O_acc, ob + 4 * Dp, o40)
                            store(O_acc, ob + 4 * Dp + W, o41)
                            store(O_acc, ob + 5 * Dp, o50)
                            store(O_acc, ob + 5 * Dp + W, o51)
                        if MR > 6:
                            store(O_acc, ob + 6 * Dp, o60)
                            store(O_acc, ob + 6 * Dp + W, o61)
                            store(O_acc, ob + 7 * Dp, o70)
                            store(O_acc, ob + 7 * Dp + W, o71)
            # O_i = diag(l)^-1 O_i,  lse = m_ref ln2 + log(l);  a row that saw no key: 0 and -inf
            for r in range(nr):
                if m[r] == neg:
                    O[b, h, i0 + r, :] = 0
                    lse[b, h, i0 + r] = -np.inf
                else:
                    l_r = hsum(load(lv, r * W))
                    inv = dt(1) / l_r
                    for k in range(d):
                        O[b, h, i0 + r, k] = O_acc[r * Dp + k] * inv
                    lse[b, h, i0 + r] = m[r] * ln2 + np.log(l_r)

            t = fetch_add(next_task, 1)

def l1_keys(d, Dp, itemsize, NR, l1=None):
    """Bc, the keys of a tile: the largest multiple of NR whose K_j and V_j panels fit the L1 cache of
    a core together with what one row panel adds (its Q panel, P rows and O tile). Every row panel
    streams all of K_j through the S micro-kernel and all of V_j through the P V one, so a tile that
    fits L1 is read from L1 Br / MR times; a larger one comes from L2 each time (measured: 128 x 256
    tiles, 2 x 64 KiB of panels, ran 11-13% slower than 128 x 64 on a 48 KiB L1)."""
    l1 = l1 or cache_bytes(1) or 32 * 1024
    per_key = (d + Dp + MR) * itemsize  # a key's column of K_j, row of V_j and column of P
    fixed = MR * (d + Dp) * itemsize  # a row panel's Q and O tile
    return max(NR, (l1 - fixed) // per_key // NR * NR)


def blocks(problem, itemsize, W):
    """(Br, Bc, BcP, Dp): the tile from problem.block_size, or Bc from the L1 rule (l1_keys) and Br from
    the L2 rule (common.default_block_size); Bc padded to whole panels of NR = 2W keys (BcP) and d to
    whole pairs of registers (Dp)."""
    NR = 2 * W
    d = problem.d
    Dp = -(-d // NR) * NR
    if problem.block_size is not None:
        Br, Bc = (int(x) for x in problem.block_size)
    else:
        Br, Bc = default_blocks(d, itemsize)
    Br, Bc = max(1, min(Br, problem.Nq)), max(1, min(Bc, problem.Nk))
    return Br, Bc, -(-Bc // NR) * NR, Dp


def default_blocks(d, itemsize):
    """(Br, Bc) this rung uses by default for head size d (what `blocks` picks without a block_size;
    the notebooks print it beside common.default_block_size, the L2 rule alone)."""
    W = VECTOR_BYTES // itemsize
    NR = 2 * W
    Dp = -(-d // NR) * NR
    Bc = min(BLOCKS[1], l1_keys(d, Dp, itemsize, NR))
    Br, Bc = default_block_size(d, itemsize, BLOCKS[0], Bc)
    return max(MR, Br // MR * MR), max(NR, Bc // NR * NR)


def run(problem, stats=False):
    """(O, lse) of a Problem; with stats=True also the per-task count of computed tiles."""
    Q, K, V = (np.ascontiguousarray(x) for x in (problem.Q, problem.K, problem.V))
    B, Hkv, Nk, d = K.shape
    W = VECTOR_BYTES // Q.dtype.itemsize
    Br, Bc, BcP, Dp = blocks(problem, Q.dtype.itemsize, W)
    Tc = -(-Nk // Bc)
    KP = np.empty((B, Hkv, Tc * BcP * d), Q.dtype)
    VP = np.empty((B, Hkv, Tc * BcP * Dp), Q.dtype)
    bmap = tile_map(problem, Br, Bc)
    has_mask = problem.mask is not None
    mask = np.ascontiguousarray(problem.mask, dtype=np.bool_) if has_mask else _NO_MASK
    left, right = (int(w) for w in problem.window)
    O, lse = problem.new_outputs()
    tiles = np.zeros(problem.B * problem.Hq * bmap.shape[2], np.int64)
    with threads.for_work(problem.flops()):
        pack_kv(K, V, Bc, BcP, Dp, KP, VP)
        forward_kernel(Q, KP, VP, Nk, float(problem.scale), left, right, mask, has_mask, bmap, Br, Bc, BcP, Dp,
                       O, lse, tiles, numba.get_num_threads())
    return (O, lse, tiles) if stats else (O, lse)
