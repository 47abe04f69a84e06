"""Numba kernels, beyond correctness (tests/test_backends.py checks every rung against the reference):
micro-kernels equal their scalar twins, the asm really is vector code, masked tiles are skipped, the
block size override is honoured, the thread setting works."""
import importlib

import numpy as np
import pytest

pytest.importorskip("numba")

from flashkit import validate  # noqa: E402
from flashkit.cpu import available_rungs, common, simd, simd_lab  # noqa: E402
from flashkit.measure.threads import current_threads, threads_limit  # noqa: E402
from flashkit.masks import SKIP, block_map  # noqa: E402
from flashkit.reference import reference  # noqa: E402

RUNGS = [r.module for r in available_rungs()]  # rung 3 needs SciPy and threadpoolctl


def _host_features():
    import llvmlite.binding as llvm

    return {k for k, v in llvm.get_host_cpu_features().items() if v}


def _rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def _qkv(rng, B, Hq, Hkv, Nq, Nk, d, dtype=np.float32):
    return (rng.standard_normal((B, Hq, Nq, d)).astype(dtype), rng.standard_normal((B, Hkv, Nk, d)).astype(dtype),
            rng.standard_normal((B, Hkv, Nk, d)).astype(dtype))


def _module(rung):
    return importlib.import_module(f"flashkit.cpu.{rung}")


# ------------------------------------------------------------------------------- micro-kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_micro_kernels_equal_their_scalar_twins(dtype):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(1001).astype(dtype), rng.standard_normal(1001).astype(dtype)
    exact = float(a.astype(np.float64) @ b.astype(np.float64))
    tol = 1e-4 if dtype == np.float32 else 1e-12
    assert abs(simd_lab.dot(a, b) - exact) <= tol * np.abs(a * b).sum()
    assert abs(simd_lab.dot_scalar(a, b) - exact) <= tol * np.abs(a * b).sum()
    o1, o2 = a.copy(), a.copy()
    simd_lab.axpby(dtype(0.75), o1, dtype(-0.5), b)
    simd_lab.axpby_scalar(dtype(0.75), o2, dtype(-0.5), b)
    np.testing.assert_allclose(o1, o2, rtol=1e-6 if dtype == np.float32 else 1e-14)
    np.testing.assert_allclose(o1, 0.75 * a - 0.5 * b, rtol=1e-5 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-7), (np.float64, 1e-15)])
def test_fast_exp_is_accurate_and_flushes_to_zero(dtype, rtol):
    x = -np.concatenate([np.linspace(0, 80, 50001), [0.0, 1e-30, 86.9, 700.0, 1e4, 1e30]]).astype(dtype)
    out, ref_out = np.empty_like(x), np.empty_like(x)
    simd_lab.exp_vector(x, out)
    simd_lab.exp_scalar(x, ref_out)
    ref = np.exp(x.astype(np.float64))
    normal = ref > np.finfo(dtype).tiny * 4
    assert (np.abs(out[normal] - ref[normal]) <= rtol * ref[normal]).all()
    assert np.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
    assert out[-1] == 0 and out[-2] == 0  # e^(-1e30) and e^(-1e4): exactly 0, never NaN
    np.testing.assert_allclose(ref_out, ref.astype(dtype), rtol=rtol * 4, atol=np.finfo(dtype).tiny)


@pytest.mark.skipif(not ({"avx2", "avx512f"} & _host_features()), reason="no AVX2/AVX-512 on this CPU")
def test_asm_has_vector_instructions_and_twins_do_not():
    a = np.ones(64, np.float32)
    alpha = np.float32(0.5)
    for fn, args in ((simd_lab.dot, (a, a)), (simd_lab.axpby, (alpha, a.copy(), alpha, a)), (simd_lab.exp_vector, (a, a.copy()))):
        text = simd_lab.asm(fn, *args)
        assert simd_lab.has_vector_fma(text), (fn, simd_lab.vector_instructions(text))
    for fn, args in ((simd_lab.dot_scalar, (a, a)), (simd_lab.axpby_scalar, (alpha, a.copy(), alpha, a))):
        counts = simd_lab.vector_instructions(simd_lab.asm(fn, *args))
        arithmetic = [k for k in counts if k.split()[0].startswith(("vfmadd", "vmul", "vadd"))]
        assert arithmetic == [], (fn, counts)


