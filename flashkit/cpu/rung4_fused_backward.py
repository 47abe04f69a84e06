"""Backward rung 4, "numba-fused" backward: FlashAttention-2's Algorithm 2 with no BLAS, P recomputed in registers.

The readable twin is flashkit/tiled.py:fa2_backward_head; rung 3's backward (rung3_gemm_backward.py) is
the same algorithm with its five tile products as np.dot calls. Here they are the forward rung 4's
register-tiled micro-kernel (flashkit/cpu/vec.py), one generic rows x 2-register kernel (`micro`; 8 rows
with AVX-512, 6 with AVX2) used five times per tile (Br query rows x Bc keys):

    S   = Q_i K_j^T       MR rows x NR keys, d steps     then, in registers: P = 2^(S' - lse'), row sums
    dP  = dO_i V_j^T      MR rows x NR keys, d steps     then, in registers: dS = P * (dP - D)
    dV_j += P^T dO_i      MK keys x NR features, Br steps (P and dS of the tile wait in L1/L2 buffers)
    dK_j += dS^T Q_i      MK keys x NR features, Br steps
    dQ_i += dS K_j        MR rows x NR features, Bc steps (into this thread's private copy of dQ)

What is packed once per call (parallel over blocks), so no product re-packs anything: Q' = Q scale log2(e)
and dO in panels of 8 rows (d x 8, the broadcast operand of S and dP), K^T and V^T in panels of NR keys
(d x NR, the streamed operand of S and dP); Q and dO as rows padded to Dp features (the streamed operand
of dK and dV) and K likewise (dQ's), or, where no padding is needed (d a multiple of 2W, whole blocks),
Q, dO and K themselves. lse' = lse log2(e) and D = rowsum(dO * O) are padded so a
padding row has P = 0 and dS = 0, and a row with lse = -inf (it saw no key) gets lse' = 1e30: P = 0, no
NaN, its gradients 0.

Parallel without races as rung 3's default: tasks over K/V blocks (b, K/V head, j) own dK_j and dV_j
across every query head of their GQA group, and add dS K_j into their worker's copy of dQ; the copies are
summed at the end (O(threads N d) memory). The workers take tasks from a shared counter (the forward
rung's task queue), and the scratch (panels, D, lse', the dQ copies) is kept for the next call of the
same shapes (`_scratch`): see the measurements of 2026-12-02 below. A dQ-only second pass would recompute S and dP (7 products
instead of 5); rung 3's header has that trade measured.

Causal and window tiles skip the key panels no row of an 8-row panel sees, and mask only the panels a
window boundary (or a custom mask, a ragged last panel) crosses, as the forward rung does. The lse check
(rows of P summing to 1) is computed from the row sums in registers; rows with lse = -inf are checked
in NumPy (they must have seen no key).

FlexAttention's hooks (what backend "numba" runs with a score_mod, mask_mod or BlockMask) reach the
micro-tile as in the forward rung 4: the kernel stores S of a micro-tile to a scratch Sb and calls a
hook compiled per mod (flashkit/cpu/mods_jit.py, mod_micro_tile_backward, a function pointer: the
kernel is compiled once per dtype), which hides what the mask_mod hides and, with a score_mod f, puts
f(S) in Sb and f'(S) in a second scratch Fb; dS = P * (dP - D) * f'(S) then (rung 3's tile_dS does the
same per tile). The tiles the mask_mod or the BlockMask leave empty are skipped, its FULL tiles run
without a mask test; with a score_mod every micro-tile calls the hook (Q' carries scale alone, so f
sees q . k * scale). The library's softcap runs on whole registers (mods_jit.softcap_register_grad:
f and f' from one tanh). Measured (znver3, AVX2, N=4096, H=8, d=64, both cores, benchmarks/cpu_mods.py
--cost-only; mods_jit's header has the rest): identity 1.03x, softcap 1.07x the time without a mod;
softcap on rung 3 2.45x (cpu-mods-cost-amd-epyc-znver3-2c-history1.json, the 4 x 16 build). With the 6 x 16
micro-tiles, at a977ce6 (cpu-mods-cost-amd-epyc-znver3-2c.json, 7 interleaved rounds): identity 1.04x, softcap
1.02x (medians of the rounds' ratios 1.05x, 1.04x); softcap on rung 3 3.04x. The forward in the same run
(unchanged code): identity 1.05x, softcap 1.20x (1.16x in the run before).

Measured on the shared 2-core Intel Xeon (Emerald Rapids, AVX-512, 2 MiB L2 a core) under a load average of
3-9 from other jobs, fp32, B=1, d=64, so wall-clock times are noisy; ratios are from one run:
  * one thread, CPU time, min of 6 interleaved rounds, H=4 (sgemm 2048^2 on one thread 97 GFLOP/s in the
    same run): N=1024 this rung 113 GFLOP/s, torch SDPA's backward 111, rung 3's 73: 0.99x torch's
    time; causal 91 / 70 / 63, 0.77x. N=2048: 111 / 98 / 66, 0.88x; causal 109 / 92 / 70, 0.84x.
    N=4096 (H=2, an earlier build): 1.01x, causal 0.99x. Rung 3's backward takes 1.4-1.7x this rung's time.
  * benchmarks/cpu_backward.py (2 threads, the public call, N 1024-8192, load average 2-5 during the run,
    sgemm disturbed to 59 GFLOP/s; the coordinator re-measures on a quiet machine), time / torch SDPA's
    backward time (median): 0.88, 0.86, 1.09, 0.87 at N=1024, 2048, 4096, 8192; causal 0.85, 0.80, 0.90,
    1.13. Speed-up over numpy-standard 3.9, 4.8, 4.3 (causal 2.9, 14, 13); rung 3's backward 1.1-1.8x
    this rung's time. Extra memory at N=16384 (H=8): 157 MiB (analytic 194: D, lse', the panels, 2
    copies of dQ).
  * where the time goes at N=1024 (H=8, one thread): the kernel ~93%, the packing 3.5 ms, the dQ sum
    0.5 ms; validation (the NaN scan of six arrays, in attention_backward) 2 ms more.
  * tried: the three products as one compiled call instead of inlined copies (6% slower, no compile time
    saved); the body of the parallel loop as its own function (`key_block`): compile 37-44 s -> 27 s of
    CPU, same speed; causal and window masks as scalar stores through a scratch tile (the forward's way)
    -> in registers (`between`); a custom mask still goes through memory; Q, dO and K read in place
    where their rows need no padding (3 of 7 packed copies saved: packing 4.1 -> 3.5 ms at N=1024).
    Block sizes 64-256 x 64-256 within the noise (80-100 GFLOP/s non-causal at N=2048, one thread);
    128 x 128 kept. Not tried: the two-pass variant (rung 3's header: slower there).
  * compile: about 27 s of CPU per dtype on first use (then from Numba's disk cache).

Measured 2026-12-02 on a shared 2-core AMD EPYC (znver5, AVX-512 with full-width FMAs, 2 MiB L2 a core;
2-thread sgemm 4096^2 415 GFLOP/s when quiet, twice the Xeon's), fp32, B=1, H=8, d=64:
  * before this session's steps (benchmarks/cpu_backward.py, load average 0.3-1.5): time / torch SDPA's
    backward 0.47, 0.57, 0.49, 0.45 at N=1024, 2048, 4096, 8192 (causal 0.41, 0.44, 0.40, 0.49): the
    goal of <= 1.0x met on this machine; share of sgemm 78%, 69%, 81%, 84% (causal 62%, 72%, 89%, 71%).
  * where the time went (the parts timed one by one, medians of 7, load 0.4): the kernel alone ran at
    386-389 GFLOP/s non-causal (93% of sgemm) and 352-366 causal, but a whole call took up to twice the
    kernel's time: N=1024 29.7 ms against 13.8 (packing 0.9, dQ sum 0.2, validation 0.4). The rest was
    page faults: 4400 a call (17 MiB of fresh scratch and gradients, at 1.8 us a 4 KiB fault, measured
    here: NumPy asks for huge pages only from 4 MiB, 90 us a MiB). How many depends on what glibc's
    malloc kept from earlier calls, so the same call took 16.6 ms in the benchmark and 30 ms in a
    script. Under load (another process on a core) each parallel region cost about 8 ms (a wake-up of
    the descheduled thread): packing Q, packing K, the kernel and the dQ sum were four.
  * steps: the scratch kept between calls and the dQ copies zeroed inside the packing pass (faults 4400
    -> about 1000 a call, the gradients'); the two packing passes as one (`pack`); the kernel's tasks
    from a shared counter, one dQ copy per worker (a descheduled worker no longer holds half the tasks);
    dQ, dK, dV as views of one allocation (`_new_grads`: 6 MiB at N=1024, in huge pages).
  * after them, parts (load 1.1-1.3): N=1024 a call 17.9 ms (kernel 15.2, packing 1.3, dQ sum 0.7), no
    fault left; N=2048 57.3 ms (53.3, 2.5, 0.9). benchmarks/cpu_backward.py with the first three steps,
    load 1.2-1.6, sgemm 416: time / torch's 0.53, 0.42, 0.43, 0.42 (causal 0.40, 0.44, 0.43, 0.47), share
    of sgemm 75%, 88%, 82%, 85% (causal 66%, 71%, 81%, 75%). With all four, two runs under load averages
    of 2-4 (other sessions' jobs; sgemm of those runs 209 and 182): time / torch's 0.44-0.57 in every
    cell, causal 0.28-0.50 (benchmarks/results/cpu-backward-amd-epyc-znver5-2c.json is the first run);
    their sgemm shares (27-86%) say more about the load than the kernel: a quiet run is still to do.
  * what is left for the sgemm share (>= 85%): causal (the diagonal tiles' masked panels: the kernel
    alone 352-366 GFLOP/s causal against 386-389), the packing (2% of a call at N=4096, 4% causal: scalar
    transposes; Q and dO could be broadcast from their rows, the scale folded into P's FMA) and N=1024,
    where the fixed costs (packing, the dQ sum, validation) are 10-15% of the call.

Measured 2026-12-02 on a 2-core AMD EPYC (znver3: AVX2 only, 16 ymm registers; 2-thread sgemm 4096^2 126-135
GFLOP/s), fp32, B=1, d=64: the 8-row micro-tile of the AVX-512 build spilled there (16 accumulators, 2 operands
and a broadcast in 16 registers), and benchmarks/cpu_backward.py gave time / torch SDPA's backward 1.60 at
N=2048 (causal 1.60; load average 0.4-1). With MR = 4 on 32-byte registers (8 accumulators), the two builds in
one process, fastest of 5 interleaved rounds, the same gradients bit for bit: N=2048 H=4 one thread (CPU time)
321.7 -> 218.7 ms (causal 205.5 -> 101.5), N=2048 H=8 both cores 398.2 -> 221.7 ms (97 GFLOP/s counting 2.5x
the forward; causal 229.7 -> 135.1). Then benchmarks/cpu_backward.py twice: at 46f0636 (load average 1.2-2.3,
sgemm 134.7) time / torch's 0.98, 0.99, 0.87, 1.11 at N=1024, 2048, 4096, 8192, causal 0.76, 0.58, 1.56 (an
outlier: 469-535 ms alone minutes later), 0.92; again at fa970bf on a quieter machine (benchmarks/results/cpu-
backward-amd-epyc-znver3-2c.json, sgemm 188.6, medians within 1-6% of the fastest runs): 1.04, 1.02, 0.98, 0.97,
causal 0.79, 0.81, 0.84, 1.06; 66-73% of that sgemm; speed-up over numpy-standard 3.3, 2.2, 2.5 at N=1024-4096 (causal 5.5, 4.6, 5.6).
Step of 2026-12-03 (same znver3 machine): the micro-kernel alone (S's 4 x 16 against the forward's 6 x 16, one
thread, 200 passes over a 128 x 128 tile at d=64) ran at 76-80 against 83-96 GFLOP/s: 8 accumulators are just
the 2 FMA pipes x 4 cycles of latency Zen 3 needs in flight, 12 leave slack. So MR = 6 query rows (S, dP, dQ:
Br 128 -> 126) and MK = 6 keys (dK, dV: Bc to whole multiples of lcm(16, 6) = 48, 128 -> 144). The two builds
in one process, fastest of 3-5 interleaved calls, H=8, d=64, both cores, gradients within 1.2e-6 of each other:
MR = 6 alone (MK = 4) 0.88x the time at N=1024, 0.96-0.99x at N 2048-4096; with MK = 6 too 0.82x (N=1024),
0.78x (4096), causal 0.93x (4096) and 0.85x (8192). Bc = 96 / 144 / 192 at N=2048: 173 / 161 / 181 ms
(causal 94 / 95 / 89); 144 kept. Then benchmarks/cpu_backward.py at 0fc5d28 (benchmarks/results/cpu-backward-amd-
epyc-znver3-2c.json; the run before it is -history1.json; this VM ran slower that hour: sgemm 141.7 against 188.6,
load average 1.2-1.9): time / torch SDPA's backward (median) 0.83, 0.92, 0.73, 0.88 at N=1024, 2048, 4096, 8192,
causal 0.76, 0.82, 0.79, 0.97 (from each one's fastest run: 0.88, 0.94, 0.94, 0.87; causal 0.73, 0.83, 0.82,
0.95): issue 10's <= 1.0x in every cell; 92%, 78%, 85%, 83% of that run's sgemm (causal 60-83%); speed-up over
numpy-standard 4.5, 2.6, 2.7 (causal 5.2, 5.1, 5.4): 3x is not reached at N=2048 and 4096.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange
from numba.core.extending import intrinsic

from flashkit.cpu import threads
from flashkit.cpu.common import NEG, PARTIAL, SKIP, _NO_MASK, default_block_size, row_window, task_index, tile_map
from flashkit.cpu.vec import VECTOR_BYTES, Vec, address, bcast, exp2, fetch_add, fma, hsum, lanes, load, splat, store, vmin

BLOCKS = (128, 128)  # preferred (Br, Bc) before the L2 rule
# Query rows of a micro-tile (S, dP and dQ: MR) and keys of one (dK and dV: MK): 8 x 2 registers = 16
# accumulators of AVX-512's 32 zmm. With AVX2's 16 ymm, 8 rows spilled; MR = 6 (12 accumulators, 2 of K or V,
# 1 broadcast: 15, as the forward rung) and MK = 6 (BcP is then a multiple of lcm(NR, MK): 48 keys in float32, whole key
# panels and whole key groups). Rows 4-7 of the code below exist where the constant says (LLVM drops the others).
MR = 8 if VECTOR_BYTES == 64 else 6
MK = 8 if VECTOR_BYTES == 64 else 6
LOG2E = 1.4426950408889634
NO_KEY = 1e30  # lse' of a row that saw no key (and of padding rows): 2^(S' - 1e30) = 0
CAP = 64.0  # S' - lse' is <= 0 for the forward's lse; a wrong lse is capped so P stays finite and fails the check


@intrinsic
def between(typingctx, a, keys, lo, hi, neg):
    """a where lo <= keys < hi, else neg, lane by lane (two compares into mask registers, one blend)."""
    if not (isinstance(a, Vec) and a == keys == lo == hi == neg):
        return None

    def codegen(context, builder, sig, args):
        x, k, lo_, hi_, n = args
        inside = builder.and_(builder.fcmp_ordered(">=", k, lo_), builder.fcmp_ordered("<", k, hi_))
        return builder.select(inside, x, n)

    return a(a, keys, lo, hi, neg), codegen


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def pack(Q, dO, O, lse, sc, K, V, Br, BrP, Bc, BcP, Dp, q_rows, k_rows, QP, dOP, QR, dOR, L2, Dr, dQp, psum, KT, VT, KR):
    """Everything the kernel reads packed, in one parallel pass (each parallel region costs a wake-up of
    the other thread: about 8 ms when another process holds a core, measured): the tasks are the query
    blocks of every head (pack_query_block) then the key blocks of every K/V head (pack_key_block)."""
    B, Hq, Nq = Q.shape[0], Q.shape[1], Q.shape[2]
    Hkv, Nk = K.shape[1], K.shape[2]
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    n_q = B * Hq * Tr
    for u in prange(n_q + B * Hkv * Tc):
        if u < n_q:
            pack_query_block(u // (Hq * Tr), (u // Tr) % Hq, u % Tr, Q, dO, O, lse, sc, Br, BrP, Dp, q_rows, QP, dOP,
                             QR, dOR, L2, Dr, dQp, psum)
        else:
            v = u - n_q
            pack_key_block(v // (Hkv * Tc), (v // Tc) % Hkv, v % Tc, K, V, Bc, BcP, Dp, k_rows, KT, VT, KR)


@njit(cache=True)
def pack_query_block(b, h, i, Q, dO, O, lse, sc, Br, BrP, Dp, rows, QP, dOP, QR, dOR, L2, Dr, dQp, psum):
    """Query block i of head h, in the padded row order r = i * BrP + row (rows past the block or
    the sequence: zeros, lse' = NO_KEY):
      QP, dOP  Q * sc and dO in panels of MR rows, d x MR: index ((i * BrP/MR + row/MR) * d + k) * MR + row % MR
      QR, dOR  Q and dO as rows of Dp values: index r * Dp + k (only with rows=True: where BrP = Br and
               Dp = d they are Q and dO themselves, and the caller passes those instead)
      L2, Dr   lse' = lse log2(e) (NO_KEY where lse = -inf), D = rowsum(dO * O) (Algorithm 2, line 4)
      dQp, psum  this block's rows of every worker's dQ copy and row sums set to 0 (buffers kept from the
               previous call: zeroed here, in parallel and in the order the kernel reads them)."""
    N, d = Q.shape[2], Q.shape[3]
    s = Q.dtype.type(sc)
    zero = Q.dtype.type(0)
    qp, dop, qr, dor, l2, dr = QP[b, h], dOP[b, h], QR[b, h], dOR[b, h], L2[b, h], Dr[b, h]
    n_rows = min(Br, N - i * Br)
    for c in range(dQp.shape[0]):
        dQp[c, b, h, i * BrP * Dp:(i + 1) * BrP * Dp] = zero
        psum[c, b, h, i * Br:i * Br + n_rows] = zero
    for rr in range(BrP):  # rows: the padded row layout, D and lse'
        row = i * Br + rr
        rb = (i * BrP + rr) * Dp
        acc = zero
        if rr < n_rows:
            for k in range(d):
                acc += dO[b, h, row, k] * O[b, h, row, k]
            l2[i * BrP + rr] = lse[b, h, row] * LOG2E if lse[b, h, row] != -np.inf else NO_KEY
        else:
            l2[i * BrP + rr] = NO_KEY
        if rows and rr < n_rows:
            for k in range(d):
                qr[rb + k] = Q[b, h, row, k]
                dor[rb + k] = dO[b, h, row, k]
            qr[rb + d:rb + Dp] = zero
            dor[rb + d:rb + Dp] = zero
        elif rows:
            qr[rb:rb + Dp] = zero
            dor[rb:rb + Dp] = zero
        dr[i * BrP + rr] = acc
    for rp in range(BrP // MR):  # panels: d x MR, written in order
        base = (i * BrP // MR + rp) * d * MR
        for k in range(d):
            for c in range(MR):
                rr = rp * MR + c
                ok = rr < n_rows
                qp[base + k * MR + c] = Q[b, h, i * Br + rr, k] * s if ok else zero
                dop[base + k * MR + c] = dO[b, h, i * Br + rr, k] if ok else zero


@njit(cache=True)
def pack_key_block(b, h, j, K, V, Bc, BcP, Dp, rows, KT, VT, KR):
    """Key block j of K/V head h (keys past the block or the sequence: zeros):
      KT, VT  K^T and V^T in panels of NR = 2W keys, d x NR: index ((j * BcP/NR + c/NR) * d + k) * NR + c % NR
      KR      K as rows of Dp values: index (j * BcP + c) * Dp + k (only with rows=True: where BcP = Bc,
              Dp = d and Nk is whole panels, it is K itself, and the caller passes K instead)"""
    N, d = K.shape[2], K.shape[3]
    NR = 2 * lanes(KT[0, 0])
    zero = K.dtype.type(0)
    kt, vt, kr = KT[b, h], VT[b, h], KR[b, h]
    n_keys = min(Bc, N - j * Bc)
    for cc in range(BcP if rows else 0):
        rb = (j * BcP + cc) * Dp
        if cc < n_keys:
            for k in range(d):
                kr[rb + k] = K[b, h, j * Bc + cc, k]
            kr[rb + d:rb + Dp] = zero
        else:
            kr[rb:rb + Dp] = zero
    for p in range(BcP // NR):
        base = (j * BcP // NR + p) * d * NR
        for k in range(d):
            for c in range(NR):
                cc = p * NR + c
                ok = cc < n_keys
                kt[base + k * NR + c] = K[b, h, j * Bc + cc, k] if ok else zero
                vt[base + k * NR + c] = V[b, h, j * Bc + cc, k] if ok else zero


@njit(parallel=True, cache=True)
def finish_dq(dQp, scale, Br, BrP, Dp, dQ):
    """dQ = scale * (the sum of the threads' copies), without the padding."""
    n, B, H = dQp.shape[0], dQp.shape[1], dQp.shape[2]
    N, d = dQ.shape[2], dQ.shape[3]
    s = dQ.dtype.type(scale)
    for u in prange(B * H):
        b, h = u // H, u % H
        for q in range(N):
            base = ((q // Br) * BrP + q % Br) * Dp
            for k in range(d):
                acc = dQp[0, b, h, base + k]
                for c in range(1, n):
                    acc += dQp[c, b, h, base + k]
                dQ[b, h, q, k] = acc * s


# ---------------------------------------------------------------------------------------------
# The micro-kernel: rows x 2 registers (rows = MR or MK), C += sum over steps of (rows broadcasts of A) x (2 registers of B)
# ---------------------------------------------------------------------------------------------
@njit(inline="always")
def micro(A, a0, a_step, a_x, Bm, b0, b_step, n, W, acc, rows):
    """acc (16 registers: rows x = 0..rows-1, 2 each; the others pass through) + sum_s A[a0 + s a_step + x a_x] *
    Bm[b0 + s b_step + (0, W)]. rows (4, 6 or 8: MR or MK) is a constant where it is called: LLVM drops the
    rows past it."""
    a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51, a60, a61, a70, a71 = acc
    for s in range(n):
        bb = b0 + s * b_step
        v0 = load(Bm, bb)
        v1 = load(Bm, bb + W)
        ab = a0 + s * a_step
        x = bcast(A, ab)
        a00 = fma(x, v0, a00)
        a01 = fma(x, v1, a01)
        x = bcast(A, ab + a_x)
        a10 = fma(x, v0, a10)
        a11 = fma(x, v1, a11)
        x = bcast(A, ab + 2 * a_x)
        a20 = fma(x, v0, a20)
        a21 = fma(x, v1, a21)
        x = bcast(A, ab + 3 * a_x)
        a30 = fma(x, v0, a30)
        a31 = fma(x, v1, a31)
        if rows > 4:
            x = bcast(A, ab + 4 * a_x)
            a40 = fma(x, v0, a40)
            a41 = fma(x, v1, a41)
            x = bcast(A, ab + 5 * a_x)
            a50 = fma(x, v0, a50)
            a51 = fma(x, v1, a51)
        if rows > 6:
            x = bcast(A, ab + 6 * a_x)
            a60 = fma(x, v0, a60)
            a61 = fma(x, v1, a61)
            x = bcast(A, ab + 7 * a_x)
            a70 = fma(x, v0, a70)
            a71 = fma(x, v1, a71)
    return (a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51, a60, a61, a70, a71)


@njit(inline="always")
def zeros16(z):
    return (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)


@njit(inline="always")
def load16(C, c0, c_x, W, rows):
    """The 16 registers of rows c0 + x c_x (x = 0..7), 2 registers each; rows past `rows` zero (not read)."""
    if rows > 6:
        return (load(C, c0), load(C, c0 + W), load(C, c0 + c_x), load(C, c0 + c_x + W),
                load(C, c0 + 2 * c_x), load(C, c0 + 2 * c_x + W), load(C, c0 + 3 * c_x), load(C, c0 + 3 * c_x + W),
                load(C, c0 + 4 * c_x), load(C, c0 + 4 * c_x + W), load(C, c0 + 5 * c_x), load(C, c0 + 5 * c_x + W),
                load(C, c0 + 6 * c_x), load(C, c0 + 6 * c_x + W), load(C, c0 + 7 * c_x), load(C, c0 + 7 * c_x + W))
    z = splat(C.dtype.type(0))
    if rows > 4:
        return (load(C, c0), load(C, c0 + W), load(C, c0 + c_x), load(C, c0 + c_x + W),
                load(C, c0 + 2 * c_x), load(C, c0 + 2 * c_x + W), load(C, c0 + 3 * c_x), load(C, c0 + 3 * c_x + W),
                load(C, c0 + 4 * c_x), load(C, c0 + 4 * c_x + W), load(C, c0 + 5 * c_x), load(C, c0 + 5 * c_x + W),
                z, z, z, z)
    return (load(C, c0), load(C, c0 + W), load(C, c0 + c_x), load(C, c0 + c_x + W),
            load(C, c0 + 2 * c_x), load(C, c0 + 2 * c_x + W), load(C, c0 + 3 * c_x), load(C, c0 + 3 * c_x + W),
            z, z, z, z, z, z, z, z)


@njit(inline="always")
def store16(C, c0, c_x, W, acc, rows):
    store(C, c0, acc[0])
    store(C, c0 + W, acc[1])
    store(C, c0 + c_x, acc[2])
    store(C, c0 + c_x + W, acc[3])
    store(C, c0 + 2 * c_x, acc[4])
    store(C, c0 + 2 * c_x + W, acc[5])
    store(C, c0 + 3 * c_x, acc[6])
    store(C, c0 + 3 * c_x + W, acc[7])
    if rows > 4:
        store(C, c0 + 4 * c_x, acc[8])
        store(C, c0 + 4 * c_x + W, acc[9])
        store(C, c0 + 5 * c_x, acc[10])
        store(C, c0 + 5 * c_x + W, acc[11])
    if rows > 6:
        store(C, c0 + 6 * c_x, acc[12])
        store(C, c0 + 6 * c_x + W, acc[13])
        store(C, c0 + 7 * c_x, acc[14])
        store(C, c0 + 7 * c_x + W, acc[15])


@njit(inline="always")
def product(A, a0, a_step, a_x, Bm, b0, b_step, n, W, C, c0, c_x, rows):
    """C[rows c0 + x c_x (x < rows), 2 registers] += the micro-kernel's sum: one read-modify-write of the
    accumulators."""
    store16(C, c0, c_x, W, micro(A, a0, a_step, a_x, Bm, b0, b_step, n, W, load16(C, c0, c_x, W, rows), rows), rows)


# ---------------------------------------------------------------------------------------------
# P and dS of one row of a micro-tile, in registers
# ---------------------------------------------------------------------------------------------
@njit(inline="always")
def p_row(s0, s1, l2, cap, Pb, pb, lv, lb):
    """P = 2^(min(S' - lse', cap)) of one row (2 registers), stored at Pb[pb], added to the row sum lv[lb]."""
    p0 = exp2(vmin(s0 - l2, cap))
    p1 = exp2(vmin(s1 - l2, cap))
    store(Pb, pb, p0)
    store(Pb, pb + lanes(Pb), p1)
    store(lv, lb, load(lv, lb) + (p0 + p1))


@njit(inline="always")
def ds_row(g0, g1, D_r, Pb, pb, dSb):
    """dS = P * (dP - D) of one row (2 registers of dP), P read back from Pb[pb], stored at dSb[pb]."""
    W = lanes(Pb)
    store(dSb, pb, load(Pb, pb) * (g0 - D_r))
    store(dSb, pb + W, load(Pb, pb + W) * (g1 - D_r))


@intrinsic
def zero_where_zero(typingctx, p, g):
    """g where p != 0, else 0, lane by lane: no gradient flows where P = 0, even if f'(s) is infinite there."""
    if not (isinstance(p, Vec) and p == g):
        return None

    def codegen(context, builder, sig, args):
        pv, gv = args
        zero = context.get_constant_null(sig.args[0])
        return builder.select(builder.fcmp_unordered("!=", pv, zero), gv, zero)

    return g(p, g), codegen


@njit(inline="always")
def ds_row_grad(g0, g1, D_r, Pb, pb, dSb, Fb, fb):
    """ds_row with a score_mod f: dS = P * (dP - D) * f'(s), f'(s) read from Fb[fb] (the hook's), 0 where P = 0."""
    W = lanes(Pb)
    p0, p1 = load(Pb, pb), load(Pb, pb + W)
    store(dSb, pb, zero_where_zero(p0, p0 * (g0 - D_r) * load(Fb, fb)))
    store(dSb, pb + W, zero_where_zero(p1, p1 * (g1 - D_r) * load(Fb, fb + W)))


@njit(cache=True)
def mask_tile(Sb, W, q0, key0, nr_left, nc_left, Nq, Nk, left, right, mask, has_mask, xb, xh):
    """Scores of the scratch micro-tile Sb (MR rows x 2W) that are hidden (window, custom mask, keys past
    the tile or the sequence) become NEG, so P = 0 there. Not inlined: only the masked tiles pay for it."""
    NR = 2 * W
    neg = Sb.dtype.type(NEG)
    for r in range(MR):
        q = q0 + r
        if r >= nr_left:
            continue  # a padding row: lse' = NO_KEY already gives P = 0
        lo, hi = row_window(q, Nq, Nk, left, right)
        for c in range(NR):
            key = key0 + c
            if c >= nc_left or key < lo or key >= hi or (has_mask and not mask[xb, xh, q, key]):
                Sb[r * NR + c] = neg


@njit(inline="always")
def window_row(s0, s1, iota, key0, q, Nq, Nk, left, right, key_end):
    """The 2 registers of row q (keys key0 .. key0 + 2W) with the keys outside its window, or at or past
    key_end (the block's end), set to NEG: branch-free, for causal and sliding-window tiles. iota holds
    0, 1, .. 2W - 1 in the dtype (keys compared as floats: exact below 2^24)."""
    dt = iota.dtype.type
    W = lanes(iota)
    k = splat(dt(key0))
    lo, hi = row_window(q, Nq, Nk, left, right)
    lo_v, hi_v, neg_v = splat(dt(lo)), splat(dt(min(hi, key_end))), splat(dt(NEG))
    return between(s0, k + load(iota, 0), lo_v, hi_v, neg_v), between(s1, k + load(iota, W), lo_v, hi_v, neg_v)


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def backward_kernel(iota, QP, dOP, QR, dOR, KT, VT, KR, lse2, Dr, Nq, Nk, d, group, left, right, mask, has_mask,
                    bmap, Br, BrP, Bc, BcP, Dp, scale, dK, dV, dQp, psum, mod_tile=None, mod_every_tile=False,
                    errors=None):
    """Tasks (b, K/V head hk, key block j): `key_block` each, taken by dQp.shape[0] workers from a shared
    counter (vec.fetch_add, the forward rung's task queue) rather than prange's static split: on a machine
    shared with other work a descheduled worker no longer holds back half of the tasks, and causal tasks
    of unequal size balance themselves. Worker w adds into dQp[w]. The parallel loop is kept this small
    because Numba's parfor passes are slow on a large body (the compile time halves).
    mod_tile: FlexAttention's hooks (flashkit/cpu/mods_jit.py, mod_micro_tile_backward: a function pointer),
    called on the micro-tiles of PARTIAL tiles, of every tile with mod_every_tile (a score_mod, whose
    derivative it also gives); errors[t] = (code, b, h, i, j) of task t's first tile where it failed. None:
    the branch is not compiled (the plain rung)."""
    B, Hkv = KT.shape[0], KT.shape[1]
    Tc = (Nk + Bc - 1) // Bc
    n_tasks = B * Hkv * Tc
    next_task = np.zeros(1, np.int64)
    for w in prange(dQp.shape[0]):
        t = fetch_add(next_task, 1)
        while t < n_tasks:
            b, hk, j = task_index(t, Hkv, Tc)
            key_block(b, hk, j, w, iota, QP, dOP, QR, dOR, KT, VT, KR, lse2, Dr, Nq, Nk, d, group, left, right, mask,
                      has_mask, bmap, Br, BrP, Bc, BcP, Dp, scale, dK, dV, dQp, psum, mod_tile, mod_every_tile, errors,
                      t)
            t = fetch_add(next_task, 1)


@njit(cache=True)
def key_block(b, hk, j, w, iota, QP, dOP, QR, dOR, KT, VT, KR, lse2, Dr, Nq, Nk, d, group, left, right, mask, has_mask,
              bmap, Br, BrP, Bc, BcP, Dp, scale, dK, dV, dQp, psum, mod_tile=None, mod_every_tile=False, errors=None,
              t=0):
    """One task: dK_j, dV_j (dK times scale) over the query heads of K/V head hk's group and every query
    block i; dS K_j into dQp[w] (worker w's copy of dQ); rowsum(P) into psum[w]."""
    dt = QP.dtype.type
    W = lanes(KT[0, 0])
    NR = 2 * W
    Tr = (Nq + Br - 1) // Br
    n_rp = BrP // MR
    n_kp = BcP // NR
    cap = splat(dt(CAP))
    zero = splat(dt(0))
    j0 = j * Bc
    nc = min(Bc, Nk - j0)
    np_j = (nc + NR - 1) // NR  # key panels holding keys of this block
    n_keys = np_j * NR
    n_ko = (nc + MK - 1) // MK  # key groups (MK keys) for dK and dV
    Kt, Vt, Kr = KT[b, hk], VT[b, hk], KR[b, hk]
    dKa = np.zeros(BcP * Dp, QP.dtype)
    dVa = np.zeros(BcP * Dp, QP.dtype)
    Pb = np.zeros(BrP * BcP, QP.dtype)  # P of the tile, rows of BcP keys
    dSb = np.zeros(BrP * BcP, QP.dtype)
    Sb = np.empty(MR * NR, QP.dtype)
    lv = np.empty(MR * W, QP.dtype)
    if mod_tile is not None:
        Fb = np.zeros(MR * NR, QP.dtype)  # f'(s) of the micro-tile, from the hook (with a score_mod)
        task_ctx = np.empty(7, np.int64)  # for mod_tile: what is constant during a head
    for h in range(hk * group, (hk + 1) * group):
        mb = b if bmap.shape[0] > 1 else 0
        mh = h if bmap.shape[1] > 1 else 0
        xb = b if mask.shape[0] > 1 else 0
        xh = h if mask.shape[1] > 1 else 0
        if mod_tile is not None:
            task_ctx[0], task_ctx[1], task_ctx[2], task_ctx[3] = b, h, Nq, Nk
            task_ctx[4], task_ctx[5], task_ctx[6] = left, right, has_mask
            mask_plane = address(mask, (xb * mask.shape[1] + xh) * Nq * Nk if has_mask else 0)
            if errors[t, 0] != -1:
                break  # a mod raised: the call raises it from Python (rung3_gemm_backward._explain)
        Qp, dOp, Qr, dOr, L2, Dh, dQh = QP[b, h], dOP[b, h], QR[b, h], dOR[b, h], lse2[b, h], Dr[b, h], dQp[w, b, h]
        for i in range(Tr):
            state = bmap[mb, mh, i, j]
            if state == SKIP:
                continue
            i0 = i * Br
            nr = min(Br, Nq - i0)
            for rp in range((nr + MR - 1) // MR):
                row0 = rp * MR
                qb = (i * n_rp + rp) * d * MR
                rb = i * BrP + row0  # this panel's rows in the padded row arrays
                for x in range(MR):
                    store(lv, x * W, zero)
                q_first, q_last = i0 + row0, i0 + min(row0 + MR, nr) - 1
                lo_first, hi_first = row_window(q_first, Nq, Nk, left, right)
                lo_last, hi_last = row_window(q_last, Nq, Nk, left, right)
                for p in range(np_j):
                    col = p * NR
                    key0, key1 = j0 + col, j0 + min(col + NR, nc)
                    must_mask = col + NR > nc
                    if state == PARTIAL:
                        if key1 <= lo_first or key0 >= hi_last:
                            # no row of the panel sees a key of it: P = dS = 0, nothing computed
                            for x in range(MR):
                                for c in range(0, NR, W):
                                    store(Pb, (row0 + x) * BcP + col + c, zero)
                                    store(dSb, (row0 + x) * BcP + col + c, zero)
                            continue
                        must_mask = must_mask or has_mask or key0 < lo_last or key1 > hi_first
                    kb = (j * n_kp + p) * d * NR
                    # ---- S' = Q_i' K_j^T on MR rows x NR keys, then P = 2^(S' - lse') in registers
                    a = micro(Qp, qb, MR, 1, Kt, kb, NR, d, W, zeros16(zero), MR)
                    if mod_tile is not None and (mod_every_tile or state == PARTIAL):
                        # the mods on the micro-tile in Sb (pointers, not arrays: see rung4_fused.forward_kernel)
                        store16(Sb, 0, NR, W, a, MR)
                        code = mod_tile(address(Sb, 0), address(Fb, 0), np.int64(i0 + row0), np.int64(key0),
                                        np.int64(nr - row0), np.int64(nc - col), state == PARTIAL,
                                        address(task_ctx, 0), mask_plane)
                        if code != -1 and errors[t, 0] == -1:
                            errors[t, 0], errors[t, 1], errors[t, 2], errors[t, 3], errors[t, 4] = code, b, h, i, j
                        a = load16(Sb, 0, NR, W, MR)
                    if must_mask and has_mask:
                        store16(Sb, 0, NR, W, a, MR)
                        mask_tile(Sb, W, i0 + row0, key0, nr - row0, nc - col, Nq, Nk, left, right, mask,
                                  has_mask, xb, xh)
                        a = load16(Sb, 0, NR, W, MR)
                    elif must_mask:  # a window boundary or the block's end crosses the panel: in registers
                        q = i0 + row0
                        a00, a01 = window_row(a[0], a[1], iota, key0, q, Nq, Nk, left, right, j0 + nc)
                        a10, a11 = window_row(a[2], a[3], iota, key0, q + 1, Nq, Nk, left, right, j0 + nc)
                        a20, a21 = window_row(a[4], a[5], iota, key0, q + 2, Nq, Nk, left, right, j0 + nc)
                        a30, a31 = window_row(a[6], a[7], iota, key0, q + 3, Nq, Nk, left, right, j0 + nc)
                        a40, a41, a50, a51, a60, a61, a70, a71 = a[8:]
                        if MR > 4:
                            a40, a41 = window_row(a[8], a[9], iota, key0, q + 4, Nq, Nk, left, right, j0 + nc)
                            a50, a51 = window_row(a[10], a[11], iota, key0, q + 5, Nq, Nk, left, right, j0 + nc)
                        if MR > 6:
                            a60, a61 = window_row(a[12], a[13], iota, key0, q + 6, Nq, Nk, left, right, j0 + nc)
                            a70, a71 = window_row(a[14], a[15], iota, key0, q + 7, Nq, Nk, left, right, j0 + nc)
                        a = (a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51, a60, a61, a70, a71)
                    pb = row0 * BcP + col
                    p_row(a[0], a[1], splat(L2[rb]), cap, Pb, pb, lv, 0)
                    p_row(a[2], a[3], splat(L2[rb + 1]), cap, Pb, pb + BcP, lv, W)
                    p_row(a[4], a[5], splat(L2[rb + 2]), cap, Pb, pb + 2 * BcP, lv, 2 * W)
                    p_row(a[6], a[7], splat(L2[rb + 3]), cap, Pb, pb + 3 * BcP, lv, 3 * W)
                    if MR > 4:
                        p_row(a[8], a[9], splat(L2[rb + 4]), cap, Pb, pb + 4 * BcP, lv, 4 * W)
                        p_row(a[10], a[11], splat(L2[rb + 5]), cap, Pb, pb + 5 * BcP, lv, 5 * W)
                    if MR > 6:
                        p_row(a[12], a[13], splat(L2[rb + 6]), cap, Pb, pb + 6 * BcP, lv, 6 * W)
                        p_row(a[14], a[15], splat(L2[rb + 7]), cap, Pb, pb + 7 * BcP, lv, 7 * W)
                    # ---- dP = dO_i V_j^T on the same micro-tile, then dS = P * (dP - D)
                    g = micro(dOp, qb, MR, 1, Vt, kb, NR, d, W, zeros16(zero), MR)
                    if mod_tile is not None and mod_every_tile:  # a score_mod: times f'(s)
                        ds_row_grad(g[0], g[1], splat(Dh[rb]), Pb, pb, dSb, Fb, 0)
                        ds_row_grad(g[2], g[3], splat(Dh[rb + 1]), Pb, pb + BcP, dSb, Fb, NR)
                        ds_row_grad(g[4], g[5], splat(Dh[rb + 2]), Pb, pb + 2 * BcP, dSb, Fb, 2 * NR)
                        ds_row_grad(g[6], g[7], splat(Dh[rb + 3]), Pb, pb + 3 * BcP, dSb, Fb, 3 * NR)
                        if MR > 4:
                            ds_row_grad(g[8], g[9], splat(Dh[rb + 4]), Pb, pb + 4 * BcP, dSb, Fb, 4 * NR)
                            ds_row_grad(g[10], g[11], splat(Dh[rb + 5]), Pb, pb + 5 * BcP, dSb, Fb, 5 * NR)
                        if MR > 6:
                            ds_row_grad(g[12], g[13], splat(Dh[rb + 6]), Pb, pb + 6 * BcP, dSb, Fb, 6 * NR)
                            ds_row_grad(g[14], g[15], splat(Dh[rb + 7]), Pb, pb + 7 * BcP, dSb, Fb, 7 * NR)
                        continue
                    ds_row(g[0], g[1], splat(Dh[rb]), Pb, pb, dSb)
                    ds_row(g[2], g[3], splat(Dh[rb + 1]), Pb, pb + BcP, dSb)
                    ds_row(g[4], g[5], splat(Dh[rb + 2]), Pb, pb + 2 * BcP, dSb)
                    ds_row(g[6], g[7], splat(Dh[rb + 3]), Pb, pb + 3 * BcP, dSb)
                    if MR > 4:
                        ds_row(g[8], g[9], splat(Dh[rb + 4]), Pb, pb + 4 * BcP, dSb)
                        ds_row(g[10], g[11], splat(Dh[rb + 5]), Pb, pb + 5 * BcP, dSb)
                    if MR > 6:
                        ds_row(g[12], g[13], splat(Dh[rb + 6]), Pb, pb + 6 * BcP, dSb)
                        ds_row(g[14], g[15], splat(Dh[rb + 7]), Pb, pb + 7 * BcP, dSb)
                for x in range(min(MR, nr - row0)):
                    psum[w, b, h, i0 + row0 + x] += hsum(load(lv, x * W))
            # ---- dV_j += P^T dO_i and dK_j += dS^T Q_i: MK keys x 2 registers, nr steps
            ib = i * BrP * Dp
            for ko in range(n_ko):
                for dc in range(0, Dp, NR):
                    product(Pb, ko * MK, BcP, 1, dOr, ib + dc, Dp, nr, W, dVa, ko * MK * Dp + dc, Dp, MK)
                    product(dSb, ko * MK, BcP, 1, Qr, ib + dc, Dp, nr, W, dKa, ko * MK * Dp + dc, Dp, MK)
            # ---- dQ_i += dS K_j: MR rows x 2 registers, n_keys steps, into this thread's copy
            for rp in range((nr + MR - 1) // MR):
                for dc in range(0, Dp, NR):
                    product(dSb, rp * MR * BcP, 1, BcP, Kr, j * BcP * Dp + dc, Dp, n_keys, W, dQh,
                            (i * BrP + rp * MR) * Dp + dc, Dp, MR)
    sc = dt(scale)
    for c in range(nc):
        for k in range(d):
            dK[b, hk, j0 + c, k] = dKa[c * Dp + k] * sc  # dK = scale * sum_i dS_ij^T Q_i
            dV[b, hk, j0 + c, k] = dVa[c * Dp + k]


def blocks(problem, itemsize, W):
    """(Br, BrP, Bc, BcP, Dp): the tile from problem.block_size or the L2 rule, Br padded to whole
    MR-row panels (BrP), Bc to whole multiples of lcm(NR, MK) keys (BcP: key panels of NR = 2W for S and dP,
    groups of MK keys for dK and dV), d to whole pairs of registers (Dp)."""
    NR = 2 * W
    KP = math.lcm(NR, MK)  # BcP holds whole key panels (S, dP) and whole key groups (dK, dV)
    if problem.block_size is not None:
        Br, Bc = (int(x) for x in problem.block_size)
    else:
        Br, Bc = default_block_size(problem.d, itemsize, *BLOCKS)
        Br, Bc = max(MR, Br // MR * MR), max(KP, (Bc + KP // 2) // KP * KP)  # Bc to the nearest whole KP
    Br, Bc = max(1, min(Br, problem.Nq)), max(1, min(Bc, problem.Nk))
    return Br, -(-Br // MR) * MR, Bc, -(-Bc // KP) * KP, -(-problem.d // NR) * NR


def _keys_seen(problem, rows):
    """For the rows (b, h, q) given as index arrays, how many keys each may see (window and mask)."""
    b, h, q = rows
    Nq, Nk = problem.Nq, problem.Nk
    left, right = (int(w) for w in problem.window)
    off = Nk - Nq
    lo = np.zeros_like(q) if left < 0 else np.clip(q + off - left, 0, Nk)
    hi = np.full_like(q, Nk) if right < 0 else np.clip(q + off + right + 1, 0, Nk)
    if problem.has_mods:
        return _keys_seen_with_mods(problem, rows, lo, hi)
    if problem.mask is None:
        return np.maximum(hi - lo, 0)
    m = problem.mask
    cs = np.concatenate([np.zeros(m.shape[:3] + (1,), np.int64), np.cumsum(m, axis=3)], axis=3)
    mb = b if m.shape[0] > 1 else np.zeros_like(b)
    mh = h if m.shape[1] > 1 else np.zeros_like(h)
    return np.where(hi > lo, cs[mb, mh, q, np.maximum(hi, lo)] - cs[mb, mh, q, lo], 0)


def _keys_seen_with_mods(problem, rows, lo, hi):
    """_keys_seen where a mask_mod or score_mod may hide keys too: the rows' scores in float64, hidden by the
    window, mask= and the mods as the kernel hides them (flashkit.blockmask.apply_mods), counted; (b, h) by (b, h)."""
    from flashkit import blockmask

    b, h, q = rows
    keys = np.arange(problem.Nk)
    seen = np.zeros(q.shape, np.int64)
    for bb, hh in sorted(set(zip(b.tolist(), h.tolist()))):
        sel = np.flatnonzero((b == bb) & (h == hh))
        qs = q[sel]
        S = (problem.Q[bb, hh, qs].astype(np.float64) @ problem.K[bb, hh // problem.group].astype(np.float64).T
             * problem.scale)
        S[(keys[None, :] < lo[sel, None]) | (keys[None, :] >= hi[sel, None])] = -np.inf
        if problem.mask is not None:
            m = problem.mask
            S[~m[bb if m.shape[0] > 1 else 0, hh if m.shape[1] > 1 else 0][qs]] = -np.inf
        S = blockmask.apply_mods(S, problem.score_mod, problem.mask_mod, bb, hh, qs[:, None], keys[None, :])
        seen[sel] = (S > -np.inf).sum(axis=1)
    return seen


def _read_only(a):
    """A read-only view: the kernels compile once whether or not the caller's array (a mask, Q, dO, K) is
    writeable."""
    a = a.view()
    a.flags.writeable = False
    return a


# The scratch of the last call (packed panels, D, lse', the threads' dQ copies), reused by the next call of
# the same shapes, as cuDNN's workspace or oneDNN's scratchpad. Why: a fresh page costs a page fault on its
# first write, 1.8 us a 4 KiB page measured on the shared 2-core znver5 machine (450 us a MiB; NumPy asks
# for huge pages only from 4 MiB on: 90 us a MiB there), and a call at N=1024 (H=8, d=64) wrote 17 MiB of
# fresh scratch: about 4400 faults, as long as the kernel itself. Kept only up to KEEP_BYTES (the large
# calls' buffers come in huge pages, and keeping them would hold hundreds of MiB between calls).
KEEP_BYTES = 64 * 2**20
_KEPT = {}


def _scratch(name, shape, dtype):
    """An uninitialised array for `name`: the kept one where its shape and dtype match, else a new one."""
    a = _KEPT.get(name)
    if a is None or a.shape != shape or a.dtype != dtype:
        a = np.empty(shape, dtype)
    return a


def _keep(arrays):
    """Keep this call's scratch (a dict name -> array) for the next call, if it is small enough."""
    _KEPT.clear()
    if sum(a.nbytes for a in arrays.values()) <= KEEP_BYTES:
        _KEPT.update(arrays)


def _new_grads(problem):
    """Fresh (dQ, dK, dV): views of one allocation where they are float32/64 and not poisoned. Why: NumPy asks
    the kernel for huge pages only for arrays of 4 MiB or more, and at N=1024 (H=8, d=64) each gradient is
    2 MiB: 1536 page faults of 4 KiB on their first writes, about 2.7 ms at the 1.8 us a fault measured here,
    against 0.5 ms for the same 6 MiB in huge pages. (The three stay one allocation: a caller that keeps
    only dQ keeps dK's and dV's memory too.)"""
    from flashkit import problem as problem_module

    Q, K, V = problem.Q, problem.K, problem.V
    if problem_module.POISON or not (Q.dtype == K.dtype == V.dtype):
        return problem.new_grads()
    flat = np.empty(Q.size + K.size + V.size, Q.dtype)
    return (flat[:Q.size].reshape(Q.shape), flat[Q.size:Q.size + K.size].reshape(K.shape),
            flat[Q.size + K.size:].reshape(V.shape))


def run(problem):
    """(dQ, dK, dV) of a Problem from validate.check_backward, with or without score_mod / mask_mod /
    block_mask (the mods: mods_jit.micro_tile_backward_function's hook on the micro-tiles, the tiles the
    mask_mod or BlockMask leaves empty skipped)."""
    from flashkit import blockmask, validate
    from flashkit.cpu.vec import VECTOR_BYTES

    Q, K, V, dO, O = (np.ascontiguousarray(x) for x in (problem.Q, problem.K, problem.V, problem.dO, problem.O))
    dtype = Q.dtype
    B, Hq, Nq, d = Q.shape
    Hkv, Nk = K.shape[1], K.shape[2]
    W = VECTOR_BYTES // dtype.itemsize
    NR = 2 * W
    Br, BrP, Bc, BcP, Dp = blocks(problem, dtype.itemsize, W)
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    bmap = tile_map(problem, Br, Bc)
    mod_tile = None
    if problem.has_mods:
        from flashkit.cpu import mods_jit

        bm = blockmask.for_problem(problem, Br, Bc)  # the tiles the mask_mod hides are skipped, its FULL ones unmasked
        if bm is not None:
            bmap = np.ascontiguousarray(np.minimum(bmap, bm.tiles))
        mod_tile = mods_jit.micro_tile_backward_function(problem.score_mod, problem.mask_mod, dtype)
    errors = np.full((B * Hkv * Tc, 5), -1, np.int64)  # (code, b, h, i, j) of a mod that raised (OK = -1)
    has_mask = problem.mask is not None
    mask = _read_only(np.ascontiguousarray(problem.mask, dtype=np.bool_) if has_mask else _NO_MASK)
    left, right = (int(w) for w in problem.window)
    scale = float(problem.scale)
    # S' = Q' K^T with Q' = Q scale log2(e): base 2. A score_mod must see q . k * scale: Q' = Q scale, and the hook
    # gives f(S) log2(e).
    q_scale = scale * (1.0 if problem.score_mod is not None else LOG2E)
    lse = problem.lse
    with threads.for_work(problem.backward_flops()):  # holds the launch lock: the kept scratch is ours
        n_threads = numba.get_num_threads()
        # The streamed operands of dK, dV (Q, dO rows) and dQ (K rows) are the inputs themselves when their
        # rows need no padding: 3 of the 7 packed copies saved (time and memory), read-only either way
        # (one compilation)
        q_rows = not (BrP == Br and Dp == d)
        k_rows = not (BcP == Bc and Dp == d and Nk % NR == 0)
        QP = _scratch("QP", (B, Hq, Tr * BrP * d), dtype)
        dOP = _scratch("dOP", QP.shape, dtype)
        QR = _scratch("QR", (B, Hq, Tr * BrP * Dp if q_rows else 0), dtype)
        dOR = _scratch("dOR", QR.shape, dtype)
        L2 = _scratch("L2", (B, Hq, Tr * BrP), dtype)
        Dr = _scratch("Dr", L2.shape, dtype)
        KT = _scratch("KT", (B, Hkv, Tc * BcP * d), dtype)
        VT = _scratch("VT", KT.shape, dtype)
        KR = _scratch("KR", (B, Hkv, Tc * BcP * Dp if k_rows else 0), dtype)
        n_workers = max(1, min(n_threads, B * Hkv * Tc))  # the kernel's workers, one dQ copy each
        dQp = _scratch("dQp", (n_workers, B, Hq, Tr * BrP * Dp), dtype)  # zeroed by pack
        psum = _scratch("psum", (n_workers, B, Hq, Nq), dtype)  # likewise
        _keep(dict(QP=QP, dOP=dOP, QR=QR, dOR=dOR, L2=L2, Dr=Dr, KT=KT, VT=VT, KR=KR, dQp=dQp, psum=psum))
        pack(Q, dO, O, lse, q_scale, K, V, Br, BrP, Bc, BcP, Dp, q_rows, k_rows, QP, dOP, QR, dOR, L2, Dr, dQp,
             psum, KT, VT, KR)
        QRk = _read_only(QR if q_rows else Q.reshape(B, Hq, Nq * d))
        dORk = _read_only(dOR if q_rows else dO.reshape(B, Hq, Nq * d))
        KRk = _read_only(KR if k_rows else K.reshape(B, Hkv, Nk * d))
        dQ, dK, dV = _new_grads(problem)
        backward_kernel(np.arange(NR, dtype=dtype), QP, dOP, QRk, dORk, KT, VT, KRk, L2, Dr, Nq, Nk, d, Hq // Hkv, left,
                        right, mask, has_mask, bmap, Br, BrP, Bc, BcP, Dp, scale, dK, dV, dQp, psum,
                        *(() if mod_tile is None else (mod_tile, problem.score_mod is not None, errors)))
        finish_dq(dQp, scale, Br, BrP, Dp, dQ)
        rows = psum.sum(axis=0)  # a new array: psum is kept for the next call
    if mod_tile is not None:
        from flashkit.cpu import rung3_gemm_backward

        rung3_gemm_backward._explain(problem, errors, Br, Bc)  # a mod that raised: its own exception, from Python
    empty = np.isneginf(lse)
    if empty.any():  # P = 0 on these rows (lse' = NO_KEY): the check needs how many keys each may see
        idx = np.nonzero(empty)
        rows[idx] = _keys_seen(problem, idx)  # must be 0: a row the forward saw no key for
    validate.check_lse_rowsums(rows, lse, dtype)
    if problem.score_mod is not None:
        from flashkit.cpu import mods_jit

        mods_jit.check_gradients(problem, dQ, dK, dV)
    return dQ, dK, dV
