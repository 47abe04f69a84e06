// Split-K decoding ("flash-decoding"): a few query rows against a long KV cache, on the GPU.
//
// What changed from the prefill kernels: one decoding step has Nq = 1 query row per head, so a grid
// over query tiles has only B * H_kv blocks (8 on a 32/8 GQA model at batch 1: 6% of an H100's 132 SMs).
// Split-K cuts the cache into `splits` chunks: one block per (split, K/V head, batch), each streaming
// its chunk once for all g = Hq / H_kv query heads of the group and writing a partial online-softmax
// state (m, l, O); `decode_merge` combines the states exactly, as flashkit.online_softmax.merge does.
// Expected: memory-bound, so the goal is the card's copy bandwidth for K + V.
// Measured (H100 80GB HBM3, GQA 32/8, d = 128, fp16, 32k cache, copy 3.01 TB/s read + write; see
// benchmarks/results/decode-nvidia-h100-80gb-hbm3.json): batch 1 63.6 us = 2.11 TB/s (torch flash
// 89.5 us, cuDNN 88.5 us), batch 8 364.5 us = 2.95 TB/s, 98% of copy (torch flash 363.2 us);
// one split only (no split-K): 742 us at batch 1.
//
// Thread layout: 4 warps; a key row of D elements is read by LPK = D * sizeof(T) / 16 lanes with one
// 16-byte load each (fp16, D = 128: 16 lanes, so one warp reads KPW = 2 keys at a time), U keys per
// lane in flight for K and V before any arithmetic. Each (warp, key slot) keeps its own online-softmax
// state over the keys it saw; the block merges its 4 * KPW states in shared memory at the end.
// PREFETCH = true issues the loads of step t + 1 before the arithmetic of step t (register double
// buffering: 168 instead of 138 registers for fp16, d = 128, 4 rows; 3 blocks per SM either way).
// Measured: 364.5 instead of 396.0 us at batch 8, 63.6 instead of 67.3 us at batch 1 (32k cache).
// On an NVIDIA H200 (decode-nvidia-h200-history1.json): batch 1 51.0 us (cuDNN 68.0), batch 8 263.0 us = 4.08 TB/s
// (cuDNN 249.7 us, 4.30 TB/s); DECODE_L2_256B (loads with the .L2::256B prefetch hint) 279.5 us at batch 8,
// 50.4 at batch 1: not the default (flashkit/gpu/decode.py L2_HINT).
// BULK (decode_splitk_bulk, below): K and V through the copy engine (cp.async.bulk, 1-D, completing on mbarriers)
// into STAGES shared-memory stages fed by a producer warp; the consumers' arithmetic is the register kernel's
// (online_step). Why: cuDNN reads K + V faster than a copy runs (4.30 TB/s against 4.22), so a read-only stream
// needs more bytes in flight per SM than the register kernel keeps (~24-48 KB at 3 blocks). Expected: >= cuDNN at
// batch 8. Measured (H200, decode-nvidia-h200.json, commit f5ee5dc, one run; us at batch 1 / batch 8, 32k cache,
// splits = one wave by occupancy / twice that): 2 stages of 2 x 16 KB (2 blocks per SM) 49.3 / 302.7 (66 and 8
// splits: 67.7 / 296.6); 3 stages of 2 x 16 KB 50.6 / 283.0 (69.9 / 290.9); 4 stages of 2 x 8 KB 49.2 / 286.4
// (66.9 / 300.1). The register kernel in the same run: 50.7 / 281.0 (an earlier run: 51.0 / 263.0); cuDNN 43.7 /
// 249.6 (earlier 68.0 / 249.7). So more bytes in flight did not close the gap: BULK is level with the register
// kernel at batch 8 and 3% faster at batch 1, not the default; both lose to cuDNN in this run (batch 8 0.89x,
// batch 1 0.86x). Not yet tried: the merge folded into the last block, a persistent grid, cp.async.bulk's L2
// evict_first hint, ncu's DRAM and issue counters (what limits a block: the consumers' arithmetic and shuffles,
// ~60 instructions a key, may be it).
// Scores are kept in base-2 units (q pre-multiplied by scale * log2(e)) so exp() is one exp2f;
// M is written in natural-log units, like the CPU kernel's m.
#include <cuda_fp16.h>

