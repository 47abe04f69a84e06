// Rung 7: Hopper (sm_90a). wgmma.mma_async from shared memory, TMA loads completing on mbarriers, and a
// producer warpgroup feeding two consumer warpgroups (warp specialisation with setmaxnreg).
// Changed since rung 6: (1) the tensor-core instruction is wgmma.mma_async: one warpgroup (4 warps) computes a
//   64 x N x 16 product; the tensor cores read A and B straight from shared memory through 64-bit matrix
//   descriptors (no ldmatrix, no operand registers); P stays in registers as the A operand of P V, and V is read
//   transposed through the "N-major" flag (imm-trans-b); the fp32 accumulators S and O stay in registers;
//   (2) Q_i, K_j and V_j arrive by TMA (cp.async.bulk.tensor: one thread asks the copy engine for a 64-column box;
//   it writes the box with the 128-byte swizzle the descriptors expect and reports the bytes to an mbarrier;
//   flashkit/gpu/tma.py builds the tensor maps); (3) two K/V stages, each with "full" barriers (the copy landed)
//   and "empty" barriers (every consumer thread is done with K_j, or with V_j); (4) warpgroup 0 is the producer
//   (one thread issues the copies; setmaxnreg.dec gives its registers to the consumers), warpgroups 1 and 2 the
//   consumers (64 query rows each, setmaxnreg.inc to 240). The layouts are modelled and unit-tested in NumPy:
//   flashkit/gpu/hopper_layout.py (tests/test_hopper_layout.py).
// Why: mma.sync (rungs 4-6) stops near torch's flash backend; cuDNN reaches 435-650 TFLOP/s on this card.
// ptxas (sm_90a, Br x Bc = 128 x 128): no spills, no C7515 (wgmma serialised) warning, 168 registers at entry
//   (the consumers raise theirs to 240); SASS (cuobjdump on the H200): HGMMA.64x128x16.F32, UTMALDG, USETMAXREG,
//   no HMMA, no local memory. (192, 128) at d = 128 spills 100 bytes (three consumers get 160 registers each).
// Steps, measured on an NVIDIA H200 (N = 4096, B*N = 16384, H*d = 2048, fp16, non-causal, d = 64 / 128, 128 x 128;
//   ratio = cuDNN's time / the rung's, cuDNN in the same run; the runs' cuDNN itself varied 5-7% between runs):
//   v1, no producer warpgroup (consumer thread 0 issues the copies, one empty barrier per stage): 304.1 / 479.0
//     TFLOP/s, 0.70x / 0.83x (rung7-h200-history1.json, cupy-wgmma-v1);
//   v2, + producer warpgroup and setmaxnreg: 388.7 / 517.5, 0.89x / 0.90x (+28% / +8%; history1, cupy-wgmma-v2);
//   v3, + K_j and V_j released separately (K_j once S_j is computed): 409.9 / 555.2, 0.88x / 0.92x, the same ratio
//     within the runs' spread (rung7-h200.json, cupy-wgmma); this file's default;
//   FA3's intra-warpgroup overlap (S_j and P_{j-1} V_{j-1} in flight together, softmax of S_j while P V runs;
//     -DOVERLAP=1): 326.1 / 465.7, 0.80x / 0.84x of v3 (rung7-h200.json, cupy-wgmma-overlap; with one empty
//     barrier per stage it was 313.4 / 448.9, history1); + FA3's ping-pong of the two consumer warpgroups
//     (-DPINGPONG=1): 351.6 / 430.2 (cupy-wgmma-pingpong). Both slower here: not the default; why is not yet
//     known (no profile was taken).
//   Blocks (v3, fp16 non-causal only): 192 x 128 (three consumer warpgroups) 457.2 / 592.8 TFLOP/s, 0.98x / 0.98x
//     cuDNN, +12% / +7% over 128 x 128; 192 x 64 385.4 / 511.5. Not the default yet: causal and bf16 not timed.
//   192 x 128 in all eight cells (fwd-issue11-h200.json, rows cupy-wgmma-192x128 beside the default's, one run;
//     cuDNN's time / the rung's): d = 64 fp16 / bf16 0.97 / 0.98 (128 x 128: 0.87 / 0.88), causal 0.89 / 0.92
//     (0.86 / 0.83); d = 128 0.92 / 0.91 (0.88 / 0.81), causal 0.84 / 0.83 (0.90 / 0.84). Faster in six cells
//     (+3% to +12%), slower at d = 128 causal (-7% / -1%: three consumer warpgroups at 160 registers, 100 bytes
//     spilled). So the default is 192 x 128 at d = 64 and 128 x 128 at d = 128 (flashkit/gpu/rungs.py), checked by
//     the full flashkit.gpu.check with these defaults (gpu-session-h200.json: 191/191).
//   The public call (flashkit.attention, NaN/Inf scan included) over this rung alone, same run: 1.025-1.150x
//     (gpu-overhead-h200-history6.json: 1.05-1.18x with the scan, 1.01-1.12x without it).
//   The NaN/Inf check inside this kernel (input_check.cuh: the producer warpgroup's idle warps bulk-copy and test a
//     share of Q, K, V while the consumers compute; taken where its blocks average >= 32 key tiles, flash.check_columns):
//     public / alone 1.024-1.033x against the separate scan's 1.037-1.063x in the same interleaved rounds (N 4096-8192,
//     gpu-input-check-h200.json); the kernel itself 1.010-1.025x with the check. Shorter kernels keep the separate scan.
// Expected (written before the first run): well above rung 6's ~300 TFLOP/s.
// Measured for the default (rung7-h200.json; 1.41-1.77x rung 6 in the same run; the goal, >= 1.0x cuDNN, is not
//   met: 0.87-0.98x):
// Measured (rung7-h200.json; N=4096 d=64 dtype=float16 causal=False): 409.9 TFLOP/s, 0.88x torch-cudnn
// Measured (rung7-h200.json; N=4096 d=64 dtype=bfloat16 causal=False): 390.2 TFLOP/s, 0.90x torch-cudnn
// Measured (rung7-h200.json; N=4096 d=64 dtype=float16 causal=True): 335.1 TFLOP/s, 0.92x torch-cudnn
// Measured (rung7-h200.json; N=4096 d=64 dtype=bfloat16 causal=True): 336.6 TFLOP/s, 0.91x torch-cudnn
// Measured (rung7-h200.json; N=4096 d=128 dtype=float16 causal=False): 555.2 TFLOP/s, 0.92x torch-cudnn
// Measured (rung7-h200.json; N=4096 d=128 dtype=bfloat16 causal=False): 563.8 TFLOP/s, 0.87x torch-cudnn
// Measured (rung7-h200.json; N=4096 d=128 dtype=float16 causal=True): 470.1 TFLOP/s, 0.89x torch-cudnn
// Measured (rung7-h200.json; N=4096 d=128 dtype=bfloat16 causal=True): 482.0 TFLOP/s, 0.98x torch-cudnn
// The default again, in a later run (fwd-issue11-h200.json; commit 6325270):
// Measured (fwd-issue11-h200.json; N=4096 d=64 dtype=float16 causal=False): 416.6 TFLOP/s, 0.87x torch-cudnn
// Measured (fwd-issue11-h200.json; N=4096 d=64 dtype=bfloat16 causal=False): 414.9 TFLOP/s, 0.88x torch-cudnn
// Measured (fwd-issue11-h200.json; N=4096 d=64 dtype=float16 causal=True): 369.5 TFLOP/s, 0.86x torch-cudnn
// Measured (fwd-issue11-h200.json; N=4096 d=64 dtype=bfloat16 causal=True): 356.1 TFLOP/s, 0.83x torch-cudnn
// Measured (fwd-issue11-h200.json; N=4096 d=128 dtype=float16 causal=False): 568.0 TFLOP/s, 0.88x torch-cudnn
// Measured (fwd-issue11-h200.json; N=4096 d=128 dtype=bfloat16 causal=False): 542.6 TFLOP/s, 0.81x torch-cudnn
// Measured (fwd-issue11-h200.json; N=4096 d=128 dtype=float16 causal=True): 501.3 TFLOP/s, 0.90x torch-cudnn
// Measured (fwd-issue11-h200.json; N=4096 d=128 dtype=bfloat16 causal=True): 486.7 TFLOP/s, 0.84x torch-cudnn
// The defaults 192 x 128 at d = 64 and 128 x 128 at d = 128 (gpu-h200.json; commit 7957305, benchmarks.gpu_session,
//   flashkit.gpu.check 191/191): alone 0.85-0.98x cuDNN; the public call 0.73-0.91x (1.07-1.16x the rung alone):
// Measured (gpu-h200-history3.json; N=4096 d=64 dtype=float16 causal=False): 462.5 TFLOP/s, 0.97x torch-cudnn
// Measured (gpu-h200-history3.json; N=4096 d=64 dtype=bfloat16 causal=False): 466.6 TFLOP/s, 0.98x torch-cudnn
// Measured (gpu-h200-history3.json; N=4096 d=64 dtype=float16 causal=True): 383.4 TFLOP/s, 0.90x torch-cudnn
// Measured (gpu-h200-history3.json; N=4096 d=64 dtype=bfloat16 causal=True): 396.4 TFLOP/s, 0.92x torch-cudnn
// Measured (gpu-h200-history3.json; N=4096 d=128 dtype=float16 causal=False): 573.1 TFLOP/s, 0.88x torch-cudnn
// Measured (gpu-h200-history3.json; N=4096 d=128 dtype=bfloat16 causal=False): 570.3 TFLOP/s, 0.85x torch-cudnn
// Measured (gpu-h200-history3.json; N=4096 d=128 dtype=float16 causal=True): 497.5 TFLOP/s, 0.88x torch-cudnn
// Measured (gpu-h200-history3.json; N=4096 d=128 dtype=bfloat16 causal=True): 506.7 TFLOP/s, 0.87x torch-cudnn
//
// Paper names: Br, Bc, Q_i, K_j, V_j, S = Q_i K_j^T (unscaled), P = exp2(S * scale_log2 - m_i), m_i, l_i, O_i.

