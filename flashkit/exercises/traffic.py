"""Checker for counting the HBM (slow-memory) traffic of standard attention.

The counting convention (the task text repeats it): standard attention as the FlashAttention paper's
Algorithm 0, three passes, every matrix moved between slow memory and the chip exactly once per pass
that uses it, nothing cached between passes, one (batch, head) after another:

    pass 1  read Q (Nq x d) and K (Nk x d), compute S = Q K^T * scale,  write S (Nq x Nk)
    pass 2  read S,                         compute P = softmax(S),     write P (Nq x Nk)
    pass 3  read P and V (Nk x d),          compute O = P V,            write O (Nq x d)

    bytes = B * H * itemsize * (2 Nq d + 2 Nk d + 4 Nq Nk)

Task signature: hbm_bytes_standard(B, H, Nq, Nk, d, itemsize) -> int.
"""
from __future__ import annotations

import numbers

import numpy as np

from flashkit.exercises.checking import call, fail, new_rng, passed


def _hbm_bytes(B, H, Nq, Nk, d, itemsize) -> int:
    """The convention above, pass by pass: reads then writes of each pass. (Private: it is the answer.)"""
    reads = (Nq * d + Nk * d) + (Nq * Nk) + (Nq * Nk + Nk * d)  # pass 1, 2, 3
    writes = (Nq * Nk) + (Nq * Nk) + (Nq * d)  # S, P, O
    return B * H * itemsize * (reads + writes)


def _variants():
    def f(NN=4, Nd_q=2, Nd_k=2, bh=True, item=True, square=None):
        def count(B, H, Nq, Nk, d, itemsize):
            sq = {None: Nq * Nk, "q": Nq * Nq, "k": Nk * Nk}[square]
            n = NN * sq + Nd_q * Nq * d + Nd_k * Nk * d
            return (B * H if bh else 1) * (itemsize if item else 1) * n
        return count

    return [
        ("you used one N for everything (Nq = Nk): K and V have Nk rows, Q and O have Nq, and S and P are "
         "Nq x Nk; with a KV cache or cross-attention Nq != Nk", f(square="q", Nd_q=4, Nd_k=0)),
        ("the score matrix is Nq x Nk, not Nq x Nq: with Nq != Nk (a KV cache, cross-attention) they differ", f(square="q")),
        ("the score matrix is Nq x Nk, not Nk x Nk", f(square="k")),
        ("you counted elements, not bytes: multiply by itemsize (2 for float16, 4 for float32)", f(item=False)),
        ("you counted one (batch, head); every one of the B * H heads moves its own matrices: multiply by B * H", f(bh=False)),
        ("the Nq x Nk matrices cross the memory bus 4 times, you counted 2: S is written (pass 1) and read "
         "(pass 2), P is written (pass 2) and read (pass 3)", f(NN=2)),
        ("the Nq x Nk matrices cross the memory bus 4 times, you counted 3: S written and read, P written and read",
         f(NN=3)),
        ("you counted reads only: S, P and O are also written (pass 1, 2, 3)", f(NN=2, Nd_q=1)),
        ("K and V have Nk rows and O has Nq rows: you used Nq for all of them", f(Nd_q=4, Nd_k=0)),
        ("you also counted O being read; in this convention O is only written (pass 3)", f(Nd_q=3)),
    ]


def check_hbm_traffic(hbm_bytes_standard, *, seed=None) -> None:
    """Check `hbm_bytes_standard(B, H, Nq, Nk, d, itemsize) -> int` against the convention above."""
    task = "HBM traffic of standard attention"
    rng, seed = new_rng(seed)
    # Distinct sizes (Nq != Nk, not powers of two) so every classic mistake changes the count, and
    # every total above 2**31 bytes (real sizes are), so a count kept in 32-bit integers wraps on every call.
    cases = [(6, 7, 3001, 5003, 7, 1), (2, 3, 11000, 13000, 17, 4), (1, 32, 8192, 8192, 64, 2),
             (8, 32, 1, 131072, 128, 2)]
    for _ in range(4):
        B, H, Nq, Nk = (int(x) for x in (rng.integers(1, 5), rng.integers(1, 17), rng.integers(1000, 30000),
                                         rng.integers(1000, 30000)))
        d, itemsize = int(rng.choice([32, 64, 80, 128])), int(rng.choice([2, 4]))
        while _hbm_bytes(B, H, Nq, Nk, d, itemsize) <= 2**31:
            H *= 2
        cases.append((B, H, Nq, Nk, d, itemsize))
    got = {}
    for args in cases:
        value = call(task, hbm_bytes_standard, *args)
        if isinstance(value, bool) or not isinstance(value, (numbers.Integral, numbers.Real)) or not np.isfinite(value):
            fail(task, f"return a number of bytes (an int); got {value!r} for (B, H, Nq, Nk, d, itemsize) = {args}.", seed)
        if value != int(value):
            fail(task, f"a count of bytes is a whole number; got {value!r} for (B, H, Nq, Nk, d, itemsize) = {args}.", seed)
        got[args] = int(value)
    if all(got[a] == _hbm_bytes(*a) for a in cases):
        B, H, N, d = 1, 8, 512, 64
        return passed(task, f"right on {len(cases)} shapes; e.g. B={B}, H={H}, N={N}, d={d}, float16 moves "
                            f"{_hbm_bytes(B, H, N, N, d, 2) / 2**20:.2f} MiB")
    for message, variant in _variants():
        if all(got[a] == variant(*a) for a in cases):
            fail(task, message + ".", seed)
    # By property, whatever the formula: the right count, wrapped around 2**32 (32-bit integers), or
    # rounded to float32's 24-bit mantissa.
    wrapped = {a: (_hbm_bytes(*a) + 2**31) % 2**32 - 2**31 for a in cases}
    if all(got[a] in (wrapped[a], wrapped[a] % 2**32) for a in cases):
        a = cases[0]
        fail(task, f"your counts wrapped around 2**32: for {a} you return {got[a]}, the right count is "
                   f"{_hbm_bytes(*a)} = {got[a]} + k * 2**32. The arithmetic ran in 32-bit integers (np.int32, "
                   "or an int32 array's elements), which hold at most 2**31 - 1 = 2,147,483,647: use Python ints "
                   "(int(x)) or np.int64.", seed)
    if all(got[a] == int(np.float32(_hbm_bytes(*a))) for a in cases):
        fail(task, "your counts are right to about 7 significant digits only: they were rounded to float32 "
                   "(24-bit mantissa). Count in Python ints (or np.int64).", seed)
    a = next(a for a in cases if got[a] != _hbm_bytes(*a))
    want = _hbm_bytes(*a)
    fail(task, f"for (B, H, Nq, Nk, d, itemsize) = {a}: expected {want} bytes, got {got[a]} "
               f"({got[a] / want:.3g} x the expected count). Count pass by pass: what each pass reads, what it writes.", seed)


__all__ = ["check_hbm_traffic"]


def __dir__():
    # Tab completion (dir) shows the checker only, not the answer it compares with.
    return __all__
