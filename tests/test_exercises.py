"""The workshop checkers: each accepts a correct solution and rejects the classic mistakes with a
message that names them. Every case runs on several seeds, since the checkers draw fresh inputs."""
import math

import numpy as np
import pytest

from flashkit.exercises import (ExerciseError, check_block_sizes, check_fa2_tile, check_hbm_traffic, check_merge,
                                check_online_update, check_safe_softmax, check_skip_tile)
from flashkit.exercises.checking import close

SEEDS = [0, 1, 2, 7, 12345]


def guard(m):
    """The max to subtract: 0 where nothing was seen (-inf), so exp(-inf - 0) = 0 and never NaN."""
    return np.where(np.isneginf(m), 0.0, m)


# ------------------------------------------------------------------ correct solutions
def softmax(x):
    m = guard(x.max(axis=-1, keepdims=True))
    e = np.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    return np.where(s > 0, e / np.where(s > 0, s, 1.0), 0.0)


def online_update(m, l, O, S, V):
    m_new = np.maximum(m, S.max(axis=1))
    P = np.exp(S - guard(m_new)[:, None])
    alpha = np.exp(m - guard(m_new))
    return m_new, alpha * l + P.sum(axis=1), alpha[:, None] * O + P @ V


def merge(a, b):
    (ma, la, Oa), (mb, lb, Ob) = a, b
    m = np.maximum(ma, mb)
    wa, wb = np.exp(ma - guard(m)), np.exp(mb - guard(m))
    return m, wa * la + wb * lb, wa[:, None] * Oa + wb[:, None] * Ob


def fa2_tile(Q_i, K, V, Bc, scale, update=online_update, stop=None, width=None, divide_inside=False):
    Br, d = Q_i.shape
    m, l, O = np.full(Br, -np.inf), np.zeros(Br), np.zeros((Br, d))
    for j in range(0, K.shape[0] if stop is None else stop(K.shape[0], Bc), Bc):
        w = Bc if width is None else width
        S = Q_i @ K[j:j + w].T * scale
        m, l, O = update(m, l, O, S, V[j:j + w])
        if divide_inside:
            O = O / l[:, None]
    return (O if divide_inside else O / l[:, None]), m + np.log(l)


def skip_tile(i0, i1, j0, j1, Nq, Nk, window, offset=None, last_row=lambda i0, i1: i1 - 1):
    left, right = window
    off = Nk - Nq if offset is None else offset
    if right >= 0 and j0 > last_row(i0, i1) + off + right:
        return True
    if left >= 0 and j1 - 1 < i0 + off - left:
        return True
    return False


def block_sizes(M, d):
    Bc = math.ceil(M / (4 * d))
    return min(Bc, d), Bc


def hbm_bytes_standard(B, H, Nq, Nk, d, itemsize):
    return B * H * itemsize * (2 * Nq * d + 2 * Nk * d + 4 * Nq * Nk)


# ------------------------------------------------------------------ known-wrong implementations
def update_inverted(m, l, O, S, V):  # rescale with exp(m_new - m_old)
    m_new = np.maximum(m, S.max(axis=1))
    P = np.exp(S - m_new[:, None])
    alpha = np.exp(m_new - m)
    return m_new, alpha * l + P.sum(axis=1), alpha[:, None] * O + P @ V


def update_forgets_max(m, l, O, S, V):  # running max that forgets the previous max
    m_new = S.max(axis=1)
    P = np.exp(S - m_new[:, None])
    alpha = np.exp(m - m_new)
    return m_new, alpha * l + P.sum(axis=1), alpha[:, None] * O + P @ V


def update_divides(m, l, O, S, V):  # divides by l inside the loop
    m_new, l_new, O_new = online_update(m, l, O, S, V)
    return m_new, l_new, O_new / l_new[:, None]


def update_no_rescale_O(m, l, O, S, V):  # forgets to rescale O
    m_new = np.maximum(m, S.max(axis=1))
    P = np.exp(S - m_new[:, None])
    return m_new, np.exp(m - m_new) * l + P.sum(axis=1), O + P @ V


