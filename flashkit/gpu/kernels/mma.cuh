// Inline-PTX helpers of the tensor-core rungs (forward 4-6, backward b2-b3): the 16-bit element type T,
// mma.sync m16n8k16, ldmatrix, cp.async. Written once here; the including file defines D (the head size)
// and LDS (the shared row pitch in elements) first, and NT (threads per block) when it has a single one.
// The element type T comes from elements.cuh (-DUSE_BF16 selects bfloat16, else float16).

#pragma once

#include "common.cuh"
#include "elements.cuh"


// C (16x8, fp32) += A (16x16) * B (16x8). Lane = 4 g + t. A: a[0] = (row g, k 2t..2t+1), a[1] = (g + 8, 2t),
// a[2] = (g, 8 + 2t), a[3] = (g + 8, 8 + 2t); B: b0 = (k 2t..2t+1, col g), b1 = (k 8 + 2t, col g);
// C: c[0..1] = (row g, cols 2t, 2t+1), c[2..3] = (row g + 8, cols 2t, 2t+1).
__device__ __forceinline__ void mma16816(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Four 8x8 16-bit matrices; lanes 8m..8m+7 give the row addresses of matrix m, register m receives it
// in fragment layout (lane 4g + t holds row g, columns 2t, 2t+1; with .trans: rows 2t, 2t+1 of column g).
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const T* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const T* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
// The four operand loads of the backward kernels, for a 16 x 16 slice of a row-major [rows][cols] shared tile X:
//   A_rows:  A fragment of X[r0 .. r0+15][c0 .. c0+15]            (A = X: m = row, k = column)
//   A_cols:  A fragment of X[r0 .. r0+15][c0 .. c0+15]^T          (A = X^T: m = column, k = row)
//   B_rows:  two B fragments, n = rows r0 .. r0+7 and r0+8 .. r0+15, k = columns c0 .. c0+15  (B = X^T)
//   B_cols:  two B fragments, k = rows r0 .. r0+15, n = columns c0 .. c0+7 and c0+8 .. c0+15  (B = X)
// (for B, r[0], r[1] feed the first n-tile and r[2], r[3] the second).
template <int LD>
__device__ __forceinline__ void A_rows(unsigned r[4], const T (*X)[LD], int r0, int c0, int lane) {
    ldmatrix_x4(r, &X[r0 + (lane & 15)][c0 + 8 * (lane >> 4)]);
}
template <int LD>
__device__ __forceinline__ void A_cols(unsigned r[4], const T (*X)[LD], int r0, int c0, int lane) {
    ldmatrix_x4_trans(r, &X[r0 + (lane & 7) + 8 * (lane >> 4)][c0 + 8 * ((lane >> 3) & 1)]);
}
template <int LD>
__device__ __forceinline__ void B_rows(unsigned r[4], const T (*X)[LD], int r0, int c0, int lane) {
    ldmatrix_x4(r, &X[r0 + (lane & 7) + 8 * (lane >> 4)][c0 + 8 * ((lane >> 3) & 1)]);
}
template <int LD>
__device__ __forceinline__ void B_cols(unsigned r[4], const T (*X)[LD], int r0, int c0, int lane) {
    ldmatrix_x4_trans(r, &X[r0 + (lane & 7) + 8 * ((lane >> 3) & 1)][c0 + 8 * (lane >> 4)]);
}

// 16 bytes global -> shared without passing through registers; src_bytes = 0 writes zeros (rows past N).
__device__ __forceinline__ void cp_async16(T* dst, const T* src, bool valid) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// rows [row0, row0 + nrows) of a (N, D) matrix into a [nrows][LDS] shared tile by cp.async (rows >= N: 0),
// by NTHREADS threads (default NT, the kernel's block size; a file with several kernels names it).
// A row past N still gets a valid source address (row N - 1) although no byte is read from it.
#ifdef NT
template <int NTHREADS = NT>
#else
template <int NTHREADS>
#endif
__device__ __forceinline__ void async_tile(T (*dst)[LDS], const T* __restrict__ src, int row0, int nrows, int N) {
    for (int f = threadIdx.x; f < nrows * (D / 8); f += NTHREADS) {
        const int r = f / (D / 8), c = (f % (D / 8)) * 8;
        const bool valid = row0 + r < N;
        cp_async16(&dst[r][c], src + (long long)(valid ? row0 + r : N - 1) * D + c, valid);
    }
}
