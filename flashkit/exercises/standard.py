"""Checkers for standard attention (exercise 1, after notebook 01): the three lines of the paper's
Algorithm 0 for one head, and the count of the memory they need beyond their inputs and output.

Task signatures:
    standard_attention(Q, K, V, scale)      Q (Nq, d), K and V (Nk, d) float64 -> O (Nq, d)
    standard_memory_bytes(B, H, Nq, Nk, itemsize) -> int: bytes of S and P, the two Nq x Nk matrices
                                            standard attention materialises for each of the B * H heads
The convention of the count (the task text repeats it) is flashkit.measure.memory.analytic_standard's:
S = Q K^T * scale and P = softmax(S) are kept whole, B * H * Nq * Nk numbers each; Q, K, V (the inputs)
and O (the output) are not counted, nor the few rows of temporaries.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from flashkit import validate
from flashkit.exercises.checking import (as_arrays, call, check_shapes, close, diagnose, exp_diff, fail,
                                         first_mismatches, new_rng, passed)
from flashkit.measure.memory import analytic_standard
from flashkit.reference import reference

# ---------------------------------------------------------------- task 1: standard attention, one head


def _softmax_rows(S, axis=-1):
    with np.errstate(all="ignore"):
        E = exp_diff(S, S.max(axis=axis, keepdims=True))
        return E / E.sum(axis=axis, keepdims=True)


def _variants(Q, K, V, scale):
    """Known-wrong O, each one mistake away from softmax(Q K^T * scale) V."""
    with np.errstate(all="ignore"):
        S = Q @ K.T * scale
        E = np.exp(S - S.max(axis=1, keepdims=True))
        return [
            ("you forgot the scale: S = Q K^T * scale (scale = 1/sqrt(d) by default), else the softmax is "
             "far too peaked", lambda: _softmax_rows(Q @ K.T) @ V),
            ("you divided the scores by scale instead of multiplying: S = Q K^T * scale, with scale = 1/sqrt(d) "
             "already inverted", lambda: _softmax_rows(Q @ K.T / scale) @ V),
            ("you normalised P down the columns (axis=0): each query ROW of P must sum to 1 (axis=-1, "
             "keepdims=True)", lambda: _softmax_rows(S, axis=0) @ V),
            ("P is not normalised: divide exp(S - m) by its row sum before multiplying by V",
             lambda: E @ V),
            ("you multiplied P by K, not by V: O = P V", lambda: _softmax_rows(S) @ K),
            ("you subtracted the max of the whole matrix, not of each row: rows far below it underflow to 0 / 0",
             lambda: (lambda E2: E2 / E2.sum(axis=1, keepdims=True))(np.exp(S - S.max()))),
        ]


def _oracle(Q, K, V, scale):
    O, _ = reference(validate.check(Q, K, V, scale=scale))
    return O.reshape(Q.shape)


def _cases(rng):
    """(name, Q, K, V, scale): Nq != Nk, d = 1, one query, and scores near +-1000 (rows overflow unless the
    row max is subtracted)."""
    cases = []
    for Nq, Nk, d, spread in ((5, 7, 4, 1.0), (1, 9, 3, 1.0), (6, 4, 1, 1.0), (4, 11, 8, 1.0), (3, 6, 4, 18.0)):
        Q = rng.standard_normal((Nq, d)) * spread
        K = rng.standard_normal((Nk, d)) * spread
        V = rng.standard_normal((Nk, d))
        name = f"Nq={Nq}, Nk={Nk}, d={d}"
        if spread > 1:
            name += ", scores up to about +-1000"
            scale = 1.0 / math.sqrt(d)
            S = Q @ K.T * scale
            Q *= 800 / max(np.abs(S).max(), 1e-9)  # the largest |score| is 800: exp() overflows above 709.78
        cases.append((name, Q, K, V, 1.0 / math.sqrt(d)))
    return cases


def check_standard_attention(standard_attention, *, seed=None) -> None:
    """Check `standard_attention(Q, K, V, scale) -> O` for one head against flashkit.reference."""
    task = "standard attention"
    rng, seed = new_rng(seed)
    for case, Q, K, V, scale in _cases(rng):
        want = _oracle(Q, K, V, scale)
        (got,) = as_arrays(task, call(task, standard_attention, Q.copy(), K.copy(), V.copy(), scale), ["O"])
        check_shapes(task, [got], [want], ["O"])
        if close(got, want):
            continue
        named = diagnose(got, _variants(Q, K, V, scale))
        if named:
            fail(task, f"on {case}: {named}.", seed)
        if not np.isfinite(got).all():
            r = int(np.argwhere(~np.isfinite(got))[0, 0])
            S_r = Q[r] @ K.T * scale
            fail(task, f"on {case}: O has inf or NaN in row {r}, whose scores reach {S_r.max():.4g}: exp() overflows "
                       "above 709.78. Subtract each row's max before exp (S - S.max(axis=1, keepdims=True)): the "
                       "softmax does not change, and every exponent is <= 0.", seed)
        fail(task, f"on {case}: wrong O {first_mismatches(got, want)}.", seed)
    return passed(task, "matches flashkit.reference on 5 shapes (Nq != Nk, d = 1, one query, scores near +-1000)")


# ---------------------------------------------------------------- task 2: its memory, counted
def _count(B, H, Nq, Nk, itemsize) -> int:
    return int(sum(analytic_standard(B, H, Nq, Nk, itemsize).values()))


def _memory_variants():
    def f(mats=2, square=None, bh=True, item=True, plus_io=0):
        def count(B, H, Nq, Nk, itemsize):
            nn = {None: Nq * Nk, "q": Nq * Nq, "k": Nk * Nk}[square]
            return (B * H if bh else 1) * (itemsize if item else 1) * mats * nn
        return count

    return [
        ("S and P are Nq x Nk, not Nq x Nq: with Nq != Nk (a KV cache, cross-attention) they differ", f(square="q")),
        ("S and P are Nq x Nk, not Nk x Nk", f(square="k")),
        ("you counted one of the two matrices: S (the scores) and P (the probabilities) are both kept whole", f(mats=1)),
        ("you counted elements, not bytes: multiply by itemsize (4 for float32, 8 for float64)", f(item=False)),
        ("you counted one (batch, head): each of the B * H heads has its own S and P: multiply by B * H", f(bh=False)),
    ]


def check_standard_memory(standard_memory_bytes, *, seed=None) -> None:
    """Check `standard_memory_bytes(B, H, Nq, Nk, itemsize) -> int`: the bytes of S and P."""
    task = "memory of standard attention"
    rng, seed = new_rng(seed)
    # Nq != Nk everywhere, so each mistake changes the count; every total above 2**31 bytes, so 32-bit
    # integer arithmetic wraps on every call.
    cases = [(2, 3, 30001, 50003, 4), (1, 32, 8192, 16384, 2), (8, 16, 4099, 65537, 4)]
    for _ in range(3):
        B, H, Nq, Nk = (int(x) for x in (rng.integers(1, 5), rng.integers(1, 17), rng.integers(1000, 40000),
                                         rng.integers(1000, 40000)))
        while Nq == Nk:
            Nk += 1
        itemsize = int(rng.choice([2, 4, 8]))
        while _count(B, H, Nq, Nk, itemsize) <= 2**31:
            H *= 2
        cases.append((B, H, Nq, Nk, itemsize))
    got = {}
    for args in cases:
        value = call(task, standard_memory_bytes, *args)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
            fail(task, f"return a number of bytes (an int); got {value!r} for (B, H, Nq, Nk, itemsize) = {args}.", seed)
        if value != int(value):
            fail(task, f"a count of bytes is a whole number; got {value!r} for (B, H, Nq, Nk, itemsize) = {args}.", seed)
        got[args] = int(value)
    if all(got[a] == _count(*a) for a in cases):
        B, H, N = 1, 16, 16384
        return passed(task, f"right on {len(cases)} shapes; e.g. one layer of B={B}, H={H}, N={N} in float32 needs "
                            f"{_count(B, H, N, N, 4) / 2**30:.0f} GiB for S and P")
    for message, variant in _memory_variants():
        if all(got[a] == variant(*a) for a in cases):
            fail(task, message + ".", seed)
    wrapped = {a: (_count(*a) + 2**31) % 2**32 - 2**31 for a in cases}
    if all(got[a] in (wrapped[a], wrapped[a] % 2**32) for a in cases):
        a = cases[0]
        fail(task, f"your counts wrapped around 2**32: for {a} you return {got[a]}, the right count is {_count(*a)}. "
                   "The arithmetic ran in 32-bit integers (np.int32), which hold at most 2**31 - 1: use Python ints.", seed)
    a = next(a for a in cases if got[a] != _count(*a))
    ratio = got[a] / _count(*a)
    extra = (" You may have counted Q, K, V or O too: they are the inputs and the output, not counted here."
             if 1 < ratio < 1.2 else "")
    fail(task, f"for (B, H, Nq, Nk, itemsize) = {a}: expected {_count(*a)} bytes, got {got[a]} ({ratio:.3g} x). "
               f"Count S and P: B * H matrices of Nq x Nk each, itemsize bytes a number.{extra}", seed)


__all__ = ["check_standard_attention", "check_standard_memory"]


def __dir__():
    # Tab completion (dir) shows the checkers only, not the answers they compare with.
    return __all__
