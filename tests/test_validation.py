"""Bad input gets a clear exception naming the argument; nothing the user passes is modified."""
import re

import numpy as np
import pytest

import flashkit
from flashkit import registry

rng = np.random.default_rng(0)
Q = rng.standard_normal((1, 4, 10, 8)).astype(np.float32)
K = rng.standard_normal((1, 2, 12, 8)).astype(np.float32)
V = rng.standard_normal((1, 2, 12, 8)).astype(np.float32)


def call(q=Q, k=K, v=V, **kw):
    return flashkit.attention(q, k, v, backend=kw.pop("backend", "numpy-standard"), **kw)


BAD = [
    # (what, call kwargs, exception type, words the message must contain)
    ("q not an array", dict(q=Q.tolist()), TypeError, ["q", "numpy.ndarray"]),
    ("wrong rank", dict(q=Q[0, 0, 0]), ValueError, ["q", "2, 3 or 4 dimensions"]),
    ("rank 5", dict(q=Q[None]), ValueError, ["q", "dimensions"]),
    ("ranks differ", dict(q=Q[0]), ValueError, ["same number of dimensions"]),
    ("mismatched d", dict(k=K[..., :4], v=V[..., :4]), ValueError, ["head size d", "8", "4"]),
    ("v shape", dict(v=V[:, :, :5]), ValueError, ["v", "same shape as k"]),
    ("mismatched batch", dict(k=np.concatenate([K, K]), v=np.concatenate([V, V])), ValueError, ["batch", "1", "2"]),
    ("heads not divisible", dict(k=np.concatenate([K, K[:, :1]], 1), v=np.concatenate([V, V[:, :1]], 1)), ValueError, ["multiple", "4", "3"]),
    ("integer dtype", dict(q=Q.astype(np.int32)), TypeError, ["q", "floating dtype", "int32"]),
    ("complex dtype", dict(k=K.astype(np.complex64)), TypeError, ["k", "floating dtype"]),
    ("dtypes differ", dict(v=V.astype(np.float64)), TypeError, ["same dtype"]),
    ("NaN in q", dict(q=np.where(Q > 2, np.nan, Q).astype(np.float32)), ValueError, ["q", "NaN or Inf"]),
    ("Inf in v", dict(v=np.where(V > 2, np.inf, V).astype(np.float32)), ValueError, ["v", "NaN or Inf"]),
    ("empty q", dict(q=Q[:, :, :0]), ValueError, ["q", "empty"]),
    ("empty d", dict(q=Q[..., :0], k=K[..., :0], v=V[..., :0]), ValueError, ["empty"]),
    ("block size 0", dict(block_size=0), ValueError, ["block_size", "positive integer"]),
    ("block size negative", dict(block_size=(16, -4)), ValueError, ["block_size (Bc)", "positive"]),
    ("block size float", dict(block_size=16.0), ValueError, ["block_size"]),
    ("block size triple", dict(block_size=(1, 2, 3)), ValueError, ["block_size", "pair"]),
    ("mask shape", dict(mask=np.ones((10, 11), bool)), ValueError, ["mask", "broadcastable", "(1, 4, 10, 12)"]),
    ("mask rank 5", dict(mask=np.ones((1, 1, 1, 10, 12), bool)), ValueError, ["mask", "broadcastable"]),
    ("mask dtype", dict(mask=np.ones((10, 12), np.float32)), TypeError, ["mask", "bool"]),
    ("mask list", dict(mask=[[True]]), TypeError, ["mask"]),
    ("unknown backend", dict(backend="flash-turbo"), ValueError, ["backend", "flash-turbo", "numpy-standard"]),
    ("backend not a string", dict(backend=3), TypeError, ["backend"]),
    ("scale zero", dict(scale=0.0), ValueError, ["scale", "> 0"]),
    ("scale negative", dict(scale=-1), ValueError, ["scale"]),
    ("scale NaN", dict(scale=float("nan")), ValueError, ["scale"]),
    ("scale inf", dict(scale=float("inf")), ValueError, ["scale"]),
    ("scale string", dict(scale="0.1"), ValueError, ["scale"]),
    ("window one number", dict(window=4), ValueError, ["window", "pair"]),
    ("window three", dict(window=(1, 2, 3)), ValueError, ["window"]),
    ("window below -1", dict(window=(-2, 3)), ValueError, ["window"]),
    ("window floats", dict(window=(1.5, 2)), ValueError, ["window"]),
    ("causal not bool", dict(causal="yes"), TypeError, ["causal"]),
    ("return_lse not bool", dict(return_lse=1), TypeError, ["return_lse"]),
]


