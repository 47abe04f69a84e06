// The NaN/Inf check of Q, K and V inside the attention kernel (rung 7, 7_wgmma.cu), by warps that would idle.
//
// flashkit.attention tests its inputs for NaN and Inf by default. A separate scan kernel (flashkit/finite.py) reads
// all of q, k and v once more before the attention kernel gets the SMs: ~50 us of a 0.5-1.3 ms rung 7 call on an
// H200, so the public call stayed 4-6% above the kernel alone. Rung 7 is compute-bound and leaves the DRAM mostly
// idle, and three warps of its producer warpgroup have nothing to do: here they read a share of the inputs while
// the consumers compute, so the reads cost no SM time of their own.
//
// How: q, k and v are seen as one sequence of 16-byte units (q's, then k's, then v's). The first `shares` blocks of
// the grid (by linear block index, the first to be scheduled) each take one contiguous share of it. Warp 1's lane 0
// asks the copy engine for the share chunk by chunk (cp.async.bulk, SCAN_CHUNK bytes into one of SCAN_STAGES
// shared-memory buffers, each completing on its own mbarrier; a chunk that crosses from one array into the next is
// two copies onto the same barrier); the 96 threads of warps 1-3 test each landed chunk from shared memory: a
// 16-bit float is NaN or Inf exactly when all its exponent bits are set (__vcmpeq2 tests two at once).
//
// Reporting, in page-locked host memory (flashkit.finite.HostFlags; the host pointer is valid on the device):
//   - a block that saw a bad word of array y (0 q, 1 k, 2 v) stores the call's serial number into flags[y], then
//     fences at system scope, so the store reaches the host before the count below moves;
//   - each block then counts itself in `count`, a 64-bit word of device memory holding (serial << 32) | blocks
//     counted. The update is a compare-and-swap: a word of another call (any older serial) starts again at 1, so
//     no reset is needed and two calls can never add to one count: a call's count can only reach `shares` once
//     all its own blocks have counted themselves;
//   - the block that completes the count fences at system scope and stores the serial into flags[done_word].
// The host polls that word (and the kernel's end event, the backstop if the count never completes) and then
// reads flags[0..2]: its answer comes while the kernel still runs.

#pragma once

#include "hopper.cuh"  // mbar_expect_tx / mbar_wait, bulk_load (mbarrier.cuh), named_sync

#ifndef SCAN_CHUNK
#define SCAN_CHUNK 16384  // bytes of one bulk copy (and of one buffer)
#endif
#ifndef SCAN_STAGES
#define SCAN_STAGES 3     // buffers: copies in flight while one is tested
#endif
#ifndef SCAN_EVICT_FIRST
#define SCAN_EVICT_FIRST 1  // the check's copies marked first to leave L2 (K_j and V_j, read by many blocks, stay)
#endif
#define SCAN_THREADS 96   // warps 1-3 of the producer warpgroup
#define SCAN_BARRIER 3    // the named barrier of those 96 threads (rung 7's ping-pong uses 1 and 2)
#define SCAN_SMEM (SCAN_STAGES * SCAN_CHUNK)

#ifdef USE_BF16
#define EXPONENT2 0x7F807F80u  // bfloat16: 8 exponent bits, two elements to a 32-bit word
#else
#define EXPONENT2 0x7C007C00u  // float16: 5 exponent bits
#endif

// Any of the eight 16-bit elements of u NaN or Inf?
__device__ __forceinline__ bool nonfinite8(uint4 u) {
    return (__vcmpeq2(u.x & EXPONENT2, EXPONENT2) | __vcmpeq2(u.y & EXPONENT2, EXPONENT2) |
            __vcmpeq2(u.z & EXPONENT2, EXPONENT2) | __vcmpeq2(u.w & EXPONENT2, EXPONENT2)) != 0u;
}

// bulk_load (mbarrier.cuh) with an L2 policy: the check reads each byte once, so its lines should not push out
// the K and V tiles that the other blocks of a head are about to read again.
__device__ __forceinline__ void check_load(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
#if SCAN_EVICT_FIRST
    unsigned long long policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar), "l"(policy) : "memory");
#else
    bulk_load(dst, src, bytes, bar);
#endif
}

__device__ __forceinline__ uint4 ld_shared_v4(unsigned addr) {
    uint4 u;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w) : "r"(addr));
    return u;
}

