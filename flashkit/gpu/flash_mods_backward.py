"""Backward rung 2 with FlexAttention's hooks: the gradients of attention with score_mod, mask_mod and block masks.

The forward's mods (flashkit/gpu/flash_mods.py) fill forward rung 6's FK_* hooks; this module fills the same
kind of hooks in backward rung 2 (kernels/b2_mma.cu, identity by default: the plain rung compiles to the
same code), with the user's functions translated to CUDA by flashkit/gpu/modlang.py:

    tiles       b2's outer loop is over key blocks K_j (one CUDA block each), its inner loop over the query
                blocks Q_i of every query head of the K/V head: so its tile lists are key-block-major, the
                forward's lists made on the tile states with the q and k axes swapped (Tc rows of query
                tiles, not Tr rows of key tiles). A key block walks its own list and never computes a tile
                the block mask (or the mask_mod, classified once) leaves EMPTY; a tile FULL for the window
                and the mods needs no per-element test
    score_mod   applied to the recomputed S (natural units, q . k * scale) before P = exp(S' - lse), as in
                the forward; the chain rule through it multiplies dS by f'(s) at the raw score s, the CUDA
                translation of flashkit.mods_grad's exact derivative (modlang.translate_derivative), kept in
                registers from the moment S is computed. Where dS = 0 (P = 0: masked, below exp's range,
                padding rows) nothing flows, whatever f' is there (the reference's rule)
    mask_mod    its PARTIAL tiles as bits (the forward's fk_mod_pack, at b2's Br x Bc tiles) when they fit in
                the size of Q, else evaluated in the kernel on every score of a PARTIAL tile
    lse check   the plain rung flags a lse = -inf row that its window says sees keys; with mods the window
                cannot say that. Here such a row's visible keys are counted instead (each of its P written
                as -0, counted by the sign bit in the row sums b2 makes for the check anyway), so a lse = -inf
                row that sees a key after the mods still raises, and a fully masked row gets 0 gradients
    errors      a lookup out of bounds or a division by zero in the score_mod, its derivative or the
                mask_mod: the error word, raised as in the forward (IndexError / ZeroDivisionError naming the
                line and position). A NaN or +inf score (or derivative) leaves dV_j (or dK_j) not finite: each
                block tests its own once at the end (no test per score) and names the key

Compiled once per (score_mod, mask_mod, bits or not, d, dtype, Br, Bc), cached (flash_mods' bounded LRU of
modules keyed by the generated source); captured arrays are kernel arguments. A bool `mask=` (Bm, Hm, Nq, Nk) on the GPU goes the forward's way
(flash_mods.BOOL_MASK): its tiles classified in one pass over it on the GPU, its PARTIAL tiles packed into bits
for fk_keep, its empty tiles skipped, the lists made on the GPU (fk_lists on the transposed tile grids); O(N)
extra memory beside the (N/Br) x (N/Bc) tile states, where cupy-standard's backward needs O(N^2).

Measured (benchmarks/results/gpu-mods-backward-h200.json: H200, fp16, one device call on the tree of 85e06b6 of
benchmarks/gpu_mods_backward_check.py): 53 of 53 checks passed, dq, dk, dv of 15 cases x 3 awkward shapes within
check_backward's criterion of the float64 reference (rows the mods hide entirely: dq = 0), and 8 of 8 bad-mod /
bad-lse cases raising what they should. compute-sanitizer memcheck (every path, the bool mask= one included): 0
errors. The GPU tests of mask= on this rung (tests/test_gpu_mods_backward.py) passed in the same call.
  - Cost of a score_mod (N = 4096, B = 4, H x d = 2048, ratio of minima against the plain rung in the same run,
    kernels alone; the public call in brackets, against the plain public call): d = 64, 128 x 128 tiles: identity
    1.112x (1.149x), causal 1.125x (1.184x); softcap(50) 1.264x (1.292x), causal 1.262x (1.318x); d = 128: identity
    1.106x (1.146x), causal 1.109x (1.187x); softcap 1.192x (1.253x), causal 1.179x (1.251x). Over the issue's 10%
    goal: the plain rung (6.38 ms, 215 TFLOP/s at d = 64) has no registers to spare at 128 x 128 (ptxas: 255), and
    the derivative kept per score (BR / 8 x 4 floats) spills 40 bytes with softcap. The tiles that do not spill
    are slower still: at d = 64, 64 x 128 identity 1.31x, softcap 1.40x; 32 x 128 1.73-1.83x (the same run). torch
    FlexAttention's compiled backward in the same run: softcap 1.98x its own time without a mod (6.68 -> 13.25
    ms), so ours costs about a quarter of what its softcap costs.
  - The library's softcap with one tanh for f and f' = 1 - tanh^2 and its cap in the softmax's scale (the generic
    hooks divided by the cap and ran tanh twice; benchmarks/results/gpu-mods-backward-fold-h200.json, commit e6e4cef,
    the generic hooks timed beside it in the same run, kernels): d = 64 1.207x (causal 1.242x) against 1.238x
    (1.262x); d = 128 1.190x (1.181x) against 1.189x (1.186x): 2-3% at d = 64, level at d = 128. Still over the 10%
    goal; 53 of 53 checks and memcheck clean in that run.
  - A document mask (8 equal documents, H = 16, d = 64), 0.125 of the tiles visited: N = 4096 block mask 0.16 ms
    against 1.92 ms with every tile visited (11.8x; public call 0.53 / 2.33 ms, 4.4x); N = 16384 1.84 ms against
    34.64 ms (18.8x; public 2.25 / 35.37 ms, 15.8x). FlexAttention's backward on the same mask and inputs at
    N = 16384: 1.39 ms, so ours is 0.76x its speed alone and 0.62x through the public call (largest difference of
    the gradients 2.4e-4 in the run before, fp16).
  - The same document mask as a dense bool mask= (1, 1, N, N), public calls: N = 4096 0.61 ms ("auto" picks this
    rung; the block mask 0.51, cupy-standard's O(N^2) backward 18.93 ms: 31x); N = 16384 2.38 ms (block mask 2.24:
    classifying the 256 MiB mask in the call costs 6%). The gradients differ from the block mask's by 1.2e-4 at most
    (the atomics' order: the block mask's own two runs differ as much).
  - The public call's own cost (tools/gpu_public_trace.py --backward-mods, the call before): at N = 4096 with the
    document mask the host spends 0.83 ms a call (0.65 with check_finite=False) for 0.16 ms of kernels, and the
    GPU waits for it (one sync a call, the error word): Python (validation, the Problem, 7 allocations, the
    launch arguments), not the GPU. The forward with the same mods: 0.52 ms (0.39 unchecked) for 0.04 ms. A
    cached launch plan per (shapes, mods, tiles) would remove most of it; not built.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from flashkit import blockmask, masks
from flashkit.gpu import backward as gpu_backward
from flashkit.gpu import flash, flash_mods, modlang
from flashkit.masks import PARTIAL

RUNG = "cupy-bwd-mma"  # backward rung 2: the rung these hooks are in
GRAD_NONFINITE = 2  # error code: dK_j not finite (the derivative of score_mod); modlang.NONFINITE: dV_j


# ---------------------------------------------------------------------------------------------
# The CUDA text
# ---------------------------------------------------------------------------------------------
def prelude(score: Optional[modlang.DeviceCode], grad: Optional[modlang.DeviceCode],
            mask: Optional[modlang.DeviceCode], bits: bool) -> str:
    """The definitions put in front of b2_mma.cu: the runtime, the mods, and the FK_* hooks."""
    parts = ["// ==== generated by flashkit.gpu.flash_mods_backward: score_mod / mask_mod / block-mask hooks ====",
             f"#define FK_HAS_BITS {int(bits)}", f"#define FK_HAS_MASK_MOD {int(mask is not None)}",
             "#define FK_LSE_COUNTS 1  // bwd_check.cuh: a lse = -inf row must see no key after the mods",
             modlang.RUNTIME]
    for code in (score, grad, mask):
        if code is not None:
            parts.append(code.source)

    def pa(code):
        return (code.params, code.args) if code is not None else ("", "")

    (sp, sa), (dp, da), (mp, ma) = pa(score), pa(grad), pa(mask)
    parts.append(f"#define FKS_PARAMS {sp}\n#define FKS_ARGS {sa}\n#define FKD_PARAMS {dp}\n#define FKD_ARGS {da}\n"
                 f"#define FKM_PARAMS {mp}\n#define FKM_ARGS {ma}")
    parts.append(r"""
