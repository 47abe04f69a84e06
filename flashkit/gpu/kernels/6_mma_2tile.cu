// Rung 6: rung 5 with two 16-row m-tiles per warp (FA2's 4 warps x 32 rows) and Q_i re-read from shared memory.
// Changed since rung 5: each warp owns 32 query rows (MT = 2 m-tiles) instead of 16, so every K_j / V_j
//   fragment loaded by ldmatrix feeds 2 mma instead of 1 (half the ldmatrix per mma); Br = 32 x warps, so
//   Br = 128 runs 4 warps (128 threads). Q_i's fragments are re-read from shared memory per K_j tile
//   instead of living in 32-64 registers, to make room for O_i (2 x d/2 floats per thread) and S.
// Why: rung 5 issues one ldmatrix.x4 per 2 mma; torch's flash backend (FA2) uses this partition.
//   ptxas (sm_90a): 225 registers at d = 64 (Br x Bc = 128 x 64), 255 and 56 bytes of spills at d = 128
//   (128 x 64; 832 bytes at 128 x 128); rung 5 uses 127 / 245 with none.
// Expected: 5-15% over rung 5 at d = 64 and 128 (N = 4096, fp16), toward torch flash.
// Measured on an H100 80GB HBM3 (N = 4096, B*N = 16384, H*d = 2048, 128 x 64), in the committed results file
//   (tests/test_rung_headers.py checks these lines against it; ratio = torch flash time / rung time):
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=64 dtype=float16 causal=False): 276.6 TFLOP/s, 0.97x torch-flash
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=128 dtype=float16 causal=False): 321.9 TFLOP/s, 1.01x torch-flash
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=128 dtype=bfloat16 causal=False): 321.5 TFLOP/s, 0.94x torch-flash
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=64 dtype=float16 causal=True): 253.8 TFLOP/s, 0.93x torch-flash
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=128 dtype=float16 causal=True): 279.3 TFLOP/s, 0.94x torch-flash
//   Goal (>= torch flash) met at d = 128 fp16 non-causal only (1.01x); d = 64, bf16 and causal stay at 0.92-0.97x.
//   The first side-by-side run (2026-11-25, two passes, rung 5 in the same run): 272.8 / 264.1 TFLOP/s at d = 64,
//   303.4 / 302.7 at d = 128, vs rung 5's 239.8 / 236.6 and 267.2 / 263.8: +11-15%. Bc = 128 at d = 128 spills
//   and halves the speed (174 TFLOP/s). Details: benchmarks/NOTES-gpu.md.
//
// Paper names: Br, Bc, Q_i, K_j, V_j, S = Q_i K_j^T * scale (log2 units), P = exp2(S - m_i), m_i, l_i, O_i.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef INFINITY  // NVRTC has no <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif

#ifndef HEAD_DIM
#define HEAD_DIM 64  // d: 32, 64 or 128 (set by the loader)
#endif
#ifndef BR
#define BR 128  // query rows per block, 32 per warp (set by the loader: 64 or 128)
#endif
#ifndef BC
#define BC 64   // keys per K_j / V_j tile (set by the loader: 32, 64 or 128)
#endif
#define D HEAD_DIM
#define MT 2  // 16-row m-tiles per warp
#define NW (BR / (16 * MT))
#define NT (32 * NW)
#define LDS (D + 8)  // shared row pitch in 16-bit elements (+16 bytes: ldmatrix rows hit distinct banks)

#ifdef USE_BF16
typedef __nv_bfloat16 T;
#define MMA_TYPE "bf16"
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}
#else
typedef __half T;
#define MMA_TYPE "f16"
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}
#endif