#include "mbarrier.cuh"  // mbar_init / expect_tx / arrive / wait, bulk_load (the BULK kernel)

#define NEG_INF (__int_as_float(0xff800000))
#define LN2 0.6931471805599453f

// A 16-byte pack of T, loaded with one instruction, converted to VEC floats.
template <typename T> struct Pack;

template <> struct Pack<__half> {
    static constexpr int VEC = 8;
    typedef uint4 Raw;
    __device__ __forceinline__ static Raw load(const __half* p) {
#ifdef DECODE_L2_256B  // the L2 fetches the 256-byte sector group around each line (a DRAM-efficiency hint)
        Raw r;
        asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
        return r;
#else
        return *reinterpret_cast<const uint4*>(p);  // const __restrict__: ld.global.nc
#endif
    }
    __device__ __forceinline__ static Raw zero() { return make_uint4(0u, 0u, 0u, 0u); }
    __device__ __forceinline__ static void to_float(const Raw& r, float* f) {
        const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float2 x = __half22float2(h[e]);
            f[2 * e] = x.x;
            f[2 * e + 1] = x.y;
        }
    }
    __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <> struct Pack<float> {
    static constexpr int VEC = 4;
    typedef float4 Raw;
    __device__ __forceinline__ static Raw load(const float* p) {
#ifdef DECODE_L2_256B
        Raw r;
        asm("ld.global.nc.L1::no_allocate.L2::256B.v4.f32 {%0, %1, %2, %3}, [%4];"
                     : "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w) : "l"(p));
        return r;
#else
        return *reinterpret_cast<const float4*>(p);
#endif
    }
    __device__ __forceinline__ static Raw zero() { return make_float4(0.f, 0.f, 0.f, 0.f); }
    __device__ __forceinline__ static void to_float(const Raw& r, float* f) {
        f[0] = r.x;
        f[1] = r.y;
        f[2] = r.z;
        f[3] = r.w;
    }
    __device__ __forceinline__ static float from_float(float x) { return x; }
};

// The K and V rows j = first + u * KPW (u < U) of one lane, 16 bytes each; zeros past jhi.
template <typename T, int D, int U, int KPW>
__device__ __forceinline__ void load_step(const T* Kh, const T* Vh, const int first, const int jhi,
                                          typename Pack<T>::Raw (&kr)[U], typename Pack<T>::Raw (&vr)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int j = first + u * KPW;
        if (j < jhi) {
            kr[u] = Pack<T>::load(Kh + (size_t)j * D);
            vr[u] = Pack<T>::load(Vh + (size_t)j * D);
        } else {
            kr[u] = Pack<T>::zero();
            vr[u] = Pack<T>::zero();
        }
    }
}

// One step of the online softmax (FlashAttention's update) over the U keys j[u] a lane holds in registers
// (kr, vr: 16 bytes of each key's K and V row), for every row of the block; shared by both kernels.
template <typename T, int ROWS, int U, int LPK>
__device__ __forceinline__ void online_step(const float (&q)[ROWS][Pack<T>::VEC], const typename Pack<T>::Raw (&kr)[U],
                                            const typename Pack<T>::Raw (&vr)[U], const int (&j)[U], const int jhi,
                                            const int (&rlo)[ROWS], const int (&rhi)[ROWS], float (&m)[ROWS],
                                            float (&l)[ROWS], float (&acc)[ROWS][Pack<T>::VEC]) {
    typedef Pack<T> P;
    constexpr int VEC = P::VEC;
    // S = Q K_j^T: each lane's partial dot product over its VEC columns ...
    float sc[U][ROWS];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        float kf[VEC];
        P::to_float(kr[u], kf);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float a = 0.f;
#pragma unroll
            for (int e = 0; e < VEC; ++e) a = fmaf(q[r][e], kf[e], a);
            sc[u][r] = a;
        }
    }
    // ... summed over the LPK lanes of the key (a butterfly: every lane ends with the full score)