// The tile lists, key-block-major: row = (b, query head, key block) of the lists' (Bm, Hm, Tc) planes; its
// fk_count[row] entries (entry = 2 i + partial, i the query block) start at fk_index[fk_start[row]].
#define FK_PARAMS , int* __restrict__ fk_err, const int* __restrict__ fk_start, const int* __restrict__ fk_count, \
    const int* __restrict__ fk_index, const int* __restrict__ fk_bits_at, const unsigned* __restrict__ fk_bits, \
    int fk_Bm, int fk_Hm FKS_PARAMS FKD_PARAMS FKM_PARAMS

// The row of query head hh's list for this block's key block (gridDim.x = Tc key blocks).
__device__ __forceinline__ int fk_row(int b, int hh, int Bm, int Hm) {
    return ((Bm > 1 ? b : 0) * Hm + (Hm > 1 ? hh : 0)) * (int)gridDim.x + (int)blockIdx.x;
}
// The steps of a key block: every visited tile of every query head of its K/V head hk.
__device__ __forceinline__ int fk_steps(int b, int hk, int group, const int* __restrict__ count, int Bm, int Hm) {
    if (Hm == 1) return group * count[fk_row(b, 0, Bm, Hm)];  // one list for the group: the common case
    int n = 0;
    for (int g = 0; g < group; ++g) n += count[fk_row(b, hk * group + g, Bm, Hm)];
    return n;
}
// Step `step` of the key block: its query head h, and where its entry is in fk_index.
__device__ __forceinline__ int fk_where(int step, int b, int hk, int group, const int* __restrict__ start,
                                        const int* __restrict__ count, int Bm, int Hm, int& h) {
    if (Hm == 1) {
        const int row = fk_row(b, 0, Bm, Hm), n = count[row];
        h = hk * group + step / n;
        return start[row] + step % n;
    }
    int hh = hk * group, row = fk_row(b, hh, Bm, Hm);
    while (step >= count[row]) step -= count[row], ++hh, row = fk_row(b, hh, Bm, Hm);
    h = hh;
    return start[row] + step;
}
#define FK_STEPS(n) ((void)(n), fk_steps(b, hk, group, fk_count, fk_Bm, fk_Hm))
#define FK_STEP(step, h, i0) \
    const int fk_at = fk_where(step, b, hk, group, fk_start, fk_count, fk_Bm, fk_Hm, h); \
    (void)fk_at; \
    (i0) = (fk_index[fk_at] >> 1) * BR
