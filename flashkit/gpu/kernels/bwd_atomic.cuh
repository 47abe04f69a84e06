// What the backward rungs with dQ by fp32 atomics share (b2_mma.cu, b4_wgmma.cu): the preprocessing kernel
// (D = rowsum(dO * O), the dQ accumulator and the lse check's row sums zeroed), the conversion of the fp32 dQ
// accumulator to the input dtype, and one level of the warp
// reduce-scatter the lse check's row sums go through. The including file defines D (the head size) first;
// T and pack2 / unpack2 come from elements.cuh.

#pragma once

#include "elements.cuh"


// One level of a warp reduce-scatter: v[0 .. 2 HALF) summed with the partner lane (lane ^ mask) into
// v[0 .. HALF); the lane whose `mask` bit is set keeps (and gets the sums of) the upper half.
template <int HALF>
__device__ __forceinline__ void reduce_half(float* v, int lane, int mask) {
    const bool upper = lane & mask;
#pragma unroll
    for (int k = 0; k < HALF; ++k) {
        const float send = upper ? v[k] : v[k + HALF], keep = upper ? v[k + HALF] : v[k];
        v[k] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
    }
}

// D = rowsum(dO * O) in fp32 for every query row (B * Hq * Nq rows of d), and the fp32 dQ accumulator and
// the row sums of P (Psum, the lse check's) zeroed. D / 8 threads per row, each 8 elements (16 bytes) of
// both; the row's threads are adjacent lanes.
extern "C" __global__ void __launch_bounds__(256) bwd_preprocess(
    const T* __restrict__ O, const T* __restrict__ dO, float* __restrict__ Dvec, float* __restrict__ dQacc,
    float* __restrict__ Psum, long long rows) {
    constexpr int TPR = D / 8;  // threads per row: 4, 8 or 16
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / TPR;
    const int c = (threadIdx.x % TPR) * 8;
    float s = 0.f;
    if (row < rows) {
        const uint4 o = *reinterpret_cast<const uint4*>(O + row * D + c);
        const uint4 g = *reinterpret_cast<const uint4*>(dO + row * D + c);
        const unsigned ov[4] = {o.x, o.y, o.z, o.w}, gv[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 a = unpack2(ov[e]), bb = unpack2(gv[e]);
            s += a.x * bb.x + a.y * bb.y;
        }
        if (dQacc != nullptr) {
            float4* z = reinterpret_cast<float4*>(dQacc + row * D + c);
            z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
            z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (row < rows && threadIdx.x % TPR == 0) Dvec[row] = s, Psum[row] = 0.f;
}

// dQ = scale * dQacc in the input dtype, 8 elements a thread (n, the element count, is a multiple of 8).
extern "C" __global__ void __launch_bounds__(256) bwd_dq_convert(
    const float* __restrict__ dQacc, T* __restrict__ dQ, long long n, float scale) {
    const long long k = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (k >= n) return;
    const float4 a = *reinterpret_cast<const float4*>(dQacc + k);
    const float4 c = *reinterpret_cast<const float4*>(dQacc + k + 4);
    uint4 out;
    out.x = pack2(a.x * scale, a.y * scale);
    out.y = pack2(a.z * scale, a.w * scale);
    out.z = pack2(c.x * scale, c.y * scale);
    out.w = pack2(c.z * scale, c.w * scale);
    *reinterpret_cast<uint4*>(dQ + k) = out;
}

