// Backward rung 3 (cupy-bwd-mma-2kernel): rung 2 split into two kernels, no atomics.
// Changed since backward rung 2 (b2_mma.cu): dQ_i no longer comes from the key-block kernel. A first
//   kernel, parallel over key blocks, computes only dK_j and dV_j (rung 2 without the dS^T tile in shared
//   memory, the second barrier per step and the dQ step). A second kernel, parallel over query blocks
//   like the forward, recomputes S = Q_i K_j^T and P, computes dP = dO_i V_j^T and dS for each K_j, V_j
//   tile it streams past, and accumulates dQ_i += dS K_j in registers: dQ is written once, in the input
//   dtype, with no fp32 buffer, no atomics and no conversion kernel. Each kernel's block holds Bc rows of
//   its own side (keys for dK/dV, queries for dQ) and steps over Br of the other.
// Why: atomics make dQ's summation order vary from run to run (not bit-reproducible) and cost an fp32
//   buffer of B x Hq x Nq x d plus its memory traffic; the two-kernel way (FA3's deterministic option, and
//   the Triton tutorial's layout) trades them for recomputation.
// Expected: 7 products per tile pair instead of 5 (S and dP computed twice): about 5/7 of rung 2's speed
//   if both are bound by the tensor cores, closer to rung 2 if rung 2 is held back by its atomics.
// Measured (NVIDIA H200, fp16, B*N = 16384, H*d = 2048, N = 4096, 2026-12-01;
//   benchmarks/results/gpu-bwd-h200-history3.json): d = 64 (Br x Bc = 64 x 64) 198.1 TFLOP/s, 0.93x rung 2
//   and 0.77 of torch's flash backward, causal 189.3 (0.87);
//   d = 128 (64 x 128) 206.9, 0.88x rung 2 (0.73), causal 186.1 (0.80); bf16 alike. Much better than the 5/7
//   expected: the dK/dV kernel takes 3.92 ms and the dQ kernel 2.93 (d = 64; 3.77 / 2.89 at d = 128) against
//   rung 2's 6.33 ms main kernel, so rung 2 is not bound by its mma count (not profiled further). Gradients are
//   bit-identical from run to run (tests/test_gpu_backward.py); extra memory is D alone (4 MiB at B = 1, H = 16,
//   N = 65536, d = 128, against rung 2's 516 MiB fp32 dQ buffer). ptxas (sm_90): dK/dV 168 / 255 registers, dQ
//   128 / 208 (d = 64 / 128), no spills.
// Measured on an H200 (N = 4096, B*N = 16384, H*d = 2048), default blocks, in the committed results file
//   (tests/test_rung_headers.py checks these lines against it; ratio = the peer's time / the rung's):
// Measured (gpu-bwd-h200-history3.json; d=64 dtype=float16 causal=False): 198.1 TFLOP/s, 0.77x torch-flash
// Measured (gpu-bwd-h200-history3.json; d=64 dtype=float16 causal=True): 189.3 TFLOP/s, 0.87x torch-flash
// Measured (gpu-bwd-h200-history3.json; d=128 dtype=float16 causal=False): 206.9 TFLOP/s, 0.73x torch-flash
// Measured (gpu-bwd-h200-history3.json; d=128 dtype=float16 causal=True): 186.1 TFLOP/s, 0.80x torch-flash
// The lse check (bwd_check.cuh, 2026-12-02): the dQ kernel visits each row's whole key range, so it sums P in
//   registers and tests every row at the end; it runs before the dK/dV kernel, so the public call waits for it while
//   the dK/dV kernel runs. On the H200 (fp16, d = 64; results gpu-bwd-h200-history6.json against gpu-bwd-h200-history3.json):
//   6.997 vs 6.938 ms non-causal, 3.751 vs 3.632 causal (+1-3%); the public call 1.01-1.02x the rung alone.
//
// Paper names: Br, Bc, Q_i, K_j, V_j, dO_i, lse_i, D_i = rowsum(dO_i * O_i), S = Q_i K_j^T * scale,
//   P = exp(S - lse_i), dP = dO_i V_j^T, dS = P * (dP - D_i); dV_j += P^T dO_i, dK_j += dS^T Q_i * scale,
//   dQ_i += dS K_j * scale.

