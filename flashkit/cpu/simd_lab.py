"""The SIMD lab of notebook 06: two micro-kernels, their scalar twins, the polynomial exp against libm's,
the machine code LLVM emitted, and a micro-benchmark. The primitives the kernels use (FASTMATH,
fast_exp, fast_exp2, pow2, order keys) live in flashkit/cpu/simd.py; this module is teaching material
that sits above flashkit.measure (its clock and thread count), and no kernel imports it.

The two inner loops of FlashAttention on a CPU are a dot product (a score s = q . k) and a weighted
add (the output update o = a*o + p*v). Each has a twin compiled from the same loop with vectorisation
made impossible, so a notebook can put the asm and the timings side by side:

    dot       / dot_scalar        the twin is compiled without fastmath: IEEE order forbids reassociating
                                  the running sum, so LLVM must add one element at a time (vaddss, no ymm)
    axpby     / axpby_scalar      no reduction here, so fastmath changes nothing, and `boundscheck=True`
                                  does not help either (LLVM hoists the checks and still vectorises:
                                  measured); the twin is the same loop compiled with LLVM's loop
                                  vectoriser switched off (numba.config.LOOP_VECTORIZE = 0, uncached)
    exp_vector / exp_scalar       simd.fast_exp (vectorisable) against np.exp, which LLVM lowers to one
                                  libm call per element (no SVML here); exp2_vector is simd.fast_exp2,
                                  the base-2 form rung 3 uses

Measured with `compare()` (n = 16384 float32, in L2; AMD EPYC znver3, AVX2+FMA, 2026-11-25, a shared
machine): dot 1.6 us vs 15.5 us (10x), axpby 1.7 us vs 30 us (17x), exp 5.7-6.6 us vs 44 us (7x).
"""
from __future__ import annotations

import re

import numpy as np
from numba import njit

from flashkit.cpu.simd import FASTMATH, fast_exp, fast_exp2
from flashkit.measure.timing import time_call

# Notebook 06 asks the lab for the thread count; the one implementation is flashkit.measure.threads.
from flashkit.measure.threads import current_threads as get_threads  # noqa: F401


# ---------------------------------------------------------------------------------------------
# Micro-kernel 1: the dot product s = sum_k q[k] * k[k]
# ---------------------------------------------------------------------------------------------
# Each twin is its own `def` with the same body: Numba's on-disk cache is keyed by the function's name
# and source line, so one Python function jitted twice with different options would share (and
# overwrite) one cache entry and both names would run the same machine code.
@njit(fastmath=FASTMATH, cache=True)
def dot(a, b):
    s = a.dtype.type(0)  # a zero of the arrays' dtype (a literal 0.0 is float64 and would promote float32)
    for k in range(a.shape[0]):
        s += a[k] * b[k]
    return s


@njit(fastmath=False, cache=True)  # strict IEEE order: one element after the other
def dot_scalar(a, b):
    s = a.dtype.type(0)
    for k in range(a.shape[0]):
        s += a[k] * b[k]
    return s


# ---------------------------------------------------------------------------------------------
# Micro-kernel 2: the weighted add o = a*o + p*v (the rescale-and-accumulate of the online softmax)
# ---------------------------------------------------------------------------------------------
@njit(fastmath=FASTMATH, cache=True)
def axpby(a, o, p, v):
    for k in range(o.shape[0]):
        o[k] = a * o[k] + p * v[k]


def _axpby_novec(a, o, p, v):
    for k in range(o.shape[0]):
        o[k] = a * o[k] + p * v[k]


class NoVectorize:
    """A jitted function whose every compilation runs with LLVM's loop and SLP vectorisers off.

    Not cached on disk: a cache entry compiled with the vectoriser on would silently replace it."""

    no_vectorize = True

    def __init__(self, py_func, **options):
        self.py_func, self.targetoptions = py_func, dict(options)
        self.dispatcher = njit(**options)(py_func)
        self.__doc__ = py_func.__doc__

    def compile(self, sig):
        with vectoriser_off():
            return self.dispatcher.compile(sig)

    def __call__(self, *args):
        import numba

        sig = tuple(numba.typeof(a) for a in args)
        if sig not in self.dispatcher.overloads:
            self.compile(sig)
        return self.dispatcher(*args)

    def inspect_asm(self, sig):
        return self.dispatcher.inspect_asm(sig)


class vectoriser_off:
    """Context manager: Numba compilations inside it get no loop or SLP vectorisation."""

    def __enter__(self):
        from numba.core import config

        self.saved = config.LOOP_VECTORIZE, config.SLP_VECTORIZE
        config.LOOP_VECTORIZE = config.SLP_VECTORIZE = 0

    def __exit__(self, *exc):
        from numba.core import config

        config.LOOP_VECTORIZE, config.SLP_VECTORIZE = self.saved


