"""Checkers for grouped-query attention and one decoding step with a KV cache (exercise 7, after
notebooks 09 and 10).

Task signatures:
    kv_head(h, H, H_kv) -> int               the K/V head query head h reads; H % H_kv == 0, groups of
                                             H // H_kv consecutive query heads share one K/V head
    decode_step(q, k_new, v_new, K_cache, V_cache, length, scale) -> O
        q (H, d): the new token's queries; k_new, v_new (H_kv, d): its key and value;
        K_cache, V_cache (H_kv, max_len, d): rows [0, length) hold the earlier tokens, the rest zeros.
        Writes k_new, v_new into row `length` of the caches (in place: that is what a cache is for),
        then returns O (H, d): each query head attends to rows [0, length] (the new token included)
        of its K/V head.
The references are flashkit's own (flashkit.reference on the filled rows); flashkit.attention_decode
runs the same step on a KVCache.
"""
from __future__ import annotations

import numbers

import numpy as np

from flashkit.exercises.checking import (ExerciseError, as_arrays, call, check_shapes, close, diagnose, exp_diff,
                                         fail, first_mismatches, new_rng, passed)

# ---------------------------------------------------------------- task: the GQA head mapping
_SHAPES = ((8, 2), (8, 8), (8, 1), (12, 4), (6, 3), (32, 8), (16, 2))


def _kv_head(h, H, H_kv):
    return h // (H // H_kv)  # groups of consecutive query heads, as flashkit, Llama and torch's SDPA


