// The 16-bit element type T of the tensor-core rungs (forward 4-7, backward b2-b3) and its packing:
// -DUSE_BF16 selects bfloat16, else float16. MMA_TYPE is its name in PTX's mma / wgmma instructions.

#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifdef USE_BF16
typedef __nv_bfloat16 T;
#define MMA_TYPE "bf16"
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ float2 unpack2(unsigned u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
}
#else
typedef __half T;
#define MMA_TYPE "f16"
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ float2 unpack2(unsigned u) { return __half22float2(*reinterpret_cast<__half2*>(&u)); }
#endif
