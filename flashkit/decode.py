"""Decoding attention: a few new query rows against a long KV cache, split over the keys ("split-K").

    o = flashkit.decode.attention_decode(q, cache.K, cache.V, length=cache.length)

One decoding step reads every cached key and value once and does about 2 FLOPs per byte read, so it is
limited by memory bandwidth, and its parallelism is only B * H_kv heads: split-K (flash-decoding) cuts
the cache into `splits` chunks, computes a partial online-softmax state (m, l, O) per chunk in
parallel, and merges the states exactly with `flashkit.online_softmax.merge`:

    m = max_s m_s,   l = sum_s exp(m_s - m) l_s,   O = sum_s exp(m_s - m) O_s,   o = O / l

Backends (`backend=`):
    "numpy-splitk"   the readable twin: a Python loop over the splits, online_softmax.update per chunk
    "numba-splitk"   flashkit/cpu/decode.py: all (batch, K/V head, split) tasks in parallel on the cores
    "cupy-splitk"    flashkit/gpu/decode.py + kernels/decode_splitk.cu, for CuPy arrays
    any name from flashkit.backends()   no split: flashkit.attention on the filled part of the cache
    "auto"           cupy-splitk for CuPy arrays, else numba-splitk (numpy-splitk without Numba)

The cache is read in place: pass the whole preallocated buffers and `length`, nothing is copied
(flashkit.attention would copy a non-contiguous view of the filled rows). The cache is not scanned for
NaN or Inf (that would read it a second time); the queries are.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from flashkit import online_softmax
from flashkit.validate import _as4d, array_module, check_array, check_scale

DECODE_DTYPES = ("float16", "float32", "float64")  # the split-K kernels have no bfloat16 path

SPLITK_BACKENDS = ("numpy-splitk", "numba-splitk", "cupy-splitk")


@dataclass(frozen=True)
class DecodeProblem:
    """Validated input of a decoding step (4-D arrays, per-row visible key ranges)."""

    Q: Any  # (B, Hq, Nq, d) contiguous
    K: Any  # (B, Hkv, Nmax, d) the cache buffers, contiguous, read in place
    V: Any
    lengths: Any  # (B,) int64 on the host: keys [0, lengths[b]) are filled
    lo: Any  # (B, Nq) int64 on the host: row i of batch b sees keys lo <= j < hi
    hi: Any
    scale: float
    causal: bool
    xp: Any

    @property
    def n_keys(self) -> int:
        """The longest filled length: no split needs to look past it."""
        return int(self.lengths.max()) if self.lengths.size else 0


def check(q, k_cache, v_cache, *, length=None, causal=False, scale=None) -> DecodeProblem:
    """Validate a decoding step; raises TypeError/ValueError naming the argument."""
    # the caches may be empty (no key yet) and hold unwritten slots past `length`: no finiteness check there
    xps = [check_array(name, x, dtypes=DECODE_DTYPES, finite=False, nonempty=False)
           for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache))]
    if not (xps[0] is xps[1] is xps[2]):
        raise TypeError("q, k_cache and v_cache must all be NumPy arrays or all CuPy arrays; got a mix")
    xp = xps[0]
    if not (q.ndim == k_cache.ndim == v_cache.ndim):
        raise ValueError(f"q, k_cache and v_cache must have the same number of dimensions; got {q.ndim}, {k_cache.ndim} and {v_cache.ndim}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache and v_cache must have the same dtype; got {q.dtype}, {k_cache.dtype} and {v_cache.dtype}")
    Q, K, V = _as4d(q), _as4d(k_cache), _as4d(v_cache)
    (B, Hq, Nq, d), (Bk, Hkv, Nmax, dk) = Q.shape, K.shape
    if V.shape != K.shape:
        raise ValueError(f"v_cache must have the same shape as k_cache; got {tuple(v_cache.shape)} and {tuple(k_cache.shape)}")
    if 0 in Q.shape or 0 in (Bk, Hkv, dk):
        raise ValueError(f"q and the caches must not be empty; got q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}")
    if dk != d:
        raise ValueError(f"q and k_cache must have the same head size d (last axis); got {d} and {dk}")
    if Bk != B:
        raise ValueError(f"q and k_cache must have the same batch size; got {B} and {Bk}")
    if Hq % Hkv:
        raise ValueError(f"the heads of q ({Hq}) must be a multiple of the K/V heads of the cache ({Hkv}) for GQA/MQA")
    if not bool(xp.isfinite(Q).all()):
        raise ValueError("q contains NaN or Inf")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    scale = check_scale(scale, d)

    # length: None (the whole buffer), an int, or one int per batch element (ragged batch)
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


def _check_splits(splits):
    if splits == "auto":
        return splits
    if isinstance(splits, bool) or not isinstance(splits, numbers.Integral) or splits < 1:
        raise ValueError(f"splits must be 'auto' or an integer >= 1; got {splits!r}")
    return int(splits)


def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def chunk_bounds(n_keys: int, splits: int):
    """[(j0, j1)] of each split: chunks of ceil(n_keys / splits) keys; trailing splits may be empty."""
    chunk = max(1, math.ceil(n_keys / splits))
    return [(min(s * chunk, n_keys), min((s + 1) * chunk, n_keys)) for s in range(splits)]


def split_states(problem: DecodeProblem, splits: int):
    """The readable twin: a list of online_softmax.State, one per split, each over its own chunk.

    State arrays: m, l (B, Hq, Nq) and O (B, Hq, Nq, d), float64 for float64 input, else float32.
    """
    P = problem
    B, Hq, Nq, d = P.Q.shape
    g = Hq // P.K.shape[1]
    dt = np.float64 if P.Q.dtype == np.float64 else np.float32
    Q = P.Q.astype(dt) * dt(P.scale)  # (B, Hq, Nq, d)
    states = []
    for j0, j1 in chunk_bounds(P.n_keys, splits):
        empty = online_softmax.init(Nq, d, dt, lead=(B, Hq))  # m = -inf, l = 0, O = 0
        if j1 == j0:  # a split past the end of the cache: nothing to see
            states.append(empty)
            continue
        K = np.repeat(P.K[:, :, j0:j1].astype(dt), g, axis=1)  # (B, Hq, n, d): K/V head h serves query heads h*g..h*g+g-1
        V = np.repeat(P.V[:, :, j0:j1].astype(dt), g, axis=1)
        S = Q @ K.transpose(0, 1, 3, 2)  # (B, Hq, Nq, n)
        j = np.arange(j0, j1)
        visible = (j >= P.lo[:, None, :, None]) & (j < P.hi[:, None, :, None])  # (B, 1, Nq, n)
        S = np.where(visible, S, -np.inf)
        states.append(online_softmax.update(empty, S, V))
    return states


def _splits_for(problem, splits, backend):
    if splits != "auto":
        return splits
    B, Hkv = problem.Q.shape[0], problem.K.shape[1]
    if backend == "cupy-splitk":
        from flashkit.gpu import decode as gpu_decode

        return gpu_decode.auto_splits(problem)
    if backend == "numba-splitk":
        from flashkit.cpu import decode as cpu_decode

        return cpu_decode.auto_splits(B, Hkv, problem.n_keys)
    return max(1, min(4, math.ceil(problem.n_keys / 256)))  # the readable twin: a few chunks to look at


def attention_decode(q, k_cache, v_cache, *, length=None, causal=False, scale=None, splits="auto",
                     backend="auto", return_lse=False):
    """Attention of a few query rows against a KV cache, split over the keys and merged exactly.

    Parameters
    ----------
    q : (B, Hq, Nq, d), (Hq, Nq, d) or (Nq, d); NumPy or CuPy; Nq is small (1 for one decoding step)
    k_cache, v_cache : (B, Hkv, Nmax, d) of the same rank, dtype and library: the cache buffers
        (e.g. KVCache.K and KVCache.V), of which the first `length` rows are filled. Hq % Hkv == 0.
    length : None (all Nmax rows), an int, or B ints (a ragged batch: each sequence its own length)
    causal : the Nq queries are the last Nq cached tokens and see keys j <= i + length - Nq (the
        bottom-right alignment of flashkit.attention); needed only when Nq > 1
    scale : default 1/sqrt(d)
    splits : "auto" or the number of chunks of the filled keys (ceil(length / splits) keys each;
        splits past the end are empty and merge as nothing). The result does not depend on it.
    backend : "auto", "numpy-splitk", "numba-splitk", "cupy-splitk", or a flashkit.attention backend
        name (unsplit, on a copy of the filled rows)
    return_lse : also return the logsumexp of each row, (B, Hq, Nq) (float32, float64 for float64)

    Returns o with q's shape and dtype (float16 is computed in float32 on the CPU), or (o, lse).
    A row that sees no key gives 0 and lse = -inf. Inputs are never modified.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string; got {backend!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be True or False; got {return_lse!r}")
    splits = _check_splits(splits)
    P = check(q, k_cache, v_cache, length=length, causal=causal, scale=scale)
    on_gpu = P.xp.__name__ == "cupy"
    if backend == "auto":
        backend = "cupy-splitk" if on_gpu else ("numba-splitk" if numba_available() else "numpy-splitk")
    if backend in SPLITK_BACKENDS:
        if (backend == "cupy-splitk") != on_gpu:
            raise ValueError(f"backend {backend!r} needs {'CuPy' if backend == 'cupy-splitk' else 'NumPy'} arrays; "
                             f"got {'CuPy' if on_gpu else 'NumPy'} arrays")
        if backend == "numba-splitk" and not numba_available():
            raise RuntimeError("backend 'numba-splitk' is not available on this machine: numba is not installed")
        O, lse = _run_splitk(P, _splits_for(P, splits, backend), backend)
    else:
        O, lse = _run_unsplit(P, backend)
    lse_dtype = "float64" if q.dtype.name == "float64" else "float32"
    o = O.reshape(q.shape).astype(q.dtype, copy=False)
    if not return_lse:
        return o
    return o, lse.reshape(q.shape[:-1]).astype(lse_dtype, copy=False)


def _run_splitk(P, splits, backend):
    if backend == "cupy-splitk":
        from flashkit.gpu import decode as gpu_decode

        return gpu_decode.run(P, splits)
    if backend == "numpy-splitk":
        return online_softmax.finalize(online_softmax.merge(split_states(P, splits)))
    from flashkit.cpu import decode as cpu_decode

    dt = np.float64 if P.Q.dtype == np.float64 else np.float32  # float16 is computed in float32
    K, V = P.K, P.V
    if K.dtype != dt:  # convert only the filled rows (a copy), not the whole preallocated buffer
        K, V = K[:, :, :P.n_keys].astype(dt), V[:, :, :P.n_keys].astype(dt)
    M, L, O = cpu_decode.partials(P.Q.astype(dt, copy=False), K, V, P.lo, P.hi, P.scale, splits, P.n_keys)
    # merge the splits' states exactly; a split that saw nothing has m = -inf and counts for nothing
    return online_softmax.finalize(online_softmax.merge([online_softmax.State(M[s], L[s], O[s]) for s in range(splits)]))


def _run_unsplit(P, backend):
    """flashkit.attention on the filled rows (a copy): the baseline without split-K."""
    import flashkit

    n = P.n_keys
    B, Hq, Nq, d = P.Q.shape
    if n == 0:  # nothing cached: every row sees no key
        xp = P.xp
        return xp.zeros(P.Q.shape, P.Q.dtype), xp.full((B, Hq, Nq), -xp.inf, xp.float32)
    K, V = P.K[:, :, :n], P.V[:, :, :n]
    if (P.lengths == n).all() and (P.lo == 0).all():
        return flashkit.attention(P.Q, K, V, causal=P.causal, scale=P.scale, backend=backend, return_lse=True)
    j = np.arange(n)
    mask = (j >= P.lo[:, None, :, None]) & (j < P.hi[:, None, :, None])  # (B, 1, Nq, n): ragged lengths
    if P.xp is not np:
        mask = P.xp.asarray(mask)
    return flashkit.attention(P.Q, K, V, mask=mask, scale=P.scale, backend=backend, return_lse=True)
