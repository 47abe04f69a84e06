"""Rung 1, cupy-standard: standard attention on the GPU with CuPy, S and P materialised.

    S = Q K^T * scale        (B, Hkv, group*Nq, Nk), one cuBLAS batched GEMM
    P = softmax(S)           in place of S: rowmax, exp, rowsum (three passes over Nq x Nk per head)
    O = P V / l              a second GEMM

What it teaches: this is what FlashAttention avoids. Its extra memory is one Nq x Nk float32 matrix per
query head (4 B H Nq Nk bytes: 17 GiB at B=1, H=16, N=16384), and S and P cross HBM several times.
float16/bfloat16 input is computed in float32 (the tiled kernels also accumulate in float32) and the
output cast back; float64 input is computed in float64, which makes this the on-device oracle.

Its backward (standard_backward) is the derivation everyone does first, on the GPU: P recomputed from the
forward's lse and dP = dO V^T materialised, dS = P * (dP - D). The tiled backward rungs take no bool mask=
and no float64, so this is the GPU backward that does.
"""
from __future__ import annotations

from dataclasses import replace

from flashkit.masks import row_bounds


def visibility(problem, xp):
    """Bool (Nq, Nk) picture of the causal / sliding window (bottom-right aligned), or None if all visible.

    The rule is flashkit.masks.row_bounds, the one every backend uses: each row's visible keys [lo, hi),
    computed on the host (O(Nq)) and compared with the key index on the device."""
    if not problem.has_window:
        return None
    lo, hi = row_bounds(problem.Nq, problem.Nk, problem.window)  # (Nq,) int64 each, NumPy
    j = xp.arange(problem.Nk)[None, :]
    return (j >= xp.asarray(lo)[:, None]) & (j < xp.asarray(hi)[:, None])


def attention_arrays(problem, compute_dtype):
    """(O, lse) in `compute_dtype` (float32 or float64), O not yet cast to the input dtype."""
    import cupy as xp

    B, Hkv, g, Nq, Nk, d = problem.B, problem.Hkv, problem.group, problem.Nq, problem.Nk, problem.d
    # Query heads that share a K/V head become extra rows: one GEMM per (b, hkv), no broadcasting.
    Q = problem.Q.astype(compute_dtype, copy=False).reshape(B, Hkv, g * Nq, d)  # (B, Hkv, g*Nq, d)
    K = problem.K.astype(compute_dtype, copy=False)  # (B, Hkv, Nk, d)
    V = problem.V.astype(compute_dtype, copy=False)  # (B, Hkv, Nk, d)

    # S = Q K^T * scale
    S = xp.matmul(Q, K.transpose(0, 1, 3, 2))  # (B, Hkv, g*Nq, Nk)
    S *= compute_dtype(problem.scale)
    S5 = S.reshape(B, Hkv, g, Nq, Nk)  # a view: (B, Hkv, group, Nq, Nk)
    vis = visibility(problem, xp)
    if problem.mask is not None:
        m = problem.mask  # (Bm, Hm, Nq, Nk), Hm in {1, Hq}
        Bm, Hm = m.shape[:2]
        m5 = m.reshape(Bm, Hkv, g, Nq, Nk) if Hm > 1 else m[:, :, None]  # (Bm, Hkv|1, g|1, Nq, Nk)
        vis = m5 if vis is None else (m5 & vis)
    if vis is not None:
        xp.copyto(S5, compute_dtype(-xp.inf), where=~vis)

    # P = exp(S - rowmax(S)), in place; a row with no visible key stays all -inf and gives l = 0
    m = S.max(axis=-1)  # (B, Hkv, g*Nq)
    m_safe = xp.where(xp.isneginf(m), 0, m).astype(compute_dtype)
    S -= m_safe[..., None]
    P = xp.exp(S, out=S)
    l = P.sum(axis=-1)  # (B, Hkv, g*Nq)

    # O = P V / l
    O = xp.matmul(P, V)  # (B, Hkv, g*Nq, d)
    seen = l > 0
    O /= xp.where(seen, l, 1)[..., None]
    lse = xp.where(seen, m_safe + xp.log(xp.where(seen, l, 1)), -xp.inf)
    return O.reshape(B, Hkv * g, Nq, d), lse.reshape(B, Hkv * g, Nq)


def bf16_bits_to_float32(bits):
    """bfloat16 bits (uint16) as float32: a bfloat16 is the top half of a float32."""
    import cupy

    return (bits.astype(cupy.uint32) << 16).view(cupy.float32)


def float32_to_bf16_bits(x):
    """float32 rounded to the nearest bfloat16 (ties to even), as uint16 bits; NaN stays NaN."""
    import cupy

    u = x.view(cupy.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cupy.uint16)
    return cupy.where(cupy.isnan(x), cupy.uint16(0x7FC0), rounded)