#pragma unroll
    for (int off = LPK / 2; off > 0; off /= 2) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) sc[u][r] += __shfl_xor_sync(0xffffffffu, sc[u][r], off);
        }
    }
    // masked scores are -inf: past the split, past a row's visible range (length, causal)
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (!(j[u] < jhi && j[u] >= rlo[r] && j[u] < rhi[r])) sc[u][r] = NEG_INF;
        }
    }
    float vf[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) P::to_float(vr[u], vf[u]);
    // m' = max(m, rowmax(S)); P = exp(S - m'); alpha = exp(m - m'); l = alpha l + rowsum(P); O = alpha O + P V
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        float mx = m[r];
#pragma unroll
        for (int u = 0; u < U; ++u) mx = fmaxf(mx, sc[u][r]);
        if (mx == NEG_INF) continue;  // nothing visible yet for this row in this slot
        const float alpha = exp2f(m[r] - mx);  // 0 when m = -inf
        float p[U];
        float psum = 0.f;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            p[u] = exp2f(sc[u][r] - mx);  // 0 for a masked score
            psum += p[u];
        }
        l[r] = l[r] * alpha + psum;
        m[r] = mx;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            float o = acc[r][e] * alpha;
#pragma unroll
            for (int u = 0; u < U; ++u) o = fmaf(p[u], vf[u][e], o);
            acc[r][e] = o;
        }
    }
}

// Merge the SLOTS slot states (m, l, O) of the block (the same merge as between splits) and write the split's
// state. slot < 0: a thread that holds no state (the producer warp) but helps with the writes.
template <typename T, int D, int ROWS, int SLOTS>
__device__ __forceinline__ void block_merge(float* sm_o_raw, const int slot, const int c0, const float (&m)[ROWS],
                                            const float (&l)[ROWS], const float (&acc)[ROWS][Pack<T>::VEC],
                                            const int rg, const int R, const int Nq, const int Hq, const int h,
                                            const int g, const int b, const int B, const int s,
                                            float* __restrict__ Mp, float* __restrict__ Lp, float* __restrict__ Op) {
    constexpr int VEC = Pack<T>::VEC;
    __shared__ float sm_m[SLOTS][ROWS];
    __shared__ float sm_l[SLOTS][ROWS];
    float (*sm_o)[ROWS][D] = reinterpret_cast<float (*)[ROWS][D]>(sm_o_raw);  // [SLOTS][ROWS][D]
    if (slot >= 0) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (c0 == 0) {
                sm_m[slot][r] = m[r];
                sm_l[slot][r] = l[r];
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) sm_o[slot][r][c0 + e] = acc[r][e];
        }
    }
    __syncthreads();
    const size_t rows_total = (size_t)B * Hq * Nq;
    for (int idx = threadIdx.x; idx < ROWS * D; idx += blockDim.x) {
        const int r = idx / D, c = idx % D;
        const int rr = rg * ROWS + r;
        if (rr >= R) continue;
        float M = NEG_INF;
        for (int sl = 0; sl < SLOTS; ++sl) M = fmaxf(M, sm_m[sl][r]);
        float L = 0.f, O = 0.f;
        if (M != NEG_INF) {
            for (int sl = 0; sl < SLOTS; ++sl) {
                const float w = exp2f(sm_m[sl][r] - M);  // 0 for a slot that saw nothing
                L += w * sm_l[sl][r];
                O += w * sm_o[sl][r][c];
            }
        }
        const int gi = rr / Nq, i = rr % Nq;
        const size_t row = (size_t)(b * Hq + h * g + gi) * Nq + i;
        const size_t at = (size_t)s * rows_total + row;
        Op[at * D + c] = O;
        if (c == 0) {
            Mp[at] = M * LN2;  // natural-log units; -inf stays -inf
            Lp[at] = L;
        }
    }
}

