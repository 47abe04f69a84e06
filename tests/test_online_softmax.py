"""The online-softmax state: updates in any block order and merges are exact."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashkit import online_softmax as osm


def full_softmax_attention(S, V):
    m = S.max(axis=-1, keepdims=True)
    P = np.where(np.isneginf(S), 0.0, np.exp(S - np.where(np.isneginf(m), 0, m)))
    l = P.sum(-1, keepdims=True)
    return np.where(l > 0, P @ V / np.where(l > 0, l, 1), 0.0)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), d=st.integers(1, 7), block=st.integers(1, 13),
       seed=st.integers(0, 2**31), hide=st.floats(0, 1))
def test_blockwise_update_equals_full_softmax(rows, cols, d, block, seed, hide):
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((rows, cols)) * 5
    S[rng.random(S.shape) < hide] = -np.inf
    V = rng.standard_normal((cols, d))
    state = osm.init(rows, d)
    for j in range(0, cols, block):
        state = osm.update(state, S[:, j:j + block], V[j:j + block])
    O, lse = osm.finalize(state)
    np.testing.assert_allclose(O, full_softmax_attention(S, V), rtol=1e-10, atol=1e-12)
    with np.errstate(divide="ignore"):
        ref_lse = np.log(np.exp(S).sum(-1))
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-10)
    assert not np.isnan(O).any() and not np.isnan(lse).any()


@settings(max_examples=40, deadline=None)
@given(parts=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_merge_is_exact_in_any_order(parts, seed):
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((4, 30)) * 10
    V = rng.standard_normal((30, 3))
    cuts = np.sort(rng.integers(0, 31, parts - 1))
    bounds = [0, *cuts.tolist(), 30]
    states = [osm.update(osm.init(4, 3), S[:, a:b], V[a:b]) if b > a else osm.init(4, 3)
              for a, b in zip(bounds[:-1], bounds[1:])]
    rng.shuffle(states)
    O, lse = osm.finalize(osm.merge(states))
    np.testing.assert_allclose(O, full_softmax_attention(S, V), rtol=1e-10)
    outs = [osm.finalize(s) for s in states]
    O2, lse2 = osm.merge_outputs([o for o, _ in outs], [l for _, l in outs])
    np.testing.assert_allclose(O2, O, rtol=1e-10)
    np.testing.assert_allclose(lse2, lse, rtol=1e-10)


def test_merge_needs_states():
    with pytest.raises(ValueError, match="states"):
        osm.merge([])


def test_naive_overflows_safe_does_not():
    x = np.array([[1000.0, 999.0, 0.0]])
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.isnan(osm.softmax_naive(x)).any()
    p = osm.softmax_safe(x)
    np.testing.assert_allclose(p.sum(), 1.0)
    np.testing.assert_allclose(osm.softmax_online(x, block=2), p)
    np.testing.assert_allclose(osm.softmax_online(np.array([[-np.inf, -np.inf]]), block=1), [[0.0, 0.0]])
