"""Rung 6 with FlexAttention's hooks: score_mod, mask_mod, block masks and bool masks on the tensor cores.

The user's functions become CUDA device functions (flashkit/gpu/modlang.py); this module puts them in
front of rung 6's source, whose hooks (FK_* macros in kernels/6_mma_2tile.cu, identity by default)
then call them, and launches the kernel with the tiles to visit:

    tiles       a list per query block row of the key tiles to compute: the window's tiles less those
                the block mask (or the bool mask) leaves empty, each marked FULL (no per-element test,
                not even the mask_mod) or PARTIAL (the window test, the mask_mod and/or the bit mask);
                packed one row after the other (one int32 per visited tile), so a block walks its own
                list and never tests a tile it skips
    order       the blocks launched costliest row first (a row's tiles, a PARTIAL one counted several
                times) where that differs from rung 6's own order: the rows that straddle two
                documents are all PARTIAL, and started last they kept the GPU waiting on them
    score_mod   applied in registers to every visible score of every visited tile, in natural units
                (q . k * scale), with q_idx / kv_idx from the mma fragment layout; in a FULL tile
                without the visibility select
    mask_mod    its PARTIAL tiles turned into bits once (fk_mod_pack, kept with the lists) when they fit
                in the size of Q; else evaluated by the kernel on every score of a PARTIAL tile
    mask=       a bool array (Bm, Hm, Nq, Nk) on the GPU: its tiles classified by one pass over it on
                the GPU (16-byte loads), only the PARTIAL ones packed into bits (Br x Bc / 8 bytes a
                tile), the lists made on the GPU; nothing of size Nq x Nk is made, the host reads one
                number (how many PARTIAL tiles) and one flag (whether to reorder)

Compiled once per (score_mod, mask_mod, bit mask or not, block order or not, d, dtype, tile) and cached;
the captured arrays are kernel arguments, so new contents of a captured array need no new compile. A
mod's run-time error (an index out of bounds, a division by zero, a NaN or +inf score) is recorded by
the kernel in an error word read after the call (one 32-byte copy, a host sync) and raised with its
position. Where no error can happen (modlang.DeviceCode.cannot_fail: softcap, identity, mask_mods
without lookups or divisions, or none in the kernel at all) the word is not read: that sync kept the GPU
idle while the host prepared the next call. Measured (tools/gpu_public_trace.py --backward-mods, H200,
fp16, B=4, H=32, N=4096, d=64, softcap(50), 20 calls back to back; benchmarks/results/
gpu-public-trace-mods-h200.txt): GPU time a call 2.496 ms public, 2.470 ms with check_finite=False,
against 2.451 ms for the kernel alone (1.018x, 1.008x); with the sync 3.150 and 2.920 against 2.461
(1.28x, 1.19x) in the run before. A call whose kernel is shorter than its host work (a document block
mask, 0.04 ms of kernel) stays bound by the host: 0.30 ms a call before and after.

Measured (benchmarks/results/gpu-mods-h200.json: H200, fp16, commit 9695f03, one run): 102 of 102 checks
against the float64 reference, compute-sanitizer memcheck clean on a small case of each path.
  - Time with a score_mod / without (kernel, N = 4096): identity 1.07 / 1.02x at d = 64 (causal or not),
    1.01 / 0.97x at d = 128; softcap(50) 1.25 / 1.19x at d = 64, 1.07 / 1.05x at d = 128 (FlexAttention's
    softcap: 2.08x its own). tanh is tanh.approx.f32 (max error 7.7e-6 absolute, 1.1e-5 relative, measured
    on the GPU); before it, 1 - 2 / (exp2 + 1) gave 1.19-1.45x. At d = 64 softcap stays over the 1.10 goal:
    ncu (d = 64) sees the special-function (XU) pipe 49% busy with softcap against 32% without, issue slots
    50%, tensor pipe 35%: no pipe is full, so what is left is most likely the latency of each tile's
    chain (mma, scale, tanh, max, exp2, mma) with 2 warps per scheduler to hide it (not measured further).
  - The softcap with its cap folded into the scales (softcap_of; benchmarks/results/gpu-mods-fold-h200.json,
    H200, fp16, commit 81abe38, B = 4, N = 4096, kernels, the generic hook timed beside it in the same run):
    d = 64 1.164x (causal 1.119x) against the generic hook's 1.249x (1.170x); d = 128 1.094x (1.067x) against
    1.085x (1.086x): 4-7% faster at d = 64, level at d = 128. The 1.10 goal: met at d = 128, not at d = 64.
    102 of 102 checks in that run, compute-sanitizer memcheck 0 errors on the sanitize case (softcap with a
    block mask and causal among them).
  - A document mask (8 documents in N = 65536, H = 16, d = 64): block mask 7.88 ms (public call 8.80),
    0.128 of the 61.6 ms without a mask for 0.125 of the tiles; the mask_mod on every tile 385 ms (49x);
    the same mask as a dense bool array 9.90 ms (classified on the GPU in the call, 1.66 ms, 4 MiB of
    lists for a 4 GiB mask; before: 28.7 ms); torch FlexAttention 8.37 ms.
  - Uneven documents (edges inside tiles: 2712 PARTIAL tiles): 9.68 ms for 0.143 of the tiles (0.155 of
    the time); without the block order 11.37 ms, without the bits 10.26, without both 12.83; dense bool
    12.72 ms; the mask_mod on every tile 388 ms (40x).
"""
from __future__ import annotations

import contextlib
import functools
import time
from collections import OrderedDict
from typing import Optional

import numpy as np

from flashkit import blockmask, masks, mods
from flashkit.gpu import flash, modlang
from flashkit.masks import PARTIAL, SKIP

_KEEP = 16


def _remember(cache: OrderedDict, key, value):
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _KEEP:
        cache.popitem(last=False)
    return value


# ---------------------------------------------------------------------------------------------
# The CUDA text
# ---------------------------------------------------------------------------------------------

# Whether score (i, j) of a visited tile stays (the FK_KEEP hook of the forward rung 6 and of the backward rung 2,
# flashkit/gpu/flash_mods_backward.py): CUDA text shared by both generated sources.
KEEP_FUNCTION = r"""__device__ __forceinline__ bool fk_keep(int entry, int bits_at, const unsigned* __restrict__ bits, int r, int c,
                                        int b, int h, int i, int j, int Nq, bool in, int* fk_err FKM_PARAMS) {
    if (!(entry & 1)) return in;  // the same for the whole tile: a uniform branch
    bool keep = in && i < Nq;
#if FK_HAS_BITS
    if (bits_at >= 0) keep = keep && ((bits[bits_at + r * (BC / 32) + (c >> 5)] >> (c & 31)) & 1u);
#endif
#if FK_HAS_MASK_MOD
    keep = keep & fkm_mask_mod(b, h, i, j, keep ? fk_err : nullptr FKM_ARGS);
#endif
    return keep;
}
"""

