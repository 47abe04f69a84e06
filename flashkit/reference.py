"""Standard attention in NumPy: S = Q K^T * scale, P = softmax(S), O = P V, with S and P materialised.

This is the baseline every other backend is measured against (backend "numpy-standard"), and run in
float64 it is the oracle of the tests (`reference`). Its memory is O(N^2): one Nq x Nk score matrix
per head, which is exactly what FlashAttention avoids.
"""
from __future__ import annotations

import numpy as np

from flashkit.masks import dense_mask
from flashkit.registry import Backend

BACKENDS = (
    Backend(
        name="numpy-standard",
        device="cpu",
        summary="NumPy, materialises S and P (Nq x Nk per head): the O(N^2)-memory baseline",
        runner="flashkit.reference:standard_attention",
        priority=10,
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


def standard_attention(problem):
    """(O, lse) of `problem`, computed in the dtype of its arrays by materialising S and P."""
    B, Hkv, g, Nq, Nk, d = problem.B, problem.Hkv, problem.group, problem.Nq, problem.Nk, problem.d
    Q5 = problem.Q.reshape(B, Hkv, g, Nq, d)  # (B, Hkv, group, Nq, d): query heads grouped by K/V head
    Kt = problem.K.transpose(0, 1, 3, 2)[:, :, None]  # (B, Hkv, 1, d, Nk)
    V5 = problem.V[:, :, None]  # (B, Hkv, 1, Nk, d)

    # S = Q K^T * scale  (the Nq x Nk matrix, per head)
    S = Q5 @ Kt  # (B, Hkv, group, Nq, Nk)
    S *= problem.scale
    vis = visibility(problem)
    if vis is not None:
        np.copyto(S, -np.inf, where=~vis)
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


def reference(problem):
    """The float64 oracle: standard attention with every array converted to float64."""
    return standard_attention(problem.astype(np.float64))
