"""Split-K decoding on the CPU ("flash-decoding", Dao et al. 2023): few queries, a long KV cache.

What changed from the prefill rungs: a decoding step has one query row per head (Nq = 1, or a few),
so the prefill kernels' parallelism over query blocks (B * Hq * Tr tasks) collapses to B * H_kv tasks
once the query heads of a GQA group share one pass over their K/V head. With B = 1 and H_kv = 1 (MQA)
that is one task: one core works, the others wait. Split-K cuts the keys into `splits` chunks instead;
each (b, h_kv, chunk) task computes a partial online-softmax state (m, l, O) of its keys, and
`flashkit.online_softmax.merge` combines the states exactly (flashkit/decode.py does that).
Why it pays: decoding reads the whole cache once per token and does only ~2 FLOPs per byte, so it is
memory-bound; all cores must stream K and V at once to reach the machine's bandwidth.
Measured (python -m benchmarks.decode): benchmarks/results/decode-*.json. On the shared 2-core AMD
EPYC VM, one thread streams a 64 MB cache with one query row at 16.8 GB/s (NumPy there: a copy 19
GB/s read + write, a sum 13-16 GB/s), and with a GQA group of 4 rows at 9-11 GB/s: compute-bound
(about 17 ns per key and row, i.e. one dot product and one weighted add of d = 128 floats).

Each task reads its K_j and V_j blocks once for all g * Nq query rows of the group (g = Hq / H_kv):
GQA makes decoding cheaper in bytes, not only in memory. Per block of Bc keys it does exactly what
FlashAttention-2 does for one tile:

    S   = Q K_j^T * scale          (R x Bc), masked keys -inf   R = g * Nq rows
    m'  = max(m, rowmax(S));  P = exp(S - m');  alpha = exp(m - m')
    l   = alpha * l + rowsum(P);  O = alpha * O + P V_j

Tried and dropped: the rows four at a time through both products in plain loops (register blocking
left to LLVM). 15-20% faster with a group of 4 rows, but 4x slower with 8 (LLVM's code for the blocked
O update collapsed); measured on one thread, d = 128, in cache. Written with explicit registers it pays:

split_task_vec (d a multiple of 4 registers: 64 and 128 in float32) writes the same task with explicit
vector registers (flashkit/cpu/vec.py) and no array views inside the loops (a row view such as
K[b, h][j] costs two atomic reference-count updates: removing them made the task 4x faster). The rows
of the group go 4 at a time (padded with zero rows): S for 4 keys x 4 rows is 16 accumulators over d,
each K register loaded once for the 4 rows, and the 16 dot products leave the registers through one
tree of shuffles (store_sums: 30 shuffles and 15 adds, where 16 horizontal sums take 64 of each);
P = 2^(S - m') runs on whole registers of 4 keys x 4 rows; O for 4 rows x 4 registers takes each V
register once for the 4 rows. Software prefetches ask for the K rows of the block AHEAD = 2 blocks on
while S runs and for its V rows, a line at a time, while P V runs (the hardware prefetcher alone left
the core waiting on memory; see AHEAD for the distance).
On one thread, in L2, d = 128, a group of 4 rows (Intel Xeon Emerald Rapids, loaded machine, min of
30): 29 ns a key, against 57 for the previous version of this function (one row at a time, 4 keys
against it, a horizontal sum per key and row) and 83 for split_task; over a 256 MiB cache (8 heads of
32k keys) on one thread, 10 GB/s of K and V with the prefetches, 7 without. On an AVX2 machine the 16
accumulators and the 4 rows of Q fill more than its 16 ymm registers: compiled for Haswell (AVX2 code
only, flashkit.sysinfo.AVX2_ENV) LLVM spilled some (99 ymm stores to the stack against 8 with AVX-512's
32 zmm), so with 32-byte registers S now takes its 4 keys in two passes and O 2 registers a row at a time
(TWO_PASS_S, RV: 1.3-1.5x faster there, measured below VECTOR_PREFERRED); the answer stays within 2e-6
of float64 attention (tests/test_decode.py checks it). Even so, the loops are what a call takes there.
benchmarks/results/decode-intel-xeon-emeraldrapids-2c.json (the 2 cores shared with other jobs, copy
14.9 GB/s): 57% (batch 1) and 38% (batch 8) of the copy bandwidth at 32k keys, against 22% and 21%
for split_task in the same run; an earlier run of the same kernel (commit 3daebd9, copy 13.7 GB/s):
66% and 70%, split_task 36% and 23%. The goal, 80%, is not reached on this loaded machine.

A step that reads less than SERIAL_BYTES of K and V runs its tasks on the calling thread
(splitk_serial): waking the thread pool took 0.2-0.6 ms on the loaded 2-core machine, more than such
a step (L = 64, 8 K/V heads: 35 us serial, 73 us on the pool, min of 15; at 8 MiB the pool's median was
3x the serial one with the other core busy).

This module imports Numba at the top: the registry loads it when the "numba-splitk" backend first runs
(flashkit.decode.BACKENDS), never on `import flashkit`.
"""
from __future__ import annotations

