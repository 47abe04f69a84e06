"""score_mod and mask_mod evaluated in NumPy, and the BlockMask: which tiles a mask_mod leaves empty.

FlexAttention's two hooks (flashkit/mods.py has the library of them):

    score_mod(score, b, h, q_idx, kv_idx) -> score   applied to every visible score q_i . k_j * scale
    mask_mod(b, h, q_idx, kv_idx) -> bool            False hides the score (as -inf would)

The reference and the NumPy twin evaluate a mod on a whole grid of positions at once: they call it with
broadcasting index arrays (q_idx a column, kv_idx a row), which works for functions written with
arithmetic, comparisons, `&`, `|`, np.where and captured arrays. A function that cannot take arrays
(`if`, `and`, math.tanh, ...) is called once per score instead: slow, the same answer. Either way the
result is checked: a mask_mod must give bools, a score_mod numbers that are not NaN or +inf (-inf hides
the score, as in FlexAttention), and an exception inside the user's function is re-raised naming the
function and the position (b, h, q_idx, kv_idx) where it happened.

A BlockMask (`block_mask(mask_mod, B, H, Nq, Nk, block_size)`) is the (B|1, H|1, Tr, Tc) classification
of the Br x Bc tiles of the score matrix, as flashkit.masks names them: SKIP (no visible score, never
computed), PARTIAL (masked element by element) and FULL (every score visible: mask_mod is not even
called). It costs one evaluation of mask_mod per score, so make it once and pass it to every call
(`attention(..., block_mask=bm)`), as FlexAttention's create_block_mask is meant to be used.
"""
from __future__ import annotations

import dis
import inspect
import numbers
import types
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Tuple

import numpy as np

from flashkit.masks import FULL, PARTIAL, SKIP

SCORE_ARGS = ("score", "b", "h", "q_idx", "kv_idx")
MASK_ARGS = ("b", "h", "q_idx", "kv_idx")
DEFAULT_BLOCK = 128  # FlexAttention's default BLOCK_SIZE, and rung 3's preferred tile


# ---------------------------------------------------------------------------------------------
# Naming a user's function, and what it reads
# ---------------------------------------------------------------------------------------------
def python_function(fn):
    """The plain Python function behind `fn` (a Numba dispatcher keeps it as .py_func)."""
    return getattr(fn, "py_func", fn)


def describe(fn) -> str:
    """'name' (file:line), for error messages: which of the user's functions went wrong."""
    f = python_function(fn)
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or repr(f)
    code = getattr(f, "__code__", None)
    if code is None or code.co_filename.endswith(("flashkit/mods.py", "flashkit\\mods.py")):
        return repr(name)  # the library's own mods carry their parameters in their name
    return f"{name!r} ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})"