// One block: split s = blockIdx.x of the keys, K/V head h and row group rg from blockIdx.y, batch
// b = blockIdx.z. Rows of the block: query rows rr = rg * ROWS + r (r < ROWS) of the g * Nq rows that
// share head h; rr = gi * Nq + i is query head h * g + gi, query row i.
//   Q (B, Hq, Nq, D); K, V (B, Hkv, Nmax, D); lo, hi (B, Nq) int32: row i sees keys lo <= j < hi
//   Mp, Lp (splits, B, Hq, Nq) and Op (splits, B, Hq, Nq, D) float32: (m, l, O) of each split
template <typename T, int D, int ROWS, int U, bool PREFETCH>
__global__ void __launch_bounds__(128)
decode_splitk(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
              const int* __restrict__ lo, const int* __restrict__ hi, const float scale_log2,
              const int Hq, const int Hkv, const int Nq, const int Nmax, const int n_keys, const int chunk,
              const int row_groups, float* __restrict__ Mp, float* __restrict__ Lp, float* __restrict__ Op) {
    typedef Pack<T> P;
    typedef typename P::Raw Raw;
    constexpr int VEC = P::VEC;
    constexpr int LPK = D / VEC;  // lanes that share one key row
    static_assert(LPK <= 32 && 32 % LPK == 0, "a key row must be read by 1..32 lanes of one warp");
    constexpr int KPW = 32 / LPK;  // keys a warp reads at once
    constexpr int NW = 4;          // warps per block
    constexpr int KEYS_PER_ITER = NW * KPW * U;

    const int s = blockIdx.x;
    const int h = blockIdx.y / row_groups;
    const int rg = blockIdx.y % row_groups;
    const int b = blockIdx.z;
    const int B = gridDim.z;
    const int g = Hq / Hkv;
    const int R = g * Nq;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int ks = lane / LPK;        // key slot of this lane in its warp
    const int c0 = (lane % LPK) * VEC;  // the columns this lane reads: c0 .. c0 + VEC - 1

    // Q_i * scale * log2(e), this lane's columns, and each row's visible key range
    float q[ROWS][VEC];
    int rlo[ROWS], rhi[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int rr = rg * ROWS + r;
        if (rr < R) {
            const int gi = rr / Nq, i = rr % Nq;
            const T* q_row = Q + ((size_t)(b * Hq + h * g + gi) * Nq + i) * D + c0;
            P::to_float(P::load(q_row), q[r]);
#pragma unroll
            for (int e = 0; e < VEC; ++e) q[r][e] *= scale_log2;
            rlo[r] = lo[b * Nq + i];
            rhi[r] = hi[b * Nq + i];
        } else {  // padding row: sees nothing, never written
#pragma unroll
            for (int e = 0; e < VEC; ++e) q[r][e] = 0.f;
            rlo[r] = 0;
            rhi[r] = 0;
        }
    }
    // The keys of this split, narrowed to those some row of the block can see.
    const int j0 = min(s * chunk, n_keys);
    const int j1 = min(j0 + chunk, n_keys);
    int jlo = j1, jhi = j0;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        if (rlo[r] < rhi[r]) {
            jlo = min(jlo, max(j0, rlo[r]));
            jhi = max(jhi, min(j1, rhi[r]));
        }
    }

    // The running state (m, l, O) of this lane's key slot, O for this lane's columns only.
    float m[ROWS], l[ROWS], acc[ROWS][VEC];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        m[r] = NEG_INF;
        l[r] = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][e] = 0.f;
    }

    const T* Kh = K + (size_t)(b * Hkv + h) * Nmax * D + c0;
    const T* Vh = V + (size_t)(b * Hkv + h) * Nmax * D + c0;

    // The loop bounds are the same for every thread of the block, so every lane reaches the shuffles.
    // This lane's keys of the step at `base`: base + warp * U * KPW + u * KPW + ks, u < U.
    const int lane_first = warp * U * KPW + ks;
    Raw kr[U], vr[U];
    if (PREFETCH) load_step<T, D, U, KPW>(Kh, Vh, jlo + lane_first, jhi, kr, vr);
    for (int base = jlo; base < jhi; base += KEYS_PER_ITER) {
        int j[U];
#pragma unroll
        for (int u = 0; u < U; ++u) j[u] = base + lane_first + u * KPW;
        // Issue all 2U loads of a step before any arithmetic: bytes in flight hide DRAM latency.
        // PREFETCH: the next step's loads go out now and land while this step computes (more registers).
        Raw kn[U], vn[U];
        if (PREFETCH) {
            load_step<T, D, U, KPW>(Kh, Vh, base + KEYS_PER_ITER + lane_first, jhi, kn, vn);
        } else {
            load_step<T, D, U, KPW>(Kh, Vh, base + lane_first, jhi, kr, vr);
        }
        online_step<T, ROWS, U, LPK>(q, kr, vr, j, jhi, rlo, rhi, m, l, acc);
        if (PREFETCH) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                kr[u] = kn[u];
                vr[u] = vn[u];
            }
        }
    }

    __shared__ float sm_o[NW * KPW * ROWS * D];
    block_merge<T, D, ROWS, NW * KPW>(sm_o, warp * KPW + ks, c0, m, l, acc, rg, R, Nq, Hq, h, g, b, B, s, Mp, Lp, Op);
}