#define FK_FULL(step, full) ((full) && !(fk_index[fk_at] & 1))
#if FK_HAS_BITS
#define FK_BITS_AT (fk_bits_at[fk_at])
#else
#define FK_BITS_AT (-1)
#endif
#define FK_KEEP(i, j, step, in) \
    fk_keep(fk_index[fk_at], FK_BITS_AT, fk_bits, (i) - i0, (j) - j0, b, h, i, j, Nq, in, fk_err FKM_ARGS)
// The lse check's count of the keys a lse = -inf row sees (bwd_check.cuh, FK_LSE_COUNTS): on the tiles that
// are summed, such a row's visible P is written -0 (a 0 for dV and dS all the same) and counted by its sign.
#define FK_P(p, x, l2) ((((i0 / BR) % lse_every == 0) && (l2) == INFINITY && (x) != -INFINITY) ? -0.f : (p))
#define FK_PSUM(p) ((p) + (float)(__float_as_uint(p) >> 31))

// Whether score (i, j) of a visited tile stays: `in` (the window's verdict), and where the tile is PARTIAL
// for the mods, the bit mask or the mask_mod (as the forward's fk_keep: no branch per score; only a score in
// the window of a real row may report an error).
""" + flash_mods.KEEP_FUNCTION)
    if score is not None:
        cap = flash_mods.softcap_of(score)
        if cap:  # the library's softcap: one tanh for f and f', the cap in the softmax's scale (flash_mods.softcap_of)
            parts.append(f"#define FK_CAP {modlang._float_literal(cap)}\n#define FK_INV_CAP {modlang._float_literal(1 / cap)}\n"
                         "#define FK_MOD(raw, y, fd, err) { const float fk_t = fk_tanh((raw) * FK_INV_CAP); "
                         "(y) = fk_t; (fd) = 1.f - fk_t * fk_t; }\n#define FK_SOFTCAP 1")
        else:
            parts.append("#define FK_MOD(raw, y, fd, err) { (y) = fks_score_mod(raw, b, h, i, j, err FKS_ARGS); "
                         "(fd) = fkd_score_grad(raw, b, h, i, j, err FKD_ARGS); }\n#define FK_SOFTCAP 0")
        parts.append(r"""