#ifndef HEAD_DIM
#define HEAD_DIM 64  // d: 32, 64 or 128 (set by the loader)
#endif
#ifndef BR
#define BR 64   // dK/dV kernel: queries per step of the loop over i (set by the loader: 32 or 64)
#endif
#ifndef BC
#define BC 128  // dK/dV kernel: keys per block, 16 per warp (set by the loader: 64 or 128)
#endif
#ifndef BR_DQ
#define BR_DQ BC  // dQ kernel: queries per block, 16 per warp (the loader sets Bc: each kernel's block holds Bc rows)
#endif
#ifndef BC_DQ
#define BC_DQ BR  // dQ kernel: keys per step of the loop over j (the loader sets Br)
#endif
#define D HEAD_DIM
#define LDS (D + 8)      // every tile's row pitch in 16-bit elements (+16 bytes: no ldmatrix conflicts)
#define LOG2E 1.4426950408889634f

#include "mma.cuh"
#include "bwd_check.cuh"

// D = rowsum(dO * O) in fp32 for every query row (B * Hq * Nq rows of d). D / 8 threads per row, each
// 8 elements (16 bytes) of both; the row's threads are adjacent lanes of one warp.
extern "C" __global__ void __launch_bounds__(256) bwd_preprocess(
    const T* __restrict__ O, const T* __restrict__ dO, float* __restrict__ Dvec, long long rows) {
    constexpr int TPR = D / 8;  // threads per row: 4, 8 or 16
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / TPR;
    const int c = (threadIdx.x % TPR) * 8;
    float s = 0.f;
    if (row < rows) {
        const uint4 o = *reinterpret_cast<const uint4*>(O + row * D + c);
        const uint4 g = *reinterpret_cast<const uint4*>(dO + row * D + c);
        const unsigned ov[4] = {o.x, o.y, o.z, o.w}, gv[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 a = unpack2(ov[e]), bb = unpack2(gv[e]);
            s += a.x * bb.x + a.y * bb.y;
        }
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (row < rows && threadIdx.x % TPR == 0) Dvec[row] = s;
}

// ---- Kernel 1: dK_j, dV_j. Grid (Tc, Hkv, B), Bc / 16 warps, warp w owns keys 16w .. 16w + 15 of K_j. --------
// Dynamic shared memory: K_s, V_s [BC][LDS]; Q_s, dO_s [2][BR][LDS] (two stages); lse_s, D_s [2][BR] floats.
#define NW1 (BC / 16)
#define NT1 (32 * NW1)
extern "C" __global__ void __launch_bounds__(NT1) flash_bwd_dkdv(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
    const float* __restrict__ lse, const float* __restrict__ Dvec, T* __restrict__ dK, T* __restrict__ dV,
    int Hq, int Hkv, int Nq, int Nk, float scale, int left, int right) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T(*K_s)[LDS] = reinterpret_cast<T(*)[LDS]>(smem_raw);
    T(*V_s)[LDS] = reinterpret_cast<T(*)[LDS]>(smem_raw + sizeof(T) * BC * LDS);
    T(*Q_s)[BR][LDS] = reinterpret_cast<T(*)[BR][LDS]>(smem_raw + sizeof(T) * 2 * BC * LDS);
    T(*dO_s)[BR][LDS] = reinterpret_cast<T(*)[BR][LDS]>(smem_raw + sizeof(T) * (2 * BC + 2 * BR) * LDS);
    float(*lse_s)[BR] = reinterpret_cast<float(*)[BR]>(smem_raw + sizeof(T) * (2 * BC + 4 * BR) * LDS);
    float(*D_s)[BR] = lse_s + 2;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wk = 16 * warp;  // this warp's keys: wk + g and wk + g + 8 of K_j
    const int j0 = blockIdx.x * BC, hk = blockIdx.y, b = blockIdx.z;
    const int group = Hq / Hkv;
    const int offset = Nk - Nq;
    const float scale_log2 = scale * LOG2E;
    const T* Kh = K + ((long long)b * Hkv + hk) * Nk * D;
    const T* Vh = V + ((long long)b * Hkv + hk) * Nk * D;

    // The query rows that see any key of this block: [i_begin, i_end); the steps: every (head of the group, i).
    const int j_end = min(j0 + BC, Nk);
    const int i_begin = right < 0 ? 0 : max(0, j0 - offset - right);
    const int i_end = left < 0 ? Nq : min(Nq, j_end - offset + left);
    const int i_first = (i_begin / BR) * BR;
    const int n_i = i_end > i_first ? (i_end - i_first + BR - 1) / BR : 0;
    const int n_steps = group * n_i;

    auto issue_tiles = [&](int step, int buf) {
        const int h = hk * group + step / n_i, i0 = i_first + (step % n_i) * BR;
        async_tile<NT1>(Q_s[buf], Q + ((long long)b * Hq + h) * Nq * D, i0, BR, Nq);
        async_tile<NT1>(dO_s[buf], dO + ((long long)b * Hq + h) * Nq * D, i0, BR, Nq);
    };
    auto read_rows = [&](int step, float& l2, float& dd) {
        const int h = hk * group + step / n_i, i = i_first + (step % n_i) * BR + tid;
        const long long r = ((long long)b * Hq + h) * Nq + i;
        const float l = (tid < BR && i < Nq) ? lse[r] : -INFINITY;
        l2 = l == -INFINITY ? INFINITY : l * LOG2E;  // a row that saw no key, or padding: P = 0
        dd = (tid < BR && i < Nq) ? Dvec[r] : 0.f;
    };

    // Prologue: K_j, V_j and the first step's Q_i, dO_i in one cp.async group.
    async_tile<NT1>(K_s, Kh, j0, BC, Nk);
    async_tile<NT1>(V_s, Vh, j0, BC, Nk);
    if (n_steps > 0) {
        issue_tiles(0, 0);
        float l2, dd;
        read_rows(0, l2, dd);
        if (tid < BR) lse_s[0][tid] = l2, D_s[0][tid] = dd;
    }
    cp_async_commit();

    // Initialise dK_j = 0, dV_j = 0 (registers: keys wk + g (+8), columns 8n + 2t (+1))
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.f;

    for (int step = 0; step < n_steps; ++step) {
        const int buf = step & 1;
        const int i0 = i_first + (step % n_i) * BR;
        cp_async_wait<0>();  // this step's Q_i, dO_i (and K_j, V_j) have landed
        __syncthreads();     // ... for every thread; the previous step is done with the other buffers
        if (step + 1 < n_steps) {
            issue_tiles(step + 1, buf ^ 1);
            float l2, dd;
            read_rows(step + 1, l2, dd);  // the other buffer's lse_i, D_i were last read in the previous step
            if (tid < BR) lse_s[buf ^ 1][tid] = l2, D_s[buf ^ 1][tid] = dd;
        }
        cp_async_commit();

        // S^T = K_j Q_i^T (unscaled): this warp's 16 keys x Br queries
        float s[BR / 8][4];
#pragma unroll
        for (int n = 0; n < BR / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned ka[4];
            A_rows<LDS>(ka, K_s, wk, 16 * kk, lane);
#pragma unroll
            for (int n2 = 0; n2 < BR / 16; ++n2) {
                unsigned qb[4];
                B_rows<LDS>(qb, Q_s[buf], 16 * n2, 16 * kk, lane);
                mma16816(s[2 * n2], ka, qb[0], qb[1]);
                mma16816(s[2 * n2 + 1], ka, qb[2], qb[3]);
            }
        }

        // the per-element mask only where the tile is not FULL for every query of the step
        // (element (n, e): key wk + g + 8 (e >> 1), query 8n + 2t + (e & 1))
        const int i_last = min(i0 + BR, Nq) - 1;
        const bool full = (j0 >= row_lo(i_last, offset, left)) && (j0 + BC <= row_hi(i0, offset, right, Nk));
        if (!full) {
#pragma unroll
            for (int n = 0; n < BR / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = i0 + 8 * n + 2 * t + (e & 1), j = j0 + wk + g + 8 * (e >> 1);
                    if (!(j >= row_lo(i, offset, left) && j < row_hi(i, offset, right, Nk))) s[n][e] = -INFINITY;
                }
        }
        // P^T = exp2(S^T * scale_log2 - lse_i): 0 where masked (-inf) and for rows with lse_i = +inf
#pragma unroll
        for (int n = 0; n < BR / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = fast_exp2(fmaf(s[n][e], scale_log2, -lse_s[buf][8 * n + 2 * t + (e & 1)]));

        // dV_j += P^T dO_i: P^T from the S^T registers (packed to 16 bits), dO_i's fragments by ldmatrix.trans
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk) {
            unsigned p[4];
            p[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
            p[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
            p[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            p[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int n2 = 0; n2 < D / 16; ++n2) {
                unsigned gb[4];
                B_cols<LDS>(gb, dO_s[buf], 16 * kk, 16 * n2, lane);
                mma16816(dv[2 * n2], p, gb[0], gb[1]);
                mma16816(dv[2 * n2 + 1], p, gb[2], gb[3]);
            }
        }

        // dP^T = V_j dO_i^T: this warp's 16 keys x Br queries
        float dp[BR / 8][4];
#pragma unroll
        for (int n = 0; n < BR / 8; ++n) dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned va[4];
            A_rows<LDS>(va, V_s, wk, 16 * kk, lane);
#pragma unroll
            for (int n2 = 0; n2 < BR / 16; ++n2) {
                unsigned gb[4];
                B_rows<LDS>(gb, dO_s[buf], 16 * n2, 16 * kk, lane);
                mma16816(dp[2 * n2], va, gb[0], gb[1]);
                mma16816(dp[2 * n2 + 1], va, gb[2], gb[3]);
            }
        }

        // dS^T = P^T * (dP^T - D_i)  (D_i per query: per column here)
#pragma unroll
        for (int n = 0; n < BR / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] *= dp[n][e] - D_s[buf][8 * n + 2 * t + (e & 1)];

        // dK_j += dS^T Q_i (scale at the end)
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk) {
            unsigned p[4];
            p[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
            p[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
            p[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            p[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int n2 = 0; n2 < D / 16; ++n2) {
                unsigned qb[4];
                B_cols<LDS>(qb, Q_s[buf], 16 * kk, 16 * n2, lane);
                mma16816(dk[2 * n2], p, qb[0], qb[1]);
                mma16816(dk[2 * n2 + 1], p, qb[2], qb[3]);
            }
        }
    }
    cp_async_wait<0>();  // nothing may be left in flight when the block exits

    // Write dK_j = scale * dK_j and dV_j in the input dtype (keys < Nk)
    T* dKh = dK + ((long long)b * Hkv + hk) * Nk * D;
    T* dVh = dV + ((long long)b * Hkv + hk) * Nk * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = j0 + wk + g + 8 * r;
        if (j < Nk) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                *reinterpret_cast<unsigned*>(dKh + (long long)j * D + 8 * n + 2 * t) =
                    pack2(dk[n][2 * r] * scale, dk[n][2 * r + 1] * scale);
                *reinterpret_cast<unsigned*>(dVh + (long long)j * D + 8 * n + 2 * t) = pack2(dv[n][2 * r], dv[n][2 * r + 1]);
            }
        }
    }
}

// ---- Kernel 2: dQ_i. Grid (Tr, Hq, B), BR_DQ / 16 warps, warp w owns queries 16w .. 16w + 15 of Q_i. ----------
// Dynamic shared memory: Q_s, dO_s [BR_DQ][LDS]; K_s, V_s [2][BC_DQ][LDS] (two stages).
#define NW2 (BR_DQ / 16)
#define NT2 (32 * NW2)
extern "C" __global__ void __launch_bounds__(NT2) flash_bwd_dq(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
    const float* __restrict__ lse, const float* __restrict__ Dvec, T* __restrict__ dQ,
    int Hq, int Hkv, int Nq, int Nk, float scale, int left, int right,
    float tol, unsigned long long report, long long serial) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T(*Q_s)[LDS] = reinterpret_cast<T(*)[LDS]>(smem_raw);
    T(*dO_s)[LDS] = reinterpret_cast<T(*)[LDS]>(smem_raw + sizeof(T) * BR_DQ * LDS);
    T(*K_s)[BC_DQ][LDS] = reinterpret_cast<T(*)[BC_DQ][LDS]>(smem_raw + sizeof(T) * 2 * BR_DQ * LDS);
    T(*V_s)[BC_DQ][LDS] = reinterpret_cast<T(*)[BC_DQ][LDS]>(smem_raw + sizeof(T) * (2 * BR_DQ + 2 * BC_DQ) * LDS);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wr = 16 * warp;  // this warp's queries: wr + g and wr + g + 8 of Q_i
    // Heavy tiles first: with causal masking the last query tiles see the most keys.
    const int i0 = (gridDim.x - 1 - blockIdx.x) * BR_DQ, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (Hq / Hkv);
    const int offset = Nk - Nq;
    const float scale_log2 = scale * LOG2E;
    const T* Kh = K + ((long long)b * Hkv + hk) * Nk * D;
    const T* Vh = V + ((long long)b * Hkv + hk) * Nk * D;

    const int i_last = min(i0 + BR_DQ, Nq) - 1;
    const int kv_begin = row_lo(i0, offset, left), kv_end = row_hi(i_last, offset, right, Nk);
    const int full_lo = row_lo(i_last, offset, left), full_hi = row_hi(i0, offset, right, Nk);
    const int j_first = (kv_begin / BC_DQ) * BC_DQ;
    const int n_tiles = kv_end > j_first ? (kv_end - j_first + BC_DQ - 1) / BC_DQ : 0;

    // Prologue: Q_i, dO_i and K_0, V_0 in one cp.async group; lse_i (log2 units, +inf: P = 0) and D_i of
    // this thread's two rows into registers.
    async_tile<NT2>(Q_s, Q + ((long long)b * Hq + h) * Nq * D, i0, BR_DQ, Nq);
    async_tile<NT2>(dO_s, dO + ((long long)b * Hq + h) * Nq * D, i0, BR_DQ, Nq);
    if (n_tiles > 0) {
        async_tile<NT2>(K_s[0], Kh, j_first, BC_DQ, Nk);
        async_tile<NT2>(V_s[0], Vh, j_first, BC_DQ, Nk);
    }
    cp_async_commit();
    float l2[2], Di[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = i0 + wr + g + 8 * r;
        const long long row = ((long long)b * Hq + h) * Nq + i;
        const float l = i < Nq ? lse[row] : -INFINITY;
        l2[r] = l == -INFINITY ? INFINITY : l * LOG2E;
        Di[r] = i < Nq ? Dvec[row] : 0.f;
    }

    float psum[2] = {0.f, 0.f};  // this thread's part of rowsum(P) of its two rows: the lse check (bwd_check.cuh)
    float dq[D / 8][4];  // dQ_i: rows wr + g (+8), columns 8n + 2t (+1)
#pragma unroll
    for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

    for (int it = 0; it < n_tiles; ++it) {
        const int kb = it & 1, j0 = j_first + it * BC_DQ;
        cp_async_wait<0>();  // K_j, V_j (and Q_i, dO_i) have landed
        __syncthreads();     // ... for every thread; the previous tile is done with the other buffers
        if (it + 1 < n_tiles) {
            async_tile<NT2>(K_s[kb ^ 1], Kh, j0 + BC_DQ, BC_DQ, Nk);
            async_tile<NT2>(V_s[kb ^ 1], Vh, j0 + BC_DQ, BC_DQ, Nk);
        }
        cp_async_commit();

        // S = Q_i K_j^T (unscaled): this warp's 16 queries x Bc keys
        float s[BC_DQ / 8][4];
#pragma unroll
        for (int n = 0; n < BC_DQ / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned qa[4];
            A_rows<LDS>(qa, Q_s, wr, 16 * kk, lane);
#pragma unroll
            for (int n2 = 0; n2 < BC_DQ / 16; ++n2) {
                unsigned kf[4];
                B_rows<LDS>(kf, K_s[kb], 16 * n2, 16 * kk, lane);
                mma16816(s[2 * n2], qa, kf[0], kf[1]);
                mma16816(s[2 * n2 + 1], qa, kf[2], kf[3]);
            }
        }

        // the per-element mask only where the tile is not FULL for every row of Q_i
        // (element (n, e): query wr + g + 8 (e >> 1), key 8n + 2t + (e & 1))
        const bool full = (j0 >= full_lo) && (j0 + BC_DQ <= full_hi);
        if (!full) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = i0 + wr + g + 8 * (e >> 1);
                const int lo = row_lo(i, offset, left), hi = row_hi(i, offset, right, Nk);
#pragma unroll
                for (int n = 0; n < BC_DQ / 8; ++n) {
                    const int j = j0 + 8 * n + 2 * t + (e & 1);
                    if (!(j >= lo && j < hi)) s[n][e] = -INFINITY;
                }
            }
        }
        // P = exp2(S * scale_log2 - lse_i)