// BULK: the same arithmetic, but K and V reach shared memory through the copy engine (cp.async.bulk, 1-D, sm_90)
// instead of through registers: a producer warp (warp NW, one lane) streams tiles of TK keys (TK * D elements of
// K and of V, one contiguous copy each) into STAGES shared-memory stages; each stage has a "full" mbarrier (its
// bytes landed) and an "empty" one (all NW consumer warps are done with it). Why: a read-only stream needs more
// bytes in flight per SM than registers hold (the register kernel keeps at most ~48 KB per SM in flight at 3
// blocks); STAGES x 2 x TK x D x sizeof(T) bytes per block are in flight here, and the consumers' registers hold
// no loads. The consumers read a stage with the register kernel's layout (a key row by LPK lanes, 16 bytes
// each; conflict-free: a warp's 32 lanes read 512 contiguous bytes).
template <typename T, int D, int ROWS, int U, int TK, int STAGES>
__global__ void __launch_bounds__(160)
decode_splitk_bulk(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                   const int* __restrict__ lo, const int* __restrict__ hi, const float scale_log2,
                   const int Hq, const int Hkv, const int Nq, const int Nmax, const int n_keys, const int chunk,
                   const int row_groups, float* __restrict__ Mp, float* __restrict__ Lp, float* __restrict__ Op) {
    typedef Pack<T> P;
    typedef typename P::Raw Raw;
    constexpr int VEC = P::VEC;
    constexpr int LPK = D / VEC;
    static_assert(LPK <= 32 && 32 % LPK == 0, "a key row must be read by 1..32 lanes of one warp");
    constexpr int KPW = 32 / LPK;
    constexpr int NW = 4;                          // consumer warps; warp NW is the producer
    constexpr int STEP = KPW * U;                  // keys of one warp's step
    static_assert(TK % (NW * STEP) == 0, "a tile is whole steps of every consumer warp");
    constexpr int WARP_KEYS = TK / NW;             // keys of a tile that one consumer warp reads
    constexpr unsigned TILE_BYTES = TK * D * sizeof(T);  // of K (and of V) per stage
    constexpr int SLOTS = NW * KPW;
    static_assert(SLOTS * ROWS * D * 4 <= 2 * STAGES * TILE_BYTES, "the block merge reuses the stages");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* const K_s = reinterpret_cast<T*>(smem_raw);               // [STAGES][TK][D]
    T* const V_s = K_s + STAGES * TK * D;                        // [STAGES][TK][D]
    __shared__ __align__(8) unsigned long long bars[2 * STAGES];  // full[s], then empty[s]
    const unsigned full0 = smem_u32(&bars[0]), empty0 = smem_u32(&bars[STAGES]);

    const int s_idx = blockIdx.x;
    const int h = blockIdx.y / row_groups;
    const int rg = blockIdx.y % row_groups;
    const int b = blockIdx.z;
    const int B = gridDim.z;
    const int g = Hq / Hkv;
    const int R = g * Nq;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int ks = lane / LPK;
    const int c0 = (lane % LPK) * VEC;

    float q[ROWS][VEC];
    int rlo[ROWS], rhi[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int rr = rg * ROWS + r;
        if (rr < R) {
            const int gi = rr / Nq, i = rr % Nq;
            P::to_float(P::load(Q + ((size_t)(b * Hq + h * g + gi) * Nq + i) * D + c0), q[r]);
#pragma unroll
            for (int e = 0; e < VEC; ++e) q[r][e] *= scale_log2;
            rlo[r] = lo[b * Nq + i];
            rhi[r] = hi[b * Nq + i];
        } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) q[r][e] = 0.f;
            rlo[r] = 0;
            rhi[r] = 0;
        }
    }
    const int j0 = min(s_idx * chunk, n_keys);
    const int j1 = min(j0 + chunk, n_keys);
    int jlo = j1, jhi = j0;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        if (rlo[r] < rhi[r]) {
            jlo = min(jlo, max(j0, rlo[r]));
            jhi = max(jhi, min(j1, rhi[r]));
        }
    }
    const int n_tiles = jhi > jlo ? (jhi - jlo + TK - 1) / TK : 0;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, NW);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // visible to the copy engine
    }
    __syncthreads();

    float m[ROWS], l[ROWS], acc[ROWS][VEC];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        m[r] = NEG_INF;
        l[r] = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][e] = 0.f;
    }

    if (warp == NW) {
        // The producer: tile t goes to stage t % STAGES once the consumers released tile t - STAGES there.
        if (lane == 0) {
            const size_t head = (size_t)(b * Hkv + h) * Nmax;
            for (int t = 0; t < n_tiles; ++t) {
                const int s = t % STAGES, first = jlo + t * TK;
                if (t >= STAGES) mbar_wait(empty0 + 8 * s, ((t / STAGES) - 1) & 1);
                const unsigned bytes = (unsigned)(min(TK, jhi - first) * D * sizeof(T));  // a short last tile
                mbar_expect_tx(full0 + 8 * s, 2 * bytes);
                bulk_load(smem_u32(K_s + s * TK * D), K + (head + first) * D, bytes, full0 + 8 * s);
                bulk_load(smem_u32(V_s + s * TK * D), V + (head + first) * D, bytes, full0 + 8 * s);
            }
        }
    } else {
        for (int t = 0; t < n_tiles; ++t) {
            const int s = t % STAGES;
            mbar_wait(full0 + 8 * s, (t / STAGES) & 1);
            const T* Kt = K_s + s * TK * D + c0;
            const T* Vt = V_s + s * TK * D + c0;
#pragma unroll
            for (int w0 = 0; w0 < WARP_KEYS; w0 += STEP) {
                // this lane's keys of the step: tile rows warp * WARP_KEYS + w0 + u * KPW + ks
                const int row0 = warp * WARP_KEYS + w0 + ks;
                int j[U];
                Raw kr[U], vr[U];
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    j[u] = jlo + t * TK + row0 + u * KPW;
                    // rows past jhi in a short last tile hold stale bytes: zeros instead (0 * NaN would be NaN)
                    kr[u] = j[u] < jhi ? *reinterpret_cast<const Raw*>(Kt + (row0 + u * KPW) * D) : P::zero();
                    vr[u] = j[u] < jhi ? *reinterpret_cast<const Raw*>(Vt + (row0 + u * KPW) * D) : P::zero();
                }
                online_step<T, ROWS, U, LPK>(q, kr, vr, j, jhi, rlo, rhi, m, l, acc);
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(empty0 + 8 * s);  // this warp is done with stage s
        }
    }
    __syncthreads();  // every tile consumed, so every copy landed: the stages are free for the block merge
    float* const sm_o = reinterpret_cast<float*>(smem_raw);  // [SLOTS][ROWS][D]
    block_merge<T, D, ROWS, SLOTS>(sm_o, warp < NW ? warp * KPW + ks : -1, c0, m, l, acc, rg, R, Nq, Hq, h, g, b, B,
                                   s_idx, Mp, Lp, Op);
}

