// Backward rung 4 (cupy-bwd-wgmma): Hopper (sm_90a). FlashAttention-2's Algorithm 2 with the five products on
// wgmma, the tiles by TMA, a producer warp feeding two consumer warpgroups; dQ by fp32 vector atomics.
// Changed since backward rung 2 (b2_mma.cu): (1) every product is a wgmma.mma_async of one warpgroup (64 x N x 16
//   per instruction) with B, and A where it is not already in registers, read by the tensor cores straight from
//   shared memory through descriptors: no ldmatrix (b2's shared-memory bottleneck, ~0.6 ldmatrix per mma.sync);
//   (2) the same transposed partition as b2, one level up: consumer warpgroup c owns keys 64 c .. 64 c + 63 of K_j
//   and computes S^T = K_j Q_i^T and dP^T = V_j dO_i^T for all Br queries of the step, so P^T and dS^T stay in
//   registers in the A-fragment layout that dV_j += P^T dO_i and dK_j += dS^T Q_i take (wgmma's register-A form,
//   dO_i and Q_i read N-major); dS^T goes to shared memory (swizzled, two buffers), and dQ_i += dS K_j reads it
//   M-major (transposed A) with K_j N-major; (3) Q_i and dO_i arrive by TMA into two stages with full/empty
//   mbarriers, K_j and V_j once; lse_i (log2 units) and D_i come with them, written by the producer warp;
//   (4) warpgroup 0 is the producer (its first warp loads; setmaxnreg gives its registers to the consumers).
// Blocks: Bc = 128 keys (two consumer warpgroups of 64); Br = 128 queries a step at d = 64 (dQ_i: consumer c takes
//   queries 64 c ..), 64 at d = 128 (dQ_i: consumer c takes columns 64 c ..): every product is N = 64 or 128.
// Why: b2 stops at 0.75-0.81x torch's flash backward (shared-memory bound: operands by ldmatrix); on this card
//   wgmma from shared memory is what cuDNN and FlashAttention-3 use (422-491 TFLOP/s for cuDNN's backward).
// Expected (written before the first run): 1.2-1.6x b2 (rung 7 is 1.41-1.77x forward rung 6): ~260-350 TFLOP/s;
//   this version does not overlap the softmax with the tensor cores (FA3's two-stage pipelining), so well short of
//   cuDNN's.
// ptxas (sm_90a, nvcc 13.0): 168 registers at entry (the consumers raise theirs to 240), no spills at d = 64 or 128,
//   fp16 or bf16; 175 / 170 KB of shared memory at d = 64 / 128 (one block per SM). Two things the first drafts taught: holding the fp32
//   P^T beside dP^T, dK_j, dV_j and P^T's fragments spilled 60 bytes at d = 64, so dS^T reads P^T back from its
//   16-bit fragments (the reference in the input dtype rounds P the same way); and waiting for a step's dQ_i product
//   only at the next step (-DDEFER_DQ=1, to add it while S^T and dP^T run) spills 432 / 768 bytes: not run.
// Measured on an NVIDIA H200 (N = 4096, B*N = 16384, H*d = 2048, 2026-12-02, commit f30a2a8, benchmarks/gpu_backward_hopper.py
//   --quick; benchmarks/results/gpu-bwd-h200-history7.json): 1.27-1.33x torch's flash backward and 1.47-1.66x b2 in every cell,
//   0.72-0.82x cuDNN's (the goal of issue 10, >= 1.0x flash, is met; cuDNN is not reached). Through the public call
//   (flashkit.attention_backward(..., backend="cupy-bwd-wgmma"), validation, NaN/Inf scan and lse check included)
//   1.11-1.25x flash (the call costs 4-19% over the kernel alone; probably as for b2: the host waits for the lse check,
//   the last kernel but the dQ conversion, so the next call's host work shows); with backend "auto", which picks this
//   rung on a Hopper, 1.08-1.23x.
//   Variant -DDQ_BULK=1 (dQ_i's tile through shared memory, added by a warp of the producer warpgroup with bulk
//   reductions, cp.reduce.async.bulk, one a row): d = 64 252.5 / 228.2 TFLOP/s fp16 (0.75x / 0.77x this version;
//   Br = 128 rows of 256 bytes a step), d = 128 374.5 / 340.6 (1.00x / 1.01x): not the default
//   (benchmarks/gpu_backward_hopper.py's VARIANTS; the same file, impl cupy-bwd-wgmma-bulkdq). Correctness in the
//   same run: flashkit.gpu.check_backward 79/79 (this rung, the variant and b2 on the awkward shapes, fp16 and bf16,
//   the lse check, the public call), compute-sanitizer memcheck 0 errors and racecheck 0 hazards (20/20 launches).
// Measured (gpu-bwd-h200-history7.json; d=64 dtype=float16 causal=False): 338.9 TFLOP/s, 1.27x torch-flash
// Measured (gpu-bwd-h200-history7.json; d=64 dtype=float16 causal=True): 296.9 TFLOP/s, 1.29x torch-flash
// Measured (gpu-bwd-h200-history7.json; d=64 dtype=bfloat16 causal=False): 338.2 TFLOP/s, 1.27x torch-flash
// Measured (gpu-bwd-h200-history7.json; d=64 dtype=bfloat16 causal=True): 294.0 TFLOP/s, 1.27x torch-flash
// Measured (gpu-bwd-h200-history7.json; d=128 dtype=float16 causal=False): 376.0 TFLOP/s, 1.30x torch-flash
// Measured (gpu-bwd-h200-history7.json; d=128 dtype=float16 causal=True): 336.6 TFLOP/s, 1.33x torch-flash
// Measured (gpu-bwd-h200-history7.json; d=128 dtype=bfloat16 causal=False): 378.2 TFLOP/s, 1.31x torch-flash
// Measured (gpu-bwd-h200-history7.json; d=128 dtype=bfloat16 causal=True): 334.9 TFLOP/s, 1.32x torch-flash
// The merged main (commit 7957305, benchmarks.gpu_session, 2026-12-02; check_backward 110/110, sanitizers clean): alone
//   1.26-1.34x flash, 0.71-0.80x cuDNN; the public call 1.11-1.23x flash (auto 1.11-1.22x):
// Measured (gpu-bwd-h200-history8.json; d=64 dtype=float16 causal=False): 336.7 TFLOP/s, 1.26x torch-flash
// Measured (gpu-bwd-h200-history8.json; d=64 dtype=bfloat16 causal=False): 337.8 TFLOP/s, 1.26x torch-flash
// Measured (gpu-bwd-h200-history8.json; d=64 dtype=float16 causal=True): 300.7 TFLOP/s, 1.31x torch-flash
// Measured (gpu-bwd-h200-history8.json; d=64 dtype=bfloat16 causal=True): 294.4 TFLOP/s, 1.28x torch-flash
// Measured (gpu-bwd-h200-history8.json; d=128 dtype=float16 causal=False): 379.8 TFLOP/s, 1.32x torch-flash
// Measured (gpu-bwd-h200-history8.json; d=128 dtype=bfloat16 causal=False): 379.5 TFLOP/s, 1.32x torch-flash
// Measured (gpu-bwd-h200-history8.json; d=128 dtype=float16 causal=True): 334.9 TFLOP/s, 1.32x torch-flash
// Measured (gpu-bwd-h200-history8.json; d=128 dtype=bfloat16 causal=True): 340.0 TFLOP/s, 1.34x torch-flash
// Not tried yet: FA3's overlap of one step's softmax with the next step's products (two S^T / dP^T register sets do
//   not fit beside dK_j, dV_j at 240 registers), a persistent grid, Bc = 192.
//
// Paper names: Br, Bc, Q_i, K_j, V_j, dO_i, lse_i, D_i = rowsum(dO_i * O_i), S = Q_i K_j^T * scale,
//   P = exp(S - lse_i), dP = dO_i V_j^T, dS = P * (dP - D_i); dV_j += P^T dO_i, dK_j += dS^T Q_i * scale,
//   dQ_i += dS K_j * scale.