axpby_scalar = NoVectorize(_axpby_novec, fastmath=FASTMATH)


# ---------------------------------------------------------------------------------------------
# The exp loops: the polynomial exp (simd.fast_exp, fast_exp2) against libm's, element by element
# ---------------------------------------------------------------------------------------------
@njit(fastmath=FASTMATH, cache=True)
def exp_vector(x, out):
    """out[:] = e**x[:] with the polynomial exp: a loop LLVM vectorises (ymm/zmm FMAs)."""
    for k in range(x.shape[0]):
        out[k] = fast_exp(x[k])


@njit(fastmath=FASTMATH, cache=True)
def exp2_vector(x, out):
    """out[:] = 2**x[:] with the polynomial exp2 (what rung 3 calls)."""
    for k in range(x.shape[0]):
        out[k] = fast_exp2(x[k])


@njit(fastmath=FASTMATH, cache=True)
def exp_scalar(x, out):
    """out[:] = e**x[:] with np.exp: one call to libm's expf/exp per element."""
    for k in range(x.shape[0]):
        out[k] = np.exp(x[k])


# ---------------------------------------------------------------------------------------------
# Reading the asm
# ---------------------------------------------------------------------------------------------
def asm(fn, *example_args) -> str:
    """The assembly of the jitted `fn` for the types of `example_args`.

    Code loaded from Numba's disk cache has no asm to inspect, so this compiles a private, uncached
    copy with the same options (a second or so)."""
    import numba

    sig = tuple(numba.typeof(a) for a in example_args)
    if getattr(fn, "no_vectorize", False):
        fn.compile(sig)
        return fn.inspect_asm(sig)
    options = {k: v for k, v in fn.targetoptions.items() if k not in ("cache", "nopython")}
    fresh = numba.njit(**options)(fn.py_func)
    fresh.compile(sig)
    return fresh.inspect_asm(sig)


def vector_instructions(asm_text: str) -> dict:
    """Count the instructions that use 256-bit (ymm) or 512-bit (zmm) registers, by mnemonic, e.g.
    {'vfmadd231ps ymm': 8, 'vpmaxsd ymm': 4}. Scalar float code (xmm with *ss/*sd) shows none."""
    counts: dict = {}
    for line in asm_text.splitlines():
        line = line.split("#")[0].strip()
        m = re.match(r"(v\w+)\s+(.*)", line)
        if not m:
            continue
        for r in sorted(set(re.findall(r"%?([yz])mm\d+", m.group(2)))):
            key = f"{m.group(1)} {r}mm"
            counts[key] = counts.get(key, 0) + 1
    return counts


def has_vector_fma(asm_text: str) -> bool:
    """True when the asm holds a packed fused multiply-add on ymm or zmm registers."""
    return any(k.startswith("vfmadd") or k.startswith("vfnmadd") for k in vector_instructions(asm_text))


# ---------------------------------------------------------------------------------------------
# The micro-benchmark
# ---------------------------------------------------------------------------------------------
def compare(n: int = 16384, dtype=np.float32, repeat: int = 200) -> list:
    """Time each micro-kernel against its scalar twin: a list of dicts (kernel, ns per call, GFLOP/s,
    speed-up). FLOPs: dot 2n, axpby 3n, exp counted as one per element. Each time is the best of 5
    batches of `repeat` calls (flashkit.measure.timing.time_call), per call."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    neg = -np.abs(rng.standard_normal(n) * 10).astype(dtype)
    out = np.empty(n, dtype)
    alpha, p = dtype(0.9), dtype(0.1)
    cases = [
        ("dot", dot, dot_scalar, lambda f: f(a, b), 2 * n),
        ("axpby", axpby, axpby_scalar, lambda f: f(alpha, a, p, b), 3 * n),
        ("exp", exp_vector, exp_scalar, lambda f: f(neg, out), n),
    ]
    rows = []
    for name, fast, slow, call, flops in cases:
        times = {}
        for label, f in (("vector", fast), ("scalar", slow)):
            call(f)  # compile

            def batch(f=f):
                for _ in range(repeat):
                    call(f)

            times[label] = time_call(batch, warmup=0, repeats=5).min_ms * 1e-3 / repeat  # seconds per call
        rows.append(dict(kernel=name, n=n, dtype=np.dtype(dtype).name,
                         vector_ns=times["vector"] * 1e9, scalar_ns=times["scalar"] * 1e9,
                         vector_gflops=flops / times["vector"] / 1e9, scalar_gflops=flops / times["scalar"] / 1e9,
                         speedup=times["scalar"] / times["vector"]))
    return rows