// score_mod on S^T in registers (element (n, e): key jw + g + 8 (e >> 1), query i0 + 8n + 2t + (e & 1)), in
// natural units: S' = f(s), s = q . k * scale; and f'(s) into fd for dS. P = exp2(S' log2 e - lse log2 e), so
// the kernel's scale_log2 is log2 e. In a FULL tile every score is visible (a uniform branch, no select);
// else a hidden score (-inf) stays hidden and reports nothing. Padding rows (i >= Nq) report nothing.
// With the library's softcap (FK_SOFTCAP) S' is tanh(s / cap) and the scale cap log2 e: P the same, one tanh a
// score for f and f' = 1 - tanh^2 (the generic hooks divided by the cap and ran tanh twice).
#if FK_SOFTCAP
#define FK_SCALE_LOG2 (LOG2E * FK_CAP)
#else
#define FK_SCALE_LOG2 LOG2E
#endif
#define FK_SCORES(s, i0, h, full)                                                                        \
    float fk_fd[BR / 8][4];                                                                               \
    if (full) fk_scores<true>(s, fk_fd, i0, j0 + wk, b, h, Nq, scale, fk_err FKS_ARGS FKD_ARGS);         \
    else fk_scores<false>(s, fk_fd, i0, j0 + wk, b, h, Nq, scale, fk_err FKS_ARGS FKD_ARGS)
template <bool FULL, int N_>
__device__ __forceinline__ void fk_scores(float (&s)[N_][4], float (&fd)[N_][4], int i0, int jw, int b, int h,
                                          int Nq, float scale, int* fk_err FKS_PARAMS FKD_PARAMS) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int n = 0; n < N_; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = i0 + 8 * n + 2 * t + (e & 1), j = jw + g + 8 * (e >> 1);
            const float x = s[n][e], raw = x * scale;
            const bool keep = FULL || x != -INFINITY;
            int* err = keep && i < Nq ? fk_err : nullptr;
            float y;
            FK_MOD(raw, y, fd[n][e], err);
            s[n][e] = keep ? y : -INFINITY;
        }
}
// dS (w.r.t. the raw score) = P (dP - D) f'(s); where that is 0 (P = 0) it stays 0 whatever f' is there.
#define FK_DS(s) fk_times(s, fk_fd)
template <int N_>
__device__ __forceinline__ void fk_times(float (&s)[N_][4], const float (&fd)[N_][4]) {
#pragma unroll
    for (int n = 0; n < N_; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = s[n][e] != 0.f ? s[n][e] * fd[n][e] : 0.f;
}
// Once per block: a NaN or +inf score (P not finite) leaves dV_j not finite, a non-finite derivative dK_j;
// the first such key is reported (the host names it), at no cost per score.
#define FK_DONE(dk, dv) fk_done(dk, dv, j0 + wk, b, hk, Nk, fk_err)
template <int N_>
__device__ __forceinline__ void fk_done(const float (&dk)[N_][4], const float (&dv)[N_][4], int jw, int b, int hk,
                                        int Nk, int* fk_err) {
    const int g = (threadIdx.x & 31) >> 2;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = jw + g + 8 * r;
        bool bad_v = false, bad_k = false;
#pragma unroll
        for (int n = 0; n < N_; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                bad_v |= !(fabsf(dv[n][2 * r + c]) < INFINITY);
                bad_k |= !(fabsf(dk[n][2 * r + c]) < INFINITY);
            }
        if (j < Nk && (bad_v || bad_k)) {
            const fk_pos p{fk_err, b, hk, -1, j};
            fk_fail(p, bad_v ? 1 : 2, 0);
        }
    }
}
""")
    else:
        parts.append("#define FK_SCALE_LOG2 (scale * LOG2E)\n#define FK_SCORES(s, i0, h, full)\n#define FK_DS(s)\n"
                     "#define FK_DONE(dk, dv)")
    return "\n".join(parts) + "\n// ==== backward rung 2 ====\n"


@functools.cache
def _rung_source() -> str:
    return (flash.KERNEL_DIR / gpu_backward.rung_of(RUNG).source).read_text()


def _codes(problem_or_mods):
    """(score, grad, mask) DeviceCode of a call's mods (None where absent)."""
    score_mod, mask_mod = problem_or_mods
    score = modlang.translate("score_mod", score_mod) if score_mod is not None else None
    grad = modlang.translate_derivative(score_mod) if score_mod is not None else None
    mask = modlang.translate("mask_mod", mask_mod) if mask_mod is not None else None
    return score, grad, mask


