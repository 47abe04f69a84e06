"""Standard attention in NumPy: S = Q K^T * scale, P = softmax(S), O = P V, with S and P materialised.

This is the baseline every other backend is measured against (backend "numpy-standard"), and run in
float64 it is the oracle of the tests (`reference`). Its memory is O(N^2): one Nq x Nk score matrix
per head, which is exactly what FlashAttention avoids.

FlexAttention's hooks (flashkit/mods.py) are applied here by their definition, on the whole score
matrix: masked scores -inf, then mask_mod, then score_mod on what is left, then the softmax.
"""
from __future__ import annotations

import functools

import numpy as np

from flashkit import blockmask, validate
from flashkit.blockmask import apply_mods, index_grid
from flashkit.cpu.threads import blas_for_work
from flashkit.masks import dense_mask
from flashkit.registry import Backend

BACKENDS = (
    Backend(
        name="numpy-standard",
        device="cpu",
        summary="NumPy, materialises S and P (Nq x Nk per head): the O(N^2)-memory baseline",
        runner="flashkit.reference:standard_attention",
        backward="flashkit.reference:standard_backward",
        mods=True,
        backward_mods=True,
        priority=10,
        # Up to 2^27 FLOPs (N = 512 with one head, or N = 256 with eight, d = 64) one BLAS call per product
        # beats a kernel's fixed cost: measured on 2 idle cores after NumPy's products got one BLAS thread
        # each and the top CPU rung became rung 4, benchmarks/cpu_small.py (results/cpu-small-*.json).
        auto_max_flops=2.0**27,
    ),
)


def visibility(problem):
    """Bool array broadcastable to (B, Hkv, group, Nq, Nk): True where a query may attend to a key,
    or None when every key is visible."""
    vis = None
    if problem.has_window:
        vis = dense_mask(problem.Nq, problem.Nk, problem.window)  # (Nq, Nk)
    if problem.mask is not None:
        m = problem.mask  # (Bm, Hm, Nq, Nk), Hm in {1, Hq}
        Bm, Hm = m.shape[:2]
        m5 = m.reshape(Bm, problem.Hkv, problem.group, problem.Nq, problem.Nk) if Hm > 1 else m[:, :, None]
        vis = m5 if vis is None else (m5 & vis)
    return vis


def modified_scores(S, problem):
    """S (B, Hkv, group, Nq, Nk) with mask_mod and score_mod applied over the whole grid of positions:
    b, h (the query head), q_idx and kv_idx as broadcasting index arrays (flashkit.blockmask.evaluate)."""
    B, Hq, Nq, Nk = problem.B, problem.Hq, problem.Nq, problem.Nk
    S4 = S.reshape(B, Hq, Nq, Nk)  # query head h = hk * group + g, the order of Q's heads
    out = apply_mods(S4, problem.score_mod, problem.mask_mod, *index_grid(np.arange(B), np.arange(Hq), 0, Nq, 0, Nk))
    return np.ascontiguousarray(out).reshape(S.shape)


def _small_calls_on_one_blas_thread(fn):
    """Run fn(problem) with NumPy's BLAS on one thread when each of its products is small
    (flashkit/cpu/threads.py: a 2-thread BLAS pool made a 0.03 ms product take 12-16 ms on a busy 2-core
    machine). The size that counts is one product's, not the whole call's: np.matmul calls BLAS once per
    (batch, head) matrix, and each call is a parallel region that waits for its slowest thread. Judged
    by the whole call, N=512 with 4 heads went to every thread and took 196 ms instead of 18 ms while
    other work kept the cores busy (2 cores, load average 9, measured)."""
    @functools.wraps(fn)
    def wrapper(problem):
        with blas_for_work(problem.flops() / (2 * problem.B * problem.Hq)):  # S = QK^T or PV of one head
            return fn(problem)
    return wrapper


@_small_calls_on_one_blas_thread
def standard_attention(problem):
    """(O, lse) of `problem`, computed in the dtype of its arrays by materialising S and P."""
    B, Hkv, g, Nq, d = problem.B, problem.Hkv, problem.group, problem.Nq, problem.d
    Q5 = problem.Q.reshape(B, Hkv, g, Nq, d)  # (B, Hkv, group, Nq, d): query heads grouped by K/V head
    Kt = problem.K.transpose(0, 1, 3, 2)[:, :, None]  # (B, Hkv, 1, d, Nk)
    V5 = problem.V[:, :, None]  # (B, Hkv, 1, Nk, d)

    # S = Q K^T * scale  (the Nq x Nk matrix, per head)
    S = Q5 @ Kt  # (B, Hkv, group, Nq, Nk)
    S *= problem.scale
    vis = visibility(problem)
    if vis is not None:
        np.copyto(S, -np.inf, where=~vis)
    if problem.has_mods:
        S = modified_scores(S, problem)
    # P = exp(S - rowmax(S)), computed in place of S: the max keeps every exp() <= 1
    m = S.max(axis=-1)  # (B, Hkv, group, Nq)
    m_safe = np.where(np.isneginf(m), 0.0, m).astype(S.dtype)  # a row with no visible key stays all -inf
    S -= m_safe[..., None]
    P = np.exp(S, out=S)
    l = P.sum(axis=-1)
    # O = P V / l
    O = P @ V5  # (B, Hkv, group, Nq, d)
    seen = l > 0
    O /= np.where(seen, l, 1.0)[..., None]
    with np.errstate(divide="ignore"):
        lse = np.where(seen, m_safe + np.log(np.where(seen, l, 1.0)), -np.inf).astype(S.dtype)
    return O.reshape(B, Hkv * g, Nq, d), lse.reshape(B, Hkv * g, Nq)


