// Helpers every CUDA rung shares (forward kernels 2-8, backward kernels b1-b4): written once here.
// The loader passes this folder to NVRTC as an include path (-I); flashkit/gpu/flash.py.

#pragma once

#ifndef INFINITY  // NVRTC has no <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif

// 2^x in one instruction (ex2.approx: ~2 ulp, flushes denormals; ex2.approx(-inf) = 0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The keys query row i sees: [row_lo, row_hi), a (left, right) window around the bottom-right diagonal
// (offset = Nk - Nq; -1 = unbounded side; causal is (-1, 0)), as flashkit.masks.row_bounds.
__device__ __forceinline__ int row_lo(int i, int offset, int left) { return left < 0 ? 0 : max(0, i + offset - left); }
__device__ __forceinline__ int row_hi(int i, int offset, int right, int Nk) {
    return right < 0 ? Nk : min(Nk, i + offset + right + 1);
}

// dst[0..3] += v as one vector reduction in L2 (sm_90: red.global.add.v4.f32; dst 16-byte aligned):
// the fp32 dQ atomics of backward rungs b1, b2 and b4.
__device__ __forceinline__ void red_add4(float* dst, float4 v) {
    asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};"
                 ::"l"(dst), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
}