import math
import threading
import time

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from flashkit.cpu import threads as cpu_threads

from flashkit.cpu.simd import FASTMATH, fast_exp, fast_exp2
from flashkit.cpu.vec import VECTOR_BYTES, Vec, _flat, _pointer, bcast, exp2, fetch_add, fma, lanes, load, splat, store, vmax

Bc = 64  # keys per block: K_j and V_j of 64 x 128 float32 are 32 KiB each, an L1/L2-sized pair
MIN_CHUNK = 256  # "auto" never cuts the cache finer than this many keys per split (per-task overhead)
SERIAL_BYTES = 4 * 2**20  # a step reading fewer bytes of K and V runs on the calling thread (measured below)


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def split_task(Q, K, V, lo, hi, scale, b, h, s, j0, j1, M, L, O):
    """The partial state over keys [j0, j1) of the g * Nq query rows that share K/V head h of batch b.

    Q (B, Hq, Nq, d); K, V (B, Hkv, Nmax, d); lo, hi (B, Nq) int64: row i of batch b sees keys
    lo[b, i] <= j < hi[b, i]. Writes M[s, b, hq, i], L[s, b, hq, i] and O[s, b, hq, i, :] for the
    query heads hq of the group: (m, l, O) of the online softmax, O not divided by l.
    """
    Hq, Nq, d = Q.shape[1], Q.shape[2], Q.shape[3]
    g = Hq // K.shape[1]
    R = g * Nq  # query rows sharing this K/V head: row r = gi * Nq + i
    neg_inf = -np.inf
    q = np.empty((R, d), Q.dtype)  # Q_i * scale, so S needs no extra multiply
    row_lo = np.empty(R, np.int64)
    row_hi = np.empty(R, np.int64)
    jlo, jhi = j1, j0  # the keys of [j0, j1) that at least one row sees
    for gi in range(g):
        for i in range(Nq):
            r = gi * Nq + i
            for c in range(d):
                q[r, c] = Q[b, h * g + gi, i, c] * scale
            row_lo[r] = lo[b, i]
            row_hi[r] = hi[b, i]
            jlo = min(jlo, max(j0, lo[b, i]))
            jhi = max(jhi, min(j1, hi[b, i]))
    m = np.full(R, neg_inf, Q.dtype)
    l = np.zeros(R, Q.dtype)
    acc = np.zeros((R, d), Q.dtype)
    P = np.empty((R, Bc), Q.dtype)  # S, then P = exp(S - m') in place

    zero = Q.dtype.type(0)
    Kh, Vh = K[b, h], V[b, h]  # (Nmax, d) each
    for jb in range(jlo, jhi, Bc):
        n = min(Bc, jhi - jb)
        # S = Q K_j^T * scale: one pass over the keys, each key used by all R rows while in cache
        for jj in range(n):
            k = Kh[jb + jj]
            for r in range(R):
                if row_lo[r] <= jb + jj < row_hi[r]:
                    sc = zero
                    for c in range(d):
                        sc += q[r, c] * k[c]
                    P[r, jj] = sc
                else:
                    P[r, jj] = neg_inf
        # m' = max(m, rowmax(S)); P = exp(S - m'); alpha = exp(m - m'); l = alpha l + rowsum(P); O *= alpha
        for r in range(R):
            mx = m[r]
            for jj in range(n):
                mx = max(mx, P[r, jj])
            if mx == neg_inf:  # no visible key yet for this row: P = 0, the state stays empty
                for jj in range(n):
                    P[r, jj] = 0
                continue
            alpha = fast_exp(m[r] - mx)  # 0 when m = -inf
            rowsum = zero
            for jj in range(n):
                p = fast_exp(P[r, jj] - mx)
                P[r, jj] = p
                rowsum += p
            l[r] = alpha * l[r] + rowsum
            m[r] = mx
            for c in range(d):
                acc[r, c] *= alpha
        # O += P V_j (masked entries of P are 0)
        for jj in range(n):
            v = Vh[jb + jj]
            for r in range(R):
                p = P[r, jj]
                for c in range(d):
                    acc[r, c] += p * v[c]

    for gi in range(g):
        for i in range(Nq):
            r = gi * Nq + i
            M[s, b, h * g + gi, i] = m[r]
            L[s, b, h * g + gi, i] = l[r]
            for c in range(d):
                O[s, b, h * g + gi, i, c] = acc[r, c]


