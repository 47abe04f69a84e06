"""Every check of user input, in one place, with messages that name the argument and what was expected.

`check(...)` returns a `Problem` (flashkit/problem.py) or raises TypeError/ValueError; `check_backward`
adds the backward's inputs; `check_decode` returns the `DecodeProblem` of a decoding step against a KV
cache (flashkit.decode). Nothing the user passed is modified: arrays are reshaped as views and copied
only when not contiguous.
"""
from __future__ import annotations

import math
import numbers
import types

import numpy as np

from dataclasses import replace

from flashkit.blockmask import BlockMask, signature_problem
from flashkit.masks import effective_window
from flashkit.problem import DecodeProblem, Problem

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
DECODE_DTYPES = ("float16", "float32", "float64")  # the split-K kernels have no bfloat16 path


def array_module(x):
    """numpy or cupy, from the array's type, without importing cupy for NumPy input."""
    if isinstance(x, np.ndarray):
        return np
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return None


def dtype_name(x) -> str:
    """The name of x's element type. CuPy has no bfloat16: a torch bfloat16 tensor seen through DLPack
    arrives as an array of 2-byte void ('|V2'), which flashkit reads as bfloat16 bits."""
    key = (type(x), x.dtype)
    name = _DTYPE_NAMES.get(key)
    if name is None:  # numpy's dtype.name is computed in Python on each access: a hot path keeps it
        if x.dtype.kind == "V" and x.dtype.itemsize == 2 and array_module(x) is not np:
            name = "bfloat16"
        else:
            name = x.dtype.name
        _DTYPE_NAMES[key] = name
    return name


_DTYPE_NAMES: dict = {}  # (array type, dtype) -> dtype_name


def bf16_bits(x):
    """A bfloat16 CuPy array ('|V2') as its uint16 bit patterns (a view, no copy), else x itself."""
    return x.view("uint16") if dtype_name(x) == "bfloat16" and x.dtype.kind == "V" else x


def check_array(name, x, *, dtypes=FLOAT_DTYPES, finite=True, nonempty=True):
    """The array module of `x` after checking type, rank, dtype and (optionally) emptiness and finiteness.

    Shared by attention() and flashkit.decode (whose KV caches may be empty and hold unwritten slots).
    """
    xp = array_module(x)
    if xp is None:
        raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray; got {type(x).__name__}")
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"{name} must have 2, 3 or 4 dimensions ((N, d), (H, N, d) or (B, H, N, d)); got shape {tuple(x.shape)}")
    if dtype_name(x) not in dtypes:
        raise TypeError(f"{name} must have a floating dtype ({', '.join(dtypes)}); got {x.dtype}")
    if nonempty and 0 in x.shape:
        raise ValueError(f"{name} must not be empty; got shape {tuple(x.shape)}")
    if finite:
        check_finite(xp, (name,), (x,))
    return xp


def first_nonfinite(xp, arrays):
    """The index of the first of `arrays` that holds NaN or Inf, or None (flashkit.finite: one read of
    each array, and on the GPU one host sync for all of them)."""
    from flashkit import finite

    return finite.first_nonfinite(xp, arrays, [dtype_name(x) for x in arrays])


def check_finite(xp, names, arrays) -> None:
    """Raise ValueError naming the first of `arrays` that holds NaN or Inf."""
    i = first_nonfinite(xp, arrays)
    if i is not None:
        raise ValueError(f"{names[i]} contains NaN or Inf; attention of non-finite input is undefined")


def check_scale(scale, d: int) -> float:
    """scale as a float: 1/sqrt(d) for None, else a finite number > 0."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 (default 1/sqrt(d)); got {scale!r}")
    return float(scale)


def _as4d(x):
    if x.ndim == 4:  # already (B, H, N, d): no new view (a hot path on the GPU)
        return x
    return x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))  # (B, H, N, d), a view


def positive_int(name, v) -> int:
    """v as an int if it is an integer >= 1 (not a bool), else ValueError naming `name`. Every
    argument check of the package that needs a count (block sizes, repeats, heads, cache sizes) uses it."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer; got {v!r}")
    return int(v)