// The exact merge of the splits, one block per query row (B * Hq * Nq blocks):
//   M = max_s m_s,  L = sum_s exp(m_s - M) l_s,  o = sum_s exp(m_s - M) O_s / L,  lse = M + log(L)
// A row that saw no key (L = 0) gives o = 0 and lse = -inf, as flashkit.online_softmax.finalize.
template <typename T>
__global__ void decode_merge(const float* __restrict__ Mp, const float* __restrict__ Lp,
                             const float* __restrict__ Op, const int splits, const int rows, const int D,
                             T* __restrict__ O, float* __restrict__ lse) {
    const int row = blockIdx.x;
    float M = NEG_INF;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, Mp[(size_t)s * rows + row]);
    float L = 0.f;
    if (M != NEG_INF) {
        for (int s = 0; s < splits; ++s) L += expf(Mp[(size_t)s * rows + row] - M) * Lp[(size_t)s * rows + row];
    }
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        float o = 0.f;
        if (L > 0.f) {
            for (int s = 0; s < splits; ++s) {
                const size_t at = (size_t)s * rows + row;
                o += expf(Mp[at] - M) * Op[at * D + c];
            }
            o /= L;
        }
        O[(size_t)row * D + c] = Pack<T>::from_float(o);
    }
    if (threadIdx.x == 0) lse[row] = L > 0.f ? M + logf(L) : NEG_INF;
}

