"""The user's score_mod and mask_mod compiled by Numba: per tile, no Python call per score.

FlexAttention compiles the user's Python functions into its Triton kernel. Here Numba does it in three
pieces, so that a new mod costs a fraction of a second to compile instead of a whole attention kernel:

    the user's functions    numba.njit(inline="always") on a copy of each (see `numba_copy`), so they
                            are inlined, as Numba IR, into
    a tile function         rung 3's softmax step of one tile, `rung3_gemm.online_softmax_tile`, copied
                            with the user's functions as its hooks and compiled once per (score_mod,
                            mask_mod, dtype): mask_mod and score_mod on each score, then the row max,
                            the exp and the row sum; and
    the kernel              rung3_gemm's, compiled once per dtype and cached on disk, which takes the
                            tile function as a first-class function argument (a function pointer,
                            numba.types.FunctionType) and calls it once per tile. Rung 3 without mods
                            is the same kernel with the tile step compiled with identity hooks.

Rung 4 (numba-fused, the fastest forward; what backend "numba" runs with mods) takes them the same way,
per micro-tile of 8 rows x 2 registers (256 float32 scores with AVX-512): its kernel stores the scores
of a micro-tile to a scratch row, calls `mod_micro_tile` (the hooks, compiled per mod as a C callback
with the user's functions inlined) through a function pointer and reloads them; the kernel itself is
compiled once per dtype. The call passes 8 machine words: pointers to the scratch, to the task's
constants and to the mask= plane (vec.address; the hook views them with vec.array_at), not arrays,
since an array argument travels as 7-13 words (data, shape, strides, meminfo) and most of them went
through the stack. The library's softcap runs there on whole registers (`softcap_register`: the
rational tanh of tanh32 with explicit vectors, 16 lanes, where LLVM vectorises the scalar loop 8 wide).
Measured on the shared 2-core Xeon (emeraldrapids, load average 4-5 from other jobs, 2026-12-02), fp32:
  * the hook alone, called 2000 times on one micro-tile (fastest of 30 rounds): over a hook that does
    nothing, identity 0.075 ns a score, softcap on registers 0.27, softcap through the scalar loop
    (8 lanes, vdivps) 0.46, 50 * np.tanh(s / 50) (a libm call a score) 10.3;
  * the kernel, one thread, CPU time, fastest of 21-61 interleaved rounds, B=1 H=8 N=1024-2048 d=64,
    against rung 4 without mods, when the hook took 16 arguments with 2 arrays: identity 1.07-1.17x,
    softcap 1.08-1.34x: the load moves these by 5-10%; on rung 3, against the same rung 4, identity
    was 1.25-1.42x and softcap 1.56-1.80x.
Measured on a shared 2-core AMD EPYC (znver5, AVX-512, load average 1.5-4 from other jobs, 2026-12-02), fp32,
B=1 d=64, against rung 4 without mods in the same process:
  * one thread, process CPU time, H=4 N=2048, fastest of 15 interleaved rounds (and the median of the
    rounds' ratios): the kernel with the hook compiled in but never called 1.07x (1.02x); a hook that
    returns at once, called with the 16 arguments 1.13-1.19x (1.14-1.15x), with 6 (the scratch array and 5
    numbers) 1.05x (1.05x); identity as costly as that empty hook (its loop is vectorised): the call's
    arguments were the cost, not the mod. With the 8 words, fastest of 11 rounds: identity 1.08x (1.07x),
    softcap 1.13x (1.13x), ALiBi 1.77x (1.75x); before, 1.09-1.14x, 1.17-1.19x and 2.10x (2.04x).
  * both cores, benchmarks/cpu_mods.py (N=4096, H=8, fastest of 11 interleaved rounds, wall clock;
    benchmarks/results/cpu-mods-amd-epyc-znver5-2c.json): identity 1.047x, softcap 1.112x (median of the
    rounds' ratios 1.043x and 1.108x); run again minutes later in new processes, 0.97-1.20x and 1.22-1.30x
    (the other jobs' load moved). The code before and after, in alternate processes, one thread, H=4
    N=2048, fastest of 15 rounds: identity 1.18-1.19x -> 1.04-1.16x, softcap 1.19-1.24x -> 1.10-1.21x,
    ALiBi 2.09-2.24x -> 1.70-1.86x. The goal (<= 1.10x) is met for identity in the benchmark's run, not
    reliably; not for softcap, whose tanh (19 vector instructions a register, counted from the code, about
    300 a micro-tile beside the 2048 FMAs of the two products) is near the 10% alone.

Backward rung 4 (numba-fused's backward, what "numba" runs with mods since 2026-12-02; rung 3's before) takes
them the same way through `mod_micro_tile_backward`, which also writes score_mod's derivative f'(S) per score
(flashkit.mods_grad's, or softcap's 1 - tanh^2 from the same tanh on registers: softcap_register_grad) for
the kernel's dS = P * (dP - D) * f'(S). Measured on a 2-core AMD EPYC (znver3, AVX2; load average 0.6-0.8),
`python -m benchmarks.cpu_mods --cost-only` (benchmarks/results/cpu-mods-cost-amd-epyc-znver3-2c.json; fp32,
B=1, H=8, N=4096, d=64, both cores, fastest of 7 interleaved rounds, against the backward without a mod
in the same rounds): identity 1.027x, softcap 1.065x (median of the rounds' ratios 1.041x, 1.065x); softcap
on rung 3, the path before, 2.45x. The forward in the same run: identity 1.060x, softcap 1.159x (AVX2's
8-lane tanh weighs more beside two products than beside five). Tried on that machine, each changing nothing
measurable: a vrcpps division in place of vdivps (1.169x), and the softcap applied in rung 4's own registers
instead of through the hook (no store, call and reload: 1.153x, 2026-12-02). What is left is the arithmetic:
11 FMAs, a division and 4 other instructions a register, about 12% of the two products' FMAs there.

The same split serves the block mask: `classify` runs a parallel driver (compiled once) that calls a
per-mask_mod tile classifier through a function pointer.

What a mod may use inside (Numba's nopython mode): arithmetic and comparisons on numbers, `&` and `|` on
bools, NumPy functions of scalars (np.tanh, np.exp, np.log, np.where, np.minimum ...), `if`, calls to
other such functions (they are compiled too), and values captured by closure or as globals: numbers,
tuples, NumPy arrays (lists of numbers are read as arrays). Numba freezes captured arrays into the
compiled code, so compiled code is kept per function and the bytes of what it captured
(flashkit.blockmask.fingerprint): change a captured array and the next call compiles again.

Errors: an exception inside a mod (bounds are checked, as in Python) is caught in the tile function,
which returns RAISED; the kernel records the tile and `explain_raised` re-runs it in Python to raise the
user's own exception with the position named. A NaN or +inf from score_mod is not tested per score (it
would halve the speed of the loop): it makes its output row NaN, and `explain_nonfinite` finds the key.
"""
from __future__ import annotations

