"""Checker for vectorising a loop with Numba and reading its assembly (exercise 6, after notebook 06).

Task signature:
    weighted_sum(p, v) -> float32     p, v float32 (n,): sum_k p[k] * v[k], a loop compiled with
                                      numba.njit that LLVM turns into packed SIMD instructions
This is the inner product of every score (s = q . k) and of every output element (o = P V): on a CPU
FlashAttention is fast only if these loops run 8 (AVX2) or 16 (AVX-512) floats per instruction.

The check runs the function on float32 arrays of awkward lengths (1, 7, 1000, 1003) against a float64
sum, then compiles it again for float32 arrays and reads the machine code (flashkit.cpu.simd_lab.asm):
it must hold packed instructions on ymm or zmm registers inside the loop. The classic mistakes, named:
no njit at all (a Python loop has no machine code to read), a float reduction without fastmath (IEEE
order forbids reordering the sum, so LLVM adds one element at a time: vaddss / vfmadd231ss on xmm),
an accumulator of the wrong type (a float64 `0.0` promotes every product to double), a loop that drops
an element.
"""
from __future__ import annotations

import numbers

import numpy as np

from flashkit.exercises.checking import ExerciseError, call, fail, new_rng, passed

_LENGTHS = (1, 7, 1000, 1003)


def _packed_float_ops(asm_text: str) -> dict:
    """{mnemonic + register width: count} of the packed single-precision arithmetic (vfmadd…ps, vmulps,
    vaddps on ymm/zmm). Moves (vmovups) do not count: a copy is vectorised even when the sum is not."""
    from flashkit.cpu.simd_lab import vector_instructions

    arithmetic = ("vfmadd", "vfnmadd", "vmulps", "vaddps")
    return {k: n for k, n in vector_instructions(asm_text).items()
            if k.split()[0].endswith("ps") and k.startswith(arithmetic)}


def _scalar_float_ops(asm_text: str) -> list:
    import re

    return sorted({m.group(1) for m in re.finditer(r"\b(v(?:fmadd\w*|add|mul)s[sd])\b", asm_text)})


def check_vectorised(weighted_sum, *, seed=None) -> None:
    """Check `weighted_sum(p, v)`: right on awkward lengths, and compiled to packed SIMD instructions."""
    task = "a vectorised loop"
    rng, seed = new_rng(seed)
    if not callable(weighted_sum):
        raise ExerciseError(f"✗ {task}: pass your function itself, as in check_vectorised(weighted_sum)")
    for n in _LENGTHS:
        p = rng.random(n, dtype=np.float32)
        v = rng.standard_normal(n, dtype=np.float32)
        value = call(task, weighted_sum, p, v)
        if not isinstance(value, (numbers.Real, np.floating)) or isinstance(value, bool):
            fail(task, f"return one number, the sum; got {type(value).__name__} for n = {n}", seed)
        want = float(np.dot(p.astype(np.float64), v.astype(np.float64)))
        scale = float(np.abs(p.astype(np.float64) * v).sum())
        if abs(float(value) - want) <= 1e-5 * scale + 1e-30:
            continue
        for k, what in ((n - 1, "last"), (0, "first")):
            rest = want - float(p[k]) * float(v[k])
            if abs(float(value) - rest) <= 1e-5 * scale:
                fail(task, f"for n = {n} your sum misses the {what} element (index {k}): loop over range(p.shape[0]) "
                           "(Python's range excludes its end, and starts at 0)", seed)
        fail(task, f"for n = {n}: expected {want:.7g}, got {float(value):.7g}. The sum is p[0]*v[0] + ... + "
                   "p[n-1]*v[n-1]", seed)
    if not hasattr(weighted_sum, "inspect_asm"):
        fail(task, "the answers are right, but this is a plain Python function: there is no machine code to read, "
                   "and each element costs an interpreter step (~50 ns). Decorate it with @numba.njit (and read "
                   "the next mistake: a float sum also needs fastmath=True)")
    from flashkit.cpu.simd_lab import asm

    p = np.ones(64, np.float32)
    try:
        text = asm(weighted_sum, p, p)
    except Exception as e:  # the learner's function did not compile for float32 arrays
        raise ExerciseError(f"✗ {task}: Numba could not compile your function for two float32 arrays: "
                            f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    packed = _packed_float_ops(text)
    fastmath = weighted_sum.targetoptions.get("fastmath", False)
    if not packed:
        scalar = _scalar_float_ops(text)
        if not fastmath:
            fail(task, "your loop compiled to scalar code (" + (", ".join(scalar) or "no packed float instructions")
                       + "): one element per instruction. A float sum is a reduction, and IEEE order forbids "
                       "reordering it, so LLVM must add p[0]*v[0], then p[1]*v[1], ...; allow it to keep 8 or 16 "
                       "partial sums in one register with @numba.njit(fastmath=True)")
        if any(op.endswith("sd") for op in scalar):
            fail(task, "fastmath is on, but the sum runs in float64 (" + ", ".join(scalar) + "): a literal 0.0 is a "
                       "float64, and float32 * float64 promotes every product to double. Start the sum at "
                       "p.dtype.type(0) (or np.float32(0))")
        fail(task, "no packed float instructions (…ps on ymm/zmm registers) in the machine code. A branch in the "
                   "loop, a call, or an early exit can stop LLVM's vectoriser: keep the body to `s += p[k] * v[k]`")
    widest = "zmm" if any(k.endswith("zmm") for k in packed) else "ymm"
    lanes = 16 if widest == "zmm" else 8
    shown = ", ".join(f"{k} x{n}" for k, n in sorted(packed.items(), key=lambda kv: -kv[1])[:4])
    return passed(task, f"right on lengths {', '.join(map(str, _LENGTHS))}, and the loop runs {lanes} floats per "
                        f"instruction on {widest} registers ({shown})")


__all__ = ["check_vectorised", "ExerciseError"]


def __dir__():
    return __all__
