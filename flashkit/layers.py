"""Attention inside a model, in NumPy: a multi-head attention layer (GQA, RoPE, KV cache) and a tiny
decoder that generates tokens with it. Small on purpose: every line is the textbook one.

The layer shows that one kernel serves prefill and decoding. `forward(x, cache=cache)` projects the
new tokens to q, k, v, rotates q and k by their positions (RoPE), appends k and v to the cache and
calls `flashkit.attention(q, K_cache, V_cache, causal=True)`. Causal attention in flashkit is aligned
bottom-right, so n new queries against L cached keys see keys j <= i + L - n: a prompt of N tokens
(n = L = N) is ordinary causal attention, and one new token (n = 1) sees the whole cache. Prefill and
decode are the same call.

    model = TinyDecoder(vocab=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, seed=0)
    tokens = model.generate([1, 2, 3], n_new=5)            # greedy, with a KV cache per layer
"""
from __future__ import annotations

import numbers

import numpy as np

import flashkit
from flashkit.kvcache import KVCache
from flashkit.rope import apply_rope, check_rotary_dim
from flashkit.validate import positive_int


def _init(rng, fan_in, fan_out, dtype):
    """A (fan_in, fan_out) weight with variance 1/fan_in, so activations keep their size."""
    return (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(dtype)


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
        K, V = (k, v) if cache is None else cache.append(k, v)  # (B, H_kv, L, d), L = start + n
        o = flashkit.attention(q, K, V, causal=self.causal, backend=backend or self.backend)  # (B, H, n, d)
        o = o.transpose(0, 2, 1, 3).reshape(B, n, self.n_heads * self.head_dim)  # (B, n, H d)
        out = o @ self.weights["Wo"]  # (B, n, d_model)
        return out[0] if squeeze else out

    __call__ = forward


class RMSNorm:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Zhang & Sennrich 2019)."""

    def __init__(self, dim, eps=1e-6, dtype=np.float32):
        self.weight = np.ones(positive_int("dim", dim), dtype)
        self.eps = float(eps)

    def __call__(self, x):
        ms = (x.astype(np.float32) ** 2).mean(axis=-1, keepdims=True)
        return (x / np.sqrt(ms + self.eps)).astype(x.dtype) * self.weight


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

    def forward(self, tokens, caches=None, backend=None):
        """Logits (B, n, vocab) for token ids (B, n); with caches, the tokens extend what they hold."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 2-D array (B, n) of integers; got {tokens.dtype} {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab):
            raise ValueError(f"tokens must lie in [0, {self.vocab}); got values from {tokens.min()} to {tokens.max()}")
        x = self.embed[tokens]  # (B, n, d_model)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], backend=backend)
        return self.norm(x) @ self.lm_head  # (B, n, vocab)

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
