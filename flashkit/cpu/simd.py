"""SIMD on the CPU, seen from Numba: two micro-kernels, their scalar twins, a vectorisable exp, and
helpers to read the machine code LLVM emitted and to set the number of threads.

The two inner loops of FlashAttention on a CPU are a dot product (a score s = q . k) and a weighted
add (the output update o = a*o + p*v). Each has a twin compiled from the same loop with vectorisation
made impossible, so a notebook can put the asm and the timings side by side:

    dot       / dot_scalar        the twin is compiled without fastmath: IEEE order forbids reassociating
                                  the running sum, so LLVM must add one element at a time (vaddss, no ymm)
    axpby     / axpby_scalar      no reduction here, so fastmath changes nothing, and `boundscheck=True`
                                  does not help either (LLVM hoists the checks and still vectorises:
                                  measured); the twin is the same loop compiled with LLVM's loop
                                  vectoriser switched off (numba.config.LOOP_VECTORIZE = 0, uncached)
    exp_vector / exp_scalar       polynomial exp (vectorisable) against np.exp, which LLVM lowers to one
                                  libm call per element (no SVML here); exp2_vector is the base-2 form
                                  rung 3 uses
    order_key / from_order_key    floats as order-preserving integers: a row max LLVM can vectorise

Measured with `compare()` (n = 16384 float32, in L2; AMD EPYC znver3, AVX2+FMA, 2026-11-25, a shared
machine): dot 1.6 us vs 15.5 us (10x), axpby 1.7 us vs 30 us (17x), exp 5.7-6.6 us vs 44 us (7x).
"""
from __future__ import annotations

import re

import numpy as np
from numba import njit, types
from numba.core.extending import intrinsic, overload

# reassoc/contract let LLVM reorder sums (vector reductions) and fuse a*b+c into one FMA; no nnan/ninf,
# so -inf and NaN keep their IEEE meaning wherever they appear (lse = -inf for a row that sees no key).
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


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
# A vectorisable exp: e^x = 2^n * e^r with n = round(x / ln2), |r| <= ln2/2
# ---------------------------------------------------------------------------------------------
@intrinsic
def pow2(typingctx, n):
    """2.0**n for a float n that holds an integer, built from the exponent bits: ((int(n) + bias) << m).

    float32: bias 127, 23 mantissa bits; float64: bias 1023, 52. Valid for normal results only.
    """
    if n == types.float32:
        ity, bias, shift = 32, 127, 23
    elif n == types.float64:
        ity, bias, shift = 64, 1023, 52
    else:
        return None
    sig = n(n)

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        it = ir.IntType(ity)
        i = builder.fptosi(args[0], it)
        i = builder.shl(builder.add(i, ir.Constant(it, bias)), ir.Constant(it, shift))
        return builder.bitcast(i, context.get_value_type(signature.return_type))

    return sig, codegen


def _order_key_codegen(to_int):
    def codegen(context, builder, signature, args):
        from llvmlite import ir

        width = 32 if (signature.args[0] in (types.float32, types.int32)) else 64
        it = ir.IntType(width)
        i = builder.bitcast(args[0], it) if to_int else args[0]
        # negative floats: flip every bit but the sign, so signed-integer order = float order
        flip = builder.lshr(builder.ashr(i, ir.Constant(it, width - 1)), ir.Constant(it, 1))
        key = builder.xor(i, flip)
        return key if to_int else builder.bitcast(key, context.get_value_type(signature.return_type))

    return codegen


@intrinsic
def order_key(typingctx, x):
    """An integer whose signed order is the order of the float x (the map is its own inverse).

    LLVM vectorises a max reduction over integers but leaves a float max reduction scalar (it wants a
    function-level no-NaN attribute that Numba does not set): so rung 3 takes its row max over keys."""
    ret = {types.float32: types.int32, types.float64: types.int64}.get(x)
    return (ret(x), _order_key_codegen(True)) if ret is not None else None


@intrinsic
def from_order_key(typingctx, k):
    """The float whose order key is k (inverse of order_key)."""
    ret = {types.int32: types.float32, types.int64: types.float64}.get(k)
    return (ret(k), _order_key_codegen(False)) if ret is not None else None


# Cody-Waite split of ln2 (cephes): n*LN2_HI is exact, so r = x - n*ln2 keeps the precision of x.
_F32 = dict(log2e=np.float32(1.4426950408889634), hi=np.float32(0.693359375), lo=np.float32(-2.12194440e-4),
            lowest=np.float32(-87.0), half=np.float32(0.5), zero=np.float32(0.0), one=np.float32(1.0))
_F64 = dict(log2e=1.4426950408889634, hi=6.93147180369123816490e-01, lo=1.90821492927058770002e-10,
            lowest=-708.0)
# Taylor coefficients 1/k!: |r| <= 0.347 so the first omitted term is r^8/8! = 5e-9 (float32, 7 terms)
# and r^13/13! = 2e-16 (float64, 12 terms): below each dtype's rounding.
_INV_FACT32 = tuple(np.float32(1.0 / np.prod(np.arange(1, k + 1, dtype=np.float64))) for k in range(8))
_INV_FACT64 = tuple(1.0 / float(np.prod(np.arange(1, k + 1, dtype=np.float64))) for k in range(13))


def fast_exp(x):
    """e**x for x <= 0 (a softmax argument s - m); 0 below the dtype's smallest normal result."""
    return np.exp(x)  # the Python meaning; Numba compiles the overload below