#include "common.cuh"    // INFINITY, fast_exp2, row_lo / row_hi (the window rule)
#include "elements.cuh"  // T, MMA_TYPE, pack2
#include "hopper.cuh"    // wgmma fences and waits, descriptors, mbarriers, TMA
#include "input_check.cuh"  // check_share: the NaN/Inf check of Q, K, V by the producer warpgroup's idle warps

#ifndef HEAD_DIM
#define HEAD_DIM 128  // d: 64 or 128 (set by the loader)
#endif
#ifndef BR
#define BR 128  // query rows per block: 64 per consumer warpgroup (set by the loader: 64, 128 or 192)
#endif
#ifndef BC
#define BC 128  // keys per K_j / V_j tile (set by the loader: 64 or 128)
#endif
#ifndef STAGES
#define STAGES 2  // K/V shared-memory buffers
#endif
#ifndef WARP_SPECIALIZE
#define WARP_SPECIALIZE 1  // 0: no producer warpgroup, consumer thread 0 issues the copies (the first version)
#endif
#ifndef OVERLAP
#define OVERLAP 0  // 1: the softmax of K_j's tile runs while P_{j-1} V_{j-1} is on the tensor cores
#endif
#if OVERLAP && !WARP_SPECIALIZE
#error "OVERLAP needs WARP_SPECIALIZE (the copies of later tiles are issued by the producer warpgroup)"
#endif
#define D HEAD_DIM
#define NC (BR / 64)          // consumer warpgroups
#ifndef PINGPONG
#define PINGPONG 0  // 1: the two consumer warpgroups alternate on the tensor cores (needs OVERLAP and BR = 128)
#endif
#if PINGPONG && !(OVERLAP && NC == 2)
#error "PINGPONG needs OVERLAP and two consumer warpgroups"
#endif
#define NHALF (D / 64)        // 64-column (128-byte) halves of a row: one TMA box and one swizzle atom wide
#define NT (128 * (NC + WARP_SPECIALIZE))
#define Q_BYTES (BR * D * 2)
#define KV_BYTES (BC * D * 2)  // one K_j or V_j tile; also the byte count its TMA copies report
#if NC == 1
#define REG_PRODUCER 56
#define REG_CONSUMER 256
#elif NC == 2
#define REG_PRODUCER 24
#define REG_CONSUMER 240
#else
#define REG_PRODUCER 32
#define REG_CONSUMER 160
#endif