// Share `share` of `shares` of the units of (Q: q16 units, K and V: kv16 units each), tested by the thread
// `st` (0..95) of the scanning warps; buf: SCAN_SMEM bytes of shared memory, bars: SCAN_STAGES mbarriers (8 bytes
// each, initialised with count 1). Returns when this block has reported (see above). Inside the share, offsets
// are 32-bit (a share is at most flashkit.finite.FUSED_MAX_SHARE bytes), so that the loop fits in the few
// registers the producer warpgroup keeps.
__device__ void check_share(const void* Q, const void* K, const void* V, long long q16, long long kv16, int share,
                            int shares, unsigned buf, unsigned bars, unsigned long long flags, int done_word,
                            long long serial, unsigned long long* count) {
    const int st = threadIdx.x % 128 - 32;
    const long long units = q16 + 2 * kv16;
    const long long u0 = units * share / shares;
    const unsigned n = (unsigned)(units * (share + 1) / shares - u0);  // this share's units: [u0, u0 + n)
    // where K's and V's units begin, counted from u0 (clamped to [0, n])
    const unsigned k_at = (unsigned)max(0ll, min((long long)n, q16 - u0));
    const unsigned v_at = (unsigned)max(0ll, min((long long)n, q16 + kv16 - u0));
    const unsigned chunk_units = SCAN_CHUNK / 16;
    const unsigned n_chunks = (n + chunk_units - 1) / chunk_units;
    // chunk c: units [c chunk_units, min(n, (c + 1) chunk_units)) of the share, one copy per array it touches
    auto issue = [&](unsigned c) {
        const unsigned bar = bars + 8 * (c % SCAN_STAGES);
        unsigned a = c * chunk_units;
        const unsigned e = min(n, a + chunk_units);
        mbar_expect_tx(bar, (e - a) * 16);
        unsigned dst = buf + (c % SCAN_STAGES) * SCAN_CHUNK;
        while (a < e) {
            const unsigned stop = min(e, a < k_at ? k_at : a < v_at ? v_at : n);
            const long long g = u0 + a;  // the unit's index in the sequence q, k, v
            const char* src = a < k_at ? (const char*)Q + g * 16
                            : a < v_at ? (const char*)K + (g - q16) * 16
                                       : (const char*)V + (g - q16 - kv16) * 16;
            check_load(dst, src, (stop - a) * 16, bar);
            dst += (stop - a) * 16;
            a = stop;
        }
    };
    if (st == 0)
        for (unsigned c = 0; c < n_chunks && c < SCAN_STAGES; ++c) issue(c);
    unsigned bad = 0;  // bit y: a bad word in array y
    for (unsigned c = 0; c < n_chunks; ++c) {
        const unsigned s = c % SCAN_STAGES;
        mbar_wait(bars + 8 * s, (c / SCAN_STAGES) & 1);
        const unsigned a = c * chunk_units, e = min(n, a + chunk_units);
        for (unsigned u = a + st; u < e; u += SCAN_THREADS)
            if (nonfinite8(ld_shared_v4(buf + s * SCAN_CHUNK + (u - a) * 16)))
                bad |= 1u << (u < k_at ? 0 : u < v_at ? 1 : 2);
        named_sync(SCAN_BARRIER, SCAN_THREADS);  // every scanning thread is done with buffer s
        if (st == 0 && c + SCAN_STAGES < n_chunks) issue(c + SCAN_STAGES);
    }
    volatile long long* words = reinterpret_cast<volatile long long*>(flags);
    if (bad) {
        for (int y = 0; y < 3; ++y)
            if (bad & (1u << y)) words[y] = serial;
        __threadfence_system();
    }
    named_sync(SCAN_BARRIER, SCAN_THREADS);
    if (st == 0) {
        const unsigned long long tag = (unsigned long long)(serial & 0xffffffffll) << 32;
        unsigned long long seen = *reinterpret_cast<volatile unsigned long long*>(count), next;
        while (true) {
            next = ((seen & 0xffffffff00000000ull) == tag) ? seen + 1 : tag | 1ull;
            const unsigned long long was = atomicCAS(count, seen, next);
            if (was == seen) break;
            seen = was;
        }
        if ((next & 0xffffffffull) == (unsigned long long)shares) {
            __threadfence_system();
            words[done_word] = serial;
        }
    }
}