# Compiled with `contract` only, never `reassoc`: reassociation would fold (x - n*hi) - n*lo into
# x - n*(hi + lo) and lose the Cody-Waite split (measured: float32 error 3e-7 instead of 1e-7).
# LLVM still inlines it into the caller's loop and vectorises it there.
@overload(fast_exp, jit_options={"fastmath": {"contract", "nsz"}})
def _fast_exp_impl(x):
    if x == types.float32:
        c0, c1, c2, c3, c4, c5, c6, c7 = _INV_FACT32
        log2e, hi, lo, lowest, half, zero = (_F32[k] for k in ("log2e", "hi", "lo", "lowest", "half", "zero"))

        def exp32(x):
            xc = max(x, lowest)  # keeps 2^n a normal number; the result is flushed to 0 below anyway
            n = np.floor(xc * log2e + half)  # n = round(x / ln2)
            r = (xc - n * hi) - n * lo  # r = x - n ln2, |r| <= ln2/2
            p = c7
            p = p * r + c6
            p = p * r + c5
            p = p * r + c4
            p = p * r + c3
            p = p * r + c2
            p = p * r + c1
            p = p * r + c0  # e^r by Horner
            return p * pow2(n) if x > lowest else zero

        return exp32
    if x == types.float64:
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12 = _INV_FACT64
        log2e, hi, lo, lowest = _F64["log2e"], _F64["hi"], _F64["lo"], _F64["lowest"]

        def exp64(x):
            xc = max(x, lowest)
            n = np.floor(xc * log2e + 0.5)
            r = (xc - n * hi) - n * lo
            p = c12
            p = p * r + c11
            p = p * r + c10
            p = p * r + c9
            p = p * r + c8
            p = p * r + c7
            p = p * r + c6
            p = p * r + c5
            p = p * r + c4
            p = p * r + c3
            p = p * r + c2
            p = p * r + c1
            p = p * r + c0
            return p * pow2(n) if x > lowest else 0.0

        return exp64
    return None


_LN2 = np.log(2.0)
_POW2_32 = tuple(np.float32(_LN2**k / np.prod(np.arange(1, k + 1, dtype=np.float64))) for k in range(8))
_POW2_64 = tuple(float(_LN2**k / np.prod(np.arange(1, k + 1, dtype=np.float64))) for k in range(13))


def fast_exp2(x):
    """2**x for x <= 0; 0 below the dtype's smallest normal result. The kernels work in base 2: with
    log2(e) folded into the scale, e^(s - m) = 2^(s' - m') and the range reduction is one subtraction."""
    return np.exp2(x)


@overload(fast_exp2, jit_options={"fastmath": {"contract", "nsz"}})
def _fast_exp2_impl(x):
    if x == types.float32:
        c0, c1, c2, c3, c4, c5, c6, c7 = _POW2_32
        lowest, half, zero = np.float32(-126.0), np.float32(0.5), np.float32(0.0)

        def exp2_32(x):
            xc = max(x, lowest)
            n = np.floor(xc + half)  # n = round(x)
            f = xc - n  # |f| <= 1/2, exact
            p = c7
            p = p * f + c6
            p = p * f + c5
            p = p * f + c4
            p = p * f + c3
            p = p * f + c2
            p = p * f + c1
            p = p * f + c0  # 2^f = e^(f ln2) by Horner: first omitted term (ln2/2)^8/8! = 5e-9
            return p * pow2(n) if x > lowest else zero

        return exp2_32
    if x == types.float64:
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12 = _POW2_64

        def exp2_64(x):
            xc = max(x, -1022.0)
            n = np.floor(xc + 0.5)
            f = xc - n
            p = c12
            p = p * f + c11
            p = p * f + c10
            p = p * f + c9
            p = p * f + c8
            p = p * f + c7
            p = p * f + c6
            p = p * f + c5
            p = p * f + c4
            p = p * f + c3
            p = p * f + c2
            p = p * f + c1
            p = p * f + c0
            return p * pow2(n) if x > -1022.0 else 0.0

        return exp2_64
    return None


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
# Threads
# ---------------------------------------------------------------------------------------------
def set_threads(n: int) -> int:
    """Use n threads for the Numba kernels (1 <= n <= cores); returns the previous setting."""
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(int(n))
    return previous


def get_threads() -> int:
    """The number of threads the Numba kernels use now."""
    import numba

    return numba.get_num_threads()


# ---------------------------------------------------------------------------------------------
# The micro-benchmark
# ---------------------------------------------------------------------------------------------
def compare(n: int = 16384, dtype=np.float32, repeat: int = 200) -> list:
    """Time each micro-kernel against its scalar twin: a list of dicts (kernel, ns per call, GFLOP/s,
    speed-up). FLOPs: dot 2n, axpby 3n, exp counted as one per element."""
    import time

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
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(repeat):
                    call(f)
                best = min(best, (time.perf_counter() - t0) / repeat)
            times[label] = best
        rows.append(dict(kernel=name, n=n, dtype=np.dtype(dtype).name,
                         vector_ns=times["vector"] * 1e9, scalar_ns=times["scalar"] * 1e9,
                         vector_gflops=flops / times["vector"] / 1e9, scalar_gflops=flops / times["scalar"] / 1e9,
                         speedup=times["scalar"] / times["vector"]))
    return rows
