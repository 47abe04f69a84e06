"""The backward with score_mod / mask_mod / block_mask: d score_mod / d score written from the source
(flashkit.mods_grad) against finite differences, the float64 reference (numpy-standard) against finite
differences of its own forward, the Numba backward against the reference on awkward shapes, fully
masked rows, and the errors of mods that cannot be differentiated."""
import math

import numpy as np
import pytest

import flashkit
from conftest import random_qkv, seeded_rng
from flashkit import mods, mods_grad

NUMBA = [b for b in flashkit.backends() if b["name"] == "numba-mods"][0]["available"]
needs_numba = pytest.mark.skipif(not NUMBA, reason="numba-mods needs Numba, SciPy and threadpoolctl")

# Awkward on purpose: N not a multiple of the tile, Nq != Nk, GQA (4 query heads on 2 K/V heads), B = 2.
B, HQ, HKV, NQ, NK, D = 2, 4, 2, 37, 53, 16
TABLE = np.random.default_rng(5).standard_normal((HQ, 32))
HEAD_BIAS = np.array([0.5, -1.0, 2.0, 0.0])


def bias_by_side(score, b, h, q_idx, kv_idx):
    """User-written with `if`, and a score-dependent product (derivative 2 score on one side)."""
    if kv_idx > q_idx:
        return score - HEAD_BIAS[h]
    return 0.5 * score * score + HEAD_BIAS[h]


def mixed(score, b, h, q_idx, kv_idx):
    """Most of the differentiable subset at once: exp, log, maximum, where, %, division, a power."""
    bump = np.exp(-0.5 * score ** 2) / (1.0 + 0.1 * h)
    tail = np.log(1.0 + np.maximum(score, 0.0) ** 2)
    return mods.where(kv_idx % 3 == 0, score + bump, score - 0.3 * tail)


# name: (score_mod, mask_mod, causal, window)
CASES = {
    "softcap + strided": (mods.softcap(2.0), mods.strided(NQ, NK, 5), False, None),
    "alibi + causal mod": (mods.alibi(mods.alibi_slopes(HQ), offset=NK - NQ), mods.causal(NQ, NK), False, None),
    "t5 + global window, causal": (mods.relative_position_bias(TABLE, max_distance=20),
                                   mods.global_window(NQ, NK, 3, 4), True, None),
    "identity + documents and causal": (mods.identity, mods.and_masks(mods.document_mask([10, 27], [20, 33]),
                                                                      mods.causal(NQ, NK)), False, None),
    "prefix-lm per batch, window": (None, mods.prefix_lm(np.array([5, 40]), NQ, NK), False, (20, -1)),
    "user if-bias + dilated": (bias_by_side, mods.dilated(NQ, NK, 6, 2, 3), False, None),
    "user mixed, lambda mask": (mixed, lambda b, h, q_idx, kv_idx: kv_idx != q_idx + 1, True, None),
}


def grads(q, k, v, do, backend, score_mod, mask_mod, causal, window, **kw):
    o, lse = flashkit.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, causal=causal, window=window,
                                backend="numpy-standard" if backend != "numba" else "numba", return_lse=True, **kw)
    return flashkit.attention_backward(do, q, k, v, o, lse, score_mod=score_mod, mask_mod=mask_mod, causal=causal,
                                       window=window, backend=backend, **kw)