NEG = -1e30  # a hidden score in split_task_vec: finite, so 2^(NEG - NEG) never becomes NaN
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@intrinsic
def store_sums(typingctx, a, i, vs):
    """a[i + k] = hsum(vs[k]) for the 16 registers of the tuple vs: a tree that folds two registers into
    one at every step (with 16 lanes: 15 folds of 2 shuffles and 1 add, where 16 separate horizontal
    sums take 4 shuffles and 4 adds each), the sums landing in register order. W <= 16 lanes, so the
    tree ends in 16 / W registers, stored one after the other."""
    if not (_flat(a) and isinstance(i, types.Integer) and isinstance(vs, types.UniTuple) and vs.count == 16
            and isinstance(vs.dtype, Vec) and vs.dtype.dtype == a.dtype):
        return None

    def codegen(context, builder, sig, args):
        xs = [builder.extract_value(args[2], k) for k in range(16)]
        W = xs[0].type.count
        i32 = ir.VectorType(ir.IntType(32), W)
        G = W  # lanes of one register that still belong to one sum
        while G > 1:
            half = G // 2
            first = [g * G + k for g in range(W // G) for k in range(half)]
            second = [g * G + k for g in range(W // G) for k in range(half, G)]
            lo = ir.Constant(i32, first + [W + x for x in first])
            hi = ir.Constant(i32, second + [W + x for x in second])
            xs = [builder.fadd(builder.shuffle_vector(x, y, lo), builder.shuffle_vector(x, y, hi))
                  for x, y in zip(xs[::2], xs[1::2])]
            G = half
        for n, x in enumerate(xs):
            p = _pointer(context, builder, sig.args[0], args[0], builder.add(args[1], ir.Constant(args[1].type, n * W)))
            builder.store(x, builder.bitcast(p, x.type.as_pointer()), align=a.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(a, i, vs), codegen


@intrinsic
def prefetch(typingctx, a, i):
    """Ask for the cache line of a[i] (flat index) into L2 ahead of its use (prefetcht1): no fault, no wait."""
    if not _flat(a):
        return None

    def codegen(context, builder, sig, args):
        p = builder.bitcast(_pointer(context, builder, sig.args[0], args[0], args[1]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [p.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])  # read, L2, data
        return context.get_dummy_value()

    return types.none(a, i), codegen


MR = 4  # query rows per register block: 4 rows x 4 keys of S, 4 rows x RV registers of O
# With 16 registers (AVX2) the 4 x 4 tiles spill: 16 accumulators + 4 rows of Q (or P) + 1 of K (or V)
# are 21 live registers. There, S takes its 4 keys in two passes of 2 over d (8 accumulators + 5 = 13
# live; the first pass's 8 sums wait on the stack, stored once per 4 keys, not once per step), and O
# goes 2 registers a row at a time (8 + 5 = 13). With 32 registers (AVX-512) one pass and 4 registers.
TWO_PASS_S = VECTOR_BYTES < 64
RV = 4 if VECTOR_BYTES >= 64 else 2  # registers of O a row per step of the P V_j product
LINE = 64  # bytes of a cache line: the prefetch stride
AHEAD = 2  # blocks of K and V asked for ahead of their use (measured in split_task_vec's docstring)


@njit(nogil=True, cache=True)
def split_task_vec(Q, K, V, lo, hi, scale, b, h, s, j0, j1, M, L, O):
    """split_task in explicit vector registers (flashkit/cpu/vec.py), for d a multiple of 4 registers
    (64 or 128 float32 with AVX-512): the same state, written to the same M, L, O.

    The R = g * Nq rows of the group go MR = 4 at a time (padded with zero rows), so every register of
    K or V loaded serves four rows. Per block of Bc keys:
        S   = Q K_j^T     4 rows x 4 keys = 16 accumulators over d, then store_sums: 16 dot products
                          out of 16 registers in one tree; P holds them key-major (P[key * 4 + row])
        P   = 2^(S - m')  whole registers of 4 keys x 4 rows against a register of the 4 rows' maxima
        O   = alpha O + P V_j   4 rows x 4 registers of O, each V register loaded once for the 4 rows
    with software prefetches (into L2) spread evenly through both products, AHEAD blocks ahead: while S
    runs, the K rows of block j + AHEAD; while P V_j runs, one slice of a V row of that block per slice of
    V_j read. The hardware prefetcher alone left the core waiting for memory (a 256 MiB cache on one
    thread: 7 GB/s without, 10 with, min of 6 rounds; Emerald Rapids, the earlier prefetch pattern below).

    The prefetch pattern before AHEAD: this block's V rows while S ran, the next block's K rows in the
    first of P V_j's passes (a burst of 512 lines). Measured on the 2-core AMD EPYC (znver3, AVX2), 8 K/V
    heads of 32k keys, 2 threads, one process, min of 5, two rounds: 14.4-15.4 ms before, 12.3-13.2 ms
    with AHEAD = 2 (AHEAD = 1: 12.6-13.2, 3: 12.3-12.7; prefetcht0/t2/nta no better than t1). In the same
    kind of run split_task (plain loops, no prefetches) took 12.8 ms: on AVX2 the register task still only
    draws level, so VECTOR_PREFERRED stays False there. Both reach about 21 GB/s of K and V, where a plain
    parallel read of the same K and V blocks (a sum, no compute) reads 33-34 GB/s: at this compute per byte
    the 2 cores do not overlap the arithmetic with the memory stream (1 thread: the task 25.5 ms, the read
    14.7, the arithmetic alone in L2 about 14), and prefetching further ahead did not change that.
    """
    Hq, Nq, d = Q.shape[1], Q.shape[2], Q.shape[3]
    g = Hq // K.shape[1]
    R = g * Nq
    RP = -(-R // MR) * MR
    dt = Q.dtype.type
    W = lanes(Q)
    neg = dt(NEG)
    step = LINE // Q.itemsize
    q = np.zeros(RP * d, Q.dtype)  # Q * scale * log2(e), the rows of the group one after the other
    row_lo = np.empty(RP, np.int64)
    row_hi = np.empty(RP, np.int64)
    jlo, jhi = j1, j0
    for gi in range(g):
        for i in range(Nq):
            r = gi * Nq + i
            for c in range(d):
                q[r * d + c] = Q[b, h * g + gi, i, c] * dt(scale * LOG2E)
            row_lo[r] = lo[b, i]
            row_hi[r] = hi[b, i]
            jlo = min(jlo, max(j0, lo[b, i]))
            jhi = max(jhi, min(j1, hi[b, i]))
    for r in range(R, RP):  # padding rows see every key of the task: they never force the masked path
        row_lo[r] = jlo
        row_hi[r] = jhi
    m = np.full(RP, neg)  # base-2 running maxima
    l = np.zeros(RP, Q.dtype)
    acc = np.zeros(RP * d, Q.dtype)
    P = np.empty(RP * Bc, Q.dtype)  # row group G: P[G * Bc + key * MR + row]
    lane = np.empty(W, Q.dtype)  # one register spelled out, for the per-row folds
    pattern = np.empty(W, Q.dtype)  # lane t holds row t % MR's maximum
    alpha = np.empty(MR, Q.dtype)
    Kh, Vh = K[b, h], V[b, h]
    last = jhi - 1
    for jb in range(jlo, jhi, Bc):
        n = min(Bc, jhi - jb)
        n4 = -(-n // 4) * 4
        cut = n4 != n  # the block's last keys, or a row whose window cuts it: the masked path
        for r in range(R):
            if row_lo[r] > jb or row_hi[r] < jb + n:
                cut = True
        for G in range(0, RP, MR):
            pg = G * Bc
            qa, qb, qc, qd = G * d, (G + 1) * d, (G + 2) * d, (G + 3) * d
            # S = Q K_j^T, 4 keys x 4 rows a step (a key past the block reads the last key: masked below)
            for jj in range(0, n4, 4):
                k0 = min(jb + jj, last) * d
                k1 = min(jb + jj + 1, last) * d
                k2 = min(jb + jj + 2, last) * d
                k3 = min(jb + jj + 3, last) * d
                if G == 0:  # the K rows of these four keys AHEAD blocks on
                    for x in range(k0 + AHEAD * Bc * d, min(k0 + AHEAD * Bc * d + 4 * d, jhi * d), step):
                        prefetch(Kh, x)
                z = splat(dt(0))
                s00, s01, s02, s03, s10, s11, s12, s13 = z, z, z, z, z, z, z, z
                s20, s21, s22, s23, s30, s31, s32, s33 = z, z, z, z, z, z, z, z
                for c in range(0, d, W):
                    x0 = load(q, qa + c)
                    x1 = load(q, qb + c)
                    x2 = load(q, qc + c)
                    x3 = load(q, qd + c)
                    y = load(Kh, k0 + c)
                    s00 = fma(x0, y, s00)
                    s01 = fma(x1, y, s01)
                    s02 = fma(x2, y, s02)
                    s03 = fma(x3, y, s03)
                    y = load(Kh, k1 + c)
                    s10 = fma(x0, y, s10)
                    s11 = fma(x1, y, s11)
                    s12 = fma(x2, y, s12)
                    s13 = fma(x3, y, s13)
                    if not TWO_PASS_S:  # a compile-time constant: LLVM keeps one of the two forms
                        y = load(Kh, k2 + c)
                        s20 = fma(x0, y, s20)
                        s21 = fma(x1, y, s21)
                        s22 = fma(x2, y, s22)
                        s23 = fma(x3, y, s23)
                        y = load(Kh, k3 + c)
                        s30 = fma(x0, y, s30)
                        s31 = fma(x1, y, s31)
                        s32 = fma(x2, y, s32)
                        s33 = fma(x3, y, s33)
                if TWO_PASS_S:  # keys 2 and 3 in a second pass (Q's rows reloaded from L1)
                    for c in range(0, d, W):
                        x0 = load(q, qa + c)
                        x1 = load(q, qb + c)
                        x2 = load(q, qc + c)
                        x3 = load(q, qd + c)
                        y = load(Kh, k2 + c)
                        s20 = fma(x0, y, s20)
                        s21 = fma(x1, y, s21)
                        s22 = fma(x2, y, s22)
                        s23 = fma(x3, y, s23)
                        y = load(Kh, k3 + c)
                        s30 = fma(x0, y, s30)
                        s31 = fma(x1, y, s31)
                        s32 = fma(x2, y, s32)
                        s33 = fma(x3, y, s33)
                store_sums(P, pg + jj * MR, (s00, s01, s02, s03, s10, s11, s12, s13,
                                             s20, s21, s22, s23, s30, s31, s32, s33))
            if cut:
                for jj in range(n4):
                    for r in range(MR):
                        key = jb + jj
                        if jj >= n or key < row_lo[G + r] or key >= row_hi[G + r]:
                            P[pg + jj * MR + r] = neg
            # m' = max(m, rowmax(S)),  alpha = 2^(m - m'),  P = 2^(S - m'),  l = alpha l + rowsum(P)
            top = load(P, pg)
            for c in range(W, n4 * MR, W):
                top = vmax(top, load(P, pg + c))
            store(lane, 0, top)
            for r in range(MR):
                t = m[G + r]
                for u in range(r, W, MR):
                    t = max(t, lane[u])
                alpha[r] = fast_exp2(m[G + r] - t)
                m[G + r] = t
            for u in range(W):
                pattern[u] = m[G + u % MR]
            mv = load(pattern, 0)
            sums = splat(dt(0))
            for c in range(0, n4 * MR, W):
                p = exp2(load(P, pg + c) - mv)
                store(P, pg + c, p)
                sums = sums + p
            store(lane, 0, sums)
            for r in range(MR):
                t = dt(0)
                for u in range(r, W, MR):
                    t += lane[u]
                l[G + r] = alpha[r] * l[G + r] + t
            # O = alpha O + P V_j: 4 rows x RV registers, each V register loaded once for the 4 rows. Registers
            # 2 and 3 of a row exist where RV says (a compile-time constant: LLVM drops the others' code)
            a0, a1, a2, a3 = splat(alpha[0]), splat(alpha[1]), splat(alpha[2]), splat(alpha[3])
            z = splat(dt(0))
            o02 = o03 = o12 = o13 = o22 = o23 = o32 = o33 = z
            for c in range(0, d, RV * W):
                oa, ob, oc, od = qa + c, qb + c, qc + c, qd + c
                o00, o01 = load(acc, oa) * a0, load(acc, oa + W) * a0
                o10, o11 = load(acc, ob) * a1, load(acc, ob + W) * a1
                o20, o21 = load(acc, oc) * a2, load(acc, oc + W) * a2
                o30, o31 = load(acc, od) * a3, load(acc, od + W) * a3
                if RV > 2:
                    o02, o03 = load(acc, oa + 2 * W) * a0, load(acc, oa + 3 * W) * a0
                    o12, o13 = load(acc, ob + 2 * W) * a1, load(acc, ob + 3 * W) * a1
                    o22, o23 = load(acc, oc + 2 * W) * a2, load(acc, oc + 3 * W) * a2
                    o32, o33 = load(acc, od + 2 * W) * a3, load(acc, od + 3 * W) * a3
                for jj in range(n):
                    v = (jb + jj) * d + c
                    if G == 0 and jb + AHEAD * Bc + jj < jhi:  # this slice of a V row AHEAD blocks on
                        for x in range(v + AHEAD * Bc * d, v + AHEAD * Bc * d + RV * W, step):
                            prefetch(Vh, x)
                    w = pg + jj * MR
                    p0, p1, p2, p3 = bcast(P, w), bcast(P, w + 1), bcast(P, w + 2), bcast(P, w + 3)
                    y = load(Vh, v)
                    o00, o10, o20, o30 = fma(p0, y, o00), fma(p1, y, o10), fma(p2, y, o20), fma(p3, y, o30)
                    y = load(Vh, v + W)
                    o01, o11, o21, o31 = fma(p0, y, o01), fma(p1, y, o11), fma(p2, y, o21), fma(p3, y, o31)
                    if RV > 2:
                        y = load(Vh, v + 2 * W)
                        o02, o12, o22, o32 = fma(p0, y, o02), fma(p1, y, o12), fma(p2, y, o22), fma(p3, y, o32)
                        y = load(Vh, v + 3 * W)
                        o03, o13, o23, o33 = fma(p0, y, o03), fma(p1, y, o13), fma(p2, y, o23), fma(p3, y, o33)
                store(acc, oa, o00)
                store(acc, oa + W, o01)
                store(acc, ob, o10)
                store(acc, ob + W, o11)
                store(acc, oc, o20)
                store(acc, oc + W, o21)
                store(acc, od, o30)
                store(acc, od + W, o31)
                if RV > 2:
                    store(acc, oa + 2 * W, o02)
                    store(acc, oa + 3 * W, o03)
                    store(acc, ob + 2 * W, o12)
                    store(acc, ob + 3 * W, o13)
                    store(acc, oc + 2 * W, o22)
                    store(acc, oc + 3 * W, o23)
                    store(acc, od + 2 * W, o32)
                    store(acc, od + 3 * W, o33)
    for gi in range(g):
        for i in range(Nq):
            r = gi * Nq + i
            seen = m[r] > neg  # a row that saw no key: the empty state (-inf, 0, 0)
            M[s, b, h * g + gi, i] = m[r] * dt(LN2) if seen else -np.inf
            L[s, b, h * g + gi, i] = l[r] if seen else 0
            for c in range(d):
                O[s, b, h * g + gi, i, c] = acc[r * d + c] if seen else 0


def vector_path(d, dtype) -> bool:
    """Whether split_task_vec can serve head size d: d a multiple of 4 registers of the dtype."""
    return d % (4 * VECTOR_BYTES // np.dtype(dtype).itemsize) == 0


# Whether a call that does not say (vector=None) takes split_task_vec where it can: only with 64-byte
# registers. Measured on a 2-core AMD EPYC (znver3, AVX2 only, 2026-12-02), GQA 32/8, d = 128, 32k keys:
#   * quiet, python -m benchmarks.decode --device cpu --lengths 32768 --batches 1,8 --model-length 0
#     (commit f3d8c97, the 4 x 4 tiles then in one pass, spilling): split_task_vec 38.98 ms (batch 1) and
#     268.87 ms (batch 8), split_task 24.07 and 174.84 in the same run.
#   * the two-pass form (TWO_PASS_S, RV), one process, min of 9 interleaved rounds, another job on one core:
#     one thread (CPU time) 47.3 / 355.7 ms, the one-pass form 61.5 / 473.8, the loops 39.2 / 338.2; two
#     threads 48.1 / 308.4, 63.7 / 468.1, 44.2 / 331.4. Its code moves ymm registers to and from the
#     stack far less (57 stores and 17 loads against 167 and 109, counted in the asm), but at 6-11 GB/s
#     of K and V (this machine reads 15.6-15.9 GB/s on both cores) the step is bound by memory, where the
#     loops are as fast or faster: the compute the registers save is not what waits here.
#   * quiet, python -m benchmarks.decode --device cpu (commit 84242e8, benchmarks/results/decode-amd-epyc-znver3-
#     2c.json; copy 43.1 GB/s, parallel read 29.2): the two-pass split_task_vec 14.43 / 108.51 ms, the loops
#     13.31 / 108.76: level at batch 8, the loops 8% ahead at batch 1; both 43-47% of the copy bandwidth.
VECTOR_PREFERRED = VECTOR_BYTES >= 64


def use_vector(d, dtype, vector=None) -> bool:
    """The task a call runs: split_task_vec (True) or split_task (False). vector=None: the preferred one
    for this machine (VECTOR_PREFERRED) where split_task_vec serves d; True or False ask for one (True
    falls back to split_task where split_task_vec cannot serve d)."""
    if vector is None:
        return VECTOR_PREFERRED and vector_path(d, dtype)
    return bool(vector) and vector_path(d, dtype)


@njit(nogil=True, cache=True)
def one_task(t, Q, K, V, lo, hi, scale, chunk, vec, M, L, O):
    """Task t of B * H_kv * splits; split s holds keys [s * chunk, (s + 1) * chunk).
    vec: split_task_vec (see vector_path), else split_task."""
    S = M.shape[0]
    Hkv, Nmax = K.shape[1], K.shape[2]
    s = t % S  # the splits of one head are neighbours: with few heads, all threads share each head
    bh = t // S
    h = bh % Hkv
    b = bh // Hkv
    j0 = min(s * chunk, Nmax)
    j1 = min(j0 + chunk, Nmax)
    if vec:
        split_task_vec(Q, K, V, lo, hi, scale, b, h, s, j0, j1, M, L, O)
    else:
        split_task(Q, K, V, lo, hi, scale, b, h, s, j0, j1, M, L, O)


@njit(parallel=True, cache=True)
def splitk_kernel(Q, K, V, lo, hi, scale, chunk, vec, M, L, O, workers, counter):
    """All B * H_kv * splits tasks on `workers` threads, each taking the next task from `counter` (one
    int64, 0 at the start) when it is done with one: a thread the OS deschedules holds up only its
    current task, where a static split (prange over the tasks) waits for its whole share. Measured on
    the loaded 2-core machine, 8 K/V heads of 32k keys, 8 rounds: median 39-47 ms against 47-53 static
    (min 27-31 against 22-28)."""
    n_tasks = M.shape[0] * K.shape[0] * K.shape[1]
    for _w in prange(workers):
        t = fetch_add(counter, 1)
        while t < n_tasks:
            one_task(t, Q, K, V, lo, hi, scale, chunk, vec, M, L, O)
            t = fetch_add(counter, 1)


@njit(nogil=True, cache=True)
def splitk_serial(Q, K, V, lo, hi, scale, chunk, vec, M, L, O):
    """The same tasks on the calling thread: a small step, where waking the thread pool costs more
    than the step (measured 0.2-0.6 ms a launch with the other core busy, for a step of 0.05 ms)."""
    for t in range(M.shape[0] * K.shape[0] * K.shape[1]):
        one_task(t, Q, K, V, lo, hi, scale, chunk, vec, M, L, O)


def threads() -> int:
    import numba

    return numba.get_num_threads()


def auto_splits(B: int, Hkv: int, n_keys: int, n_threads: int = None) -> int:
    """Enough tasks for every thread four times over (load balance on a busy machine), but never
    chunks of fewer than MIN_CHUNK keys. One split when the heads alone already give that."""
    n_threads = threads() if n_threads is None else n_threads
    want = math.ceil(4 * n_threads / (B * Hkv))
    return max(1, min(want, math.ceil(n_keys / MIN_CHUNK)))


def new_partials(splits, B, Hq, Nq, d, dtype):
    """Empty (M, L, O) arrays: (splits, B, Hq, Nq), (splits, B, Hq, Nq), (splits, B, Hq, Nq, d)."""
    return (np.empty((splits, B, Hq, Nq), dtype), np.empty((splits, B, Hq, Nq), dtype),
            np.empty((splits, B, Hq, Nq, d), dtype))


def partials(Q, K, V, lo, hi, scale, splits, n_keys, vector=None, serial=None):
    """(M, L, O) of every split, computed in parallel. Q (B, Hq, Nq, d) and K, V (B, Hkv, Nmax, d)
    C-contiguous of one dtype (float32 or float64); lo, hi (B, Nq) int64; keys beyond n_keys unused.
    vector: split_task_vec (True), split_task (False) or this machine's preference (None: use_vector;
    the benchmark compares the two). serial: on the calling thread (True), on all threads (False), or by the bytes
    of K and V the step reads (None: below SERIAL_BYTES on the calling thread)."""
    B, Hq, Nq, d = Q.shape
    Q = np.ascontiguousarray(Q)
    vector = use_vector(d, Q.dtype, vector)
    if vector and not (K.flags.c_contiguous and V.flags.c_contiguous):
        K, V = np.ascontiguousarray(K), np.ascontiguousarray(V)  # the vector loads need rows in place
    chunk = max(1, math.ceil(n_keys / splits))
    M, L, O = new_partials(splits, B, Hq, Nq, d, Q.dtype)
    work = 4.0 * Hq * d * float(np.clip(hi - lo, 0, n_keys).sum())  # FLOPs, the forward's formula per row
    if serial is None:
        serial = 2 * K.shape[1] * d * Q.itemsize * float(np.clip(hi - lo, 0, n_keys).max(axis=1).sum()) < SERIAL_BYTES
    if serial:  # a small step runs on this thread, no thread pool woken
        splitk_serial(Q, K, V, lo, hi, Q.dtype.type(scale), chunk, vector, M, L, O)
    else:
        with cpu_threads.for_work(work):
            splitk_kernel(Q, K, V, lo, hi, Q.dtype.type(scale), chunk, vector, M, L, O, threads(),
                          np.zeros(1, np.int64))
    return M, L, O


def traced_partials(Q, K, V, lo, hi, scale, splits, n_keys, n_threads):
    """`partials` run by a pool of n_threads Python threads (the task releases the GIL), recording
    when each task starts and ends: the data of a timeline picture. Returns ((M, L, O), events) with
    events a list of dicts: task, b, h, split, j0, j1, thread, start_s, end_s (seconds from launch).
    Slower than `partials` by the Python overhead of each call; use it to look, not to time."""
    from concurrent.futures import ThreadPoolExecutor

    B, Hq, Nq, d = Q.shape
    Hkv = K.shape[1]
    chunk = max(1, math.ceil(n_keys / splits))
    M, L, O = new_partials(splits, B, Hq, Nq, d, Q.dtype)
    sc = Q.dtype.type(scale)
    task = split_task_vec if use_vector(d, Q.dtype) else split_task
    task(Q, K, V, lo, hi, sc, 0, 0, 0, 0, 0, M, L, O)  # compile (or load) before the clock starts
    events, names = [], {}
    t_launch = time.perf_counter()

    def one(t):
        s, bh = t % splits, t // splits
        h, b = bh % Hkv, bh // Hkv
        j0 = min(s * chunk, K.shape[2])
        j1 = min(j0 + chunk, K.shape[2])
        start = time.perf_counter()
        task(Q, K, V, lo, hi, sc, b, h, s, j0, j1, M, L, O)
        end = time.perf_counter()
        worker = names.setdefault(threading.get_ident(), len(names))
        events.append(dict(task=t, b=b, h=h, split=s, j0=j0, j1=j1, thread=worker,
                           start_s=start - t_launch, end_s=end - t_launch))

    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        list(pool.map(one, range(B * Hkv * splits)))
    return (M, L, O), sorted(events, key=lambda e: e["task"])


def decode(problem, splits="auto", vector=None):
    """The "numba-splitk" decode runner: (O, lse) of a flashkit.problem.DecodeProblem, its splits'
    states merged exactly. "auto": auto_splits for this machine's threads. vector: see `partials`."""
    from flashkit import online_softmax

    P = problem
    if splits == "auto":
        splits = auto_splits(P.Q.shape[0], P.K.shape[1], P.n_keys)
    dt = np.float64 if P.Q.dtype == np.float64 else np.float32  # float16 is computed in float32
    K, V = P.K, P.V
    if K.dtype != dt:  # convert only the filled rows (a copy), not the whole preallocated buffer
        K, V = K[:, :, :P.n_keys].astype(dt), V[:, :, :P.n_keys].astype(dt)
    M, L, O = partials(P.Q.astype(dt, copy=False), K, V, P.lo, P.hi, P.scale, splits, P.n_keys, vector)
    # merge the splits' states exactly; a split that saw nothing has m = -inf and counts for nothing
    return online_softmax.finalize(online_softmax.merge([online_softmax.State(M[s], L[s], O[s]) for s in range(splits)]))


def run(problem):
    """(O, lse) of a flashkit Problem with split-K (the "numba-splitk" runner of flashkit.attention:
    causal and windows, no custom mask).

    Meant for few query rows; correct for any Nq, but a prefill should use a prefill kernel."""
    from flashkit.problem import DecodeProblem

    return decode(DecodeProblem.from_problem(problem))
