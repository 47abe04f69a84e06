"""SIMD vectors as Numba values: what a BLAS micro-kernel is written with, in Python syntax.

Numba has no vector type, and its loop vectoriser will not keep a tile of accumulators in registers
across a loop (measured: an 8 x 32 tile written as loops over a small array compiled to scalar
`vfmadd213ss` with a load and a store around each, 4.6 GFLOP/s on one core; the same tile as 16
vector values below, 131 GFLOP/s, 16 `vfmadd231ps zmm` in the loop). So rung 4 writes its
micro-kernels with explicit vectors, as C code with intrinsics does:

    Vec(dtype)          one register: 16 float32 or 8 float64 lanes with AVX-512, 8 or 4 with AVX2
    lanes(a)            the lane count for the dtype of array a (a compile-time constant)
    load(a, i)          elements i .. i + W - 1 of a C-contiguous array, in memory order (any rank: i
                        is the flat index);  store(a, i, v) the reverse
    splat(x)            x in every lane (vbroadcastss);  bcast(a, i) the same for a[i], from memory
    fma(a, b, c)        a * b + c, one rounding (vfmadd231ps)
    vmax, v + w, v - w, v * w, vround(v)                           lane by lane
    hmax(v), hsum(v)    the largest lane, the sum of the lanes (a few shuffles)
    any_gt(v, x)        whether some lane exceeds x (one compare into a mask register and a test)
    keep_range(v, first, lo, hi, fill)   v where lo <= first + lane < hi, else fill (a key mask)
    exp2(v)             2**v lane by lane: a degree-5 polynomial (float32) on a whole register, scaled
                        by vscalefps where there is AVX-512
    scalef(p, n)        p * 2**n for integer-valued lanes n (vscalefps; else from the exponent bits)
    address(a, i)       a pointer to a's element i, for a C callback (rung 4's mods hook);
                        array_at(ptr, n) the n-element array there, in the callback

A Vec lives in an SSA value, so LLVM allocates it a register (zmm0-31 or ymm0-15) and spills only when
a kernel keeps more live than the register file holds. Nothing checks bounds: load and store trust
their index as C does; the kernels pad their packed buffers so every access is inside.
"""
from __future__ import annotations

import operator

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic, models, overload, register_model

from flashkit.cpu.simd import _POW2_64


def _vector_bytes() -> int:
    """64 where Numba generates AVX-512 code, else 32 (AVX2; LLVM splits a wider vector in two where
    there is less). Numba compiles for the host's features unless NUMBA_CPU_FEATURES names others
    (with NUMBA_CPU_NAME, e.g. haswell and "-avx512f,...", to build and measure AVX2 code on an
    AVX-512 machine): the same choice here."""
    import numba

    if numba.config.CPU_FEATURES:
        return 64 if "+avx512f" in numba.config.CPU_FEATURES.split(",") else 32
    features = {k for k, v in llvm.get_host_cpu_features().items() if v}
    return 64 if "avx512f" in features else 32


VECTOR_BYTES = _vector_bytes()


class Vec(types.Type):
    """One SIMD register of `dtype` (float32 or float64) lanes."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.lanes = VECTOR_BYTES // (dtype.bitwidth // 8)
        super().__init__(name=f"Vec({dtype} x {self.lanes})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.lanes))


_TYPES = {}


def vec_type(dtype) -> Vec:
    if dtype not in _TYPES:
        _TYPES[dtype] = Vec(dtype)
    return _TYPES[dtype]


def _is_float(t):
    return t in (types.float32, types.float64)


def _flat(a):
    """A C-contiguous float array of any rank: load, store and bcast index its elements in memory order."""
    return isinstance(a, types.Array) and a.layout == "C" and _is_float(a.dtype)


def _suffix(vt: ir.VectorType) -> str:
    return f"v{vt.count}{'f32' if vt.element == ir.FloatType() else 'f64'}"


def _llvm_call(builder, name, ret, args, fastmath=()):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args, fastmath=fastmath)


def _pointer(context, builder, aryty, ary, index):
    data = cgutils.create_struct_proxy(aryty)(context, builder, value=ary).data
    return builder.gep(data, [index])


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
@intrinsic
def lanes(typingctx, a):
    """W, the lanes of one register for a's dtype."""
    if not (isinstance(a, types.Array) and _is_float(a.dtype)):
        return None
    n = vec_type(a.dtype).lanes
    return types.intp(a), lambda context, builder, sig, args: ir.Constant(ir.IntType(64), n)


@intrinsic
def load(typingctx, a, i):
    """Elements i .. i + W - 1 of C-contiguous a (flat index, any rank) as one register; no bounds check."""
    if not _flat(a):
        return None
    V = vec_type(a.dtype)

    def codegen(context, builder, sig, args):
        p = _pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(p, context.get_value_type(V).as_pointer()), align=a.dtype.bitwidth // 8)

    return V(a, i), codegen


