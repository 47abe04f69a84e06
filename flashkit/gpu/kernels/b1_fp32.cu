// Backward rung 1 (cupy-bwd-fp32): FlashAttention-2's Algorithm 2 in fp32, dQ accumulated with atomics.
// Changed since the forward (3_fp32_tile.cu): the direction. The forward keeps O_i for one query block and
//   streams K_j, V_j past it; the backward keeps dK_j, dV_j for one key block (Bc keys) in registers and
//   streams the query blocks i (Q_i, dO_i, lse_i, D_i) past it, recomputing S and P from the forward's lse
//   instead of storing the Nq x Nk matrix P. dQ_i gets a contribution from every key block, so blocks add
//   into a zeroed fp32 dQ with atomicAdd (FA2's way). All five products are register-blocked like rung 3:
//   256 threads as a 16 x 16 grid, float4 shared-memory loads; P^T and dS^T go through shared memory so
//   that other threads can own the rows of dK_j, dV_j and dQ_i. GQA: a block loops over the query heads of
//   its K/V head, so dK_j and dV_j sum over the group with no extra reduction.
// Why: the forward's rung 3 reached 0.7-1.05x torch's fp32 efficient forward with this partition.
// Expected: five GEMM-like products per tile instead of two, at rung 3's per-product efficiency:
//   25-35 TFLOP/s counting the backward as 2.5x the forward's FLOPs, torch's efficient fp32 backward's level.
// Measured (NVIDIA H200, fp32, B*N = 16384, H*d = 2048, N = 4096, Br x Bc = 64 x 64, 2026-12-01;
//   benchmarks/results/gpu-bwd-h200-history3.json): 30.2 TFLOP/s at d = 64, 0.86x torch's efficient fp32 backward (35.0 in
//   the same run); 28.2 at d = 128 (0.77x of 36.6); causal 29.4 / 28.0 (0.88 / 0.79). Inside the 25-35 expected;
//   the goal (>= 1.0x torch efficient) is not met. The block sweep: 64 x 64 beats 32 x 32, 32 x 64 and 64 x 32
//   (19-25 TFLOP/s) at both d. ptxas (sm_90): 127 registers at d = 64, 199 at d = 128, no spills; 105 / 170 KB of
//   shared memory (2 / 1 blocks per SM). Not profiled: where the other ~40% of the fp32 ceiling (51) goes.
// Measured on an H200 (N = 4096, B*N = 16384, H*d = 2048), default blocks, in the committed results file
//   (tests/test_rung_headers.py checks these lines against it; ratio = the peer's time / the rung's):
// Measured (gpu-bwd-h200-history3.json; d=64 dtype=float32 causal=False): 30.2 TFLOP/s, 0.86x torch-efficient
// Measured (gpu-bwd-h200-history3.json; d=64 dtype=float32 causal=True): 29.4 TFLOP/s, 0.88x torch-efficient
// Measured (gpu-bwd-h200-history3.json; d=128 dtype=float32 causal=False): 28.2 TFLOP/s, 0.77x torch-efficient
// Measured (gpu-bwd-h200-history3.json; d=128 dtype=float32 causal=True): 28.0 TFLOP/s, 0.79x torch-efficient
// The lse check (bwd_check.cuh, 2026-12-02): BR threads sum their query's column of P^T_s and add it with one
//   atomic per query and step (1 query tile in 8 at large N); bwd_lse_check tests the sums. Measured (H200, d = 64,
//   every tile): 45.35 ms vs 45.53 before (gpu-bwd-h200-history6.json, -history3.json): no cost measurable.
// Step of 2026-12-02 (H200, benchmarks/gpu_fp32_steps.py at 86f596e, fp32-steps-h200.json; the kernel before it
//   timed beside it in the same run): dQ_i's rows are now adjacent per thread (uy*QA + a), so one float4 of dS^T_s
//   gives a thread its QA dS values of a key (1 LDS.128 instead of 4 LDS.32 per 16 FMA), and each float4 of dQ
//   goes out as one red.global.add.v4.f32 (red_add4) instead of 4 scalar atomics. Registers unchanged (127 / 199).
//   Measured, TFLOP/s non-causal / causal, x torch efficient in the same run: d = 64 32.1 / 31.1 (0.91 / 0.92x;
//   before 30.2 / 29.2, 0.86x: +6%); d = 128 30.7 / 30.7 (0.83 / 0.86x; before 28.0 / 27.8, 0.76 / 0.78x: +10%).
//   Through flashkit.attention_backward (auto picks this rung for fp32): 0.90 / 0.90x (d = 64), 0.82 / 0.84x
//   (d = 128). 64 x 128 (allowed up to d = 64: 229 registers, 175 KB, one block per SM) loses 5%: 30.6 / 29.5.
//   The goal (>= 1.0x torch efficient) is not met. Where the rest goes was not profiled; candidates: the dK/dV
//   product reads 16 LDS.128 per 128 FMA (about as many shared-memory cycles as FMA cycles at d = 64), one block
//   of 8 warps per SM at d = 128 (170 KB), and no load of Q_{i+1} / dO_{i+1} overlapped with the products.
// Profiled and tried, 2026-12-02 (H200; ncu --clock-control none, tools/gpu_profile_rung.py, d = 64 / 128): issue
//   slots 67.5 / 61.6% busy, shared memory ("Mem Busy") 79 / 67%, 4 / 2 warps per scheduler (1.7 / 1.0 eligible),
//   no spills; the P^T / dS^T stores 2.6-way bank-conflicted (38% of the store wavefronts). Tried: warps of 4 x 8
//   threads in every product (a warp's K_j / dO_i / Q_i row loads one wavefront instead of two, the P^T / dS^T
//   stores conflict-free: a third fewer wavefronts a tile, counted from the code), timed beside this kernel in
//   the same run (benchmarks/gpu_fp32_steps.py --old-b1, fp32-b1-warps-h200.json, checks 47/47 and both
//   sanitizers clean): 42.54 vs 42.84 ms at d = 64 (causal 21.98 vs 22.16), 44.77 vs 44.52 at d = 128 (22.52 vs
//   22.41): within 1%, so the wavefronts are not what limits this kernel; not kept. What is left is most likely
//   latency with 4 (d = 64) or 2 (d = 128) warps a scheduler: the loads of each step wait at a barrier with
//   nothing else to run.
//
// Paper names: Br, Bc, Q_i, K_j, V_j, dO_i, lse_i, D_i = rowsum(dO_i * O_i), S = Q_i K_j^T * scale,
//   P = exp(S - lse_i), dP = dO_i V_j^T, dS = P * (dP - D_i); dV_j += P^T dO_i, dK_j += dS^T Q_i * scale,
//   dQ_i += dS K_j * scale.

