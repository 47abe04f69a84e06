"""flashkit inside PyTorch: `flashkit.torch.attention` is an autograd function, so a torch model can
train on flashkit's forward and backward.

    import torch, flashkit.torch
    q = torch.randn(1, 8, 128, 64, requires_grad=True)             # (B, H, N, d), as SDPA
    k = torch.randn(1, 2, 128, 64, requires_grad=True)             # GQA: 4 query heads per K/V head
    v = torch.randn(1, 2, 128, 64, requires_grad=True)
    o = flashkit.torch.attention(q, k, v, causal=True)             # flashkit.attention(..., return_lse=True)
    o.sum().backward()                                             # flashkit.attention_backward

The forward keeps O and the logsumexp lse (B, H, Nq), never P: the backward recomputes P = exp(S - lse)
tile by tile, as FlashAttention does. torch is not a dependency of flashkit: this module imports it when
it is called, and `import flashkit` never imports it.

How the tensors cross, without copies:
  CPU   `t.detach().numpy()` shares the tensor's memory (a strided view when the tensor is not
        contiguous; flashkit's validation makes the one contiguous copy it needs), and
        `torch.from_numpy` shares the result's. bfloat16 has no NumPy dtype: a bf16 CPU tensor is
        computed in float32 (copies), as flashkit computes float16 in float32 on the CPU.
  CUDA  DLPack: `cupy.from_dlpack(t)` and `torch.from_dlpack(x)` hand over the same device memory, on
        the tensor's device. bf16: CuPy 14 with ml_dtypes holds a `bfloat16` dtype and a bf16 tensor
        arrives as one (seen on an H200, CuPy 14.2, torch 2.11: flashkit.attention then ran it end to
        end); a CuPy without it gives the nameless 2-byte void dtype '|V2', viewed here as its uint16
        bits (the GPU kernels take those with element="bf16").

Conventions are flashkit's, not SDPA's, where they differ: causal with Nq != Nk is aligned bottom-right
(query i sees keys j <= i + Nk - Nq; SDPA's is_causal is top-left), `mask` is True where a query MAY
attend, `window=(left, right)` is flash_attn's window_size, and K/V may have fewer heads than Q (GQA).
The result is differentiable once (a backward of the backward is not implemented: flashkit has none).
"""
from __future__ import annotations

import functools

import flashkit


def attention(q, k, v, *, causal=False, scale=None, window=None, mask=None, backend="auto", score_mod=None,
              mask_mod=None, block_mask=None):
    """softmax(q k^T * scale) v for torch tensors, differentiable in q, k and v.

    q (B, H, Nq, d), k and v (B, H_kv, Nk, d) (or (H, N, d), (N, d)), all on one device (CPU or
    CUDA) in one float dtype. causal, scale, window, mask, backend, score_mod, mask_mod and block_mask
    are flashkit.attention's (the gradient flows through score_mod by its exact derivative, see
    flashkit.attention_backward); mask may be a bool tensor or array, True where a query may attend to
    a key. Returns o with q's shape,
    dtype and device. The backward runs flashkit.attention_backward with the same options and the
    same backend name ("auto": the fastest backend with a backward that serves the request).
    """
    torch = _torch()
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (for NumPy or CuPy arrays call flashkit.attention); "
                            f"got {type(t).__name__}")
    return _function().apply(q, k, v, causal, scale, window, mask, backend, score_mod, mask_mod, block_mask)


@functools.cache
def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("flashkit.torch needs PyTorch (pip install torch; see the README's 'bench' extra); "
                          "flashkit itself does not") from e
    return torch


# ---------------------------------------------------------------- tensors to arrays and back, sharing memory
def _to_array(t):
    """A NumPy (CPU) or CuPy (CUDA) array over the memory of tensor `t` (no copy, except bf16 on the CPU)."""
    torch = _torch()
    t = t.detach()
    if t.is_cuda:
        import cupy

        # DLPack passes strides, but a contiguous tensor is the case every kernel is written for; this is
        # a no-op for the usual contiguous tensor and one copy for an expanded one (a gradient of .sum()).
        x = cupy.from_dlpack(t.contiguous())
        if x.dtype.kind == "V" and x.dtype.itemsize == 2 and x.dtype.name != "bfloat16":  # bf16 as '|V2'
            x = x.view(cupy.uint16)  # the same bits; flashkit's GPU kernels read them with element="bf16"
        return x
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: compute in float32, as for float16 on the CPU
        t = t.float()
    return t.numpy()  # shares t's memory; validation copies once if t is not contiguous


def _to_tensor(x, device, dtype=None):
    """flashkit's result `x` as a tensor on `device`, sharing x's memory; `dtype` the tensor dtype wanted
    when it differs from x's (bf16: uint16 bits on the GPU, float32 values on the CPU)."""
    torch = _torch()
    if device.type == "cuda":
        t = torch.from_dlpack(x)
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 and t.dtype == torch.uint16 else t  # bits back to bf16
    t = torch.from_numpy(x)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)  # only bf16 converts (from float32)


def _mask_array(mask, q):
    """The mask in the array library of q's device (a bool tensor becomes an array; arrays pass through)."""
    torch = _torch()
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend); got {mask.dtype}")
        return _to_array(mask.to(q.device))
    return mask


# ---------------------------------------------------------------- the autograd function
@functools.cache
def _function():
    """The torch.autograd.Function, built on first use so that this module imports without torch."""
    torch = _torch()
    from torch.autograd.function import once_differentiable

    class FlashAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, causal, scale, window, mask, backend, score_mod, mask_mod, block_mask):
            m = None if mask is None else _mask_array(mask, q)
            options = dict(causal=causal, scale=scale, window=window, mask=m, backend=backend, score_mod=score_mod,
                           mask_mod=mask_mod, block_mask=block_mask)
            o, lse = flashkit.attention(_to_array(q), _to_array(k), _to_array(v), return_lse=True, **options)
            o, lse = _to_tensor(o, q.device, q.dtype), _to_tensor(lse, q.device)  # lse: float32 (float64 for float64)
            # What the backward needs: the inputs, O and lse (B, H, Nq). Not P: that is recomputed.
            ctx.save_for_backward(q, k, v, o, lse)
            ctx.options = options
            return o

        @staticmethod
        @once_differentiable
        def backward(ctx, do):
            q, k, v, o, lse = ctx.saved_tensors
            dq, dk, dv = flashkit.attention_backward(*(_to_array(t) for t in (do, q, k, v, o, lse)), **ctx.options)
            # One gradient per argument of forward: q, k, v, then None for the eight options.
            return (_to_tensor(dq, q.device, q.dtype), _to_tensor(dk, k.device, k.dtype),
                    _to_tensor(dv, v.device, v.dtype)) + (None,) * 8

    return FlashAttention