def standard_attention(problem):
    """cupy-standard: (O in the input dtype, lse float32; float64 input gives float64 O and lse)."""
    import cupy

    if problem.element == "bf16":  # bits in, float32 arithmetic, bits out
        as32 = replace(problem, Q=bf16_bits_to_float32(problem.Q), K=bf16_bits_to_float32(problem.K),
                       V=bf16_bits_to_float32(problem.V), element=None)
        O, lse = attention_arrays(as32, cupy.float32)
        return float32_to_bf16_bits(cupy.ascontiguousarray(O)), lse.astype(cupy.float32, copy=False)
    ct = cupy.float64 if problem.dtype == cupy.float64 else cupy.float32
    O, lse = attention_arrays(problem, ct)
    if ct is cupy.float64:
        return O, lse
    return O.astype(problem.dtype, copy=False), lse.astype(cupy.float32, copy=False)


def standard_backward(problem):
    """cupy-standard's backward: (dQ, dK, dV) with P and dP materialised, flashkit/reference.py's
    standard_backward on the GPU (dV = P^T dO, dP = dO V^T, dS = P * (dP - D), dQ = dS K * scale,
    dK = dS^T Q * scale, P = exp(S - lse) recomputed from the forward's lse). Its extra memory is two
    Nq x Nk matrices per query head (P, and dP turned into dS in place), the O(N^2) baseline the backward
    rungs avoid; and the GPU backward that takes a bool mask= and float64. Computed in float32 for
    16-bit input (bf16 as bits), float64 for float64; GQA's dK and dV summed over each group."""
    import cupy as xp

    from flashkit import validate

    bf16 = problem.element == "bf16"
    ct = xp.float64 if problem.dtype == xp.float64 else xp.float32

    def computed(x):
        return bf16_bits_to_float32(x) if bf16 else x.astype(ct, copy=False)

    B, Hkv, g, Nq, Nk, d = problem.B, problem.Hkv, problem.group, problem.Nq, problem.Nk, problem.d
    # query heads of one K/V head side by side (axis 2), as in the forward: one batched GEMM per (b, hkv)
    Q5 = computed(problem.Q).reshape(B, Hkv, g, Nq, d)
    dO5 = computed(problem.dO).reshape(B, Hkv, g, Nq, d)
    O5 = computed(problem.O).reshape(B, Hkv, g, Nq, d)
    K4, V4 = computed(problem.K)[:, :, None], computed(problem.V)[:, :, None]  # (B, Hkv, 1, Nk, d)
    lse = problem.lse.astype(ct).reshape(B, Hkv, g, Nq)

    # S = Q K^T * scale;  P = exp(S - lse), 0 where hidden or where the row saw no key (lse = -inf)
    S = xp.matmul(Q5, K4.transpose(0, 1, 2, 4, 3))  # (B, Hkv, group, Nq, Nk)
    S *= ct(problem.scale)
    vis = visibility(problem, xp)  # (Nq, Nk) or None
    if problem.mask is not None:
        m = problem.mask  # (Bm, Hm, Nq, Nk), Hm in {1, Hq}
        Bm, Hm = m.shape[:2]
        m5 = m.reshape(Bm, Hkv, g, Nq, Nk) if Hm > 1 else m[:, :, None]
        vis = m5 if vis is None else (m5 & vis)
    empty = xp.isneginf(lse)
    S -= xp.where(empty, 0, lse)[..., None]
    P = xp.exp(S, out=S)
    if vis is not None:
        P *= vis  # hidden scores: P = 0 (a bool factor: exact)
    P *= ~empty[..., None]
    # the lse check: every row of P sums to 1 (a row with lse = -inf must see no key)
    seen = xp.broadcast_to(vis, P.shape).sum(axis=-1) if vis is not None else xp.full(empty.shape, Nk)
    psum = xp.where(empty, seen, P.sum(axis=-1))
    tolerance_dtype = xp.float64 if ct == xp.float64 else xp.float32
    validate.check_lse_rowsums(xp.asnumpy(psum).reshape(B, Hkv * g, Nq), xp.asnumpy(problem.lse), tolerance_dtype)

    dV = xp.matmul(P.transpose(0, 1, 2, 4, 3), dO5).sum(axis=2)  # (B, Hkv, Nk, d): summed over the group
    dS = xp.matmul(dO5, V4.transpose(0, 1, 2, 4, 3))  # dP = dO V^T, then in place dS = P * (dP - D)
    dS -= (dO5 * O5).sum(axis=-1)[..., None]  # D = rowsum(dO * O)
    dS *= P
    del P
    dQ = xp.matmul(dS, K4).reshape(B, Hkv * g, Nq, d)
    dQ *= ct(problem.scale)
    dK = xp.matmul(dS.transpose(0, 1, 2, 4, 3), Q5).sum(axis=2)
    dK *= ct(problem.scale)

    out = problem.new_grads()  # (poisoned first by the tests)
    for dst, src in zip(out, (dQ, dK, dV)):
        dst[...] = float32_to_bf16_bits(xp.ascontiguousarray(src, dtype=xp.float32)) if bf16 else src.astype(dst.dtype)
    return out