@intrinsic
def store(typingctx, a, i, v):
    """Elements i .. i + W - 1 of C-contiguous a (flat index) = v."""
    if not (_flat(a) and isinstance(v, Vec) and v.dtype == a.dtype):
        return None

    def codegen(context, builder, sig, args):
        p = _pointer(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(p, args[2].type.as_pointer()), align=a.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(a, i, v), codegen


@intrinsic
def splat(typingctx, x):
    """x in every lane."""
    if not _is_float(x):
        return None
    V = vec_type(x)

    def codegen(context, builder, sig, args):
        vt = context.get_value_type(V)
        one = builder.insert_element(ir.Constant(vt, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), V.lanes), [0] * V.lanes)
        return builder.shuffle_vector(one, ir.Constant(vt, ir.Undefined), zeros)

    return V(x), codegen


@intrinsic
def bcast(typingctx, a, i):
    """Element i (flat index) of C-contiguous a in every lane, loaded straight into the register (one vbroadcastss from memory): unlike
    splat(a[i]), no check for a negative index, so the address is one base register plus a constant."""
    if not _flat(a):
        return None
    V = vec_type(a.dtype)

    def codegen(context, builder, sig, args):
        x = builder.load(_pointer(context, builder, sig.args[0], args[0], args[1]))
        vt = context.get_value_type(V)
        one = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, ir.Constant(vt, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), V.lanes), [0] * V.lanes))

    return V(a, i), codegen


