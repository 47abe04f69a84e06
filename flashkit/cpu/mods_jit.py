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
from flashkit.cpu import rung3_gemm
from flashkit.cpu.common import FASTMATH
from flashkit.cpu.rung3_gemm import LOG2E, NUMBA_TYPES, OK, RAISED, tile_signature  # noqa: F401
from flashkit.cpu.simd import fast_exp2
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


_TANH_TAYLOR = (np.float32(1.0), np.float32(-1 / 3), np.float32(2 / 15), np.float32(-17 / 315),
                np.float32(62 / 2835))
_TWO_LOG2E = np.float32(2.0 * LOG2E)


def tanh32(x):
    """tanh of a float32 without a libm call, so LLVM vectorises the loop around it (the overload below;
    np.tanh here, for Python)."""
    return np.tanh(x)


# error_model "numpy": a float division without the ZeroDivisionError test, which would stop LLVM from
# vectorising the loop (measured: 5 ns a score scalar, 0.4 vectorised); 1 + e >= 1 is never 0.
@overload(tanh32, jit_options={"fastmath": {"contract", "nsz"}, "error_model": "numpy"})
def _tanh32_impl(x):
    """(1 - e) / (1 + e) with e = 2^(-2|x| log2 e) from rung 3's exp2 polynomial; below |x| = 1/4, where
    1 - e cancels, the Taylor series to x^9 (the next term is 2e-9 there). Both computed, one selected:
    no branch. An overload, not an njit function: it compiles into its caller, where LLVM can inline it."""
    c0, c1, c2, c3, c4 = _TANH_TAYLOR
    one, quarter, zero, two_log2e = np.float32(1), np.float32(0.25), np.float32(0), _TWO_LOG2E

    def impl(x):
        a = abs(x)
        e = fast_exp2(-a * two_log2e)  # in (0, 1]
        big = (one - e) / (one + e)
        x2 = a * a
        small = a * (c0 + x2 * (c1 + x2 * (c2 + x2 * (c3 + x2 * c4))))
        t = small if a < quarter else big
        return t if x >= zero else -t

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


def compile_hooked(function, signature, score_mod, mask_mod, dtype, **extra):
    """(guarded, inner): `function` (a tile step of rung 3, forward or backward) compiled with the user's
    score_mod and mask_mod as SCORE_MOD / MASK_MOD (and `extra` globals), for `signature`. inner has
    boundscheck on, so a captured array read out of its bounds raises IndexError as in Python; guarded
    turns any exception into RAISED, which the kernel records."""
    hooks = dict(SCORE_MOD=rung3_gemm.no_score_mod if score_mod is None else compiled_mod("score_mod", score_mod, dtype),
                 MASK_MOD=rung3_gemm.every_key if mask_mod is None else compiled_mod("mask_mod", mask_mod, dtype),
                 HAS_SCORE_MOD=score_mod is not None, HAS_MASK_MOD=mask_mod is not None, **extra)
    inner = njit(fastmath=FASTMATH)(hooked(function, **hooks))
    guarded = _make_guard(inner, len(signature.args))
    try:
        with _quiet_compile():
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