#pragma unroll
        for (int n = 0; n < BC_DQ / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = fast_exp2(fmaf(s[n][e], scale_log2, -l2[e >> 1]));
#pragma unroll
        for (int n = 0; n < BC_DQ / 8; ++n) psum[0] += s[n][0] + s[n][1], psum[1] += s[n][2] + s[n][3];

        // dP = dO_i V_j^T: this warp's 16 queries x Bc keys
        float dp[BC_DQ / 8][4];
#pragma unroll
        for (int n = 0; n < BC_DQ / 8; ++n) dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned ga[4];
            A_rows<LDS>(ga, dO_s, wr, 16 * kk, lane);
#pragma unroll
            for (int n2 = 0; n2 < BC_DQ / 16; ++n2) {
                unsigned vf[4];
                B_rows<LDS>(vf, V_s[kb], 16 * n2, 16 * kk, lane);
                mma16816(dp[2 * n2], ga, vf[0], vf[1]);
                mma16816(dp[2 * n2 + 1], ga, vf[2], vf[3]);
            }
        }

        // dS = P * (dP - D_i)
#pragma unroll
        for (int n = 0; n < BC_DQ / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] *= dp[n][e] - Di[e >> 1];

        // dQ_i += dS K_j: dS from the registers (packed to 16 bits), K_j's fragments by ldmatrix.trans