// ---- wgmma: D (64 x N, fp32, registers) (+)= A (64 x 16) * B (16 x N) ---------------------------------------
// D fragment (hopper_layout.accumulator_owner): warp w of the warpgroup holds rows 16 w .. 16 w + 15; lane 4 g + t
// holds, for each 8-column block n, d[4n + 0..1] = row 16 w + g, columns 8 n + 2 t, 8 n + 2 t + 1, and
// d[4n + 2..3] = row 16 w + g + 8: rung 6's mma.sync C fragment, repeated along N.
// "ss": A and B from shared memory (descriptors; both K-major). "rs": A from 4 registers per thread (the
// mma.sync A fragment layout), B from shared memory, N-major (imm-trans-b = 1).
// accumulate = 0 overwrites D (the first k-step of S), 1 adds to it.
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], unsigned long long a_desc, unsigned long long b_desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." MMA_TYPE "." MMA_TYPE " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a_desc), "l"(b_desc), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const unsigned (&a)[4], unsigned long long b_desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." MMA_TYPE "." MMA_TYPE " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], unsigned long long a_desc, unsigned long long b_desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." MMA_TYPE "." MMA_TYPE " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a_desc), "l"(b_desc), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const unsigned (&a)[4], unsigned long long b_desc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." MMA_TYPE "." MMA_TYPE " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate));
}

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define WGMMA_S CAT(wgmma_ss_n, BC)  // S (64 x Bc) += Q (64 x 16) K^T (16 x Bc)
#define WGMMA_O CAT(wgmma_rs_n, D)   // O (64 x d) += P (64 x 16) V (16 x d)