#ifndef HEAD_DIM
#define HEAD_DIM 128  // d: 64 or 128 (set by the loader)
#endif
#ifndef BR
#define BR (HEAD_DIM == 64 ? 128 : 64)  // queries per step (set by the loader: 128 at d = 64, 64 at d = 128)
#endif
#ifndef BC
#define BC 128  // keys per block: 64 per consumer warpgroup
#endif
#ifndef DEFER_DQ
#define DEFER_DQ 0  // 1: a step's dQ_i product is waited for and added at the next step, behind its S^T and dP^T
#endif
#ifndef DQ_BULK
#define DQ_BULK 0  // 1: the consumers put dQ_i's tile in shared memory and a warp of the producer warpgroup adds it to
                   // dQacc by bulk reductions (cp.reduce.async.bulk), instead of the consumers' vector atomics
#endif
#define D HEAD_DIM
#define NC 2                // consumer warpgroups
#define NT (128 * (NC + 1)) // + the producer warpgroup
#define NW (4 * NC)         // consumer warps; consumer warp w owns keys 16 w .. 16 w + 15 of K_j
#define NHALF (D / 64)      // 64-column (128-byte) halves of a row: one TMA box and one swizzle atom wide
#define LOG2E 1.4426950408889634f
#if DQ_BULK  // the dQ warp's loop spills 24 bytes within 24 registers (ptxas); 40 + 2 x 232 fits in the file
#define REG_PRODUCER 40
#define REG_CONSUMER 232
#else
#define REG_PRODUCER 24
#define REG_CONSUMER 240
#endif

