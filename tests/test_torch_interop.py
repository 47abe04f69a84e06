"""flashkit.torch.attention as a torch autograd function: gradcheck in float64 on awkward shapes,
outputs and gradients against torch's scaled_dot_product_attention (bottom-right causal given to SDPA as
an explicit mask), tensors crossing without copies, and torch never imported by flashkit itself."""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import flashkit  # noqa: E402
import flashkit.torch as ft  # noqa: E402
from flashkit.masks import dense_mask, effective_window  # noqa: E402

CPU_BACKWARDS = [b["name"] for b in flashkit.backends() if b["device"] == "cpu" and b["backward"] and b["available"]]


def tensors(B, Hq, Hkv, Nq, Nk, d, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    def make(H, N):
        return torch.randn(B, H, N, d, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return [t.requires_grad_() for t in (make(Hq, Nq), make(Hkv, Nk), make(Hkv, Nk))]


def sdpa(q, k, v, *, causal=False, window=None, mask=None, scale=None):
    """torch's SDPA with flashkit's conventions: bottom-right causal and windows as an explicit bool mask,
    GQA by repeating each K/V head for the query heads of its group."""
    Nq, Nk = q.shape[-2], k.shape[-2]
    allowed = None
    if causal or window is not None:
        allowed = torch.from_numpy(dense_mask(Nq, Nk, effective_window(causal, window))).to(q.device)
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def grads(fn, inputs, do):
    for t in inputs:
        t.grad = None
    o = fn(*inputs)
    o.backward(do)
    return o.detach(), [t.grad.clone() for t in inputs]


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# (name, B, Hq, Hkv, Nq, Nk, d, options): none a multiple of anything, each a case the backward can get wrong
CASES = [
    ("plain", 1, 2, 2, 5, 5, 3, {}),
    ("causal Nq < Nk (bottom-right)", 1, 2, 2, 3, 7, 4, dict(causal=True)),
    ("causal Nq == Nk, GQA 4/2", 2, 4, 2, 6, 6, 3, dict(causal=True)),
    ("MQA 3/1, Nq > Nk", 1, 3, 1, 7, 4, 2, {}),
    ("window (2, 1), Nq != Nk", 1, 2, 1, 6, 9, 3, dict(window=(2, 1))),
    ("causal + window (3, 0) + scale", 1, 2, 2, 8, 8, 2, dict(causal=True, window=(3, 0), scale=0.7)),
]


@pytest.mark.parametrize("backend", CPU_BACKWARDS)
@pytest.mark.parametrize("name, B, Hq, Hkv, Nq, Nk, d, options", CASES, ids=[c[0] for c in CASES])
def test_gradcheck_float64(name, B, Hq, Hkv, Nq, Nk, d, options, backend):
    q, k, v = tensors(B, Hq, Hkv, Nq, Nk, d)
    assert torch.autograd.gradcheck(lambda q, k, v: ft.attention(q, k, v, backend=backend, **options), (q, k, v),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_with_a_mask_and_rows_that_see_no_key():
    """Causal with Nq > Nk leaves rows with no key (o = 0, gradient 0); a custom mask hides more."""
    q, k, v = tensors(1, 2, 1, 6, 4, 3, seed=1)
    mask = torch.rand(6, 4, generator=torch.Generator().manual_seed(2)) < 0.7
    def fn(q, k, v):
        return ft.attention(q, k, v, causal=True, mask=mask, backend="numpy-standard")
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)
    o, (dq, dk, dv) = grads(fn, (q, k, v), torch.ones(1, 2, 6, 3, dtype=torch.float64))
    assert (o[:, :, :2] == 0).all() and (dq[:, :, :2] == 0).all()  # rows 0, 1 see no key under bottom-right
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("name, B, Hq, Hkv, Nq, Nk, d, options",
                         [c for c in CASES if c[4] <= c[5] or not c[7].get("causal")] +
                         [("larger, causal GQA 8/2", 2, 8, 2, 37, 53, 16, dict(causal=True))],
                         ids=lambda x: x if isinstance(x, str) else None)
def test_matches_sdpa_outputs_and_gradients(name, B, Hq, Hkv, Nq, Nk, d, options, dtype, tol):
    q, k, v = tensors(B, Hq, Hkv, Nq, Nk, d, dtype=dtype, seed=3)
    do = torch.randn(B, Hq, Nq, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    ours = grads(lambda q, k, v: ft.attention(q, k, v, **options), (q, k, v), do)
    theirs = grads(lambda q, k, v: sdpa(q, k, v, **options), (q, k, v), do)
    for what, a, b in zip(("o", "dq", "dk", "dv"), [ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        assert a.dtype == dtype and a.shape == b.shape, what
        assert rel(a, b) < tol, f"{name}, {dtype}: {what} relative error {rel(a, b):.2e}"


def test_torch_is_causal_agrees_when_nq_equals_nk_and_gqa_matches_enable_gqa():
    q, k, v = tensors(1, 6, 2, 9, 9, 4, dtype=torch.float32, seed=5)
    do = torch.randn(1, 6, 9, 4, generator=torch.Generator().manual_seed(6))
    ours = grads(lambda q, k, v: ft.attention(q, k, v, causal=True), (q, k, v), do)
    theirs = grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v), do)
    for a, b in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        assert rel(a, b) < 2e-6


def test_bottom_right_is_not_torchs_top_left():
    """The reason the tests above build SDPA's mask: with Nq != Nk, is_causal=True is another function."""
    q, k, v = tensors(1, 1, 1, 3, 5, 4, dtype=torch.float32, seed=7)
    with torch.no_grad():
        ours = ft.attention(q, k, v, causal=True)
        top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        bottom_right = sdpa(q, k, v, causal=True)
    assert rel(ours, bottom_right) < 1e-6 and rel(ours, top_left) > 0.1


def test_non_contiguous_inputs_and_rank_3():
    """Models build q as (B, N, H, d).transpose(1, 2): a strided view. (H, N, d) comes back as (H, N, d)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 11, 4, 8, generator=g, requires_grad=True)  # (B, N, H, d)
    kv = torch.randn(2, 11, 2, 8, generator=g, requires_grad=True)
    assert not x.transpose(1, 2).is_contiguous()  # (B, H, N, d) as a strided view
    do = torch.randn(2, 4, 11, 8, generator=g)
    ours = grads(lambda x, kv: ft.attention(x.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2), causal=True),
                 (x, kv), do)
    theirs = grads(lambda x, kv: sdpa(x.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2), causal=True), (x, kv), do)
    for a, b in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        assert rel(a, b) < 2e-6
    q3, k3, v3 = (t.detach()[0].requires_grad_() for t in tensors(1, 3, 3, 5, 6, 4, dtype=torch.float32, seed=9))
    o3, g3 = grads(lambda q, k, v: ft.attention(q, k, v), (q3, k3, v3), torch.ones(3, 5, 4))
    r3, h3 = grads(lambda q, k, v: sdpa(q, k, v), (q3, k3, v3), torch.ones(3, 5, 4))
    assert o3.shape == (3, 5, 4) and [g.shape for g in g3] == [(3, 5, 4), (3, 6, 4), (3, 6, 4)]
    assert all(rel(a, b) < 2e-6 for a, b in zip([o3, *g3], [r3, *h3]))


def test_cpu_tensors_cross_without_copies():
    q = torch.randn(1, 2, 8, 4)
    a = ft._to_array(q)
    assert isinstance(a, np.ndarray) and a.ctypes.data == q.data_ptr()  # the tensor's own memory
    back = ft._to_tensor(a, q.device, q.dtype)
    assert back.data_ptr() == q.data_ptr()
    qt = q.transpose(2, 3)
    assert ft._to_array(qt).ctypes.data == qt.data_ptr()  # a strided view, still no copy


def test_half_precision_on_the_cpu():
    """float16 is computed in float32 and returned as float16; bfloat16 (no NumPy dtype) likewise."""
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = tensors(1, 4, 2, 10, 12, 8, dtype=dtype, seed=10)
        o = ft.attention(q, k, v, causal=True)
        o.float().square().sum().backward()
        ref_q, ref_k, ref_v = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = sdpa(ref_q, ref_k, ref_v, causal=True)
        ref.square().sum().backward()
        assert o.dtype == dtype and q.grad.dtype == dtype and k.grad.dtype == dtype
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        assert rel(o, ref) < tol and rel(q.grad, ref_q.grad) < 4 * tol and rel(v.grad, ref_v.grad) < 4 * tol


def test_bad_input_is_named():
    q, k, v = tensors(1, 2, 2, 4, 4, 3)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        ft.attention(q.detach().numpy(), k, v)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        ft.attention(q, k, v, mask=torch.ones(4, 4))
    _, k3, v3 = tensors(1, 2, 3, 4, 4, 3)
    with pytest.raises(ValueError, match=r"heads of q \(2\) must be a multiple"):  # flashkit's validation speaks
        ft.attention(q, k3, v3)


def test_import_flashkit_torch_needs_no_torch():
    """The module imports without torch; calling it says what is missing. `import flashkit` never imports torch."""
    code = ("import sys; sys.modules['torch'] = None; import flashkit, flashkit.torch\n"
            "try:\n    flashkit.torch.attention(1, 2, 3)\nexcept ImportError as e:\n    print('ImportError:', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "flashkit.torch needs PyTorch" in out


# ---------------------------------------------------------------- CUDA: DLPack into CuPy (runs where a GPU is)
def _gpu_ready():
    if not torch.cuda.is_available():
        return "no CUDA device for torch"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed"
    return None


def _gpu_backward():
    return any(b["device"] == "gpu" and b["backward"] and b["available"] for b in flashkit.backends())


@pytest.mark.skipif(_gpu_ready() is not None, reason=str(_gpu_ready()))
def test_cuda_forward_through_dlpack():
    import cupy

    q, k, v = tensors(2, 4, 2, 100, 130, 64, dtype=torch.float32, seed=11, device="cuda")
    a = ft._to_array(q)
    assert isinstance(a, cupy.ndarray) and a.data.ptr == q.data_ptr()  # the same device memory
    with torch.no_grad():
        o = ft.attention(q, k, v, causal=True)
        ref = sdpa(q, k, v, causal=True)
    assert o.is_cuda and o.dtype == torch.float32 and rel(o, ref) < 1e-5
    b = q.detach().bfloat16()
    x = ft._to_array(b)  # CuPy 14 with ml_dtypes: a bfloat16 array; without it: the uint16 bits of '|V2'
    assert x.dtype.name in ("bfloat16", "uint16") and x.data.ptr == b.data_ptr()
    back = ft._to_tensor(x, b.device, torch.bfloat16)
    assert back.dtype == torch.bfloat16 and back.data_ptr() == b.data_ptr()


@pytest.mark.skipif(_gpu_ready() is not None or not _gpu_backward(),
                    reason=str(_gpu_ready() or "no GPU backend has a backward yet"))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_cuda_gradients_match_sdpa(dtype, tol):
    q, k, v = tensors(2, 4, 2, 100, 130, 64, dtype=dtype, seed=12, device="cuda")
    do = torch.randn(2, 4, 100, 64, generator=torch.Generator().manual_seed(13)).to(dtype=dtype, device="cuda")
    ours = grads(lambda q, k, v: ft.attention(q, k, v, causal=True), (q, k, v), do)
    theirs = grads(lambda q, k, v: sdpa(q, k, v, causal=True), (q, k, v), do)
    for a, b in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        assert a.is_cuda and a.dtype == dtype and rel(a, b) < tol


def test_gradient_of_a_sum_arrives_with_zero_strides():
    """o.sum().backward() hands the backward an expanded dO (stride 0 on every axis): a view NumPy shares too."""
    q, k, v = tensors(1, 4, 2, 6, 9, 3, dtype=torch.float32, seed=14)
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ft.attention(q, k, v, causal=True).sum().backward()
    sdpa(*ref, causal=True).sum().backward()
    for a, b in zip((q, k, v), ref):
        assert rel(a.grad, b.grad) < 2e-6