#ifndef HEAD_DIM
#define HEAD_DIM 64  // d: 32, 64 or 128 (set by the loader)
#endif
#ifndef BR
#define BR 64  // query rows per step (set by the loader: 32 or 64)
#endif
#ifndef BC
#define BC 64  // keys per block (set by the loader: 64)
#endif
#define D HEAD_DIM
#define NT 256             // threads per block
#define MA (BR / 16)       // S tile: rows ty + 16a per thread (a < MA)
#define NB (BC / 16)       // S tile: keys tx + 16b per thread (b < NB)
#define TX (D / 4 < 16 ? D / 4 : 16)  // dK/dV/dQ tiles: TX threads across d, float4 columns tx*4 + 4*TX*c
#define TY (NT / TX)
#define CC (D / (4 * TX))  // float4 column groups per thread
#define KA (BC / TY)       // dK/dV rows per thread: ty + TY*a
#define QA (BR / TY)       // dQ rows per thread: uy*QA + a (adjacent rows: their dS^T values are one float4)
#define LDK (D + 4)        // Q_s, dO_s, K_s, V_s row pitch in floats (16-byte aligned, conflict-free float4)
#define LDT (BR + 4)       // P^T, dS^T row pitch in floats
#define LOG2E 1.4426950408889634f

static_assert(BR % 16 == 0 && BC % 16 == 0, "Br and Bc must be multiples of 16");
static_assert(BC % TY == 0 && BR % TY == 0, "the dK/dV and dQ thread grids must tile Bc and Br");