static_assert(BC == 64 * NC, "each consumer warpgroup owns 64 keys");
static_assert(!(DEFER_DQ && DQ_BULK), "one way of adding dQ_i");
static_assert((BR == 128 && D == 64) || (BR == 64 && D == 128), "dQ_i is split into two 64 x 64 products");

#include "common.cuh"     // INFINITY, fast_exp2, row_lo / row_hi, red_add4
#include "hopper.cuh"     // wgmma, descriptors, mbarriers, TMA
#include "bwd_check.cuh"  // bwd_lse_check
#include "bwd_atomic.cuh" // bwd_preprocess, bwd_dq_convert, reduce_half (red_add4: common.cuh)

// Tile bytes (16-bit elements). Each tile is [NHALF or BR/64][rows][64], every [rows][64] block 128-byte swizzled.
#define KV_BYTES (BC * D * 2)
#define QO_BYTES (BR * D * 2)   // one Q_i or dO_i tile; a stage holds both
#define DS_BYTES (BR * BC * 2)  // dS^T [BR/64][BC][64]: key-major rows of 64 queries

// The four tensor maps (flashkit/gpu/backward.py writes them with flashkit.gpu.tma.encode): Q, K, V, dO seen as
// (d columns, N rows, B*H heads), box 64 x (BR for Q and dO, BC for K and V) x 1, rows past N read as zeros.
struct __align__(64) BwdMaps { unsigned long long q[16], k[16], v[16], dO[16]; };

