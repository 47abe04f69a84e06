"""Rotary position embeddings (RoPE, Su et al. 2021): positions enter attention as rotations of q and k.

Pair up the first `rotary_dim` features of a head as (x_i, x_{i + r/2}), i < r/2 (the "half-split"
layout of GPT-NeoX and Llama), read each pair as a complex number z_i = x_i + 1j x_{i+r/2}, and turn it
by the angle  pos * theta_i  with  theta_i = base ** (-2i / r).  Then

    q_rot(m) . k_rot(n) = Re(sum_i z_q,i conj(z_k,i) exp(1j (m - n) theta_i))

depends on the positions only through m - n: attention sees relative positions, and a key rotated
once when it enters the KV cache never needs rotating again. Features from `rotary_dim` to d are left
as they are ("partial rotary", as in GPT-NeoX and Phi: rotary_dim = partial_rotary * d).

The tests compare `apply_rope` with that complex-number formula written directly.
"""
from __future__ import annotations

import numbers

import numpy as np


def check_rotary_dim(rotary_dim, d: int) -> int:
    """The number of rotated features: an even integer in [0, d] (None means all d)."""
    if rotary_dim is None:
        rotary_dim = d
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, numbers.Integral):
        raise TypeError(f"rotary_dim must be an integer or None; got {rotary_dim!r}")
    if rotary_dim < 0 or rotary_dim > d or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even integer between 0 and the head size {d}; got {rotary_dim}")
    return int(rotary_dim)


def rope_angles(positions, rotary_dim: int, base: float = 10000.0):
    """(cos, sin), each (N, rotary_dim // 2) float64: the angle pos * theta_i for every position and pair."""
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not base > 1:
        raise ValueError(f"base must be a number > 1 (10000 in most models); got {base!r}")
    pos = np.asarray(positions)
    if pos.ndim != 1 or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"positions must be a 1-D array of integers; got {pos.dtype} with shape {pos.shape}")
    if pos.size and pos.min() < 0:
        raise ValueError(f"positions must be >= 0; got {int(pos.min())}")
    i = np.arange(rotary_dim // 2, dtype=np.float64)
    theta = float(base) ** (-2.0 * i / rotary_dim)  # (r/2,) one frequency per pair, fastest first
    angle = pos.astype(np.float64)[:, None] * theta[None, :]  # (N, r/2)
    return np.cos(angle), np.sin(angle)


def apply_rope(x, positions, *, base: float = 10000.0, rotary_dim=None, inverse: bool = False):
    """x rotated: x is (..., N, d) (e.g. (B, H, N, d)), positions holds N integers (the tokens' places).

    inverse=True rotates by -angle instead. A rotation's inverse is its transpose, so this is also the
    backward of RoPE: the gradient with respect to the unrotated q is the gradient with respect to the
    rotated q, rotated back. Returns a new array of x's dtype; x is not modified. The angles are
    computed in float64.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (..., N, d); got shape {x.shape}")
    N, d = x.shape[-2:]
    r = check_rotary_dim(rotary_dim, d)
    positions = np.asarray(positions)
    if positions.shape != (N,):
        raise ValueError(f"positions must hold one integer per token: shape ({N},); got shape {positions.shape}")
    out = x.copy()
    if r == 0:
        return out
    cos, sin = rope_angles(positions, r, base)  # (N, r/2)
    cos, sin = cos.astype(x.dtype), (-sin if inverse else sin).astype(x.dtype)  # cos(-a) = cos a, sin(-a) = -sin a
    x1, x2 = x[..., :r // 2], x[..., r // 2:r]  # (..., N, r/2): real and imaginary parts of z
    # z * exp(1j angle) = (x1 cos - x2 sin) + 1j (x1 sin + x2 cos)
    out[..., :r // 2] = x1 * cos - x2 * sin
    out[..., r // 2:r] = x1 * sin + x2 * cos
    return out
