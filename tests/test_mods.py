"""score_mod / mask_mod / block_mask (FlexAttention's variants): the library's semantics, every backend
that takes them against a dense float64 oracle written here with plain loops, block masks against a
brute-force classification, and the errors a bad mod gets."""
import functools
import math

import numpy as np
import pytest

import flashkit
from conftest import assert_matches, random_qkv, seeded_rng
from flashkit import blockmask, masks, mods, validate

NUMBA = "numba" in [b["name"] for b in flashkit.backends() if b["available"]] and \
    [b for b in flashkit.backends() if b["name"] == "numba-mods"][0]["available"]
BACKENDS = ["numpy-tiled"] + (["numba"] if NUMBA else [])
needs_numba = pytest.mark.skipif(not NUMBA, reason="numba-mods needs Numba, SciPy and threadpoolctl")


def dense_oracle(q, k, v, score_mod=None, mask_mod=None, causal=False, window=None):
    """(O, lse) in float64 by the definition, one score at a time: S = q k^T / sqrt(d); hidden where
    causal/window (bottom-right) or mask_mod say so; score_mod on the rest; softmax; O = P V.
    Independent of flashkit.blockmask: each mod is called with Python ints and a float64 score."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Hq, Nq, d = q.shape
    g = Hq // k.shape[1]
    Nk = k.shape[2]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # (B, Hq, Nk, d): GQA as repeated heads
    S = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d)
    left, right = masks.effective_window(causal, window)
    offset = Nk - Nq
    for b in range(B):
        for h in range(Hq):
            for i in range(Nq):
                for j in range(Nk):
                    hidden = (right >= 0 and j > i + offset + right) or (left >= 0 and j < i + offset - left)
                    if hidden or (mask_mod is not None and not mask_mod(b, h, i, j)):
                        S[b, h, i, j] = -np.inf
                    elif score_mod is not None:
                        S[b, h, i, j] = score_mod(np.float64(S[b, h, i, j]), b, h, i, j)
    m = S.max(axis=-1, keepdims=True)
    empty = np.isneginf(m)
    P = np.exp(S - np.where(empty, 0.0, m))
    l = P.sum(axis=-1, keepdims=True)
    O = np.where(empty, 0.0, (P @ v) / np.where(empty, 1.0, l))
    with np.errstate(divide="ignore"):
        lse = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, l)))[..., 0]
    return O, lse


# Awkward on purpose: N not a multiple of any tile, Nq != Nk, GQA (4 query heads on 2 K/V heads), B = 2.
B, HQ, HKV, NQ, NK, D = 2, 4, 2, 37, 53, 16
TABLE = np.random.default_rng(5).standard_normal((HQ, 32))  # T5 bias table: (heads, buckets)
HEAD_BIAS = np.array([0.5, -1.0, 2.0, 0.0])
WINDOWS = np.array([3, 8, 20, 60])  # a different window per head
KEY_PADDING = np.array([40, 53])  # valid keys per batch element


def bias_by_side(score, b, h, q_idx, kv_idx):
    """User-written, with `if` (not array-friendly: the NumPy evaluators call it once per score)."""
    if kv_idx > q_idx:
        return score - HEAD_BIAS[h]
    return score + HEAD_BIAS[h] * 0.5


def per_head_window(b, h, q_idx, kv_idx):
    """User-written, reading a captured array by head: causal bottom-right with a window per head."""
    back = q_idx + (NK - NQ) - kv_idx
    return (back >= 0) & (back <= WINDOWS[h])


def key_padding(b, h, q_idx, kv_idx):
    return kv_idx < KEY_PADDING[b]


# Every library mod at least once, paired so that each case (one Numba compilation) checks a score_mod
# and a mask_mod together; the masks' definitions are checked one by one further down.
CASES = {
    # name: (score_mod, mask_mod, causal, window)
    "softcap + strided": (mods.softcap(2.0), mods.strided(NQ, NK, 5), False, None),
    "alibi + causal mod": (mods.alibi(mods.alibi_slopes(HQ), offset=NK - NQ), mods.causal(NQ, NK), False, None),
    "t5 bidirectional + global window, causal": (mods.relative_position_bias(TABLE, max_distance=20),
                                                 mods.global_window(NQ, NK, 3, 4), True, None),
    "t5 causal + dilated, window": (mods.relative_position_bias(TABLE[:, :16], bidirectional=False, max_distance=24),
                                    mods.dilated(NQ, NK, 6, 2, 3), True, (30, -1)),
    "identity + documents and causal": (mods.identity, mods.and_masks(mods.document_mask([10, 27], [20, 33]),
                                                                      mods.causal(NQ, NK)), False, None),
    "window or prefix-lm per batch": (None, mods.or_masks(mods.sliding_window(NQ, NK, 9, 3),
                                                          mods.prefix_lm(np.array([5, 40]), NQ, NK)), False, None),
    "top-left or documents": (None, mods.or_masks(mods.causal_top_left(), mods.document_mask([10, 27], [20, 33])),
                              False, None),
    "user: if-branch bias + key padding": (bias_by_side, key_padding, False, None),
    "user: lambda + per-head window": (lambda s, b, h, q, kv: s * (1.0 + 0.1 * h), per_head_window, False, None),
}


@functools.cache
def case_inputs(case):
    """q, k, v, the oracle's (O, lse) and the seed of a case: the same for every backend, computed once."""
    score_mod, mask_mod, causal, window = CASES[case]
    rng, seed = seeded_rng("mods", case)
    q, k, v = random_qkv(rng, B, HQ, HKV, NQ, NK, D)
    return q, k, v, dense_oracle(q, k, v, score_mod, mask_mod, causal, window), seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_mods_match_dense_oracle(case, backend):
    score_mod, mask_mod, causal, window = CASES[case]
    q, k, v, (ref_o, ref_lse), seed = case_inputs(case)
    o, lse = flashkit.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, causal=causal, window=window,
                                backend=backend, block_size=(8, 16) if backend == "numpy-tiled" else (16, 8),
                                return_lse=True)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert_matches(o, lse, ref_o, ref_lse, rtol=1e-5, what=f"{backend} {case} seed={seed}")