@pytest.mark.parametrize("name", ["identity", "softcap", "alibi", "t5", "if-bias", "mixed"])
def test_derivative_matches_finite_differences(name):
    fn = {"identity": mods.identity, "softcap": mods.softcap(3.0), "alibi": mods.alibi(mods.alibi_slopes(4)),
          "t5": mods.relative_position_bias(TABLE, max_distance=20), "if-bias": bias_by_side, "mixed": mixed}[name]
    d = mods_grad.derivative(fn)
    scores = np.linspace(-4, 4, 41) + 0.0137  # off the kinks of maximum and the where
    for q_idx, kv_idx, h in ((3, 5, 1), (30, 2, 2), (5, 3, 0), (9, 9, 3)):
        e = 1e-6
        fd = (fn(scores + e, 0, h, q_idx, kv_idx) - fn(scores - e, 0, h, q_idx, kv_idx)) / (2 * e)
        exact = np.array([d(s, 0, h, q_idx, kv_idx) for s in scores])  # one score at a time, as Numba calls it
        np.testing.assert_allclose(exact, fd, rtol=1e-6, atol=1e-7, err_msg=f"{name} at {q_idx, kv_idx, h}")
        if name != "if-bias":  # written without `if`: it also takes the whole array at once
            np.testing.assert_allclose(d(scores, 0, h, q_idx, kv_idx) * np.ones_like(scores), exact, rtol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_backward_matches_finite_differences(case):
    """numpy-standard's float64 backward with mods: <grad, u> against the central difference of the loss
    <o, do> along a random direction u, for each of q, k and v."""
    score_mod, mask_mod, causal, window = CASES[case]
    rng, seed = seeded_rng("mods backward fd", case)
    q, k, v = random_qkv(rng, B, HQ, HKV, NQ, NK, D, dtype=np.float64)
    do = rng.standard_normal(q.shape)
    g = grads(q, k, v, do, "numpy-standard", score_mod, mask_mod, causal, window)

    def loss(q, k, v):
        o = flashkit.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, causal=causal, window=window,
                               backend="numpy-standard")
        return float((o * do).sum())

    for which, (x, gx) in enumerate(zip((q, k, v), g)):
        u = rng.standard_normal(x.shape)
        e = 1e-6
        plus = [y + e * u if i == which else y for i, y in enumerate((q, k, v))]
        minus = [y - e * u if i == which else y for i, y in enumerate((q, k, v))]
        fd = (loss(*plus) - loss(*minus)) / (2 * e)
        assert math.isclose(float((gx * u).sum()), fd, rel_tol=1e-6, abs_tol=1e-8), \
            f"{case} d{'qkv'[which]} seed={seed}: {float((gx * u).sum())} vs {fd}"


@needs_numba
@pytest.mark.parametrize("backend", ["numba", "numba-mods"])  # rung 4's backward with the hooks, rung 3's
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_numba_backward_matches_reference(case, dtype, backend):
    score_mod, mask_mod, causal, window = CASES[case]
    rng, seed = seeded_rng("mods backward numba", case, np.dtype(dtype).name)
    q, k, v = random_qkv(rng, B, HQ, HKV, NQ, NK, D, dtype=dtype)
    do = rng.standard_normal(q.shape).astype(dtype)
    want = grads(*(x.astype(np.float64) for x in (q, k, v, do)), "numpy-standard", score_mod, mask_mod, causal,
                 window)
    for block in ((16, 8), None):  # small tiles (every kind of tile and micro-tile), and the rung's own
        got = grads(q, k, v, do, backend, score_mod, mask_mod, causal, window, block_size=block)
        tol = 1e-10 if dtype == np.float64 else 2e-4
        for name, a, b in zip("qkv", got, want):
            assert a.dtype == dtype and a.shape == b.shape
            err = np.abs(a - b).max() / np.abs(b).max()
            assert err < tol, f"{backend} {case} d{name} {np.dtype(dtype).name} block {block} seed={seed}: " \
                              f"relative error {err:.2e}"


@needs_numba
def test_block_mask_and_torch_style_reuse():
    """A BlockMask made once serves the forward and the backward; the result equals the mask_mod's."""
    rng, seed = seeded_rng("mods backward block mask")
    q, k, v = random_qkv(rng, 1, 2, 1, 70, 70, 8, dtype=np.float64)
    do = rng.standard_normal(q.shape)
    docs = mods.and_masks(mods.document_mask([30, 15, 25]), mods.causal(70, 70))
    bm = flashkit.block_mask(docs, None, None, 70, 70, block_size=16)
    o, lse = flashkit.attention(q, k, v, block_mask=bm, score_mod=mods.softcap(4.0), backend="numba", return_lse=True)
    got = flashkit.attention_backward(do, q, k, v, o, lse, block_mask=bm, score_mod=mods.softcap(4.0), backend="numba")
    want = grads(q, k, v, do, "numpy-standard", mods.softcap(4.0), docs, False, None)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=f"seed={seed}")


@pytest.mark.parametrize("backend", ["numpy-standard"] + (["numba", "numba-mods"] if NUMBA else []))
def test_fully_masked_rows_give_zero_gradients(backend):
    rng, seed = seeded_rng("mods backward hidden rows", backend)
    q, k, v = random_qkv(rng, 1, 2, 1, 53, 37, 8, dtype=np.float64)  # Nq > Nk: causal hides the first 16 rows
    do = rng.standard_normal(q.shape)
    every_fifth = lambda b, h, q_idx, kv_idx: q_idx % 5 != 0  # noqa: E731  rows 0, 5, 10 ... see nothing
    minus_inf_row = lambda s, b, h, q_idx, kv_idx: mods.where(q_idx == 31, -np.inf, s * 1.5)  # noqa: E731
    dq, dk, dv = grads(q, k, v, do, backend, minus_inf_row, every_fifth, True, None)
    for g in (dq, dk, dv):
        assert np.isfinite(g).all(), f"{backend} seed={seed}"
    hidden = [i for i in range(53) if i % 5 == 0 or i < 16 or i == 31]
    assert (dq[:, :, hidden] == 0).all(), f"{backend} seed={seed}"
    want = grads(q, k, v, do, "numpy-standard", minus_inf_row, every_fifth, True, None)
    for a, b in zip((dq, dk, dv), want):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=f"{backend} seed={seed}")


