// Rung 3: fp32, a block of 128 threads per query tile, each thread a 4 x 8 (or 4 x 4) register block of S.
// Changed since rung 2: a thread no longer owns a whole row. S_ij (Br x Bc = 64 x 64, 64 x 32) is computed like a
//   small SGEMM: thread (ty, tx) owns rows ty + 16a (a < 4) and keys tx + 8b (b < Bc/8), reads Q_s and K_s
//   as float4 (12 LDS.128 per 128 FMA instead of 2 LDS per FMA), and the 8 threads of a row reduce
//   rowmax with warp shuffles. P_ij goes through shared memory so the same threads can own
//   4 rows x d/8 columns of O_i for P_ij V_j. K_j and V_j share one buffer (K_j is dead after S).
// Why: rung 2 is bound by shared-memory loads (one per FMA); register blocking makes it FMA-bound.
// Expected: 5-10x rung 2, a large fraction of the fp32 FMA roofline (52 TFLOP/s GEMM measured);
//   aimed at torch's memory-efficient fp32 kernel.
// Measured (H100 80GB HBM3, fp32, N = 4096, non-causal): 35.8 TFLOP/s at d = 64 (1.04x torch efficient,
//   69% of the fp32 GEMM ceiling), 33.2 at d = 128 with Bc = 32 (0.73x; 30.5 with Bc = 64). Only 1.6x / 3x
//   rung 2, far under the 5-10x expected, because rung 2 ran far above its own prediction.
// Measured on an H100 80GB HBM3 (B*N = 16384, H*d = 2048), default blocks, in the committed results file
//   (tests/test_rung_headers.py checks these lines against it; ratio = the peer's time / the rung's):
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=64 dtype=float32 causal=False): 36.3 TFLOP/s, 1.05x torch-efficient
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=64 dtype=float32 causal=True): 34.2 TFLOP/s, 1.04x torch-efficient
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=128 dtype=float32 causal=False): 33.6 TFLOP/s, 0.72x torch-efficient
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=128 dtype=float32 causal=True): 31.3 TFLOP/s, 0.70x torch-efficient
// On an NVIDIA H200 (same shapes; fp32 GEMM ceiling 50.6 TFLOP/s in the same run):
// Measured (fwd-issue11-h200.json; N=4096 d=64 dtype=float32 causal=False): 36.2 TFLOP/s, 1.02x torch-efficient
// Measured (fwd-issue11-h200.json; N=4096 d=64 dtype=float32 causal=True): 34.4 TFLOP/s, 1.02x torch-efficient
// Measured (fwd-issue11-h200.json; N=4096 d=128 dtype=float32 causal=False): 32.9 TFLOP/s, 0.72x torch-efficient
// Measured (fwd-issue11-h200.json; N=4096 d=128 dtype=float32 causal=True): 30.8 TFLOP/s, 0.70x torch-efficient
// Step tried for d = 128 (TX = 16: 8 x 16 threads, 8 rows of S and 2 float4 of O columns per thread; the block
//   sweep of fwd-issue11-h200.json, non-causal / causal): at 64 x 64 35.6 / 35.0 TFLOP/s against the default
//   64 x 32's 33.2 / 31.1 (+7% / +13%, about 0.78x torch efficient: the goal, 1.0x, is not met); at 64 x 32 it
//   loses (30.1 / 29.1); at d = 64 its best block loses 2-3% to the default. Not the default: not yet through
//   flashkit.gpu.check (its first timing run ended in an illegal address, most likely because P_s's pitch then
//   grew with TX while rungs.py's shared-memory size did not; fixed: the pitch is Bc + 8 for any TX).
// Steps of 2026-12-02 (H200, one run of benchmarks/gpu_fp32_steps.py at 86f596e, fp32-steps-h200.json; every
//   variant first passed the float64 checks of flashkit.gpu.check's awkward shapes at both blocks, and memcheck /
//   racecheck were clean). TFLOP/s non-causal / causal, N = 4096, x torch efficient in the same run:
//   - TX = 16 at 64 x 64 (checked now): d = 128 35.7 / 34.9 (0.78 / 0.79x) against the old default 64 x 32 TX 8's
//     33.2 / 31.1 (0.72 / 0.70x): the new default at d = 128. At d = 64 it loses 3% to TX = 8.
//   - KV_ASYNC (K_j and V_j in two buffers filled by cp.async: V_j lands while S_ij is computed, K_{j+1} while
//     P_ij V_j is): d = 64, 64 x 64 37.6 / 36.1 (1.06 / 1.07x) against 36.5 / 34.9 (1.03x): the new default at
//     d = 64. At d = 128 it loses: 64 x 64 needs 120 KB (one block of 4 warps per SM; 21.6 TFLOP/s), TX 16 with it
//     33.5 / 32.3 (a third [Bc][d+4] buffer, 2 blocks per SM instead of 3).
//   The goal at d = 128 (>= 1.0x torch efficient, 46.0 / 44.3 TFLOP/s here, 90% of the 51 TFLOP/s fp32 GEMM
//   ceiling) is not met: 0.78 / 0.79x. Not tried: Br = 128 (more reuse of each K_j / V_j float4), a register-level
//   double buffer of the float4 operands, P_ij kept in registers and shuffled instead of going through P_s.
//
// Paper names: Br, Bc, Q_i, K_j, V_j, S = Q_i K_j^T * scale (log2 units), P = exp2(S - m_i), m_i, l_i, O_i.