def test_gemm_kernel_exp_is_vectorised():
    """Rung 3's exp runs on vectors: the asm of its tile step rounds packed floats (vroundps, or
    vrndscaleps with AVX-512) and multiplies them."""
    if "rung3_gemm" not in RUNGS or not ({"avx2", "avx512f"} & _host_features()):
        pytest.skip("rung 3 or AVX unavailable")
    from numba import njit

    from flashkit.cpu import rung3_gemm

    sig = rung3_gemm.tile_signature(np.float32)
    tile = njit(sig, fastmath=common.FASTMATH)(rung3_gemm.online_softmax_tile)  # not from the disk cache: no asm there
    counts = simd_lab.vector_instructions(tile.inspect_asm(sig.args))
    assert any(k.startswith(("vround", "vrndscale")) for k in counts), counts


def test_fused_kernel_keeps_its_tiles_in_vector_registers():
    """Rung 4's micro-kernels are packed FMAs on zmm (AVX-512) or ymm (AVX2) registers, and its exp
    rounds on vectors: the asm of the compiled kernel shows both."""
    if "rung4_fused" not in RUNGS or not ({"avx2", "avx512f"} & _host_features()):
        pytest.skip("rung 4 or AVX unavailable")
    from flashkit.cpu import rung4_fused, vec

    W = vec.VECTOR_BYTES // 4
    q = np.zeros((1, 1, 4, 4), np.float32)
    KP = np.zeros((1, 1, 2 * W * 4), np.float32)
    VP = np.zeros((1, 1, 2 * W * 2 * W), np.float32)
    args = (q, KP, VP, 4, 1.0, -1, -1, common._NO_MASK, False, np.zeros((1, 1, 1, 1), np.int8), 4, 4, 2 * W,
            2 * W, np.zeros_like(q), np.zeros((1, 1, 4), np.float32), np.zeros(1, np.int64), 2,
            None, False, None)  # 2 workers; no mods (mod_tile, mod_every_tile, errors): the hook's branch is not compiled
    counts = simd_lab.vector_instructions(simd_lab.asm(rung4_fused.forward_kernel, *args))
    reg = "zmm" if vec.VECTOR_BYTES == 64 else "ymm"
    # 2 * MR accumulators of S = Q K^T and 2 * MR of O += P V, each one FMA per step of its loop
    assert counts.get(f"vfmadd231ps {reg}", 0) >= 4 * rung4_fused.MR, counts
    assert counts.get(f"vrndscaleps {reg}", 0) + counts.get(f"vroundps {reg}", 0) > 0, counts


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 3e-7), (np.float64, 1e-15)])
def test_vector_exp2_is_accurate_and_exact_zero_below(dtype, rtol):
    from flashkit.cpu import vec

    W = vec.VECTOR_BYTES // np.dtype(dtype).itemsize
    x = np.concatenate([np.linspace(-125, 8, 40000 * W // W), [0.0, -1e30, -1e4, -200.0]]).astype(dtype)
    x = np.concatenate([x, np.zeros(-len(x) % W, dtype)])
    out = np.full_like(x, np.nan)
    vec._exp2_array(x, out)
    ref = np.exp2(x.astype(np.float64))
    normal = ref > np.finfo(dtype).tiny * 4
    assert (np.abs(out[normal] - ref[normal]) <= rtol * ref[normal]).all()
    assert (out[(x == -1e30) | (x == -1e4)] == 0).all() and np.isfinite(out).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_keep_range_keeps_exactly_the_lanes_whose_key_is_in_range(dtype):
    """vec.keep_range, rung 4's window mask in registers: lane i kept iff lo <= first + i < hi."""
    from numba import njit

    from flashkit.cpu import vec

    @njit
    def apply(x, first, lo, hi, fill, out):
        vec.store(out, 0, vec.keep_range(vec.load(x, 0), first, lo, hi, fill))

    W = vec.VECTOR_BYTES // np.dtype(dtype).itemsize
    x = np.arange(1, W + 1, dtype=dtype)
    for first, lo, hi in [(0, 3, W - 2), (100, 0, 1000), (5, 30, 40), (-3, 0, 2), (7, 9, 8)]:
        out = np.full(W, np.nan, dtype)
        apply(x, first, lo, hi, dtype(-1e30), out)
        key = first + np.arange(W)
        assert (out == np.where((key >= lo) & (key < hi), x, dtype(-1e30))).all(), (first, lo, hi, out)


# ------------------------------------------------------------------------------- tiles and blocks
@pytest.mark.parametrize("rung", RUNGS)
def test_masked_tiles_are_skipped(rung):
    """A causal run computes exactly the tiles the block map does not mark SKIP: about half."""
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 1, 2, 1, 200, 200, 16)
    Br, Bc = 16, 24
    full = _module(rung).run(validate.check(q, k, v, block_size=(Br, Bc)), stats=True)[2]
    causal = _module(rung).run(validate.check(q, k, v, causal=True, block_size=(Br, Bc)), stats=True)[2]
    Tr, Tc = -(-200 // Br), -(-200 // Bc)
    assert full.shape == (2 * Tr,) and (full == Tc).all()
    expected = (block_map(200, 200, Br, Bc, (-1, 0)) != SKIP).sum()
    assert causal.sum() == 2 * expected
    assert causal.sum() < 0.6 * full.sum()
    # a window of 10 keys each side: only a band of tiles
    band = _module(rung).run(validate.check(q, k, v, window=(10, 10), block_size=(Br, Bc)), stats=True)[2]
    assert band.sum() == 2 * (block_map(200, 200, Br, Bc, (10, 10)) != SKIP).sum() < 0.3 * full.sum()


@pytest.mark.parametrize("rung", RUNGS)
def test_fully_masked_tiles_of_a_custom_mask_are_skipped(rung):
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 1, 1, 1, 64, 64, 8)
    mask = np.ones((1, 1, 64, 64), bool)
    mask[..., 32:] = False  # the right half of the keys hidden from every row
    O, lse, tiles = _module(rung).run(validate.check(q, k, v, mask=mask, block_size=(16, 16)), stats=True)
    assert (tiles == 2).all()
    ref_O, ref_lse = reference(validate.check(q, k, v, mask=mask))
    assert _rel(O, ref_O) < 1e-5


@pytest.mark.parametrize("rung", RUNGS)
@pytest.mark.parametrize("block", [(1, 1), (5, 3), (3, 11), (37, 64), (64, 7), (500, 500)])
def test_block_size_override_is_honoured(rung, block):
    """Br != Bc, sizes that divide nothing, one-element tiles, tiles bigger than the problem."""
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 1, 2, 2, 45, 70, 8)
    p = validate.check(q, k, v, causal=True, block_size=block)
    O, lse, tiles = _module(rung).run(p, stats=True)
    Br, Bc = min(block[0], 45), min(block[1], 70)
    Tr = -(-45 // Br)
    assert tiles.shape == (2 * Tr,)
    assert tiles.sum() == 2 * (block_map(45, 70, Br, Bc, p.window) != SKIP).sum()
    ref_O, ref_lse = reference(p)
    assert _rel(O, ref_O) < 1e-5
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_default_block_size_fits_half_the_l2():
    l2 = common.l2_bytes()
    assert 16 * 1024 <= l2 <= 1 << 30
    for d in (1, 64, 128, 256):
        Br, Bc = common.default_block_size(d, 4, 128, 128)
        assert Br >= 16 and Bc >= 16
        assert (2 * Br * d + 2 * Bc * d + Br * Bc) * 4 <= l2 // 2 or (Br, Bc) == (16, 16)


def test_size_parser():
    assert common._parse_size("512K") == 512 * 1024
    assert common._parse_size("1 MiB") == 1 << 20


# ------------------------------------------------------------------------------- threads
@pytest.mark.parametrize("rung", RUNGS)
def test_threads_setting(rung):
    import numba

    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 1, 3, 1, 77, 90, 16)
    p = validate.check(q, k, v, causal=True)
    before = current_threads()
    with threads_limit(1):
        assert current_threads() == 1
        O1, lse1 = _module(rung).run(p)
    with threads_limit(numba.config.NUMBA_NUM_THREADS):
        O2, lse2 = _module(rung).run(p)
    assert current_threads() == before
    np.testing.assert_array_equal(O1, O2)  # tasks own their rows: the thread count changes nothing
    np.testing.assert_array_equal(lse1, lse2)


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-7), (np.float64, 1e-15)])
def test_fast_exp2_is_accurate_and_flushes_to_zero(dtype, rtol):
    x = -np.concatenate([np.linspace(0, 120, 50001), [0.0, 1e-30, 125.9, 1000.0, 1e4, 1e30]]).astype(dtype)
    out = np.empty_like(x)
    simd_lab.exp2_vector(x, out)
    ref = np.exp2(x.astype(np.float64))
    normal = ref > np.finfo(dtype).tiny * 4
    assert (np.abs(out[normal] - ref[normal]) <= rtol * ref[normal]).all()
    assert np.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
    assert out[-1] == 0 and out[-2] == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_order_keys_give_the_float_max(dtype):
    from numba import njit

    @njit
    def key_max(x):
        k = simd.order_key(x[0])
        for c in range(1, x.shape[0]):
            k = max(k, simd.order_key(x[c]))
        return simd.from_order_key(k)

    rng = np.random.default_rng(6)
    for n in (1, 2, 7, 64, 129):
        for spread in (1e-30, 1.0, 1e30):
            x = (rng.standard_normal(n) * spread).astype(dtype)
            assert key_max(x) == x.max()
            assert key_max(-np.abs(x)) == (-np.abs(x)).max()
    assert key_max(np.array([-1e30, -1e30], dtype)) == dtype(-1e30)
