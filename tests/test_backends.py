"""Every CPU backend against the float64 reference, on random inputs of awkward shapes."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashkit
from conftest import assert_matches, assert_refuses_mask, cpu_backends, oracle, random_qkv, seeded_rng, takes_mask

BACKENDS = cpu_backends()
SLOW = {"numpy-tiled", "numpy-tiled-fa1"}  # Python loops over tiles: fewer, smaller examples


@st.composite
def problems(draw, max_n=300):
    Hkv = draw(st.sampled_from([1, 2]))
    case = dict(
        B=draw(st.integers(1, 2)),
        Hkv=Hkv,
        Hq=Hkv * draw(st.sampled_from([1, 2, 3])),  # group of 1 (MHA), 2, 3 (GQA)
        Nq=draw(st.integers(1, max_n)),
        Nk=draw(st.integers(1, max_n)),
        d=draw(st.sampled_from([1, 3, 16, 64, 80, 128, 256])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
    kind = draw(st.sampled_from(["none", "causal", "window", "mask", "causal+mask"]))
    case["causal"] = "causal" in kind
    case["window"] = (draw(st.integers(-1, 40)), draw(st.integers(-1, 40))) if kind == "window" else None
    case["mask"] = "mask" in kind
    case["block"] = draw(st.sampled_from([None, (7, 13), (16, 16), (64, 5)]))
    return case


def run_case(backend, case):
    rng = np.random.default_rng(case["seed"])
    q, k, v = random_qkv(rng, case["B"], case["Hq"], case["Hkv"], case["Nq"], case["Nk"], case["d"])
    mask = None
    if case["mask"]:
        # per batch, shared over heads; about 1 in 10 rows hidden completely
        mask = rng.random((case["B"], 1, case["Nq"], case["Nk"])) < 0.8
        mask[:, :, rng.random(case["Nq"]) < 0.1, :] = False
    kw = dict(causal=case["causal"], window=case["window"], mask=mask)
    if mask is not None and not takes_mask(backend):
        assert_refuses_mask(backend, q, k, v, mask, causal=case["causal"], window=case["window"])
        return
    before = [x.copy() for x in (q, k, v)]
    o, lse = flashkit.attention(q, k, v, backend=backend, block_size=case["block"], return_lse=True, **kw)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == q.shape[:-1]
    for x, y in zip((q, k, v), before):
        np.testing.assert_array_equal(x, y, err_msg="an input was modified")
    ref_o, ref_lse = oracle(q, k, v, **kw)
    assert_matches(o, lse, ref_o, ref_lse, rtol=1e-5, what=f"{backend} {case}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend):
    n_examples, max_n = (15, 120) if backend in SLOW else (60, 300)

    @settings(max_examples=n_examples, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(problems(max_n=max_n))
    def check(case):
        run_case(backend, case)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nq,Nk,d", [(1, 1, 1), (1, 300, 64), (300, 1, 64), (129, 257, 80), (64, 64, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_edge_shapes(backend, Nq, Nk, d, causal):
    rng, seed = seeded_rng("edge_shapes", backend, Nq, Nk, d, causal)
    q, k, v = random_qkv(rng, 1, 4, 2, Nq, Nk, d)
    o, lse = flashkit.attention(q, k, v, causal=causal, backend=backend, return_lse=True)
    assert_matches(o, lse, *oracle(q, k, v, causal=causal), what=f"{backend} Nq={Nq} Nk={Nk} d={d} seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spread", [1e2, 1e4])
def test_huge_logits_do_not_overflow(backend, spread):
    """Logits near +-1e4 (and beyond): the running max keeps every exp() finite."""
    rng, seed = seeded_rng("huge_logits", backend, spread)
    q, k, v = random_qkv(rng, 1, 2, 2, 33, 47, 16, spread=np.sqrt(spread))
    o, lse = flashkit.attention(q, k, v, scale=1.0, backend=backend, return_lse=True)
    ref_o, ref_lse = oracle(q, k, v, scale=1.0)
    assert np.isfinite(o).all() and np.isfinite(lse).all(), f"{backend} seed={seed}: NaN/Inf in O or lse"
    assert_matches(o, lse, ref_o, ref_lse, rtol=1e-4, what=f"{backend} seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zero_and_minus_inf(backend):
    rng, seed = seeded_rng("fully_masked_rows", backend)
    what = f"{backend} seed={seed}"
    q, k, v = random_qkv(rng, 2, 2, 1, 20, 9, 8)
    mask = np.ones((2, 2, 20, 9), bool)
    mask[0, 1, 3] = False
    mask[1, :, 7:12] = False
    if takes_mask(backend):
        o, lse = flashkit.attention(q, k, v, mask=mask, backend=backend, return_lse=True)
        assert (o[0, 1, 3] == 0).all() and np.isneginf(lse[0, 1, 3]), what
        assert (o[1, :, 7:12] == 0).all() and np.isneginf(lse[1, :, 7:12]).all(), what
        assert_matches(o, lse, *oracle(q, k, v, mask=mask), what=what)
    else:
        assert_refuses_mask(backend, q, k, v, mask)
    # a window that shows nothing to the first rows (Nq > Nk, causal bottom-right)
    o, lse = flashkit.attention(q, k, v, causal=True, backend=backend, return_lse=True)
    assert (o[:, :, :11] == 0).all() and np.isneginf(lse[:, :, :11]).all(), what


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_key(backend):
    rng, seed = seeded_rng("one_key", backend)
    q, k, v = random_qkv(rng, 1, 3, 1, 17, 1, 5)
    o, lse = flashkit.attention(q, k, v, backend=backend, return_lse=True)
    np.testing.assert_allclose(o, np.broadcast_to(v, o.shape), rtol=1e-6,  # softmax over one key is 1
                               err_msg=f"{backend} seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [2, 3])
def test_lower_ranks_and_float16(backend, rank):
    rng, seed = seeded_rng("lower_ranks", backend, rank)
    q, k, v = random_qkv(rng, 1, 1, 1, 45, 70, 32, dtype=np.float16)

    def shape(x):
        return x.reshape(x.shape[4 - rank:])

    q, k, v = shape(q), shape(k), shape(v)
    o, lse = flashkit.attention(q, k, v, causal=True, backend=backend, return_lse=True)
    assert o.shape == q.shape and o.dtype == np.float16 and lse.dtype == np.float32
    assert lse.shape == q.shape[:-1]
    ref_o, ref_lse = oracle(q, k, v, causal=True)
    assert_matches(o, lse, ref_o, ref_lse, rtol=2e-3, what=f"{backend} rank={rank} seed={seed}")  # float16 rounding


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_is_computed_in_float64(backend):
    rng, seed = seeded_rng("float64", backend)
    q, k, v = random_qkv(rng, 1, 2, 2, 50, 61, 24, dtype=np.float64)
    o, lse = flashkit.attention(q, k, v, causal=True, backend=backend, return_lse=True)
    assert o.dtype == np.float64
    assert_matches(o, lse, *oracle(q, k, v, causal=True), rtol=1e-12, what=f"{backend} seed={seed}")


def test_auto_picks_a_cpu_backend_and_agrees():
    rng, seed = seeded_rng("auto")
    q, k, v = random_qkv(rng, 1, 2, 2, 40, 40, 16)
    o, lse = flashkit.attention(q, k, v, return_lse=True)
    assert_matches(o, lse, *oracle(q, k, v), what=f"auto seed={seed}")