@pytest.mark.parametrize("backend", ["numpy-standard", "numpy-tiled-fa1"] + (["numba"] if NUMBA else []))
def test_float64_and_other_backends(backend):
    score_mod, mask_mod = mods.alibi(mods.alibi_slopes(HQ), offset=NK - NQ), mods.causal(NQ, NK)
    rng, seed = seeded_rng("float64 mods", backend)
    q, k, v = random_qkv(rng, B, HQ, HKV, NQ, NK, D, dtype=np.float64)
    o, lse = flashkit.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, backend=backend, return_lse=True)
    assert o.dtype == np.float64
    assert_matches(o, lse, *dense_oracle(q, k, v, score_mod, mask_mod), rtol=1e-12, what=f"{backend} seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_hidden_rows_give_zero_and_minus_inf(backend):
    rng, seed = seeded_rng("hidden rows", backend)
    q, k, v = random_qkv(rng, 1, 2, 1, 53, 37, 8)  # Nq > Nk: bottom-right causal hides the first 16 rows
    every_fifth = lambda b, h, q_idx, kv_idx: q_idx % 5 != 0  # noqa: E731  rows 0, 5, 10 ... see nothing
    minus_inf_rows = lambda s, b, h, q_idx, kv_idx: mods.where(q_idx == 30, -np.inf, s)  # noqa: E731
    for kw in (dict(mask_mod=mods.causal(53, 37)), dict(mask_mod=every_fifth, score_mod=minus_inf_rows)):
        o, lse = flashkit.attention(q, k, v, backend=backend, return_lse=True, **kw)
        ref_o, ref_lse = dense_oracle(q, k, v, kw.get("score_mod"), kw["mask_mod"])
        assert np.isneginf(ref_lse).any()
        assert_matches(o, lse, ref_o, ref_lse, what=f"{backend} {list(kw)} seed={seed}")  # 0 and -inf included


# ---------------------------------------------------------------------------------------------
# The library's definitions, against the rules they cite
# ---------------------------------------------------------------------------------------------
def grid(mask_mod, Nq, Nk, b=0, h=0):
    return np.array([[bool(mask_mod(b, h, i, j)) for j in range(Nk)] for i in range(Nq)])


@pytest.mark.parametrize("Nq,Nk", [(3, 5), (7, 7), (9, 4)])
def test_positional_masks_align_bottom_right(Nq, Nk):
    np.testing.assert_array_equal(grid(mods.causal(Nq, Nk), Nq, Nk), masks.dense_mask(Nq, Nk, (-1, 0)))
    for left, right in ((2, 0), (1, 3), (-1, 1), (0, -1)):
        np.testing.assert_array_equal(grid(mods.sliding_window(Nq, Nk, left, right), Nq, Nk),
                                      masks.dense_mask(Nq, Nk, (left, right)), err_msg=f"window {(left, right)}")
    np.testing.assert_array_equal(grid(mods.causal_top_left(), Nq, Nk), np.tril(np.ones((Nq, Nk), bool)))
    # the docstring's picture: Nq = 3, Nk = 5, query 0 sees k0..k2
    assert grid(mods.causal(3, 5), 3, 5).astype(int).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_document_prefix_dilated_strided_global_definitions():
    doc = grid(mods.document_mask([2, 3]), 5, 5)
    assert doc.astype(int).tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    pre = grid(mods.prefix_lm(3, 5, 5), 5, 5)
    assert pre.astype(int).tolist() == [[1, 1, 1, 0, 0]] * 3 + [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert grid(mods.dilated(7, 7, 3, 0, 2), 7, 7)[6].astype(int).tolist() == [1, 0, 1, 0, 1, 0, 1]
    assert grid(mods.strided(8, 8, 3), 8, 8)[7].astype(int).tolist() == [0, 1, 0, 0, 1, 1, 1, 1]
    glob = grid(mods.global_window(6, 6, 1, 1), 6, 6)
    assert glob[0].all() and glob[:, 0].all() and glob[3].astype(int).tolist() == [1, 0, 1, 1, 1, 0]
    with pytest.raises(IndexError, match="document_mask"):  # a position beyond the documents: an error
        flashkit.attention(*(np.ones((6, 4)),) * 3, mask_mod=mods.document_mask([2, 3]), backend="numpy-standard")


def _t5_bucket_scalar(rel, bidirectional, num_buckets, max_distance):
    """T5's _relative_position_bucket (HF transformers), one int at a time."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        bucket += num_buckets if rel > 0 else 0
        n = abs(rel)
    else:
        n = -min(rel, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


def test_score_mod_definitions():
    rels = list(range(-300, 301))
    for bidirectional in (True, False):
        got = mods.t5_bucket(np.array(rels), bidirectional, 32, 128)
        assert got.tolist() == [_t5_bucket_scalar(r, bidirectional, 32, 128) for r in rels]
    rpb = mods.relative_position_bias(TABLE, max_distance=20)
    for q_idx, kv_idx in ((0, 0), (3, 40), (40, 3), (10, 11)):
        want = 1.5 + TABLE[2, _t5_bucket_scalar(kv_idx - q_idx, True, 32, 20)]
        assert rpb(1.5, 0, 2, q_idx, kv_idx) == pytest.approx(want)
    assert mods.softcap(50.0)(100.0, 0, 0, 0, 0) == pytest.approx(50 * math.tanh(2.0))
    assert mods.alibi([0.5, 0.25], offset=2)(1.0, 0, 1, 3, 1) == pytest.approx(1.0 + 0.25 * (1 - 5))
    # ALiBi's slopes: a geometric sequence from 2^(-8/H); 6 heads as the authors' code (4, then 8's odd ones)
    np.testing.assert_allclose(mods.alibi_slopes(8), 2.0 ** (-np.arange(1, 9)))
    np.testing.assert_allclose(mods.alibi_slopes(6), [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125])


@needs_numba
def test_np_where_in_a_mod_compiles_to_a_scalar():
    from flashkit.cpu import mods_jit

    # np.where of scalars is a 0-d array in Numba: the compiled mod returns its element
    jitted = mods_jit.compiled_mod("score_mod", lambda s, b, h, q_idx, kv_idx: np.where(q_idx == 3, -np.inf, s))
    assert jitted(np.float32(1.5), 0, 0, 3, 0) == -np.inf and jitted(np.float32(1.5), 0, 0, 2, 0) == 1.5
    assert isinstance(jitted(np.float32(1.5), 0, 0, 2, 0), float)


@needs_numba
def test_compiled_softcap_is_accurate():
    from flashkit.cpu import mods_jit

    softcap = CASES["softcap + strided"][0]  # cap 2.0, compiled by the oracle test
    jitted = mods_jit.compiled_mod("score_mod", softcap, np.float32)
    x = np.concatenate([np.linspace(-40, 40, 4001), np.geomspace(1e-6, 1.0, 200)]).astype(np.float32)
    got = np.array([jitted(v, 0, 0, 0, 0) for v in x], np.float64)
    want = 2.0 * np.tanh(x.astype(np.float64) / 2.0)
    assert np.abs(got - want).max() <= 2.0 * 3e-7  # tanh32's error, in units of the cap
    small = np.abs(x) < 0.5
    assert (np.abs(got[small] - want[small]) <= 4e-7 * np.abs(want[small])).all()  # relative, near 0


@needs_numba
def test_register_softcap_is_accurate_and_runs_on_whole_micro_tiles():
    """mods.softcap on rung 4: whole micro-tiles go through the register form (softcap_register), the
    edges through the scalar tanh32; both against float64, over scores that saturate the tanh."""
    import numba

    from flashkit.cpu import mods_jit, vec

    @numba.njit
    def apply(x, out, inv_cap, cap_base2):
        for i in range(0, x.shape[0], vec.lanes(x)):
            vec.store(out, i, mods_jit.softcap_register(vec.load(x, i), inv_cap, cap_base2))

    cap = 3.0
    x = np.linspace(-40, 40, 64 * 1024, dtype=np.float32)
    out = np.empty_like(x)
    apply(x, out, np.float32(1 / cap), np.float32(cap * mods_jit.LOG2E))
    want = cap * np.tanh(x.astype(np.float64) / cap) * mods_jit.LOG2E
    assert np.abs(out - want).max() <= cap * mods_jit.LOG2E * 4e-7
    rng, seed = seeded_rng("register softcap")
    q, k, v = random_qkv(rng, 1, 2, 1, 70, 100, 16)
    q = q * 6  # scores up to ~60: tanh(score / 3) saturates
    o, lse = flashkit.attention(q, k, v, score_mod=mods.softcap(cap), backend="numba", block_size=(16, 64),
                                return_lse=True)
    assert_matches(o, lse, *dense_oracle(q, k, v, mods.softcap(cap)), rtol=1e-5, what=f"seed={seed}")
    asm = mods_jit.micro_tile_asm(mods.softcap(cap))
    assert "vfmadd" in asm and ("vdivps" in asm or "vrcp" in asm)  # a vector tanh, no libm call


def test_reads_batch_head():
    assert blockmask.reads_batch_head(mods.causal(4, 4)) == (False, False)
    assert blockmask.reads_batch_head(per_head_window) == (False, True)
    assert blockmask.reads_batch_head(key_padding) == (True, False)
    assert blockmask.reads_batch_head(mods.and_masks(key_padding, mods.causal(4, 4), per_head_window)) == (True, True)


# ---------------------------------------------------------------------------------------------
# Block masks
# ---------------------------------------------------------------------------------------------
def brute_force_tiles(dense, Br, Bc):
    """Every tile classified from the element grid dense (Bm, Hm, Nq, Nk), by the definition."""
    Bm, Hm, Nq, Nk = dense.shape
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    out = np.empty((Bm, Hm, Tr, Tc), np.int8)
    for b in range(Bm):
        for h in range(Hm):
            for i in range(Tr):
                for j in range(Tc):
                    tile = dense[b, h, i * Br:(i + 1) * Br, j * Bc:(j + 1) * Bc]
                    out[b, h, i, j] = masks.SKIP if not tile.any() else masks.FULL if tile.all() else masks.PARTIAL
    return out


MIXED = mods.and_masks(key_padding, per_head_window, mods.or_masks(mods.document_mask([10, 27], [20, 33]),
                                                                   mods.global_window(NQ, NK, 2, 1)))


@functools.cache
def mixed_dense():
    return np.array([[grid(MIXED, NQ, NK, b, h) for h in range(HQ)] for b in range(B)])  # (B, H, Nq, Nk)


@pytest.mark.parametrize("engine", ["numpy"] + (["numba"] if NUMBA else []))
@pytest.mark.parametrize("block", [(8, 16), (7, 13), (64, 64)])
def test_block_mask_matches_brute_force(engine, block):
    bm = flashkit.block_mask(MIXED, B, HQ, NQ, NK, block_size=block, engine=engine)
    want = brute_force_tiles(mixed_dense(), *block)
    np.testing.assert_array_equal(bm.tiles, want, err_msg=f"{engine} {block}")
    assert bm.sparsity == pytest.approx((want == masks.SKIP).mean())
    assert bm.counts()["total"] == want.size and not bm.tiles.flags.writeable
    assert "sparsity" in repr(bm) and bm.block_size == block


def test_block_mask_is_reused_and_checked_against_the_call():
    causal_doc = mods.and_masks(mods.document_mask([10, 27], [20, 33]), mods.causal(NQ, NK))
    bm = flashkit.block_mask(causal_doc, None, None, NQ, NK, block_size=(8, 16))
    assert (bm.B, bm.H) == (1, 1) and bm.sparsity > 0.3
    rng, seed = seeded_rng("reuse")
    for _ in range(2):  # the same block mask, other inputs
        q, k, v = random_qkv(rng, B, HQ, HKV, NQ, NK, D)
        for backend in BACKENDS:
            o, lse = flashkit.attention(q, k, v, block_mask=bm, backend=backend, return_lse=True)
            assert_matches(o, lse, *dense_oracle(q, k, v, None, causal_doc), what=f"{backend} seed={seed}")
    q, k, v = random_qkv(rng, B, HQ, HKV, NQ, NK, D)
    with pytest.raises(ValueError, match="Nq=37, Nk=53; this call has Nq=36"):
        flashkit.attention(q[:, :, 1:], k, v, block_mask=bm)
    with pytest.raises(ValueError, match="block_size"):
        flashkit.attention(q, k, v, block_mask=bm, block_size=16)
    with pytest.raises(ValueError, match="disagree"):
        flashkit.attention(q, k, v, block_mask=bm, mask_mod=mods.causal(NQ, NK))
    with pytest.raises(ValueError, match="H=4 heads; this call has 2"):
        flashkit.attention(q[:, :2], k, v, block_mask=flashkit.block_mask(per_head_window, None, HQ, NQ, NK))
    with pytest.raises(TypeError, match="block_mask must be"):
        flashkit.attention(q, k, v, block_mask=bm.tiles)


def test_changed_captured_array_is_noticed():
    lens = np.array([40, 53])

    def padding(b, h, q_idx, kv_idx):
        return kv_idx < lens[b]

    rng, seed = seeded_rng("captured")
    q, k, v = random_qkv(rng, B, HQ, HKV, NQ, NK, D)
    bm = flashkit.block_mask(padding, B, None, NQ, NK, block_size=16)
    for backend in BACKENDS:
        flashkit.attention(q, k, v, mask_mod=padding, backend=backend)  # compiled (Numba freezes lens)
    lens[0] = 7  # changed in place
    with pytest.raises(ValueError, match="changed since this block mask was made"):
        flashkit.attention(q, k, v, block_mask=bm)
    for backend in BACKENDS:  # recompiled for the new values, not the frozen ones
        o, lse = flashkit.attention(q, k, v, mask_mod=padding, backend=backend, return_lse=True)
        assert_matches(o, lse, *dense_oracle(q, k, v, None, padding), what=f"{backend} seed={seed}")


@needs_numba
def test_numba_skips_the_empty_tiles():
    from flashkit.cpu import rung3_gemm

    rng, seed = seeded_rng("skips")
    q, k, v = random_qkv(rng, 1, 2, 2, 100, 100, 8)
    docs = mods.document_mask([30, 30, 40])
    bm = flashkit.block_mask(docs, None, None, 100, 100, block_size=10)
    problem = validate.check(q, k, v, block_mask=bm, causal=True)
    O, lse, tiles = rung3_gemm.run(problem, stats=True)
    want = np.minimum(bm.plane(), masks.block_map(100, 100, 10, 10, (-1, 0)))
    assert tiles.sum() == 2 * (want != masks.SKIP).sum(), f"seed={seed}"  # two heads
    assert_matches(O, lse, *dense_oracle(q, k, v, None, docs, causal=True), what=f"seed={seed}")
    from flashkit.cpu import mods_jit  # rung 4 with the hooks: the same tiles

    O, lse, tiles = mods_jit.run_fused(problem, stats=True)
    assert tiles.sum() == 2 * (want != masks.SKIP).sum(), f"seed={seed}"
    assert_matches(O, lse, *dense_oracle(q, k, v, None, docs, causal=True), what=f"rung 4 seed={seed}")


# ---------------------------------------------------------------------------------------------
# Bad mods: clear errors naming the function, never a wrong answer
# ---------------------------------------------------------------------------------------------
Q, K, V = random_qkv(np.random.default_rng(1), 1, 2, 2, 20, 30, 8)
SMALL = np.zeros(25)


def reads_out_of_bounds(score, b, h, q_idx, kv_idx):
    return score + SMALL[kv_idx]  # 25 entries, 30 keys


def raises_inside(b, h, q_idx, kv_idx):
    if q_idx == 4 and kv_idx == 6:
        raise KeyError("boom")
    return True


def nan_somewhere(score, b, h, q_idx, kv_idx):
    return score if q_idx != 3 or kv_idx != 7 else math.nan


def inf_at(score, b, h, q_idx, kv_idx):
    return math.inf if (q_idx == 12 and kv_idx == 5) else score


class Opaque:
    weight = 2.0


OPAQUE = Opaque()


def reads_an_object(score, b, h, q_idx, kv_idx):
    return score * OPAQUE.weight


BAD = [
    # (what, kwargs, exception, words the message must contain, backends: "all" or the NumPy ones)
    ("score_mod with 4 arguments", dict(score_mod=lambda b, h, q, k: q), TypeError, ["5 arguments", "mask_mod="]),
    ("mask_mod with 5 arguments", dict(mask_mod=mods.identity), TypeError, ["4 arguments", "score_mod="]),
    ("score_mod with 2 arguments", dict(score_mod=lambda s, b: s), TypeError, ["score, b, h, q_idx, kv_idx"]),
    ("not a function", dict(mask_mod=np.ones((20, 30), bool)), TypeError, ["mask_mod must be a function"]),
    ("a callable object", dict(score_mod=np.add), TypeError, ["Python function"]),
    ("mask_mod returns ints", dict(mask_mod=lambda b, h, q, k: q - k), TypeError, ["must return a bool", "int64"]),
    ("score_mod returns bools", dict(score_mod=lambda s, b, h, q, k: q >= k), TypeError, ["returns a bool", "mask_mod"]),
    ("NaN from score_mod", dict(score_mod=nan_somewhere), ValueError,
     ["nan_somewhere", "nan", "q_idx=3, kv_idx=7", "-inf to hide"]),
    ("+inf from score_mod, causal", dict(score_mod=inf_at, causal=True), ValueError,
     ["inf_at", "inf", "q_idx=12, kv_idx=5"]),
    ("exception inside", dict(mask_mod=raises_inside), KeyError, ["raises_inside", "q_idx=4, kv_idx=6", "boom"]),
    ("out of bounds", dict(score_mod=reads_out_of_bounds), IndexError,
     ["reads_out_of_bounds", "kv_idx=25", "out of bounds"]),
]


@pytest.mark.parametrize("backend", ["numpy-standard"] + BACKENDS)
@pytest.mark.parametrize("what", [row[0] for row in BAD])
def test_bad_mods_raise_clear_errors(what, backend):
    _, kw, exc, words, = next(row for row in BAD if row[0] == what)
    o_poison = None
    with pytest.raises(exc) as err:
        o_poison = flashkit.attention(Q, K, V, backend=backend, **kw)
    assert o_poison is None
    message = str(err.value).lower()
    for w in words:
        assert w.lower() in message.replace('"', "'"), f"{backend} {what}: {w!r} not in {err.value}"


@needs_numba
def test_numba_names_what_it_cannot_compile():
    with pytest.raises(TypeError, match="reads_an_object.*could not be compiled by Numba.*OPAQUE.*numpy-tiled"):
        flashkit.attention(Q, K, V, score_mod=reads_an_object, backend="numba")
    o = flashkit.attention(Q, K, V, score_mod=reads_an_object, backend="numpy-tiled")  # any Python there
    # float32 tiles against float32 standard: each output's error is relative to the row's scale (|V| ~ 1), not
    # to an output near 0 (rtol alone failed on 3 of 320 such outputs, 9.5e-8 off, on an AMD znver5 machine)
    np.testing.assert_allclose(o, flashkit.attention(Q, K, V, scale=2.0 / math.sqrt(8), backend="numpy-standard"),
                               rtol=1e-5, atol=1e-6)


def test_backends_say_whether_they_take_mods():
    rows = {r["name"]: r for r in flashkit.backends()}
    assert rows["numpy-standard"]["mods"] and rows["numpy-tiled"]["mods"] and rows["numba"]["mods"]
    assert not rows["numba-gemm"]["mods"] and not rows["cupy-mma-async"]["mods"]
    assert rows["cupy-mma-2tile"]["mods"] and rows["cupy-mma-2tile"]["mask"]  # rung 6's hooks (flashkit.gpu.flash_mods)
    with pytest.raises(ValueError, match="numba-gemm.*does not take a score_mod.*these do: numpy-standard"):
        flashkit.attention(Q, K, V, score_mod=mods.softcap(5.0), backend="numba-gemm")
    o_auto = flashkit.attention(Q, K, V, score_mod=mods.softcap(5.0))  # auto: a backend that takes it
    o_ref = flashkit.attention(Q, K, V, score_mod=mods.softcap(5.0), backend="numpy-standard")
    np.testing.assert_allclose(o_auto, o_ref, rtol=1e-5, atol=1e-6)


@needs_numba
def test_numba_dispatcher_as_a_mod_and_the_assembly():
    import numba

    from flashkit.cpu import mods_jit

    @numba.njit
    def jitted_padding(b, h, q_idx, kv_idx):
        return kv_idx < 21

    o = flashkit.attention(Q, K, V, mask_mod=jitted_padding, backend="numba")
    np.testing.assert_allclose(o, flashkit.attention(Q, K[:, :, :21], V[:, :, :21], backend="numpy-standard"),
                               rtol=1e-5, atol=1e-6)
    from flashkit.viz.simd import asm_counts

    # the library's softcap: a tanh LLVM vectorises (packed instructions); np.tanh: a libm call per score
    library = asm_counts(mods_jit.tile_asm(CASES["softcap + strided"][0], None, np.float32))
    assert library["packed_arith"] + library["neon"] > 0, library
    hand_written = mods_jit.tile_asm(lambda s, b, h, q_idx, kv_idx: 50.0 * np.tanh(s / 50.0), None, np.float32)
    assert "tanh" in hand_written