def softcap_of(score: Optional[modlang.DeviceCode]) -> float:
    """The cap of the library's softcap (mods.softcap marks its function), else 0. Rung 6 runs it with the cap
    folded into the two scales it applies anyway: tanh(S * (scale / cap)) in place of the score, and cap * log2(e)
    as the softmax's scale_log2, so cap * tanh(S scale / cap) costs one multiply and one tanh.approx a score
    instead of a multiply, a division (fk_div: the cap is an argument of mods.soft_cap), a tanh and a multiply."""
    if score is None or not FOLD_SOFTCAP:
        return 0.0
    return mods.softcap_cap(score.fn)


def prelude(score: Optional[modlang.DeviceCode], mask: Optional[modlang.DeviceCode], bits: bool,
            ordered: bool = False) -> str:
    """The definitions put in front of rung 6's source: the runtime, the mods, and the FK_* hooks."""
    parts = ["// ==== generated by flashkit.gpu.flash_mods: score_mod / mask_mod / block-mask hooks ====",
             f"#define FK_HAS_BITS {int(bits)}", f"#define FK_HAS_MASK_MOD {int(mask is not None)}",
             f"#define FK_HAS_ORDER {int(ordered)}",
             modlang.RUNTIME]
    for code in (score, mask):
        if code is not None:
            parts.append(code.source)
    sp, sa = (score.params, score.args) if score is not None else ("", "")
    mp, ma = (mask.params, mask.args) if mask is not None else ("", "")
    parts.append(f"#define FKS_PARAMS {sp}\n#define FKS_ARGS {sa}\n#define FKM_PARAMS {mp}\n#define FKM_ARGS {ma}")
    parts.append(r"""
// The tile lists: row = (b, h, query block) of the lists' (Bm, Hm, Tr) planes; its fk_count[row] entries
// (entry = 2 j + partial) start at fk_index[fk_start[row]]: packed one after the other (a block mask:
// memory for the visited tiles only) or at row * Tc (a bool mask's lists, built on the GPU).
#define FK_PARAMS , int* __restrict__ fk_err, const int* __restrict__ fk_start, const int* __restrict__ fk_count, \
    const int* __restrict__ fk_index, const int* __restrict__ fk_bits_at, const unsigned* __restrict__ fk_bits, \
    const int* __restrict__ fk_order, int fk_Bm, int fk_Hm, float fk_scale FKS_PARAMS FKM_PARAMS
#define FK_ROW ((((fk_Bm > 1 ? b : 0) * fk_Hm + (fk_Hm > 1 ? hq : 0)) * (int)gridDim.x + i0 / BR))
// The blocks in the order of fk_order, a permutation of the (b, hq, tr) = (b Hq + hq) Tr + tr: the rows with
// the most work first (longest-processing-time first), so that a row of many PARTIAL tiles, at the edge of
// two documents, does not start last and leave the GPU waiting on it. Only where that order differs from
// rung 6's own: tr, hq and b then live in registers (ptxas: 24 -> 76 bytes of spills at d = 128).
#if FK_HAS_ORDER
#define FK_BLOCK(tr, hq, b)                                                                                   \
    {                                                                                                         \
        const int fk_o = fk_order[blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)];            \
        (tr) = fk_o % (int)gridDim.x, (hq) = (fk_o / (int)gridDim.x) % (int)gridDim.y;                         \
        (b) = fk_o / ((int)gridDim.x * (int)gridDim.y);                                                       \
    }
#else
#define FK_BLOCK(tr, hq, b) ((tr) = gridDim.x - 1 - blockIdx.x, (hq) = blockIdx.y, (b) = blockIdx.z)
#endif
#define FK_TILES(n) ((void)(n), fk_count[FK_ROW])
#define FK_ENTRY(it) (fk_index[fk_start[FK_ROW] + (it)])
#define FK_J0(it) ((FK_ENTRY(it) >> 1) * BC)
#define FK_FULL(it, full) ((full) && !(FK_ENTRY(it) & 1))
#if FK_HAS_BITS
#define FK_BITS_AT(it) (fk_bits_at[fk_start[FK_ROW] + (it)])
#else
#define FK_BITS_AT(it) (-1)
#endif
#define FK_KEEP(i, j, it, in) \
    fk_keep(FK_ENTRY(it), FK_BITS_AT(it), fk_bits, (i) - i0, (j) - j0, b, hq, i, j, Nq, in, fk_err FKM_ARGS)

// Whether score (i, j) of a visited tile stays: `in` (the window's verdict), and where the tile is PARTIAL
// for them, the bit mask and the mask_mod. Without branches per score (they cost more than the mask): the
// mask_mod runs on every score of the tile, but only a score in the window of a real row may report an
// error (a lookup out of bounds elsewhere reads element 0 and is ignored, as the score is hidden anyway).
""" + KEEP_FUNCTION)
    if score is not None:
        if softcap_of(score):  # the library's softcap: cap folded into the scales (see prepare)
            parts.append("#define FK_MOD(x, scale, b, h, i, j, err) fk_tanh((x) * (scale))")
        else:
            parts.append("#define FK_MOD(x, scale, b, h, i, j, err) fks_score_mod((x) * (scale), b, h, i, j, err FKS_ARGS)")
        parts.append(r"""
// score_mod on every visible score of the tile, in natural units (q . k * scale), in registers: the
// fragment layout of mma.m16n8k16 puts score (g + 8 (e >> 1), 8 n + 2 t + (e & 1)) of m-tile mt in s[mt][n][e].
// Without a branch per score: score_mod runs on every score. In a FULL tile (a uniform branch: most tiles)
// every score is visible, so its result is kept as it is: one FMUL (the scale) and the mod itself, nothing
// else (measured: the select of the masked version cost identity 4-13% at N = 4096). In a masked tile the
// result is kept where the score is visible (not -inf) and only a visible score may report an error.
// Padding rows (i >= Nq) report nothing. A NaN or +inf result is not tested here: it makes the row's sum
// l_i NaN (exp2 of NaN, or of inf - inf), which FK_ROW_DONE finds once per row at the end, and the
// launcher then finds the key on the host (explain_nonfinite).
#define FK_SCORES(s, it, j0, full)                                                        \
    if (full) fk_scores<true>(s, i0 + wr, j0, b, hq, Nq, fk_scale, fk_err FKS_ARGS);     \
    else fk_scores<false>(s, i0 + wr, j0, b, hq, Nq, fk_scale, fk_err FKS_ARGS)
#define FK_ROW_DONE(i, l) \
    if (!((l) < INFINITY)) { const fk_pos fk_p{fk_err, b, hq, i, -1}; fk_fail(fk_p, 1, 0); }
template <bool FULL, int M_, int N_>
__device__ __forceinline__ void fk_scores(float (&s)[M_][N_][4], int r0, int j0, int b, int h, int Nq, float scale,
                                          int* fk_err FKS_PARAMS) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < M_; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = r0 + 16 * mt + g + 8 * (e >> 1);
            int* err_row = i < Nq ? fk_err : nullptr;  // padding rows report nothing
#pragma unroll
            for (int n = 0; n < N_; ++n) {
                const int j = j0 + 8 * n + 2 * t + (e & 1);
                const float x = s[mt][n][e];
                if (FULL) {
                    s[mt][n][e] = FK_MOD(x, scale, b, h, i, j, err_row);
                } else {
                    const bool keep = x != -INFINITY;
                    const float y = FK_MOD(x, scale, b, h, i, j, keep ? err_row : nullptr);
                    s[mt][n][e] = keep ? y : -INFINITY;
                }
            }
        }
}
""")
    else:
        parts.append("#define FK_SCORES(s, it, j0, full)\n#define FK_ROW_DONE(i, l)")
    return "\n".join(parts) + "\n// ==== rung 6 ====\n"


