"""Attention inside a model, in NumPy: a multi-head attention layer (GQA, RoPE, KV cache) and a tiny
decoder that generates tokens with it, and trains: every layer has a hand-written backward. Small on
purpose: every line is the textbook one.

The layer shows that one kernel serves prefill and decoding. `forward(x, cache=cache)` projects the
new tokens to q, k, v, rotates q and k by their positions (RoPE), appends k and v to the cache and
calls `flashkit.attention(q, K_cache, V_cache, causal=True)`. Causal attention in flashkit is aligned
bottom-right, so n new queries against L cached keys see keys j <= i + L - n: a prompt of N tokens
(n = L = N) is ordinary causal attention, and one new token (n = 1) sees the whole cache. Prefill and
decode are the same mathematics; a decoding step (at most DECODE_MAX_TOKENS new tokens) goes through
`flashkit.decode.attention_decode` instead, which reads the cache buffers in place with split-K (one
read of K and V serves the query heads of a group, every core streams a part of the cache): a step is
bound by memory bandwidth, and benchmarks/decode.py measures the model's tokens per second against it.

    model = TinyDecoder(vocab=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, seed=0)
    tokens = model.generate([1, 2, 3], n_new=5)            # greedy, with a KV cache per layer

Training (flashkit.train has the optimiser, the tasks and the loop): every layer has
`forward_train(x) -> (y, saved)`, keeping what its backward needs, and `backward(dy, saved) -> (dx,
grads)`, with `grads` keyed like `parameters()`. The attention layer keeps its rotated q and k, v, the
output O and the logsumexp lse, but never the n x n matrix P: `flashkit.attention_backward` recomputes
it from lse, as FlashAttention does. The model's `loss_and_grads(tokens, targets)` runs the whole
chain down to the embedding. tests/test_training.py checks every backward against finite differences.
"""
from __future__ import annotations

import numbers

import numpy as np

import flashkit
from flashkit.cpu.threads import numpy_blas_one_thread
from flashkit.decode import attention_decode
from flashkit.kvcache import KVCache
from flashkit.rope import apply_rope, check_rotary_dim
from flashkit.validate import positive_int


# A call with a KV cache and at most this many new tokens is a decoding step: flashkit.decode's split-K
# kernel reads the cache in place (one pass over K and V serves every query head of a group). More new
# tokens (a prompt) are a prefill: flashkit.attention, whose kernels parallelise over query blocks.
DECODE_MAX_TOKENS = 16


def _init(rng, fan_in, fan_out, dtype):
    """A (fan_in, fan_out) weight with variance 1/fan_in, so activations keep their size."""
    return (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(dtype)


def _matmul_sum(x, dy):
    """dW for y = x W: x^T dy summed over every leading axis (batch and tokens). x (..., a), dy (..., b)."""
    return x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])  # (a, b)