# ---------------------------------------------------------------------------------------------
# Arithmetic, lane by lane
# ---------------------------------------------------------------------------------------------
@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c in one instruction, one rounding."""
    if not (isinstance(a, Vec) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        return _llvm_call(builder, f"llvm.fma.{_suffix(args[0].type)}", args[0].type, args)

    return a(a, b, c), codegen


def _binary(op_name):
    @intrinsic
    def impl(typingctx, a, b):
        if not (isinstance(a, Vec) and a == b):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, op_name)(args[0], args[1])

        return a(a, b), codegen

    return impl


_add, _sub, _mul = _binary("fadd"), _binary("fsub"), _binary("fmul")


for _op, _impl in ((operator.add, _add), (operator.sub, _sub), (operator.mul, _mul)):
    def _register(op=_op, impl=_impl):
        @overload(op)
        def _ov(a, b):
            if isinstance(a, Vec) and a == b:
                return lambda a, b: impl(a, b)
            return None

    _register()


@intrinsic
def vmax(typingctx, a, b):
    """The larger of a and b, lane by lane (vmaxps)."""
    if not (isinstance(a, Vec) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vmin(typingctx, a, b):
    """The smaller of a and b, lane by lane (vminps)."""
    if not (isinstance(a, Vec) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered("<", args[0], args[1]), args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vround(typingctx, a):
    """a rounded to the nearest integer (ties to even), lane by lane (one vrndscaleps)."""
    if not isinstance(a, Vec):
        return None

    def codegen(context, builder, sig, args):
        return _llvm_call(builder, f"llvm.roundeven.{_suffix(args[0].type)}", args[0].type, args)

    return a(a), codegen


@intrinsic
def pow2(typingctx, n):
    """2.0**n for lanes holding integers, from the exponent bits (simd.pow2 on a whole register)."""
    if not isinstance(n, Vec):
        return None
    bits, bias, shift = (32, 127, 23) if n.dtype == types.float32 else (64, 1023, 52)

    def codegen(context, builder, sig, args):
        it = ir.VectorType(ir.IntType(bits), n.lanes)
        i = builder.fptosi(args[0], it)
        i = builder.add(i, ir.Constant(it, [bias] * n.lanes))
        i = builder.shl(i, ir.Constant(it, [shift] * n.lanes))
        return builder.bitcast(i, args[0].type)

    return n(n), codegen


@intrinsic
def scalef(typingctx, p, n):
    """p * 2.0**n lane by lane, for lanes of n holding integers: one vscalefps (vscalefpd) with AVX-512,
    exact, and 0 where n is far below the exponent range (so no clamp is needed before it); without
    AVX-512, p * pow2(n), valid only where 2**n is a normal number."""
    if not (isinstance(p, Vec) and p == n):
        return None
    f32 = p.dtype == types.float32

    def codegen(context, builder, sig, args):
        vt = args[0].type
        if VECTOR_BYTES == 64:
            name = f"llvm.x86.avx512.mask.scalef.{'ps' if f32 else 'pd'}.512"
            mask = ir.Constant(ir.IntType(p.lanes), -1)  # every lane
            rounding = ir.Constant(ir.IntType(32), 4)  # the current rounding mode (_MM_FROUND_CUR_DIRECTION)
            return _llvm_call(builder, name, vt, [args[0], args[1], ir.Constant(vt, ir.Undefined), mask, rounding])
        bits, bias, shift = (32, 127, 23) if f32 else (64, 1023, 52)
        it = ir.VectorType(ir.IntType(bits), p.lanes)
        i = builder.shl(builder.add(builder.fptosi(args[1], it), ir.Constant(it, [bias] * p.lanes)),
                        ir.Constant(it, [shift] * p.lanes))
        return builder.fmul(args[0], builder.bitcast(i, vt))

    return p(p, n), codegen


@intrinsic
def keep_range(typingctx, a, first, lo, hi, fill):
    """Lane i of a where lo <= first + i < hi, else fill: a mask of consecutive key indices (a window,
    a causal diagonal, the end of a tile) applied in registers, by integer compares (exact for any N)."""
    if not (isinstance(a, Vec) and all(isinstance(x, types.Integer) for x in (first, lo, hi)) and fill == a.dtype):
        return None

    def codegen(context, builder, sig, args):
        vt = args[0].type
        it = ir.VectorType(ir.IntType(a.dtype.bitwidth), vt.count)

        def spread(x, ty):
            x = context.cast(builder, x, ty, types.int64)
            x = builder.trunc(x, it.element) if a.dtype.bitwidth == 32 else x
            one = builder.insert_element(ir.Constant(it, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(one, ir.Constant(it, ir.Undefined),
                                          ir.Constant(ir.VectorType(ir.IntType(32), vt.count), [0] * vt.count))

        key = builder.add(spread(args[1], sig.args[1]), ir.Constant(it, list(range(vt.count))))
        keep = builder.and_(builder.icmp_signed(">=", key, spread(args[2], sig.args[2])),
                            builder.icmp_signed("<", key, spread(args[3], sig.args[3])))
        one = builder.insert_element(ir.Constant(vt, ir.Undefined), args[4], ir.Constant(ir.IntType(32), 0))
        fills = builder.shuffle_vector(one, ir.Constant(vt, ir.Undefined),
                                       ir.Constant(ir.VectorType(ir.IntType(32), vt.count), [0] * vt.count))
        return builder.select(keep, args[0], fills)

    return a(a, first, lo, hi, fill), codegen


# ---------------------------------------------------------------------------------------------
# Across the lanes
# ---------------------------------------------------------------------------------------------
@intrinsic
def hmax(typingctx, v):
    """The largest lane."""
    if not isinstance(v, Vec):
        return None

    def codegen(context, builder, sig, args):
        vt = args[0].type
        return _llvm_call(builder, f"llvm.vector.reduce.fmax.{_suffix(vt)}", vt.element, args, fastmath=("nnan",))

    return v.dtype(v), codegen


@intrinsic
def hsum(typingctx, v):
    """The sum of the lanes (in a tree order, not left to right)."""
    if not isinstance(v, Vec):
        return None

    def codegen(context, builder, sig, args):
        vt = args[0].type
        return _llvm_call(builder, f"llvm.vector.reduce.fadd.{_suffix(vt)}", vt.element,
                          [ir.Constant(vt.element, 0.0), args[0]], fastmath=("reassoc",))

    return v.dtype(v), codegen


@intrinsic
def any_gt(typingctx, v, x):
    """Whether some lane of v exceeds the scalar x."""
    if not (isinstance(v, Vec) and x == v.dtype):
        return None

    def codegen(context, builder, sig, args):
        vt = args[0].type
        one = builder.insert_element(ir.Constant(vt, ir.Undefined), args[1], ir.Constant(ir.IntType(32), 0))
        xs = builder.shuffle_vector(one, ir.Constant(vt, ir.Undefined),
                                    ir.Constant(ir.VectorType(ir.IntType(32), vt.count), [0] * vt.count))
        bits = builder.bitcast(builder.fcmp_ordered(">", args[0], xs), ir.IntType(vt.count))
        return builder.icmp_unsigned("!=", bits, ir.Constant(ir.IntType(vt.count), 0))

    return types.boolean(v, x), codegen


# ---------------------------------------------------------------------------------------------
# 2**x on a register
# ---------------------------------------------------------------------------------------------
def exp2(v):
    """2**v lane by lane, for lanes <= 2**7 or so (rung 4 feeds it s - m_ref <= TAU); 0 below the
    dtype's smallest normal result. The Python meaning; Numba compiles the overload below."""
    return np.exp2(v)


# 2^f on [-1/2, 1/2], degree 5: the minimax polynomial of the relative error (fitted by Lawson's
# iteration of weighted least squares on 200001 points, then rounded to float32). Its error is 9e-8
# exactly and 1.9e-7 (1.6 ulp) evaluated in float32 by Horner, below the 2.4e-7 of the degree-6 Taylor
# polynomial it replaced (simd._POW2_32), with one FMA fewer on every register of P.
_POW2_MINIMAX_32 = (1.0, 0.6931470036506653, 0.24022242426872253, 0.05550733581185341,
                    0.009671482257544994, 0.0013264636509120464)