// wgmma_fence / commit / wait, fence_regs, descriptor, smem_u32, the mbarrier steps and tma_load: hopper.cuh
// (shared with the backward's b4_wgmma.cu).


// ---- one tile's steps (the consumer warpgroup's 64 rows) ----------------------------------------------------
// S = Q_i K_j^T: d / 16 wgmma, each a 64 x Bc x 16 product. Both operands K-major (d contiguous); the 16-column
// step kk moves the start address 32 bytes inside a 128-byte swizzled row, or to the next 64-column half.
__device__ __forceinline__ void issue_s(float (&S)[BC / 2], unsigned Q_s, unsigned K_stage, int cw) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const unsigned qa = Q_s + (kk / 4) * (BR * 128) + cw * (64 * 128) + (kk % 4) * 32;
        const unsigned ka = K_stage + (kk / 4) * (BC * 128) + (kk % 4) * 32;
        WGMMA_S(S, descriptor(qa, 16, 1024), descriptor(ka, 16, 1024), kk > 0);
    }
}
// O_i += P V_j: Bc / 16 wgmma, each 64 x d x 16. V_j is [key][d] in shared memory: N-major for this product
// (imm-trans-b = 1); 8-key groups are 1024 bytes apart (SBO), the 64-column halves of d BC * 128 bytes (LBO).
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const unsigned (&P)[BC / 16][4], unsigned V_stage) {
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) WGMMA_O(o, P[kk], descriptor(V_stage + kk * (16 * 128), BC * 128, 1024), 1);
}
// Keys outside a row's [lo, hi) get -inf (only on tiles that are not FULL for every row of the block).
__device__ __forceinline__ void mask_tile(float (&S)[BC / 2], int j0, int i_row, int offset, int left, int right,
                                          int Nk, int t4) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = i_row + 8 * r;
        const int lo = row_lo(i, offset, left), hi = row_hi(i, offset, right, Nk);
