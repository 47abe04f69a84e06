"""flashkit.attention() and attention_backward(): validate, pick a backend, call it, shape the result."""
from __future__ import annotations

from flashkit import precompile, registry, validate


def attention(q, k, v, *, causal=False, scale=None, window=None, mask=None, backend="auto",
              block_size=None, return_lse=False, score_mod=None, mask_mod=None, block_mask=None, check_finite=True,
              precision="exact"):
    """Exact softmax attention, softmax(q k^T * scale) v, computed tile by tile.

    Parameters
    ----------
    q : array (B, H, Nq, d), (H, Nq, d) or (Nq, d); NumPy (CPU) or CuPy (GPU)
    k, v : arrays (B, H_kv, Nk, d) of the same rank, dtype and library as q. H % H_kv == 0: fewer K/V
        heads than query heads is grouped-query (GQA) or multi-query (MQA) attention.
    causal : bool. Aligned bottom-right when Nq != Nk (query i sees keys j <= i + Nk - Nq), as
        FlashAttention >= 2.1 does, so one decoding step against a KV cache is the same call.
    scale : float > 0, default 1/sqrt(d).
    window : (left, right) sliding window around the bottom-right diagonal, -1 = unbounded side.
    mask : bool array broadcastable to (B, H, Nq, Nk), True where a query may attend to a key.
    backend : "auto" or a name from flashkit.backends(). A named backend that cannot serve the
        request raises; it never falls back silently.
    block_size : None (the backend chooses from the cache size), an int, or (Br, Bc).
    return_lse : also return the logsumexp of each query row (natural log), shape (B, H, Nq).
    score_mod : FlexAttention's score hook, a Python function score_mod(score, b, h, q_idx, kv_idx) ->
        score applied to every visible score q_i . k_j * scale (h the query head; q_idx, kv_idx raw
        positions); -inf hides the score, NaN or +inf is an error. flashkit.mods has the standard ones
        (softcap, ALiBi, T5's relative position bias).
    mask_mod : FlexAttention's mask hook, mask_mod(b, h, q_idx, kv_idx) -> bool, True where the query may
        attend; and'ed with causal, window and mask. Tiles it hides completely are skipped.
    block_mask : flashkit.block_mask(mask_mod, B, H, Nq, Nk, block_size) made once for many calls: its
        mask_mod and its tile classification; the call then runs with its block size (the GPU's
        tensor-core rung runs its own tiles and maps the classification onto them exactly).
        Only some backends take the three (flashkit.backends(): column 'mods'); "auto" picks one.
    check_finite : True (the default) raises ValueError naming q, k or v when one holds NaN or Inf. On
        the GPU the scan is one extra kernel that runs beside the attention kernel (measured on an H200
        at N=4096, d=64, fp16: the public call 1.5-4% over the rung alone, benchmarks/results/gpu-*.json).
        False skips it: non-finite input then gives undefined output instead of an error.
    precision : "exact" (the default: every product in the input dtype's own arithmetic, float32 in
        float32) or "tf32": float32 CuPy input on the TF32 tensor cores (backend "cupy-tf32": Q, K, P
        and V rounded to 10 mantissa bits, fp32 sums; its error and speed beside each other in
        benchmarks/results/gpu-*.json). "tf32" with another dtype, NumPy input or another named
        backend raises.

    Returns
    -------
    o, with q's shape and dtype (float16 input to a CPU backend is computed in float32), or (o, lse).
    A query row that sees no key gives o = 0 and lse = -inf. Inputs are never modified.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string ('auto' or a name from flashkit.backends()); got {backend!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be True or False; got {return_lse!r}")
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be True or False; got {check_finite!r}")
    if backend != "auto":
        registry.get(backend)  # an unknown name fails before any work on the arrays
    backend = _precision_backend(precision, backend, q)
    # On the GPU the NaN/Inf check of q, k, v runs beside the attention kernel, or inside it (rung 7), and
    # validate.finish waits for the check alone, not for the kernel; a flagged input raises, the output dropped.
    problem = validate.check(q, k, v, causal=causal, scale=scale, window=window, mask=mask,
                             block_size=block_size, score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask,
                             finite="async" if check_finite else False)
    with precompile.serving(problem, registry.choose(problem, backend), "forward", backend) as chosen:
        validate.begin(problem, chosen)
        O, lse = chosen.run(problem)
    validate.finish(problem)
    o = _as_input(O, q)
    if not return_lse:
        return o
    lse_dtype = "float64" if q.dtype == "float64" else "float32"
    return o, lse.reshape(q.shape[:-1]).astype(lse_dtype, copy=False)


def attention_backward(do, q, k, v, o, lse, *, causal=False, scale=None, window=None, mask=None,
                       backend="auto", block_size=None, score_mod=None, mask_mod=None, block_mask=None,
                       check_finite=True):
    """Gradients (dq, dk, dv) of attention's output, given the gradient do of a loss with respect to it.

    The other half of FlashAttention: P is recomputed tile by tile from the forward's logsumexp
    instead of being stored, so the memory beyond the inputs and gradients is O(N), not O(N^2).

    Parameters
    ----------
    do : array of q's shape and dtype, the gradient of the loss with respect to o
    q, k, v : the forward's inputs, as in `attention` (any rank 2-4, GQA/MQA, Nq != Nk)
    o, lse : the forward's outputs, `o, lse = attention(q, k, v, ..., return_lse=True)`, computed with
        the same causal, window, mask and scale. A lse that does not belong to q and k (another call's,
        or in log2 units) is detected while P is recomputed and raises ValueError.
    causal, scale, window, mask, block_size : as in `attention`.
    score_mod, mask_mod, block_mask : as in `attention`, the same the forward had. The gradient flows
        through score_mod by its exact derivative with respect to the score, which flashkit writes from
        the function's source (flashkit.mods_grad: arithmetic, exp, log, tanh, where, if/else ...;
        anything else raises TypeError naming the construct). Backends: flashkit.backends(), column
        'backward_mods'.
    backend : "auto" (the fastest backend with a backward that serves the request) or a name; see the
        'backward' column of flashkit.backends(). A named backend without a backward raises.
    check_finite : True (the default) raises ValueError naming do, q, k, v, o or lse when one holds NaN
        or Inf (+inf for lse); on the GPU one extra kernel beside the backward's. False skips that scan;
        the check that lse belongs to q and k (inside the kernels) stays.

    Returns
    -------
    dq, dk, dv with the shapes and dtypes of q, k and v. With GQA, dk and dv sum over the query heads
    of each K/V group. A row that saw no key (lse = -inf) contributes 0. Inputs are never modified.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string ('auto' or a name from flashkit.backends()); got {backend!r}")
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be True or False; got {check_finite!r}")
    if backend != "auto":
        registry.get(backend)
    # On the GPU the NaN/Inf scan of the six arrays runs beside the backward kernels, and the CUDA rungs check
    # lse inside them (the row sums of the recomputed P); validate.finish waits for both and raises.
    problem = validate.check_backward(do, q, k, v, o, lse, causal=causal, scale=scale, window=window,
                                      mask=mask, block_size=block_size, score_mod=score_mod, mask_mod=mask_mod,
                                      block_mask=block_mask, finite="async" if check_finite else False)
    with precompile.serving(problem, registry.choose(problem, backend, direction="backward"), "backward",
                            backend) as chosen:
        dQ, dK, dV = chosen.run_backward(problem)
    validate.finish(problem)
    return tuple(_as_input(g, x) for g, x in ((dQ, q), (dK, k), (dV, v)))