def loops(score, b, h, q_idx, kv_idx):
    for _ in range(2):
        score = score * 0.5
    return score


def erf_of_score(score, b, h, q_idx, kv_idx):
    return math.erf(score)


def sqrt_at_zero(score, b, h, q_idx, kv_idx):
    return mods.where(q_idx == 2, np.sqrt(score * 0.0), score)  # finite value, slope 0.5 / 0: an error


@pytest.mark.parametrize("backend", ["numpy-standard"] + (["numba", "numba-mods"] if NUMBA else []))
@pytest.mark.parametrize("fn, exc, words", [
    (loops, TypeError, ["loops", "cannot differentiate", "For statement", "line"]),
    (erf_of_score, TypeError, ["erf_of_score", "math.erf", "no derivative"]),
    (sqrt_at_zero, (ValueError, ArithmeticError), ["d(sqrt_at_zero)/d score", "q_idx="]),
])
def test_mods_that_cannot_be_differentiated_raise(fn, exc, words, backend):
    rng, _ = seeded_rng("mods backward bad", fn.__name__)
    q, k, v = random_qkv(rng, 1, 2, 2, 9, 11, 4, dtype=np.float64)
    o, lse = flashkit.attention(q, k, v, score_mod=fn, backend="numpy-standard", return_lse=True)
    with pytest.raises(exc) as err:
        flashkit.attention_backward(q, q, k, v, o, lse, score_mod=fn, backend=backend)
    for w in words:
        assert w.lower() in str(err.value).lower(), f"{w!r} not in {err.value}"


def test_backends_without_a_mods_backward_say_so():
    rng, _ = seeded_rng("mods backward refusal")
    q, k, v = random_qkv(rng, 1, 2, 2, 9, 11, 4, dtype=np.float64)
    o, lse = flashkit.attention(q, k, v, score_mod=mods.softcap(3.0), backend="numpy-standard", return_lse=True)
    with pytest.raises(ValueError, match="numpy-tiled.*in its backward.*backward_mods.*numpy-standard"):
        flashkit.attention_backward(q, q, k, v, o, lse, score_mod=mods.softcap(3.0), backend="numpy-tiled")
    rows = {r["name"]: r for r in flashkit.backends()}
    assert rows["numpy-standard"]["backward_mods"] and not rows["numpy-tiled"]["backward_mods"]


def test_torch_autograd_with_mods():
    torch = pytest.importorskip("torch")
    import flashkit.torch as ft

    rng, seed = seeded_rng("mods torch")
    q, k, v = (torch.tensor(x, requires_grad=True) for x in random_qkv(rng, 1, 2, 1, 12, 12, 4, dtype=np.float64))
    score_mod, mask_mod = mods.softcap(2.0), mods.causal(12, 12)
    assert torch.autograd.gradcheck(lambda q, k, v: ft.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod,
                                                                 backend="numpy-standard"), (q, k, v)), f"seed={seed}"


@needs_numba
def test_register_softcap_and_its_derivative_are_accurate():
    """Backward rung 4's softcap on whole registers: f = cap tanh(s / cap) (in base 2) and f' = 1 - tanh^2 from the
    same tanh, against float64 over scores that saturate it."""
    import numba

    from flashkit.cpu import mods_jit, vec

    @numba.njit
    def apply(x, f, g, inv_cap, cap_base2):
        for i in range(0, x.shape[0], vec.lanes(x)):
            a, b = mods_jit.softcap_register_grad(vec.load(x, i), inv_cap, cap_base2)
            vec.store(f, i, a)
            vec.store(g, i, b)

    cap = 3.0
    x = np.linspace(-40, 40, 64 * 1024, dtype=np.float32)
    f, g = np.empty_like(x), np.empty_like(x)
    apply(x, f, g, np.float32(1 / cap), np.float32(cap * mods_jit.LOG2E))
    th = np.tanh(x.astype(np.float64) / cap)
    assert np.abs(f - cap * th * mods_jit.LOG2E).max() <= cap * mods_jit.LOG2E * 4e-7
    assert np.abs(g - (1 - th * th)).max() <= 1e-6