#pragma unroll
        for (int n = 0; n < BC / 8; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int j = j0 + 8 * n + 2 * (t4) + c;
                if (!(j >= lo && j < hi)) S[4 * n + 2 * r + c] = -INFINITY;
            }
    }
}
// m_new = max(m_i, rowmax(S) * scale_log2); P = exp2(S * scale_log2 - m_new) packed to 16 bits as the A operand
// of P V (k-block kk is S's 8-column blocks 2 kk and 2 kk + 1: hopper_layout.p_fragment_from_s);
// l_i = alpha l_i + rowsum(P), alpha = exp2(m_i - m_new) (O_i is rescaled by the caller). A row's Bc values
// sit in the 4 threads t4 = 0..3 of its lane group.
__device__ __forceinline__ void softmax_tile(float (&S)[BC / 2], unsigned (&P)[BC / 16][4], float (&m)[2],
                                             float (&l)[2], float (&alpha)[2], float scale_log2) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) mx = fmaxf(mx, fmaxf(S[4 * n + 2 * r], S[4 * n + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[r], mx * scale_log2);  // scale > 0, so the max commutes with it
        const float m_use = (m_new == -INFINITY) ? 0.f : m_new;
        alpha[r] = fast_exp2(m[r] - m_use);
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
            S[4 * n + 2 * r] = fast_exp2(fmaf(S[4 * n + 2 * r], scale_log2, -m_use));
            S[4 * n + 2 * r + 1] = fast_exp2(fmaf(S[4 * n + 2 * r + 1], scale_log2, -m_use));
            sum += S[4 * n + 2 * r] + S[4 * n + 2 * r + 1];
        }
        l[r] = alpha[r] * l[r] + sum;
        m[r] = m_new;
    }
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk)
#pragma unroll
        for (int q = 0; q < 4; ++q) P[kk][q] = pack2(S[8 * kk + 2 * q], S[8 * kk + 2 * q + 1]);
}
__device__ __forceinline__ void rescale(float (&o)[D / 2], const float (&alpha)[2]) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[4 * n] *= alpha[0], o[4 * n + 1] *= alpha[0], o[4 * n + 2] *= alpha[1], o[4 * n + 3] *= alpha[1];
}

// The three tensor maps (flashkit/gpu/tma.py writes them to device memory before the launch): Q, K, V viewed as
// (d columns, N rows, B*H heads) of 16-bit elements, box 64 x (BR or BC) x 1, 128-byte swizzle, rows past N
// read as zeros.
struct __align__(64) TensorMaps { unsigned long long q[16], k[16], v[16]; };

