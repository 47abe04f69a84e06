// Backward rung 2 (cupy-bwd-mma): fp16/bf16 tensor cores, FlashAttention-2's Algorithm 2, dQ by fp32 atomics.
// Changed since backward rung 1 (b1_fp32.cu): the five products run on mma.sync.m16n8k16 (fp32 accumulation)
//   with operands from ldmatrix and tiles in flight by cp.async, as the forward rungs 5-6 do. The partition
//   is the transposed one: each warp owns 16 keys of K_j and computes S^T = K_j Q_i^T and dP^T = V_j dO_i^T
//   for all Br queries of the step, so P^T and dS^T stay in registers, already in the A-fragment layout
//   that dV_j += P^T dO_i and dK_j += dS^T Q_i need (the accumulator-to-operand trick of the forward's
//   P V_j). Only dS goes through shared memory, for dQ_i += dS K_j, where the warps re-partition over the
//   Br x d tile of dQ_i and add it into an fp32 buffer with atomics; a last small kernel converts that
//   buffer to the input dtype (FA2's way). Q_i and dO_i are double-buffered: the next step's tiles land
//   while this one computes. GQA: a block loops over the query heads of its K/V head.
// Why: the fp32 rung's FMAs are ~15x slower than the tensor cores (51 vs 750 TFLOP/s GEMM ceilings).
// Expected: ldmatrix per mma about 0.6 (S^T, dP^T: 1:2; dV, dK: 1:2; dQ: 3:4), so shared-memory bound near
//   half the mma.sync rate: ~150-250 TFLOP/s (torch's flash backward: 255 / 277 at d = 64 / 128 on the H200).
// Measured (NVIDIA H200, B*N = 16384, H*d = 2048, N = 4096, Br x Bc = 64 x 128, 2026-12-01;
//   benchmarks/results/gpu-bwd-h200-history3.json): fp16 212.0 TFLOP/s at d = 64 and 233.9 at d = 128, 0.82 / 0.82 of
//   torch's flash backward (258.7 / 284.2 in the same run) and 0.49 / 0.48 of cuDNN's; causal 197.0 / 209.4
//   (0.90 / 0.90); bf16 within 3% of fp16 (0.82-0.91). Inside the 150-250 expected; the goal (>= 1.0x torch
//   flash) is not met. How dQ is added mattered: scalar atomicAdd 184.5 / 196.6 (gpu-bwd-h200-history1.json),
//   one red.global.add.v2.f32 per column pair 212.9 / 238.0 (+15-21%, history2), one .v4 after a lane-pair
//   shuffle (this version) 212.0 / 233.9: no further gain. Per kernel (benchmarks/gpu_backward_parts.py): the main
//   kernel 6.33 ms at d = 64, 5.57 with its dQ additions removed, so the atomics cost ~12% there and nothing
//   measurable at d = 128 (5.76 / 5.79); D and the conversion 0.08 + 0.06 ms. 128 x 128 at d = 64 measured 229.2
//   (+7% over 64 x 128, fp16 non-causal, block sweep only): the default at d = 64 since 2026-12-02, measured
//   in all four d = 64 cells then (gpu-bwd-h200-history7.json, commit f30a2a8): 215.1 / 199.9 TFLOP/s fp16 (causal), bf16
//   215.5 / 200.4, against 201.6 / 187.0 for 64 x 128 in the previous run (gpu-bwd-h200-history6.json): +7% in each.
//   ptxas (sm_90): 217 registers at d = 64 (64 x 128), 255 at d = 128, no spills; 128 x 128 at d = 64: 255 registers
//   and 12 bytes spilled (faster all the same); 93 / 155 KB of shared memory: one 8-warp block per SM.
// Measured on an H200 (N = 4096, B*N = 16384, H*d = 2048), default blocks, in the committed results file
//   (tests/test_rung_headers.py checks these lines against it; ratio = the peer's time / the rung's):
// Measured (gpu-bwd-h200-history3.json; d=64 dtype=float16 causal=False): 212.0 TFLOP/s, 0.82x torch-flash
// Measured (gpu-bwd-h200-history3.json; d=64 dtype=float16 causal=True): 197.0 TFLOP/s, 0.90x torch-flash
// Measured (gpu-bwd-h200-history3.json; d=128 dtype=float16 causal=False): 233.9 TFLOP/s, 0.82x torch-flash
// Measured (gpu-bwd-h200-history3.json; d=128 dtype=float16 causal=True): 209.4 TFLOP/s, 0.90x torch-flash
// The lse check (bwd_check.cuh, 2026-12-02): each step's rowsum(P) per query goes through a warp reduce-scatter
//   and shared memory into one fp32 atomic per query; bwd_lse_check tests the sums. Done on every query tile it cost
//   9% (fp16, d = 64, non-causal, H200, back to back: 6.988 vs 6.409 ms in gpu-overhead-h200-history6.json and -history2.json,
//   before/after in two runs); it now runs on 1 tile in 8 (all tiles up to 8 a head): cost expected ~1%, not yet measured.
//
// Paper names: Br, Bc, Q_i, K_j, V_j, dO_i, lse_i, D_i = rowsum(dO_i * O_i), S = Q_i K_j^T * scale,
//   P = exp(S - lse_i), dP = dO_i V_j^T, dS = P * (dP - D_i); dV_j += P^T dO_i, dK_j += dS^T Q_i * scale,
//   dQ_i += dS K_j * scale.