def source(score_mod=None, mask_mod=None, bits: bool = False) -> str:
    """The whole CUDA source backward rung 2 compiles for these mods (what a notebook shows)."""
    score, grad, mask = _codes((score_mod, mask_mod))
    return prelude(score, grad, mask, bits) + _rung_source()


def _kernels(score, grad, mask, bits, d, element, Br, Bc):
    """The rung's kernels by role (preprocess, main, check, convert), compiled for these mods (cached)."""
    spec = gpu_backward.rung_of(RUNG)
    text = prelude(score, grad, mask, bits) + _rung_source()
    module = flash_mods._module(text, flash.build_options(d, element, Br, Bc, arch=spec.arch))
    fns = {k.role: module.get_function(k.name) for k in spec.kernels}
    for k in spec.kernels:
        nbytes = 0 if k.smem is None else k.smem(d, Br, Bc)
        if nbytes > 48 * 1024:
            fns[k.role].max_dynamic_shared_size_bytes = nbytes
    return fns


# ---------------------------------------------------------------------------------------------
# Tiles: key-block-major lists
# ---------------------------------------------------------------------------------------------
def key_major_lists(window_states, mod_states=None, bits_offsets=None):
    """flash_mods.tile_lists on the states with the q and k axes swapped: (start, count (Bm, Hm, Tc), index,
    bits_at) where row (b, h, j)'s entries are the query tiles i key block j visits, entry = 2 i + partial.
    window_states (Tr, Tc); mod_states, bits_offsets (Bm, Hm, Tr, Tc) as the forward's."""
    def swap(a):  # (..., Tr, Tc) -> (..., Tc, Tr): rows of key tiles
        return None if a is None else np.ascontiguousarray(np.swapaxes(a, -1, -2))

    return flash_mods.tile_lists(swap(window_states), swap(mod_states), None, swap(bits_offsets))


def blocks(problem):
    """(Br, Bc) of backward rung 2 for this call: its default for d with a block mask (the mask's tiles are
    regridded to them), else the problem's block size if forced, else the default."""
    size = None if problem.block_mask is not None else problem.block_size
    return gpu_backward.blocks_for(RUNG, problem.d, size)