import re
import types as pytypes
import warnings
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import numba
from numba import njit, prange, types
from numba.extending import overload

from flashkit import blockmask, mods
from flashkit.cpu import rung3_gemm, rung3_gemm_backward, rung4_fused, rung4_fused_backward, vec
from flashkit.cpu.common import FASTMATH, NEG, row_window
from flashkit.cpu.rung3_gemm import LOG2E, NUMBA_TYPES, OK, RAISED, tile_signature  # noqa: F401
from flashkit.cpu.softcap import TANH_CLAMP, TANH_P, TANH_Q, softcap_register, softcap_register_grad  # noqa: F401
from flashkit.masks import FULL, PARTIAL, SKIP


CLASSIFY_SIGNATURE = types.int64(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64)

SUPPORTED = ("Inside a mod Numba supports arithmetic and comparisons on numbers, & and | on bools, NumPy "
             "functions of scalars (np.tanh, np.log, np.where, np.minimum ...), if, calls to other such "
             "functions, and captured numbers, tuples and NumPy arrays. backend='numpy-tiled' runs any Python.")


# ---------------------------------------------------------------------------------------------
# The user's functions, made compilable
# ---------------------------------------------------------------------------------------------
@overload(mods.where)
def _where_of_scalars(condition, x, y):
    """mods.where in compiled code: a scalar select (np.where of scalars would make 0-d arrays)."""
    if isinstance(condition, (types.Boolean, types.Integer)) and all(isinstance(t, types.Number) for t in (x, y)):
        def select(condition, x, y):
            return x if condition else y
        return select
    return lambda condition, x, y: np.where(condition, x, y)


def tanh32(x):
    """tanh of a float32 without a libm call, so LLVM vectorises the loop around it (the overload below;
    np.tanh here, for Python)."""
    return np.tanh(x)


# error_model "numpy": a float division without the ZeroDivisionError test, which would stop LLVM from
# vectorising the loop (measured: 5 ns a score scalar, 0.4 vectorised); Q(x^2) >= 1 is never 0.
@overload(tanh32, jit_options={"fastmath": {"contract", "nsz"}, "error_model": "numpy"})
def _tanh32_impl(x):
    """The rational function above. An overload, not an njit function: it compiles into its caller,
    where LLVM can inline and vectorise it. (Before: (1 - e) / (1 + e) with e = 2^(-2|x| log2 e) from the
    exp2 polynomial and a Taylor series near 0, 2.8 ulp but 2.2x the time: 0.92 ns a score against 0.42
    in a vectorised loop of the hook's shape, one core, 2026-12-02.)"""
    p0, p1, p2, p3, p4, p5 = TANH_P
    q0, q1, q2, q3, q4 = TANH_Q
    clamp = TANH_CLAMP

    def impl(x):
        x = min(max(x, -clamp), clamp)
        t = x * x
        p = p0 + t * (p1 + t * (p2 + t * (p3 + t * (p4 + t * p5))))
        q = q0 + t * (q1 + t * (q2 + t * (q3 + t * q4)))
        return x * p / q

    return impl


@overload(mods.soft_cap, jit_options={"error_model": "numpy"})  # cap > 0: the division needs no test
def _soft_cap(score, cap):
    """mods.soft_cap compiled: float32 scores stay float32 (a Python float cap would promote them to
    float64) and use tanh32; float64 scores use np.tanh, exact to the last bit."""
    if isinstance(score, types.Float) and score.bitwidth == 32:
        def soft_cap32(score, cap):
            c = np.float32(cap)
            return c * tanh32(score * (np.float32(1) / c))  # a multiply per score: LLVM hoists 1 / c
        return soft_cap32
    return lambda score, cap: cap * np.tanh(score / cap)


_OVERLOADED = {mods.where, mods.soft_cap}  # library functions Numba knows through an overload: never copied


def _for_numba(value, memo):
    """A captured value as Numba should see it: Python functions compiled (inlined), lists of numbers as
    arrays (Numba cannot read a captured list); anything else as it is."""
    if isinstance(value, numba.core.registry.CPUDispatcher) or any(value is f for f in _OVERLOADED):
        return value
    if isinstance(value, pytypes.FunctionType):
        return njit(inline="always")(numba_copy(value, memo))
    if isinstance(value, list) and value and all(isinstance(x, (int, float, bool, np.number)) for x in value):
        return np.asarray(value)
    return value


def numba_copy(fn, memo=None):
    """A copy of the Python function `fn` whose closure cells and globals hold Numba-ready values (see
    `_for_numba`): the same code, so what Numba compiles is what the user wrote."""
    f = blockmask.python_function(fn)
    memo = {} if memo is None else memo
    if id(f) in memo:
        return memo[id(f)]
    cells = []
    for cell in f.__closure__ or ():
        try:
            cells.append(pytypes.CellType(_for_numba(cell.cell_contents, memo)))
        except ValueError:  # an empty cell
            cells.append(cell)
    g = f.__globals__
    changed = {}
    for name in blockmask._referenced_globals(f.__code__):
        if name in g and not isinstance(g[name], pytypes.ModuleType):
            new = _for_numba(g[name], memo)
            if new is not g[name]:
                changed[name] = new
    new_globals = dict(g, **changed) if changed else g
    copy = pytypes.FunctionType(f.__code__, new_globals, f.__name__, f.__defaults__, tuple(cells) or None)
    copy.__qualname__ = f.__qualname__
    memo[id(f)] = copy
    return copy


