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


def standard_attention_hbm_bytes(B, H, Nq, Nk, d, itemsize) -> int:
    """The convention above, pass by pass: reads then writes of each pass."""
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
    # Distinct sizes (Nq != Nk, not powers of two) so every classic mistake changes the count.
    cases = [(1, 1, 3, 5, 7, 1), (2, 3, 11, 13, 17, 4), (1, 8, 512, 512, 64, 2), (4, 16, 1, 4096, 128, 2)]
    cases += [tuple(int(x) for x in (rng.integers(1, 5), rng.integers(1, 17), rng.integers(1, 3000),
                                     rng.integers(1, 3000), rng.choice([32, 64, 80, 128]), rng.choice([2, 4])))
              for _ in range(4)]
    got = {}
    for args in cases:
        value = call(task, hbm_bytes_standard, *args)
        if isinstance(value, bool) or not isinstance(value, (numbers.Integral, numbers.Real)) or not np.isfinite(value):
            fail(task, f"return a number of bytes (an int); got {value!r} for (B, H, Nq, Nk, d, itemsize) = {args}.", seed)
        if value != int(value):
            fail(task, f"a count of bytes is a whole number; got {value!r} for (B, H, Nq, Nk, d, itemsize) = {args}.", seed)
        got[args] = int(value)
    if all(got[a] == standard_attention_hbm_bytes(*a) for a in cases):
        B, H, N, d = 1, 8, 512, 64
        return passed(task, f"right on {len(cases)} shapes; e.g. B={B}, H={H}, N={N}, d={d}, float16 moves "
                            f"{standard_attention_hbm_bytes(B, H, N, N, d, 2) / 2**20:.2f} MiB")
    for message, variant in _variants():
        if all(got[a] == variant(*a) for a in cases):
            fail(task, message + ".", seed)
    a = next(a for a in cases if got[a] != standard_attention_hbm_bytes(*a))
    want = standard_attention_hbm_bytes(*a)
    fail(task, f"for (B, H, Nq, Nk, d, itemsize) = {a}: expected {want} bytes, got {got[a]} "
               f"({got[a] / want:.3g} x the expected count). Count pass by pass: what each pass reads, what it writes.", seed)


__all__ = ["check_hbm_traffic", "standard_attention_hbm_bytes"]