// C (16x8, fp32) += A (16x16) * B (16x8); fragment layouts as in rung 4 (PTX ISA, lane = 4 g + t).
__device__ __forceinline__ void mma16816(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Four 8x8 16-bit matrices; lanes 8m..8m+7 give the row addresses of matrix m, register m receives it
// in fragment layout (lane 4g + t holds row g, columns 2t, 2t+1; with .trans: rows 2t, 2t+1 of column g).
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const T* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const T* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
// 16 bytes global -> shared without passing through registers; src_bytes = 0 writes zeros (rows past N).
__device__ __forceinline__ void cp_async16(T* dst, const T* src, bool valid) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ int row_lo(int i, int offset, int left) { return left < 0 ? 0 : max(0, i + offset - left); }
__device__ __forceinline__ int row_hi(int i, int offset, int right, int Nk) {
    return right < 0 ? Nk : min(Nk, i + offset + right + 1);
}

// rows [row0, row0 + nrows) of a (N, D) matrix into a [nrows][LDS] shared tile by cp.async (rows >= N: 0).
// A row past N still gets a valid source address (row N - 1) although no byte is read from it.
__device__ __forceinline__ void async_tile(T (*dst)[LDS], const T* __restrict__ src, int row0, int nrows, int N) {
    for (int f = threadIdx.x; f < nrows * (D / 8); f += NT) {
        const int r = f / (D / 8), c = (f % (D / 8)) * 8;
        const bool valid = row0 + r < N;
        cp_async16(&dst[r][c], src + (long long)(valid ? row0 + r : N - 1) * D + c, valid);
    }
}

// Hooks for score_mod / mask_mod / block masks (flashkit/gpu/flash_mods.py defines them before this file,
// from code generated by flashkit/gpu/modlang.py); these defaults are the plain rung 6, unchanged.
#ifndef FK_PARAMS
#define FK_PARAMS                                // more kernel parameters: tile lists, captured arrays
#define FK_TILES(n) (n)                          // how many K_j tiles this block row visits
#define FK_J0(it) (j_first + (it) * BC)          // the first key of the it-th
#define FK_FULL(it, full) (full)                 // whether the it-th tile needs no per-element test
#define FK_KEEP(i, j, it, in) (in)               // score (i, j) stays: in the window, and mask_mod / bits
#define FK_SCORES(s, it, j0)                     // score_mod on the tile's scores, in registers
#define FK_ROW_DONE(i, l)                        // a row's final sum l_i (NaN: score_mod gave NaN or +inf)
#endif

// Grid: (Tr, Hq, B), block: Br threads (Br / 32 warps, 32 rows each).
// Dynamic shared memory: Q_s [BR][LDS], K_s [2][BC][LDS] (two stages), V_s [BC][LDS] (one).
extern "C" __global__ void __launch_bounds__(NT) flash_fwd(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
    T* __restrict__ O, float* __restrict__ lse,
    int Hq, int Hkv, int Nq, int Nk, float scale_log2, int left, int right FK_PARAMS) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T(*Q_s)[LDS] = reinterpret_cast<T(*)[LDS]>(smem_raw);
    T(*K_s)[BC][LDS] = reinterpret_cast<T(*)[BC][LDS]>(smem_raw + sizeof(T) * BR * LDS);
    T(*V_s)[LDS] = reinterpret_cast<T(*)[LDS]>(smem_raw + sizeof(T) * (BR + 2 * BC) * LDS);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    // Heavy tiles first: with causal masking the last query tiles see the most keys.
    const int i0 = (gridDim.x - 1 - blockIdx.x) * BR, hq = blockIdx.y, b = blockIdx.z;
    const int hkv = hq / (Hq / Hkv);
    const int offset = Nk - Nq;
    const T* Qh = Q + ((long long)b * Hq + hq) * Nq * D;
    const T* Kh = K + ((long long)b * Hkv + hkv) * Nk * D;
    const T* Vh = V + ((long long)b * Hkv + hkv) * Nk * D;

    const int wr = warp * 16 * MT;  // this warp's rows: wr + 16 mt + g (+ 8)
    const int i_last = min(i0 + BR, Nq) - 1;
    const int kv_begin = row_lo(i0, offset, left), kv_end = row_hi(i_last, offset, right, Nk);
    const int full_lo = row_lo(i_last, offset, left), full_hi = row_hi(i0, offset, right, Nk);
    const int j_first = (kv_begin / BC) * BC;
    const int n_tiles = FK_TILES(kv_end > j_first ? (kv_end - j_first + BC - 1) / BC : 0);

    // Prologue: Q_i and K_0 in flight together (one cp.async group).
    async_tile(Q_s, Qh, i0, BR, Nq);
    if (n_tiles > 0) async_tile(K_s[0], Kh, FK_J0(0), BC, Nk);
    cp_async_commit();

    float m[MT][2], l[MT][2];  // m_i in log2 units; l is this thread's partial sum
    float o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.f;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
    }

    for (int it = 0; it < n_tiles; ++it) {
        const int kb = it & 1, j0 = FK_J0(it);
        // V_j starts loading now and lands while S = Q_i K_j^T is computed (V_s was freed by the last barrier).
        async_tile(V_s, Vh, j0, BC, Nk);
        cp_async_commit();
        cp_async_wait<1>();  // all groups but the newest (V_j) are complete: Q_i and K_j are in shared memory
        __syncthreads();

        // S_ij = Q_i K_j^T (unscaled). Per 16-wide slice kk of d: the Q fragments of both m-tiles (from shared
        // memory), then each ldmatrix.x4 of K_j (two 8-key groups) feeds 2 x MT mma.
        float s[MT][BC / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < BC / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned q[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldmatrix_x4(q[mt], &Q_s[wr + 16 * mt + (lane & 15)][16 * kk + 8 * (lane >> 4)]);
#pragma unroll
            for (int n2 = 0; n2 < BC / 16; ++n2) {
                unsigned kf[4];
                ldmatrix_x4(kf, &K_s[kb][16 * n2 + (lane & 7) + 8 * (lane >> 4)][16 * kk + 8 * ((lane >> 3) & 1)]);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816(s[mt][2 * n2], q[mt], kf[0], kf[1]);
                    mma16816(s[mt][2 * n2 + 1], q[mt], kf[2], kf[3]);
                }
            }
        }

        // K_{j+1} starts loading into the other K buffer (last read before this pass's first barrier).
        if (it + 1 < n_tiles) async_tile(K_s[kb ^ 1], Kh, FK_J0(it + 1), BC, Nk);
        cp_async_commit();

        // the per-element mask only where the tile is not FULL for every row of Q_i
        const bool full = FK_FULL(it, (j0 >= full_lo) && (j0 + BC <= full_hi));
        if (!full) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = i0 + wr + 16 * mt + g + 8 * (e >> 1);
                    const int lo = row_lo(i, offset, left), hi = row_hi(i, offset, right, Nk);
#pragma unroll
                    for (int n = 0; n < BC / 8; ++n) {
                        const int j = j0 + 8 * n + 2 * t + (e & 1);
                        if (!FK_KEEP(i, j, it, j >= lo && j < hi)) s[mt][n][e] = -INFINITY;
                    }
                }
        }
        FK_SCORES(s, it, j0);

        // m_new = max(m_i, rowmax(S_ij) * scale_log2); P_ij = exp2(S_ij * scale_log2 - m_new) (one FFMA + ex2);
        // l_i = exp2(m_i - m_new) l_i + rowsum(P_ij);  O_i = exp2(m_i - m_new) O_i
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = -INFINITY;
#pragma unroll
                for (int n = 0; n < BC / 8; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m[mt][r], mx * scale_log2);  // scale > 0, so the max commutes with it
                const float m_use = (m_new == -INFINITY) ? 0.f : m_new;
                const float alpha = fast_exp2(m[mt][r] - m_use);
                l[mt][r] *= alpha;
