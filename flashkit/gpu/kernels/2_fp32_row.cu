// Rung 2: fp32, one thread per query row, K_j and V_j tiles staged in shared memory.
// Changed since rung 1 (cupy-standard): S and P never reach global memory. Each thread owns one query
//   row and keeps its online-softmax state (m_i, l_i, O_i) in registers while the block walks over
//   K_j, V_j tiles (flash-attention-minimal's design, plus bounds checks for any N, Nq != Nk, GQA, lse).
// Why: rung 1 writes and reads the Nq x Nk matrices S and P through HBM; here HBM traffic is O(N d).
// Expected: memory traffic is no longer the limit; shared-memory loads are (one LDS per FMA for Q_s)
//   and each dot product is one dependent FMA chain, so a few TFLOP/s at best.
// Measured (H100 80GB HBM3, fp32, B*N = 16384, H*d = 2048, N = 4096, non-causal): 21.9 TFLOP/s at d = 64,
//   11.2 at d = 128 (0.63 / 0.25 of torch's efficient kernel): far above the prediction at d = 64, not yet
//   explained (no profile taken); at d = 128 ptxas spills 96 bytes (o[128] in registers) and 74 KB of
//   shared memory allow 3 blocks (6 warps) per SM. Details: benchmarks/NOTES-gpu.md.
// Measured on an H100 80GB HBM3 (B*N = 16384, H*d = 2048), default blocks, in the committed results file
//   (tests/test_rung_headers.py checks these lines against it; ratio = the peer's time / the rung's):
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=64 dtype=float32 causal=False): 21.9 TFLOP/s, 0.63x torch-efficient
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=64 dtype=float32 causal=True): 20.0 TFLOP/s, 0.61x torch-efficient
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=128 dtype=float32 causal=False): 11.2 TFLOP/s, 0.24x torch-efficient
// Measured (gpu-h100-80gb-hbm3.json; N=4096 d=128 dtype=float32 causal=True): 10.2 TFLOP/s, 0.23x torch-efficient
//
// Paper names: Br query rows per block (= threads), Bc keys per tile, Q_i the block's query rows,
// K_j / V_j the current key/value tile, S = Q_i K_j^T * scale, P = exp(S - m_i), m_i running row max,
// l_i running row sum, O_i running (un-normalised) output. Scores are kept in log2 units
// (scale_log2 = scale * log2(e)) so that exp() is one ex2 instruction.

#ifndef HEAD_DIM
#define HEAD_DIM 64  // d, set by the loader (-DHEAD_DIM=...); 32, 64 or 128
#endif
#ifndef BR
#define BR 64  // query rows per block = threads per block (one row each)
#endif
#ifndef BC
#define BC 32  // keys per K_j / V_j tile
#endif
#define D HEAD_DIM
#define LDQ (D + 1)  // Q_s row pitch in floats: +1 so that thread t reading Q_s[t][k] hits bank (t + k) % 32

#include "common.cuh"

