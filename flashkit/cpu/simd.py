"""The SIMD primitives of the Numba kernels: the fastmath flags, a vectorisable exp and exp2, and
floats as order-preserving integers. Rung 3 (forward and backward) and split-K decoding import them.

    FASTMATH                      the LLVM flags every kernel compiles with (and why not nnan/ninf)
    fast_exp / fast_exp2          polynomial e^x and 2^x for x <= 0 (a softmax argument s - m): LLVM
                                  inlines and vectorises them where np.exp is one libm call per element
    pow2                          2^n from the exponent bits, the last step of both
    order_key / from_order_key    floats as order-preserving integers: a row max LLVM can vectorise

The teaching lab around them (the micro-kernels and their scalar twins, the asm, the micro-benchmark of
notebook 06) is flashkit/cpu/simd_lab.py; no kernel imports it.
"""
from __future__ import annotations

import numpy as np
from numba import types
from numba.core.extending import intrinsic, overload

# reassoc/contract let LLVM reorder sums (vector reductions) and fuse a*b+c into one FMA; no nnan/ninf,
# so -inf and NaN keep their IEEE meaning wherever they appear (lse = -inf for a row that sees no key).
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


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