// Shared memory (bytes from a 1024-aligned base): Q_s [NHALF][BR][64], K_s [STAGES][NHALF][BC][64],
// V_s [STAGES][NHALF][BC][64], each [rows][64] block 128-byte swizzled (hopper_layout.swizzle128), then the
// mbarriers (128 bytes), then the input check's SCAN_STAGES buffers (input_check.cuh). Grid: (Tr, Hq, B), block:
// NT threads. The last six arguments are the fused NaN/Inf check of Q, K, V (flashkit.finite.Fused): the blocks
// of the first check_columns values of blockIdx.x are numbered column-first, and those numbered below check_shares
// each test one share of them; check_shares = 0 turns it off. Causal grids check in their heavy half only
// (blockIdx.x < Tr / 2, the longest key ranges: see i0), where the copies hide behind the most compute.
extern "C" __global__ void __launch_bounds__(NT, 1) flash_fwd(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
    T* __restrict__ O, float* __restrict__ lse,
    int Hq, int Hkv, int Nq, int Nk, float scale_log2, int left, int right, const TensorMaps* __restrict__ maps,
    int check_columns, int check_shares, unsigned long long check_flags, int check_done_word, long long check_serial,
    unsigned long long* check_count) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const unsigned base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const unsigned Q_s = base;
    const unsigned K_s = Q_s + Q_BYTES;
    const unsigned V_s = K_s + STAGES * KV_BYTES;
    const unsigned bars = V_s + STAGES * KV_BYTES;
    const unsigned bar_q = bars;                          // Q_i landed
    #define FULL_K(s) (bars + 8 * (1 + (s)))               // K_j landed in stage s
    #define FULL_V(s) (bars + 8 * (1 + STAGES + (s)))      // V_j landed in stage s
    #define EMPTY_K(s) (bars + 8 * (1 + 2 * STAGES + (s))) // every consumer thread is done with K in stage s
    #define EMPTY_V(s) (bars + 8 * (1 + 3 * STAGES + (s))) // ... with V in stage s
    const unsigned check_bars = bars + 8 * (1 + 4 * STAGES);  // SCAN_STAGES: a chunk of the input check landed
    const unsigned check_buf = bars + 128;
    static_assert(8 * (1 + 4 * STAGES + SCAN_STAGES) <= 128, "the mbarriers must fit in front of the check's buffers");

    const int tid = threadIdx.x;
    const int wg = tid / 128;  // warpgroup
    const int i0 = (gridDim.x - 1 - blockIdx.x) * BR, hq = blockIdx.y, b = blockIdx.z;  // heavy tiles first
    const int hkv = hq / (Hq / Hkv);
    const int offset = Nk - Nq;
    const int i_last = min(i0 + BR, Nq) - 1;
    const int kv_begin = row_lo(i0, offset, left), kv_end = row_hi(i_last, offset, right, Nk);
    const int full_lo = row_lo(i_last, offset, left), full_hi = row_hi(i0, offset, right, Nk);
    const int j_first = (kv_begin / BC) * BC;
    const int n_tiles = kv_end > j_first ? (kv_end - j_first + BC - 1) / BC : 0;
    const int q_head = b * Hq + hq, kv_head = b * Hkv + hkv;

    if (tid == 0) {
        mbar_init(bar_q, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(FULL_K(s), 1);
            mbar_init(FULL_V(s), 1);
            mbar_init(EMPTY_K(s), 128 * NC);
            mbar_init(EMPTY_V(s), 128 * NC);
        }
        for (int s = 0; s < SCAN_STAGES; ++s) mbar_init(check_bars + 8 * s, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // visible to the copy engine
    }
    __syncthreads();

    // Ask the copy engine for tile t of K and V (one thread). Stage t % STAGES is reused once every consumer
    // thread has arrived on its EMPTY barriers for tile t - STAGES (K and V separately: K_j is free as soon as
    // S_j is computed).
    auto issue_tile = [&](int t) {
        const int s = t % STAGES, j0 = j_first + t * BC;
        if (t >= STAGES) mbar_wait(EMPTY_K(s), ((t / STAGES) - 1) & 1);
        mbar_expect_tx(FULL_K(s), KV_BYTES);
        for (int h = 0; h < NHALF; ++h) tma_load(K_s + s * KV_BYTES + h * (BC * 128), maps->k, 64 * h, j0, kv_head, FULL_K(s));
        if (t >= STAGES) mbar_wait(EMPTY_V(s), ((t / STAGES) - 1) & 1);
        mbar_expect_tx(FULL_V(s), KV_BYTES);
        for (int h = 0; h < NHALF; ++h) tma_load(V_s + s * KV_BYTES + h * (BC * 128), maps->v, 64 * h, j0, kv_head, FULL_V(s));
    };
    auto issue_q = [&]() {
        // The maps were written by a host copy (generic proxy); the copy engine reads them through the tensormap proxy.
        asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(maps->q) : "memory");
        asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(maps->k) : "memory");
        asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(maps->v) : "memory");
        mbar_expect_tx(bar_q, Q_BYTES);
        for (int h = 0; h < NHALF; ++h) tma_load(Q_s + h * (BR * 128), maps->q, 64 * h, i0, q_head, bar_q);
    };

