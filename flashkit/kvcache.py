"""A KV cache: the keys and values of every token seen so far, kept so a new token costs one row.

Generating token t needs the keys and values of tokens 0..t-1 at every layer. Recomputing them is
O(t) matrix products per step; keeping them costs memory instead:

    bytes = 2 (K and V) * B * H_kv * max_len * d * itemsize          per layer

e.g. Llama-2-7B (32 layers, H_kv = 32, d = 128, fp16) holds 0.5 MiB per token: 2 GiB at 4k tokens.
GQA divides this by H / H_kv, which is why models adopted it. The buffers here are allocated once
(`max_len` rows) and filled by `append`; `keys`/`values` are views of the filled part, never copies.
"""
from __future__ import annotations

import numbers

import numpy as np

from flashkit.validate import positive_int


class KVCache:
    """Preallocated K and V buffers of shape (B, H_kv, max_len, d) and the number of rows filled.

        cache = KVCache(max_len=64, n_kv_heads=2, head_dim=16)
        K, V = cache.append(k_new, v_new)   # k_new, v_new: (B, H_kv, n, d); K, V: (B, H_kv, length, d)
    """

    def __init__(self, max_len, n_kv_heads, head_dim, *, batch=1, dtype=np.float32):
        self.max_len = positive_int("max_len", max_len)
        self.n_kv_heads = positive_int("n_kv_heads", n_kv_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        self.batch = positive_int("batch", batch)
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"dtype must be a floating type; got {dtype}")
        shape = (self.batch, self.n_kv_heads, self.max_len, self.head_dim)
        self.K = np.zeros(shape, dtype)  # (B, H_kv, max_len, d): rows [length, max_len) are unused
        self.V = np.zeros(shape, dtype)
        self.length = 0

    # -- what the cache holds ----------------------------------------------------------------
    @property
    def keys(self):
        """(B, H_kv, length, d) view of the keys appended so far."""
        return self.K[:, :, :self.length]

    @property
    def values(self):
        """(B, H_kv, length, d) view of the values appended so far."""
        return self.V[:, :, :self.length]

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes one token adds: 2 * B * H_kv * d * itemsize."""
        return 2 * self.batch * self.n_kv_heads * self.head_dim * self.K.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes allocated for K and V (all max_len rows, used or not)."""
        return self.K.nbytes + self.V.nbytes

    @property
    def used_bytes(self) -> int:
        """Bytes holding cached tokens: length * bytes_per_token (what one decode step reads)."""
        return self.length * self.bytes_per_token

    def __repr__(self):
        return (f"KVCache(length={self.length}/{self.max_len}, batch={self.batch}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.K.dtype}, {self.used_bytes}/{self.nbytes} bytes)")

    # -- changing it -------------------------------------------------------------------------
    def append(self, k, v):
        """Copy n new rows of keys and values, each (B, H_kv, n, d), after the cached ones.

        Returns (keys, values): views of everything cached, (B, H_kv, length, d). Raises ValueError
        (and changes nothing) when the shapes do not match or the cache would overflow.
        """
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, np.ndarray):
                raise TypeError(f"{name} must be a numpy.ndarray; got {type(x).__name__}")
            if x.ndim != 4:
                raise ValueError(f"{name} must have shape (B, H_kv, n, d); got shape {x.shape}")
            B, H, n, d = x.shape
            if H != self.n_kv_heads:
                raise ValueError(f"{name} has {H} heads but the cache holds {self.n_kv_heads} K/V heads")
            if d != self.head_dim:
                raise ValueError(f"{name} has head size {d} but the cache holds head size {self.head_dim}")
            if B != self.batch:
                raise ValueError(f"{name} has batch size {B} but the cache holds batch size {self.batch}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
        n = k.shape[2]
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache overflow: it holds {self.length} of max_len={self.max_len} tokens and "
                             f"cannot take {n} more; allocate a larger cache")
        self.K[:, :, self.length:self.length + n] = k
        self.V[:, :, self.length:self.length + n] = v
        self.length += n
        return self.keys, self.values

    def truncate(self, length):
        """Forget the tokens from `length` on (e.g. rejected draft tokens); keeps the buffers."""
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
            raise ValueError(f"length must be an integer >= 0; got {length!r}")
        if length > self.length:
            raise ValueError(f"cannot truncate to length {length}: the cache holds only {self.length} tokens")
        self.length = int(length)

    def clear(self):
        """Empty the cache (the buffers stay allocated)."""
        self.length = 0