CLASSIFY = r"""
// One block per tile: SKIP if mask_mod is False on every score, FULL if True on every one, else PARTIAL
// (positions past Nq or Nk do not exist: they count for neither).
extern "C" __global__ void fk_classify(signed char* __restrict__ states, int Hm, int Nq, int Nk, int Br, int Bc,
                                       int* fk_err FKM_PARAMS) {
    const int b = blockIdx.z / Hm, h = blockIdx.z % Hm;
    const int i0 = blockIdx.y * Br, j0 = blockIdx.x * Bc;
    int any = 0, all = 1;
    for (int e = threadIdx.x; e < Br * Bc; e += blockDim.x) {
        const int i = i0 + e / Bc, j = j0 + e % Bc;
        if (i < Nq && j < Nk) {
            const bool v = fkm_mask_mod(b, h, i, j, fk_err FKM_ARGS);
            any |= v;
            all &= v;
        }
    }
    any = __syncthreads_or(any);
    all = __syncthreads_and(all);
    if (threadIdx.x == 0)
        states[((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] = !any ? 0 : (all ? 2 : 1);
}

// The bits of the PARTIAL tiles of a mask_mod (the tiles of `tiles`, in (Bm, Hm, Tr, Tc) order; one block a
// tile, one 32-bit word per 32 keys of a row): the kernel then reads one bit per score there instead of
// evaluating the mask_mod (measured: a document mask's mask_mod costs 6.2x a FULL tile's time per tile).
extern "C" __global__ void fk_mod_pack(const int* __restrict__ tiles, unsigned* __restrict__ bits, int Hm, int Nq,
                                       int Nk, int Br, int Bc, int Tr, int Tc, int* fk_err FKM_PARAMS) {
    const int tile = tiles[blockIdx.x];
    const int plane = tile / (Tr * Tc), i0 = (tile / Tc) % Tr * Br, j0 = tile % Tc * Bc;
    const int b = plane / Hm, h = plane % Hm, words = Bc / 32;
    for (int w = threadIdx.x; w < Br * words; w += blockDim.x) {
        const int i = i0 + w / words, jw = j0 + 32 * (w % words);
        unsigned word = 0;
        if (i < Nq)
            for (int c = 0; c < 32; ++c)
                if (jw + c < Nk && fkm_mask_mod(b, h, i, jw + c, fk_err FKM_ARGS)) word |= 1u << c;
        bits[(long long)blockIdx.x * Br * words + w] = word;
    }
}
"""

