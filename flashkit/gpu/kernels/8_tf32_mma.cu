// Rung 8: float32 inputs on the tensor cores as TF32 (opt-in: flashkit.attention(..., precision="tf32")).
// Changed since rung 3 (exact fp32 FMAs): both products run as mma.sync.m16n8k8 with TF32 operands (8 bits of
//   exponent, 10 of mantissa: Q, K, P and V are rounded to nearest by cvt.rna.tf32.f32 as their fragments are
//   loaded) and fp32 accumulation; the softmax and O stay fp32. Rung 4's FA2 partition: 4 warps x 16 query
//   rows, Q fragments in registers for the whole kernel. P goes from the S accumulators to the A operand of
//   P V without leaving registers: the C fragment of m16n8 holds columns 2t, 2t+1 of each 8-key block and the
//   A fragment of m16n8k8 wants k = t and t + 4, so the 8 keys of a block are taken in the order 0, 2, 4, 6,
//   1, 3, 5, 7 for P V (V's B fragment reads rows 2t and 2t + 1 to match): a permutation of the sum over keys.
//   K_j and V_j are fp32 in shared memory, row pitch d + 4 floats (every fragment load conflict-free), two
//   stages filled by cp.async while the other is computed.
// Why: fp32 FMAs stop at ~50 TFLOP/s on this card; TF32 tensor cores reach 374 (GEMM ceiling measured on the
//   H200). The price is TF32's rounding (relative 2^-11 per operand), measured by flashkit.gpu.check against
//   a reference with the same roundings, and beside the speed in the results file.
// Expected (written before the first run): 100-200 TFLOP/s (mma.sync with plain shared-memory loads: rung 4
//   reached 154 TFLOP/s in fp16 on an H100).
// Measured on an NVIDIA H200 (B*N = 16384, H*d = 2048, default blocks; ratio = torch efficient's fp32 time / the
//   rung's, in the same run; "max rel err" = max|O - O_64| / max|O_64| on batch 0, head 0 against float64
//   attention of the same inputs): 91-96 TFLOP/s, 2.1-2.7x torch efficient, 25% of the 374 TFLOP/s TF32 GEMM
//   ceiling and under the expectation; its error 2.7e-4 - 6.3e-4 where rung 3 (exact fp32) has 2.4e-7 - 2.7e-6 and
//   torch efficient 2.6e-7 - 2.0e-6 (fwd-issue11-h200.json). flashkit.gpu.check holds it to twice the error of
//   a reference with the same TF32 roundings: 30/30 with rung 3 (check-forward-h200-rungs-3-8.json), memcheck
//   and racecheck clean. The public call (precision="tf32") is 1.012-1.026x the rung alone.
// Measured (fwd-issue11-h200.json; N=4096 d=64 dtype=float32 causal=False): 95.6 TFLOP/s, 2.68x torch-efficient, max rel err 4.9e-04
// Measured (fwd-issue11-h200.json; N=4096 d=64 dtype=float32 causal=True): 90.9 TFLOP/s, 2.68x torch-efficient, max rel err 2.7e-04
// Measured (fwd-issue11-h200.json; N=4096 d=128 dtype=float32 causal=False): 95.1 TFLOP/s, 2.08x torch-efficient, max rel err 6.3e-04
// Measured (fwd-issue11-h200.json; N=4096 d=128 dtype=float32 causal=True): 91.1 TFLOP/s, 2.07x torch-efficient, max rel err 3.1e-04
// Not tried yet: ldmatrix-free fragment loads are 2 LDS.32 per mma; K/V fragments converted once per tile in
//   shared memory instead of per load; Br = 128 (8 warps) to halve the K/V traffic per query row.
//
// Paper names: Br = 64, Bc, Q_i, K_j, V_j, S = Q_i K_j^T * scale (log2 units), P = exp2(S - m_i), m_i, l_i, O_i.

#include "common.cuh"  // INFINITY, fast_exp2, row_lo / row_hi
#include "fp32_async.cuh"  // cp.async of fp32 tiles