#include "common.cuh"
#include "bwd_check.cuh"

// rows [row0, row0 + nrows) of a (N, D) matrix into a [nrows][LDK] shared tile; rows >= N are 0.
__device__ __forceinline__ void load_tile(float (*dst)[LDK], const float* __restrict__ src, int row0, int nrows, int N) {
    for (int f = threadIdx.x; f < nrows * (D / 4); f += NT) {
        const int r = f / (D / 4), c = (f % (D / 4)) * 4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row0 + r < N) v = *reinterpret_cast<const float4*>(src + (long long)(row0 + r) * D + c);
        *reinterpret_cast<float4*>(&dst[r][c]) = v;
    }
}

// D = rowsum(dO * O) for every query row (B * Hq * Nq rows of d), and dQ (the atomics' target) and Psum
// (the row sums of P, the lse check's) zeroed.
// D / 4 threads per row, each one float4 of both; the row's threads are adjacent lanes of one warp.
extern "C" __global__ void __launch_bounds__(256) bwd_preprocess(
    const float* __restrict__ O, const float* __restrict__ dO, float* __restrict__ Dvec, float* __restrict__ dQ,
    float* __restrict__ Psum, long long rows) {
    constexpr int TPR = D / 4;  // threads per row: 8, 16 or 32
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / TPR;
    const int c = (threadIdx.x % TPR) * 4;
    float s = 0.f;
    if (row < rows) {
        const float4 o = *reinterpret_cast<const float4*>(O + row * D + c);
        const float4 g = *reinterpret_cast<const float4*>(dO + row * D + c);
        s = o.x * g.x + o.y * g.y + o.z * g.z + o.w * g.w;
        *reinterpret_cast<float4*>(dQ + row * D + c) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (row < rows && threadIdx.x % TPR == 0) Dvec[row] = s, Psum[row] = 0.f;
}

// Grid: (Tc, Hkv, B), block: 256 threads. Dynamic shared memory (floats): K_s, V_s [BC][LDK], Q_s, dO_s
// [BR][LDK], PT_s, dST_s [BC][LDT] (P^T and dS^T, key-major), lse_s, D_s [BR].
// dQ must be zero on entry (bwd_preprocess); it receives dS K_j * scale from every key block.
// Psum must be zero on entry too; it receives rowsum(P) over this block's keys (bwd_lse_check, bwd_check.cuh).
extern "C" __global__ void __launch_bounds__(NT) flash_bwd(
    const float* __restrict__ Q, const float* __restrict__ K, const float* __restrict__ V,
    const float* __restrict__ dO, const float* __restrict__ lse, const float* __restrict__ Dvec,
    float* __restrict__ dQ, float* __restrict__ dK, float* __restrict__ dV, float* __restrict__ Psum,
    int Hq, int Hkv, int Nq, int Nk, float scale, int left, int right, int lse_every) {
    extern __shared__ __align__(16) float smem[];
    float(*K_s)[LDK] = reinterpret_cast<float(*)[LDK]>(smem);
    float(*V_s)[LDK] = reinterpret_cast<float(*)[LDK]>(smem + BC * LDK);
    float(*Q_s)[LDK] = reinterpret_cast<float(*)[LDK]>(smem + 2 * BC * LDK);
    float(*dO_s)[LDK] = reinterpret_cast<float(*)[LDK]>(smem + (2 * BC + BR) * LDK);
    float(*PT_s)[LDT] = reinterpret_cast<float(*)[LDT]>(smem + 2 * (BC + BR) * LDK);
    float(*dST_s)[LDT] = reinterpret_cast<float(*)[LDT]>(smem + 2 * (BC + BR) * LDK + BC * LDT);
    float* lse_s = smem + 2 * (BC + BR) * LDK + 2 * BC * LDT;  // lse_i in log2 units; +inf: P = 0
    float* D_s = lse_s + BR;

    const int tid = threadIdx.x;
    const int ty = tid >> 4, tx = tid & 15;     // S / dP tile: 16 x 16 threads
    const int uy = tid / TX, ux = tid % TX;     // dK, dV, dQ tiles: TY x TX threads
    const int j0 = blockIdx.x * BC, hk = blockIdx.y, b = blockIdx.z;
    const int group = Hq / Hkv;
    const int offset = Nk - Nq;
    const float scale_log2 = scale * LOG2E;
    const float* Kh = K + ((long long)b * Hkv + hk) * Nk * D;
    const float* Vh = V + ((long long)b * Hkv + hk) * Nk * D;

    // The query rows that see any key of this block: [i_begin, i_end) (a window's rows see a contiguous range).
    const int j_end = min(j0 + BC, Nk);
    const int i_begin = right < 0 ? 0 : max(0, j0 - offset - right);
    const int i_end = left < 0 ? Nq : min(Nq, j_end - offset + left);
    const int i_first = (i_begin / BR) * BR;

    // Load K_j, V_j into shared memory (they stay for the whole block)
    load_tile(K_s, Kh, j0, BC, Nk);
    load_tile(V_s, Vh, j0, BC, Nk);

    // Initialise dK_j = 0, dV_j = 0 (registers: rows uy + TY*a, columns ux*4 + 4*TX*c + e)
    float dk[KA][CC][4], dv[KA][CC][4];
#pragma unroll
    for (int a = 0; a < KA; ++a)
#pragma unroll
        for (int c = 0; c < CC; ++c)
#pragma unroll
            for (int e = 0; e < 4; ++e) dk[a][c][e] = dv[a][c][e] = 0.f;

    for (int h = hk * group; h < (hk + 1) * group; ++h) {  // GQA: every query head of this K/V head
        const float* Qh = Q + ((long long)b * Hq + h) * Nq * D;
        const float* dOh = dO + ((long long)b * Hq + h) * Nq * D;
        const float* lseh = lse + ((long long)b * Hq + h) * Nq;
        const float* Dh = Dvec + ((long long)b * Hq + h) * Nq;
        float* dQh = dQ + ((long long)b * Hq + h) * Nq * D;

        for (int i0 = i_first; i0 < i_end; i0 += BR) {
            __syncthreads();  // the previous step is done with Q_s, dO_s, PT_s, dST_s
            // Load Q_i, dO_i, lse_i, D_i into shared memory
            load_tile(Q_s, Qh, i0, BR, Nq);
            load_tile(dO_s, dOh, i0, BR, Nq);
            if (tid < BR) {
                const int i = i0 + tid;
                const float l = i < Nq ? lseh[i] : -INFINITY;
                lse_s[tid] = l == -INFINITY ? INFINITY : l * LOG2E;  // a row that saw no key (or padding): P = 0
                D_s[tid] = i < Nq ? Dh[i] : 0.f;
            }
            __syncthreads();

            // S = Q_i K_j^T and dP = dO_i V_j^T: each thread rows ty + 16a, keys tx + 16b of both
            float s[MA][NB], dp[MA][NB];
#pragma unroll
            for (int a = 0; a < MA; ++a)
#pragma unroll
                for (int n = 0; n < NB; ++n) s[a][n] = dp[a][n] = 0.f;
#pragma unroll 2
            for (int k = 0; k < D; k += 4) {
                float4 q[MA], kk[NB];
#pragma unroll
                for (int a = 0; a < MA; ++a) q[a] = *reinterpret_cast<const float4*>(&Q_s[ty + 16 * a][k]);
#pragma unroll
                for (int n = 0; n < NB; ++n) kk[n] = *reinterpret_cast<const float4*>(&K_s[tx + 16 * n][k]);
#pragma unroll
                for (int a = 0; a < MA; ++a)
#pragma unroll
                    for (int n = 0; n < NB; ++n)
                        s[a][n] += q[a].x * kk[n].x + q[a].y * kk[n].y + q[a].z * kk[n].z + q[a].w * kk[n].w;
            }
#pragma unroll 2
            for (int k = 0; k < D; k += 4) {
                float4 g[MA], vv[NB];
#pragma unroll
                for (int a = 0; a < MA; ++a) g[a] = *reinterpret_cast<const float4*>(&dO_s[ty + 16 * a][k]);
#pragma unroll
                for (int n = 0; n < NB; ++n) vv[n] = *reinterpret_cast<const float4*>(&V_s[tx + 16 * n][k]);
#pragma unroll
                for (int a = 0; a < MA; ++a)
#pragma unroll
                    for (int n = 0; n < NB; ++n)
                        dp[a][n] += g[a].x * vv[n].x + g[a].y * vv[n].y + g[a].z * vv[n].z + g[a].w * vv[n].w;
            }

            // P = exp(S * scale - lse_i) where visible, else 0;  dS = P * (dP - D_i).  Stored transposed.
            const int i_last = min(i0 + BR, Nq) - 1;
            const bool full = (j0 >= row_lo(i_last, offset, left)) && (j0 + BC <= row_hi(i0, offset, right, Nk));
#pragma unroll
            for (int a = 0; a < MA; ++a) {
                const int r = ty + 16 * a, i = i0 + r;
                const int lo = row_lo(i, offset, left), hi = row_hi(i, offset, right, Nk);
#pragma unroll
                for (int n = 0; n < NB; ++n) {
                    const int c = tx + 16 * n, j = j0 + c;
                    const float p = (full || (j >= lo && j < hi)) ? fast_exp2(s[a][n] * scale_log2 - lse_s[r]) : 0.f;
                    PT_s[c][r] = p;
                    dST_s[c][r] = p * (dp[a][n] - D_s[r]);
                }
            }
            __syncthreads();  // P^T and dS^T complete
            // rowsum(P) over this block's keys for the lse check, one atomic a row, on every lse_every-th query tile
            // (as b2_mma.cu does; the loader sets it so that about 8 tiles of each head are checked)
            if ((i0 / BR) % lse_every == 0 && tid < BR && i0 + tid < Nq) {
                float p = 0.f;
                for (int c = 0; c < BC; ++c) p += PT_s[c][tid];
                if (p != 0.f) atomicAdd(Psum + ((long long)b * Hq + h) * Nq + i0 + tid, p);
            }

            // dV_j += P^T dO_i and dK_j += dS^T Q_i (scale applied at the end): query rows 4 at a time
#pragma unroll 1
            for (int r = 0; r < BR; r += 4) {
                float4 pt[KA], dst[KA];
#pragma unroll
                for (int a = 0; a < KA; ++a) {
                    pt[a] = *reinterpret_cast<const float4*>(&PT_s[uy + TY * a][r]);
                    dst[a] = *reinterpret_cast<const float4*>(&dST_s[uy + TY * a][r]);
                }
#pragma unroll
                for (int rr = 0; rr < 4; ++rr) {
#pragma unroll
                    for (int c = 0; c < CC; ++c) {
                        const float4 g = *reinterpret_cast<const float4*>(&dO_s[r + rr][ux * 4 + 4 * TX * c]);
                        const float4 q = *reinterpret_cast<const float4*>(&Q_s[r + rr][ux * 4 + 4 * TX * c]);
#pragma unroll
                        for (int a = 0; a < KA; ++a) {
                            const float p = rr == 0 ? pt[a].x : rr == 1 ? pt[a].y : rr == 2 ? pt[a].z : pt[a].w;
                            const float ds = rr == 0 ? dst[a].x : rr == 1 ? dst[a].y : rr == 2 ? dst[a].z : dst[a].w;
                            dv[a][c][0] = fmaf(p, g.x, dv[a][c][0]);
                            dv[a][c][1] = fmaf(p, g.y, dv[a][c][1]);
                            dv[a][c][2] = fmaf(p, g.z, dv[a][c][2]);
                            dv[a][c][3] = fmaf(p, g.w, dv[a][c][3]);
                            dk[a][c][0] = fmaf(ds, q.x, dk[a][c][0]);
                            dk[a][c][1] = fmaf(ds, q.y, dk[a][c][1]);
                            dk[a][c][2] = fmaf(ds, q.z, dk[a][c][2]);
                            dk[a][c][3] = fmaf(ds, q.w, dk[a][c][3]);
                        }
                    }
                }
            }

            // dQ_i += dS K_j * scale: rows uy*QA + a of this step (QA adjacent rows, so that one thread's dS
            // values of a key are one float4 of dS^T_s), added with one 16-byte vector atomic per float4 of dQ
            float dq[QA][CC][4];
#pragma unroll
            for (int a = 0; a < QA; ++a)
#pragma unroll
                for (int c = 0; c < CC; ++c)
#pragma unroll
                    for (int e = 0; e < 4; ++e) dq[a][c][e] = 0.f;
#pragma unroll 4
            for (int c2 = 0; c2 < BC; ++c2) {
                float4 kk[CC];
#pragma unroll
                for (int c = 0; c < CC; ++c) kk[c] = *reinterpret_cast<const float4*>(&K_s[c2][ux * 4 + 4 * TX * c]);
                float ds[QA];
                if constexpr (QA % 4 == 0) {
#pragma unroll
                    for (int a = 0; a < QA; a += 4) {
                        const float4 v = *reinterpret_cast<const float4*>(&dST_s[c2][uy * QA + a]);
                        ds[a] = v.x, ds[a + 1] = v.y, ds[a + 2] = v.z, ds[a + 3] = v.w;
                    }
                } else {
#pragma unroll
                    for (int a = 0; a < QA; ++a) ds[a] = dST_s[c2][uy * QA + a];
                }
#pragma unroll
                for (int a = 0; a < QA; ++a)
#pragma unroll
                    for (int c = 0; c < CC; ++c) {
                        dq[a][c][0] = fmaf(ds[a], kk[c].x, dq[a][c][0]);
                        dq[a][c][1] = fmaf(ds[a], kk[c].y, dq[a][c][1]);
                        dq[a][c][2] = fmaf(ds[a], kk[c].z, dq[a][c][2]);
                        dq[a][c][3] = fmaf(ds[a], kk[c].w, dq[a][c][3]);
                    }
            }
#pragma unroll
            for (int a = 0; a < QA; ++a) {
                const int i = i0 + uy * QA + a;
                if (i < Nq) {
#pragma unroll
                    for (int c = 0; c < CC; ++c)
                        red_add4(dQh + (long long)i * D + ux * 4 + 4 * TX * c,
                                 make_float4(dq[a][c][0] * scale, dq[a][c][1] * scale, dq[a][c][2] * scale,
                                             dq[a][c][3] * scale));
                }
            }
        }
    }

    // Write dK_j = scale * dK_j and dV_j (rows < Nk)
    float* dKh = dK + ((long long)b * Hkv + hk) * Nk * D;
    float* dVh = dV + ((long long)b * Hkv + hk) * Nk * D;
#pragma unroll
    for (int a = 0; a < KA; ++a) {
        const int j = j0 + uy + TY * a;
        if (j < Nk) {
#pragma unroll
            for (int c = 0; c < CC; ++c) {
                const int col = ux * 4 + 4 * TX * c;
                *reinterpret_cast<float4*>(dKh + (long long)j * D + col) =
                    make_float4(dk[a][c][0] * scale, dk[a][c][1] * scale, dk[a][c][2] * scale, dk[a][c][3] * scale);
                *reinterpret_cast<float4*>(dVh + (long long)j * D + col) =
                    make_float4(dv[a][c][0], dv[a][c][1], dv[a][c][2], dv[a][c][3]);
            }
        }
    }
}