#pragma unroll
                for (int n = 0; n < D / 8; ++n) o[mt][n][2 * r] *= alpha, o[mt][n][2 * r + 1] *= alpha;
#pragma unroll
                for (int n = 0; n < BC / 8; ++n) {
                    s[mt][n][2 * r] = fast_exp2(fmaf(s[mt][n][2 * r], scale_log2, -m_use));
                    s[mt][n][2 * r + 1] = fast_exp2(fmaf(s[mt][n][2 * r + 1], scale_log2, -m_use));
                    l[mt][r] += s[mt][n][2 * r] + s[mt][n][2 * r + 1];
                }
                m[mt][r] = m_new;
            }

        cp_async_wait<1>();  // all but the newest group (K_{j+1}) complete: V_j has landed
        __syncthreads();

        // O_i += P_ij V_j: P from the S registers (packed to 16 bits); each ldmatrix.x4.trans of V_j (two
        // 8-column groups) feeds 2 x MT mma.
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            unsigned p[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                p[mt][0] = pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                p[mt][1] = pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                p[mt][2] = pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                p[mt][3] = pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int n2 = 0; n2 < D / 16; ++n2) {
                unsigned vf[4];
                ldmatrix_x4_trans(vf, &V_s[16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)][16 * n2 + 8 * (lane >> 4)]);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816(o[mt][2 * n2], p[mt], vf[0], vf[1]);
                    mma16816(o[mt][2 * n2 + 1], p[mt], vf[2], vf[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with V_s (and K_s[kb]) before they are refilled
    }
    cp_async_wait<0>();  // nothing may be left in flight when the block exits (n_tiles = 0: Q_i's group)

    // l_i = sum over the row's 4 threads; O_i = O_i / l_i; lse_i = m_i + log(l_i)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float lr = l[mt][r];
            lr += __shfl_xor_sync(0xffffffffu, lr, 1);
            lr += __shfl_xor_sync(0xffffffffu, lr, 2);
            const int i = i0 + wr + 16 * mt + g + 8 * r;
            if (i < Nq) {
                FK_ROW_DONE(i, lr);
                const float inv_l = (lr > 0.f) ? 1.f / lr : 0.f;
                T* Oi = O + (((long long)b * Hq + hq) * Nq + i) * D;
#pragma unroll
                for (int n = 0; n < D / 8; ++n)
                    *reinterpret_cast<unsigned*>(Oi + 8 * n + 2 * t) =
                        pack2(o[mt][n][2 * r] * inv_l, o[mt][n][2 * r + 1] * inv_l);
                if (t == 0)
                    lse[((long long)b * Hq + hq) * Nq + i] =
                        (lr > 0.f) ? (m[mt][r] + log2f(lr)) * 0.6931471805599453f : -INFINITY;
            }
        }
}