def update_no_guard(m, l, O, S, V):  # right algebra, NaN for a row that has seen no key
    m_new = np.maximum(m, S.max(axis=1))
    P = np.exp(S - m_new[:, None])
    alpha = np.exp(m - m_new)
    return m_new, alpha * l + P.sum(axis=1), alpha[:, None] * O + P @ V


def update_some_nan(m, l, O, S, V):  # right everywhere except one element
    m_new, l_new, O_new = online_update(m, l, O, S, V)
    O_new = O_new.copy()
    O_new[-1, -1] = np.nan
    return m_new, l_new, O_new


def nan_hidden_by_max(got, want):
    """The error check that NaN fools: Python's max() keeps its first argument when the other is NaN."""
    err = max(0.0, *np.abs(np.ravel(got) - np.ravel(want)))
    return err <= 1e-9


UPDATE_MISTAKES = [
    (update_inverted, "exp(m_new - m_old); it must be exp(m_old - m_new)"),
    (update_forgets_max, "forgets the previous max"),
    (update_divides, "divided O by l inside the update"),
    (update_no_rescale_O, "forgot to rescale O"),
    (update_no_guard, "row 0 has seen no key yet (m = -inf)"),
    (update_some_nan, "NaN in row 4"),
    (lambda m, l, O, S, V: online_update(m, l, O, S, V)[:2], "return the tuple (m, l, O)"),
    (lambda m, l, O, S, V: tuple(x[..., None] for x in online_update(m, l, O, S, V)), "has shape"),
    (lambda m, l, O, S, V: tuple(x.astype(np.float32) for x in online_update(m, l, O, S, V)), "is float32"),
]


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("seed", SEEDS)
def test_correct_solutions_pass(seed, capsys):
    check_safe_softmax(softmax, seed=seed)
    check_online_update(online_update, seed=seed)
    check_merge(merge, seed=seed)
    check_fa2_tile(fa2_tile, seed=seed)
    check_skip_tile(skip_tile, seed=seed)
    check_block_sizes(block_sizes, seed=seed)
    check_hbm_traffic(hbm_bytes_standard, seed=seed)
    out = capsys.readouterr().out
    assert out.count("✓") == 7, out


def test_fresh_inputs_without_a_seed(capsys):
    """No seed: new inputs each call, and the seed to reproduce a failure is in the message."""
    check_online_update(online_update)
    with pytest.raises(ExerciseError, match=r"seed=\d+"):
        check_online_update(update_inverted)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", UPDATE_MISTAKES, ids=lambda x: getattr(x, "__name__", str(x))[:40])