@contextmanager
def _quiet_compile():
    """Compile without Numba's internal "pedantic check" warning (NumbaIRAssumptionWarning), which inlining
    a function with a conditional expression can raise at IR level: harmless, and in a notebook it would
    be stored as stderr (and vanish when the result comes from a cache)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", numba.core.errors.NumbaIRAssumptionWarning)
        yield


def _short(err) -> str:
    """The useful lines of a Numba error: no colour codes, no 'During: ...' trail."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("During:", "File \""))]
    return " ".join(ln.strip() for ln in lines[:6])


_COMPILED: OrderedDict[tuple, tuple] = OrderedDict()  # (kind, fn, fingerprint, dtype) -> (dispatcher, type)
_KEEP = 64


def _remember(cache, key, value):
    cache[key] = value
    while len(cache) > _KEEP:
        cache.popitem(last=False)
    return value


def compiled_mod(kind: str, fn, dtype=np.float32):
    """`fn` as a Numba function to inline (njit(inline="always")), after compiling it once on its own
    to check what it returns: a bool for a mask_mod, a number for a score_mod; else TypeError."""
    key = (kind, fn, blockmask.fingerprint(fn), np.dtype(dtype))
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key][0]
    jitted = njit(boundscheck=True)(numba_copy(fn))  # see compile_hooked: bounds checked here only
    args = (types.int64,) * 4 if kind == "mask_mod" else (NUMBA_TYPES[np.dtype(dtype)],) + (types.int64,) * 4
    try:
        with _quiet_compile():
            jitted.compile(args)
    except numba.core.errors.NumbaError as err:
        raise TypeError(f"{kind} {blockmask.describe(fn)} could not be compiled by Numba: {_short(err)}. "
                        f"{SUPPORTED}") from None
    returns = jitted.nopython_signatures[-1].return_type
    if isinstance(returns, types.Array) and returns.ndim == 0:
        # np.where(cond, x, y) of scalars gives a 0-d array in Numba (a scalar in NumPy): take its element
        jitted = njit(boundscheck=True)(_element_of(jitted, kind))
        with _quiet_compile():
            jitted.compile(args)
        returns = returns.dtype
    if kind == "mask_mod" and not isinstance(returns, types.Boolean):
        raise TypeError(f"mask_mod {blockmask.describe(fn)} must return a bool (True = may attend); compiled by "
                        f"Numba it returns {returns}")
    if kind == "score_mod":
        if isinstance(returns, types.Boolean):
            raise TypeError(f"score_mod {blockmask.describe(fn)} returns a bool: a score_mod returns the modified "
                            "score (a number); to hide scores, pass a mask_mod")
        if not isinstance(returns, (types.Float, types.Integer)):
            raise TypeError(f"score_mod {blockmask.describe(fn)} must return a number (the modified score); "
                            f"compiled by Numba it returns {returns}")
    return _remember(_COMPILED, key, (jitted, returns))[0]


def _element_of(jitted, kind):
    """A function returning the element of the 0-d array that `jitted` returns."""
    if kind == "mask_mod":
        def element(b, h, q_idx, kv_idx):
            return jitted(b, h, q_idx, kv_idx)[()]
    else:
        def element(score, b, h, q_idx, kv_idx):
            return jitted(score, b, h, q_idx, kv_idx)[()]
    return element


# ---------------------------------------------------------------------------------------------
# The tile function: rung 3's softmax step of a tile with the user's functions as its hooks
# ---------------------------------------------------------------------------------------------
def hooked(function, **hooks):
    """A copy of the module-level Python function `function` whose globals named in `hooks` are replaced
    (Numba reads globals as constants): the same code, other hooks. No disk cache for the copy: its name
    is the original's, and its hooks are the user's."""
    copy = pytypes.FunctionType(function.__code__, dict(function.__globals__, **hooks), function.__name__,
                                function.__defaults__, function.__closure__)
    copy.__qualname__ = function.__qualname__
    return copy


def _make_guard(inner, n_args):
    """njit(guarded) for a function of n_args arguments (Numba takes no *args through a pointer)."""
    names = ", ".join(f"a{i}" for i in range(n_args))
    namespace = {"inner": inner, "RAISED": RAISED}
    exec(f"def guarded({names}):\n    try:\n        return inner({names})\n    except Exception:\n"
         f"        return RAISED\n", namespace)  # noqa: S102  (a fixed template)
    return njit(namespace["guarded"])


