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

#include "mma.cuh"

// Grid: (Tr, Hq, B), block: Br threads (Br / 32 warps, 32 rows each).
// Dynamic shared memory: Q_s [BR][LDS], K_s [2][BC][LDS] (two stages), V_s [BC][LDS] (one).
extern "C" __global__ void __launch_bounds__(NT) flash_fwd(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
    T* __restrict__ O, float* __restrict__ lse,
    int Hq, int Hkv, int Nq, int Nk, float scale_log2, int left, int right) {
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
    const int n_tiles = kv_end > j_first ? (kv_end - j_first + BC - 1) / BC : 0;

    // Prologue: Q_i and K_0 in flight together (one cp.async group).
    async_tile(Q_s, Qh, i0, BR, Nq);
    if (n_tiles > 0) async_tile(K_s[0], Kh, j_first, BC, Nk);
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
        const int kb = it & 1, j0 = j_first + it * BC;
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
        if (it + 1 < n_tiles) async_tile(K_s[kb ^ 1], Kh, j0 + BC, BC, Nk);
        cp_async_commit();

        // the per-element mask only where the tile is not FULL for every row of Q_i
        const bool full = (j0 >= full_lo) && (j0 + BC <= full_hi);
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
                        if (!(j >= lo && j < hi)) s[mt][n][e] = -INFINITY;
                    }
                }
        }

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
