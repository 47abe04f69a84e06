"""attention_backward on every CPU backend: finite differences, the float64 reference, bad input.

The criterion for float32 is FlashAttention's: the error of dq, dk, dv against the float64 oracle at
most 2x (plus a hair) the error of the same reference computed in float32. Seeds are fixed and
printed in every failure message.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashkit
from conftest import random_qkv, rel_err
from flashkit import registry, validate
from flashkit.reference import reference_backward

BACKWARD = [b.name for b in registry.all_backends() if b.device == "cpu" and b.available and b.has_backward]
SLOW = {"numpy-tiled", "numpy-tiled-fa1"}


def forward_and_grad(rng, q, k, v, **kw):
    """o, lse from the float64 reference forward (so every backend gets the same inputs) and a random do."""
    o, lse = flashkit.attention(q, k, v, backend="numpy-standard", return_lse=True, **kw)
    do = rng.standard_normal(o.shape).astype(q.dtype)
    return o, lse, do


def oracle_grads(do, q, k, v, o, lse, **kw):
    p = validate.check_backward(*(np.asarray(x, np.float64) for x in (do, q, k, v, o, lse)), **kw)
    return reference_backward(p)


def assert_grads_close(grads, ref, low, what):
    """Each gradient's largest error within 2x that of the reference computed in the input dtype (`low`),
    plus a floor of 1e-5 times the largest gradient: a gradient that is 0 in exact arithmetic (one key)
    is rounding noise in both."""
    floor = 1e-5 * max(1.0, *(float(np.abs(r).max()) for r in ref))
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref, low):
        assert np.isfinite(g).all(), f"{what}: {name} has NaN/Inf at {np.argwhere(~np.isfinite(g))[:5].tolist()}"
        err, base = np.abs(g - r).max(), np.abs(np.asarray(lo, np.float64) - r).max()
        worst = np.unravel_index(np.argmax(np.abs(g - r)), g.shape)
        assert err <= 2 * base + floor, (f"{what}: largest error of {name} {err:.3g} at {worst} > 2 x {base:.3g} "
                                         f"(the reference in the input dtype) + {floor:.3g}")


def test_backends_list_backward():
    rows = {r["name"]: r for r in flashkit.backends()}
    assert rows["numpy-standard"]["backward"] and rows["numpy-tiled"]["backward"]
    assert not rows["numba-loops"]["backward"]


def test_named_backend_without_backward_raises():
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(rng, 1, 1, 1, 8, 8, 4)
    o, lse, do = forward_and_grad(rng, q, k, v)
    with pytest.raises(ValueError, match="no backward"):
        flashkit.attention_backward(do, q, k, v, o, lse, backend="numba-loops")


@pytest.mark.parametrize("backend", BACKWARD)
@pytest.mark.parametrize("kind", ["none", "causal", "window", "mask"])
def test_finite_differences(backend, kind):
    """Central differences of sum(o * do) in float64 on a small GQA problem with Nq != Nk."""
    seed = 1000 + ["none", "causal", "window", "mask"].index(kind)
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, 1, 4, 2, 5, 7, 3, dtype=np.float64)
    kw = dict(causal=kind == "causal", window=(2, 1) if kind == "window" else None)
    if kind == "mask":
        kw["mask"] = rng.random((1, 4, 5, 7)) < 0.6
        kw["mask"][:, :, 2] = False  # a row that sees no key
    o, lse, do = forward_and_grad(rng, q, k, v, **kw)
    grads = flashkit.attention_backward(do, q, k, v, o, lse, backend=backend, block_size=(2, 3), **kw)
    eps = 1e-6
    for name, x, g in zip("qkv", (q, k, v), grads):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            loss = []
            for sign in (1, -1):
                args = {"q": q, "k": k, "v": v}
                xs = x.copy()
                xs[idx] += sign * eps
                args[name] = xs
                loss.append((flashkit.attention(**args, backend="numpy-standard", **kw) * do).sum())
            num[idx] = (loss[0] - loss[1]) / (2 * eps)
        np.testing.assert_allclose(g, num, atol=1e-6, rtol=1e-5, err_msg=f"{backend} {kind} d{name} (seed {seed})")


@st.composite
def problems(draw, max_n=200):
    Hkv = draw(st.sampled_from([1, 2]))
    case = dict(B=draw(st.integers(1, 2)), Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2, 4])),
                Nq=draw(st.integers(1, max_n)), Nk=draw(st.integers(1, max_n)),
                d=draw(st.sampled_from([1, 3, 16, 64, 80])), seed=draw(st.integers(0, 2**32 - 1)),
                kind=draw(st.sampled_from(["none", "causal", "window", "mask", "causal+mask"])),
                block=draw(st.sampled_from([None, (7, 13), (16, 16), (64, 5)])))
    case["window"] = (draw(st.integers(-1, 30)), draw(st.integers(-1, 30))) if case["kind"] == "window" else None
    return case


def run_case(backend, case):
    rng = np.random.default_rng(case["seed"])
    q, k, v = random_qkv(rng, case["B"], case["Hq"], case["Hkv"], case["Nq"], case["Nk"], case["d"])
    mask = None
    if "mask" in case["kind"]:
        mask = rng.random((case["B"], 1, case["Nq"], case["Nk"])) < 0.8
        mask[:, :, rng.random(case["Nq"]) < 0.1, :] = False  # about 1 row in 10 sees no key
    kw = dict(causal="causal" in case["kind"], window=case["window"], mask=mask)
    o, lse, do = forward_and_grad(rng, q, k, v, **kw)
    before = [x.copy() for x in (do, q, k, v, o, lse)]
    grads = flashkit.attention_backward(do, q, k, v, o, lse, backend=backend, block_size=case["block"], **kw)
    for x, y in zip((do, q, k, v, o, lse), before):
        np.testing.assert_array_equal(x, y, err_msg=f"an input was modified: {case}")
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, f"{backend} {case}: {g.shape} {g.dtype}"
    ref = oracle_grads(do, q, k, v, o, lse, **kw)
    low = flashkit.attention_backward(do, q, k, v, o, lse, backend="numpy-standard", **kw)
    assert_grads_close(grads, ref, low, f"{backend} {case}")


@pytest.mark.parametrize("backend", BACKWARD)
def test_matches_reference(backend):
    n_examples, max_n = (10, 80) if backend in SLOW else (40, 200)

    @settings(max_examples=n_examples, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(problems(max_n=max_n))
    def check(case):
        run_case(backend, case)

    check()


@pytest.mark.parametrize("backend", BACKWARD)
@pytest.mark.parametrize("Nq,Nk,d,Hq,Hkv", [(1, 1, 1, 1, 1), (1, 300, 64, 8, 2), (300, 1, 64, 8, 1),
                                             (129, 257, 80, 8, 2), (64, 64, 64, 2, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_edge_shapes(backend, Nq, Nk, d, Hq, Hkv, causal):
    if backend in SLOW and Nq * Nk > 20000:
        pytest.skip("Python loops over tiles: the hypothesis test covers this backend on smaller shapes")
    seed = Nq * 7919 + Nk * 31 + d + causal
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, 1, Hq, Hkv, Nq, Nk, d)
    o, lse, do = forward_and_grad(rng, q, k, v, causal=causal)
    grads = flashkit.attention_backward(do, q, k, v, o, lse, causal=causal, backend=backend)
    low = flashkit.attention_backward(do, q, k, v, o, lse, causal=causal, backend="numpy-standard")
    assert_grads_close(grads, oracle_grads(do, q, k, v, o, lse, causal=causal), low,
                       f"{backend} Nq={Nq} Nk={Nk} d={d} {Hq}/{Hkv} causal={causal} seed={seed}")


@pytest.mark.parametrize("backend", BACKWARD)
def test_rows_without_keys_give_zero_not_nan(backend):
    """Causal with Nq > Nk: the first Nq - Nk rows see no key (lse = -inf); their dq is 0."""
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, 1, 2, 1, 20, 6, 8)
    o, lse, do = forward_and_grad(rng, q, k, v, causal=True)
    assert np.isneginf(lse[..., :14]).all()
    dq, dk, dv = flashkit.attention_backward(do, q, k, v, o, lse, causal=True, backend=backend)
    assert all(np.isfinite(g).all() for g in (dq, dk, dv))
    assert (dq[..., :14, :] == 0).all()


@pytest.mark.parametrize("backend", BACKWARD)
def test_wrong_lse_raises(backend):
    """A lse in log2 units, from another call, or with q and k swapped never gives plausible gradients."""
    rng = np.random.default_rng(11)
    q, k, v = random_qkv(rng, 1, 2, 2, 33, 33, 16)
    o, lse, do = forward_and_grad(rng, q, k, v)
    q2 = rng.standard_normal(q.shape).astype(q.dtype)
    _, lse_other = flashkit.attention(q2, k, v, return_lse=True)
    for what, args in [("log2 units", (do, q, k, v, o, lse / np.log(2))),
                       ("another call", (do, q, k, v, o, lse_other)),
                       ("q and k swapped", (do, k, q, v, o, lse))]:
        with pytest.raises(ValueError, match="lse does not belong"):
            flashkit.attention_backward(*args, backend=backend)
            pytest.fail(f"{backend}: {what} was accepted")


@pytest.mark.parametrize("backend", BACKWARD)
def test_lse_minus_inf_on_a_row_that_sees_keys_raises(backend):
    """lse = -inf says "this row saw no key": on a row that does see keys it is a wrong lse, never zero gradients."""
    rng = np.random.default_rng(15)
    q, k, v = random_qkv(rng, 1, 2, 1, 37, 41, 16)
    for causal in (False, True):
        o, lse, do = forward_and_grad(rng, q, k, v, causal=causal)
        lse = lse.copy()
        lse[0, 1, 5] = -np.inf
        with pytest.raises(ValueError, match=r"lse does not belong.*\(0, 1, 5\)"):
            flashkit.attention_backward(do, q, k, v, o, lse, causal=causal, backend=backend)
            pytest.fail(f"{backend} causal={causal}: lse = -inf on a row with keys was accepted")


@pytest.mark.parametrize("backend", BACKWARD)
def test_lse_of_masked_forward_used_without_mask_raises(backend):
    rng = np.random.default_rng(12)
    q, k, v = random_qkv(rng, 1, 1, 1, 40, 40, 8)
    o, lse, do = forward_and_grad(rng, q, k, v, causal=True)
    with pytest.raises(ValueError, match="lse does not belong"):
        flashkit.attention_backward(do, q, k, v, o, lse, causal=False, backend=backend)


@pytest.mark.parametrize("backend", BACKWARD)
def test_float16_and_ranks(backend):
    rng = np.random.default_rng(13)
    q, k, v = (x[0, 0] for x in random_qkv(rng, 1, 1, 1, 19, 23, 8))  # (N, d)
    o, lse, do = forward_and_grad(rng, q, k, v)
    grads = flashkit.attention_backward(do, q, k, v, o, lse, backend=backend)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    h = [x.astype(np.float16) for x in (do, q, k, v, o)]
    g16 = flashkit.attention_backward(*h[:4], h[4], lse, backend=backend)
    assert all(g.dtype == np.float16 for g in g16)
    for g, r in zip(g16, grads):
        assert rel_err(g, r) < 1e-2


@pytest.mark.parametrize("bad,match", [
    (dict(do=np.zeros((1, 2, 9, 4), np.float32)), "do must have q's shape"),
    (dict(o=np.zeros((1, 2, 8, 4), np.float64)), "o must have q's dtype"),
    (dict(lse=np.zeros((1, 2, 9), np.float32)), "lse must have shape"),
    (dict(lse=np.zeros((1, 2, 8), np.int32)), "lse must be float32 or float64"),
    (dict(lse=np.full((1, 2, 8), np.nan, np.float32)), "lse contains NaN"),
    (dict(lse=[0.0] * 8), "lse must be a numpy array"),
    (dict(do=np.full((1, 2, 8, 4), np.inf, np.float32)), "do contains NaN or Inf"),
])
def test_bad_input(bad, match):
    rng = np.random.default_rng(14)
    q, k, v = random_qkv(rng, 1, 2, 1, 8, 8, 4)
    o, lse, do = forward_and_grad(rng, q, k, v)
    args = dict(do=do, q=q, k=k, v=v, o=o, lse=lse)
    args.update(bad)
    with pytest.raises((TypeError, ValueError), match=match):
        flashkit.attention_backward(args["do"], args["q"], args["k"], args["v"], args["o"], args["lse"])


def test_numba_variants_agree():
    """The two race-free ways of the numba backward (two passes, per-thread dQ partials) agree."""
    from flashkit.cpu import rung3_gemm_backward as backward_gemm

    rng = np.random.default_rng(15)
    q, k, v = random_qkv(rng, 2, 4, 2, 150, 170, 32)
    o, lse, do = forward_and_grad(rng, q, k, v, causal=True)
    p = validate.check_backward(do, q, k, v, o, lse, causal=True, block_size=(32, 48))
    a = backward_gemm.run(p, "two-pass")
    b = backward_gemm.run(p, "partials")
    for x, y in zip(a, b):
        assert rel_err(x, y) < 1e-5
    with pytest.raises(ValueError, match="variant"):
        backward_gemm.run(p, "racy")


def test_numba_backward_is_rung4_with_or_without_mods():
    """"numba" runs rung 4's backward (numba-fused) on a plain problem, and rung 4's with the mods' hooks with a
    mod (the same gradients as rung 3's, numba-mods, to rounding)."""
    from flashkit import mods, validate
    from flashkit.cpu import rung4_fused_backward

    rng = np.random.default_rng(16)
    q, k, v = random_qkv(rng, 1, 2, 1, 40, 50, 16)
    o, lse, do = forward_and_grad(rng, q, k, v, causal=True)
    for x, y in zip(flashkit.attention_backward(do, q, k, v, o, lse, causal=True, backend="numba"),
                    flashkit.attention_backward(do, q, k, v, o, lse, causal=True, backend="numba-fused")):
        np.testing.assert_array_equal(x, y)
    o, lse = flashkit.attention(q, k, v, score_mod=mods.softcap(4.0), backend="numpy-tiled", return_lse=True)
    got = flashkit.attention_backward(do, q, k, v, o, lse, score_mod=mods.softcap(4.0), backend="numba")
    direct = rung4_fused_backward.run(validate.check_backward(do, q, k, v, o, lse, score_mod=mods.softcap(4.0)))
    rung3 = flashkit.attention_backward(do, q, k, v, o, lse, score_mod=mods.softcap(4.0), backend="numba-mods")
    for x, y, z in zip(got, direct, rung3):
        np.testing.assert_array_equal(x, y)
        assert rel_err(x, z) < 1e-5


@pytest.mark.parametrize("block", [(1, 1), (8, 32), (9, 33), (40, 17), None])
@pytest.mark.parametrize("kind", ["causal", "window", "mask"])
def test_fused_backward_blocks_and_panels(block, kind):
    """Rung 4 pads tiles to 8-row and 2-register panels and masks ragged, causal and window panels in
    registers (a custom mask through memory): any block size, d not a multiple of a register, GQA 8/1, a
    window shorter than a panel, rows that see no key."""
    seed = 17 + ["causal", "window", "mask"].index(kind) * 10 + (0 if block is None else block[0] + block[1])
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, 1, 8, 1, 45, 70, 19)
    kw = dict(causal=kind == "causal", window=(3, 2) if kind == "window" else None)
    if kind == "mask":
        kw["mask"] = rng.random((1, 8, 45, 70)) < 0.5
        kw["mask"][:, :, 7] = False
    o, lse, do = forward_and_grad(rng, q, k, v, **kw)
    grads = flashkit.attention_backward(do, q, k, v, o, lse, backend="numba-fused", block_size=block, **kw)
    low = flashkit.attention_backward(do, q, k, v, o, lse, backend="numpy-standard", **kw)
    assert_grads_close(grads, oracle_grads(do, q, k, v, o, lse, **kw), low, f"numba-fused {kind} {block} seed {seed}")
