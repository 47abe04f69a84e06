"""Rung 7's NaN/Inf check of q, k, v inside its own kernel (kernels/input_check.cuh, flashkit.finite.Fused).
Skips without a Hopper GPU.

The kernel sees q, k and v as one sequence of 16-byte units, cut into `shares` contiguous shares (one per block
of the first blocks), each copied 16 KB at a time into shared memory. A bad value (NaN, +inf or -inf) is planted
at the first and last element of each array, at the edges of shares and of chunks, and in the middle, in float16
and bfloat16, for shapes with one share and with many, GQA and Nq != Nk: each call must raise naming the argument,
and a clean call after it must pass (the blocks' count starts again with every call). The separate scan is
made to fail in these tests, so a pass cannot come from it, and the fused check is taken on every shape
(by default only where its blocks have enough work to hide it: flashkit.gpu.flash.check_columns, tested on
the CPU in tests/test_finite_claim.py).
"""
import numpy as np
import pytest

from conftest import cupy_or_skip

cupy = cupy_or_skip()

import flashkit  # noqa: E402
from flashkit import finite, registry, validate  # noqa: E402
from flashkit.gpu import flash  # noqa: E402

if not registry.get("cupy-wgmma").available:
    pytest.skip("rung 7 (cupy-wgmma) needs a Hopper GPU", allow_module_level=True)

RUNG = "cupy-wgmma"
# (B, Hq, Hkv, Nq, Nk, d): one share; many shares and chunks; GQA with Nq != Nk at d = 128
SHAPES = [(1, 2, 1, 100, 77, 64), (4, 8, 8, 2048, 2048, 64), (2, 8, 2, 1000, 1500, 128)]
BAD = (np.nan, np.inf, -np.inf)


@pytest.fixture
def fused_everywhere(monkeypatch):
    """The fused check on every shape, not only where it pays (flash.check_columns: 32 key tiles a block)."""
    monkeypatch.setattr(flash, "CHECK_MIN_KEY_TILES", 0)
    flash.check_columns.cache_clear()
    yield
    flash.check_columns.cache_clear()


@pytest.fixture
def no_separate_scan(monkeypatch, fused_everywhere):
    def refuse(*args, **kwargs):
        raise AssertionError("the separate scan ran: rung 7 was to check its inputs itself")

    monkeypatch.setattr(finite, "start", refuse)


def _inputs(shape, dtype, seed):
    B, Hq, Hkv, Nq, Nk, d = shape
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in ((B, Hq, Nq, d), (B, Hkv, Nk, d), (B, Hkv, Nk, d))]
    if dtype == "bfloat16":
        torch = pytest.importorskip("torch")
        return [cupy.from_dlpack(torch.from_numpy(x).to("cuda", torch.bfloat16)) for x in arrays]
    return [cupy.asarray(x, dtype=cupy.float16) for x in arrays]


def _places(shape, sizes, causal):
    """(array, element) pairs at the edges the kernel cuts at: arrays, shares and 16 KB chunks, as in
    input_check.cuh (units of 8 elements; share s starts at unit units * s // shares; causal grids give the
    shares to their first half of query tiles, as flashkit.gpu.flash.forward does)."""
    B, Hq, Hkv, Nq, Nk, d = shape
    units = [n // 8 for n in sizes]
    total = sum(units)
    Tr = -(-Nq // flash.blocks_for(7, d, None)[0])
    grid = (-(-Tr // 2) if causal else Tr) * Hq * B
    shares = min(grid, max(1, -(-total * 16 // finite.FUSED_SHARE)))
    starts = [total * s // shares for s in (1, 2, shares // 2, shares - 1) if 0 < s < shares]
    starts += [u + 1024 for u in [0] + starts]  # the second chunk of a share
    firsts = np.cumsum([0] + units)
    cut = {0, total - 1, total // 2} | set(starts) | {int(f) for f in firsts[1:-1]}
    places = set()
    for u in cut:
        for unit in (u - 1, u):
            if 0 <= unit < total:
                a = int(np.searchsorted(firsts, unit, side="right") - 1)
                e = (unit - int(firsts[a])) * 8
                places.update({(a, e), (a, e + 7)})  # the unit's first and last element
    return sorted(places), shares


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_a_bad_value_anywhere_is_named(shape, dtype, causal, no_separate_scan):
    q, k, v = _inputs(shape, dtype, seed=sum(shape))
    clean = flashkit.attention(q, k, v, causal=causal, backend=RUNG)
    places, shares = _places(shape, [x.size for x in (q, k, v)], causal)
    if shape[3] >= 1000:
        assert shares > 1
    bits = [x.view(cupy.uint16).reshape(-1) for x in (q, k, v)]
    for n, (a, e) in enumerate(places):
        was = bits[a][e].copy()
        bad = np.array(BAD[n % 3], np.float32)
        if dtype == "float16":
            bits[a][e] = int(bad.astype(np.float16).view(np.uint16))
        else:
            bits[a][e] = int(bad.view(np.uint32)) >> 16
        with pytest.raises(ValueError, match=f"{'qkv'[a]} contains NaN or Inf"):
            flashkit.attention(q, k, v, causal=causal, backend=RUNG)
        bits[a][e] = was
        again = flashkit.attention(q, k, v, causal=causal, backend=RUNG)  # passes, and computes what it computed before
        assert bool((again.view(cupy.uint16) == clean.view(cupy.uint16)).all()), (a, e)


def test_the_public_call_is_the_rung_alone(no_separate_scan):
    q, k, v = _inputs((2, 4, 2, 700, 900, 128), "float16", seed=5)
    for causal in (False, True):
        o, lse = flashkit.attention(q, k, v, causal=causal, backend=RUNG, return_lse=True)
        p = validate.check(q, k, v, causal=causal, finite=False)
        o_r, lse_r = flash.run(7, p)
        assert bool((o == o_r).all()) and bool((lse.reshape(lse_r.shape) == lse_r).all())


def test_auto_takes_the_fused_check_and_the_switch_turns_it_off(monkeypatch, fused_everywhere):
    q, k, v = _inputs((1, 4, 4, 512, 512, 64), "float16", seed=6)
    assert registry.choose(validate.check(q, k, v, finite=False), "auto").name == RUNG
    started = []
    real = finite.start
    monkeypatch.setattr(finite, "start", lambda *a, **kw: started.append(1) or real(*a, **kw))
    flashkit.attention(q, k, v)
    assert started == []
    with finite.separate_scan():
        flashkit.attention(q, k, v)
    assert started == [1]
    flashkit.attention(q, k, v, check_finite=False)
    assert started == [1]


def test_a_count_that_never_completes_ends_with_the_kernel(fused_everywhere):
    """The end event is the backstop: with more shares than blocks the count cannot complete, and the
    wait must return once the kernel has ended (never hang), with the shares that ran reported."""
    q, k, v = _inputs((1, 2, 2, 256, 256, 64), "float16", seed=7)
    p = validate.check(q, k, v, finite=False)
    grid = -(-256 // flash.blocks_for(7, 64, None)[0]) * 2
    fused = finite.Fused((p.Q, p.K, p.V), shares=grid + 3, names=("q", "k", "v"))

    class Claimed:
        def claim(self, *args):
            return fused

    flash.forward(7, p.Q, p.K, p.V, scale=0.125, check=Claimed())
    assert fused.wait() is None
    assert fused.error() is None
