"""flashkit.layers, rope and kvcache: RoPE against complex numbers, prefill == token-by-token decoding
with the KV cache, every CPU backend giving the same layer output and the same generated tokens,
clear errors for a full cache, wrong head counts and positions beyond the cache."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashkit.kvcache import KVCache
from flashkit.layers import MultiHeadAttention, TinyDecoder
from flashkit.rope import apply_rope
from conftest import cpu_backends, rel_err

SLOW = {"numpy-tiled", "numpy-tiled-fa1"}


def rope_complex(x, positions, base, rotary_dim):
    """RoPE written directly: pairs (x_i, x_{i+r/2}) as complex numbers times exp(1j pos theta_i)."""
    x = np.asarray(x, np.float64)
    r = rotary_dim
    z = x[..., :r // 2] + 1j * x[..., r // 2:r]
    theta = base ** (-np.arange(r // 2) * 2.0 / r)
    z = z * np.exp(1j * np.asarray(positions, np.float64)[:, None] * theta[None, :])
    return np.concatenate([z.real, z.imag, x[..., r:]], axis=-1)


@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 20), half=st.integers(0, 32), extra=st.integers(0, 9), base=st.sampled_from([10.0, 500.0, 10000.0, 1e6]),
       start=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1))
def test_rope_matches_complex_numbers(N, half, extra, base, start, seed):
    rng = np.random.default_rng(seed)
    d = 2 * half + extra
    if d == 0:
        return
    x = rng.standard_normal((2, 3, N, d))
    positions = start + np.arange(N)
    out = apply_rope(x, positions, base=base, rotary_dim=2 * half)
    np.testing.assert_allclose(out, rope_complex(x, positions, base, 2 * half), rtol=1e-12, atol=1e-12)


def test_rope_scores_depend_on_relative_position_only():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 64)), rng.standard_normal((1, 64))
    s = [float(apply_rope(q, [m])[0] @ apply_rope(k, [n])[0]) for m, n in ((5, 2), (105, 102), (1003, 1000))]
    np.testing.assert_allclose(s, s[0], rtol=1e-9)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    before = x.copy()
    assert apply_rope(x, np.arange(3)).dtype == np.float32
    np.testing.assert_array_equal(x, before)


def test_rope_bad_input():
    x = np.zeros((4, 8))
    with pytest.raises(ValueError, match="rotary_dim must be an even integer"):
        apply_rope(x, np.arange(4), rotary_dim=3)
    with pytest.raises(ValueError, match="rotary_dim must be an even integer"):
        apply_rope(x, np.arange(4), rotary_dim=10)
    with pytest.raises(ValueError, match="positions must hold one integer per token"):
        apply_rope(x, np.arange(3))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        apply_rope(x, np.arange(-1, 3))
    with pytest.raises(ValueError, match="base must be a number > 1"):
        apply_rope(x, np.arange(4), base=1.0)


LAYERS = [
    dict(d_model=32, n_heads=4, n_kv_heads=4),  # plain multi-head
    dict(d_model=48, n_heads=6, n_kv_heads=2, fused_qkv=False),  # GQA, separate projections
    dict(d_model=32, n_heads=4, n_kv_heads=1, partial_rotary=0.5, rope_base=500.0),  # MQA, partial RoPE
    dict(d_model=24, n_heads=2, n_kv_heads=2, head_dim=20, rope=False),  # head_dim != d_model / H, no RoPE
]


@pytest.mark.parametrize("opts", LAYERS, ids=[str(o) for o in LAYERS])
def test_prefill_equals_one_token_decode_steps(opts):
    layer = MultiHeadAttention(**opts, seed=3)
    x = np.random.default_rng(1).standard_normal((2, 11, opts["d_model"])).astype(np.float32)
    full = layer(x)  # no cache: causal attention over all 11 tokens at once
    cache = layer.new_cache(max_len=16, batch=2)
    steps = [layer(x[:, t:t + 1], cache) for t in range(11)]  # 11 decoding steps of one token
    assert cache.length == 11
    err = rel_err(np.concatenate(steps, axis=1), full)
    assert err <= 1e-5, f"token-by-token differs from prefill by {err:.3g}"
    cache.clear()
    parts = [layer(x[:, :4], cache), layer(x[:, 4:7], cache), layer(x[:, 7:], cache)]  # prefill, then chunks
    assert rel_err(np.concatenate(parts, axis=1), full) <= 1e-5


def test_fused_and_separate_projections_agree():
    layer = MultiHeadAttention(48, 6, 2, partial_rotary=0.5, seed=0)
    x = np.random.default_rng(0).standard_normal((7, 48)).astype(np.float32)
    np.testing.assert_allclose(layer.unfused()(x), layer(x), rtol=1e-5, atol=1e-6)
    assert layer(x).shape == (7, 48)


@pytest.mark.parametrize("backend", cpu_backends())
def test_every_cpu_backend_gives_the_same_layer_output(backend):
    layer = MultiHeadAttention(64, 8, 2, seed=5)
    x = np.random.default_rng(2).standard_normal((1, 9, 64)).astype(np.float32)
    ref = layer(x, backend="numpy-standard")
    assert rel_err(layer(x, backend=backend), ref) <= 1e-5
    cache = layer.new_cache(12)
    layer(x[:, :8], cache, backend=backend)
    last = layer(x[:, 8:], cache, backend=backend)
    assert rel_err(last, ref[:, 8:]) <= 1e-5


def test_every_cpu_backend_generates_the_same_tokens():
    model = TinyDecoder(vocab=50, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, seed=0)
    prompt = [3, 14, 15, 9, 2]
    ref = model.generate(prompt, 6, backend="numpy-standard")
    assert ref.shape == (1, 11) and (ref[0, :5] == prompt).all()
    np.testing.assert_array_equal(model.generate(prompt, 6, backend="numpy-standard", use_cache=False), ref)
    for backend in cpu_backends():
        n = 3 if backend in SLOW else 6
        np.testing.assert_array_equal(model.generate(prompt, n, backend=backend), ref[:, :5 + n], err_msg=backend)


def test_kvcache_bytes_and_views():
    cache = KVCache(max_len=100, n_kv_heads=2, head_dim=16, batch=3, dtype=np.float16)
    assert cache.nbytes == 2 * 3 * 2 * 100 * 16 * 2 and cache.used_bytes == 0
    assert cache.bytes_per_token == 2 * 3 * 2 * 16 * 2
    k = np.ones((3, 2, 5, 16), np.float16)
    K, V = cache.append(k, 2 * k)
    assert K.shape == (3, 2, 5, 16) and cache.used_bytes == 5 * cache.bytes_per_token
    assert np.shares_memory(K, cache.K) and (V == 2).all()
    cache.truncate(2)
    assert cache.keys.shape[2] == 2 and "length=2/100" in repr(cache)


def test_kvcache_errors():
    cache = KVCache(max_len=4, n_kv_heads=2, head_dim=8)
    k = np.zeros((1, 2, 3, 8), np.float32)
    cache.append(k, k)
    with pytest.raises(ValueError, match="KV cache overflow: it holds 3 of max_len=4 tokens and cannot take 3 more"):
        cache.append(k, k)
    assert cache.length == 3  # nothing changed
    with pytest.raises(ValueError, match="k has 3 heads but the cache holds 2 K/V heads"):
        cache.append(np.zeros((1, 3, 1, 8)), np.zeros((1, 3, 1, 8)))
    with pytest.raises(ValueError, match="head size 4 but the cache holds head size 8"):
        cache.append(np.zeros((1, 2, 1, 4)), np.zeros((1, 2, 1, 4)))
    with pytest.raises(ValueError, match="cannot truncate to length 5"):
        cache.truncate(5)
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        KVCache(0, 2, 8)


def test_layer_errors():
    with pytest.raises(ValueError, match="n_heads \\(6\\) must be a multiple of n_kv_heads \\(4\\)"):
        MultiHeadAttention(48, 6, 4)
    layer = MultiHeadAttention(32, 4, 2)
    x = np.zeros((1, 3, 32), np.float32)
    with pytest.raises(ValueError, match="cache holds 4 K/V heads of size 8; this layer needs 2 heads of size 8"):
        layer(x, KVCache(8, 4, 8))
    cache = layer.new_cache(4)
    layer(x, cache)
    with pytest.raises(ValueError, match="KV cache overflow: it holds 3 of max_len=4 tokens and cannot take 3 more"):
        layer(x, cache)
    with pytest.raises(ValueError, match="position 5 is beyond the end of the cache \\(length 3\\)"):
        layer(x[:, :1], cache, positions=np.array([5]))
    with pytest.raises(ValueError, match="position 1 is already in the cache"):
        layer(x[:, :1], cache, positions=np.array([1]))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(np.zeros((1, 3, 31)))
    with pytest.raises(ValueError, match="weights\\['Wo'\\] must have shape"):
        MultiHeadAttention(32, 4, weights=dict(Wqkv=np.zeros((32, 96)), Wo=np.zeros((3, 3))))
    with pytest.raises(ValueError, match="tokens must lie in \\[0, 10\\)"):
        TinyDecoder(vocab=10, d_model=16, n_heads=2, n_kv_heads=1, n_layers=1).generate([3, 12], 1)


def test_a_decoding_step_reads_the_cache_in_place_through_split_k(monkeypatch):
    """With a cache and a few new tokens the layer calls flashkit.decode.attention_decode on the whole
    cache buffers (no copy of the filled rows); a long prompt goes to flashkit.attention."""
    import flashkit.layers as layers

    calls = []
    real = layers.attention_decode

    def spy(q, k_cache, v_cache, **kw):
        calls.append((k_cache, kw["length"]))
        return real(q, k_cache, v_cache, **kw)

    monkeypatch.setattr(layers, "attention_decode", spy)
    layer = MultiHeadAttention(32, 4, 2, seed=1)
    x = np.random.default_rng(3).standard_normal((1, 40, 32)).astype(np.float32)
    cache = layer.new_cache(64)
    layer(x[:, :layers.DECODE_MAX_TOKENS + 1], cache)  # a prefill: not split-K
    assert calls == []
    out = layer(x[:, layers.DECODE_MAX_TOKENS + 1:layers.DECODE_MAX_TOKENS + 2], cache)
    assert len(calls) == 1 and calls[0][0] is cache.K and calls[0][1] == layers.DECODE_MAX_TOKENS + 2
    assert rel_err(out, layer(x[:, :layers.DECODE_MAX_TOKENS + 2])[:, -1:]) <= 1e-5