class MultiHeadAttention:
    """Multi-head attention with grouped K/V heads, rotary positions and an optional KV cache.

    d_model        width of the residual stream
    n_heads        query heads H
    n_kv_heads     K/V heads H_kv (default H); H % H_kv == 0. H_kv < H is GQA, H_kv = 1 is MQA
    head_dim       d of each head (default d_model // n_heads)
    fused_qkv      one (d_model, (H + 2 H_kv) d) projection (as most checkpoints store it) or three
    rope           rotate q and k by position; rope_base (10000) and partial_rotary (the fraction of
                   each head's features rotated, 1.0 = all) are the usual options
    causal         True for a decoder (each token sees itself and the past)
    backend        passed to flashkit.attention ("auto" or a name from flashkit.backends())
    seed, weights  random weights from a seed, or a dict of arrays: {"Wqkv", "Wo"} when fused,
                   {"Wq", "Wk", "Wv", "Wo"} when not
    """

    def __init__(self, d_model, n_heads, n_kv_heads=None, *, head_dim=None, fused_qkv=True, rope=True,
                 rope_base=10000.0, partial_rotary=1.0, causal=True, backend="auto", seed=0, weights=None,
                 dtype=np.float32):
        self.d_model = positive_int("d_model", d_model)
        self.n_heads = positive_int("n_heads", n_heads)
        self.n_kv_heads = self.n_heads if n_kv_heads is None else positive_int("n_kv_heads", n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads}), "
                                 "or pass head_dim")
            head_dim = self.d_model // self.n_heads
        self.head_dim = positive_int("head_dim", head_dim)
        if not isinstance(partial_rotary, numbers.Real) or not 0 <= partial_rotary <= 1:
            raise ValueError(f"partial_rotary must be a fraction between 0 and 1; got {partial_rotary!r}")
        # Rotated features: an even count, as GPT-NeoX does with int(d * fraction).
        self.rotary_dim = check_rotary_dim(int(self.head_dim * partial_rotary) // 2 * 2, self.head_dim) if rope else 0
        self.rope_base = float(rope_base)
        self.causal = bool(causal)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string; got {backend!r}")
        self.backend = backend
        self.fused_qkv = bool(fused_qkv)
        self.dtype = np.dtype(dtype)

        H, Hkv, d, D = self.n_heads, self.n_kv_heads, self.head_dim, self.d_model
        shapes = {"Wo": (H * d, D)}
        if self.fused_qkv:
            shapes["Wqkv"] = (D, (H + 2 * Hkv) * d)
        else:
            shapes.update(Wq=(D, H * d), Wk=(D, Hkv * d), Wv=(D, Hkv * d))
        if weights is None:
            rng = np.random.default_rng(seed)
            weights = {name: _init(rng, *shape, self.dtype) for name, shape in sorted(shapes.items())}
        if set(weights) != set(shapes):
            raise ValueError(f"weights must have the keys {sorted(shapes)}; got {sorted(weights)}")
        for name, shape in shapes.items():
            if np.shape(weights[name]) != shape:
                raise ValueError(f"weights[{name!r}] must have shape {shape}; got {np.shape(weights[name])}")
        self.weights = {name: np.array(w, dtype=self.dtype) for name, w in weights.items()}  # copies

    def unfused(self) -> MultiHeadAttention:
        """The same layer with separate Wq, Wk, Wv (the fused weight cut in three): same outputs."""
        if not self.fused_qkv:
            return self
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        Wqkv = self.weights["Wqkv"]
        w = dict(Wq=Wqkv[:, :H * d], Wk=Wqkv[:, H * d:(H + Hkv) * d], Wv=Wqkv[:, (H + Hkv) * d:], Wo=self.weights["Wo"])
        return MultiHeadAttention(self.d_model, H, Hkv, head_dim=d, fused_qkv=False, rope=self.rotary_dim > 0,
                                  rope_base=self.rope_base, partial_rotary=self.rotary_dim / d, causal=self.causal,
                                  backend=self.backend, weights=w, dtype=self.dtype)

    def new_cache(self, max_len, batch=1) -> KVCache:
        """An empty KV cache sized for this layer."""
        return KVCache(max_len, self.n_kv_heads, self.head_dim, batch=batch, dtype=self.dtype)

    def project(self, x):
        """q (B, H, n, d), k and v (B, H_kv, n, d) from x (B, n, d_model), before RoPE."""
        B, n, _ = x.shape
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        if self.fused_qkv:
            qkv = x @ self.weights["Wqkv"]  # (B, n, (H + 2 H_kv) d)
            q, k, v = np.split(qkv, [H * d, (H + Hkv) * d], axis=-1)
        else:
            q, k, v = x @ self.weights["Wq"], x @ self.weights["Wk"], x @ self.weights["Wv"]
        q = q.reshape(B, n, H, d).transpose(0, 2, 1, 3)  # (B, H, n, d)
        k = k.reshape(B, n, Hkv, d).transpose(0, 2, 1, 3)  # (B, H_kv, n, d)
        v = v.reshape(B, n, Hkv, d).transpose(0, 2, 1, 3)  # (B, H_kv, n, d)
        return q, k, v

    def forward(self, x, cache: KVCache = None, *, positions=None, backend=None):
        """The layer's output for x, (B, n, d_model) or (n, d_model); the same shape comes back.

        With a cache, the n new tokens take positions cache.length .. cache.length + n - 1, their
        keys and values are appended, and they attend to everything cached (prefill when the cache
        is empty, one decoding step when n = 1). `positions` (n integers) may be given to check that.
        `backend` overrides the layer's backend for this call.
        """
        x = np.asarray(x)
        if x.ndim not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, n, {self.d_model}) or (n, {self.d_model}); got {x.shape}")
        squeeze = x.ndim == 2
        x = (x[None] if squeeze else x).astype(self.dtype, copy=False)
        B, n, _ = x.shape
        start = 0 if cache is None else cache.length
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a flashkit.kvcache.KVCache; got {type(cache).__name__}")
            if (cache.n_kv_heads, cache.head_dim) != (self.n_kv_heads, self.head_dim):
                raise ValueError(f"cache holds {cache.n_kv_heads} K/V heads of size {cache.head_dim}; this layer "
                                 f"needs {self.n_kv_heads} heads of size {self.head_dim}")
            if cache.batch != B:
                raise ValueError(f"cache holds batch size {cache.batch}; x has batch size {B}")
            if start + n > cache.max_len:
                raise ValueError(f"KV cache overflow: it holds {start} of max_len={cache.max_len} tokens and "
                                 f"cannot take {n} more; allocate a larger cache")
        if positions is None:
            positions = np.arange(start, start + n)
        else:
            positions = np.asarray(positions)
            if positions.shape != (n,) or not np.issubdtype(positions.dtype, np.integer):
                raise ValueError(f"positions must hold {n} integers, one per new token; got {positions!r}")
            if cache is not None and positions[0] > start:
                raise ValueError(f"position {int(positions[0])} is beyond the end of the cache (length {start}): "
                                 "tokens must be appended in order, a gap would leave cache rows never written")
            if cache is not None and positions[0] < start:
                raise ValueError(f"position {int(positions[0])} is already in the cache (length {start}); "
                                 f"call cache.truncate({int(positions[0])}) first to overwrite it")
            if cache is not None and (np.diff(positions) != 1).any():
                raise ValueError(f"positions must be consecutive (p, p+1, ...) with a KV cache; got {positions.tolist()}")

        q, k, v = self.project(x)  # (B, H, n, d), (B, H_kv, n, d) x2
        if self.rotary_dim:
            q = apply_rope(q, positions, base=self.rope_base, rotary_dim=self.rotary_dim)
            k = apply_rope(k, positions, base=self.rope_base, rotary_dim=self.rotary_dim)
        backend = backend or self.backend
        if cache is not None and n <= DECODE_MAX_TOKENS:
            # a decoding step: split-K against the cache buffers in place (flashkit.decode), bandwidth-bound;
            # a named prefill backend runs unsplit there, on the filled rows
            cache.append(k, v)
            o = attention_decode(q, cache.K, cache.V, length=cache.length, causal=self.causal, backend=backend)
        else:
            K, V = (k, v) if cache is None else cache.append(k, v)  # (B, H_kv, L, d), L = start + n
            o = flashkit.attention(q, K, V, causal=self.causal, backend=backend)  # (B, H, n, d)
        o = o.transpose(0, 2, 1, 3).reshape(B, n, self.n_heads * self.head_dim)  # (B, n, H d)
        out = o @ self.weights["Wo"]  # (B, n, d_model)
        return out[0] if squeeze else out

    __call__ = forward

    # ------------------------------------------------------------ training: forward that keeps, backward
    def parameters(self) -> dict:
        """The weights by name (the arrays themselves: an optimiser updates them in place)."""
        return self.weights

    def forward_train(self, x, *, backend=None):
        """(out, saved) for x (B, n, d_model): self-attention over positions 0..n-1 (no KV cache), with
        what `backward` needs kept in `saved`: x, the rotated q and k, v, O and lse. Not P (n x n)."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, n, {self.d_model}); got {x.shape}")
        B, n, _ = x.shape
        backend = backend or self.backend
        positions = np.arange(n)
        q, k, v = self.project(x)  # (B, H, n, d), (B, H_kv, n, d) x2
        if self.rotary_dim:
            q = apply_rope(q, positions, base=self.rope_base, rotary_dim=self.rotary_dim)
            k = apply_rope(k, positions, base=self.rope_base, rotary_dim=self.rotary_dim)
        o, lse = flashkit.attention(q, k, v, causal=self.causal, backend=backend, return_lse=True)
        o_flat = o.transpose(0, 2, 1, 3).reshape(B, n, self.n_heads * self.head_dim)  # (B, n, H d)
        out = o_flat @ self.weights["Wo"]  # (B, n, d_model)
        return out, dict(x=x, q=q, k=k, v=v, o=o, lse=lse, o_flat=o_flat, backend=backend)

    def backward(self, dout, saved):
        """(dx, grads) from dout = dLoss/dout (B, n, d_model); grads has the keys of `weights`.

        Back through the output projection, then attention (flashkit.attention_backward: P recomputed
        from lse), then RoPE (the gradient of a rotation by theta is the rotation by -theta), then the
        projections. With GQA, dk and dv come back already summed over each K/V head's query heads.
        """
        x, q, k, v, o, lse = (saved[name] for name in ("x", "q", "k", "v", "o", "lse"))
        B, n, _ = x.shape
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        grads = {}
        # out = o_flat Wo
        grads["Wo"] = _matmul_sum(saved["o_flat"], dout)  # (H d, d_model)
        do = (dout @ self.weights["Wo"].T).reshape(B, n, H, d).transpose(0, 2, 1, 3)  # (B, H, n, d)
        # o = attention(q, k, v): dq, dk, dv from dO, O and lse (FlashAttention-2's backward)
        dq, dk, dv = flashkit.attention_backward(np.ascontiguousarray(do), q, k, v, o, lse, causal=self.causal,
                                                 backend=saved["backend"])
        if self.rotary_dim:  # q_rot = R(theta) q, so dq = R(theta)^T dq_rot = R(-theta) dq_rot
            positions = np.arange(n)
            dq = apply_rope(dq, positions, base=self.rope_base, rotary_dim=self.rotary_dim, inverse=True)
            dk = apply_rope(dk, positions, base=self.rope_base, rotary_dim=self.rotary_dim, inverse=True)
        dq = dq.transpose(0, 2, 1, 3).reshape(B, n, H * d)  # (B, n, H d), as project() made them
        dk = dk.transpose(0, 2, 1, 3).reshape(B, n, Hkv * d)  # (B, n, H_kv d)
        dv = dv.transpose(0, 2, 1, 3).reshape(B, n, Hkv * d)
        if self.fused_qkv:  # qkv = x Wqkv, cut in three
            dqkv = np.concatenate([dq, dk, dv], axis=-1)  # (B, n, (H + 2 H_kv) d)
            grads["Wqkv"] = _matmul_sum(x, dqkv)
            dx = dqkv @ self.weights["Wqkv"].T
        else:
            grads["Wq"], grads["Wk"], grads["Wv"] = _matmul_sum(x, dq), _matmul_sum(x, dk), _matmul_sum(x, dv)
            dx = dq @ self.weights["Wq"].T + dk @ self.weights["Wk"].T + dv @ self.weights["Wv"].T
        return dx, grads

    def attention_map(self, saved):
        """P (B, H, n, n), the attention weights of a forward_train call, rebuilt from q, k and lse the way
        the backward rebuilds them: P = exp(q k^T * scale - lse), 0 where the causal mask hides a key."""
        q, k, lse = saved["q"], saved["k"], saved["lse"]
        n, g = q.shape[2], self.n_heads // self.n_kv_heads
        S = (q @ np.repeat(k, g, axis=1).transpose(0, 1, 3, 2)) / np.sqrt(self.head_dim)  # (B, H, n, n)
        if self.causal:
            S = np.where(np.tril(np.ones((n, n), bool)), S, -np.inf)
        return np.exp(S - lse[..., None])


class RMSNorm:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Zhang & Sennrich 2019)."""

    def __init__(self, dim, eps=1e-6, dtype=np.float32):
        self.weight = np.ones(positive_int("dim", dim), dtype)
        self.eps = float(eps)

    def _rms(self, x):
        # sqrt(mean(x^2) + eps), in float32 at least (float16 squares overflow), float64 for float64
        x = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
        return np.sqrt((x * x).mean(axis=-1, keepdims=True) + self.eps)  # (..., 1)

    def __call__(self, x):
        return (x / self._rms(x)).astype(x.dtype) * self.weight

    def parameters(self) -> dict:
        return {"weight": self.weight}

    def forward_train(self, x):
        rms = self._rms(x)
        return (x / rms).astype(x.dtype) * self.weight, dict(x=x, r=(1 / rms).astype(x.dtype))

    def backward(self, dy, saved):
        """y = x r w with r = (mean(x^2) + eps)^(-1/2), so dr/dx = -r^3 x / D and
        dx = r (dy w) - x r^3 mean((dy w) x);  dw = sum over tokens of dy x r."""
        x, r = saved["x"], saved["r"]
        g = dy * self.weight
        dx = r * g - x * r ** 3 * (g * x).mean(axis=-1, keepdims=True)
        return dx, {"weight": (dy * x * r).reshape(-1, x.shape[-1]).sum(axis=0)}


