"""Decoding attention: a few new query rows against a long KV cache, split over the keys ("split-K").

    o = flashkit.decode.attention_decode(q, cache.K, cache.V, length=cache.length)

One decoding step reads every cached key and value once and does about 2 FLOPs per byte read, so it is
limited by memory bandwidth, and its parallelism is only B * H_kv heads: split-K (flash-decoding) cuts
the cache into `splits` chunks, computes a partial online-softmax state (m, l, O) per chunk in
parallel, and merges the states exactly with `flashkit.online_softmax.merge`:

    m = max_s m_s,   l = sum_s exp(m_s - m) l_s,   O = sum_s exp(m_s - m) O_s,   o = O / l

Backends (`backend=`), registered in `BACKENDS` below, so flashkit.backends() lists them:
    "numpy-splitk"   the readable twin: a Python loop over the splits, online_softmax.update per chunk
    "numba-splitk"   flashkit/cpu/decode.py: all (batch, K/V head, split) tasks in parallel on the cores
    "cupy-splitk"    flashkit/gpu/decode.py + kernels/decode_splitk.cu, for CuPy arrays
    any other name from flashkit.backends()   no split: flashkit.attention on the filled part of the cache
    "auto"           the registry's choice among the split-K backends: cupy-splitk for CuPy arrays, else
                     numba-splitk (numpy-splitk without Numba)
The split-K backends also serve flashkit.attention (causal and windows, no custom mask): a prefill with
them is correct, only slower than a prefill kernel.

The cache is read in place: pass the whole preallocated buffers and `length`, nothing is copied
(flashkit.attention would copy a non-contiguous view of the filled rows). The cache is not scanned for
NaN or Inf (that would read it a second time); the queries are. The checks are
flashkit.validate.check_decode (`check` here).
"""
from __future__ import annotations

import importlib.util
import math
import numbers

import numpy as np

from flashkit import online_softmax, precompile, registry, validate
from flashkit.problem import DecodeProblem
from flashkit.registry import Backend

# The checks of a decoding step live with every other input check; the name `check` is this module's API.
check = validate.check_decode
DECODE_DTYPES = validate.DECODE_DTYPES

# The split-K kernels. Their priorities sit below every prefill backend of their device (numpy-standard
# 10, cupy-standard 60), so flashkit.attention's "auto" never picks one for a prefill; among themselves
# they rank as attention_decode's "auto" should choose them.
BACKENDS = (
    Backend(name="numpy-splitk", device="cpu",
            summary="split-K decoding in NumPy, one online_softmax.update per chunk of the cache: the readable twin",
            runner="flashkit.decode:numpy_splitk_forward", decode="flashkit.decode:numpy_splitk",
            mask=False, priority=2),
    Backend(name="numba-splitk", device="cpu",
            summary="split-K decoding in Numba: every (batch, K/V head, chunk) task in parallel (cpu/decode.py)",
            runner="flashkit.cpu.decode:run", decode="flashkit.cpu.decode:decode",
            mask=False, priority=5, probe="flashkit.cpu:_probe", jit=True),
    Backend(name="cupy-splitk", device="gpu",
            summary="split-K decoding in CUDA, one block per chunk then a merge kernel; d=256 in float16 only (kernels/decode_splitk.cu)",
            runner="flashkit.gpu.decode:run", decode="flashkit.gpu.decode:decode",
            dtypes=("float16", "float32"), head_dims=(64, 128, 256), mask=False, priority=55,
            probe="flashkit.gpu:_probe", supports="flashkit.gpu.decode:unsupported_reason"),
)


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


def numpy_splitk(problem: DecodeProblem, splits="auto"):
    """The "numpy-splitk" decode runner: (O, lse) of the split states merged exactly. "auto": a few
    chunks (at most 4, of at least 256 keys), enough to look at."""
    if splits == "auto":
        splits = max(1, min(4, math.ceil(problem.n_keys / 256)))
    return online_softmax.finalize(online_softmax.merge(split_states(problem, splits)))


def numpy_splitk_forward(problem):
    """The "numpy-splitk" runner of flashkit.attention: the same split-K over the whole of K and V."""
    return numpy_splitk(DecodeProblem.from_problem(problem))


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
    if backend != "auto":
        # A request the named backend could never serve (NumPy arrays to cupy-splitk) is the caller's
        # mistake whatever this machine has: say so before whether the backend can run here.
        why_not = registry.get(backend).cannot_serve(P, "decode")
        if why_not is not None:
            raise ValueError(why_not)
    with precompile.serving(P, registry.choose(P, backend, direction="decode"), "decode", backend) as chosen:
        O, lse = chosen.run_decode(P, splits) if chosen.has_decode else _run_unsplit(P, chosen.name)
    lse_dtype = "float64" if q.dtype.name == "float64" else "float32"
    o = O.reshape(q.shape).astype(q.dtype, copy=False)
    if not return_lse:
        return o
    return o, lse.reshape(q.shape[:-1]).astype(lse_dtype, copy=False)


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
