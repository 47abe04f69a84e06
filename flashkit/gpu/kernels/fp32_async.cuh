// cp.async for the fp32 rungs (forward 3 and 8): 16 bytes global -> shared without passing through
// registers, so a tile's load runs while the threads compute on another buffer. (The 16-bit rungs' versions, with a typed zero-fill, are in mma.cuh.)

#pragma once

__device__ __forceinline__ void cp_async16(float* dst, const float* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Wait until at most N of this thread's committed groups are still in flight (others' copies need a barrier).
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// rows [row0, row0 + nrows) of a (N, DIM) fp32 matrix into a [nrows][LD] shared tile by NTHREADS threads: rows < N by
// cp.async, rows >= N written 0 directly.
template <int DIM, int LD, int NTHREADS>
__device__ __forceinline__ void load_rows_async(float (*dst)[LD], const float* __restrict__ src, int row0, int nrows,
                                                int N) {
    for (int f = threadIdx.x; f < nrows * (DIM / 4); f += NTHREADS) {
        const int r = f / (DIM / 4), c = (f % (DIM / 4)) * 4;
        if (row0 + r < N) cp_async16(&dst[r][c], src + (long long)(row0 + r) * DIM + c);
        else *reinterpret_cast<float4*>(&dst[r][c]) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
}