// Instantiations for an nvcc check (`nvcc -arch=sm_90 -cubin -Xptxas -v -DFLASHKIT_INSTANTIATE`);
// CuPy instantiates the one it needs through name_expressions.
#ifdef FLASHKIT_INSTANTIATE
template __global__ void decode_splitk<__half, 128, 4, 4, false>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk<__half, 128, 8, 2, false>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk<__half, 128, 1, 4, false>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk<__half, 64, 8, 2, false>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk<__half, 256, 8, 2, false>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk<float, 128, 4, 4, false>(const float*, const float*, const float*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk<float, 64, 8, 2, false>(const float*, const float*, const float*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_merge<__half>(const float*, const float*, const float*, int, int, int, __half*, float*);
template __global__ void decode_merge<float>(const float*, const float*, const float*, int, int, int, float*, float*);
template __global__ void decode_splitk<__half, 128, 4, 4, true>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk<__half, 128, 8, 2, true>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk<float, 128, 4, 4, true>(const float*, const float*, const float*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk_bulk<__half, 128, 4, 4, 64, 2>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk_bulk<__half, 128, 4, 4, 64, 3>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk_bulk<__half, 128, 4, 4, 64, 4>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk_bulk<__half, 128, 4, 4, 32, 4>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk_bulk<__half, 128, 8, 4, 64, 3>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk_bulk<__half, 128, 1, 4, 64, 3>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk_bulk<__half, 64, 8, 4, 128, 3>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk_bulk<__half, 256, 8, 4, 32, 3>(const __half*, const __half*, const __half*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk_bulk<float, 128, 4, 4, 32, 3>(const float*, const float*, const float*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk_bulk<float, 64, 8, 4, 64, 3>(const float*, const float*, const float*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
template __global__ void decode_splitk_bulk<float, 128, 1, 4, 32, 3>(const float*, const float*, const float*, const int*, const int*, float, int, int, int, int, int, int, int, float*, float*, float*);
#endif