// Grid: (Tr = ceil(Nq / Br), Hq, B). Block: Br threads. Dynamic shared memory (floats):
//   Q_s [Br][D+1], K_s [Bc][D], V_s [Bc][D], S_s [Bc][Br] (each thread's row of S, as in flash-attention-minimal;
//   in registers it would need a fully unrolled Bc x d loop nest, which takes NVRTC ~50 s to compile).
extern "C" __global__ void __launch_bounds__(BR) flash_fwd(
    const float* __restrict__ Q,  // (B, Hq, Nq, d)
    const float* __restrict__ K,  // (B, Hkv, Nk, d)
    const float* __restrict__ V,  // (B, Hkv, Nk, d)
    float* __restrict__ O,        // (B, Hq, Nq, d)
    float* __restrict__ lse,      // (B, Hq, Nq), natural log
    int Hq, int Hkv, int Nq, int Nk, float scale_log2, int left, int right) {
    extern __shared__ __align__(16) float smem[];
    float(*Q_s)[LDQ] = reinterpret_cast<float(*)[LDQ]>(smem);
    float(*K_s)[D] = reinterpret_cast<float(*)[D]>(smem + BR * LDQ);
    float(*V_s)[D] = reinterpret_cast<float(*)[D]>(smem + BR * LDQ + BC * D);
    float(*S_s)[BR] = reinterpret_cast<float(*)[BR]>(smem + BR * LDQ + 2 * BC * D);

    const int tid = threadIdx.x;
    const int i0 = blockIdx.x * BR;  // first query row of Q_i
    const int hq = blockIdx.y, b = blockIdx.z;
    const int hkv = hq / (Hq / Hkv);  // GQA: query heads hq share K/V head hq // group
    const int offset = Nk - Nq;
    const float* Qh = Q + ((long long)b * Hq + hq) * Nq * D;
    const float* Kh = K + ((long long)b * Hkv + hkv) * Nk * D;
    const float* Vh = V + ((long long)b * Hkv + hkv) * Nk * D;

    // Load Q_i into shared memory (coalesced: consecutive threads read consecutive floats); rows past Nq are 0.
    for (int f = tid; f < BR * D; f += BR) {
        int r = f / D, c = f % D;
        Q_s[r][c] = (i0 + r < Nq) ? Qh[(long long)(i0 + r) * D + c] : 0.f;
    }

    const int i = i0 + tid;  // this thread's query row
    const int lo = row_lo(i, offset, left), hi = row_hi(i, offset, right, Nk);
    // The block only visits tiles that some row of Q_i can see (causal/window tiles outside are skipped).
    const int i_last = min(i0 + BR, Nq) - 1;
    const int kv_begin = row_lo(i0, offset, left), kv_end = row_hi(i_last, offset, right, Nk);

    float m_i = -INFINITY, l_i = 0.f;  // running max (log2 units) and running sum
    float o[D];                        // O_i row, un-normalised; in registers (indices are compile-time)
#pragma unroll
    for (int k = 0; k < D; ++k) o[k] = 0.f;

    for (int j0 = (kv_begin / BC) * BC; j0 < kv_end; j0 += BC) {
        __syncthreads();  // every thread is done with the previous K_j, V_j (and Q_s is complete)
        // Load K_j, V_j (float4 = 16-byte loads); keys past Nk are 0.
        for (int f = tid; f < BC * D / 4; f += BR) {
            int r = f / (D / 4), c = (f % (D / 4)) * 4;
            float4 kv = make_float4(0.f, 0.f, 0.f, 0.f), vv = kv;
            if (j0 + r < Nk) {
                kv = *reinterpret_cast<const float4*>(Kh + (long long)(j0 + r) * D + c);
                vv = *reinterpret_cast<const float4*>(Vh + (long long)(j0 + r) * D + c);
            }
            *reinterpret_cast<float4*>(&K_s[r][c]) = kv;
            *reinterpret_cast<float4*>(&V_s[r][c]) = vv;
        }
        __syncthreads();

        // S_ij = Q_i K_j^T * scale  (this row's Bc scores, kept in S_s[c][tid]); keys the row may not see get -inf
        float m_tile = -INFINITY;
#pragma unroll 1
        for (int c = 0; c < BC; ++c) {
            float acc = 0.f;
#pragma unroll
            for (int k = 0; k < D; ++k) acc = fmaf(Q_s[tid][k], K_s[c][k], acc);  // K_s[c][k]: one address, broadcast
            const int j = j0 + c;
            const float s = (j >= lo && j < hi) ? acc * scale_log2 : -INFINITY;
            S_s[c][tid] = s;  // column tid: consecutive threads, consecutive banks
            m_tile = fmaxf(m_tile, s);
        }

        // m_new = max(m_i, rowmax(S_ij));  P_ij = exp(S_ij - m_new);  l_i = exp(m_i - m_new) l_i + rowsum(P_ij)
        const float m_new = fmaxf(m_i, m_tile);
        const float m_use = (m_new == -INFINITY) ? 0.f : m_new;  // a row that saw nothing yet: exp(-inf - 0) = 0, no NaN
        const float alpha = fast_exp2(m_i - m_use);
        l_i *= alpha;
#pragma unroll
        for (int k = 0; k < D; ++k) o[k] *= alpha;

        // O_i = exp(m_i - m_new) O_i + P_ij V_j
#pragma unroll 1
        for (int c = 0; c < BC; ++c) {
            const float p = fast_exp2(S_s[c][tid] - m_use);
            l_i += p;
#pragma unroll
            for (int k = 0; k < D; ++k) o[k] = fmaf(p, V_s[c][k], o[k]);
        }
        m_i = m_new;
    }

    // O_i = O_i / l_i;  lse_i = m_i + log(l_i)   (a row that saw no key: O = 0, lse = -inf)
    if (i < Nq) {
        float* Oi = O + (((long long)b * Hq + hq) * Nq + i) * D;
        const float inv_l = (l_i > 0.f) ? 1.f / l_i : 0.f;
#pragma unroll
        for (int k = 0; k < D; k += 4)
            *reinterpret_cast<float4*>(Oi + k) = make_float4(o[k] * inv_l, o[k + 1] * inv_l, o[k + 2] * inv_l, o[k + 3] * inv_l);
        lse[((long long)b * Hq + hq) * Nq + i] = (l_i > 0.f) ? (m_i + log2f(l_i)) * 0.6931471805599453f : -INFINITY;
    }
}