def check_mod(kind: str, fn):
    """`fn` itself if it can be a `kind` ("score_mod" or "mask_mod"): a Python function (def or lambda,
    or a Numba-jitted one) taking FlexAttention's positional arguments; else TypeError saying what is
    wrong. What it returns is checked where it is called (flashkit.blockmask, flashkit.cpu.mods_jit)."""
    f = getattr(fn, "py_func", fn)  # a numba.njit function: its Python function
    signature = "score_mod(score, b, h, q_idx, kv_idx) -> score" if kind == "score_mod" else \
        "mask_mod(b, h, q_idx, kv_idx) -> bool"
    if not callable(fn):
        raise TypeError(f"{kind} must be a function {signature} (FlexAttention's signature); got {type(fn).__name__}")
    if not isinstance(f, types.FunctionType):
        raise TypeError(f"{kind} must be a Python function (def or lambda) {signature}, which Numba can compile; "
                        f"got {type(fn).__name__} {fn!r}")
    problem = signature_problem(kind, fn)
    if problem is not None:
        raise TypeError(problem)
    return fn


def check_mods(score_mod, mask_mod, block_mask, B, Hq, Nq, Nk, block_size):
    """(score_mod, mask_mod, block_mask, block_size) checked against each other and the call's shapes.

    A block_mask brings its mask_mod and its tiles: the call runs with its block size (a different
    block_size is an error, not a silent re-tiling)."""
    if score_mod is not None:
        check_mod("score_mod", score_mod)
    if mask_mod is not None:
        check_mod("mask_mod", mask_mod)
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a flashkit.block_mask(mask_mod, B, H, Nq, Nk) result; got "
                            f"{type(block_mask).__name__}")
        if mask_mod is not None and mask_mod is not block_mask.mask_mod:
            raise ValueError("mask_mod and block_mask disagree: block_mask carries its own mask_mod; pass "
                             "block_mask alone, or the same function to both")
        block_mask.check_call(B, Hq, Nq, Nk, block_size)
        mask_mod = block_mask.mask_mod
        block_size = block_mask.block_size
    return score_mod, mask_mod, block_mask, block_size