#ifndef HEAD_DIM
#define HEAD_DIM 64  // d: 32, 64 or 128 (set by the loader)
#endif
#ifndef BR
#define BR 64   // queries per step of the loop over i (set by the loader: 32 or 64)
#endif
#ifndef BC
#define BC 128  // keys per block, 16 per warp (set by the loader: 64 or 128)
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 1  // __launch_bounds__ minimum blocks per SM (set by the loader)
#endif
#define D HEAD_DIM
#define NW (BC / 16)     // warps; warp w owns keys 16w .. 16w + 15 of K_j
#define NT (32 * NW)
#define WM (BR / 16)     // dQ_i step: warps along the Br queries (16 rows each) ...
#define WN (NW / WM)     // ... and along d
#define DQN (D / WN)     // columns of dQ_i per warp
#define LDS (D + 8)      // K_s, V_s, Q_s, dO_s row pitch in 16-bit elements (+16 bytes: no ldmatrix conflicts)
#define LDT (BR + 8)     // dST_s row pitch
#define LOG2E 1.4426950408889634f

static_assert(NW % WM == 0 && DQN % 16 == 0, "the dQ step needs Br/16 to divide the warps and d/WN % 16 == 0");

#include "mma.cuh"
#include "bwd_check.cuh"
#include "bwd_atomic.cuh"  // bwd_preprocess, bwd_dq_convert, reduce_half (shared with b4; red_add4: common.cuh)

// Hooks for score_mod / mask_mod / block masks (flashkit/gpu/flash_mods_backward.py defines them before this
// file, as flash_mods.py does for forward rung 6); these defaults are the plain backward rung 2, unchanged:
// each expands to the expression it replaced, so the code compiled without mods is the same.
#ifndef FK_PARAMS
#define FK_PARAMS                        // more kernel parameters: tile lists, captured arrays, the error word
#define FK_STEPS(n) (n)                  // how many (query head, Q_i) steps this key block takes
// the query head h and first query i0 of a step (flash_mods_backward: from this key block's tile list)
#define FK_STEP(step, h, i0) ((h) = hk * group + (step) / n_i, (i0) = i_first + ((step) % n_i) * BR)
#define FK_FULL(step, full) (full)       // whether the step's tile needs no per-element test
#define FK_KEEP(i, j, step, in) (in)     // score (i, j) stays: in the window, and mask_mod / bits
#define FK_SCALE_LOG2 (scale * LOG2E)    // S to log2 units; after a score_mod (natural units already): LOG2E
#define FK_SCORES(s, i0, h, full)        // score_mod on S^T in registers (its derivative kept for dS)
#define FK_P(p, x, l2) (p)               // P of one score (with mods: -0 marks a visible key of a lse = -inf row)
#define FK_PSUM(p) (p)                   // a P's part of the lse check's row sum
#define FK_DS(s)                         // dS *= f'(s), the derivative of score_mod at the raw score
#define FK_DONE(dk, dv)                  // the block's dK_j, dV_j before they are written
#endif