// Grid: (Tc, Hkv, B), block: NT threads. Shared memory (bytes from a 1024-aligned base): K_s, V_s; Q_s, dO_s x 2
// stages; dST_s x 2; then lse_s, D_s [2][BR], psum_s [2][NW][BR] floats; then the mbarriers.
// dQacc (fp32, B x Hq x Nq x d) and Psum (fp32, B x Hq x Nq) must be zero on entry (bwd_preprocess); they
// receive dS K_j (unscaled) and rowsum(P) over this block's keys (on every lse_every-th query tile).
extern "C" __global__ void __launch_bounds__(NT, 1) flash_bwd(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const T* __restrict__ dO,
    const float* __restrict__ lse, const float* __restrict__ Dvec,
    float* __restrict__ dQacc, T* __restrict__ dK, T* __restrict__ dV, float* __restrict__ Psum,
    int Hq, int Hkv, int Nq, int Nk, float scale, int left, int right, int lse_every,
    const BwdMaps* __restrict__ maps) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const unsigned base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    unsigned char* const base_ptr = smem_raw + (base - smem_u32(smem_raw));
    const unsigned K_s = base, V_s = K_s + KV_BYTES;
    const unsigned Q_s = V_s + KV_BYTES;          // stage s: Q_s + s * QO_BYTES
    const unsigned dO_s = Q_s + 2 * QO_BYTES;     // stage s: dO_s + s * QO_BYTES
    const unsigned dST_s = dO_s + 2 * QO_BYTES;   // buffer b: dST_s + b * DS_BYTES
    float* const rows_s = reinterpret_cast<float*>(base_ptr + (dST_s + 2 * DS_BYTES - base));
    float(*lse_s)[BR] = reinterpret_cast<float(*)[BR]>(rows_s);               // [2][BR], log2 units
    float(*D_s)[BR] = reinterpret_cast<float(*)[BR]>(rows_s + 2 * BR);        // [2][BR]
    float(*psum_s)[NW][BR] = reinterpret_cast<float(*)[NW][BR]>(rows_s + 4 * BR);  // [2][NW][BR]
    const unsigned bars = dST_s + 2 * DS_BYTES + 4 * (4 * BR + 2 * NW * BR);
    const unsigned bar_kv = bars;                      // K_j and V_j landed
    #define FULL(s) (bars + 8 * (1 + (s)))             // stage s: Q_i, dO_i landed, lse_i and D_i written
    #define EMPTY(s) (bars + 8 * (3 + (s)))            // stage s: every consumer thread is done with it
    const unsigned dQ_s = bars + 64;  // DQ_BULK: dQ_i's tile, fp32 [BR][D + 4] (rows padded: no bank conflicts)
    (void)dQ_s;

    const int tid = threadIdx.x, wg = tid / 128;
    const int j0 = blockIdx.x * BC, hk = blockIdx.y, b = blockIdx.z;
    const int group = Hq / Hkv;
    const int offset = Nk - Nq;
    const float scale_log2 = scale * LOG2E;

    // The query rows that see any key of this block: [i_begin, i_end); the steps: every (head of the group, i).
    const int j_end = min(j0 + BC, Nk);
    const int i_begin = right < 0 ? 0 : max(0, j0 - offset - right);
    const int i_end = left < 0 ? Nq : min(Nq, j_end - offset + left);
    const int i_first = (i_begin / BR) * BR;
    const int n_i = i_end > i_first ? (i_end - i_first + BR - 1) / BR : 0;
    const int n_steps = group * n_i;

    if (tid == 0) {
        mbar_init(bar_kv, 1);
        for (int s = 0; s < 2; ++s) {
            mbar_init(FULL(s), 32);        // the producer warp's 32 lanes (lane 0's arrival carries the bytes)
            mbar_init(EMPTY(s), 128 * NC); // every consumer thread
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // visible to the copy engine
    }
    __syncthreads();

    if (wg == 0) {  // producer warpgroup: its first warp loads everything; the other three have nothing to do
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(REG_PRODUCER));
#if DQ_BULK
        if (tid >= 32 && tid < 64 && n_steps > 0) {  // the dQ warp: one bulk reduction per row of each step's dQ_i
            const int lane = tid - 32;
            for (int step = 0; step < n_steps; ++step) {
                const int h = hk * group + step / n_i, i0 = i_first + (step % n_i) * BR;
                named_sync(2, 128 * NC + 32);  // the consumers' dQ_i of this step is in dQ_s
                for (int r = lane; r < BR; r += 32)
                    if (i0 + r < Nq)
                        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                                     ::"l"(dQacc + (((long long)b * Hq + h) * Nq + i0 + r) * D), "r"(dQ_s + r * (D + 4) * 4),
                                       "n"(D * 4) : "memory");
                asm volatile("cp.async.bulk.commit_group;" ::: "memory");
                asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");  // dQ_s has been read
                if (step + 1 < n_steps) asm volatile("bar.arrive 3, %0;" ::"n"(128 * NC + 32) : "memory");  // dQ_s free
            }
            asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
            return;
        }