def _mapping_variants():
    return [
        ("you interleaved the heads (h % H_kv): query heads 0, H_kv, 2 H_kv, ... would share a K/V head. "
         "The group is consecutive: heads 0..g-1 read K/V head 0, g..2g-1 head 1, with g = H // H_kv, "
         "so kv_head = h // g (the layout of flashkit, Llama and torch's enable_gqa)", lambda h, H, Hk: h % Hk),
        ("you divided by H_kv; divide by the group size g = H // H_kv (queries per K/V head): "
         "kv_head = h // (H // H_kv)", lambda h, H, Hk: h // Hk),
        ("every query head reads its own K/V head (multi-head attention); with H_kv < H, a group of "
         "g = H // H_kv query heads shares one: kv_head = h // g", lambda h, H, Hk: h),
        ("your heads are off by one: head 0 reads K/V head 0, so kv_head = h // g, not h // g + 1",
         lambda h, H, Hk: h // (H // Hk) + 1),
    ]


def check_kv_head(kv_head, *, seed=None) -> None:
    """Check `kv_head(h, H, H_kv) -> int` on every head of several (H, H_kv) pairs."""
    task = "GQA head mapping"
    got = {}
    for H, H_kv in _SHAPES:
        for h in range(H):
            value = call(task, kv_head, h, H, H_kv)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                if isinstance(value, float) and value.is_integer():
                    fail(task, f"kv_head({h}, {H}, {H_kv}) returned {value!r}, a float: an index is an int (use //, "
                               "not /, which gives a float).")
                fail(task, f"kv_head({h}, {H}, {H_kv}) returned {value!r}; return an int, the K/V head's index.")
            got[h, H, H_kv] = int(value)
    if all(v == _kv_head(*k) for k, v in got.items()):
        return passed(task, f"right on every head of {len(_SHAPES)} (H, H_kv) pairs, MHA (H_kv = H) and MQA "
                            "(H_kv = 1) included")
    for message, variant in _mapping_variants():
        if all(v == variant(*k) for k, v in got.items()):
            fail(task, message + ".")
    (h, H, H_kv), v = next((k, v) for k, v in got.items() if v != _kv_head(*k))
    if not 0 <= v < H_kv:
        fail(task, f"kv_head({h}, {H}, {H_kv}) = {v} is not a K/V head (0..{H_kv - 1}).")
    fail(task, f"kv_head({h}, {H}, {H_kv}) should be {_kv_head(h, H, H_kv)}, got {v}: with g = H // H_kv = "
               f"{H // H_kv} query heads per K/V head, heads {0}..{H // H_kv - 1} read K/V head 0.")


# ---------------------------------------------------------------- task: one decoding step
def _step(q, K, V, length, scale, *, kv=_kv_head, rows=None, use_scale=True, normalise=True):
    """O (H, d) of one decoding step on caches K, V that already hold the new token at row `length`."""
    H, d = q.shape
    H_kv = K.shape[0]
    n = length + 1 if rows is None else rows
    O = np.zeros((H, d))
    with np.errstate(all="ignore"):
        for h in range(H):
            Kh, Vh = K[kv(h, H, H_kv), :n], V[kv(h, H, H_kv), :n]
            s = Kh @ q[h] * (scale if use_scale else 1.0)
            p = exp_diff(s, s.max()) if n else s
            O[h] = (p / p.sum() if normalise else p) @ Vh
    return O


def _decode_cases(rng):
    """(name, H, H_kv, d, max_len, length): GQA, MHA, MQA, an empty cache, the last free row."""
    return [(f"H={H}, H_kv={Hk}, d={d}, max_len={L}, length={n}" + note, H, Hk, d, L, n)
            for H, Hk, d, L, n, note in ((8, 2, 4, 16, 5, " (GQA, groups of 4)"), (4, 4, 3, 12, 7, " (MHA)"),
                                         (6, 1, 5, 10, 9, " (MQA; the last free row)"),
                                         (4, 2, 4, 8, 0, " (an empty cache: the first token)"),
                                         (6, 3, 2, 20, 11, " (GQA, groups of 2)"))]


def check_decode_step(decode_step, *, seed=None) -> None:
    """Check `decode_step(q, k_new, v_new, K_cache, V_cache, length, scale) -> O`."""
    task = "a decoding step with a KV cache"
    rng, seed = new_rng(seed)
    name = getattr(decode_step, "__name__", "your function")
    for case, H, H_kv, d, max_len, length in _decode_cases(rng):
        scale = 1.0 / np.sqrt(d)
        q = rng.standard_normal((H, d)) * 2
        k_new, v_new = rng.standard_normal((H_kv, d)) * 2, rng.standard_normal((H_kv, d))
        K_cache, V_cache = np.zeros((H_kv, max_len, d)), np.zeros((H_kv, max_len, d))
        K_cache[:, :length] = rng.standard_normal((H_kv, length, d)) * 2
        V_cache[:, :length] = rng.standard_normal((H_kv, length, d))
        K_want, V_want = K_cache.copy(), V_cache.copy()
        K_want[:, length], V_want[:, length] = k_new, v_new

        def step(q, k_new, v_new):  # the caches are the learner's to write; q, k_new, v_new are not
            return decode_step(q, k_new, v_new, K_cache, V_cache, length, scale)
        step.__name__ = name
        (got,) = as_arrays(task, call(task, step, q, k_new, v_new), ["O"])

        # The cache first: a step that does not store its token breaks every later step.
        for cache, want, label, new in ((K_cache, K_want, "K_cache", k_new), (V_cache, V_want, "V_cache", v_new)):
            if np.array_equal(cache, want):
                continue
            where = [r for r in range(max_len) if np.array_equal(cache[:, r], new)]
            if where and where[0] != length:
                fail(task, f"on {case}: you wrote the new token into row {where[0]} of {label}; rows 0..{length - 1} "
                           f"hold the earlier tokens, so the new one goes at row length = {length} "
                           f"({label}[:, length] = ...), an off-by-one.", seed)
            if np.array_equal(cache[:, :length], want[:, :length]) and not where:
                fail(task, f"on {case}: {label} was not updated: write the new token into row `length` "
                           f"({label}[:, length] = {'k_new' if label == 'K_cache' else 'v_new'}), in place, so the next "
                           "step sees it.", seed)
            fail(task, f"on {case}: {label} changed where it should not: only row `length` is written, the "
                       "earlier tokens' rows stay as they are.", seed)

        want = _step(q, K_want, V_want, length, scale)
        check_shapes(task, [got], [want], ["O"])
        if close(got, want):
            continue
        named = diagnose(got, [
            ("the new token does not attend to itself: it sees rows 0..length (length + 1 keys, itself included), "
             "not 0..length-1", lambda: _step(q, K_want, V_want, length, scale, rows=length)),
            ("you attended to the whole cache, the zero rows beyond `length` included: those rows hold no token "
             "yet (a zero key still gets exp(0 - m) weight); use K_cache[g, :length + 1]",
             lambda: _step(q, K_want, V_want, length, scale, rows=max_len)),
            ("your new token sees only the first key: that is a top-left causal mask (query 0 sees key 0). A new "
             "token is the LAST position: it sees every key in the cache (bottom-right alignment)",
             lambda: _step(q, K_want, V_want, length, scale, rows=1)),
            ("you interleaved the heads (h % H_kv): a group of g = H // H_kv consecutive query heads shares one "
             "K/V head, kv_head = h // g", lambda: _step(q, K_want, V_want, length, scale, kv=lambda h, H, Hk: h % Hk)),
            ("you forgot the scale: s = K q * scale", lambda: _step(q, K_want, V_want, length, scale, use_scale=False)),
            ("the weights are not normalised: divide exp(s - max) by its sum",
             lambda: _step(q, K_want, V_want, length, scale, normalise=False)),
        ])
        if named:
            fail(task, f"on {case}: {named}.", seed)
        bad = [h for h in range(H) if not close(got[h], want[h])]
        fail(task, f"on {case}: O wrong for query heads {bad}; {first_mismatches(got, want)}.", seed)
    return passed(task, "right on GQA, MHA and MQA caches, an empty cache and the last free row; every token stored "
                        "at row `length`")


__all__ = ["check_kv_head", "check_decode_step", "ExerciseError"]


def __dir__():
    # Tab completion (dir) shows the checkers only, not the answers they compare with.
    return __all__