#ifndef HEAD_DIM
#define HEAD_DIM 64  // d: 32, 64 or 128 (set by the loader)
#endif
#define D HEAD_DIM
#ifndef BC
#define BC 64     // keys per tile = 8 thread-columns x TN (set by the loader: 32 or 64)
#endif
#define BR 64     // query rows per block = TY thread-rows x TM
#define NT 128    // threads per block (TY x TX)
#ifndef TX  // threads per row group (8: a 16 x 8 thread grid; 16: 8 x 16, twice the rows per thread).
#define TX (D == 128 ? 16 : 8)  // 16 at d = 128: measured +8% / +12% over 8 (fp32-steps-h200.json); d = 32 needs 8
#endif
#define TY (NT / TX)      // thread rows
#define TM (BR / TY)      // query rows per thread: rows ty + TY*a
#define TN (BC / TX)      // keys per thread in S: keys tx + TX*n
#define DV (D / (4 * TX)) // float4 groups of O_i columns per thread: columns tx*4 + 4*TX*c
static_assert(D % (4 * TX) == 0 && BC % TX == 0, "TX must divide d / 4 and Bc");
#define LDQ (D + 4)  // Q_s / KV_s row pitch in floats: 16-byte aligned, and 8 consecutive rows start in
                     // 8 different 16-byte bank groups, so a warp's float4 loads are conflict-free
#define LDP (BC + 8)  // P_s row pitch (rungs.py's shared-memory size): rows ty..ty+3 of one warp land 8 banks
                     // apart (TX = 8: no store conflicts; TX = 16: two rows per warp, 8 banks shared)

#ifndef KV_ASYNC  // 1: K_j and V_j in two buffers filled by cp.async, each load overlapped with the other product.
#define KV_ASYNC (D == 64 ? 1 : 0)  // on at d = 64 (+3%); off at d = 128, where the extra buffer costs occupancy
#endif                              // (rungs.py's shared-memory size follows the same rule)

#include "common.cuh"
#include "fp32_async.cuh"

// rows [row0, row0 + nrows) of a (N, D) matrix into a [nrows][LDQ] shared tile; rows >= N are 0.
__device__ __forceinline__ void load_tile(float (*dst)[LDQ], const float* __restrict__ src, int row0, int nrows, int N) {
    for (int f = threadIdx.x; f < nrows * (D / 4); f += NT) {
        const int r = f / (D / 4), c = (f % (D / 4)) * 4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row0 + r < N) v = *reinterpret_cast<const float4*>(src + (long long)(row0 + r) * D + c);
        *reinterpret_cast<float4*>(&dst[r][c]) = v;
    }
}