#endif
        const int lane = tid;
        if (tid >= 32 || n_steps == 0) return;
        if (lane == 0) {
            tensormap_acquire(maps->q);
            tensormap_acquire(maps->k);
            tensormap_acquire(maps->v);
            tensormap_acquire(maps->dO);
            mbar_expect_tx(bar_kv, 2 * KV_BYTES);
            for (int h = 0; h < NHALF; ++h) {
                tma_load(K_s + h * (BC * 128), maps->k, 64 * h, j0, b * Hkv + hk, bar_kv);
                tma_load(V_s + h * (BC * 128), maps->v, 64 * h, j0, b * Hkv + hk, bar_kv);
            }
        }
        for (int step = 0; step < n_steps; ++step) {
            const int s = step & 1;
            const int h = hk * group + step / n_i, i0 = i_first + (step % n_i) * BR;
            if (step >= 2) mbar_wait(EMPTY(s), ((step >> 1) - 1) & 1);
            // lse_i in log2 units (+inf where P must be 0: a row that saw no key, or past Nq) and D_i
            for (int r = lane; r < BR; r += 32) {
                const int i = i0 + r;
                const long long row = ((long long)b * Hq + h) * Nq + i;
                const float l = i < Nq ? lse[row] : -INFINITY;
                lse_s[s][r] = l == -INFINITY ? INFINITY : l * LOG2E;
                D_s[s][r] = i < Nq ? Dvec[row] : 0.f;
            }
            if (lane == 0) {
                mbar_expect_tx(FULL(s), 2 * QO_BYTES);  // lane 0's arrival, after its own lse_s, D_s stores
                for (int hh = 0; hh < NHALF; ++hh) {
                    tma_load(Q_s + s * QO_BYTES + hh * (BR * 128), maps->q, 64 * hh, i0, b * Hq + h, FULL(s));
                    tma_load(dO_s + s * QO_BYTES + hh * (BR * 128), maps->dO, 64 * hh, i0, b * Hq + h, FULL(s));
                }
            } else {
                mbar_arrive(FULL(s));  // release: this lane's lse_s, D_s stores are seen by the consumers' wait
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(REG_CONSUMER));

    const int c = wg - 1;                       // consumer warpgroup: keys 64 c .. 64 c + 63 of K_j
    const int ctid = tid - 128;                 // 0 .. 255 among the consumers
    const int cwarp = ctid / 32, lane = tid & 31;  // consumer warp 0 .. 7: keys 16 cwarp .. 16 cwarp + 15
    const int g = lane >> 2, t = lane & 3;
    const int key0 = 16 * cwarp + g;            // this thread's keys in the block (64 c + ...): key0, key0 + 8
    // dQ_i's split (static_assert above): at d = 64 consumer c takes queries 64 c .. of the Br = 128, all of d;
    // at d = 128 all 64 queries and columns 64 c ..
    const int dq_qhalf = BR == 128 ? c : 0, dq_chalf = BR == 128 ? 0 : c;

    float dk[D / 2], dv[D / 2];  // dK_j, dV_j: rows key0 (+8), columns 8 n + 2 t (+1): [4 n + 2 r + e]
#pragma unroll
    for (int k = 0; k < D / 2; ++k) dk[k] = dv[k] = 0.f;

    // dQacc += dq (of query head h, tile i0). Accumulator rows 16 (cwarp % 4) + g (+8) of the 64, columns 8 n + 2 t (+1)
    // of the 64. Lanes t and t^1 swap half their pairs (as b2), so each adds 4 adjacent columns of one row at once.
    float dq[32];
    int dq_h = 0, dq_i0 = 0;
    auto add_dq = [&](int h, int i0) {
        float* dQh = dQacc + ((long long)b * Hq + h) * Nq * D;
        const bool odd = t & 1;
        const int i = i0 + 64 * dq_qhalf + 16 * (cwarp % 4) + g + 8 * odd;
        const int col = 64 * dq_chalf + 2 * (t & ~1);
#pragma unroll
        for (int n = 0; n < 8; ++n) {
            const float s0 = __shfl_xor_sync(0xffffffffu, odd ? dq[4 * n] : dq[4 * n + 2], 1);
            const float s1 = __shfl_xor_sync(0xffffffffu, odd ? dq[4 * n + 1] : dq[4 * n + 3], 1);
            const float4 v4 = odd ? make_float4(s0, s1, dq[4 * n + 2], dq[4 * n + 3]) : make_float4(dq[4 * n], dq[4 * n + 1], s0, s1);
            if (i < Nq) red_add4(dQh + (long long)i * D + col + 8 * n, v4);
        }
    };
    (void)dq_h, (void)dq_i0;

    if (n_steps > 0) mbar_wait(bar_kv, 0);
    for (int step = 0; step < n_steps; ++step) {
        const int s = step & 1;
        const int h = hk * group + step / n_i, i0 = i_first + (step % n_i) * BR;
        const unsigned Qst = Q_s + s * QO_BYTES, dOst = dO_s + s * QO_BYTES, dSb = dST_s + s * DS_BYTES;
        mbar_wait(FULL(s), (step >> 1) & 1);

        // S^T = K_j Q_i^T and dP^T = V_j dO_i^T (unscaled): 64 keys x Br queries, both operands K-major (d
        // contiguous); the 16-column step kk moves 32 bytes inside a 128-byte swizzled row, or to the next half.
        float S[BR / 2], dP[BR / 2];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const unsigned ka = K_s + (kk / 4) * (BC * 128) + c * (64 * 128) + (kk % 4) * 32;
            const unsigned qa = Qst + (kk / 4) * (BR * 128) + (kk % 4) * 32;
            wgmma_ss<0, 0>(S, descriptor(ka, 16, 1024), descriptor(qa, 16, 1024), kk > 0);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const unsigned va = V_s + (kk / 4) * (BC * 128) + c * (64 * 128) + (kk % 4) * 32;
            const unsigned ga = dOst + (kk / 4) * (BR * 128) + (kk % 4) * 32;
            wgmma_ss<0, 0>(dP, descriptor(va, 16, 1024), descriptor(ga, 16, 1024), kk > 0);
        }
        wgmma_commit();
#if DEFER_DQ
        if (step > 0) {  // the previous step's dQ_i product (the oldest group in flight) is done: add it now
            wgmma_wait<2>();
            fence_regs(dq);
            add_dq(dq_h, dq_i0);
        }
#endif
        wgmma_wait<1>();  // S^T is complete (dP^T may still run)
        fence_regs(S);

        // the per-element mask only where the tile is not FULL for every query of the step
        // (element 4 n + 2 r + e: key j0 + key0 + 8 r, query i0 + 8 n + 2 t + e)
        const int i_last = min(i0 + BR, Nq) - 1;
        const bool full = (j0 >= row_lo(i_last, offset, left)) && (j0 + BC <= row_hi(i0, offset, right, Nk));
        if (!full) {
#pragma unroll
            for (int n = 0; n < BR / 8; ++n)
#pragma unroll
                for (int r = 0; r < 2; ++r)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int i = i0 + 8 * n + 2 * t + e, j = j0 + key0 + 8 * r;
                        if (!(j >= row_lo(i, offset, left) && j < row_hi(i, offset, right, Nk))) S[4 * n + 2 * r + e] = -INFINITY;
                    }
        }
        // P^T = exp2(S^T * scale_log2 - lse_i): 0 where masked (-inf) and for rows with lse_i = +inf