class MLP:
    """The SwiGLU feed-forward of Llama: (silu(x W_gate) * (x W_up)) W_down."""

    def __init__(self, d_model, hidden, *, seed=0, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.W_gate = _init(rng, d_model, hidden, dtype)
        self.W_up = _init(rng, d_model, hidden, dtype)
        self.W_down = _init(rng, hidden, d_model, dtype)

    def __call__(self, x):
        g = x @ self.W_gate
        return ((g / (1 + np.exp(-g))) * (x @ self.W_up)) @ self.W_down  # silu(g) = g * sigmoid(g)

    def parameters(self) -> dict:
        return {"W_gate": self.W_gate, "W_up": self.W_up, "W_down": self.W_down}

    def forward_train(self, x):
        g, u = x @ self.W_gate, x @ self.W_up  # (..., hidden) each
        sig = 1 / (1 + np.exp(-g))
        h = g * sig * u  # silu(g) * u
        return h @ self.W_down, dict(x=x, g=g, u=u, sig=sig, h=h)

    def backward(self, dy, saved):
        """Through y = h W_down, h = silu(g) u, g = x W_gate, u = x W_up; silu'(g) = sig (1 + g (1 - sig))."""
        x, g, u, sig, h = (saved[name] for name in ("x", "g", "u", "sig", "h"))
        dh = dy @ self.W_down.T
        dg = dh * u * sig * (1 + g * (1 - sig))
        du = dh * g * sig
        dx = dg @ self.W_gate.T + du @ self.W_up.T
        return dx, {"W_gate": _matmul_sum(x, dg), "W_up": _matmul_sum(x, du), "W_down": _matmul_sum(h, dy)}


class DecoderBlock:
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, d_model, n_heads, n_kv_heads=None, *, mlp_hidden=None, seed=0, dtype=np.float32, **attn_options):
        rng = np.random.default_rng(seed)
        s_attn, s_mlp = (int(s) for s in rng.integers(0, 2**31, size=2))
        self.norm1, self.norm2 = RMSNorm(d_model, dtype=dtype), RMSNorm(d_model, dtype=dtype)
        self.attn = MultiHeadAttention(d_model, n_heads, n_kv_heads, seed=s_attn, dtype=dtype, **attn_options)
        self.mlp = MLP(d_model, mlp_hidden or 4 * d_model, seed=s_mlp, dtype=dtype)

    def __call__(self, x, cache=None, backend=None):
        x = x + self.attn(self.norm1(x), cache, backend=backend)
        return x + self.mlp(self.norm2(x))

    def parameters(self) -> dict:
        return {f"{name}.{key}": w for name in ("norm1", "attn", "norm2", "mlp")
                for key, w in getattr(self, name).parameters().items()}

    def forward_train(self, x, *, backend=None):
        h1, s_norm1 = self.norm1.forward_train(x)
        a, s_attn = self.attn.forward_train(h1, backend=backend)
        x1 = x + a  # the residual stream after attention
        h2, s_norm2 = self.norm2.forward_train(x1)
        m, s_mlp = self.mlp.forward_train(h2)
        return x1 + m, dict(norm1=s_norm1, attn=s_attn, norm2=s_norm2, mlp=s_mlp)

    def backward(self, dy, saved):
        """A residual add passes its gradient to both branches: dx1 = dy + (the MLP branch's dx1), and
        dx = dx1 + (the attention branch's dx)."""
        grads = {}

        def through(name, d):
            dx, g = getattr(self, name).backward(d, saved[name])
            grads.update({f"{name}.{key}": w for key, w in g.items()})
            return dx

        dx1 = dy + through("norm2", through("mlp", dy))
        dx = dx1 + through("norm1", through("attn", dx1))
        return dx, grads


