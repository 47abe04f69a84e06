// The backward's check of its lse input, computed inside the kernels (flashkit/gpu/backward.py).
//
// A backward recomputes P = exp(S - lse_i) instead of storing it; if lse came from another call, from other
// q and k, or is in log2 units, P does not sum to 1 over a row's keys and the gradients would be
// plausible-looking garbage. Every kernel already computes each P, so the row sums are nearly free: the
// dQ kernel of b3 (which visits a row's whole key range) sums them in registers; b1 and b2 (which visit a
// row's keys spread over many blocks) add each block's partial sum into Psum with one atomic per row and
// step (on 1 query tile in lse_every, about 8 tiles a head: the shuffles cost b2 9% on every tile), and
// `bwd_lse_check` reads Psum at the end. A bad row is reported in two words of page-locked host
// memory (flashkit.finite.HostFlags): report[1] = (row << 32) | bits of the sum shown, then report[0] =
// the call's serial number. report = 0: compute, do not report.

#pragma once

#include "common.cuh"

// Whether row i (of Nq, against Nk keys, window left/right) fails the check: a finite lse whose P sums to
// more than tol away from 1, or lse = -inf (a row that saw no key) on a row that does see keys. `shown` is
// the sum, or minus the number of keys the row sees for the second case.
// With score_mod / mask_mod / block masks (flash_mods_backward.py defines FK_LSE_COUNTS 1) the window cannot say
// which rows see keys: there the main kernel adds, for a row with lse = -inf, the number of keys it sees after
// the mods (each such P is written as -0, and counted by its sign), so a row that sees keys still fails.
#ifndef FK_LSE_COUNTS
#define FK_LSE_COUNTS 0
#endif
__device__ __forceinline__ bool lse_row_bad(float psum, float lse, int i, int Nq, int Nk, int left, int right,
                                            float tol, float& shown) {
#if FK_LSE_COUNTS
    if (lse == -INFINITY) {
        shown = -psum;
        return psum > 0.f;
    }
#endif
    if (lse == -INFINITY) {
        const int seen = row_hi(i, Nk - Nq, right, Nk) - row_lo(i, Nk - Nq, left);
        shown = -(float)max(seen, 0);
        return seen > 0;
    }
    shown = psum;
    return !(fabsf(psum - 1.f) <= tol);
}

// Report flat row r (b * Hq * Nq + h * Nq + i) with the value shown; called by at most one lane of a warp.
__device__ __forceinline__ void report_lse(unsigned long long report, long long serial, long long r, float shown) {
    if (report == 0) return;
    volatile unsigned long long* w = reinterpret_cast<volatile unsigned long long*>(report);
    const unsigned long long row = r < 0xffffffffll ? (unsigned long long)r : 0xffffffffull;
    w[1] = (row << 32) | __float_as_uint(shown);
    __threadfence_system();  // the row before the serial: a host that sees the serial sees its row
    w[0] = (unsigned long long)serial;
}

// One thread a row: the check of Psum (the row sums of P added up by the main kernel) against lse, on the
// rows the main kernel summed: those of every `every`-th tile of `tile_rows` query rows.
extern "C" __global__ void __launch_bounds__(256) bwd_lse_check(
    const float* __restrict__ Psum, const float* __restrict__ lse, long long rows, int Nq, int Nk, int left,
    int right, float tol, int tile_rows, int every, unsigned long long report, long long serial) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int i = (int)(r % Nq);
    float shown = 0.f;
    const bool bad = r < rows && (i / tile_rows) % every == 0 &&
                     lse_row_bad(Psum[r], lse[r], i, Nq, Nk, left, right, tol, shown);
    const unsigned ballot = __ballot_sync(0xffffffffu, bad);
    if (ballot != 0 && (threadIdx.x & 31) == __ffs(ballot) - 1) report_lse(report, serial, r, shown);
}