BOOL_MASK = r"""
// A bool mask (planes, Nq, Nk) on the GPU, in three small kernels and no host work per tile:
//   fk_mask_states  one block a tile: SKIP / PARTIAL / FULL (16 bytes a load where the rows allow it);
//                   a PARTIAL tile takes the next slot of the bits (an atomic counter)
//   fk_mask_pack    one block a PARTIAL tile: its Br x Bc bits, one 32-bit word per 32 keys of a row
//   fk_lists        one warp a row of the tile lists: the tiles both the bool mask and `base` (the window
//                   and the mask_mod, classified on the host) leave visible, in key order (a ballot)
#define FK_SKIP 0
#define FK_PARTIAL 1
#define FK_FULL_TILE 2
__device__ __forceinline__ unsigned fk_zero_byte(unsigned x) { return (x - 0x01010101u) & ~x & 0x80808080u; }
// bit k of the result: byte k of x is not 0 (k = 0..3)
__device__ __forceinline__ unsigned fk_nonzero_bytes(unsigned x) {
    const unsigned high = (((x & 0x7f7f7f7fu) + 0x7f7f7f7fu) | x) & 0x80808080u;  // bit 7 of each nonzero byte
    return (((high >> 7) * 0x00204081u) >> 21) & 0xfu;  // bits 0, 8, 16, 24 gathered into 0..3 (no carries)
}

extern "C" __global__ void fk_mask_states(const unsigned char* __restrict__ mask, signed char* __restrict__ states,
                                          int* __restrict__ slot_of, int* __restrict__ tile_of, int* __restrict__ n_partial,
                                          int Nq, int Nk, int Br, int Bc, int vec) {
    const long long tile = ((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const unsigned char* M = mask + (long long)blockIdx.z * Nq * Nk;
    const int i0 = blockIdx.y * Br, j0 = blockIdx.x * Bc;
    int any = 0, all = 1;
    if (vec && i0 + Br <= Nq && j0 + Bc <= Nk) {  // Nk % 16 == 0 and an aligned mask: rows of uint4
        const int per_row = Bc / 16;
#pragma unroll 4
        for (int e = threadIdx.x; e < Br * per_row; e += blockDim.x) {
            const uint4 w = *reinterpret_cast<const uint4*>(M + (long long)(i0 + e / per_row) * Nk + j0 + 16 * (e % per_row));
            any |= (w.x | w.y | w.z | w.w) != 0u;
            all &= (fk_zero_byte(w.x) | fk_zero_byte(w.y) | fk_zero_byte(w.z) | fk_zero_byte(w.w)) == 0u;
        }
    } else {  // edge tiles and unaligned masks: a byte at a time (positions past Nq or Nk count for neither)
        for (int e = threadIdx.x; e < Br * Bc; e += blockDim.x) {
            const int i = i0 + e / Bc, j = j0 + e % Bc;
            if (i < Nq && j < Nk) {
                const bool v = M[(long long)i * Nk + j] != 0;
                any |= v;
                all &= v;
            }
        }
    }
    any = __syncthreads_or(any);
    all = __syncthreads_and(all);
    if (threadIdx.x == 0) {
        const int state = !any ? FK_SKIP : (all ? FK_FULL_TILE : FK_PARTIAL);
        int slot = -1;
        if (state == FK_PARTIAL) {
            slot = atomicAdd(n_partial, 1);
            tile_of[slot] = (int)tile;
        }
        states[tile] = (signed char)state;
        slot_of[tile] = slot;
    }
}

extern "C" __global__ void fk_mask_pack(const unsigned char* __restrict__ mask, const int* __restrict__ tile_of,
                                        unsigned* __restrict__ bits, int Nq, int Nk, int Br, int Bc, int Tr, int Tc,
                                        int vec) {
    const int tile = tile_of[blockIdx.x];
    const int plane = tile / (Tr * Tc), i0 = (tile / Tc) % Tr * Br, j0 = tile % Tc * Bc;
    const unsigned char* M = mask + (long long)plane * Nq * Nk;
    const int words = Bc / 32;
    for (int w = threadIdx.x; w < Br * words; w += blockDim.x) {
        const int i = i0 + w / words, jw = j0 + 32 * (w % words);
        unsigned word = 0;
        if (i < Nq) {
            const unsigned char* row = M + (long long)i * Nk + jw;
            if (vec && jw + 32 <= Nk) {
                const uint4 a = reinterpret_cast<const uint4*>(row)[0], c = reinterpret_cast<const uint4*>(row)[1];
                const unsigned u[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
#pragma unroll
                for (int k = 0; k < 8; ++k) word |= fk_nonzero_bytes(u[k]) << (4 * k);
            } else {
                for (int c = 0; c < 32; ++c)
                    if (jw + c < Nk && row[c]) word |= 1u << c;
            }
        }
        bits[(long long)blockIdx.x * Br * words + w] = word;
    }
}

// base: (Bb, Hb, Tr, Tc) codes = state of the window and the mask_mod (bits 0-1) | 4 if the mask_mod's is PARTIAL
extern "C" __global__ void fk_lists(const signed char* __restrict__ base, int Bb, int Hb,
                                    const signed char* __restrict__ bstates, const int* __restrict__ slot_of, int Bm, int Hm,
                                    int Bl, int Hl, int Tr, int Tc, int words, int partial_cost, int* __restrict__ start,
                                    int* __restrict__ count, int* __restrict__ index, int* __restrict__ bits_at,
                                    int* __restrict__ cost) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= Bl * Hl * Tr) return;  // the same for the whole warp
    const int tr = row % Tr, h = (row / Tr) % Hl, b = row / (Tr * Hl);
    const long long pb = ((long long)((Bb > 1 ? b : 0) * Hb + (Hb > 1 ? h : 0)) * Tr + tr) * Tc;
    const long long pm = ((long long)((Bm > 1 ? b : 0) * Hm + (Hm > 1 ? h : 0)) * Tr + tr) * Tc;
    const long long out = (long long)row * Tc;
    int n = 0, n_partial = 0;
    for (int j0 = 0; j0 < Tc; j0 += 32) {
        const int j = j0 + lane;
        bool visible = false;
        int entry = 0, at = -1;
        if (j < Tc) {
            const int code = base[pb + j], sm = bstates[pm + j];
            visible = (code & 3) != FK_SKIP && sm != FK_SKIP;
            entry = 2 * j + (((code >> 2) & 1) | (sm == FK_PARTIAL));
            at = sm == FK_PARTIAL ? slot_of[pm + j] * words : -1;
        }
        const unsigned ballot = __ballot_sync(0xffffffffu, visible);
        if (visible) {
            const int k = n + __popc(ballot & ((1u << lane) - 1u));
            index[out + k] = entry;
            bits_at[out + k] = at;
        }
        n += __popc(ballot);
        n_partial += __popc(__ballot_sync(0xffffffffu, visible && (entry & 1)));
    }
    if (lane == 0) {
        count[row] = n;
        start[row] = (int)out;
        cost[row] = n + (partial_cost - 1) * n_partial;  // for the order of the blocks (block_order)
    }
}
"""


def source(score_mod=None, mask_mod=None, bits: bool = False, rung: int = 6, ordered: bool = False) -> str:
    """The whole CUDA source the tensor-core rung compiles for these mods (what the notebook shows)."""
    score = modlang.translate("score_mod", score_mod) if score_mod is not None else None
    mask = modlang.translate("mask_mod", mask_mod) if mask_mod is not None else None
    return prelude(score, mask, bits, ordered) + _rung_source(rung)


_MODULES: OrderedDict = OrderedDict()
COMPILE_SECONDS: dict = {}


def _module(text: str, options: tuple):
    import cupy

    key = (text, options)
    if key not in _MODULES:
        t0 = time.perf_counter()
        mod = cupy.RawModule(code=text, options=options)
        mod.compile()
        COMPILE_SECONDS[key] = time.perf_counter() - t0
        _remember(_MODULES, key, mod)
    _MODULES.move_to_end(key)
    return _MODULES[key]


@functools.cache
def _rung_source(rung: int) -> str:
    return (flash.KERNEL_DIR / flash.RUNGS[rung].source).read_text()


def _kernel(rung, score, mask, bits, d, element, Br, Bc, ordered=False):
    spec = flash.RUNGS[rung]
    text = prelude(score, mask, bits, ordered) + _rung_source(rung)
    fn = _module(text, flash.options(rung, d, element, Br, Bc)).get_function("flash_fwd")
    smem = spec.smem(d, Br, Bc)
    if smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem
    return fn


# ---------------------------------------------------------------------------------------------
# Captured arrays and errors
# ---------------------------------------------------------------------------------------------
_UPLOADED: OrderedDict = OrderedDict()