# Without AVX-512 the lowest argument: 2^n for n = -127 (float32) or -1023 (float64) has exponent bits
# 0, i.e. is 0.0, so a masked score (s - m = -1e30, clamped here) comes out exactly 0 with no compare
# and blend. With AVX-512, vscalefps does the same for any n with no clamp.
@overload(exp2)
def _exp2_impl(v):
    if not isinstance(v, Vec):
        return None
    if v.dtype == types.float32:
        c0, c1, c2, c3, c4, c5 = (np.float32(c) for c in _POW2_MINIMAX_32)
        lowest = np.float32(-127.0)
        clamp = VECTOR_BYTES != 64

        def exp2_32(v):
            x = vmax(v, splat(lowest)) if clamp else v
            n = vround(x)
            f = x - n  # |f| <= 1/2, exact
            p = fma(splat(c5), f, splat(c4))
            p = fma(p, f, splat(c3))
            p = fma(p, f, splat(c2))
            p = fma(p, f, splat(c1))
            p = fma(p, f, splat(c0))  # 2^f by Horner
            return scalef(p, n)

        return exp2_32
    c = _POW2_64
    clamp64 = VECTOR_BYTES != 64

    def exp2_64(v):
        x = vmax(v, splat(-1023.0)) if clamp64 else v
        n = vround(x)
        f = x - n
        p = fma(splat(c[12]), f, splat(c[11]))
        p = fma(p, f, splat(c[10]))
        p = fma(p, f, splat(c[9]))
        p = fma(p, f, splat(c[8]))
        p = fma(p, f, splat(c[7]))
        p = fma(p, f, splat(c[6]))
        p = fma(p, f, splat(c[5]))
        p = fma(p, f, splat(c[4]))
        p = fma(p, f, splat(c[3]))
        p = fma(p, f, splat(c[2]))
        p = fma(p, f, splat(c[1]))
        p = fma(p, f, splat(c[0]))
        return scalef(p, n)

    return exp2_64


@njit(cache=True)
def _exp2_array(x, out):
    """out = exp2(x) a register at a time (len(x) a multiple of the lanes): for the tests."""
    W = lanes(x)
    for i in range(0, x.shape[0], W):
        store(out, i, exp2(load(x, i)))


# ---------------------------------------------------------------------------------------------
# Pointers for C callbacks, and the task queue's counter (rung 4's kernels and the split-K decode)
# ---------------------------------------------------------------------------------------------
@intrinsic
def address(typingctx, a, i):
    """A pointer to element i (flat index) of C-contiguous a, as types.CPointer: one machine word for a C
    callback's argument, where an array travels as its 7-13 fields (data, shape, strides, meminfo...);
    the callee views it again with numba.carray. No bounds check."""
    if not (isinstance(a, types.Array) and a.layout == "C" and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return _pointer(context, builder, sig.args[0], args[0], args[1])

    return types.CPointer(a.dtype)(a, i), codegen


@intrinsic
def array_at(typingctx, ptr, n):
    """The 1-D C array of n elements at ptr (a types.CPointer from `address`): numba.carray's view,
    written as an intrinsic because carray cannot be called in a callback compiled without reference
    counting (numba.cfunc(_nrt=False), as the mods hook is)."""
    if not (isinstance(ptr, types.CPointer) and isinstance(n, types.Integer)):
        return None
    arrty = types.Array(ptr.dtype, 1, "C")

    def codegen(context, builder, sig, args):
        from numba.np.arrayobj import make_array, populate_array

        ary = make_array(arrty)(context, builder)
        intp = context.get_value_type(types.intp)
        itemsize = context.get_abi_sizeof(context.get_data_type(ptr.dtype))
        populate_array(ary, data=args[0], shape=[context.cast(builder, args[1], sig.args[1], types.intp)],
                       strides=[ir.Constant(intp, itemsize)], itemsize=ir.Constant(intp, itemsize), meminfo=None)
        return ary._getvalue()

    return arrty(ptr, n), codegen


@intrinsic
def fetch_add(typingctx, counter, n):
    """counter[0] += n atomically; returns the value before. prange splits its range statically (each
    thread gets its share up front), so a thread the OS deschedules, on a machine busy with other
    work, finishes late and the whole call waits for it; workers that take tasks from a shared
    counter share the work out by how fast each actually runs."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64 and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        data = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=args[0]).data
        step = context.cast(builder, args[1], sig.args[1], types.int64)
        return builder.atomic_rmw("add", data, step, "monotonic")

    return types.int64(counter, n), codegen