// Grid: (Tr, Hq, B), block: 128 threads. Dynamic shared memory: Q_s [BR][LDQ], KV_s [BC][LDQ], P_s [BR][LDP]
// (KV_ASYNC: Q_s, K_s [BC][LDQ], P_s, V_s [BC][LDQ]).
extern "C" __global__ void __launch_bounds__(NT) flash_fwd(
    const float* __restrict__ Q, const float* __restrict__ K, const float* __restrict__ V,
    float* __restrict__ O, float* __restrict__ lse,
    int Hq, int Hkv, int Nq, int Nk, float scale_log2, int left, int right) {
    extern __shared__ __align__(16) float smem[];
    float(*Q_s)[LDQ] = reinterpret_cast<float(*)[LDQ]>(smem);
    float(*KV_s)[LDQ] = reinterpret_cast<float(*)[LDQ]>(smem + BR * LDQ);
    float(*P_s)[LDP] = reinterpret_cast<float(*)[LDP]>(smem + (BR + BC) * LDQ);
#if KV_ASYNC
    float(*V_s)[LDQ] = reinterpret_cast<float(*)[LDQ]>(smem + (BR + BC) * LDQ + BR * LDP);  // K_j stays in KV_s
#else
    float(*V_s)[LDQ] = KV_s;  // V_j overwrites K_j, dead once S is computed
#endif

    const int tid = threadIdx.x, ty = tid / TX, tx = tid % TX;  // the TX threads of a row group share a warp
    const int i0 = blockIdx.x * BR, hq = blockIdx.y, b = blockIdx.z;
    const int hkv = hq / (Hq / Hkv);
    const int offset = Nk - Nq;
    const float* Qh = Q + ((long long)b * Hq + hq) * Nq * D;
    const float* Kh = K + ((long long)b * Hkv + hkv) * Nk * D;
    const float* Vh = V + ((long long)b * Hkv + hkv) * Nk * D;

    load_tile(Q_s, Qh, i0, BR, Nq);

    int lo[TM], hi[TM];
#pragma unroll
    for (int a = 0; a < TM; ++a) {
        lo[a] = row_lo(i0 + ty + TY * a, offset, left);
        hi[a] = row_hi(i0 + ty + TY * a, offset, right, Nk);
    }
    const int i_last = min(i0 + BR, Nq) - 1;
    const int kv_begin = row_lo(i0, offset, left), kv_end = row_hi(i_last, offset, right, Nk);
    const int full_lo = row_lo(i_last, offset, left), full_hi = row_hi(i0, offset, right, Nk);

    float m[TM], l[TM];  // m_i (log2 units) per row; l is this thread's partial row sum (its TN keys of each tile)
    float o[TM][DV][4];  // O_i block: rows ty + TY a, columns tx*4 + 4 TX c + e
#pragma unroll
    for (int a = 0; a < TM; ++a) {
        m[a] = -INFINITY, l[a] = 0.f;
#pragma unroll
        for (int c = 0; c < DV; ++c)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[a][c][e] = 0.f;
    }

#if KV_ASYNC
    load_rows_async<D, LDQ, NT>(KV_s, Kh, (kv_begin / BC) * BC, BC, Nk);  // the first K_j
    cp_async_commit();
#endif
    for (int j0 = (kv_begin / BC) * BC; j0 < kv_end; j0 += BC) {
        __syncthreads();  // previous V_j fully read (and Q_s complete on the first pass)
#if KV_ASYNC
        load_rows_async<D, LDQ, NT>(V_s, Vh, j0, BC, Nk);  // V_j lands while S_ij and P_ij are computed
        cp_async_commit();
        cp_async_wait<1>();  // this thread's copies of K_j have landed (V_j's may be in flight)
#else
        load_tile(KV_s, Kh, j0, BC, Nk);
#endif
        __syncthreads();

        // S_ij = Q_i K_j^T: each thread a TM x TN block, d consumed 4 at a time from float4 loads
        float s[TM][TN];
#pragma unroll
        for (int a = 0; a < TM; ++a)
#pragma unroll
            for (int n = 0; n < TN; ++n) s[a][n] = 0.f;
#pragma unroll 4
        for (int k = 0; k < D; k += 4) {
            float4 q[TM], kk[TN];
#pragma unroll
            for (int a = 0; a < TM; ++a) q[a] = *reinterpret_cast<const float4*>(&Q_s[ty + TY * a][k]);
#pragma unroll
            for (int n = 0; n < TN; ++n) kk[n] = *reinterpret_cast<const float4*>(&KV_s[tx + TX * n][k]);
#pragma unroll
            for (int a = 0; a < TM; ++a)
#pragma unroll
                for (int n = 0; n < TN; ++n) {
                    s[a][n] = fmaf(q[a].x, kk[n].x, s[a][n]);
                    s[a][n] = fmaf(q[a].y, kk[n].y, s[a][n]);
                    s[a][n] = fmaf(q[a].z, kk[n].z, s[a][n]);
                    s[a][n] = fmaf(q[a].w, kk[n].w, s[a][n]);
                }
        }

        // scale into log2 units; mask only tiles that straddle a row's [lo, hi) or the end of K
        const bool full = (j0 >= full_lo) && (j0 + BC <= full_hi);
#pragma unroll
        for (int a = 0; a < TM; ++a)
#pragma unroll
            for (int n = 0; n < TN; ++n) {
                const int j = j0 + tx + TX * n;
                s[a][n] = (full || (j >= lo[a] && j < hi[a])) ? s[a][n] * scale_log2 : -INFINITY;
            }

        // m_new = max(m_i, rowmax(S_ij)) over the row's TX threads (lanes differing in the low log2(TX) bits)
        // P_ij = exp(S_ij - m_new); l_i = exp(m_i - m_new) l_i + rowsum(P_ij); O_i = exp(m_i - m_new) O_i
#pragma unroll
        for (int a = 0; a < TM; ++a) {
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < TN; ++n) mx = fmaxf(mx, s[a][n]);
#pragma unroll
            for (int w = 1; w < TX; w <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, w));
            const float m_new = fmaxf(m[a], mx);
            const float m_use = (m_new == -INFINITY) ? 0.f : m_new;  // no key seen yet: keep everything 0, no NaN
            const float alpha = fast_exp2(m[a] - m_use);
            l[a] *= alpha;  // the row sum stays split over TX threads; they all use the same alpha
#pragma unroll
            for (int c = 0; c < DV; ++c)
#pragma unroll
                for (int e = 0; e < 4; ++e) o[a][c][e] *= alpha;
#pragma unroll
            for (int n = 0; n < TN; ++n) {
                const float p = fast_exp2(s[a][n] - m_use);
                l[a] += p;
                P_s[ty + TY * a][tx + TX * n] = p;
            }
            m[a] = m_new;
        }
        __syncthreads();  // P_s complete; every thread is done reading K_j