def _arrays(code: Optional[modlang.DeviceCode], fp=None):
    """The captured arrays of a mod on the GPU, in its kernel parameters' dtypes (NumPy arrays uploaded
    once per content: blockmask.fingerprint, or `fp` when the caller has it; CuPy arrays used in place
    when their dtype fits)."""
    import cupy

    if code is None:
        return ()
    key = (code.fn, blockmask.fingerprint(code.fn) if fp is None else fp, code.key)
    if key in _UPLOADED:
        _UPLOADED.move_to_end(key)
        host = _UPLOADED[key]
    else:
        host = None
    out = []
    for k, a in enumerate(code.arrays):
        if isinstance(a.value, np.ndarray):
            if host is None:
                out.append(cupy.asarray(np.ascontiguousarray(a.value, dtype=a.dtype)))
            else:
                out.append(host[k])
        else:
            out.append(cupy.ascontiguousarray(a.value.astype(a.dtype, copy=False)))
    if host is None:
        _remember(_UPLOADED, key, out)
    return tuple(out)


def explain_nonfinite(problem, b: int, h: int, q: int):
    """Raise ValueError naming the key where score_mod gave NaN or +inf in row (b, h, q): the row's scores
    recomputed on the host in float64 (one row: Nk dot products), the visible ones through score_mod in
    NumPy (flashkit.blockmask.apply_mods raises with the position). Returns if NumPy finds nothing."""
    import cupy

    hk = h // problem.group
    Q = cupy.asnumpy(problem.Q[b, h, q]).astype(np.float64) if problem.element is None else None
    if Q is None:  # bf16 bits: widen to float32 by shifting into the high half
        to32 = lambda x: (cupy.asnumpy(x).astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
        Q, K = to32(problem.Q[b, h, q]), to32(problem.K[b, hk])
    else:
        K = cupy.asnumpy(problem.K[b, hk]).astype(np.float64)
    S = (K @ Q * problem.scale)[None, None, None, :]
    lo, hi = masks.row_bounds(problem.Nq, problem.Nk, problem.window)
    j = np.arange(problem.Nk)
    visible = (j >= lo[q]) & (j < hi[q])
    if problem.mask is not None:
        m = problem.mask
        visible &= cupy.asnumpy(m[b if m.shape[0] > 1 else 0, h if m.shape[1] > 1 else 0, q])
    S = np.where(visible, S, -np.inf)
    blockmask.apply_mods(S, problem.score_mod, problem.mask_mod, *blockmask.index_grid(b, h, q, q + 1, 0, problem.Nk))


def _check_errors(err, score: Optional[modlang.DeviceCode], mask: Optional[modlang.DeviceCode], problem=None):
    e = err.get()  # the one host sync of a call with mods
    code = int(e[0])
    if code == 0:
        return
    b, h, q, kv = (int(x) for x in e[1:5])
    value = (int(e[6]) << 32) | (int(e[5]) & 0xffffffff)
    where = f"b={b}, h={h}, q_idx={q}, kv_idx={kv}"
    if code == modlang.NONFINITE and score is not None:
        if problem is not None:
            try:
                explain_nonfinite(problem, b, h, q)
            except ValueError:
                raise
            except Exception:  # NumPy cannot evaluate this mod (a CuPy capture): the row is still named
                pass
        raise ValueError(f"score_mod {blockmask.describe(score.fn)} returned NaN or +inf for a key of b={b}, h={h}, "
                         f"q_idx={q}; a score_mod must return a finite score, or -inf to hide it")
    for dc in (score, mask):
        if dc is not None and code in dc.sites:
            site = dc.sites[code]
            head = f"{dc.kind} {blockmask.describe(dc.fn)}"
            inner = "" if site.fn is dc.fn else f" (in {blockmask.describe(site.fn)})"
            if site.what == "lookup":
                raise IndexError(f"{head}{inner}, line {site.line} `{site.text}`: index {value} is out of bounds "
                                 f"for a dimension of length {site.size}, at {where}")
            raise ZeroDivisionError(f"{head}{inner}, line {site.line} `{site.text}`: division by zero at {where}")
    raise RuntimeError(f"internal: the kernel reported error code {code} at {where}")


# ---------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------
def regrid(tiles: np.ndarray, Br0: int, Bc0: int, Nq: int, Nk: int, Br: int, Bc: int) -> np.ndarray:
    """Tile states of (Br0, Bc0) tiles as states of (Br, Bc) tiles, exactly: a new tile is SKIP or FULL
    when every old tile it overlaps is, else PARTIAL (which the kernel tests element by element)."""
    if (Br0, Bc0) == (Br, Bc):
        return tiles
    lo = hi = np.asarray(tiles, np.int8)
    for axis, n, b0, b1 in ((2, Nq, Br0, Br), (3, Nk, Bc0, Bc)):
        T = -(-n // b1)
        first = np.arange(T) * b1 // b0
        last = (np.minimum(n, (np.arange(T) + 1) * b1) - 1) // b0
        span = int((last - first).max()) + 1
        idx = np.minimum(first[:, None] + np.arange(span)[None, :], last[:, None])  # (T, span)
        lo = np.take(lo, idx, axis=axis).min(axis=axis + 1)
        hi = np.take(hi, idx, axis=axis).max(axis=axis + 1)
    return np.where(lo == hi, lo, PARTIAL).astype(np.int8)


_CLASSIFIED: OrderedDict = OrderedDict()


def _classifier(mask: modlang.DeviceCode):
    text = modlang.RUNTIME + mask.source + f"#define FKM_PARAMS {mask.params}\n#define FKM_ARGS {mask.args}\n" + CLASSIFY
    return _module(text, ("--std=c++17", f"--gpu-architecture={flash._arch()}"))


def classify(mask_mod, B: int, H: int, Nq: int, Nk: int, Br: int, Bc: int) -> np.ndarray:
    """(B, H, Tr, Tc) int8 tile states of mask_mod, computed on the GPU by the translated mask_mod (one
    block a tile); flashkit.block_mask(..., engine="cuda") calls it."""
    import cupy

    mask = modlang.translate("mask_mod", mask_mod)
    fn = _classifier(mask).get_function("fk_classify")
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    states = cupy.empty((B, H, Tr, Tc), cupy.int8)
    err = cupy.zeros(8, cupy.int32)
    fn((Tc, Tr, B * H), (256,), (states, np.int32(H), np.int32(Nq), np.int32(Nk), np.int32(Br), np.int32(Bc), err)
       + _arrays(mask))
    _check_errors(err, None, mask)
    return states.get()


def mask_fingerprint(problem):
    """The fingerprint of the call's mask_mod, computed once a call: a block mask's own (validate.check
    has just compared it with the mask_mod's values: BlockMask.check_call), else the mask_mod's."""
    if problem.block_mask is not None:
        return problem.block_mask.captured
    return None if problem.mask_mod is None else blockmask.fingerprint(problem.mask_mod)


def _mask_mod_tiles(problem, Br, Bc, fp=None) -> Optional[np.ndarray]:
    """The mask_mod's tile states at (Br, Bc): the block mask's, regridded, or classified here (cached)."""
    bm = problem.block_mask
    if bm is not None:
        return regrid(bm.tiles, bm.Br, bm.Bc, problem.Nq, problem.Nk, Br, Bc)
    if problem.mask_mod is None:
        return None
    reads_b, reads_h = blockmask.reads_batch_head(problem.mask_mod)
    B, H = (problem.B if reads_b else 1), (problem.Hq if reads_h else 1)
    fp = blockmask.fingerprint(problem.mask_mod) if fp is None else fp
    key = (problem.mask_mod, fp, B, H, problem.Nq, problem.Nk, Br, Bc)
    if key not in _CLASSIFIED:
        _remember(_CLASSIFIED, key, classify(problem.mask_mod, B, H, problem.Nq, problem.Nk, Br, Bc))
    _CLASSIFIED.move_to_end(key)
    return _CLASSIFIED[key]


def tile_lists(window_states, mod_states=None, bool_states=None, bits_offsets=None):
    """(start, count (Bm, Hm, Tr), index, bits_at or None) of the tiles to visit, packed: row r's count[r]
    entries are index[start[r]:start[r] + count[r]], the key tiles in order, entry = 2 j + 1 where the
    mask_mod or the bool mask is PARTIAL there (the window's own PARTIAL tiles the kernel finds itself);
    bits_at: the tile's offset in the bits (`bits_offsets`, broadcast like the states; -1: none).
    Memory: one int32 per visited tile (and per row), not per tile of the grid."""
    state = window_states[None, None]
    partial = np.zeros(state.shape, bool)
    for s in (mod_states, bool_states):
        if s is not None:
            state = np.minimum(state, s)
            partial = partial | (s == PARTIAL)
    shape = np.broadcast_shapes(state.shape, partial.shape)
    Tc = shape[3]
    visible = np.broadcast_to(state != SKIP, shape).reshape(-1, Tc)
    rows, cols = np.nonzero(visible)  # row-major: rows in order, each row's key tiles in order
    count = visible.sum(axis=-1).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    if count.sum() >= 1 << 31:
        raise ValueError(f"{count.sum()} visited tiles are more than the kernel's int32 tile lists hold")
    flags = np.broadcast_to(partial, shape).reshape(-1, Tc)[rows, cols]
    index = (2 * cols + flags).astype(np.int32)
    bits_at = None
    if bits_offsets is not None:
        bits_at = np.broadcast_to(bits_offsets, shape).reshape(-1, Tc)[rows, cols].astype(np.int32)
    return start.astype(np.int32).reshape(shape[:3]), count.astype(np.int32).reshape(shape[:3]), index, bits_at


_LISTS: OrderedDict = OrderedDict()
_NO_BITS: dict = {}


def _lists_key(problem, Br, Bc, fp=None):
    """(key, object the entry must belong to) of what the tile lists of a call depend on, bool mask aside."""
    bm = problem.block_mask
    if bm is not None:
        ident, keep = ("block_mask", id(bm)), bm
    elif problem.mask_mod is not None:
        fp = blockmask.fingerprint(problem.mask_mod) if fp is None else fp
        ident, keep = ("mask_mod", problem.mask_mod, fp), None
    else:
        ident, keep = ("none",), None
    return (ident, problem.window, problem.B, problem.Hq, problem.Nq, problem.Nk, Br, Bc), keep


def _cached(kind, problem, Br, Bc, make, fp=None):
    key, keep = _lists_key(problem, Br, Bc, fp)
    key = (kind,) + key
    hit = _LISTS.get(key)
    if hit is not None and hit[0] is keep:
        _LISTS.move_to_end(key)
        return hit[1]
    return _remember(_LISTS, key, (keep, make()))[1]


# What a PARTIAL tile costs in FULL tiles' time, for the order of the blocks only (block_order): the
# mask_mod on every score (measured: a document mask's every-tile run is 6.2x the time without a mask,
# gpu-mods-h200.json), or a bit per score (an estimate: one word load per 32 keys and a few integer ops).
PARTIAL_COST_MASK_MOD, PARTIAL_COST_BITS = 6, 3
# Switches for the benchmarks' side-by-side runs (benchmarks/gpu_mods_check.py): order the blocks by their
# lists (block_order), and turn a mask_mod's PARTIAL tiles into bits. Changing one needs clear_caches().
ORDER_BLOCKS = True
MOD_BITS = True
FOLD_SOFTCAP = True  # the library's softcap with its cap in the scales (softcap_of); False: the generic hook


@contextlib.contextmanager
def generic_softcap():
    """Within this block, prepare() builds softcap with the generic hook (FOLD_SOFTCAP off): the benchmarks
    time it beside the folded one."""
    global FOLD_SOFTCAP
    FOLD_SOFTCAP = False
    try:
        yield
    finally:
        FOLD_SOFTCAP = True


def clear_caches():
    """Forget the tile lists made so far (after changing ORDER_BLOCKS or MOD_BITS)."""
    _LISTS.clear()


def block_order(cost, B: int, Hq: int, xp=np):
    """(B Hq Tr,) int32: the blocks' (b Hq + hq) Tr + tr, costliest row first (cost (Bm, Hm, Tr), broadcast),
    ties in rung 6's own order (last query block first, head after head): longest-processing-time-first,
    so the rows with the most (or the costliest) tiles do not start last. O(B Hq Tr) memory."""
    Tr = cost.shape[2]
    cost = xp.broadcast_to(cost, (B, Hq, Tr)).reshape(-1).astype(xp.int64)
    natural = (xp.arange(B * Hq, dtype=xp.int64)[:, None] * Tr + (Tr - 1 - xp.arange(Tr, dtype=xp.int64))[None, :])
    natural = natural.reshape(-1)
    key = -cost[natural] * natural.size + xp.arange(natural.size, dtype=xp.int64)  # unique keys: a stable order
    order = natural[xp.argsort(key)]
    return order.astype(xp.int32), bool((order != natural).any())  # (order, whether it is not rung 6's own)


def _bits_budget(problem) -> int:
    """The most bytes the bits of a mask_mod's PARTIAL tiles may take: the size of Q (O(N) memory)."""
    return int(problem.Q.nbytes)


def _mod_lists(problem, Br, Bc, fp=None):
    """(start, count, index, bits_at, bits or None, order, ordered) on the GPU for a call without a bool
    mask, kept for the next call with the same block mask (or mask_mod and captured values), window,
    shapes and tiles. bits: the mask_mod's PARTIAL tiles as bits (fk_mod_pack), when the mask_mod is on the GPU and
    they fit _bits_budget; None: the kernel evaluates the mask_mod there itself. order: block_order's,
    where `ordered` (it differs from rung 6's own order)."""
    import cupy

    def make():
        window_states = masks.block_map(problem.Nq, problem.Nk, Br, Bc, problem.window)
        mod = _mask_mod_tiles(problem, Br, Bc, fp)
        words = Br * (Bc // 32)
        partial = np.flatnonzero(mod == PARTIAL) if mod is not None else np.zeros(0, np.int64)
        # bits hold the mask_mod of the planes it was classified for: a block mask made for B = 1 (H = 1) of a
        # mask_mod that reads b (h) leaves it to the kernel, which calls it with each call's b and h
        reads_b, reads_h = blockmask.reads_batch_head(problem.mask_mod) if mod is not None else (False, False)
        planes_fit = mod is not None and (not reads_b or mod.shape[0] == problem.B) and (
            not reads_h or mod.shape[1] == problem.Hq)
        fits = partial.size * words * 4 <= _bits_budget(problem) and partial.size * words < 1 << 31
        use_bits = MOD_BITS and planes_fit and 0 < partial.size and fits
        offsets = None
        if use_bits:
            offsets = np.full(mod.size, -1, np.int64)
            offsets[partial] = np.arange(partial.size) * words
            offsets = offsets.reshape(mod.shape)
        start, count, index, bits_at = tile_lists(window_states, mod, None, offsets)
        flags = (index & 1).astype(np.int64)
        rows = np.repeat(np.arange(count.size), count.ravel())
        partials = np.bincount(rows, weights=flags, minlength=count.size).reshape(count.shape)
        cost = count + (PARTIAL_COST_BITS if use_bits else PARTIAL_COST_MASK_MOD) * partials - partials
        order, ordered = block_order(cost.astype(np.int64), problem.B, problem.Hq)
        ordered = ordered and ORDER_BLOCKS
        order = cupy.asarray(order) if ordered else cupy.zeros(1, cupy.int32)
        bits = None
        if use_bits:
            mask = modlang.translate("mask_mod", problem.mask_mod)
            bits = cupy.empty(partial.size * words, cupy.uint32)
            err = cupy.zeros(8, cupy.int32)
            i32 = np.int32
            _classifier(mask).get_function("fk_mod_pack")(
                (int(partial.size),), (min(256, words),),
                (cupy.asarray(partial.astype(np.int32)), bits, i32(mod.shape[1]), i32(problem.Nq), i32(problem.Nk),
                 i32(Br), i32(Bc), i32(mod.shape[2]), i32(mod.shape[3]), err) + _arrays(mask, fp))
            _check_errors(err, None, mask)
        return (cupy.asarray(start), cupy.asarray(count), cupy.asarray(index if index.size else np.zeros(1, np.int32)),
                cupy.asarray(bits_at) if use_bits else cupy.full(1, -1, cupy.int32), bits, order, ordered)

    return _cached("lists", problem, Br, Bc, make, fp)


def _base_codes(problem, Br, Bc, fp=None):
    """(Bb, Hb, Tr, Tc) int8 on the GPU: the window's and the mask_mod's tile state (bits 0-1), + 4 where
    the mask_mod's is PARTIAL: what fk_lists combines with a bool mask's states."""
    import cupy

    def make():
        state = masks.block_map(problem.Nq, problem.Nk, Br, Bc, problem.window)[None, None]
        mod = _mask_mod_tiles(problem, Br, Bc, fp)
        code = state if mod is None else np.minimum(state, mod) | (4 * (mod == PARTIAL)).astype(np.int8)
        return cupy.asarray(np.ascontiguousarray(code, dtype=np.int8))

    return _cached("base", problem, Br, Bc, make, fp)


def bool_mask_bits(problem, Br, Bc):
    """(module, states, slot_of, bits, n_partial) of a call with a bool mask (Bm, Hm, Nq, Nk) on the GPU, at
    tiles of Br x Bc: every tile classified in one pass over the mask (fk_mask_states: states SKIP / PARTIAL /
    FULL, slot_of its slot in the bits or -1), the PARTIAL tiles' bits packed (fk_mask_pack: Br rows of Bc / 32
    words a tile, in slot order, what fk_keep reads). The host reads one number, how many tiles are PARTIAL, to
    size the bits. Shared by the forward (rung 6) and the backward (flash_mods_backward)."""
    import cupy

    mask = problem.mask
    Bm, Hm, Nq, Nk = mask.shape
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    mod = _module(BOOL_MASK, ("--std=c++17", f"--gpu-architecture={flash._arch()}"))
    m8 = mask.view(cupy.uint8)
    vec = np.int32(Nk % 16 == 0 and m8.data.ptr % 16 == 0)
    tiles = Bm * Hm * Tr * Tc
    states = cupy.empty(tiles, cupy.int8)
    slot_of = cupy.empty(tiles, cupy.int32)
    tile_of = cupy.empty(tiles, cupy.int32)
    n_partial = cupy.zeros(1, cupy.int32)
    i32 = np.int32
    mod.get_function("fk_mask_states")((Tc, Tr, Bm * Hm), (128,), (m8, states, slot_of, tile_of, n_partial, i32(Nq),
                                                                  i32(Nk), i32(Br), i32(Bc), vec))
    partial = int(n_partial.get()[0])  # the host sync of the bool-mask path: the size of the bits
    words = Br * (Bc // 32)
    if partial * words >= 1 << 31:
        raise ValueError(f"mask: {partial} partially masked tiles need more than 2^31 words of bits")
    bits = cupy.empty(max(1, partial * words), cupy.uint32)
    if partial:
        mod.get_function("fk_mask_pack")((partial,), (min(256, words),), (m8, tile_of, bits, i32(Nq), i32(Nk), i32(Br),
                                                                       i32(Bc), i32(Tr), i32(Tc), vec))
    return mod, states, slot_of, bits, partial


def _bool_mask_lists(problem, Br, Bc, fp=None):
    """(start, count, index, bits_at, bits, n_partial, order, ordered) on the GPU of a call with a bool mask
    (Bm, Hm, Nq, Nk): the mask's tiles classified on the GPU in one pass over it, the bits of its PARTIAL
    tiles only (Br x Bc / 8 bytes each; bool_mask_bits), the tile lists and the block order made on the GPU
    (fk_lists, block_order). Nothing of size Nq x Nk is made; the host reads one number (how many tiles are
    PARTIAL, to size the bits) and one flag (whether the order differs from rung 6's own). Made in every call:
    the mask's contents may change between calls."""
    import cupy

    Bm, Hm, Nq, Nk = problem.mask.shape
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    mod, states, slot_of, bits, partial = bool_mask_bits(problem, Br, Bc)
    words = Br * (Bc // 32)
    i32 = np.int32
    base = _base_codes(problem, Br, Bc, fp)
    Bb, Hb = base.shape[:2]
    Bl, Hl = max(Bb, Bm), max(Hb, Hm)
    rows = Bl * Hl * Tr
    if rows * Tc >= 1 << 31:
        raise ValueError(f"mask: {rows * Tc} tiles are more than the kernel's int32 tile lists hold")
    start, count, cost = (cupy.empty((Bl, Hl, Tr), cupy.int32) for _ in range(3))
    index, bits_at = cupy.empty(rows * Tc, cupy.int32), cupy.empty(rows * Tc, cupy.int32)
    weight = PARTIAL_COST_MASK_MOD if problem.mask_mod is not None else PARTIAL_COST_BITS
    mod.get_function("fk_lists")((-(-rows // 4),), (128,), (base, i32(Bb), i32(Hb), states, slot_of, i32(Bm), i32(Hm),
                                                           i32(Bl), i32(Hl), i32(Tr), i32(Tc), i32(words), i32(weight),
                                                           start, count, index, bits_at, cost))
    order, ordered = block_order(cost, problem.B, problem.Hq, cupy)  # (a second one-byte host read)
    ordered = ordered and ORDER_BLOCKS
    return start, count, index, bits_at, bits, partial, order, ordered


def blocks(rung: int, problem):
    """(Br, Bc): the rung's default for d with a block mask (its tiles are regridded), else the
    problem's block size if forced, else the default."""
    if problem.block_mask is not None:
        return flash.blocks_for(rung, problem.d, None)
    return flash.blocks_for(rung, problem.d, problem.block_size)


def run(rung: int, problem):
    """(O, lse) of a Problem with a score_mod, mask_mod, block_mask and/or bool mask, on `rung`."""
    launch, check, O, lse = prepare(rung, problem)
    launch()
    check()
    return O, lse


def prepare(rung: int, problem):
    """(launch, check, O, lse): everything of `run` but the kernel launch and the error check, so a
    benchmark can time the kernel alone (launch) beside the public call."""
    import cupy

    spec = flash.RUNGS[rung]
    element = problem.element or flash.ELEMENTS.get(problem.Q.dtype.name)
    if element not in spec.elements:
        raise TypeError(f"rung {rung} computes {', '.join(spec.dtypes)}; got {problem.dtype_name}")
    Br, Bc = blocks(rung, problem)
    B, Hq, Nq, Nk, d = problem.B, problem.Hq, problem.Nq, problem.Nk, problem.d
    score = modlang.translate("score_mod", problem.score_mod) if problem.score_mod is not None else None
    mask = modlang.translate("mask_mod", problem.mask_mod) if problem.mask_mod is not None else None
    fp = mask_fingerprint(problem)  # the one pass over the mask_mod's captured arrays in this call
    if problem.mask is not None:  # a bool mask: classified and packed in every call (its contents may change)
        start_d, count_d, index_d, bits_at_d, bits, _, order_d, ordered = _bool_mask_lists(problem, Br, Bc, fp)
    else:
        start_d, count_d, index_d, bits_at_d, bits, order_d, ordered = _mod_lists(problem, Br, Bc, fp)
        if bits is not None:  # the mask_mod's PARTIAL tiles are bits: the kernel needs no mask_mod
            mask = None
        else:
            bits = _NO_BITS.get("bits")
            if bits is None:
                bits = _NO_BITS["bits"] = cupy.zeros(1, cupy.uint32)
    has_bits = problem.mask is not None or mask is None and problem.mask_mod is not None
    fn = _kernel(rung, score, mask, has_bits, d, element, Br, Bc, ordered)
    Bm, Hm, Tr = count_d.shape
    O, lse = problem.new_outputs(lse_dtype="float32")
    err = cupy.zeros(8, cupy.int32)
    i32, f32 = np.int32, np.float32
    scale_log2 = flash.LOG2E if score is not None else problem.scale * flash.LOG2E  # a score_mod's output is natural
    fk_scale = problem.scale  # what FK_SCORES multiplies S by before the score_mod
    cap = softcap_of(score)
    if cap:  # softcap with its cap in the scales: S (scale / cap) into tanh, then cap log2(e) for the softmax
        scale_log2, fk_scale = cap * flash.LOG2E, problem.scale / cap
    left, right = (int(w) for w in problem.window)
    args = (problem.Q, problem.K, problem.V, O, lse, i32(Hq), i32(problem.Hkv), i32(Nq), i32(Nk), f32(scale_log2),
            i32(left), i32(right), err, start_d, count_d, index_d, bits_at_d, bits, order_d, i32(Bm), i32(Hm),
            f32(fk_scale)) + _arrays(score) + _arrays(mask, fp)
    grid, threads, smem = (Tr, Hq, B), (spec.threads(Br, Bc),), spec.smem(d, Br, Bc)

    def launch():
        fn(grid, threads, args, shared_mem=smem)

    # The error word is read (a host sync: the next call's host work then waits for this kernel) only where
    # the kernel can write it: a score_mod not marked mods.cannot_fail, or a mask_mod the kernel evaluates
    # that has lookups or divisions. softcap and identity, alone or with a block mask, a bool mask or a
    # mask_mod turned into bits, return without waiting.
    can_fail = any(code is not None and not code.cannot_fail for code in (score, mask))

    def check():
        if can_fail:
            _check_errors(err, score, mask, problem)

    return launch, check, O, lse


def visited_tiles(problem, rung: int = 6) -> dict:
    """How many (b, h) x query-block x key-block tiles a call visits, and of how many (for benchmarks)."""
    Br, Bc = blocks(rung, problem)
    window_states = masks.block_map(problem.Nq, problem.Nk, Br, Bc, problem.window)
    _, count, _, _ = tile_lists(window_states, _mask_mod_tiles(problem, Br, Bc))
    per_plane = int(np.broadcast_to(count, (problem.B, problem.Hq) + count.shape[2:]).sum())
    return {"visited": per_plane, "total": problem.B * problem.Hq * window_states.size, "block": (Br, Bc)}