class TinyDecoder:
    """A decoder-only language model with seeded random weights: embedding, blocks, norm, output head.

    Its tokens mean nothing; it exists to run prefill and decoding through real layers. Greedy
    generation is deterministic, so every backend must produce the same tokens.
    """

    def __init__(self, vocab=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, *, seed=0, dtype=np.float32,
                 **attn_options):
        self.vocab = positive_int("vocab", vocab)
        rng = np.random.default_rng(seed)
        self.embed = rng.standard_normal((self.vocab, d_model)).astype(dtype)  # (vocab, d_model)
        seeds = rng.integers(0, 2**31, size=positive_int("n_layers", n_layers))
        self.blocks = [DecoderBlock(d_model, n_heads, n_kv_heads, seed=int(s), dtype=dtype, **attn_options)
                       for s in seeds]
        self.norm = RMSNorm(d_model, dtype=dtype)
        # An untied output head: with a tied one a random model mostly repeats its last token.
        self.lm_head = _init(rng, d_model, self.vocab, dtype)  # (d_model, vocab)

    def new_caches(self, max_len, batch=1):
        """One empty KV cache per layer."""
        return [b.attn.new_cache(max_len, batch) for b in self.blocks]

    def cache_bytes(self, caches) -> int:
        return sum(c.used_bytes for c in caches)

    def _check_tokens(self, tokens):
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 2-D array (B, n) of integers; got {tokens.dtype} {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab):
            raise ValueError(f"tokens must lie in [0, {self.vocab}); got values from {tokens.min()} to {tokens.max()}")
        return tokens

    def forward(self, tokens, caches=None, backend=None):
        """Logits (B, n, vocab) for token ids (B, n); with caches, the tokens extend what they hold."""
        tokens = self._check_tokens(tokens)
        if caches is not None and tokens.shape[1] <= DECODE_MAX_TOKENS:
            # a decoding step: its matrix-vector products are too small to share, so NumPy's BLAS runs on
            # one thread and its spinning threads leave the cores to split-K (flashkit.cpu.threads)
            with numpy_blas_one_thread():
                return self._forward(tokens, caches, backend)
        return self._forward(tokens, caches, backend)

    def _forward(self, tokens, caches, backend):
        x = self.embed[tokens]  # (B, n, d_model)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], backend=backend)
        return self.norm(x) @ self.lm_head  # (B, n, vocab)

    # ------------------------------------------------------------ training
    def parameters(self) -> dict:
        """Every weight by name ("embed", "blocks.0.attn.Wqkv", ...): the arrays themselves."""
        params = {"embed": self.embed}
        for i, block in enumerate(self.blocks):
            params.update({f"blocks.{i}.{key}": w for key, w in block.parameters().items()})
        params.update({"norm.weight": self.norm.weight, "lm_head": self.lm_head})
        return params

    def forward_train(self, tokens, *, backend=None):
        """(logits (B, n, vocab), saved): the forward of `loss_and_grads`, keeping every layer's saved state."""
        tokens = self._check_tokens(tokens)
        x = self.embed[tokens]  # (B, n, d_model)
        saved = []
        for block in self.blocks:
            x, s = block.forward_train(x, backend=backend)
            saved.append(s)
        h, s_norm = self.norm.forward_train(x)
        return h @ self.lm_head, dict(tokens=tokens, blocks=saved, norm=s_norm, h=h)

    def loss_and_grads(self, tokens, targets, *, backend=None):
        """(loss, grads): the mean cross-entropy of predicting targets (B, n) from tokens (B, n), over the
        positions whose target is >= 0 (-1 = not scored), and its gradient for every parameter."""
        logits, saved = self.forward_train(tokens, backend=backend)
        loss, dlogits = cross_entropy(logits, targets)
        grads = {"lm_head": _matmul_sum(saved["h"], dlogits)}
        dx, g = self.norm.backward(dlogits @ self.lm_head.T, saved["norm"])
        grads["norm.weight"] = g["weight"]
        for i in reversed(range(len(self.blocks))):
            dx, g = self.blocks[i].backward(dx, saved["blocks"][i])
            grads.update({f"blocks.{i}.{key}": w for key, w in g.items()})
        dembed = np.zeros_like(self.embed)
        np.add.at(dembed, saved["tokens"], dx)  # a token used twice collects both gradients
        grads["embed"] = dembed
        return loss, grads

    def attention_maps(self, tokens, *, backend=None):
        """The attention weights P of every layer for `tokens` (B, n): a list of (B, H, n, n) arrays."""
        _, saved = self.forward_train(tokens, backend=backend)
        return [block.attn.attention_map(s["attn"]) for block, s in zip(self.blocks, saved["blocks"])]

    def generate(self, prompt, n_new, *, backend=None, use_cache=True):
        """Greedy decoding: the prompt (list of ids, or (B, n) array) followed by n_new chosen tokens.

        With use_cache, the prompt is prefilled once and each new token is one decoding step (n = 1);
        without, the whole sequence is recomputed every step (the cost a cache saves).
        """
        tokens = np.atleast_2d(np.asarray(prompt, dtype=np.int64))  # (B, n)
        n_new = int(n_new)
        if use_cache:
            caches = self.new_caches(tokens.shape[1] + n_new, batch=tokens.shape[0])
            logits = self.forward(tokens, caches, backend=backend)  # prefill
            for _ in range(n_new):
                nxt = logits[:, -1].argmax(axis=-1)[:, None]  # (B, 1)
                tokens = np.concatenate([tokens, nxt], axis=1)
                logits = self.forward(nxt, caches, backend=backend)  # one decoding step
        else:
            for _ in range(n_new):
                nxt = self.forward(tokens, backend=backend)[:, -1].argmax(axis=-1)[:, None]
                tokens = np.concatenate([tokens, nxt], axis=1)
        return tokens