// Grid: (Tc, Hkv, B), block: Bc / 16 warps. Dynamic shared memory: K_s, V_s [BC][LDS]; Q_s, dO_s [2][BR][LDS]
// (two stages); dST_s [BC][LDT] (dS^T, key-major); lse_s, D_s [2][BR], psum_s [NW][BR] floats.
// dQacc (fp32, B x Hq x Nq x d) must be zero on entry (bwd_preprocess); it receives dS K_j (unscaled).
// Psum (fp32, B x Hq x Nq) must be zero on entry too; it receives rowsum(P) over this block's keys, for
// bwd_lse_check (bwd_check.cuh).
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) flash_bwd(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
    const float* __restrict__ lse, const float* __restrict__ Dvec,
    float* __restrict__ dQacc, T* __restrict__ dK, T* __restrict__ dV, float* __restrict__ Psum,
    int Hq, int Hkv, int Nq, int Nk, float scale, int left, int right, int lse_every FK_PARAMS) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T(*K_s)[LDS] = reinterpret_cast<T(*)[LDS]>(smem_raw);
    T(*V_s)[LDS] = reinterpret_cast<T(*)[LDS]>(smem_raw + sizeof(T) * BC * LDS);
    T(*Q_s)[BR][LDS] = reinterpret_cast<T(*)[BR][LDS]>(smem_raw + sizeof(T) * 2 * BC * LDS);
    T(*dO_s)[BR][LDS] = reinterpret_cast<T(*)[BR][LDS]>(smem_raw + sizeof(T) * (2 * BC + 2 * BR) * LDS);
    T(*dST_s)[LDT] = reinterpret_cast<T(*)[LDT]>(smem_raw + sizeof(T) * (2 * BC + 4 * BR) * LDS);
    float(*lse_s)[BR] = reinterpret_cast<float(*)[BR]>(smem_raw + sizeof(T) * ((2 * BC + 4 * BR) * LDS + BC * LDT));
    float(*D_s)[BR] = lse_s + 2;
    float(*psum_s)[BR] = lse_s + 4;  // [NW][BR]: each warp's part of rowsum(P) for the step's queries

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wk = 16 * warp;  // this warp's keys: wk + g and wk + g + 8 of K_j
    const int j0 = blockIdx.x * BC, hk = blockIdx.y, b = blockIdx.z;
    const int group = Hq / Hkv;
    const int offset = Nk - Nq;
    const float scale_log2 = FK_SCALE_LOG2;
    const T* Kh = K + ((long long)b * Hkv + hk) * Nk * D;
    const T* Vh = V + ((long long)b * Hkv + hk) * Nk * D;

    // The query rows that see any key of this block: [i_begin, i_end); the steps: every (head of the group, i).
    const int j_end = min(j0 + BC, Nk);
    const int i_begin = right < 0 ? 0 : max(0, j0 - offset - right);
    const int i_end = left < 0 ? Nq : min(Nq, j_end - offset + left);
    const int i_first = (i_begin / BR) * BR;
    const int n_i = i_end > i_first ? (i_end - i_first + BR - 1) / BR : 0;
    const int n_steps = FK_STEPS(group * n_i);

    // A step's Q_i, dO_i by cp.async; its lse_i (log2 units, +inf where P must be 0) and D_i through registers.
    auto issue_tiles = [&](int step, int buf) {
        int h, i0;
        FK_STEP(step, h, i0);
        async_tile(Q_s[buf], Q + ((long long)b * Hq + h) * Nq * D, i0, BR, Nq);
        async_tile(dO_s[buf], dO + ((long long)b * Hq + h) * Nq * D, i0, BR, Nq);
    };
    auto read_rows = [&](int step, float& l2, float& dd) {
        int h, i0;
        FK_STEP(step, h, i0);
        const int i = i0 + tid;
        const long long r = ((long long)b * Hq + h) * Nq + i;
        const float l = (tid < BR && i < Nq) ? lse[r] : -INFINITY;
        l2 = l == -INFINITY ? INFINITY : l * LOG2E;  // a row that saw no key, or padding: P = 0
        dd = (tid < BR && i < Nq) ? Dvec[r] : 0.f;
    };

    // Prologue: K_j, V_j and the first step's Q_i, dO_i in one cp.async group.
    async_tile(K_s, Kh, j0, BC, Nk);
    async_tile(V_s, Vh, j0, BC, Nk);
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
        int h, i0;
        FK_STEP(step, h, i0);
        cp_async_wait<0>();  // this step's Q_i, dO_i (and K_j, V_j) have landed
        __syncthreads();     // ... for every thread; the previous step is done with dST_s and the other buffers
        // The next step's Q_i, dO_i start loading into the other buffer; lse_i, D_i into registers.
        float l2_next = 0.f, d_next = 0.f;
        if (step + 1 < n_steps) {
            issue_tiles(step + 1, buf ^ 1);
            read_rows(step + 1, l2_next, d_next);
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
        const bool full = FK_FULL(step, (j0 >= row_lo(i_last, offset, left)) && (j0 + BC <= row_hi(i0, offset, right, Nk)));
        if (!full) {
#pragma unroll
            for (int n = 0; n < BR / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = i0 + 8 * n + 2 * t + (e & 1), j = j0 + wk + g + 8 * (e >> 1);
                    if (!FK_KEEP(i, j, step, j >= row_lo(i, offset, left) && j < row_hi(i, offset, right, Nk)))
                        s[n][e] = -INFINITY;
                }
        }
        FK_SCORES(s, i0, h, full);
        // P^T = exp2(S^T * scale_log2 - lse_i): 0 where masked (-inf) and for rows with lse_i = +inf
#pragma unroll
        for (int n = 0; n < BR / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float l2 = lse_s[buf][8 * n + 2 * t + (e & 1)];
                s[n][e] = FK_P(fast_exp2(fmaf(s[n][e], scale_log2, -l2)), s[n][e], l2);
            }

        // rowsum(P) over this warp's 16 keys for the lse check: per query the 8 lanes g (2 keys each) hold parts.
        // A reduce-scatter over lane bits 2-4 (3 x BR/16 .. BR/64 shuffles, not 3 x BR/4) leaves each lane
        // the sums of BR/32 queries, which go to psum_s (read after the next barrier). Only every lse_every-th
        // query tile is summed (all of them up to 8 tiles; the loader sets it): done on every tile, this cost 9%
        // of the kernel at d = 64 (H200, N = 4096); a wrong lse is off on every row, so 1 tile in 8 finds it.
        const bool lse_tile = (i0 / BR) % lse_every == 0;  // the same for the whole block: no divergence
        if (lse_tile) {
            float v[BR / 4];  // v[2n + c]: query 8n + 2t + c
#pragma unroll
            for (int n = 0; n < BR / 8; ++n)
                v[2 * n] = FK_PSUM(s[n][0]) + FK_PSUM(s[n][2]), v[2 * n + 1] = FK_PSUM(s[n][1]) + FK_PSUM(s[n][3]);
            reduce_half<BR / 8>(v, lane, 4);   // lanes with g bit 0 set keep the upper half ...
            reduce_half<BR / 16>(v, lane, 8);  // ... bit 1 ...
            reduce_half<BR / 32>(v, lane, 16); // ... bit 2
            // v[k] holds original index k + (g & 1) BR/8 + ((g >> 1) & 1) BR/16 + (g >> 2) BR/32
            const int base = (g & 1) * (BR / 8) + ((g >> 1) & 1) * (BR / 16) + (g >> 2) * (BR / 32);
#pragma unroll
            for (int k = 0; k < BR / 32; ++k) {
                const int K2 = base + k;
                psum_s[warp][8 * (K2 >> 1) + 2 * t + (K2 & 1)] = v[k];
            }
        }

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
        FK_DS(s);

        // dK_j += dS^T Q_i (scale at the end), and dS^T to shared memory for the dQ_i step (the same 16-bit values)
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk) {
            unsigned p[4];
            p[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
            p[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
            p[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            p[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            *reinterpret_cast<unsigned*>(&dST_s[wk + g][16 * kk + 2 * t]) = p[0];
            *reinterpret_cast<unsigned*>(&dST_s[wk + g + 8][16 * kk + 2 * t]) = p[1];
            *reinterpret_cast<unsigned*>(&dST_s[wk + g][16 * kk + 8 + 2 * t]) = p[2];
            *reinterpret_cast<unsigned*>(&dST_s[wk + g + 8][16 * kk + 8 + 2 * t]) = p[3];
#pragma unroll
            for (int n2 = 0; n2 < D / 16; ++n2) {
                unsigned qb[4];
                B_cols<LDS>(qb, Q_s[buf], 16 * kk, 16 * n2, lane);
                mma16816(dk[2 * n2], p, qb[0], qb[1]);
                mma16816(dk[2 * n2 + 1], p, qb[2], qb[3]);
            }
        }
        // The other buffer's lse_i, D_i were last read in the previous step, before this step's first barrier.
        if (step + 1 < n_steps && tid < BR) lse_s[buf ^ 1][tid] = l2_next, D_s[buf ^ 1][tid] = d_next;
        __syncthreads();  // dS^T complete in shared memory
        if (lse_tile && tid < BR && i0 + tid < Nq) {  // the step's rowsum(P) over this block's keys, one atomic a query
            float p = 0.f;
#pragma unroll
            for (int w = 0; w < NW; ++w) p += psum_s[w][tid];
            if (p != 0.f) atomicAdd(Psum + ((long long)b * Hq + h) * Nq + i0 + tid, p);
        }

        // dQ_i += dS K_j: warp (wm, wn) owns queries 16 wm .. 16 wm + 15 and columns wn DQN .. of dQ_i; added with atomics
        {
            const int wm = warp % WM, c0 = (warp / WM) * DQN;
            float dq[DQN / 8][4];
#pragma unroll
            for (int n = 0; n < DQN / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) {
                unsigned a[4];
                A_cols<LDT>(a, dST_s, 16 * kk, 16 * wm, lane);  // dS = (dS^T)^T: m = query, k = key
#pragma unroll
                for (int n2 = 0; n2 < DQN / 16; ++n2) {
                    unsigned kb[4];
                    B_cols<LDS>(kb, K_s, 16 * kk, c0 + 16 * n2, lane);
                    mma16816(dq[2 * n2], a, kb[0], kb[1]);
                    mma16816(dq[2 * n2 + 1], a, kb[2], kb[3]);
                }
            }
            // Lanes t and t^1 swap half their pairs, so each holds 4 adjacent columns of one row: even t row g,
            // columns 2t .. 2t+3; odd t row g + 8, columns 2t-2 .. 2t+1. One 16-byte reduction instead of two 8-byte.
            float* dQh = dQacc + ((long long)b * Hq + h) * Nq * D;
            const bool odd = t & 1;
            const int i = i0 + 16 * wm + g + 8 * odd, col = c0 + 2 * (t & ~1);
#pragma unroll
            for (int n = 0; n < DQN / 8; ++n) {
                const float s0 = __shfl_xor_sync(0xffffffffu, odd ? dq[n][0] : dq[n][2], 1);
                const float s1 = __shfl_xor_sync(0xffffffffu, odd ? dq[n][1] : dq[n][3], 1);
                const float4 v = odd ? make_float4(s0, s1, dq[n][2], dq[n][3]) : make_float4(dq[n][0], dq[n][1], s0, s1);
                if (i < Nq) red_add4(dQh + (long long)i * D + col + 8 * n, v);
            }
        }
    }
    cp_async_wait<0>();  // nothing may be left in flight when the block exits
    FK_DONE(dk, dv);

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
