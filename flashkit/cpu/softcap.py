"""Gemma 2's softcap, cap * tanh(s / cap), on whole float32 vector registers: what rung 4 runs for
mods.softcap on a whole micro-tile, forward (rung4_fused, in the kernel's registers) and backward (the hook
of rung4_fused_backward, with the derivative 1 - tanh^2 from the same tanh).

tanh is the rational function x P(x^2) / Q(x^2) below, written with explicit vectors (flashkit/cpu/vec.py) so
that it runs a whole register at a time (16 lanes with AVX-512, where LLVM vectorises the scalar loop of
flashkit/cpu/mods_jit.py's tanh32 only 8 wide): no exp, no branch, no libm call, 11 FMAs and one division.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from flashkit.cpu import vec
from flashkit.cpu.common import FASTMATH

# tanh(x) = x P(x^2) / Q(x^2) on |x| <= 9, x clamped there (tanh(9) rounds to 1 in float32): P of degree 5,
# Q of degree 4 in x^2, fitted in float64 for the least largest relative error on [0, 9] (a Lawson-weighted
# linearised least-squares fit, `tools/fit_tanh32.py`; design error 1.3e-9). Evaluated in float32 with
# FMAs: 4.5 ulp at most (2.7e-7 relative), measured against float64 on 5e5 points of [-12, 12]
# (tests/test_mods.py::test_compiled_softcap_is_accurate). No exp, no branch, no libm call: 11 FMAs and
# one division a score.
TANH_P = tuple(np.float32(c) for c in (0.999999998739546, 0.1368083884448083, 0.003869485346348885,
                                       2.8030819664931693e-05, 3.064122460234438e-08, -1.2245190754793868e-11))
TANH_Q = tuple(np.float32(c) for c in (1.0, 0.4701417094165431, 0.027250075266480253, 0.00039406722023153234,
                                       1.2889990736118155e-06))
TANH_CLAMP = np.float32(9.0)


@intrinsic
def vdiv_fast(typingctx, a, b):
    """a / b lane by lane, for float32 with AVX-512 as a * r, r = vrcp14ps(b) (2^-14 relative) refined by
    one Newton step r (2 - b r) (about 1 ulp): 3 instructions where vdivps zmm takes 8-10 cycles for 16
    lanes; elsewhere a plain division (on AVX2, vrcpps with the same step was tried: no faster, 2026-12-02)."""
    if not (isinstance(a, vec.Vec) and a == b):
        return None
    rcp14 = a.dtype == types.float32 and a.lanes == 16

    def codegen(context, builder, sig, args):
        from llvmlite import ir

        x, y = args
        if not rcp14:
            return builder.fdiv(x, y)
        vt = y.type
        fn = numba.core.cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vt, [vt, vt, ir.IntType(16)]), "llvm.x86.avx512.rcp14.ps.512")
        r = builder.call(fn, [y, ir.Constant(vt, None), ir.Constant(ir.IntType(16), -1)])
        one = ir.Constant(vt, [1.0] * 16)
        e = builder.fsub(one, builder.fmul(y, r, flags=("contract",)), flags=("contract",))  # 1 - b r: an FMA
        r = builder.fadd(r, builder.fmul(r, e, flags=("contract",)), flags=("contract",))
        return builder.fmul(x, r)

    return a(a, b), codegen


@intrinsic
def vmin_ordered(typingctx, a, b):
    """The smaller of a and b, lane by lane (vminps)."""
    if not (isinstance(a, vec.Vec) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered("<", args[0], args[1]), args[0], args[1])

    return a(a, b), codegen


@njit(inline="always", fastmath=FASTMATH)
def tanh_register(x):
    """tanh of a whole register of float32 (the rational function above)."""
    p0, p1, p2, p3, p4, p5 = TANH_P
    q0, q1, q2, q3, q4 = TANH_Q
    x = vmin_ordered(vec.vmax(x, vec.splat(-TANH_CLAMP)), vec.splat(TANH_CLAMP))
    t = x * x
    p = vec.fma(vec.fma(vec.fma(vec.fma(vec.fma(vec.splat(p5), t, vec.splat(p4)), t, vec.splat(p3)), t,
                                        vec.splat(p2)), t, vec.splat(p1)), t, vec.splat(p0))
    q = vec.fma(vec.fma(vec.fma(vec.fma(vec.splat(q4), t, vec.splat(q3)), t, vec.splat(q2)), t, vec.splat(q1)),
                t, vec.splat(q0))
    return vdiv_fast(x * p, q)


@njit(inline="always", fastmath=FASTMATH)
def softcap_register(s, inv_cap, cap_base2):
    """cap * tanh(s / cap) * log2(e) on a whole register of float32 scores s (base 2, what the softmax takes)."""
    return tanh_register(s * vec.splat(inv_cap)) * vec.splat(cap_base2)


@njit(inline="always", fastmath=FASTMATH)
def softcap_register_grad(s, inv_cap, cap_base2):
    """(cap * tanh(s / cap) * log2(e), 1 - tanh(s / cap)^2): the softcap and its derivative from one tanh."""
    th = tanh_register(s * vec.splat(inv_cap))
    return th * vec.splat(cap_base2), vec.splat(np.float32(1)) - th * th