PRECISIONS = ("exact", "tf32")


def _precision_backend(precision, backend, q):
    """The backend `precision` asks for: "tf32" is the GPU's TF32 rung (float32 CuPy input only); a TF32
    rung is never run unless asked for by precision."""
    from flashkit.gpu.rungs import RUNGS

    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}")
    tf32 = [r.name for r in RUNGS if r.precision == "tf32" and r.direction == "forward"]
    if precision == "exact":
        if backend in tf32:
            raise ValueError(f"backend {backend!r} rounds float32 to TF32: ask for it with precision='tf32'")
        return backend
    if type(q).__module__.split(".")[0] != "cupy":
        raise TypeError(f"precision='tf32' runs on the GPU's tensor cores: q, k, v must be CuPy arrays; got q of type "
                        f"{type(q).__name__}")
    if str(getattr(q, "dtype", "")) != "float32":
        raise TypeError(f"precision='tf32' is for float32 input; got q of dtype {getattr(q, 'dtype', None)}")
    if backend not in ("auto", *tf32):
        raise ValueError(f"precision='tf32' runs on backend {tf32[0]!r}; got backend={backend!r}")
    return tf32[0]


def _as_input(X, x):
    """A backend's 4-D result in the caller's rank and dtype (bfloat16 bits viewed back as x's dtype)."""
    X = X.reshape(x.shape)
    if X.dtype.kind == "u" and x.dtype.kind == "V":  # bf16 bits (uint16) -> the caller's '|V2' bfloat16
        return X.view(x.dtype)
    return X.astype(x.dtype, copy=False)


def backends():
    """Every backend as a list of dicts: name, device, available, reason (why not), what it supports
    (dtypes, head_dims, mask, mods, backward_mods, forward, backward), rung and summary. `mods`: whether
    its forward takes a score_mod / mask_mod / block_mask; `backward_mods`: whether its backward does.
    `compiled`: for a Numba backend "yes" (compiled or loaded in this process), "compiling" (in the
    background; "auto" serves from NumPy meanwhile), "no" or "failed: why"; "" for the others
    (flashkit.precompile)."""
    rows = []
    for b in registry.all_backends():
        reason = b.unavailable_reason()
        rows.append({
            "name": b.name, "device": b.device, "available": reason is None, "reason": reason or "",
            "dtypes": ", ".join(b.dtypes), "head_dims": "any" if b.head_dims is None else ", ".join(map(str, b.head_dims)),
            "mask": b.mask, "mods": b.mods, "backward_mods": b.backward_mods, "forward": b.has_forward, "backward": b.has_backward, "rung": b.rung,
            "compiled": precompile.state(b.name), "summary": b.summary,
        })
    return rows