@_small_calls_on_one_blas_thread
def standard_backward(problem):
    """(dQ, dK, dV) of `problem` (from validate.check_backward) with P and dP materialised.

    The derivation everyone does first. With S = Q K^T * scale, P = softmax(S), O = P V and the
    incoming gradient dO:
        dV = P^T dO                          (O is linear in V)
        dP = dO V^T                          (and in P)
        dS = P * (dP - D),  D = rowsum(dO * O) = rowsum(P * dP)   (the softmax's Jacobian, row by row)
        dQ = dS K * scale,  dK = dS^T Q * scale
    P is recomputed from the forward's lse, P = exp(S - lse), exactly as FlashAttention does, so the
    backward needs the forward's O and lse but not its P. With GQA, dK and dV sum over the query heads
    that share a K/V head.
    """
    B, Hkv, g, Nq, d = problem.B, problem.Hkv, problem.group, problem.Nq, problem.d
    Q5 = problem.Q.reshape(B, Hkv, g, Nq, d)  # (B, Hkv, group, Nq, d)
    dO5 = problem.dO.reshape(B, Hkv, g, Nq, d)
    O5 = problem.O.reshape(B, Hkv, g, Nq, d)
    lse = problem.lse.reshape(B, Hkv, g, Nq).astype(problem.dtype)  # (B, Hkv, group, Nq)
    K4, V4 = problem.K[:, :, None], problem.V[:, :, None]  # (B, Hkv, 1, Nk, d)

    # S = Q K^T * scale, masked scores -inf
    S = (Q5 @ K4.transpose(0, 1, 2, 4, 3)) * problem.scale  # (B, Hkv, group, Nq, Nk)
    vis = visibility(problem)
    if vis is not None:
        np.copyto(S, -np.inf, where=~vis)
    S_raw = S
    if problem.has_mods:  # the scores the softmax saw: mask_mod and score_mod applied, as in the forward
        S = modified_scores(S, problem)
        vis = S > -np.inf
    # P = exp(S - lse): a row with lse = -inf saw no key, its P is 0
    empty = np.isneginf(lse)
    with np.errstate(invalid="ignore"):
        P = np.exp(S - np.where(empty, 0.0, lse)[..., None])
    P[np.broadcast_to(empty[..., None], P.shape)] = 0.0
    visible = np.ones(S.shape, bool) if vis is None else np.broadcast_to(vis, S.shape)
    psum = np.where(empty, visible.sum(axis=-1), P.sum(axis=-1))  # 1 per row (0 where lse = -inf)
    validate.check_lse_rowsums(psum.reshape(B, Hkv * g, Nq), problem.lse, problem.dtype)
    # dV = P^T dO, summed over the group of query heads that read each K/V head
    dV = (P.transpose(0, 1, 2, 4, 3) @ dO5).sum(axis=2)  # (B, Hkv, Nk, d)
    # dP = dO V^T;  D = rowsum(dO * O);  dS = P * (dP - D)
    dP = dO5 @ V4.transpose(0, 1, 2, 4, 3)  # (B, Hkv, group, Nq, Nk)
    D = (dO5 * O5).sum(axis=-1)  # (B, Hkv, group, Nq)
    dS = P * (dP - D[..., None])
    if problem.score_mod is not None:
        dS = _through_score_mod(dS, P, S_raw, visible, problem)
    # dQ = dS K * scale;  dK = dS^T Q * scale (summed over the group)
    dQ = (dS @ K4) * problem.scale  # (B, Hkv, group, Nq, d)
    dK = (dS.transpose(0, 1, 2, 4, 3) @ Q5).sum(axis=2) * problem.scale  # (B, Hkv, Nk, d)
    dQ_out, dK_out, dV_out = problem.new_grads()
    dQ_out[...] = dQ.reshape(B, Hkv * g, Nq, d)
    dK_out[...] = dK
    dV_out[...] = dV
    return dQ_out, dK_out, dV_out


def _through_score_mod(dS, P, S_raw, visible, problem):
    """dS with respect to the raw scores q . k * scale: the chain rule through score_mod f multiplies by
    f'(s), written from f's source by flashkit.mods_grad and evaluated on the visible scores."""
    from flashkit import mods_grad

    B, Hq, Nq, Nk = problem.B, problem.Hq, problem.Nq, problem.Nk
    visible4 = visible.reshape(B, Hq, Nq, Nk)
    scores = np.where(visible4, S_raw.reshape(B, Hq, Nq, Nk), 0.0).astype(S_raw.dtype)  # no -inf where hidden
    slope = blockmask.evaluate("score_mod", mods_grad.derivative(problem.score_mod),
                               (scores,) + index_grid(np.arange(B), np.arange(Hq), 0, Nq, 0, Nk), where=visible4)
    slope = np.broadcast_to(slope, (B, Hq, Nq, Nk)).reshape(dS.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.where(P > 0, dS * slope, 0.0).astype(dS.dtype, copy=False)  # nothing flows where P = 0
    if not np.isfinite(out).all():
        raise ValueError(f"the derivative of score_mod {blockmask.describe(problem.score_mod)} with respect to the "
                         "score is not finite at some visible score (a sqrt or log at 0, a division by zero?); "
                         "make it finite where the score is visible")
    return out


def reference_backward(problem):
    """The float64 oracle of the backward."""
    return standard_backward(problem.astype(np.float64))


def reference(problem):
    """The float64 oracle: standard attention with every array converted to float64."""
    return standard_attention(problem.astype(np.float64))