@pytest.mark.parametrize("what,kw,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_named(what, kw, exc, words):
    with pytest.raises(exc) as info:
        call(**kw)
    for w in words:
        assert w in str(info.value), f"{what}: {w!r} not in message {str(info.value)!r}"


def test_gpu_backend_without_gpu_is_clear():
    gpu = [b for b in registry.all_backends() if b.device == "gpu"]
    if not gpu:
        pytest.skip("no GPU backends registered")
    b = gpu[0]
    if b.available:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match=re.escape(b.name) + ".*not available"):
        call(backend=b.name)


def test_gpu_backend_with_numpy_arrays_is_clear():
    gpu = [b for b in registry.all_backends() if b.device == "gpu" and b.available]
    if not gpu:
        pytest.skip("no GPU here")
    with pytest.raises(ValueError, match="CuPy"):
        call(backend=gpu[0].name)


@pytest.mark.parametrize("backend", [b.name for b in registry.all_backends() if b.device == "cpu" and b.available])
def test_inputs_are_never_modified(backend):
    q, k, v = Q.copy(), K.copy(), V.copy()
    mask = np.ones((1, 1, 10, 12), bool)
    mask[..., 3] = False
    snapshot = [x.copy() for x in (q, k, v, mask)]
    flags = [x.flags.writeable for x in (q, k, v, mask)]
    masked = {"mask": mask, "window": (2, 1)} if registry.get(backend).mask else {"window": (2, 1)}
    for kw in ({}, {"causal": True}, masked):
        call(q, k, v, backend=backend, return_lse=True, **kw)
        for x, y in zip((q, k, v, mask), snapshot):
            np.testing.assert_array_equal(x, y)
    assert flags == [x.flags.writeable for x in (q, k, v, mask)]


def test_read_only_and_non_contiguous_inputs_work():
    q = np.asfortranarray(Q[0, 0])
    kt = np.ascontiguousarray(K[0, 0].T).T  # a transposed view: not C-contiguous
    v = V[0, 0].copy()
    for x in (q, kt, v):
        x.flags.writeable = False
    o = flashkit.attention(q, kt, v, backend="numpy-tiled")
    ref = flashkit.attention(np.ascontiguousarray(q), np.ascontiguousarray(kt), v, backend="numpy-standard")
    np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-6)


def test_mask_broadcast_forms():
    m2 = rng.random((10, 12)) < 0.7
    outs = [call(mask=m) for m in (m2, m2[None], m2[None, None], np.broadcast_to(m2, (1, 4, 10, 12)))]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    pad = np.ones((1, 1, 1, 12), bool)
    pad[..., -3:] = False  # a key-padding mask
    np.testing.assert_allclose(call(mask=pad), call(k=K[:, :, :9], v=V[:, :, :9]), rtol=1e-6, atol=1e-7)


def test_backends_table_lists_every_backend_with_reason():
    rows = flashkit.backends()
    names = [r["name"] for r in rows]
    assert {"numpy-standard", "numpy-tiled", "numpy-tiled-fa1"} <= set(names)
    assert len(names) == len(set(names))
    for r in rows:
        assert r["available"] or r["reason"], f"{r['name']} unavailable without a reason"


def test_check_finite_is_on_by_default_and_can_be_switched_off():
    import flashkit

    rng = np.random.default_rng(13)
    q, k, v = (rng.standard_normal((1, 2, 9, 8)) for _ in range(3))
    k[0, 1, 4, 2] = np.nan
    with pytest.raises(ValueError, match="k contains NaN or Inf"):
        flashkit.attention(q, k, v)
    o = flashkit.attention(q, k, v, check_finite=False, backend="numpy-standard")  # undefined output, no error
    assert o.shape == q.shape and np.isfinite(o[0, 0]).all()
    with pytest.raises(TypeError, match="check_finite"):
        flashkit.attention(q, k, v, check_finite="yes")