#pragma unroll
        for (int n = 0; n < BR / 8; ++n)
#pragma unroll
            for (int k = 0; k < 4; ++k) S[4 * n + k] = fast_exp2(fmaf(S[4 * n + k], scale_log2, -lse_s[s][8 * n + 2 * t + (k & 1)]));

        // rowsum(P) over this warp's 16 keys for the lse check, as b2: a reduce-scatter over lane bits 2-4 leaves
        // each lane the sums of BR/32 queries, which go to psum_s[s] (read after this step's consumer barrier).
        const bool lse_tile = (i0 / BR) % lse_every == 0;  // the same for the whole block: no divergence
        if (lse_tile) {
            float v[BR / 4];  // v[2n + e]: query 8n + 2t + e
#pragma unroll
            for (int n = 0; n < BR / 8; ++n) v[2 * n] = S[4 * n] + S[4 * n + 2], v[2 * n + 1] = S[4 * n + 1] + S[4 * n + 3];
            reduce_half<BR / 8>(v, lane, 4);
            reduce_half<BR / 16>(v, lane, 8);
            reduce_half<BR / 32>(v, lane, 16);
            const int vbase = (g & 1) * (BR / 8) + ((g >> 1) & 1) * (BR / 16) + (g >> 2) * (BR / 32);
#pragma unroll
            for (int k = 0; k < BR / 32; ++k) {
                const int K2 = vbase + k;
                psum_s[s][cwarp][8 * (K2 >> 1) + 2 * t + (K2 & 1)] = v[k];
            }
        }

        // P^T as 16-bit A fragments (k-block kk = queries 16 kk .. 16 kk + 15: hopper_layout.p_fragment_from_s), and
        // dV_j += P^T dO_i issued at once, while dP^T may still be on the tensor cores. B = dO_i N-major ([query][d]:
        // the k-step of 16 queries is 16 rows of 128 bytes; the 64-column halves of d are BR * 128 bytes apart).
        unsigned Pa[BR / 16][4], dSa[BR / 16][4];
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk)
#pragma unroll
            for (int q = 0; q < 4; ++q) Pa[kk][q] = pack2(S[8 * kk + 2 * q], S[8 * kk + 2 * q + 1]);
        fence_regs(dv);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk) wgmma_rs<1>(dv, Pa[kk], descriptor(dOst + kk * (16 * 128), BR * 128, 1024), 1);
        wgmma_commit();

        wgmma_wait<1>();  // dP^T is complete (dV_j's products may still run)
        fence_regs(dP);
        // dS^T = P^T * (dP^T - D_i) as A fragments, and to shared memory for dQ_i. P^T is read back from its 16-bit
        // fragments (as the reference in the input dtype rounds it): the fp32 S^T registers are free by now, which
        // keeps d = 64 (Br = 128) within the consumers' 240 registers (ptxas spilled 60 bytes holding both).
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int x = 8 * kk + 2 * q;  // elements x, x + 1: query 8 (x / 4) + 2 t + 0 / 1
                const float2 p = unpack2(Pa[kk][q]);
                const float Dq0 = D_s[s][8 * (x / 4) + 2 * t], Dq1 = D_s[s][8 * (x / 4) + 2 * t + 1];
                dP[x] = p.x * (dP[x] - Dq0);
                dP[x + 1] = p.y * (dP[x + 1] - Dq1);
            }
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk)
#pragma unroll
            for (int q = 0; q < 4; ++q) dSa[kk][q] = pack2(dP[8 * kk + 2 * q], dP[8 * kk + 2 * q + 1]);
        // dS^T[key][query] -> dST_s: key row key0 + 8 r, queries 8 n + 2 t, + 1 in one 32-bit word; block
        // query / 64 of [BC][64], swizzled as TMA would have written it.