#if WARP_SPECIALIZE
    if (wg == 0) {  // producer warpgroup: one thread issues every copy; warps 1-3 check the inputs, in some blocks
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(REG_PRODUCER));
        if (tid == 0 && n_tiles > 0) {
            issue_q();
            for (int t = 0; t < n_tiles; ++t) issue_tile(t);
        }
        const int block = blockIdx.x + check_columns * (blockIdx.y + gridDim.y * blockIdx.z);
        if (tid >= 32 && (int)blockIdx.x < check_columns && block < check_shares) {
            const long long q16 = (long long)gridDim.z * Hq * Nq * D / 8, kv16 = (long long)gridDim.z * Hkv * Nk * D / 8;
            check_share(Q, K, V, q16, kv16, block, check_shares, check_buf, check_bars, check_flags, check_done_word,
                        check_serial, check_count);
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(REG_CONSUMER));
    const int cw = wg - 1;  // consumer warpgroup: query rows 64 cw .. 64 cw + 63 of the block
#else
    const int cw = wg;
    if (tid == 0 && n_tiles > 0) {
        issue_q();
        for (int t = 0; t < STAGES && t < n_tiles; ++t) issue_tile(t);
    }
#endif
    const int warp = (tid / 32) % 4, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    const int r0 = 64 * cw + 16 * warp + g;  // this thread's rows in the block: r0 and r0 + 8

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // m_i in log2 units; l is this thread's partial sum
    float o[D / 2];
#pragma unroll
    for (int k = 0; k < D / 2; ++k) o[k] = 0.f;
    float S[BC / 2], alpha[2];
    unsigned P[BC / 16][4];
    const int i_row = i0 + r0;  // this thread's first query row (the second is i_row + 8)

    // Ping-pong (FA3): the two consumer warpgroups take turns to issue their products, so that one's softmax
    // runs while the other's products occupy the tensor cores. Named barrier 1 + c opens warpgroup c's turn:
    // warpgroup c waits on it (128 threads) and the other warpgroup arrives on it (128) when its turn ends.
    // Warpgroup 1 opens warpgroup 0's first turn and skips its own last hand-over, so every barrier completes.
#if OVERLAP
    auto take_turn = [&]() {
        if (PINGPONG) asm volatile("bar.sync %0, 256;" ::"r"(1 + cw) : "memory");
    };
    auto hand_over = [&](bool last) {
        if (PINGPONG && !(cw == 1 && last)) asm volatile("bar.arrive %0, 256;" ::"r"(1 + (cw ^ 1)) : "memory");
    };
    if (PINGPONG && cw == 1 && n_tiles > 0) asm volatile("bar.arrive 1, 256;" ::: "memory");
#endif

    if (n_tiles > 0) mbar_wait(bar_q, 0);