def compile_hooked(function, signature, score_mod, mask_mod, dtype, as_callback=False, **extra):
    """(guarded, inner): `function` (a tile step of rung 3, forward or backward, or rung 4's micro-tile
    step) compiled with the user's score_mod and mask_mod as SCORE_MOD / MASK_MOD (and `extra` globals),
    for `signature`. The user's functions have boundscheck on (compiled_mod), so a captured array read
    out of its bounds raises IndexError as in Python; guarded turns any exception into RAISED, which the
    kernel records. as_callback: guarded is a C callback (numba.cfunc) with inner inlined into it, as
    Numba IR: one call, not three, for a step that runs per 256 scores (measured: the chain of calls
    cost rung 4 about 10% with the identity score_mod)."""
    hooks = dict(SCORE_MOD=rung3_gemm.no_score_mod if score_mod is None else compiled_mod("score_mod", score_mod, dtype),
                 MASK_MOD=rung3_gemm.every_key if mask_mod is None else compiled_mod("mask_mod", mask_mod, dtype),
                 HAS_SCORE_MOD=score_mod is not None, HAS_MASK_MOD=mask_mod is not None, **extra)
    try:
        with _quiet_compile():
            if as_callback:
                inner = njit(fastmath=FASTMATH, inline="always")(hooked(function, **hooks))
                # _nrt=False: no reference counts on the arrays passed in (an atomic increment and decrement
                # per call and array, on a cache line the threads share for mask=)
                guarded = numba.cfunc(signature, fastmath=FASTMATH, _nrt=False)(
                    _make_guard(inner, len(signature.args)).py_func)
            else:
                inner = njit(fastmath=FASTMATH)(hooked(function, **hooks))
                guarded = _make_guard(inner, len(signature.args))
                inner.compile(signature)
                guarded.compile(signature)
    except numba.core.errors.NumbaError as err:
        which = " and ".join(f"{k} {blockmask.describe(f)}" for k, f in (("score_mod", score_mod),
                                                                          ("mask_mod", mask_mod)) if f)
        raise TypeError(f"{which} could not be compiled into the tile loop by Numba: {_short(err)}. "
                        f"{SUPPORTED}") from None
    return guarded, inner


_TILES: OrderedDict[tuple, tuple] = OrderedDict()


def mods_key(score_mod, mask_mod, dtype):
    return (score_mod, None if score_mod is None else blockmask.fingerprint(score_mod),
            mask_mod, None if mask_mod is None else blockmask.fingerprint(mask_mod), np.dtype(dtype))


def tile_function(score_mod, mask_mod, dtype, with_inner=False):
    """The compiled tile step (a dispatcher the kernel calls through a function pointer) of this
    (score_mod, mask_mod) pair for `dtype`; with_inner=True also the function the mods are inlined in."""
    dtype = np.dtype(dtype)
    key = mods_key(score_mod, mask_mod, dtype)
    if key not in _TILES:
        _remember(_TILES, key, compile_hooked(rung3_gemm.online_softmax_tile, tile_signature(dtype),
                                              score_mod, mask_mod, dtype))
    _TILES.move_to_end(key)
    guarded, inner = _TILES[key]
    return (guarded, inner) if with_inner else guarded


_BACKWARD_TILES: OrderedDict[tuple, tuple] = OrderedDict()


def backward_tile_function(score_mod, mask_mod, dtype):
    """The compiled backward tile step (rung3_gemm_backward.tile_dS) with these mods and score_mod's
    derivative (flashkit.mods_grad: NotDifferentiable, a TypeError, if it cannot be written)."""
    from flashkit import mods_grad
    from flashkit.cpu import rung3_gemm_backward as backward

    dtype = np.dtype(dtype)
    key = mods_key(score_mod, mask_mod, dtype)
    if key not in _BACKWARD_TILES:
        extra = {}
        if score_mod is not None:
            extra["D_SCORE_MOD"] = compiled_mod("score_mod", mods_grad.derivative(score_mod), dtype)
        _remember(_BACKWARD_TILES, key, compile_hooked(backward.tile_dS, backward.tile_signature(dtype), score_mod,
                                                       mask_mod, dtype, **extra))
    _BACKWARD_TILES.move_to_end(key)
    return _BACKWARD_TILES[key][0]


# ---------------------------------------------------------------------------------------------
# Rung 4 with the mods: the same hooks on its micro-tile (8 rows x 2 registers of scores)
# ---------------------------------------------------------------------------------------------
SCORE_MOD, MASK_MOD = rung3_gemm.no_score_mod, rung3_gemm.every_key  # replaced in each compiled copy
HAS_SCORE_MOD, HAS_MASK_MOD = False, False
NR = 32  # keys of a micro-tile (2 registers): set for the dtype in each compiled copy
SOFTCAP = 0.0  # the cap of mods.softcap as score_mod (float32): its whole micro-tiles in registers