#pragma unroll
        for (int kk = 0; kk < BC_DQ / 16; ++kk) {
            unsigned p[4];
            p[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
            p[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
            p[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            p[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int n2 = 0; n2 < D / 16; ++n2) {
                unsigned kf[4];
                B_cols<LDS>(kf, K_s[kb], 16 * kk, 16 * n2, lane);
                mma16816(dq[2 * n2], p, kf[0], kf[1]);
                mma16816(dq[2 * n2 + 1], p, kf[2], kf[3]);
            }
        }
    }
    cp_async_wait<0>();  // nothing may be left in flight when the block exits (n_tiles = 0: Q_i's group)

    // The lse check: this block visited every key of its rows, so psum summed over the row's 4 threads is the
    // whole rowsum(P), which must be 1 (bwd_check.cuh). Lane t = 0 of each row tests it; one lane reports.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        psum[r] += __shfl_xor_sync(0xffffffffu, psum[r], 1);
        psum[r] += __shfl_xor_sync(0xffffffffu, psum[r], 2);
        const int i = i0 + wr + g + 8 * r;
        const long long row = ((long long)b * Hq + h) * Nq + i;
        float shown = 0.f;
        const bool bad = t == 0 && i < Nq && lse_row_bad(psum[r], lse[row], i, Nq, Nk, left, right, tol, shown);
        const unsigned ballot = __ballot_sync(0xffffffffu, bad);
        if (ballot != 0 && lane == __ffs(ballot) - 1) report_lse(report, serial, row, shown);
    }

    // Write dQ_i = scale * dQ_i in the input dtype (rows < Nq; a row that saw no key gets 0)
    T* dQh = dQ + ((long long)b * Hq + h) * Nq * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = i0 + wr + g + 8 * r;
        if (i < Nq) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                *reinterpret_cast<unsigned*>(dQh + (long long)i * D + 8 * n + 2 * t) =
                    pack2(dq[n][2 * r] * scale, dq[n][2 * r + 1] * scale);
        }
    }
}