def nonneg_int(name, v) -> int:
    """v as an int if it is an integer >= 0 (not a bool), else ValueError naming `name`."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {v!r}")
    return int(v)


def _check_qkv(names, q, k, v, **array_checks):
    """(xp, Q, K, V) as 4-D views after the checks attention and decoding share: one array library
    and GPU, one rank and dtype, v shaped as k, and q, k agreeing on d, batch and GQA heads.
    `names` are the arguments as the caller calls them ("q", "k", "v" or "q", "k_cache", "v_cache");
    `array_checks` go to check_array (dtypes, finite, nonempty)."""
    nq, nk, nv = names
    xps = [check_array(n, x, **array_checks) for n, x in zip(names, (q, k, v))]
    if not (xps[0] is xps[1] is xps[2]):
        raise TypeError(f"{nq}, {nk} and {nv} must all be NumPy arrays or all CuPy arrays; got a mix")
    xp = xps[0]
    if xp is not np:
        devices = {x.device.id for x in (q, k, v)}
        if len(devices) > 1:
            raise ValueError(f"{nq}, {nk} and {nv} must be on the same GPU; got devices {sorted(devices)}")
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(f"{nq}, {nk} and {nv} must have the same number of dimensions; got {q.ndim}, {k.ndim} and {v.ndim}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{nq}, {nk} and {nv} must have the same dtype; got {q.dtype}, {k.dtype} and {v.dtype}")
    Q, K, V = _as4d(q), _as4d(k), _as4d(v)
    (B, Hq, _, d), (Bk, Hkv, _, dk) = Q.shape, K.shape
    if V.shape != K.shape:
        raise ValueError(f"{nv} must have the same shape as {nk}; got {nv} {tuple(v.shape)} and {nk} {tuple(k.shape)}")
    if dk != d:
        raise ValueError(f"{nq} and {nk} must have the same head size d (last axis); got {d} and {dk}")
    if Bk != B:
        raise ValueError(f"{nq} and {nk} must have the same batch size; got {B} and {Bk}")
    if Hkv and Hq % Hkv:
        raise ValueError(f"the heads of {nq} ({Hq}) must be a multiple of the heads of {nk} and {nv} ({Hkv}) for GQA/MQA")
    return xp, Q, K, V


QKV = ("q", "k", "v")
BACKWARD_ARGS = ("q", "k", "v", "do", "o", "lse")


def check(q, k, v, *, causal=False, scale=None, window=None, mask=None, block_size=None, score_mod=None,
          mask_mod=None, block_mask=None, finite=True) -> Problem:
    """The Problem of attention(q, k, v, ...), or TypeError/ValueError naming the argument at fault.

    finite=False leaves the NaN/Inf scan of q, k, v to the caller (check_backward scans them together
    with dO, O and lse). finite="async": on the GPU the Problem carries the check as `pending`, not yet
    started (flashkit.finite.Deferred); the caller calls `begin(problem, backend)`, which starts the
    separate scan (one kernel on a side stream, flashkit.finite.start) unless the backend's kernel tests
    its inputs itself, launches the kernel, then calls `finish(problem)`, which waits for the check alone
    and raises if it flagged. NumPy input is scanned at once either way."""
    if finite not in (True, False, "async"):
        raise ValueError(f"finite must be True, False or 'async'; got {finite!r}")
    xp, Q, K, V = _check_qkv(("q", "k", "v"), q, k, v, finite=False)
    if finite is True or (finite and xp is np):
        check_finite(xp, ("q", "k", "v"), (q, k, v))  # one host wait for the three on the GPU
    (B, Hq, Nq, d), Nk = Q.shape, K.shape[2]

    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    scale = check_scale(scale, d)

    if window is not None:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < -1 for w in window)):
            raise ValueError(f"window must be a pair (left, right) of integers >= 0, or -1 for unbounded; got {window!r}")
    win = effective_window(bool(causal), window)

    mask4 = None
    if mask is not None:
        mxp = array_module(mask)
        if mxp is None:
            raise TypeError(f"mask must be a boolean numpy.ndarray or cupy.ndarray; got {type(mask).__name__}")
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must have dtype bool (True = may attend); got {mask.dtype}")
        if mask.ndim > 4:
            raise ValueError(f"mask must be broadcastable to (B, H, Nq, Nk) = {(B, Hq, Nq, Nk)}; got shape {tuple(mask.shape)}")
        m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        if any(s not in (1, full) for s, full in zip(m.shape, (B, Hq, Nq, Nk))):
            raise ValueError(f"mask must be broadcastable to (B, H, Nq, Nk) = {(B, Hq, Nq, Nk)}; got shape {tuple(mask.shape)}")
        if mxp is not xp:
            m = xp.asarray(m.get() if mxp is not np else m)
        # Keep batch/head broadcasting (Bm, Hm in {1, full}); expand only the (Nq, Nk) plane.
        mask4 = xp.ascontiguousarray(xp.broadcast_to(m, m.shape[:2] + (Nq, Nk)))

    if block_size is not None:
        if isinstance(block_size, (tuple, list)):
            if len(block_size) != 2:
                raise ValueError(f"block_size must be an integer or a pair (Br, Bc); got {block_size!r}")
            block_size = (positive_int("block_size (Br)", block_size[0]), positive_int("block_size (Bc)", block_size[1]))
        else:
            b = positive_int("block_size", block_size)
            block_size = (b, b)
    score_mod, mask_mod, block_mask, block_size = check_mods(score_mod, mask_mod, block_mask, B, Hq, Nq, Nk, block_size)

    # bfloat16 on the GPU travels as uint16 bits with element="bf16"; the kernels read them as __nv_bfloat16
    element = "bf16" if dtype_name(q) == "bfloat16" and xp is not np else None
    Q, K, V = (_contiguous(xp, bf16_bits(x)) for x in (Q, K, V))
    pending = None
    if finite == "async" and xp is not np:  # the check of the arrays the kernel will read, not started yet
        from flashkit import finite as finite_scan

        pending = [finite_scan.Deferred(xp, (Q, K, V), (dtype_name(q),) * 3, names=QKV)]
    return Problem(
        Q=Q, K=K, V=V,
        scale=float(scale), causal=bool(causal), window=win, mask=mask4,
        block_size=block_size, xp=xp, element=element,
        score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask, pending=pending,
    )


def _contiguous(xp, x):
    """x itself when C-contiguous (no new array object: a hot path), else a contiguous copy."""
    return x if x.flags.c_contiguous else xp.ascontiguousarray(x)


def begin(problem, backend) -> None:
    """Start the checks `problem` carries not yet started (validate.check(..., finite="async") on the GPU),
    before `backend` launches its kernel: the separate NaN/Inf scan, unless the backend's kernel tests its
    inputs itself (Backend.checks_inputs: its runner claims the check, flashkit.finite.Deferred.claim)."""
    if getattr(backend, "checks_inputs", False):
        return
    for check in problem.pending or ():
        start = getattr(check, "start", None)
        if start is not None:
            start()


def finish(problem) -> None:
    """Wait for the checks a Problem carries in flight (`problem.pending`: the finiteness scan of
    validate.check(..., finite="async"), and what a backend added, such as the GPU backward's lse check)
    and raise ValueError with the first one's sentence; nothing to do when none is in flight. The waits
    are for each check's own event, so a kernel launched behind a check keeps running meanwhile."""
    for check in problem.pending or ():
        message = check.error()
        if message is not None:
            raise ValueError(message)


def check_decode(q, k_cache, v_cache, *, length=None, causal=False, scale=None) -> DecodeProblem:
    """The DecodeProblem of flashkit.decode.attention_decode(q, k_cache, v_cache, ...).

    The caches may be empty (no key yet) and hold unwritten slots past `length`, so they are checked
    for neither emptiness nor finiteness (that would read the whole cache a second time); q is.
    `length`: None (the whole buffer), an int, or one int per batch element (a ragged batch).
    """
    xp, Q, K, V = _check_qkv(("q", "k_cache", "v_cache"), q, k_cache, v_cache,
                             dtypes=DECODE_DTYPES, finite=False, nonempty=False)
    (B, _, Nq, d), (_, Hkv, Nmax, dk) = Q.shape, K.shape
    if 0 in Q.shape or 0 in (Hkv, dk):
        raise ValueError(f"q and the caches must not be empty; got q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}")
    if not bool(xp.isfinite(Q).all()):
        raise ValueError("q contains NaN or Inf")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    scale = check_scale(scale, d)

    if length is None:
        lengths = np.full(B, Nmax, np.int64)
    else:
        if array_module(length) not in (None, np):  # a CuPy array of lengths
            length = length.get()
        arr = np.asarray(length)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer) or arr.ndim > 1:
            raise TypeError(f"length must be an integer or a 1-D array of B={B} integers; got {length!r}")
        lengths = np.broadcast_to(arr, (B,)).astype(np.int64) if arr.ndim == 0 or arr.shape == (B,) else None
        if lengths is None:
            raise ValueError(f"length must hold one integer per batch element (B={B}); got shape {arr.shape}")
        if lengths.size and (lengths.min() < 0 or lengths.max() > Nmax):
            bad = int(lengths.max() if lengths.max() > Nmax else lengths.min())
            raise ValueError(f"length must lie between 0 and the cache size {Nmax} (k_cache.shape[-2]); got {bad}")
    # Row i of batch b sees keys [lo, hi): all filled keys, or, causal (bottom-right aligned at the
    # filled length), keys j <= i + length - Nq, as flashkit.attention does with Nk = length.
    i = np.arange(Nq, dtype=np.int64)
    hi = np.broadcast_to(lengths[:, None], (B, Nq)).copy()
    if causal:
        hi = np.clip(i[None, :] + lengths[:, None] - Nq + 1, 0, hi)
    lo = np.zeros((B, Nq), np.int64)
    return DecodeProblem(Q=xp.ascontiguousarray(Q), K=xp.ascontiguousarray(K), V=xp.ascontiguousarray(V),
                         lengths=lengths, lo=lo, hi=hi, scale=float(scale), causal=bool(causal), xp=xp)