def cross_entropy(logits, targets):
    """(loss, dlogits): the mean of -log softmax(logits)[target] over the positions with target >= 0.

    logits (..., vocab), targets (...) integers, -1 where a position is not scored. The gradient of a
    softmax followed by its own log-likelihood is short: dlogits = (softmax(logits) - onehot(target)) / count.
    """
    targets = np.asarray(targets)
    if targets.shape != logits.shape[:-1] or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integers of shape {logits.shape[:-1]}; got {targets.dtype} {targets.shape}")
    scored = targets >= 0
    count = int(scored.sum())
    if count == 0:
        raise ValueError("targets score no position (all -1)")
    if targets.max() >= logits.shape[-1]:
        raise ValueError(f"targets must lie in [-1, {logits.shape[-1]}); got up to {targets.max()}")
    z = logits - logits.max(axis=-1, keepdims=True)  # safe softmax: every exp() <= 1
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    t = np.where(scored, targets, 0)[..., None]
    loss = -float(np.take_along_axis(log_p, t, axis=-1)[..., 0][scored].sum()) / count
    dlogits = np.exp(log_p)
    np.put_along_axis(dlogits, t, np.take_along_axis(dlogits, t, axis=-1) - 1, axis=-1)
    dlogits *= scored[..., None] / count
    return loss, dlogits.astype(logits.dtype, copy=False)