def mod_micro_tile(Sb_at, q0, key0, nr_left, nc_left, partial, task_at, mask_at):
    """The hooks of rung 4 (rung4_fused.forward_kernel calls this through a function pointer): Sb holds
    the MR x NR scores of rows q0.., keys key0.. (natural units with a score_mod, which this converts to
    base 2); task holds (b, h, Nq, Nk, left, right, has_mask), mask the (Nq, Nk) plane of mask= for this
    head. A whole micro-tile of a tile that is not PARTIAL: score_mod on every score, no test per
    score (LLVM vectorises the loop). Else each score is first checked: hidden by the window, mask=, the
    tile's edge (r >= nr_left, c >= nc_left) or mask_mod -> NEG, never asked to score_mod (as in rung 3)."""
    MR = rung4_fused.MR
    Sb = vec.array_at(Sb_at, MR * NR)  # views of the kernel's buffers (pointers: see forward_kernel)
    task = vec.array_at(task_at, 7)
    b, h, Nq, Nk, left, right, has_mask = task[0], task[1], task[2], task[3], task[4], task[5], task[6] != 0
    neg = Sb.dtype.type(NEG)
    inf = Sb.dtype.type(np.inf)
    to_base2 = Sb.dtype.type(LOG2E)
    if SOFTCAP > 0 and not partial and nr_left >= MR and nc_left >= NR:  # the library's softcap, float32
        inv_cap, cap_base2 = Sb.dtype.type(1.0 / SOFTCAP), Sb.dtype.type(SOFTCAP * LOG2E)
        for i in range(0, MR * NR, vec.lanes(Sb)):
            vec.store(Sb, i, softcap_register(vec.load(Sb, i), inv_cap, cap_base2))
        return OK
    if HAS_SCORE_MOD and not partial and nr_left >= MR and nc_left >= NR:
        # one flat loop, which LLVM vectorises (rows of NR = 32 keys, a constant, were unrolled into scalar code)
        for i in range(MR * NR):
            # -inf from score_mod stays -inf: rung 4's exp2 gives 0 for it, its lazy max never moves to
            # it. NaN becomes +inf, which makes the row's m_ref +inf and its output NaN (see run_fused).
            t = SCORE_MOD(Sb[i], b, h, q0 + i // NR, key0 + i % NR) * to_base2
            Sb[i] = t if t == t else inf
        return OK
    if not HAS_SCORE_MOD and not has_mask and nr_left >= MR and nc_left >= NR:
        for i in range(MR * NR):  # mask_mod alone on a whole micro-tile: no branch per score (it is
            q_idx, kv_idx = q0 + i // NR, key0 + i % NR  # defined at every position of the tile), so LLVM
            lo, hi = row_window(q_idx, Nq, Nk, left, right)  # vectorises the loop
            keep = (kv_idx >= lo) & (kv_idx < hi) & MASK_MOD(b, h, q_idx, kv_idx)
            Sb[i] = Sb[i] if keep else neg
        return OK
    mask = vec.array_at(mask_at, Nq * Nk)  # read only where has_mask
    for r in range(MR):
        q_idx = q0 + r
        lo, hi = row_window(q_idx, Nq, Nk, left, right)
        for c in range(NR):
            kv_idx = key0 + c
            if r >= nr_left or c >= nc_left or kv_idx < lo or kv_idx >= hi or (has_mask and not mask[q_idx * Nk + kv_idx]):
                Sb[r * NR + c] = neg
            elif HAS_MASK_MOD and partial and not MASK_MOD(b, h, q_idx, kv_idx):
                Sb[r * NR + c] = neg
            elif HAS_SCORE_MOD:
                t = SCORE_MOD(Sb[r * NR + c], b, h, q_idx, kv_idx) * to_base2
                Sb[r * NR + c] = t if t == t else inf
    return OK


def micro_tile_signature(dtype):
    """int64 mod_micro_tile(Sb, q0, key0, nr_left, nc_left, partial, task, mask): what rung 4's kernel
    passes, Sb, task and mask as pointers (vec.address)."""
    dt = NUMBA_TYPES[np.dtype(dtype)]
    i8 = types.int64
    return types.int64(types.CPointer(dt), i8, i8, i8, i8, types.boolean, types.CPointer(i8),
                       types.CPointer(types.boolean))


def micro_tile_keys(dtype):
    """NR, the keys of rung 4's micro-tile: two registers of dtype."""
    return 2 * (vec.VECTOR_BYTES // np.dtype(dtype).itemsize)


_MICRO_TILES: OrderedDict[tuple, object] = OrderedDict()


def micro_tile_function(score_mod, mask_mod, dtype):
    """mod_micro_tile compiled with these mods, as a C callback (numba.cfunc): rung 4's kernel takes it
    as a function pointer of one type, so the kernel is compiled once per dtype (and cached on disk)
    whatever the mods; a new mod compiles only this."""
    dtype = np.dtype(dtype)
    key = mods_key(score_mod, mask_mod, dtype)
    if key not in _MICRO_TILES:
        cap = mods.softcap_cap(score_mod) if dtype == np.float32 else 0.0
        _remember(_MICRO_TILES, key, compile_hooked(mod_micro_tile, micro_tile_signature(dtype), score_mod, mask_mod,
                                                    dtype, as_callback=True, SOFTCAP=float(cap),
                                                    NR=micro_tile_keys(dtype)))
    _MICRO_TILES.move_to_end(key)
    return _MICRO_TILES[key][0]


# ---------------------------------------------------------------------------------------------
# Backward rung 4 with the mods: the same hooks on its micro-tile, and score_mod's derivative beside
# ---------------------------------------------------------------------------------------------
D_SCORE_MOD = rung3_gemm_backward.unit_slope  # replaced in each compiled copy by flashkit.mods_grad's derivative


def mod_micro_tile_backward(Sb_at, Fb_at, q0, key0, nr_left, nc_left, partial, task_at, mask_at):
    """The hooks of backward rung 4 (rung4_fused_backward.key_block calls this through a function pointer):
    as mod_micro_tile, on the backward's MR x NR micro-tile, and with a score_mod f also f'(s) of each score
    into Fb (0 where the score is hidden), which the kernel multiplies into dS = P * (dP - D) (the chain rule
    through f, rung 3's tile_dS). Sb holds S = q . k * scale (natural units) with a score_mod, which this
    converts to base 2 (f(S) log2 e), S' = S log2 e without one."""
    MR = rung4_fused_backward.MR
    Sb = vec.array_at(Sb_at, MR * NR)
    Fb = vec.array_at(Fb_at, MR * NR)
    task = vec.array_at(task_at, 7)
    b, h, Nq, Nk, left, right, has_mask = task[0], task[1], task[2], task[3], task[4], task[5], task[6] != 0
    neg = Sb.dtype.type(NEG)
    inf = Sb.dtype.type(np.inf)
    zero = Sb.dtype.type(0)
    to_base2 = Sb.dtype.type(LOG2E)
    whole = not partial and nr_left >= MR and nc_left >= NR
    if SOFTCAP > 0 and whole:  # the library's softcap, float32: both from one tanh, on whole registers
        inv_cap, cap_base2 = Sb.dtype.type(1.0 / SOFTCAP), Sb.dtype.type(SOFTCAP * LOG2E)
        for i in range(0, MR * NR, vec.lanes(Sb)):
            t, f = softcap_register_grad(vec.load(Sb, i), inv_cap, cap_base2)
            vec.store(Sb, i, t)
            vec.store(Fb, i, f)
        return OK
    if HAS_SCORE_MOD and whole:
        for i in range(MR * NR):  # one flat loop (LLVM vectorises it where the mod allows)
            s = Sb[i]
            t = SCORE_MOD(s, b, h, q0 + i // NR, key0 + i % NR) * to_base2
            Sb[i] = t if t == t else inf  # NaN: +inf, P overflows to 2^64 and the lse check fails loudly
            Fb[i] = D_SCORE_MOD(s, b, h, q0 + i // NR, key0 + i % NR) if t > neg else zero
        return OK
    if not HAS_SCORE_MOD and not has_mask and nr_left >= MR and nc_left >= NR:
        for i in range(MR * NR):  # mask_mod alone on a whole micro-tile: branch-free, as in the forward
            q_idx, kv_idx = q0 + i // NR, key0 + i % NR
            lo, hi = row_window(q_idx, Nq, Nk, left, right)
            keep = (kv_idx >= lo) & (kv_idx < hi) & MASK_MOD(b, h, q_idx, kv_idx)
            Sb[i] = Sb[i] if keep else neg
        return OK
    mask = vec.array_at(mask_at, Nq * Nk)  # read only where has_mask
    for r in range(MR):
        q_idx = q0 + r
        lo, hi = row_window(q_idx, Nq, Nk, left, right)
        for c in range(NR):
            kv_idx = key0 + c
            i = r * NR + c
            if r >= nr_left or c >= nc_left or kv_idx < lo or kv_idx >= hi or (has_mask and not mask[q_idx * Nk + kv_idx]):
                Sb[i] = neg
                Fb[i] = zero
            elif HAS_MASK_MOD and partial and not MASK_MOD(b, h, q_idx, kv_idx):
                Sb[i] = neg
                Fb[i] = zero
            elif HAS_SCORE_MOD:
                s = Sb[i]
                t = SCORE_MOD(s, b, h, q_idx, kv_idx) * to_base2
                Sb[i] = t if t == t else inf
                Fb[i] = D_SCORE_MOD(s, b, h, q_idx, kv_idx) if t > neg else zero
    return OK


def micro_tile_backward_signature(dtype):
    """int64 mod_micro_tile_backward(Sb, Fb, q0, key0, nr_left, nc_left, partial, task, mask): Sb, Fb, task
    and mask as pointers (vec.address)."""
    dt = NUMBA_TYPES[np.dtype(dtype)]
    i8 = types.int64
    return types.int64(types.CPointer(dt), types.CPointer(dt), i8, i8, i8, i8, types.boolean, types.CPointer(i8),
                       types.CPointer(types.boolean))


_MICRO_TILES_BACKWARD: OrderedDict[tuple, object] = OrderedDict()


def micro_tile_backward_function(score_mod, mask_mod, dtype):
    """mod_micro_tile_backward compiled with these mods and score_mod's derivative (flashkit.mods_grad:
    NotDifferentiable, a TypeError, when it cannot be written), as a C callback, as micro_tile_function."""
    from flashkit import mods_grad

    dtype = np.dtype(dtype)
    key = mods_key(score_mod, mask_mod, dtype)
    if key not in _MICRO_TILES_BACKWARD:
        extra = {}
        if score_mod is not None:
            extra["D_SCORE_MOD"] = compiled_mod("score_mod", mods_grad.derivative(score_mod), dtype)
        cap = mods.softcap_cap(score_mod) if dtype == np.float32 else 0.0
        _remember(_MICRO_TILES_BACKWARD, key, compile_hooked(
            mod_micro_tile_backward, micro_tile_backward_signature(dtype), score_mod, mask_mod, dtype,
            as_callback=True, SOFTCAP=float(cap), NR=micro_tile_keys(dtype), **extra))
    _MICRO_TILES_BACKWARD.move_to_end(key)
    return _MICRO_TILES_BACKWARD[key][0]


def micro_tile_asm(score_mod=None, mask_mod=None, dtype=np.float32) -> str:
    """The machine code of rung 4's micro-tile step with these mods inlined (the loops of
    mod_micro_tile), compiled apart as a plain function for the reading (the callback's own code is the
    same body behind a C entry point)."""
    dtype = np.dtype(dtype)
    cap = mods.softcap_cap(score_mod) if dtype == np.float32 else 0.0
    _, inner = compile_hooked(mod_micro_tile, micro_tile_signature(dtype), score_mod, mask_mod, dtype, SOFTCAP=float(cap),
                              NR=micro_tile_keys(dtype))
    return inner.inspect_asm(micro_tile_signature(dtype).args)


def run_fused(problem, stats=False):
    """(O, lse) of a Problem with mods on rung 4 (numba-fused), the fastest forward: rung 4's packing and
    kernel, with the mods' function pointer, the BlockMask's empty tiles skipped (rung3_gemm.tiles_to_run)."""
    from flashkit.cpu import threads
    from flashkit.cpu.common import _NO_MASK
    from flashkit.cpu.vec import VECTOR_BYTES

    Q, K, V = (np.ascontiguousarray(x) for x in (problem.Q, problem.K, problem.V))
    B, Hkv, Nk, d = K.shape
    W = VECTOR_BYTES // Q.dtype.itemsize
    Br, Bc, BcP, Dp = rung4_fused.blocks(problem, Q.dtype.itemsize, W)
    Tc = -(-Nk // Bc)
    KP = np.empty((B, Hkv, Tc * BcP * d), Q.dtype)
    VP = np.empty((B, Hkv, Tc * BcP * Dp), Q.dtype)
    bmap = rung3_gemm.tiles_to_run(problem, Br, Bc)
    has_mask = problem.mask is not None
    mask = (np.ascontiguousarray(problem.mask, dtype=np.bool_) if has_mask else _NO_MASK).view()
    mask.setflags(write=False)  # one kernel specialisation for every call with mods
    left, right = (int(w) for w in problem.window)
    O, lse = problem.new_outputs()
    Tr = bmap.shape[2]
    tiles = np.zeros(problem.B * problem.Hq * Tr, np.int64)
    errors = np.full((tiles.size, 2), OK, np.int64)
    hook = micro_tile_function(problem.score_mod, problem.mask_mod, Q.dtype)
    # The kernel multiplies Q by scale * log2(e); a score_mod must see q . k * scale, and the hook
    # converts its result to base 2, so then the kernel is given scale / log2(e).
    scale = float(problem.scale) / (LOG2E if problem.score_mod is not None else 1.0)
    with threads.for_work(problem.flops()):
        rung4_fused.pack_kv(K, V, Bc, BcP, Dp, KP, VP)
        rung4_fused.forward_kernel(Q, KP, VP, Nk, scale, left, right, mask, has_mask, bmap, Br, Bc, BcP, Dp, O, lse,
                                   tiles, numba.get_num_threads(), hook, problem.score_mod is not None, errors)
    # a NaN or +inf score makes its row's m_ref +inf, and O and lse NaN or +inf: explained, raised
    lse_check = np.where(lse == np.inf, np.nan, lse) if problem.score_mod is not None else lse
    explain_errors(problem, errors, Br, Bc, Tr, lse_check)
    return (O, lse, tiles) if stats else (O, lse)


def check_gradients(problem, dQ, dK, dV):
    """After a backward with a score_mod: ValueError if a gradient is NaN or infinite, which only the
    derivative of score_mod can cause there (the forward checked the scores themselves)."""
    for name, g in (("dq", dQ), ("dk", dK), ("dv", dV)):
        if not np.isfinite(g).all():
            raise ValueError(f"{name} has NaN or infinite entries: the derivative of score_mod "
                             f"{blockmask.describe(problem.score_mod)} with respect to the score is not finite at "
                             "some visible score (a sqrt or log at 0, a division by zero?); make it finite where "
                             "the score is visible")


def tile_asm(score_mod=None, mask_mod=None, dtype=np.float32) -> str:
    """The machine code of the tile loop with these mods inlined (what notebook 13 shows)."""
    _, inner = tile_function(score_mod, mask_mod, dtype, with_inner=True)
    return inner.inspect_asm(tile_signature(dtype).args)


# ---------------------------------------------------------------------------------------------
# Errors found in compiled code, explained in Python
# ---------------------------------------------------------------------------------------------
def _tile_scores(problem, b, h, i0, i1, j0, j1):
    """The float64 scores of a tile, -inf where causal, window or mask= hide them (as the kernel had them)."""
    from flashkit.cpu.common import row_window

    Q = problem.Q[b, h].astype(np.float64)
    K = problem.K[b, h // problem.group].astype(np.float64)
    S = (Q[i0:i1] @ K[j0:j1].T) * problem.scale  # (nr, nc)
    keys = np.arange(j0, j1)
    for r in range(i1 - i0):
        lo, hi = row_window.py_func(i0 + r, problem.Nq, problem.Nk, *problem.window)
        S[r, (keys < lo) | (keys >= hi)] = -np.inf
    if problem.mask is not None:
        Bm, Hm = problem.mask.shape[:2]
        S[~problem.mask[b if Bm > 1 else 0, h if Hm > 1 else 0, i0:i1, j0:j1]] = -np.inf
    return S


def explain_errors(problem, errors, Br, Bc, Tr, lse=None):
    """After a forward kernel: raise the error of the first task that recorded one (errors[t] = code, key
    block j; flashkit.cpu.common.task_index numbers the tasks), and, with a score_mod, the NaN or +inf it
    gave (its output rows are NaN, `lse` too). Nothing if all went well."""
    from flashkit.cpu.common import task_index

    failed = np.flatnonzero(errors[:, 0] != OK)
    if failed.size:  # an exception inside a mod: raised again from Python, with its position
        t = int(failed[0])
        b, h, i = (int(x) for x in task_index.py_func(t, problem.Hq, Tr))
        j = int(errors[t, 1])
        i0, j0 = i * Br, j * Bc
        explain_raised(problem, b, h, i0, min(i0 + Br, problem.Nq), j0, min(j0 + Bc, problem.Nk))
    if problem.score_mod is not None and lse is not None:
        bad = np.isnan(lse)
        if bad.any():
            explain_nonfinite(problem, *(int(x) for x in np.argwhere(bad)[0]))


def explain_raised(problem, b, h, i0, i1, j0, j1, backward=False):
    """Raise the exception the compiled tile of rows [i0, i1), keys [j0, j1) of (b, h) caught: the tile
    is evaluated again in Python (flashkit.blockmask), which raises the user's own exception with the
    function and the position named (in the backward, score_mod's derivative is evaluated too)."""
    S = _tile_scores(problem, b, h, i0, i1, j0, j1)
    q_idx, kv_idx = np.arange(i0, i1)[:, None], np.arange(j0, j1)[None, :]
    S_mod = blockmask.apply_mods(S, problem.score_mod, problem.mask_mod, b, h, q_idx, kv_idx)  # raises, normally
    if backward and problem.score_mod is not None:
        from flashkit import mods_grad

        blockmask.evaluate("score_mod", mods_grad.derivative(problem.score_mod), (S, b, h, q_idx, kv_idx),
                           where=S_mod > -np.inf)
    _raise_unexplained(problem.score_mod, problem.mask_mod, b, h, i0, i1, j0, j1)


def explain_nonfinite(problem, b, h, q_idx):
    """Raise ValueError for the output row (b, h, q_idx) that came out NaN: a score_mod gave NaN or +inf
    on one of its visible scores. The row is evaluated in Python to name the first such key."""
    S = _tile_scores(problem, b, h, q_idx, q_idx + 1, 0, problem.Nk)[0]  # (Nk,)
    keys = np.arange(problem.Nk)
    if problem.mask_mod is not None:
        S[~blockmask.evaluate("mask_mod", problem.mask_mod, (b, h, q_idx, keys))] = -np.inf
    visible = np.flatnonzero(S > -np.inf)
    name = blockmask.describe(problem.score_mod)
    for kv_idx in visible:
        score = problem.dtype.type(S[kv_idx])
        value = _call_quietly(problem.score_mod, (score, b, h, q_idx, int(kv_idx)))
        if not (isinstance(value, (float, int, np.number)) and value < np.inf):
            raise ValueError(f"score_mod {name} returned {value} at b={b}, h={h}, q_idx={q_idx}, kv_idx={kv_idx} "
                             f"(score {float(score):.6g}); a score_mod must return a finite score, or -inf to hide it")
    raise ValueError(f"score_mod {name} gave a NaN or +inf score in the compiled kernel for b={b}, h={h}, "
                     f"q_idx={q_idx} (its output row is NaN), though called from Python it returns finite scores "
                     "there; a score_mod must return a finite score, or -inf to hide it")


def _call_quietly(fn, args):
    with np.errstate(all="ignore"):
        try:
            return fn(*args)
        except Exception as exc:  # only for the message
            return f"({type(exc).__name__} when called from Python)"


def _raise_unexplained(score_mod, mask_mod, b, h, i0, i1, j0, j1):
    names = " or ".join(f"{k} {blockmask.describe(f)}" for k, f in (("score_mod", score_mod), ("mask_mod", mask_mod))
                        if f is not None)
    raise RuntimeError(f"{names} raised an exception in Numba's compiled code for b={b}, h={h}, q_idx in "
                       f"[{i0}, {i1}), kv_idx in [{j0}, {j1}), but the same calls from Python do not raise; "
                       "run it with backend='numpy-tiled' to see the Python behaviour")


# ---------------------------------------------------------------------------------------------
# The block mask: every tile classified by compiled code
# ---------------------------------------------------------------------------------------------
def _make_classifier(mask_fn):
    def classify_tile(b, h, i0, i1, j0, j1):
        # SKIP if mask_fn is False everywhere in the tile, FULL if True everywhere, else PARTIAL
        seen_true = False
        seen_false = False
        for q_idx in range(i0, i1):
            for kv_idx in range(j0, j1):
                if mask_fn(b, h, q_idx, kv_idx):
                    seen_true = True
                else:
                    seen_false = True
                if seen_true and seen_false:
                    return PARTIAL  # mixed: no need to look further
        return FULL if seen_true else SKIP

    inner = njit(boundscheck=True)(classify_tile)

    def guarded(b, h, i0, i1, j0, j1):
        try:
            return inner(b, h, i0, i1, j0, j1)
        except Exception:
            return RAISED

    return njit(guarded)


_CLASSIFIERS: OrderedDict[tuple, object] = OrderedDict()


@njit(types.void(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64,
                 types.FunctionType(CLASSIFY_SIGNATURE), types.Array(types.int8, 4, "C")),
      parallel=True, cache=True)
def classify_kernel(Nq, Nk, Br, Bc, B, H, classify_tile, tiles):
    """tiles[b, h, i, j] = the state of each tile, by `classify_tile` (a per-mask_mod function pointer);
    -1 where the mask_mod raised. One task per tile, all cores."""
    Tr, Tc = tiles.shape[2], tiles.shape[3]
    for t in prange(B * H * Tr * Tc):
        b = np.int64(t // (H * Tr * Tc))
        h = np.int64((t // (Tr * Tc)) % H)
        i = np.int64((t // Tc) % Tr)
        j = np.int64(t % Tc)
        i0, j0 = i * Br, j * Bc
        state = classify_tile(b, h, i0, min(i0 + Br, Nq), j0, min(j0 + Bc, Nk))
        tiles[b, h, i, j] = -1 if state < 0 else state


def classify(mask_mod, B: int, H: int, Nq: int, Nk: int, Br: int, Bc: int) -> np.ndarray:
    """(B, H, Tr, Tc) int8 tile states of mask_mod, computed in parallel by compiled code."""
    key = (mask_mod, blockmask.fingerprint(mask_mod))
    if key not in _CLASSIFIERS:
        classifier = _make_classifier(compiled_mod("mask_mod", mask_mod))
        try:
            with _quiet_compile():
                classifier.compile(CLASSIFY_SIGNATURE)
        except numba.core.errors.NumbaError as err:
            raise TypeError(f"mask_mod {blockmask.describe(mask_mod)} could not be compiled by Numba: "
                            f"{_short(err)}. {SUPPORTED}") from None
        _remember(_CLASSIFIERS, key, classifier)
    _CLASSIFIERS.move_to_end(key)
    tiles = np.empty((B, H, -(-Nq // Br), -(-Nk // Bc)), np.int8)
    classify_kernel(Nq, Nk, Br, Bc, B, H, _CLASSIFIERS[key], tiles)
    if (tiles < 0).any():
        b, h, i, j = (int(x) for x in np.argwhere(tiles < 0)[0])
        i0, j0 = i * Br, j * Bc
        i1, j1 = min(i0 + Br, Nq), min(j0 + Bc, Nk)
        blockmask.evaluate("mask_mod", mask_mod, blockmask.index_grid(b, h, i0, i1, j0, j1))  # raises, normally
        _raise_unexplained(None, mask_mod, b, h, i0, i1, j0, j1)
    return tiles


def tile_ns_per_score(score_mod=None, mask_mod=None, dtype=np.float32, Br: int = 128, Bc: int = 128,
                      repeats: int = 200, partial: bool = False) -> float:
    """Nanoseconds per score of the compiled tile step alone (the mods, then the row max, the exp and
    the row sum), on one Br x Bc tile of random scores (a FULL tile unless partial=True): compare with
    `tile_ns_per_score()` (no mod) to see what a mod adds to each score. Fastest of `repeats` calls,
    the tile refilled before each (the refill is timed apart and subtracted)."""
    import time

    fn = rung3_gemm.plain_tile(dtype) if score_mod is None and mask_mod is None else \
        tile_function(score_mod, mask_mod, dtype)
    S0 = np.random.default_rng(0).standard_normal((Br, Bc)).astype(dtype)
    S = S0.copy()
    m, l, alpha = np.full(Br, -1e30, dtype), np.zeros(Br, dtype), np.empty(Br, dtype)
    fn(S, 0, 0, 0, 0, partial, m, l, alpha)  # first call outside the timing
    best = np.inf
    for _ in range(repeats):
        S[...] = S0
        m[:] = -1e30
        t0 = time.perf_counter()
        fn(S, 0, 0, 0, 0, partial, m, l, alpha)
        best = min(best, time.perf_counter() - t0)
    return best / (Br * Bc) * 1e9