def check_backward(do, q, k, v, o, lse, *, causal=False, scale=None, window=None, mask=None,
                   block_size=None, score_mod=None, mask_mod=None, block_mask=None, finite=True) -> Problem:
    """The Problem of attention_backward(): check(q, k, v, ...) plus dO, O and lse checked against q.

    dO and O must have q's shape, dtype and array library; lse q's shape without the last axis, in
    float32 or float64, with -inf allowed (a row that saw no key) but never NaN or +inf. Whether lse
    belongs to these q, k (and is in natural-log units) is tested by the backends as they recompute P:
    see `check_lse_rowsums`. finite="async": as in `check`, on the GPU the scan of the six arrays runs
    while the backward does, and `finish(problem)` raises if it flagged.
    """
    problem = check(q, k, v, causal=causal, scale=scale, window=window, mask=mask, block_size=block_size,
                    score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask, finite=False)
    xp = problem.xp
    for name, x in (("do", do), ("o", o)):
        if check_array(name, x, finite=False) is not xp:
            raise TypeError(f"{name} must be the same kind of array as q ({xp.__name__}); got {type(x).__name__}")
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}; got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}; got {x.dtype}")
    if array_module(lse) is not xp:
        raise TypeError(f"lse must be a {xp.__name__} array (the forward's return_lse=True output); got {type(lse).__name__}")
    if tuple(lse.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"lse must have shape {tuple(q.shape[:-1])} (q's shape without d, from return_lse=True); "
                         f"got {tuple(lse.shape)}")
    if lse.dtype.name not in ("float32", "float64"):
        raise TypeError(f"lse must be float32 or float64 (as attention(..., return_lse=True) returns it); got {lse.dtype}")
    lse_dtype = "float64" if problem.dtype_name == "float64" else "float32"
    lse3 = _contiguous(xp, lse.reshape(problem.Q.shape[:3]).astype(lse_dtype, copy=False))
    dO, O = (_contiguous(xp, bf16_bits(_as4d(x))) for x in (do, o))
    pending = None
    if finite:
        # lse may hold -inf (rows that saw no key), so its check is "not NaN and not +inf". The six arrays
        # in one scan (one kernel launch on the GPU).
        from flashkit import finite as finite_scan

        kinds = [dtype_name(q)] * 5 + [lse3.dtype.name]
        scan = finite_scan.start(xp, (problem.Q, problem.K, problem.V, dO, O, lse3), kinds, allow_neg_inf=(5,),
                                 names=BACKWARD_ARGS)
        if finite is True or xp is np:
            message = scan.error()
            if message is not None:
                raise ValueError(message)
        else:
            pending = [scan]
    return replace(problem, dO=dO, O=O, lse=lse3, pending=pending)