#if OVERLAP
    // FA3's intra-warpgroup overlap: while the tensor cores compute S_j = Q K_j^T and O += P_{j-1} V_{j-1}
    // (two wgmma groups in flight), this warpgroup waits only for S_j, runs its softmax, then waits for P V and
    // rescales O. Tile 0's S and softmax come first; the last tile's P V after the loop.
    if (n_tiles > 0) {
        mbar_wait(FULL_K(0), 0);
        take_turn();
        wgmma_fence();
        issue_s(S, Q_s, K_s, cw);
        wgmma_commit();
        hand_over(n_tiles == 1);
        wgmma_wait<0>();
        fence_regs(S);
        mbar_arrive(EMPTY_K(0));
        if (!((j_first >= full_lo) && (j_first + BC <= full_hi))) mask_tile(S, j_first, i_row, offset, left, right, Nk, t4);
        softmax_tile(S, P, m, l, alpha, scale_log2);  // O is still 0: no rescale needed
    }
    for (int it = 1; it < n_tiles; ++it) {
        const int s = it % STAGES, sp = (it - 1) % STAGES, j0 = j_first + it * BC;
        mbar_wait(FULL_K(s), (it / STAGES) & 1);
        mbar_wait(FULL_V(sp), ((it - 1) / STAGES) & 1);
        take_turn();
        fence_regs(o);
        wgmma_fence();
        issue_s(S, Q_s, K_s + s * KV_BYTES, cw);
        wgmma_commit();
        issue_pv(o, P, V_s + sp * KV_BYTES);
        wgmma_commit();
        hand_over(it == n_tiles - 1);
        wgmma_wait<1>();  // S_j is complete; P_{j-1} V_{j-1} may still run
        fence_regs(S);
        mbar_arrive(EMPTY_K(s));
        if (!((j0 >= full_lo) && (j0 + BC <= full_hi))) mask_tile(S, j0, i_row, offset, left, right, Nk, t4);
        unsigned P_next[BC / 16][4];
        softmax_tile(S, P_next, m, l, alpha, scale_log2);
        wgmma_wait<0>();
        fence_regs(o);
        mbar_arrive(EMPTY_V(sp));  // V_{j-1} is no longer read
        rescale(o, alpha);
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk)
#pragma unroll
            for (int q = 0; q < 4; ++q) P[kk][q] = P_next[kk][q];
    }
    if (n_tiles > 0) {
        const int sl = (n_tiles - 1) % STAGES;
        mbar_wait(FULL_V(sl), ((n_tiles - 1) / STAGES) & 1);
        fence_regs(o);
        wgmma_fence();
        issue_pv(o, P, V_s + sl * KV_BYTES);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(o);
        mbar_arrive(EMPTY_V(sl));
    }
#else
    for (int it = 0; it < n_tiles; ++it) {
        const int s = it % STAGES, j0 = j_first + it * BC;
        const unsigned parity = (it / STAGES) & 1;
        mbar_wait(FULL_K(s), parity);
        wgmma_fence();
        issue_s(S, Q_s, K_s + s * KV_BYTES, cw);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(S);
        mbar_arrive(EMPTY_K(s));  // K_j is no longer read
        // the per-element mask only where the tile is not FULL for every row of Q_i
        if (!((j0 >= full_lo) && (j0 + BC <= full_hi))) mask_tile(S, j0, i_row, offset, left, right, Nk, t4);
        softmax_tile(S, P, m, l, alpha, scale_log2);
        rescale(o, alpha);
        mbar_wait(FULL_V(s), parity);
        fence_regs(o);
        wgmma_fence();
        issue_pv(o, P, V_s + s * KV_BYTES);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(o);
        mbar_arrive(EMPTY_V(s));  // V_j is no longer read
#if !WARP_SPECIALIZE
        if (tid == 0 && it + STAGES < n_tiles) issue_tile(it + STAGES);
#endif
    }
#endif

    // l_i = sum over the row's 4 threads; O_i = O_i / l_i; lse_i = m_i + log(l_i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float lr = l[r];
        lr += __shfl_xor_sync(0xffffffffu, lr, 1);
        lr += __shfl_xor_sync(0xffffffffu, lr, 2);
        const int i = i0 + r0 + 8 * r;
        if (i < Nq) {
            const float inv_l = (lr > 0.f) ? 1.f / lr : 0.f;
            T* Oi = O + ((long long)q_head * Nq + i) * D;
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                *reinterpret_cast<unsigned*>(Oi + 8 * n + 2 * t4) = pack2(o[4 * n + 2 * r] * inv_l, o[4 * n + 2 * r + 1] * inv_l);
            if (t4 == 0)
                lse[(long long)q_head * Nq + i] = (lr > 0.f) ? (m[r] + log2f(lr)) * 0.6931471805599453f : -INFINITY;
        }
    }
}