#pragma unroll
        for (int n = 0; n < BR / 8; ++n)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int q = 8 * n + 2 * t, key = key0 + 8 * r;
                const unsigned addr = swizzle128(dSb + (q / 64) * (BC * 128) + key * 128 + (q % 64) * 2);
                asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(dSa[n / 2][(n & 1) * 2 + r]) : "memory");
            }
        fence_async_shared();  // the stores above are read by the tensor cores (dQ_i) after the barrier

        // dK_j += dS^T Q_i: A from registers, B = Q_i N-major as dO_i above
        fence_regs(dk);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk) wgmma_rs<1>(dk, dSa[kk], descriptor(Qst + kk * (16 * 128), BR * 128, 1024), 1);
        wgmma_commit();

        named_sync(1, 128 * NC);  // dS^T (and psum_s) of both consumer warpgroups complete in shared memory
        if (lse_tile && ctid < BR && i0 + ctid < Nq) {  // the step's rowsum(P) over this block's keys
            float p = 0.f;
#pragma unroll
            for (int w = 0; w < NW; ++w) p += psum_s[s][w][ctid];
            if (p != 0.f) atomicAdd(Psum + ((long long)b * Hq + h) * Nq + i0 + ctid, p);
        }

        // dQ_i += dS K_j: 64 queries (block dq_qhalf of dS^T, read M-major) x 64 columns (half dq_chalf of K_j,
        // N-major), k = the block's 128 keys, 16 a step (16 rows of 128 bytes in both)
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            const unsigned da = dSb + dq_qhalf * (BC * 128) + kk * (16 * 128);
            const unsigned kb = K_s + dq_chalf * (BC * 128) + kk * (16 * 128);
            wgmma_ss<1, 1>(dq, descriptor(da, BC * 128, 1024), descriptor(kb, BC * 128, 1024), kk > 0);
        }
        wgmma_commit();
        wgmma_wait<1>();  // dV_j's and dK_j's products done: Q_i, dO_i, lse_i, D_i of stage s are no longer read
        fence_regs(dv);
        fence_regs(dk);
        mbar_arrive(EMPTY(s));

