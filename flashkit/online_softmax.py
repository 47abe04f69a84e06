"""The online softmax: a running state (m, l, O) updated one block of scores at a time.

For one query row and the scores s_1..s_n seen so far,
    m = max_j s_j                        the running maximum (keeps every exp() <= 1: no overflow)
    l = sum_j exp(s_j - m)               the running denominator
    O = sum_j exp(s_j - m) v_j           the running, un-normalised output
and the final answer is O / l, with logsumexp lse = m + log(l). A new block rescales the old state by
exp(m_old - m_new), which is why the blocks can come in any order and two states can be merged: the
idea behind FlashAttention's tiles, split-K decoding and ring attention.

These functions work on a batch of rows at once (leading axes are kept) and use -inf for "nothing
seen yet"; a row that never sees a key ends with O = 0 and lse = -inf.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class State(NamedTuple):
    m: np.ndarray  # (..., rows)     running max, -inf before any visible key
    l: np.ndarray  # (..., rows)     running sum of exp(s - m)
    O: np.ndarray  # (..., rows, d)  running sum of exp(s - m) * v, not yet divided by l


def init(rows: int, d: int, dtype=np.float64, lead: tuple = ()) -> State:
    """The empty state: m = -inf, l = 0, O = 0."""
    return State(
        np.full(lead + (rows,), -np.inf, dtype),
        np.zeros(lead + (rows,), dtype),
        np.zeros(lead + (rows, d), dtype),
    )


def _exp_diff(a, b):
    """exp(a - b) with exp(-inf - -inf) taken as 0 (a row that has seen nothing contributes nothing)."""
    with np.errstate(invalid="ignore"):
        out = np.exp(a - b)
    return np.where(np.isneginf(a), 0.0, out).astype(np.result_type(a, b), copy=False)


def update(state: State, S: np.ndarray, V: np.ndarray) -> State:
    """Fold one block of scores S (..., rows, cols) with its values V (..., cols, d) into the state.

    Masked scores are -inf in S. Returns a new state; the old one is not modified.
    """
    m, l, O = state
    # m_new = max(m, rowmax(S))
    m_new = np.maximum(m, S.max(axis=-1))
    # P = exp(S - m_new); alpha = exp(m - m_new) rescales what was accumulated under the old max
    P = _exp_diff(S, m_new[..., None])
    alpha = _exp_diff(m, m_new)
    # l_new = alpha * l + rowsum(P);  O_new = alpha * O + P V
    return State(m_new, alpha * l + P.sum(axis=-1), alpha[..., None] * O + P @ V)


def merge(states: Sequence[State]) -> State:
    """Combine partial states computed over disjoint sets of keys; exact, in any order.

    merge([update(init, S1, V1), update(init, S2, V2)]) equals update(update(init, S1, V1), S2, V2).
    """
    if len(states) == 0:
        raise ValueError("states must hold at least one State")
    m = states[0].m
    for s in states[1:]:
        m = np.maximum(m, s.m)
    l = sum(_exp_diff(s.m, m) * s.l for s in states)
    O = sum(_exp_diff(s.m, m)[..., None] * s.O for s in states)
    return State(m, l, O)


def finalize(state: State):
    """(O / l, lse): the normalised output and the logsumexp; rows that saw no key give 0 and -inf."""
    m, l, O = state
    seen = l > 0
    safe_l = np.where(seen, l, 1.0)
    out = np.where(seen[..., None], O / safe_l[..., None], 0.0).astype(O.dtype, copy=False)
    with np.errstate(divide="ignore"):
        lse = np.where(seen, m + np.log(safe_l), -np.inf).astype(m.dtype, copy=False)
    return out, lse


def merge_outputs(outputs: Sequence[np.ndarray], lses: Sequence[np.ndarray]):
    """Merge finished (O, lse) pairs, each normalised over its own keys, into the answer over all keys.

    This is how split-K ("flash-decoding") and ring attention combine partial results:
    O = sum_s exp(lse_s - lse) O_s with lse = log(sum_s exp(lse_s)).
    """
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError("outputs and lses must be non-empty sequences of the same length")
    states = [State(lse, np.where(np.isneginf(lse), 0.0, 1.0).astype(lse.dtype), o) for o, lse in zip(outputs, lses)]
    return finalize(merge(states))


def softmax_naive(x: np.ndarray) -> np.ndarray:
    """exp(x) / sum(exp(x)): overflows to inf/NaN once a logit passes about 88 (float32) or 709 (float64)."""
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def softmax_safe(x: np.ndarray) -> np.ndarray:
    """Subtract the row max first: every exp() is <= 1, the result is unchanged mathematically."""
    m = x.max(axis=-1, keepdims=True)
    e = _exp_diff(x, m)
    s = e.sum(axis=-1, keepdims=True)
    return np.where(s > 0, e / np.where(s > 0, s, 1), 0.0)


def softmax_online(x: np.ndarray, block: int) -> np.ndarray:
    """Safe softmax in one pass over blocks of `block` columns, keeping only (m, l) per row."""
    m = np.full(x.shape[:-1], -np.inf, x.dtype)
    l = np.zeros(x.shape[:-1], x.dtype)
    for j0 in range(0, x.shape[-1], block):
        xb = x[..., j0:j0 + block]
        m_new = np.maximum(m, xb.max(axis=-1))
        l = _exp_diff(m, m_new) * l + _exp_diff(xb, m_new[..., None]).sum(axis=-1)
        m = m_new
    return np.where(l[..., None] > 0, _exp_diff(x, m[..., None]) / np.where(l > 0, l, 1)[..., None], 0.0)