def _referenced_globals(code) -> set:
    """Global names the code (and the code of functions defined inside it) may load."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _referenced_globals(const)
    return names


def captured_values(fn, _seen=None):
    """(name, value) for every value `fn` reads from outside: its closure cells and the globals its code
    names, and those of the Python functions among them, recursively. What Numba freezes into the
    compiled code, and what a BlockMask depends on besides positions."""
    f = python_function(fn)
    _seen = set() if _seen is None else _seen
    if id(f) in _seen or not isinstance(f, types.FunctionType):
        return []
    _seen.add(id(f))
    out = []
    cells = zip(f.__code__.co_freevars, f.__closure__ or ())
    found = []
    for name, cell in cells:
        try:
            found.append((name, cell.cell_contents))
        except ValueError:  # an empty cell (a name assigned after the function was made)
            continue
    g = f.__globals__
    found += [(name, g[name]) for name in sorted(_referenced_globals(f.__code__)) if name in g]
    for name, value in found:
        if isinstance(value, types.ModuleType):
            continue
        if isinstance(python_function(value), types.FunctionType):
            out += captured_values(value, _seen)
        else:
            out.append((name, value))
    return out


def fingerprint(fn, contents: bool = True) -> tuple:
    """A hashable summary of the values `fn` captures: arrays by shape, dtype and a CRC of their bytes.

    Numba freezes captured arrays when it compiles, and a BlockMask is only right for the values it
    was made with; both compare fingerprints, so changing a captured array in place is noticed.
    contents=False summarises a NumPy array by shape, dtype and identity instead of its bytes: what
    code that reads the array at run time depends on (flashkit.gpu.modlang's cache), without a pass
    over it (a CRC of a 64K-element document-id array is about 0.2 ms, in every call). An array
    captured twice (a document mask's query and key ids) is read once."""
    crcs = {}

    def summary(v):
        if isinstance(v, np.ndarray):
            if not contents:
                return ("array", v.shape, v.dtype.str, id(v))
            if id(v) not in crcs:
                crcs[id(v)] = zlib.crc32(np.ascontiguousarray(v).view(np.uint8))
            return ("array", v.shape, v.dtype.str, crcs[id(v)])
        if isinstance(v, (numbers.Number, np.generic, str, bytes, type(None))):
            return ("value", type(v).__name__, v)
        if isinstance(v, (tuple, list)):
            return (type(v).__name__,) + tuple(summary(x) for x in v)
        return ("object", type(v).__name__, id(v))

    return tuple((name, summary(v)) for name, v in captured_values(fn))


def reads_batch_head(mask_mod) -> Tuple[bool, bool]:
    """(reads b, reads h): whether the function's code uses its batch and head arguments at all.

    A mask that ignores them (causal, a document mask) needs one block map for every head, not B * H
    of them. Read from the bytecode; mods combined by flashkit.mods.and_masks/or_masks look at their
    parts. Anything unclear counts as read."""
    parts = getattr(python_function(mask_mod), "__flashkit_parts__", None)
    if parts is not None:
        found = [reads_batch_head(p) for p in parts]
        return any(r[0] for r in found), any(r[1] for r in found)
    f = python_function(mask_mod)
    code = getattr(f, "__code__", None)
    if code is None or code.co_argcount < 2:
        return True, True
    b_name, h_name = code.co_varnames[0], code.co_varnames[1]
    loaded = set()
    for ins in dis.get_instructions(code):
        if ins.opname.startswith(("LOAD_FAST", "LOAD_DEREF", "LOAD_CLOSURE", "STORE_FAST", "DELETE_FAST")):
            val = ins.argval
            loaded |= set(val) if isinstance(val, tuple) else {val}
    # an argument captured by an inner function is a cell: count it as read
    cells = set(code.co_cellvars)
    return (b_name in loaded or b_name in cells), (h_name in loaded or h_name in cells)


# ---------------------------------------------------------------------------------------------
# Evaluating a mod on a grid of positions
# ---------------------------------------------------------------------------------------------
def _reraise(kind, fn, exc, where):
    """Re-raise `exc` from inside the user's function with the function and the position named."""
    msg = f"{kind} {describe(fn)} raised {type(exc).__name__} at {where}: {exc}"
    try:
        new = type(exc)(msg)
    except Exception:  # an exception class whose constructor wants other arguments
        new = RuntimeError(msg)
    raise new from exc


def _position(args, shape, flat_index, names):
    """'b=0, h=1, q_idx=5, kv_idx=7' for element `flat_index` of the broadcast grid of `args`."""
    idx = np.unravel_index(flat_index, shape)
    parts = []
    for name, a in zip(names, args):
        if name == "score":
            continue
        v = np.broadcast_to(np.asarray(a), shape)[idx]
        parts.append(f"{name}={int(v)}")
    return ", ".join(parts)


def _each(kind, fn, args, shape, names, where=None):
    """Call fn once per element of the broadcast grid (functions that cannot take arrays), skipping the
    elements where `where` is False (hidden scores: the compiled kernels never ask about them either)."""
    out = np.empty(shape, bool if kind == "mask_mod" else np.float64)
    grids = [np.broadcast_to(np.asarray(a), shape) for a in args]
    where = None if where is None else np.broadcast_to(_needed(where, shape), shape)
    for flat in range(int(np.prod(shape))):
        idx = np.unravel_index(flat, shape)
        if where is not None and not where[idx]:
            out[idx] = False if kind == "mask_mod" else -np.inf
            continue
        scalars = [g[idx] if name == "score" else int(g[idx]) for g, name in zip(grids, names)]
        try:
            r = fn(*scalars)
        except Exception as exc:
            _reraise(kind, fn, exc, _position(args, shape, flat, names))
        if isinstance(r, np.ndarray) and r.ndim == 0:
            r = r[()]  # np.where (mods.where) of scalars gives a 0-d array
        _check_scalar(kind, fn, r, lambda f=flat: _position(args, shape, f, names))
        out[idx] = r
    return out


def _needed(where, shape):
    """`where` (bool, maybe over more axes than the grid, e.g. per head for a mask the same for all
    heads) reduced to the grid's shape: an element is needed if it is needed for any of them."""
    where = np.asarray(where)
    extra = where.ndim - len(shape)
    if extra > 0:
        where = where.any(axis=tuple(range(extra)))
    elif extra < 0:
        where = where.reshape((1,) * -extra + where.shape)
    axes = tuple(a for a, (w, n) in enumerate(zip(where.shape, shape)) if n == 1 and w > 1)
    return where.any(axis=axes, keepdims=True) if axes else where


def _check_scalar(kind, fn, r, where):
    if kind == "mask_mod":
        if not isinstance(r, (bool, np.bool_)):
            raise TypeError(f"mask_mod {describe(fn)} must return a bool (True = may attend); it returned "
                            f"{type(r).__name__} {r!r} at {where()}")
    elif isinstance(r, (bool, np.bool_)):
        raise TypeError(f"score_mod {describe(fn)} returns a bool (at {where()}): a score_mod returns the "
                        "modified score (a number); to hide scores, pass a mask_mod")
    elif not isinstance(r, (numbers.Real, np.integer, np.floating)) or isinstance(r, np.ndarray):
        raise TypeError(f"score_mod {describe(fn)} must return a number (the modified score); it returned "
                        f"{type(r).__name__} at {where()}")


def _check_array_result(kind, fn, r, shape):
    """The broadcast result of one array call, or None when it does not have the grid's shape."""
    r = np.asarray(r)
    try:
        r = np.broadcast_to(r, shape)
    except ValueError:
        return None
    if kind == "mask_mod" and r.dtype != np.bool_:
        raise TypeError(f"mask_mod {describe(fn)} must return a bool (True = may attend); it returned "
                        f"{r.dtype} values")
    if kind == "score_mod":
        if r.dtype == np.bool_:
            raise TypeError(f"score_mod {describe(fn)} returns a bool for every score: a score_mod returns the modified "
                            "score (a number); to hide scores, pass a mask_mod")
        if r.dtype.kind not in "iuf":
            raise TypeError(f"score_mod {describe(fn)} must return a number (the modified score); it "
                            f"returned {r.dtype} values")
    return r


def evaluate(kind: str, fn, args, where=None):
    """fn(*args) over the broadcast grid of `args` (index arrays, and the scores for a score_mod).

    First one call with the arrays themselves; if the function cannot take arrays (it raises, or gives
    a result of another shape), one call per element, which also finds the exact position of an error
    (only where `where` is True, if given: an error at a hidden score does not count). Division by zero
    and invalid operations raise, as they do in Python and in Numba's compiled code."""
    names = SCORE_ARGS if kind == "score_mod" else MASK_ARGS
    shape = np.broadcast_shapes(*(np.shape(a) for a in args))
    with np.errstate(divide="raise", invalid="raise", over="ignore"):
        try:
            r = fn(*args)
        except Exception:
            r = None  # not written for arrays (if, and/or, math.*, min, ...), or it fails: per element
        else:
            r = _check_array_result(kind, fn, r, shape)
        if r is None:
            r = _each(kind, fn, args, shape, names, where)
    return r


def index_grid(b, h, q0: int, q1: int, k0: int, k1: int):
    """Broadcasting index arrays for batches b and heads h (ints or 1-D arrays) and positions
    [q0, q1) x [k0, k1): shapes (nb, 1, 1, 1), (1, nh, 1, 1), (1, 1, nq, 1), (1, 1, 1, nk)."""
    b = np.asarray(b, np.int64).reshape(-1, 1, 1, 1)
    h = np.asarray(h, np.int64).reshape(1, -1, 1, 1)
    q = np.arange(q0, q1, dtype=np.int64).reshape(1, 1, -1, 1)
    k = np.arange(k0, k1, dtype=np.int64).reshape(1, 1, 1, -1)
    return b, h, q, k


def apply_mods(S, score_mod, mask_mod, b, h, q_idx, kv_idx, check_mask: bool = True):
    """The scores S with both hooks applied: -inf where mask_mod says False (when check_mask), score_mod
    on the rest. S (..., nq, nk) broadcast with the index arrays; -inf in S is already hidden (causal,
    window, mask=) and stays so, and score_mod is never asked about it. Returns a new array."""
    visible = S > -np.inf
    if mask_mod is not None and check_mask:
        visible = visible & evaluate("mask_mod", mask_mod, (b, h, q_idx, kv_idx), where=visible)
    if score_mod is None:
        return np.where(visible, S, -np.inf).astype(S.dtype, copy=False)
    modified = evaluate("score_mod", score_mod, (S, b, h, q_idx, kv_idx), where=visible)
    with np.errstate(invalid="ignore"):
        bad = visible & ~(modified < np.inf)  # NaN or +inf where a score counts
    if bad.any():
        flat = int(np.flatnonzero(np.broadcast_to(bad, bad.shape))[0])
        shape = bad.shape
        score = np.broadcast_to(S, shape).flat[flat]
        value = np.broadcast_to(modified, shape).flat[flat]
        where = _position((S, b, h, q_idx, kv_idx), shape, flat, SCORE_ARGS)
        raise ValueError(f"score_mod {describe(score_mod)} returned {value} at {where} (score {score:.6g}); "
                         "a score_mod must return a finite score, or -inf to hide it")
    return np.where(visible, modified, -np.inf).astype(S.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# The block mask
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class BlockMask:
    """The tiles a mask_mod leaves empty, partial or full, for one shape and one block size.

    mask_mod   the function it was made from (attention(..., block_mask=bm) applies it too)
    B, H       batches and heads it was evaluated for; 1 = the same for all (the mask ignores b or h)
    Nq, Nk     queries and keys
    Br, Bc     the tile: query rows and keys per block (the call runs with this block size)
    tiles      (B, H, Tr, Tc) int8 read-only array of flashkit.masks SKIP / PARTIAL / FULL
    captured   fingerprint of the values mask_mod read when the tiles were computed
    """

    mask_mod: Callable
    B: int
    H: int
    Nq: int
    Nk: int
    Br: int
    Bc: int
    tiles: Any
    captured: tuple = ()

    @property
    def Tr(self) -> int:
        return self.tiles.shape[2]

    @property
    def Tc(self) -> int:
        return self.tiles.shape[3]

    @property
    def block_size(self) -> Tuple[int, int]:
        return self.Br, self.Bc

    def counts(self) -> dict:
        """Tiles skipped, partial, full and in all, over every (b, h) plane."""
        t = self.tiles
        return {"skip": int((t == SKIP).sum()), "partial": int((t == PARTIAL).sum()),
                "full": int((t == FULL).sum()), "total": int(t.size)}

    @property
    def sparsity(self) -> float:
        """The fraction of tiles skipped (FlexAttention's BlockMask.sparsity() gives it in percent)."""
        return float((self.tiles == SKIP).mean())

    def without_sparsity(self) -> BlockMask:
        """The same mask with every tile PARTIAL: nothing skipped, mask_mod called on every score, what a
        kernel without block sparsity does (the benchmark's and notebook 13's baseline)."""
        tiles = np.full(self.tiles.shape, PARTIAL, np.int8)
        tiles.setflags(write=False)
        return replace(self, tiles=tiles)

    def plane(self, b: int = 0, h: int = 0) -> np.ndarray:
        """(Tr, Tc) tile states of batch b, query head h."""
        return self.tiles[b if self.B > 1 else 0, h if self.H > 1 else 0]

    def dense(self, b: int = 0, h: int = 0) -> np.ndarray:
        """The (Nq, Nk) element mask of batch b, head h, evaluated in NumPy (for pictures: O(Nq * Nk))."""
        return np.asarray(evaluate("mask_mod", self.mask_mod, index_grid(b, h, 0, self.Nq, 0, self.Nk))[0, 0])

    def __repr__(self) -> str:
        c = self.counts()
        return (f"BlockMask(mask_mod={python_function(self.mask_mod).__qualname__}, shape=(B={self.B}, H={self.H}, "
                f"Tr={self.Tr}, Tc={self.Tc}), Nq={self.Nq}, Nk={self.Nk}, block_size=({self.Br}, {self.Bc}), "
                f"sparsity={self.sparsity:.1%}: {c['skip']} skipped, {c['partial']} partial, {c['full']} full)")

    def check_call(self, B: int, Hq: int, Nq: int, Nk: int, block_size=None) -> None:
        """Raise ValueError unless this block mask fits a call with these shapes (and block size)."""
        remake = (f"make one with flashkit.block_mask(mask_mod, B, H, {Nq}, {Nk}, block_size=...) "
                  "for this call's shapes")
        if (self.Nq, self.Nk) != (Nq, Nk):
            raise ValueError(f"block_mask was made for Nq={self.Nq}, Nk={self.Nk}; this call has Nq={Nq}, "
                             f"Nk={Nk}: {remake}")
        if self.B not in (1, B):
            raise ValueError(f"block_mask was made for B={self.B} batches; this call has B={B}: {remake}")
        if self.H not in (1, Hq):
            raise ValueError(f"block_mask was made for H={self.H} heads; this call has {Hq} query heads: {remake}")
        if block_size is not None and tuple(block_size) != (self.Br, self.Bc):
            raise ValueError(f"block_size {tuple(block_size)} differs from the block mask's ({self.Br}, {self.Bc}): "
                             "the tiles the mask classified are the tiles the kernel runs; leave block_size out "
                             "or make the block mask with it")
        if fingerprint(self.mask_mod) != self.captured:
            raise ValueError(f"the values mask_mod {describe(self.mask_mod)} reads (its captured arrays) changed "
                             "since this block mask was made, so its tiles may be wrong: make it again")


def _block_size(block_size) -> Tuple[int, int]:
    if isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        pair = tuple(block_size)
    else:
        pair = (block_size, block_size)
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"block_size must be a positive integer or a pair (Br, Bc) of them; got {block_size!r}")
    return int(pair[0]), int(pair[1])


def classify_numpy(mask_mod, B: int, H: int, Nq: int, Nk: int, Br: int, Bc: int) -> np.ndarray:
    """(B, H, Tr, Tc) tile states by the definition: evaluate mask_mod on each block row of Br queries
    (all Nk keys at once, Br * Nk bools of memory), then a tile is SKIP if none is True, FULL if all are."""
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    tiles = np.empty((B, H, Tr, Tc), np.int8)
    for i in range(Tr):
        i0, i1 = i * Br, min(Nq, (i + 1) * Br)
        vis = evaluate("mask_mod", mask_mod, index_grid(np.arange(B), np.arange(H), i0, i1, 0, Nk))
        vis = np.broadcast_to(vis, (B, H, i1 - i0, Nk))
        pad = np.zeros((B, H, i1 - i0, Tc * Bc), bool)  # keys padded to whole tiles
        pad[..., :Nk] = vis
        blocks = pad.reshape(B, H, i1 - i0, Tc, Bc)  # (B, H, rows, Tc, Bc)
        any_visible = blocks.any(axis=(2, 4))
        pad[..., Nk:] = True  # padding keys count as visible for "all visible"
        all_visible = blocks.all(axis=(2, 4))
        tiles[:, :, i] = np.where(~any_visible, SKIP, np.where(all_visible, FULL, PARTIAL))
    return tiles


def block_mask(mask_mod, B: Optional[int], H: Optional[int], Nq: int, Nk: int, block_size=DEFAULT_BLOCK,
               engine: str = "auto") -> BlockMask:
    """The tile classification of `mask_mod` for (B, H, Nq, Nk) and tiles of block_size (an int or
    (Br, Bc); the call that uses it runs with these tiles). B or H None: the mask is the same for every
    batch or head (one plane, as FlexAttention's create_block_mask(B=None, H=None)).

    engine: "numpy" evaluates mask_mod in NumPy block row by block row; "numba" compiles it into a
    parallel classifier (flashkit.cpu.mods_jit; needs Numba); "cuda" translates it to CUDA and classifies
    on the GPU, one block a tile (flashkit.gpu.flash_mods; needs CuPy and a mask_mod in the GPU's subset,
    flashkit.gpu.modlang); "auto" uses Numba for large problems (it compiles in about 0.2 s) when it is
    installed."""
    from flashkit.validate import check_mod

    check_mod("mask_mod", mask_mod)
    for name, n in (("Nq", Nq), ("Nk", Nk)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name} must be a positive integer; got {n!r}")
    for name, n in (("B", B), ("H", H)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
            raise ValueError(f"{name} must be a positive integer, or None when the mask is the same for all; got {n!r}")
    Br, Bc = _block_size(block_size)
    B, H, Nq, Nk = int(B or 1), int(H or 1), int(Nq), int(Nk)
    if engine not in ("auto", "numpy", "numba", "cuda"):
        raise ValueError(f"engine must be 'auto', 'numpy', 'numba' or 'cuda'; got {engine!r}")
    captured = fingerprint(mask_mod)
    if engine == "auto":
        engine = "numba" if B * H * Nq * Nk >= 1 << 22 and _numba_installed() else "numpy"
    if engine == "numba":
        from flashkit.cpu import mods_jit

        tiles = mods_jit.classify(mask_mod, B, H, Nq, Nk, Br, Bc)
    elif engine == "cuda":
        from flashkit.gpu import flash_mods

        tiles = flash_mods.classify(mask_mod, B, H, Nq, Nk, Br, Bc)
    else:
        tiles = classify_numpy(mask_mod, B, H, Nq, Nk, Br, Bc)
    tiles.setflags(write=False)
    return BlockMask(mask_mod=mask_mod, B=B, H=H, Nq=Nq, Nk=Nk, Br=Br, Bc=Bc, tiles=tiles, captured=captured)


def _numba_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


_MADE: OrderedDict[tuple, BlockMask] = OrderedDict()  # block masks made for calls given only a mask_mod
_MADE_KEEP = 8


def for_problem(problem, Br: int, Bc: int, engine: str = "auto") -> Optional[BlockMask]:
    """The BlockMask a backend runs `problem` with at tiles (Br, Bc): the one the caller passed, else one
    made here (per batch / head only if mask_mod reads b / h) and kept for the next call with the same
    function, captured values and shapes; None without a mask_mod."""
    if problem.block_mask is not None:
        bm = problem.block_mask
        if (bm.Br, bm.Bc) != (Br, Bc) and (-(-problem.Nq // Br), -(-problem.Nk // Bc)) != (bm.Tr, bm.Tc):
            raise ValueError(f"internal: tiles ({Br}, {Bc}) differ from the block mask's ({bm.Br}, {bm.Bc})")
        return bm
    if problem.mask_mod is None:
        return None
    reads_b, reads_h = reads_batch_head(problem.mask_mod)
    B, H = (problem.B if reads_b else None), (problem.Hq if reads_h else None)
    key = (problem.mask_mod, fingerprint(problem.mask_mod), B, H, problem.Nq, problem.Nk, Br, Bc)
    if key in _MADE:
        _MADE.move_to_end(key)
        return _MADE[key]
    bm = block_mask(problem.mask_mod, B, H, problem.Nq, problem.Nk, (Br, Bc), engine=engine)
    _MADE[key] = bm
    while len(_MADE) > _MADE_KEEP:
        _MADE.popitem(last=False)
    return bm


def signature_problem(kind: str, fn) -> Optional[str]:
    """None if `fn` can be called with the positional arguments of a `kind` ("score_mod" or
    "mask_mod"), else what is wrong, in words."""
    wanted = SCORE_ARGS if kind == "score_mod" else MASK_ARGS
    f = python_function(fn)
    try:
        sig = inspect.signature(f)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: let the call decide
    try:
        sig.bind(*wanted)
    except TypeError:
        n = len([p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
        hint = ""
        if kind == "score_mod" and n == 4:
            hint = " (it looks like a mask_mod: pass it as mask_mod=)"
        elif kind == "mask_mod" and n == 5:
            hint = " (it looks like a score_mod: pass it as score_mod=)"
        return (f"{kind} must take {len(wanted)} arguments ({', '.join(wanted)}); {describe(fn)} takes "
                f"({', '.join(sig.parameters)}){hint}")
    return None