#if KV_ASYNC
        if (j0 + BC < kv_end) load_rows_async<D, LDQ, NT>(KV_s, Kh, j0 + BC, BC, Nk);  // K_{j+1} lands during P_ij V_j
        cp_async_commit();  // (an empty group on the last tile keeps the count of groups in flight uniform)
        cp_async_wait<1>();  // this thread's copies of V_j have landed
#else
        load_tile(KV_s, Vh, j0, BC, Nk);
#endif
        __syncthreads();

        // O_i += P_ij V_j: keys consumed 4 at a time (one float4 of P per row)
#pragma unroll 2
        for (int c4 = 0; c4 < BC; c4 += 4) {
            float4 p[TM];
#pragma unroll
            for (int a = 0; a < TM; ++a) p[a] = *reinterpret_cast<const float4*>(&P_s[ty + TY * a][c4]);
#pragma unroll
            for (int cc = 0; cc < 4; ++cc) {
                float4 v[DV];
#pragma unroll
                for (int c = 0; c < DV; ++c) v[c] = *reinterpret_cast<const float4*>(&V_s[c4 + cc][tx * 4 + 4 * TX * c]);
#pragma unroll
                for (int a = 0; a < TM; ++a) {
                    const float pa = cc == 0 ? p[a].x : cc == 1 ? p[a].y : cc == 2 ? p[a].z : p[a].w;
#pragma unroll
                    for (int c = 0; c < DV; ++c) {
                        o[a][c][0] = fmaf(pa, v[c].x, o[a][c][0]);
                        o[a][c][1] = fmaf(pa, v[c].y, o[a][c][1]);
                        o[a][c][2] = fmaf(pa, v[c].z, o[a][c][2]);
                        o[a][c][3] = fmaf(pa, v[c].w, o[a][c][3]);
                    }
                }
            }
        }
    }

    // l_i = sum of the TX partial sums;  O_i = O_i / l_i;  lse_i = m_i + log(l_i)
#pragma unroll
    for (int a = 0; a < TM; ++a) {
        float la = l[a];
#pragma unroll
        for (int w = 1; w < TX; w <<= 1) la += __shfl_xor_sync(0xffffffffu, la, w);
        const int i = i0 + ty + TY * a;
        if (i < Nq) {
            const float inv_l = (la > 0.f) ? 1.f / la : 0.f;  // a row that saw no key: O = 0
            float* Oi = O + (((long long)b * Hq + hq) * Nq + i) * D;
#pragma unroll
            for (int c = 0; c < DV; ++c)
                *reinterpret_cast<float4*>(Oi + tx * 4 + 4 * TX * c) =
                    make_float4(o[a][c][0] * inv_l, o[a][c][1] * inv_l, o[a][c][2] * inv_l, o[a][c][3] * inv_l);
            if (tx == 0)
                lse[((long long)b * Hq + hq) * Nq + i] = (la > 0.f) ? (m[a] + log2f(la)) * 0.6931471805599453f : -INFINITY;
        }
    }
}