def _lists(problem, Br, Bc, fp=None):
    """(start, count, index, bits_at, bits or None) on the GPU, kept for the next call with the same block
    mask (or mask_mod and captured values), window, shapes and tiles (flash_mods' cache, its own key)."""
    import cupy

    def make():
        window_states = masks.block_map(problem.Nq, problem.Nk, Br, Bc, problem.window)
        mod = flash_mods._mask_mod_tiles(problem, Br, Bc, fp)
        words = Br * (Bc // 32)
        partial = np.flatnonzero(mod == PARTIAL) if mod is not None else np.zeros(0, np.int64)
        # bits hold the mask_mod of the planes it was classified for (as in the forward)
        reads_b, reads_h = blockmask.reads_batch_head(problem.mask_mod) if mod is not None else (False, False)
        planes_fit = mod is not None and (not reads_b or mod.shape[0] == problem.B) and (
            not reads_h or mod.shape[1] == problem.Hq)
        fits = partial.size * words * 4 <= flash_mods._bits_budget(problem) and partial.size * words < 1 << 31
        use_bits = flash_mods.MOD_BITS and planes_fit and 0 < partial.size and fits
        offsets = None
        if use_bits:
            offsets = np.full(mod.size, -1, np.int64)
            offsets[partial] = np.arange(partial.size) * words
            offsets = offsets.reshape(mod.shape)
        start, count, index, bits_at = key_major_lists(window_states, mod, offsets)
        bits = None
        if use_bits:  # the forward's packer: tiles in (Bm, Hm, Tr, Tc) order, Br rows of Bc / 32 words each
            mask = modlang.translate("mask_mod", problem.mask_mod)
            bits = cupy.empty(partial.size * words, cupy.uint32)
            err = cupy.zeros(8, cupy.int32)
            i32 = np.int32
            flash_mods._classifier(mask).get_function("fk_mod_pack")(
                (int(partial.size),), (min(256, words),),
                (cupy.asarray(partial.astype(np.int32)), bits, i32(mod.shape[1]), i32(problem.Nq), i32(problem.Nk),
                 i32(Br), i32(Bc), i32(mod.shape[2]), i32(mod.shape[3]), err) + flash_mods._arrays(mask, fp))
            flash_mods._check_errors(err, None, mask)
        return (cupy.asarray(start), cupy.asarray(count), cupy.asarray(index if index.size else np.zeros(1, np.int32)),
                cupy.asarray(bits_at) if use_bits else cupy.full(1, -1, cupy.int32), bits)

    return flash_mods._cached("backward lists", problem, Br, Bc, make, fp)


def _bool_mask_lists(problem, Br, Bc, fp=None):
    """(start, count, index, bits_at, bits) on the GPU of a call with a bool mask= (Bm, Hm, Nq, Nk): the forward's
    GPU pipeline (flash_mods.bool_mask_bits: every tile classified in one pass over the mask, the PARTIAL ones
    packed into bits, Br rows of Bc / 32 words, the layout fk_keep reads), then fk_lists on the
    tile grids transposed, so its rows are key blocks and its entries 2 i + partial: the key-block-major lists
    this rung walks. Nothing of size Nq x Nk is made; the host reads one number (how many tiles are PARTIAL).
    Made in every call, as the forward's: the mask's contents may change between calls."""
    import cupy

    Bm, Hm, Nq, Nk = problem.mask.shape
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    mod, states, slot_of, bits, _ = flash_mods.bool_mask_bits(problem, Br, Bc)
    words = Br * (Bc // 32)
    i32 = np.int32
    base = flash_mods._base_codes(problem, Br, Bc, fp)  # the window's and the mask_mod's states, (Bb, Hb, Tr, Tc)
    Bb, Hb = base.shape[:2]

    def key_major(a, planes):  # (planes..., Tr, Tc) -> (planes..., Tc, Tr)
        return cupy.ascontiguousarray(a.reshape(planes + (Tr, Tc)).swapaxes(-1, -2))

    Bl, Hl = max(Bb, Bm), max(Hb, Hm)
    rows = Bl * Hl * Tc
    if rows * Tr >= 1 << 31:
        raise ValueError(f"mask: {rows * Tr} tiles are more than the kernel's int32 tile lists hold")
    start, count, cost = (cupy.empty((Bl, Hl, Tc), cupy.int32) for _ in range(3))
    index, bits_at = cupy.empty(rows * Tr, cupy.int32), cupy.empty(rows * Tr, cupy.int32)
    # fk_lists with the roles of Tr and Tc swapped: a row per (b, h, key block j), entries 2 i + partial
    mod.get_function("fk_lists")((-(-rows // 4),), (128,), (key_major(base, (Bb, Hb)), i32(Bb), i32(Hb),
                                                           key_major(states, (Bm, Hm)), key_major(slot_of, (Bm, Hm)),
                                                           i32(Bm), i32(Hm), i32(Bl), i32(Hl), i32(Tc), i32(Tr),
                                                           i32(words), i32(flash_mods.PARTIAL_COST_BITS),
                                                           start, count, index, bits_at, cost))
    return start, count, index, bits_at, bits


def visited_tiles(problem) -> dict:
    """How many (b, h) x query-block x key-block tiles the backward visits, and of how many (benchmarks)."""
    Br, Bc = blocks(problem)
    window_states = masks.block_map(problem.Nq, problem.Nk, Br, Bc, problem.window)
    _, count, _, _ = key_major_lists(window_states, flash_mods._mask_mod_tiles(problem, Br, Bc))
    per_plane = int(np.broadcast_to(count, (problem.B, problem.Hq) + count.shape[2:]).sum())
    return {"visited": per_plane, "total": problem.B * problem.Hq * window_states.size, "block": (Br, Bc)}


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def _check_errors(err, score, grad, mask, problem, lse_check=None):
    """Raise what the kernel's error word holds (one 32-byte copy, a host sync), as the forward does."""
    e = err.get()
    code = int(e[0])
    if code == 0:
        return
    b, h, q, kv = (int(x) for x in e[1:5])
    if code in (modlang.NONFINITE, GRAD_NONFINITE):
        # a lse from elsewhere can make P overflow too: its own, clearer message first
        message = None if lse_check is None else lse_check.error()
        if message is not None and "sums to nan" not in message:  # (a NaN score makes the sum NaN too)
            raise ValueError(message)
        name = blockmask.describe(score.fn) if score is not None else "?"
        if code == modlang.NONFINITE:
            raise ValueError(f"score_mod {name} returned NaN or +inf for a score of key kv_idx={kv} (b={b}, K/V head "
                             f"{h}): the gradient dV there is not finite; a score_mod must return a finite score, or "
                             "-inf to hide it")
        raise ValueError(f"the derivative of score_mod {name} with respect to the score is not finite at some visible "
                         f"score of key kv_idx={kv} (b={b}, K/V head {h}): a sqrt or log at 0, a division by zero? "
                         "Make it finite where the score is visible")
    value = (int(e[6]) << 32) | (int(e[5]) & 0xffffffff)
    where = f"b={b}, h={h}, q_idx={q}, kv_idx={kv}"
    for dc, label in ((score, None), (grad, "the derivative of "), (mask, None)):
        if dc is not None and code in dc.sites:
            site = dc.sites[code]
            kind = "score_mod" if dc.kind == "score_grad" else dc.kind
            head = f"{label or ''}{kind} {blockmask.describe(dc.fn)}"
            inner = "" if site.fn is dc.fn else f" (in {blockmask.describe(site.fn)})"
            if site.what == "lookup":
                raise IndexError(f"{head}{inner}, line {site.line} `{site.text}`: index {value} is out of bounds "
                                 f"for a dimension of length {site.size}, at {where}")
            raise ZeroDivisionError(f"{head}{inner}, line {site.line} `{site.text}`: division by zero at {where}")
    raise RuntimeError(f"internal: the backward kernel reported error code {code} at {where}")


# ---------------------------------------------------------------------------------------------
# The call
# ---------------------------------------------------------------------------------------------
def prepare(problem, check: Optional[gpu_backward.LseCheck] = None, grads=None):
    """(launch, finish, dQ, dK, dV) of a backward Problem with a score_mod, mask_mod and/or block_mask:
    everything but the launches and the error check, so a benchmark can time the kernels alone (launch).
    `grads`: (dQ, dK, dV) arrays to write into (tests poison them first)."""
    import cupy

    spec = gpu_backward.rung_of(RUNG)
    element = problem.element or gpu_backward.ELEMENTS.get(problem.Q.dtype.name)
    if element not in spec.elements:
        raise TypeError(f"{RUNG} computes {', '.join(spec.dtypes)}; got {problem.dtype_name}")
    Br, Bc = blocks(problem)
    B, Hq, Hkv, Nq, Nk, d = problem.B, problem.Hq, problem.Hkv, problem.Nq, problem.Nk, problem.d
    score, grad, mask = _codes((problem.score_mod, problem.mask_mod))
    fp = flash_mods.mask_fingerprint(problem)
    if problem.mask is not None:  # a bool mask=: its PARTIAL tiles as bits; a mask_mod beside it runs in the kernel
        start_d, count_d, index_d, bits_at_d, bits = _bool_mask_lists(problem, Br, Bc, fp)
        has_bits = True
    else:
        start_d, count_d, index_d, bits_at_d, bits = _lists(problem, Br, Bc, fp)
        if bits is not None:  # the mask_mod's PARTIAL tiles are bits: the kernel needs no mask_mod
            mask = None
        else:
            bits = flash_mods._NO_BITS.get("bits")
            if bits is None:
                bits = flash_mods._NO_BITS["bits"] = cupy.zeros(1, cupy.uint32)
        has_bits = mask is None and problem.mask_mod is not None
    fns = _kernels(score, grad, mask, has_bits, d, element, Br, Bc)
    Bm, Hm, _ = count_d.shape

    Q, K, V, O, dO, lse = problem.Q, problem.K, problem.V, problem.O, problem.dO, problem.lse
    dQ, dK, dV = problem.new_grads() if grads is None else grads  # (NaN first when tests poison outputs)
    left, right = (int(w) for w in problem.window)
    i32, f32, i64, u64 = np.int32, np.float32, np.int64, np.uint64
    rows = B * Hq * Nq
    Dvec = cupy.empty((B, Hq, Nq), cupy.float32)  # D = rowsum(dO * O)
    acc = cupy.empty(Q.shape, cupy.float32)  # dQ's fp32 atomics target, zeroed by the preprocessing kernel
    Psum = cupy.empty((B, Hq, Nq), cupy.float32)  # the lse check's row sums (counts for lse = -inf rows)
    err = cupy.zeros(8, cupy.int32)
    q_tiles = -(-Nq // Br)
    every = max(1, -(-q_tiles // gpu_backward.LSE_TILES))  # sum P on 1 query tile in `every`
    dims = (i32(Hq), i32(Hkv), i32(Nq), i32(Nk), f32(problem.scale), i32(left), i32(right))
    report = (u64(0), i64(0)) if check is None else (check.address, i64(check.serial))
    tpr = d // 8  # preprocessing: threads per row (16 bytes each)
    smem = spec.kernel("main").smem(d, Br, Bc)
    main_args = ((Q, K, V, dO, lse, Dvec, acc, dK, dV, Psum) + dims + (i32(every),)
                 + (err, start_d, count_d, index_d, bits_at_d, bits, i32(Bm), i32(Hm))
                 + flash_mods._arrays(score) + flash_mods._arrays(grad) + flash_mods._arrays(mask, fp))

    def launch():
        err.fill(0)
        fns["preprocess"]((-(-rows * tpr // 256),), (256,), (O, dO, Dvec, acc, Psum, i64(rows)))
        fns["main"]((-(-Nk // Bc), Hkv, B), (spec.threads(Br, Bc),), main_args, shared_mem=smem)
        if check is not None:  # before the conversion: the host's wait for the check ends while it runs
            fns["check"]((-(-rows // 256),), (256,), (Psum, lse, i64(rows), i32(Nq), i32(Nk), i32(left), i32(right),
                                                      f32(gpu_backward.LSE_TOLERANCE), i32(Br), i32(every)) + report)
            check.record()
        fns["convert"]((-(-Q.size // (8 * 256)),), (256,), (acc, dQ, i64(Q.size), f32(problem.scale)))

    def finish():
        _check_errors(err, score, grad, mask, problem, check)

    return launch, finish, dQ, dK, dV


def run_problem(problem, grads=None):
    """The registry's backward runner for a Problem with mods (flashkit.gpu.backward.run_problem hands it
    over): (dQ, dK, dV). The lse check joins the Problem's `pending` list, as the plain rung's does."""
    check = gpu_backward.LseCheck(problem.Q.shape[:3])
    launch, finish, dQ, dK, dV = prepare(problem, check, grads)
    launch()
    finish()
    gpu_backward.report(problem, check)
    return dQ, dK, dV


__all__ = ["prelude", "source", "key_major_lists", "blocks", "prepare", "run_problem", "visited_tiles"]