#if DEFER_DQ
        dq_h = h, dq_i0 = i0;  // added at the next step, once its S^T and dP^T are on the tensor cores
#elif DQ_BULK
        wgmma_wait<0>();
        fence_regs(dq);
        if (step > 0) named_sync(3, 128 * NC + 32);  // the dQ warp is done reading the previous step's tile
        {
            const int rl = 64 * dq_qhalf + 16 * (cwarp % 4) + g, cl = 64 * dq_chalf + 2 * t;
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(dQ_s + ((rl + 8 * r) * (D + 4) + cl + 8 * n) * 4),
                                 "f"(dq[4 * n + 2 * r]), "f"(dq[4 * n + 2 * r + 1]) : "memory");
        }
        fence_async_shared();  // read by the bulk reductions
        asm volatile("bar.arrive 2, %0;" ::"n"(128 * NC + 32) : "memory");
#else
        wgmma_wait<0>();
        fence_regs(dq);
        add_dq(h, i0);
#endif
    }
#if DEFER_DQ
    if (n_steps > 0) {
        wgmma_wait<0>();
        fence_regs(dq);
        add_dq(dq_h, dq_i0);
    }
#endif

    // Write dK_j = scale * dK_j and dV_j in the input dtype (keys < Nk)
    T* dKh = dK + ((long long)b * Hkv + hk) * Nk * D;
    T* dVh = dV + ((long long)b * Hkv + hk) * Nk * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = j0 + key0 + 8 * r;
        if (j < Nk) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                *reinterpret_cast<unsigned*>(dKh + (long long)j * D + 8 * n + 2 * t) =
                    pack2(dk[4 * n + 2 * r] * scale, dk[4 * n + 2 * r + 1] * scale);
                *reinterpret_cast<unsigned*>(dVh + (long long)j * D + 8 * n + 2 * t) = pack2(dv[4 * n + 2 * r], dv[4 * n + 2 * r + 1]);
            }
        }
    }
}