def test_online_update_names_the_mistake(fn, expected, seed):
    with np.errstate(all="ignore"), pytest.raises(ExerciseError) as info:
        check_online_update(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


def test_nan_is_never_hidden():
    """A max()-based error check passes a NaN output; the checker's comparison must not."""
    want = np.ones(4)
    got = np.array([1.0, 1.0, np.nan, 1.0])
    assert nan_hidden_by_max(got, want)  # the trap: NaN is silently dropped
    assert not close(got, want)
    assert not close(np.full(3, np.nan), np.full(3, np.nan))  # NaN never equals the reference
    with pytest.raises(ExerciseError, match="NaN"):
        check_safe_softmax(lambda x: np.where(np.arange(x.shape[1]) == 2, np.nan, softmax(x)), seed=0)
    with pytest.raises(ExerciseError, match="NaN"):
        check_fa2_tile(lambda *a: (np.full_like(a[0], np.nan), fa2_tile(*a)[1]), seed=0)


def test_stub_and_crash_and_inplace_messages():
    def stub(x):
        raise NotImplementedError("write softmax")

    with pytest.raises(ExerciseError, match="still a stub .*write softmax"):
        check_safe_softmax(stub, seed=0)
    with pytest.raises(ExerciseError, match="pass your function itself"):
        check_safe_softmax(softmax(np.ones((2, 3))), seed=0)
    with pytest.raises(ExerciseError, match="raised ZeroDivisionError"):
        check_safe_softmax(lambda x: 1 / 0, seed=0)

    def in_place(x):
        x -= x.max(axis=-1, keepdims=True)
        return softmax(x)

    with pytest.raises(ExerciseError, match="modified its argument #1 in place"):
        check_safe_softmax(in_place, seed=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", [
    (lambda x: np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True), "naive softmax"),
    (lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum(axis=-1, keepdims=True), "max of the WHOLE array"),
    (lambda x: np.exp(x - x.max(axis=-1, keepdims=True)) / np.exp(x - x.max(axis=-1, keepdims=True)).sum(axis=-1, keepdims=True),
     "a query that sees no key"),
    (lambda x: np.exp(x - guard(x.max(axis=-1, keepdims=True))), "do not sum to 1"),
    (lambda x: softmax(x.T).T, "wrong axis"),
], ids=["naive", "global-max", "no-guard", "unnormalised", "axis"])
def test_safe_softmax_names_the_mistake(fn, expected, seed):
    with np.errstate(all="ignore"), pytest.raises(ExerciseError) as info:
        check_safe_softmax(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


def merge_inverted(a, b):
    (ma, la, Oa), (mb, lb, Ob) = a, b
    m = np.maximum(ma, mb)
    wa, wb = np.exp(m - ma), np.exp(m - mb)
    return m, wa * la + wb * lb, wa[:, None] * Oa + wb[:, None] * Ob


def merge_no_rescale_O(a, b):
    m, l, _ = merge(a, b)
    return m, l, a[2] + b[2]


def merge_keeps_a(a, b):
    (ma, la, Oa), (mb, lb, Ob) = a, b
    wa, wb = np.exp(ma - guard(ma)), np.exp(mb - guard(ma))
    return ma, wa * la + wb * lb, wa[:, None] * Oa + wb[:, None] * Ob


def merge_no_guard(a, b):
    (ma, la, Oa), (mb, lb, Ob) = a, b
    m = np.maximum(ma, mb)
    wa, wb = np.exp(ma - m), np.exp(mb - m)
    return m, wa * la + wb * lb, wa[:, None] * Oa + wb[:, None] * Ob


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", [
    (merge_inverted, "exp(m_new - m_old)"),
    (merge_no_rescale_O, "rescaled l but not O"),
    (merge_keeps_a, "you kept m_a"),
    (lambda a, b: tuple(x + y for x, y in zip(a, b)), "The merged max is m = max(m_a, m_b)"),
    (merge_no_guard, "neither state has seen a key"),
])
def test_merge_names_the_mistake(fn, expected, seed):
    with np.errstate(all="ignore"), pytest.raises(ExerciseError) as info:
        check_merge(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


def fa2_lse_is_max(Q_i, K, V, Bc, scale):
    Br, d = Q_i.shape
    m, l, O = np.full(Br, -np.inf), np.zeros(Br), np.zeros((Br, d))
    for j in range(0, K.shape[0], Bc):
        m, l, O = online_update(m, l, O, Q_i @ K[j:j + Bc].T * scale, V[j:j + Bc])
    return O / l[:, None], m


def fa2_unnormalised(Q_i, K, V, Bc, scale):
    Br, d = Q_i.shape
    m, l, O = np.full(Br, -np.inf), np.zeros(Br), np.zeros((Br, d))
    for j in range(0, K.shape[0], Bc):
        m, l, O = online_update(m, l, O, Q_i @ K[j:j + Bc].T * scale, V[j:j + Bc])
    return O


FA2_MISTAKES = [
    (lambda *a: fa2_tile(*a, update=update_inverted), "exp(m_new - m_old)"),
    (lambda *a: fa2_tile(*a, update=update_forgets_max), "forgets the previous max"),
    (lambda *a: fa2_tile(*a, update=update_no_rescale_O), "forgot to rescale O"),
    (lambda *a: fa2_tile(*a, divide_inside=True), "divided O_i by l_i inside the loop"),
    (lambda *a: fa2_tile(*a, stop=lambda Nk, Bc: (Nk // Bc) * Bc), "attention over only the first"),  # drops the tail
    (lambda *a: fa2_tile(*a, stop=lambda Nk, Bc: Nk - Bc), "attention over only the first"),  # one block early
    (lambda *a: fa2_tile(*a, width=a[3] + 1), "overlap by one key"),
    (fa2_lse_is_max, "lse is the running max"),
    (lambda *a: (fa2_unnormalised(*a), fa2_tile(*a)[1]), "never divided O_i by l_i"),
    (lambda Q, K, V, Bc, scale: fa2_tile(Q, K, V, Bc, 1.0), "forgot to multiply the scores by `scale`"),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", FA2_MISTAKES, ids=[e[:24] for _, e in FA2_MISTAKES])
def test_fa2_tile_names_the_mistake(fn, expected, seed):
    with np.errstate(all="ignore"), pytest.raises(ExerciseError) as info:
        check_fa2_tile(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


SKIP_MISTAKES = [
    (lambda *a: skip_tile(*a, offset=0), "top-left"),
    (lambda *a: skip_tile(*a, last_row=lambda i0, i1: i1), "i1 is an exclusive end"),
    (lambda *a: skip_tile(*a, last_row=lambda i0, i1: i0), "LAST row"),
    (lambda i0, i1, j0, j1, Nq, Nk, w: skip_tile(i0, i1, j0, j1, Nq, Nk, (-1, w[1])), "left of a sliding window"),
    (lambda *a: int(skip_tile(*a)), "return True or False"),
    (lambda i0, i1, j0, j1, Nq, Nk, w: skip_tile(i0, i1, j0, j1, Nq, Nk, w) and (i0 + j0) % 5 != 3, "every key in it is hidden"),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", SKIP_MISTAKES, ids=[e[:20] for _, e in SKIP_MISTAKES])
def test_skip_tile_names_the_mistake(fn, expected, seed):
    with pytest.raises(ExerciseError) as info:
        check_skip_tile(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", [
    (lambda M, d: (min(M // (4 * d), d), M // (4 * d)), "rounded M / 4d down"),
    (lambda M, d: (min(max(1, M // (4 * d)), d), max(1, M // (4 * d))), "rounded M / 4d down"),
    (lambda M, d: block_sizes(M, d)[::-1], "returned (Bc, Br)"),
    (lambda M, d: (min(math.ceil(M / d), d), math.ceil(M / d)), "forgot the 4"),
    (lambda M, d: (block_sizes(M, d)[1],) * 2, "Br = min(Bc, d), not Bc"),
    (lambda M, d: tuple(float(x) for x in block_sizes(M, d)), "return ints"),
])
def test_block_sizes_names_the_mistake(fn, expected, seed):
    with pytest.raises(ExerciseError) as info:
        check_block_sizes(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", [
    (lambda B, H, Nq, Nk, d, s: B * H * s * (2 * Nq * d + 2 * Nk * d + 4 * Nq * Nq), "not Nq x Nq"),
    (lambda B, H, Nq, Nk, d, s: B * H * s * (4 * Nq * d + 4 * Nq * Nq), "one N for everything"),
    (lambda B, H, Nq, Nk, d, s: B * H * (2 * Nq * d + 2 * Nk * d + 4 * Nq * Nk), "counted elements, not bytes"),
    (lambda B, H, Nq, Nk, d, s: s * (2 * Nq * d + 2 * Nk * d + 4 * Nq * Nk), "multiply by B * H"),
    (lambda B, H, Nq, Nk, d, s: B * H * s * (2 * Nq * d + 2 * Nk * d + 2 * Nq * Nk), "you counted 2"),
    (lambda B, H, Nq, Nk, d, s: B * H * s * (Nq * d + 2 * Nk * d + 2 * Nq * Nk), "reads only"),
    (lambda B, H, Nq, Nk, d, s: float(hbm_bytes_standard(B, H, Nq, Nk, d, s)) + 0.5, "whole number"),
    (lambda B, H, Nq, Nk, d, s: float("nan"), "return a number of bytes"),
    (lambda B, H, Nq, Nk, d, s: hbm_bytes_standard(B, H, Nq, Nk, d, s) + 1, "expected"),
])
def test_hbm_traffic_names_the_mistake(fn, expected, seed):
    with pytest.raises(ExerciseError) as info:
        check_hbm_traffic(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


def test_hbm_traffic_accepts_a_float_count(capsys):
    check_hbm_traffic(lambda *a: float(hbm_bytes_standard(*a)), seed=0)


def test_traffic_convention_matches_the_io_model():
    """The exercise's convention (this file's solution, which the checker accepts) is the same count as
    flashkit.measure.io_model's standard attention (elements x itemsize)."""
    io_model = pytest.importorskip("flashkit.measure.io_model")

    for Nq, Nk, d in ((3, 5, 7), (512, 512, 64), (1, 4096, 128)):
        assert hbm_bytes_standard(2, 3, Nq, Nk, d, 2) == 2 * 3 * 2 * io_model.standard_io(Nq, d, Nk).total


def test_membench_small_sweep():
    from flashkit.exercises import membench

    result = membench.sweep(min_bytes=16 * 1024, max_bytes=64 * 1024, per_octave=1, target_bytes=1 << 20, repeats=1)
    assert result["bytes"] == [16384, 32768, 65536]
    assert all(np.isfinite(g) and g > 0 for g in result["GBps"])
    caches = {"L1d": 32 * 1024, "L2": 1 << 20}
    fake = {"bytes": [8 << 10, 16 << 10, 256 << 10, 512 << 10, 8 << 20], "GBps": [100.0, 90.0, 50.0, 40.0, 10.0]}
    assert membench.level_bandwidths(fake, caches) == {"L1d": 95.0, "L2": 45.0, "DRAM": 10.0}
    assert membench.tile_bytes(64, 256, 64) == 4 * 64 * (2 * 64 + 2 * 256)
    assert membench.working_sets(16 << 10, 64 << 10, 2) == [16384, 23168, 32768, 46336, 65536]
    with pytest.raises(ValueError, match="min_bytes"):
        membench.sweep(min_bytes=0)


# ------------------------------------------------------------------ wrong answers a learner wrote,
# each in its own words, not the checker's: the checker must name the mistake by property.
def softmax_minus_min(x):  # right algebra on narrow rows: any constant may be subtracted
    c = x.min(axis=-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(c), c, 0.0))
    s = e.sum(axis=-1, keepdims=True)
    return np.where(s > 0, e / np.where(s > 0, s, 1.0), 0.0)


def softmax_minus_mean(x):
    e = np.exp(x - np.mean(x, axis=1)[:, None])
    return e / np.sum(e, axis=1)[:, None]


def softmax_float32(x):
    return softmax(x.astype(np.float32)).astype(np.float64)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", [
    (softmax_minus_min, "row MINIMUM"),
    (softmax_minus_mean, "row MEAN"),
    (softmax_float32, "your maths ran in float32"),
], ids=["min", "mean", "float32"])
def test_safe_softmax_names_the_learners_mistake(fn, expected, seed):
    with np.errstate(all="ignore"), pytest.raises(ExerciseError) as info:
        check_safe_softmax(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


def test_merge_rejects_a_state_modified_in_place():
    def merge_into_a(state_a, state_b):  # "saves memory" by writing the result into state a's arrays
        m_a, l_a, O_a = state_a
        m, l, O = merge(state_a, state_b)
        m_a[:], l_a[:], O_a[:] = m, l, O
        return m_a, l_a, O_a

    for seed in SEEDS:
        with np.errstate(all="ignore"), pytest.raises(ExerciseError, match=r"modified its argument #1 in place"):
            check_merge(merge_into_a, seed=seed)


def hbm_int32(B, H, Nq, Nk, d, itemsize):  # an int32 array of the sizes: numpy keeps int32 arithmetic
    B, H, Nq, Nk, d, itemsize = np.array([B, H, Nq, Nk, d, itemsize], dtype=np.int32)
    with np.errstate(over="ignore"):
        return int(B * H * itemsize * (2 * Nq * d + 2 * Nk * d + 4 * Nq * Nk))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", [
    (hbm_int32, "wrapped around 2**32"),
    (lambda *a: float(np.float32(hbm_bytes_standard(*a))), "rounded to float32"),
], ids=["int32", "float32"])
def test_hbm_traffic_names_number_type_mistakes(fn, expected, seed):
    with pytest.raises(ExerciseError) as info:
        check_hbm_traffic(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


def fa2_written(Q_i, K, V, Bc, scale, starts=None, alpha=None, fa1_inside=False, lse_base=math.e, dtype=None):
    """A learner's FA2 loop with the knobs their mistakes turn: which blocks, the rescale factor, an
    FA1-style normalisation inside the loop (kept with the division at the end), the log's base."""
    if dtype is not None:
        Q_i, K, V = Q_i.astype(dtype), K.astype(dtype), V.astype(dtype)
    Nk = K.shape[0]
    m = np.full(Q_i.shape[0], -np.inf, Q_i.dtype)
    l = np.zeros(Q_i.shape[0], Q_i.dtype)
    O = np.zeros_like(Q_i)
    for j in (range(0, Nk, Bc) if starts is None else starts(Nk, Bc)):
        S = (Q_i @ K[j:j + Bc].T) * Q_i.dtype.type(scale)
        m_new = np.maximum(m, S.max(axis=1))
        P = np.exp(S - m_new[:, None])
        a = np.exp(m - m_new) if alpha is None else alpha(m, m_new)
        l_new = a * l + P.sum(axis=1)
        if fa1_inside:
            O = ((a * l)[:, None] * O + P @ V[j:j + Bc]) / l_new[:, None]
        else:
            O = a[:, None] * O + P @ V[j:j + Bc]
        m, l = m_new, l_new
    lse = m / math.log(lse_base) + np.log(l) / math.log(lse_base)
    return (O / l[:, None]).astype(np.float64), lse.astype(np.float64)


FA2_LEARNER_MISTAKES = [
    # exp(m_new - m_old), guarded against m_old = -inf so that it is never NaN
    (lambda *a: fa2_written(*a, alpha=lambda m, mn: np.where(np.isneginf(m), 0.0, np.exp(mn - np.where(np.isneginf(m), 0, m)))),
     "earlier blocks grow instead of shrinking"),
    (lambda *a: fa2_written(*a, fa1_inside=True), "divided by l_i twice"),
    (lambda *a: fa2_written(*a, starts=lambda Nk, Bc: list(range(0, Nk - Bc, Bc)) + [max(Nk - Bc, 0)]), "counted twice"),
    (lambda *a: fa2_written(*a, lse_base=2.0), "lse is in base 2"),
    (lambda *a: fa2_written(*a, dtype=np.float32), "your maths ran in float32"),
    (lambda *a: fa2_written(*a, alpha=lambda m, mn: np.where(np.isneginf(m), 0.0, 1.0)), "never rescale l"),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", FA2_LEARNER_MISTAKES, ids=[e[:24] for _, e in FA2_LEARNER_MISTAKES])
def test_fa2_tile_names_the_learners_mistake_by_property(fn, expected, seed):
    with np.errstate(all="ignore"), pytest.raises(ExerciseError) as info:
        check_fa2_tile(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


def test_a_failed_check_shows_the_verdict_not_flashkit_internals(capsys):
    """In IPython (a notebook) the verdict is shown without the frames inside flashkit; a crash in the
    learner's own function still shows the learner's line."""
    shell = pytest.importorskip("IPython.core.interactiveshell").InteractiveShell.instance()
    shell.user_ns.update(check_online_update=check_online_update, update_inverted=update_inverted, np=np)
    shell.run_cell("with np.errstate(all='ignore'): check_online_update(update_inverted, seed=0)")
    shown = capsys.readouterr().out
    assert "exp(m_new - m_old)" in shown and "ExerciseError" in shown, shown
    assert "flashkit/exercises" not in shown and "File " not in shown, shown
    assert len(shown.strip().splitlines()) <= 4, shown

    shell.run_cell("def broken(m, l, O, S, V):\n    return m, l, O @ S\n\ncheck_online_update(broken, seed=0)")
    shown = capsys.readouterr().out
    assert "return m, l, O @ S" in shown and "ValueError" in shown, shown
    assert "flashkit/exercises" not in shown, shown


def test_the_answers_are_not_offered_by_tab_completion():
    import flashkit.exercises.softmax as softmax_checks
    import flashkit.exercises.tiles as tiles_checks
    import flashkit.exercises.traffic as traffic_checks

    for module in (softmax_checks, tiles_checks, traffic_checks):
        assert all(name.startswith("check_") or name == "ExerciseError" for name in dir(module)), dir(module)
    with pytest.raises(ImportError):
        from flashkit.exercises.traffic import standard_attention_hbm_bytes  # noqa: F401  (the old public name)