def lse_tolerance(dtype) -> float:
    """How far a row sum of the recomputed P = exp(S - lse) may stray from 1. Rounding of S - lse in
    float32 moves it by about 1e-6 (measured up to 4e-7 with N = 41, d = 64); a float64 backward may
    get a lse computed in float32 (the tests' oracle does). A wrong lse (log2 units: P sums to
    e^(lse (1 - 1/ln 2)); another call's) is off by far more unless lse is within 1e-3 of 0."""
    return 1e-4 if np.dtype(dtype) == np.float64 else 1e-3


def check_lse_rowsums(psum, lse, dtype, labels=None) -> None:
    """Raise unless every row sum of the recomputed P = exp(S - lse) is 1 (0 for a row whose lse is -inf).

    A backward recomputes P from the forward's lse instead of storing it; if lse came from another call
    or is in log2 units, P does not sum to 1 and the gradients would be plausible-looking garbage.
    `psum` holds, per row, sum_j exp(S_ij - lse_i) for finite lse and the number of visible keys for
    lse = -inf. Arrays of any matching shape; `labels`, nested like them, names each row as (b, h, i)
    when the arrays hold a sample of rows rather than all of them.
    """
    psum = np.asarray(psum, np.float64)
    lse = np.asarray(lse, np.float64)
    empty = np.isneginf(lse)
    bad = np.where(empty, psum != 0, np.abs(psum - 1.0) > lse_tolerance(dtype))
    if bad.any():
        first = np.argwhere(bad)[0]
        idx = tuple(int(i) for i in first)
        where = idx if labels is None else labels[idx[0]][idx[1]] if len(idx) == 2 else idx
        raise ValueError(
            f"lse does not belong to these q and k: at row (b, h, i) = {where} the recomputed softmax sums to "
            f"{psum[idx]:.6g} instead of {0 if empty[idx] else 1} ({int(bad.sum())} rows off). Pass the lse "
            "that attention(q, k, v, ..., return_lse=True) returned for the same q, k, causal, window, mask "
            "and scale (natural-log units, not log2)")
