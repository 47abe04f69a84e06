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

Tried and dropped: the rows four at a time through both products (register blocking). 15-20% faster
with a group of 4 rows, but 4x slower with 8 (LLVM's code for the blocked O update collapsed);
measured on one thread, d = 128, in cache.

split_task_vec (d a multiple of 4 registers: 64 and 128 in float32) writes the same task with explicit
vector registers (flashkit/cpu/vec.py): four keys at a time against each query row (8 independent FMA
chains), base-2 exponentials on whole registers, O in 8 chains of FMAs, and no array views inside the
loops (a row view such as K[b, h][j] costs two atomic reference-count updates: removing them made the
task 4x faster). On one thread, in L2, d = 128, a group of 4 rows: 57 ns a key against 79 for
split_task (Intel Xeon Emerald Rapids, loaded machine, min of 40); benchmarks/results/
decode-intel-xeon-emeraldrapids-2c.json has both over a 32k cache, measured under a load average of 14.

This module imports Numba at the top: the registry loads it when the "numba-splitk" backend first runs
(flashkit.decode.BACKENDS), never on `import flashkit`.
"""
from __future__ import annotations

import math
import threading
import time

import numpy as np
from numba import njit, prange

from flashkit.cpu import threads as cpu_threads

from flashkit.cpu.simd import FASTMATH, fast_exp, fast_exp2
from flashkit.cpu.vec import VECTOR_BYTES, bcast, exp2, fma, hmax, hsum, lanes, load, splat, store, vmax

Bc = 64  # keys per block: K_j and V_j of 64 x 128 float32 are 32 KiB each, an L1/L2-sized pair
MIN_CHUNK = 256  # "auto" never cuts the cache finer than this many keys per split (per-task overhead)


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


@njit(nogil=True, cache=True)
def split_task_vec(Q, K, V, lo, hi, scale, b, h, s, j0, j1, M, L, O):
    """split_task in explicit vector registers (flashkit/cpu/vec.py), for d a multiple of 4 registers
    (64 or 128 float32 with AVX-512): the same state, written to the same M, L, O.

    Per block of Bc keys, for the R = g * Nq rows of the group, each K_j and V_j row read once from
    memory and then from L1 for every row:
        S   = Q K_j^T            a key's row against each query row: 2 chains of FMAs, then a lane sum
        P   = 2^(S - m')         in base 2 (log2(e) folded into Q), exp2 and the maxima on registers
        O_r = alpha O_r + P V_j  4 registers of O_r per pass over the block's V rows
    """
    Hq, Nq, d = Q.shape[1], Q.shape[2], Q.shape[3]
    g = Hq // K.shape[1]
    R = g * Nq
    dt = Q.dtype.type
    W = lanes(Q[0, 0, 0])
    neg = dt(NEG)
    q = np.empty(R * d, Q.dtype)  # Q * scale * log2(e), the rows of the group one after the other
    row_lo = np.empty(R, np.int64)
    row_hi = np.empty(R, np.int64)
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
    m = np.full(R, neg)  # base-2 running maxima
    l = np.zeros(R, Q.dtype)
    acc = np.zeros(R * d, Q.dtype)
    P = np.empty(R * Bc, Q.dtype)
    Kh, Vh = K[b, h], V[b, h]
    for jb in range(jlo, jhi, Bc):
        n = min(Bc, jhi - jb)
        # S = Q K_j^T, four keys at a time: 8 independent chains of FMAs (a single dot product is one
        # chain, bound by the FMA latency, measured 3x slower), then the four lane sums
        for jj in range(0, n, 4):
            for r in range(R):
                qr = r * d
                if jj + 4 <= n and row_lo[r] <= jb + jj and jb + jj + 4 <= row_hi[r]:
                    k0 = (jb + jj) * d  # flat indices into Kh: no array views in the loop (each costs
                    z = splat(dt(0))    # two atomic reference-count updates, measured 4x slower)
                    a0, b0, a1, b1, a2, b2, a3, b3 = z, z, z, z, z, z, z, z
                    for c in range(0, d, 2 * W):
                        x = load(q, qr + c)
                        y = load(q, qr + c + W)
                        a0 = fma(x, load(Kh, k0 + c), a0)
                        b0 = fma(y, load(Kh, k0 + c + W), b0)
                        a1 = fma(x, load(Kh, k0 + d + c), a1)
                        b1 = fma(y, load(Kh, k0 + d + c + W), b1)
                        a2 = fma(x, load(Kh, k0 + 2 * d + c), a2)
                        b2 = fma(y, load(Kh, k0 + 2 * d + c + W), b2)
                        a3 = fma(x, load(Kh, k0 + 3 * d + c), a3)
                        b3 = fma(y, load(Kh, k0 + 3 * d + c + W), b3)
                    P[r * Bc + jj] = hsum(a0 + b0)
                    P[r * Bc + jj + 1] = hsum(a1 + b1)
                    P[r * Bc + jj + 2] = hsum(a2 + b2)
                    P[r * Bc + jj + 3] = hsum(a3 + b3)
                else:  # the block's last keys, or a row whose window cuts these four
                    for u in range(jj, min(jj + 4, n)):
                        if row_lo[r] <= jb + u < row_hi[r]:
                            k = (jb + u) * d
                            a0 = splat(dt(0))
                            b0 = splat(dt(0))
                            for c in range(0, d, 2 * W):
                                a0 = fma(load(q, qr + c), load(Kh, k + c), a0)
                                b0 = fma(load(q, qr + c + W), load(Kh, k + c + W), b0)
                            P[r * Bc + u] = hsum(a0 + b0)
                        else:
                            P[r * Bc + u] = neg
        for jj in range(n, Bc):
            for r in range(R):
                P[r * Bc + jj] = neg  # the block's tail: exp2 gives 0
        for r in range(R):
            # m' = max(m, rowmax(S)),  alpha = 2^(m - m'),  P = 2^(S - m'),  l = alpha l + rowsum(P)
            top = load(P, r * Bc)
            for c in range(W, Bc, W):
                top = vmax(top, load(P, r * Bc + c))
            m_new = max(m[r], hmax(top))
            alpha = fast_exp2(m[r] - m_new)
            mv = splat(m_new)
            sums = splat(dt(0))
            for c in range(0, Bc, W):
                p = exp2(load(P, r * Bc + c) - mv)
                store(P, r * Bc + c, p)
                sums = sums + p
            l[r] = alpha * l[r] + hsum(sums)
            m[r] = m_new
            # O_r = alpha O_r + P V_j, 4 registers of O_r at a time, even and odd keys in separate
            # accumulators: 8 chains of FMAs
            av = splat(alpha)
            for c in range(0, d, 4 * W):
                ob = r * d + c
                o0 = load(acc, ob) * av
                o1 = load(acc, ob + W) * av
                o2 = load(acc, ob + 2 * W) * av
                o3 = load(acc, ob + 3 * W) * av
                z = splat(dt(0))
                e0, e1, e2, e3 = z, z, z, z
                for jj in range(0, n - 1, 2):
                    v = (jb + jj) * d + c
                    p = bcast(P, r * Bc + jj)
                    o0 = fma(p, load(Vh, v), o0)
                    o1 = fma(p, load(Vh, v + W), o1)
                    o2 = fma(p, load(Vh, v + 2 * W), o2)
                    o3 = fma(p, load(Vh, v + 3 * W), o3)
                    p = bcast(P, r * Bc + jj + 1)
                    e0 = fma(p, load(Vh, v + d), e0)
                    e1 = fma(p, load(Vh, v + d + W), e1)
                    e2 = fma(p, load(Vh, v + d + 2 * W), e2)
                    e3 = fma(p, load(Vh, v + d + 3 * W), e3)
                if n % 2:
                    v = (jb + n - 1) * d + c
                    p = bcast(P, r * Bc + n - 1)
                    o0 = fma(p, load(Vh, v), o0)
                    o1 = fma(p, load(Vh, v + W), o1)
                    o2 = fma(p, load(Vh, v + 2 * W), o2)
                    o3 = fma(p, load(Vh, v + 3 * W), o3)
                store(acc, ob, o0 + e0)
                store(acc, ob + W, o1 + e1)
                store(acc, ob + 2 * W, o2 + e2)
                store(acc, ob + 3 * W, o3 + e3)
    for gi in range(g):
        for i in range(Nq):
            r = gi * Nq + i
            seen = m[r] > neg  # a row that saw no key: the empty state (-inf, 0, 0)
            M[s, b, h * g + gi, i] = m[r] * dt(LN2) if seen else -np.inf
            L[s, b, h * g + gi, i] = l[r] if seen else 0
            for c in range(d):
                O[s, b, h * g + gi, i, c] = acc[r * d + c] if seen else 0


def vector_path(d, dtype) -> bool:
    """Whether split_task_vec serves head size d: d a multiple of 4 registers of the dtype."""
    return d % (4 * VECTOR_BYTES // np.dtype(dtype).itemsize) == 0


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def splitk_kernel(Q, K, V, lo, hi, scale, chunk, vec, M, L, O):
    """All B * H_kv * splits tasks on all threads; split s holds keys [s * chunk, (s + 1) * chunk).
    vec: every task runs split_task_vec (see vector_path), else split_task."""
    S = M.shape[0]
    B, Hkv, Nmax = K.shape[0], K.shape[1], K.shape[2]
    for t in prange(B * Hkv * S):
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


def partials(Q, K, V, lo, hi, scale, splits, n_keys, vector=None):
    """(M, L, O) of every split, computed in parallel. Q (B, Hq, Nq, d) and K, V (B, Hkv, Nmax, d)
    C-contiguous of one dtype (float32 or float64); lo, hi (B, Nq) int64; keys beyond n_keys unused.
    vector: split_task_vec (True), split_task (False) or whichever serves d (None; the benchmark
    compares the two)."""
    B, Hq, Nq, d = Q.shape
    Q = np.ascontiguousarray(Q)
    vector = vector_path(d, Q.dtype) if vector is None else bool(vector) and vector_path(d, Q.dtype)
    if vector and not (K.flags.c_contiguous and V.flags.c_contiguous):
        K, V = np.ascontiguousarray(K), np.ascontiguousarray(V)  # the vector loads need rows in place
    chunk = max(1, math.ceil(n_keys / splits))
    M, L, O = new_partials(splits, B, Hq, Nq, d, Q.dtype)
    work = 4.0 * Hq * d * float(np.clip(hi - lo, 0, n_keys).sum())  # FLOPs, the forward's formula per row
    with cpu_threads.for_work(work):  # a small step runs on one thread (flashkit/cpu/threads.py)
        splitk_kernel(Q, K, V, lo, hi, Q.dtype.type(scale), chunk, vector, M, L, O)
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
    task = split_task_vec if vector_path(d, Q.dtype) else split_task
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
