"""The checkers of exercises 1 (standard attention), 6 (a vectorised loop), 7 (GQA, a KV-cache step) and
9 (a mask_mod): each accepts a right answer and names the classic mistakes of wrong ones."""
import numpy as np
import pytest

from flashkit.exercises import (ExerciseError, check_decode_step, check_kv_head, check_mask_mod,
                                check_standard_attention, check_standard_memory, check_vectorised)

SEEDS = [0, 3, 12345]


def softmax(S, axis=-1):
    E = np.exp(S - S.max(axis=axis, keepdims=True))
    return E / E.sum(axis=axis, keepdims=True)


# ------------------------------------------------------------------ exercise 1: standard attention
def standard_attention(Q, K, V, scale):
    return softmax(Q @ K.T * scale) @ V


def standard_memory_bytes(B, H, Nq, Nk, itemsize):
    return 2 * B * H * Nq * Nk * itemsize


def naive(Q, K, V, scale):
    E = np.exp(Q @ K.T * scale)
    return E / E.sum(axis=1, keepdims=True) @ V


@pytest.mark.parametrize("seed", SEEDS)
def test_standard_right_answers_pass(seed, capsys):
    check_standard_attention(standard_attention, seed=seed)
    check_standard_memory(standard_memory_bytes, seed=seed)
    assert capsys.readouterr().out.count("✓") == 2


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", [
    (lambda Q, K, V, s: softmax(Q @ K.T) @ V, "forgot the scale"),
    (lambda Q, K, V, s: softmax(Q @ K.T * s, axis=0) @ V, "down the columns"),
    (lambda Q, K, V, s: np.exp(Q @ K.T * s - (Q @ K.T * s).max(axis=1, keepdims=True)) @ V, "not normalised"),
    (lambda Q, K, V, s: softmax(Q @ K.T * s) @ K, "not by V"),
    (naive, "overflows"),
    (lambda Q, K, V, s: standard_attention(*(x.astype(np.float32) for x in (Q, K, V)), np.float32(s)).astype(np.float64),
     "float32"),
], ids=["scale", "axis", "normalise", "PK", "naive", "float32"])
def test_standard_attention_names_the_mistake(fn, expected, seed):
    with np.errstate(all="ignore"), pytest.raises(ExerciseError) as info:
        check_standard_attention(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", [
    (lambda B, H, Nq, Nk, i: 2 * B * H * Nq * Nq * i, "not Nq x Nq"),
    (lambda B, H, Nq, Nk, i: B * H * Nq * Nk * i, "one of the two matrices"),
    (lambda B, H, Nq, Nk, i: 2 * B * H * Nq * Nk, "elements, not bytes"),
    (lambda B, H, Nq, Nk, i: 2 * Nq * Nk * i, "B * H"),
    (lambda B, H, Nq, Nk, i: int(np.int32(2) * np.int32(B) * np.int32(H) * np.int32(Nq) * np.int32(Nk) * np.int32(i)),
     "32-bit"),
    (lambda B, H, Nq, Nk, i: "lots", "a number of bytes"),
], ids=["NqNq", "one-matrix", "elements", "BH", "int32", "type"])
def test_standard_memory_names_the_mistake(fn, expected, seed):
    with np.errstate(all="ignore"), pytest.raises(ExerciseError) as info:
        check_standard_memory(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


# ------------------------------------------------------------------ exercise 7: GQA and decoding
def kv_head(h, H, H_kv):
    return h // (H // H_kv)


def decode_step(q, k_new, v_new, K_cache, V_cache, length, scale, *, write_at=0, rows=1, kv=kv_head,
                use_scale=True):
    K_cache[:, length + write_at], V_cache[:, length + write_at] = k_new, v_new
    H, d = q.shape
    O = np.zeros((H, d))
    n = {1: length + 1, 0: length, "all": K_cache.shape[1], "first": 1}[rows]
    for h in range(H):
        g = kv(h, H, K_cache.shape[0])
        s = K_cache[g, :n] @ q[h] * (scale if use_scale else 1.0)
        O[h] = softmax(s) @ V_cache[g, :n] if n else 0.0
    return O


def test_gqa_right_answers_pass(capsys):
    check_kv_head(kv_head)
    for seed in SEEDS:
        check_decode_step(decode_step, seed=seed)
    assert capsys.readouterr().out.count("✓") == 1 + len(SEEDS)


@pytest.mark.parametrize("fn, expected", [
    (lambda h, H, Hk: h % Hk, "interleaved"),
    (lambda h, H, Hk: h // Hk, "group size"),
    (lambda h, H, Hk: h, "its own K/V head"),
    (lambda h, H, Hk: h / (H // Hk), "a float"),
    (lambda h, H, Hk: min(h // (H // Hk), 1), "should be"),
], ids=["interleaved", "divided-by-Hkv", "mha", "float", "other"])
def test_kv_head_names_the_mistake(fn, expected):
    with pytest.raises(ExerciseError) as info:
        check_kv_head(fn)
    assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kw, expected", [
    (dict(write_at=1), "off-by-one"),
    (dict(rows=0), "does not attend to itself"),
    (dict(rows="all"), "whole cache"),
    (dict(rows="first"), "top-left"),
    (dict(kv=lambda h, H, Hk: h % Hk), "interleaved"),
    (dict(use_scale=False), "forgot the scale"),
], ids=["write-at", "no-self", "whole-cache", "top-left", "interleaved", "scale"])
def test_decode_step_names_the_mistake(kw, expected, seed):
    def wrong(*args):
        return decode_step(*args, **kw)

    with np.errstate(all="ignore"), pytest.raises(ExerciseError) as info:
        check_decode_step(wrong, seed=seed)
    assert expected in str(info.value), str(info.value)


def test_decode_step_that_forgets_the_cache_is_named():
    def no_store(q, k_new, v_new, K_cache, V_cache, length, scale):
        K, V = K_cache.copy(), V_cache.copy()
        K[:, length], V[:, length] = k_new, v_new
        return decode_step(q, k_new, v_new, K, V, length, scale)

    with pytest.raises(ExerciseError, match="was not updated"):
        check_decode_step(no_store, seed=0)


# ------------------------------------------------------------------ exercise 9: a mask_mod
def make_mask_mod(seq_lens, Nq, Nk, left, right, *, offset=None, doc=None, swap=False, strict=False):
    doc_of = np.repeat(np.arange(len(seq_lens)), seq_lens) if doc is None else doc(seq_lens)
    off = Nk - Nq if offset is None else offset
    lo, hi = (right, left) if swap else (left, right)

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + off
        inside = (q_pos - lo < kv_idx) if strict else (q_pos - lo <= kv_idx)
        return bool(doc_of[q_pos] == doc_of[kv_idx]) and inside and kv_idx <= q_pos + hi
    return mask_mod


def boundary_after(seq_lens):  # the first token of each document given to the one before it
    return np.searchsorted(np.cumsum(seq_lens), np.arange(sum(seq_lens)), side="left")


@pytest.mark.parametrize("seed", SEEDS)
def test_mask_mod_right_answer_passes(seed, capsys):
    check_mask_mod(make_mask_mod, seed=seed)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kw, expected", [
    (dict(offset=0), "top-left"),
    (dict(doc=boundary_after), "off by one"),
    (dict(swap=True), "sides are swapped"),
    (dict(strict=True), "one key too narrow on the left"),
    (dict(doc=lambda lens: np.zeros(sum(lens), int)), "no document mask"),
], ids=["top-left", "boundaries", "swapped", "strict", "no-docs"])
def test_mask_mod_names_the_mistake(kw, expected, seed):
    with pytest.raises(ExerciseError) as info:
        check_mask_mod(lambda *a: make_mask_mod(*a, **kw), seed=seed)
    assert expected in str(info.value), str(info.value)


def test_mask_mod_must_return_bools():
    with pytest.raises(ExerciseError, match="returns True"):
        check_mask_mod(lambda *a: (lambda b, h, q, k: 1), seed=0)


# ------------------------------------------------------------------ exercise 6: a vectorised loop
numba = pytest.importorskip("numba")


@numba.njit(fastmath=True)
def weighted_sum(p, v):
    s = p.dtype.type(0)
    for k in range(p.shape[0]):
        s += p[k] * v[k]
    return s


@numba.njit
def weighted_sum_strict(p, v):
    s = p.dtype.type(0)
    for k in range(p.shape[0]):
        s += p[k] * v[k]
    return s


@numba.njit(fastmath=True)
def weighted_sum_double(p, v):
    s = 0.0
    for k in range(p.shape[0]):
        s += p[k] * v[k]
    return s


def weighted_sum_python(p, v):
    s = 0.0
    for k in range(p.shape[0]):
        s += p[k] * v[k]
    return s


def weighted_sum_drops_last(p, v):
    return float(np.dot(p[:-1].astype(np.float64), v[:-1]))


def test_vectorised_right_answer_passes(capsys):
    check_vectorised(weighted_sum, seed=0)
    assert "floats per instruction" in capsys.readouterr().out


@pytest.mark.parametrize("fn, expected", [
    (weighted_sum_strict, "fastmath=True"),
    (weighted_sum_double, "runs in float64"),
    (weighted_sum_python, "plain Python function"),
    (weighted_sum_drops_last, "misses the last element"),
], ids=["no-fastmath", "float64", "python", "drops-last"])
def test_vectorised_names_the_mistake(fn, expected):
    with pytest.raises(ExerciseError) as info:
        check_vectorised(fn, seed=0)
    assert expected in str(info.value), str(info.value)


def test_the_answers_are_not_offered_by_tab_completion():
    import flashkit.exercises.decoding as decoding
    import flashkit.exercises.masking as masking
    import flashkit.exercises.standard as standard
    import flashkit.exercises.vectorise as vectorise

    for module in (decoding, masking, standard, vectorise):
        assert all(name.startswith("check_") or name == "ExerciseError" for name in dir(module)), dir(module)