#ifndef HEAD_DIM
#define HEAD_DIM 64  // d: 32, 64 or 128 (set by the loader)
#endif
#ifndef BC
#define BC 64  // keys per K_j / V_j tile (set by the loader: 32 or 64)
#endif
#define D HEAD_DIM
#define NW 4          // warps per block
#define BR (16 * NW)  // query rows per block: 16 per warp
#define NT (32 * NW)
#define LDS (D + 4)   // shared row pitch in floats: D + 4 = 4 (mod 32), so rows g = 0..7 start 4 banks apart

__device__ __forceinline__ unsigned tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}
// D (16 x 8, fp32) += A (16 x 8, tf32, row) * B (8 x 8, tf32, col). Fragments (lane = 4 g + t):
// A: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); B: b0 (k = t, n = g), b1 (k = t + 4, n = g);
// C/D: c0, c1 (g, 2t and 2t + 1), c2, c3 (g + 8, 2t and 2t + 1).
__device__ __forceinline__ void mma1688(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// rows [row0, row0 + BC) of a (N, D) matrix into a [BC][LDS] shared tile by cp.async (fp32_async.cuh).
__device__ __forceinline__ void load_tile_async(float (*dst)[LDS], const float* __restrict__ src, int row0, int N) {
    load_rows_async<D, LDS, NT>(dst, src, row0, BC, N);
}

// Grid: (Tr, Hq, B), block: 128 threads. Dynamic shared memory: K_s [2][BC][LDS], V_s [2][BC][LDS], fp32.
extern "C" __global__ void __launch_bounds__(NT) flash_fwd(
    const float* __restrict__ Q, const float* __restrict__ K, const float* __restrict__ V,
    float* __restrict__ O, float* __restrict__ lse,
    int Hq, int Hkv, int Nq, int Nk, float scale_log2, int left, int right) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float(*K_s)[BC][LDS] = reinterpret_cast<float(*)[BC][LDS]>(smem_raw);
    float(*V_s)[BC][LDS] = K_s + 2;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * BR, hq = blockIdx.y, b = blockIdx.z;  // heavy (causal) tiles first
    const int hkv = hq / (Hq / Hkv);
    const int offset = Nk - Nq;
    const float* Qh = Q + ((long long)b * Hq + hq) * Nq * D;
    const float* Kh = K + ((long long)b * Hkv + hkv) * Nk * D;
    const float* Vh = V + ((long long)b * Hkv + hkv) * Nk * D;

    const int wr = warp * 16;
    int lo[2], hi[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        lo[r] = row_lo(i0 + wr + g + 8 * r, offset, left);
        hi[r] = row_hi(i0 + wr + g + 8 * r, offset, right, Nk);
    }
    const int i_last = min(i0 + BR, Nq) - 1;
    const int kv_begin = row_lo(i0, offset, left), kv_end = row_hi(i_last, offset, right, Nk);
    const int full_lo = row_lo(i_last, offset, left), full_hi = row_hi(i0, offset, right, Nk);
    const int j_first = (kv_begin / BC) * BC;
    const int n_tiles = kv_end > j_first ? (kv_end - j_first + BC - 1) / BC : 0;

    if (n_tiles > 0) {  // tile 0 is in flight while Q's fragments are read
        load_tile_async(K_s[0], Kh, j_first, Nk);
        load_tile_async(V_s[0], Vh, j_first, Nk);
    }
    cp_async_commit();

    // Q_i straight from global memory to TF32 fragments, once (rows >= Nq read as 0)
    unsigned q[D / 8][4];
    const int ra = i0 + wr + g, rb = ra + 8;
#pragma unroll
    for (int kk = 0; kk < D / 8; ++kk) {
        q[kk][0] = tf32(ra < Nq ? Qh[(long long)ra * D + 8 * kk + t] : 0.f);
        q[kk][1] = tf32(rb < Nq ? Qh[(long long)rb * D + 8 * kk + t] : 0.f);
        q[kk][2] = tf32(ra < Nq ? Qh[(long long)ra * D + 8 * kk + t + 4] : 0.f);
        q[kk][3] = tf32(rb < Nq ? Qh[(long long)rb * D + 8 * kk + t + 4] : 0.f);
    }

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

    for (int it = 0; it < n_tiles; ++it) {
        const int st = it & 1, j0 = j_first + it * BC;
        __syncthreads();  // every warp is done with stage st ^ 1 (tile it - 1)
        if (it + 1 < n_tiles) {
            load_tile_async(K_s[st ^ 1], Kh, j0 + BC, Nk);
            load_tile_async(V_s[st ^ 1], Vh, j0 + BC, Nk);
        }
        cp_async_commit();
        cp_async_wait<1>();  // this thread's copies of tile it have landed
        __syncthreads();     // ... and every thread's

        // S = Q_i K_j^T: B[k][n] = K_j[n][k]
        float s[BC / 8][4];
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 8; ++kk)
                mma1688(s[n], q[kk], tf32(K_s[st][8 * n + g][8 * kk + t]), tf32(K_s[st][8 * n + g][8 * kk + t + 4]));
        }
        // scale into log2 units; the per-element mask only where the tile is not FULL for every row of Q_i
        const bool full = (j0 >= full_lo) && (j0 + BC <= full_hi);
