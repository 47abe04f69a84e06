"""Shared test helpers: seeds, fresh random inputs, the float64 oracle, relative error, output poisoning."""
import zlib

import numpy as np
import pytest

import flashkit
import flashkit.problem
from flashkit import registry, validate
from flashkit.reference import reference


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every backend's outputs start as NaN, so an element it forgets to write fails the check."""
    monkeypatch.setattr(flashkit.problem, "POISON", True)


def cupy_or_skip():
    """CuPy, when a CUDA device answers; else the calling test module is skipped (call it at module level)."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device", allow_module_level=True)
    except Exception as exc:  # CuPy installed without a driver
        pytest.skip(f"no CUDA device ({exc})", allow_module_level=True)
    return cupy


def cpu_backends():
    """Names of the CPU backends that can run here (the GPU ones are tested in test_gpu*.py)."""
    return [b.name for b in registry.all_backends() if b.device == "cpu" and b.available]


def takes_mask(name) -> bool:
    """Whether backend `name` supports a custom mask (the split-K ones take causal and windows only)."""
    return registry.get(name).mask


def assert_refuses_mask(name, q, k, v, mask, **kw):
    """A backend without custom masks must say so, not ignore the mask."""
    with pytest.raises(ValueError, match="custom mask"):
        flashkit.attention(q, k, v, mask=mask, backend=name, **kw)


def stable_seed(*key) -> int:
    """A seed from the test's parameters, the same in every run and process (hash() of a str is salted per
    process, so a failure seeded by it could not be reproduced). Print it in every failure message."""
    return zlib.crc32(repr(key).encode())


def seeded_rng(*key):
    """(numpy Generator, seed) for the test's parameters `key`."""
    seed = stable_seed(*key)
    return np.random.default_rng(seed), seed


def random_qkv(rng, B, Hq, Hkv, Nq, Nk, d, dtype=np.float32, spread=1.0):
    q = (rng.standard_normal((B, Hq, Nq, d)) * spread).astype(dtype)
    k = (rng.standard_normal((B, Hkv, Nk, d)) * spread).astype(dtype)
    v = rng.standard_normal((B, Hkv, Nk, d)).astype(dtype)
    return q, k, v


def oracle(q, k, v, **kw):
    """(O, lse) in float64 from the materialised reference."""
    kw = {key: val for key, val in kw.items() if key in ("causal", "scale", "window", "mask")}
    return reference(validate.check(q, k, v, **kw))


def rel_err(out, ref):
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    denom = np.linalg.norm(ref)
    return np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0)


def assert_matches(o, lse, ref_o, ref_lse, rtol=1e-5, what=""):
    """O and lse both: relative error of O, then lse elementwise (with -inf rows matching exactly)."""
    ref_o = np.asarray(ref_o).reshape(np.shape(o))  # the oracle is (B, H, N, d); outputs keep the caller's rank
    ref_lse = np.asarray(ref_lse).reshape(np.shape(lse))
    assert np.isfinite(o).all(), f"{what}: output has NaN/Inf at {np.argwhere(~np.isfinite(o))[:5].tolist()}"
    err = rel_err(o, ref_o)
    assert err <= rtol, f"{what}: relative error of O {err:.3g} > {rtol:g}"
    ref_lse = np.asarray(ref_lse, np.float64)
    lse = np.asarray(lse, np.float64)
    empty = np.isneginf(ref_lse)
    assert (np.isneginf(lse) == empty).all(), f"{what}: lse -inf pattern differs at rows {np.argwhere(np.isneginf(lse) != empty)[:5].tolist()}"
    assert not np.isnan(lse).any(), f"{what}: lse has NaN"
    diff = np.abs(lse[~empty] - ref_lse[~empty])
    tol = 1e-4 + rtol * np.abs(ref_lse[~empty])
    bad = np.argwhere(diff > tol)
    assert bad.size == 0, f"{what}: lse differs at {bad[:5].tolist()} by up to {diff.max():.3g}"
    assert (o[..., :][np.broadcast_to(empty[..., None], o.shape)] == 0).all(), f"{what}: rows with no visible key must be 0"
