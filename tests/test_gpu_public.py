"""The public call on the GPU: flashkit.attention and attention_backward on CuPy arrays, bfloat16 included.

bfloat16 arrives from torch through DLPack as a 2-byte CuPy dtype of kind 'V' (CuPy 14.2 on the H200 names
it bfloat16; builds without it show '|V2'); flashkit reads it as bfloat16 bits, and its results come back in
the caller's dtype. Skips without a GPU.
"""
import numpy as np
import pytest

from conftest import cupy_or_skip, oracle, rel_err

cupy = cupy_or_skip()

import flashkit  # noqa: E402
from flashkit.gpu.standard import bf16_bits_to_float32  # noqa: E402


def _bf16(x32):
    """A NumPy float32 array as the CuPy array a torch bfloat16 tensor gives through DLPack."""
    torch = pytest.importorskip("torch")
    return cupy.from_dlpack(torch.from_numpy(np.ascontiguousarray(x32)).to("cuda", torch.bfloat16))


def _to64(x):
    if x.dtype.kind == "V":
        return cupy.asnumpy(bf16_bits_to_float32(x.view(cupy.uint16))).astype(np.float64)
    return cupy.asnumpy(x).astype(np.float64)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_public_call_16bit(dtype, causal):
    rng = np.random.default_rng(20261201)
    q, k, v = (rng.standard_normal((2, 4, 333, 64)).astype(np.float32) for _ in range(3))
    if dtype == "bfloat16":
        Q, K, V = (_bf16(x) for x in (q, k, v))
    else:
        Q, K, V = (cupy.asarray(x, cupy.float16) for x in (q, k, v))
    before = [x.copy() for x in (Q, K, V)]
    o, lse = flashkit.attention(Q, K, V, causal=causal, return_lse=True)
    assert o.dtype == Q.dtype and o.shape == Q.shape and isinstance(o, cupy.ndarray)
    for x, y in zip((Q, K, V), before):
        assert bool((x.view(cupy.uint16) == y.view(cupy.uint16)).all()), "an input was modified"
    q64, k64, v64 = (_to64(x) for x in (Q, K, V))
    ref_o, ref_lse = oracle(q64, k64, v64, causal=causal)
    err = rel_err(_to64(o), ref_o)
    assert err < (2e-2 if dtype == "bfloat16" else 3e-3), f"{dtype} causal={causal}: relative error {err:.3g}"
    assert np.allclose(cupy.asnumpy(lse), ref_lse, atol=1e-2)


def test_bf16_nan_is_caught():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 16, 64)).astype(np.float32)
    q[0, 1, 3, 5] = np.nan
    Q = _bf16(q)
    with pytest.raises(ValueError, match="q contains NaN or Inf"):
        flashkit.attention(Q, _bf16(np.abs(q[..., :]).clip(0, 1)), _bf16(np.ones_like(q)))


def test_nan_named_per_argument_with_one_sync():
    x = cupy.ones((1, 2, 16, 64), cupy.float16)
    bad = x.copy()
    bad[0, 0, 0, 0] = cupy.inf
    for name, args in (("k", (x, bad, x)), ("v", (x, x, bad))):
        with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
            flashkit.attention(*args)


def _rungs(direction):
    from flashkit.gpu.rungs import kernels

    return [r.name for r in kernels(direction)]


@pytest.mark.parametrize("name", _rungs("forward"))
def test_public_call_is_the_rung_and_names_bad_input(name):
    from flashkit.gpu import check
    from flashkit.gpu.rungs import rung

    spec = rung(name)
    row = check.check_public(spec.number, check.CASES[2], next(e for e in spec.elements if e != "bf16"), seed=11)
    assert row["ok"], row


@pytest.mark.parametrize("name", _rungs("backward"))
def test_public_backward_is_the_rung_and_refuses_bad_input(name):
    from flashkit.gpu import check_backward as cb

    if not cb.serves(name, cb.CASES[2]):
        pytest.skip(f"{name} does not run on this GPU (cupy-bwd-wgmma needs a Hopper)")
    row = cb.check_public(name, cb.CASES[2], next(e for e in cb.RUNG_ELEMENTS[name] if e != "bf16"),
                          seed=cb.seed_of("public", name))
    assert row["ok"], row