#pragma unroll
        for (int n = 0; n < BC / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1, j = j0 + 8 * n + 2 * t + (e & 1);
                s[n][e] = (full || (j >= lo[r] && j < hi[r])) ? s[n][e] * scale_log2 : -INFINITY;
            }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < BC / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[r], mx);
            const float m_use = (m_new == -INFINITY) ? 0.f : m_new;
            const float alpha = fast_exp2(m[r] - m_use);
            l[r] *= alpha;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) o[n][2 * r] *= alpha, o[n][2 * r + 1] *= alpha;
#pragma unroll
            for (int n = 0; n < BC / 8; ++n) {
                s[n][2 * r] = fast_exp2(s[n][2 * r] - m_use);
                s[n][2 * r + 1] = fast_exp2(s[n][2 * r + 1] - m_use);
                l[r] += s[n][2 * r] + s[n][2 * r + 1];
            }
            m[r] = m_new;
        }
        // O_i += P V_j, 8 keys at a time in the order 0, 2, 4, 6, 1, 3, 5, 7 (see the header)
#pragma unroll
        for (int kk = 0; kk < BC / 8; ++kk) {
            const unsigned p[4] = {tf32(s[kk][0]), tf32(s[kk][2]), tf32(s[kk][1]), tf32(s[kk][3])};
            const int k0 = 8 * kk + 2 * t;
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                mma1688(o[n], p, tf32(V_s[st][k0][8 * n + g]), tf32(V_s[st][k0 + 1][8 * n + g]));
        }
    }
    cp_async_wait<0>();

    // l_i = sum over the row's 4 threads; O_i = O_i / l_i; lse_i = m_i + log(l_i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float lr = l[r];
        lr += __shfl_xor_sync(0xffffffffu, lr, 1);
        lr += __shfl_xor_sync(0xffffffffu, lr, 2);
        const int i = i0 + wr + g + 8 * r;
        if (i < Nq) {
            const float inv_l = (lr > 0.f) ? 1.f / lr : 0.f;  // a row that saw no key: O = 0
            float* Oi = O + (((long long)b * Hq + hq) * Nq + i) * D;
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                *reinterpret_cast<float2*>(Oi + 8 * n + 2 * t) = make_float2(o[n][2 * r] * inv_l, o[n][2 * r + 1] * inv_l);
            if (t == 0)
                lse[((long long)b * Hq + hq) * Nq + i] = (lr > 0.f) ? (m[r] + log2f(lr)) * 0.6931471805599453f : -INFINITY;
        }
    }
}
