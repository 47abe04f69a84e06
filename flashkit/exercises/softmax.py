"""Checkers for the softmax tasks: safe softmax, one online-softmax update of (m, l, O), merging two
partial states. The references are flashkit.online_softmax's own functions.

Task signatures (float64 NumPy arrays; leading "rows" axis = query rows):
    softmax(x)                        x (rows, n) -> (rows, n); a row of all -inf gives zeros
    online_update(m, l, O, S, V)      m, l (rows,), O (rows, d), S (rows, Bc), V (Bc, d) -> (m, l, O)
    merge(state_a, state_b)           each state (m, l, O) over disjoint keys -> (m, l, O)
"""
from __future__ import annotations

import numpy as np

from flashkit import online_softmax
from flashkit.exercises.checking import (ExerciseError, all_close, as_arrays, call, check_shapes, close, diagnose,
                                         exp_diff, fail, first_mismatches, new_rng, passed)

STATE = ("m", "l", "O")
NO_KEY_HINT = ("exp(-inf - (-inf)) is NaN: where the max is -inf (nothing seen yet), treat exp(s - m) as 0, "
               "e.g. subtract np.where(np.isneginf(m), 0, m) instead of m")


# ---------------------------------------------------------------- safe softmax
WIDE = "rows whose scores spread from -1000 to +1000"
def _softmax_variants(x):
    """The classic wrong softmaxes, each one mistake away from flashkit.online_softmax.softmax_safe."""
    with np.errstate(all="ignore"):
        def naive():
            e = np.exp(x)
            return e / e.sum(axis=-1, keepdims=True)

        def global_max():
            e = exp_diff(x, x[np.isfinite(x)].max()) if np.isfinite(x).any() else np.exp(x - x.max())
            s = e.sum(axis=-1, keepdims=True)
            return e / s

        def wrong_axis():
            e = exp_diff(x, x.max(axis=0, keepdims=True))
            return e / e.sum(axis=0, keepdims=True)

        def unnormalised():
            return exp_diff(x, x.max(axis=-1, keepdims=True))

        def no_guard():  # right everywhere except rows of all -inf, which become NaN
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)

        def no_guard_zero_row():  # the max guarded, the division not: 0 / 0
            m = x.max(axis=-1, keepdims=True)
            e = exp_diff(x, np.where(np.isneginf(m), 0.0, m))
            return e / e.sum(axis=-1, keepdims=True)

        def shifted_by(c):  # exp(x - c) / sum with c the row min or mean: exact algebra, overflows on wide rows
            e = np.exp(x - c)
            return e / e.sum(axis=-1, keepdims=True)

        # The no-key variants first: on inputs without an all -inf row they equal the right answer, so
        # they can only match where that row is the one mistake (the naive softmax also fails there).
        # The min and mean before the naive one: on a wide row whose mean is near 0 they overflow where it does.
        computed = [(msg, f()) for msg, f in (
            ("a row whose scores are all -inf (a query that sees no key) must give zeros, not NaN: "
             + NO_KEY_HINT + ", and divide only where the row sum is > 0", no_guard),
            ("a row whose scores are all -inf (a query that sees no key) must give zeros, not NaN: its row "
             "sum is 0, so 0 / 0 = NaN; divide only where the sum is > 0 (np.where)", no_guard_zero_row),
            ("you subtracted the row MINIMUM; subtract the row max: the algebra allows any constant, but only "
             "the max keeps every exponent <= 0. On a row spread from -1000 to +1000, x - min reaches 2000 and exp "
             "overflows to inf", lambda: shifted_by(x.min(axis=-1, keepdims=True))),
            ("you subtracted the row MEAN; subtract the row max: the algebra allows any constant, but only the max "
             "keeps every exponent <= 0. On a row spread from -1000 to +1000, x - mean reaches about 1000 and exp "
             "overflows to inf", lambda: shifted_by(x.mean(axis=-1, keepdims=True))),
            ("exp(x) overflows to inf (inf / inf = NaN) for large scores and underflows to 0 (0 / 0 = NaN) "
             "for very negative ones: subtract the row max before exp (this is the naive softmax)", naive),
            ("you subtracted the max of the WHOLE array; use the max of each row (x.max(axis=-1, keepdims=True)): "
             "rows far below the global max underflow to 0 / 0 = NaN", global_max),
            ("you normalised over the wrong axis: each ROW must sum to 1 (axis=-1)", wrong_axis),
            ("the rows do not sum to 1: divide exp(x - m) by its row sum", unnormalised),
        )]
    return computed


def _softmax_cases(rng):
    """(name, x): ordinary rows, huge and tiny logits, and masked rows including one that sees nothing."""
    ordinary = rng.standard_normal((5, 13)) * 3
    large = rng.standard_normal((4, 9)) + np.array([[0.0], [1000.0], [-1000.0], [89.0]])
    masked = rng.standard_normal((4, 11)) * 2
    hide = rng.random((4, 11)) < 0.4
    hide[:, 0] = False  # rows 0..2 keep at least one visible score
    hide[3] = True  # row 3: a query that sees no key
    masked[hide] = -np.inf
    # Rows spread from -1000 to +1000: exp(x - c) overflows for any c but (nearly) the max, so a
    # softmax that subtracts the min or the mean (right on narrow rows) fails here on every seed.
    wide = rng.uniform(-1000.0, 1000.0, (4, 10))
    wide[:, 0], wide[:, 1] = 1000.0, -1000.0
    wide = rng.permuted(wide, axis=1)
    return [("ordinary scores, 5 rows x 13", ordinary),
            ("scores near +1000 and -1000 (rows 1, 2)", large),
            (WIDE, wide),
            ("-inf scores (masked keys), row 3 entirely -inf", masked)]


def check_safe_softmax(softmax, *, seed=None) -> None:
    """Check `softmax(x)`: safe softmax over the last axis of a (rows, n) float64 array."""
    task = "safe softmax"
    rng, seed = new_rng(seed)
    for case, x in _softmax_cases(rng):
        want = online_softmax.softmax_safe(x)
        (got,) = as_arrays(task, call(task, softmax, x.copy()), ["softmax(x)"])
        check_shapes(task, [got], [want], ["softmax(x)"])
        if close(got, want):
            continue
        named = diagnose(got, _softmax_variants(x))
        if named:
            fail(task, f"on {case}: {named}.", seed)
        if case == WIDE and not np.isfinite(got).all():
            # Right on the narrow rows (they came first), overflowing on the wide ones: by property, the
            # constant subtracted was not the row max, whatever it was.
            fail(task, f"on {case}: inf or NaN, though the narrow rows before were right: you subtract a constant "
                       "that is not the row max, so exp(x - c) overflows where x - c > 709.78. Subtract "
                       "x.max(axis=-1, keepdims=True).", seed)
        if np.isnan(got).any():
            r = int(np.argwhere(np.isnan(got))[0, 0])
            fail(task, f"on {case}: NaN in row {r} (row max {np.max(x[r]):.4g}). Guard every exp and every division.", seed)
        fail(task, f"on {case}: wrong values {first_mismatches(got, want)}.", seed)
    return passed(task, "matches flashkit.online_softmax.softmax_safe on ordinary, huge (+-1000), widely spread "
                        "and fully masked rows")


# ---------------------------------------------------------------- one online-softmax update
def _update_variants(m, l, O, S, V):
    """Known-wrong updates, each one mistake away from flashkit.online_softmax.update."""
    def parts(m_new, p_ref):
        return exp_diff(S, p_ref[:, None]), exp_diff(m, m_new)

    m_new = np.maximum(m, S.max(axis=1))
    P, alpha = parts(m_new, m_new)
    out = []
    with np.errstate(all="ignore"):
        inv = np.exp(m_new - m)
        out.append(("you rescale the old state with exp(m_new - m_old); it must be exp(m_old - m_new). "
                    "The max only grows, so the factor is <= 1: old terms shrink to the new max's scale",
                    (m_new, inv * l + P.sum(1), inv[:, None] * O + P @ V)))
        mf = S.max(axis=1)
        Pf, af = parts(mf, mf)
        out.append(("your running max forgets the previous max: m_new = max(m_old, rowmax(S)), not rowmax(S)",
                    (mf, af * l + Pf.sum(1), af[:, None] * O + Pf @ V)))
        out.append(("you never rescale the old l and O: multiply both by exp(m_old - m_new) before adding the block",
                    (m_new, l + P.sum(1), O + P @ V)))
        out.append(("you rescaled l but forgot to rescale O: O_new = exp(m_old - m_new) * O + P V",
                    (m_new, alpha * l + P.sum(1), O + P @ V)))
        out.append(("you rescaled O but forgot to rescale l: l_new = exp(m_old - m_new) * l + rowsum(P)",
                    (m_new, l + P.sum(1), alpha[:, None] * O + P @ V)))
        l_new = alpha * l + P.sum(1)
        out.append(("you divided O by l inside the update. Keep O un-normalised (a running sum of exp(s - m) v) "
                    "and divide by l once, after the last block (finalize)",
                    (m_new, l_new, (alpha[:, None] * O + P @ V) / l_new[:, None])))
        Po = exp_diff(S, m[:, None])
        out.append(("P must use the NEW max: P = exp(S - m_new), not exp(S - m_old)",
                    (m_new, alpha * l + Po.sum(1), alpha[:, None] * O + Po @ V)))
        mb = S.max(axis=1)
        Pb = exp_diff(S, mb[:, None])
        out.append(("P = exp(S - rowmax(S)) is scaled to the block's own max: use P = exp(S - m_new) "
                    "(or rescale it by exp(rowmax(S) - m_new))",
                    (m_new, alpha * l + Pb.sum(1), alpha[:, None] * O + Pb @ V)))
    return out


def _update_cases(rng):
    """(name, (m, l, O, S, V)) for two cases whose rows are built so every classic mistake shows."""
    Br, Bc0, Bc, d = 5, 6, 7, 3
    S0 = rng.standard_normal((Br, Bc0))
    V0 = rng.standard_normal((Bc0, d))
    m, l, O = online_softmax.update(online_softmax.init(Br, d), S0, V0)
    S = rng.standard_normal((Br, Bc))
    S[:2] += 4.0   # rows 0, 1: the new block raises the max (rescaling matters)
    S[2:4] -= 4.0  # rows 2, 3: the old max stays (forgetting it matters)
    S[4, 0] = m[4] + 1.0  # row 4: mixed
    second = ("a second block (the max rises in rows 0-1, stays in rows 2-3)", (m, l, O, S, rng.standard_normal((Bc, d))))

    # Masks. Row 0 has seen nothing and sees nothing now; row 1 has seen nothing and sees keys now;
    # row 2 has seen keys and this block hides all of them; rows 3, 4 partially masked.
    S0 = rng.standard_normal((Br, Bc0))
    S0[:2] = -np.inf
    m, l, O = online_softmax.update(online_softmax.init(Br, d), S0, V0)
    S = rng.standard_normal((Br, Bc))
    S[0] = -np.inf
    S[2] = -np.inf
    S[3:, ::2] = -np.inf
    masked = ("masked keys (-inf in S); row 0 has seen no key before or now, row 2's block is all -inf",
              (m, l, O, S, rng.standard_normal((Bc, d))))
    return [second, masked]


def _row_story(m, S, r):
    seen = "has seen no key yet (m = -inf)" if np.isneginf(m[r]) else "has seen keys"
    now = "this block hides every key (all -inf)" if np.isneginf(S[r]).all() else "this block has visible keys"
    return f"row {r} {seen} and {now}"


def check_online_update(online_update, *, seed=None) -> None:
    """Check `online_update(m, l, O, S, V) -> (m_new, l_new, O_new)` against flashkit.online_softmax.update."""
    task = "online-softmax update"
    rng, seed = new_rng(seed)
    for case, args in _update_cases(rng):
        m, l, O, S, V = args
        want = tuple(online_softmax.update(online_softmax.State(m, l, O), S, V))
        got = as_arrays(task, call(task, online_update, *[a.copy() for a in args]), STATE)
        check_shapes(task, got, want, STATE)
        if all_close(got, want):
            continue
        named = diagnose(got, _update_variants(m, l, O, S, V))
        if named:
            fail(task, f"on {case}: {named}.", seed)
        nan_rows = sorted({int(i[0]) for g in got for i in np.argwhere(np.isnan(g))})
        if nan_rows:
            r = nan_rows[0]
            fail(task, f"on {case}: NaN in row {r}, where {_row_story(m, S, r)}. {NO_KEY_HINT}.", seed)
        wrong = [n for n, g, w in zip(STATE, got, want) if not close(g, w)]
        n = wrong[0]
        i = STATE.index(n)
        rule = " The running max is m_new = max(m_old, rowmax(S))." if "m" in wrong else ""
        fail(task, f"on {case}: {', '.join(wrong)} wrong ({', '.join(x for x in STATE if x not in wrong) or 'nothing'} right); "
                   f"{n}: {first_mismatches(got[i], want[i])}.{rule}", seed)
    return passed(task, "matches flashkit.online_softmax.update on a second block and on masked rows")


# ---------------------------------------------------------------- merging two partial states
def _merge_variants(a, b):
    (ma, la, Oa), (mb, lb, Ob) = a, b
    m = np.maximum(ma, mb)
    wa, wb = exp_diff(ma, m), exp_diff(mb, m)
    out = []
    with np.errstate(all="ignore"):
        ia, ib = np.exp(m - ma), np.exp(m - mb)
        out.append(("you rescale each state with exp(m_new - m_old); it must be exp(m_old - m_new), "
                    "i.e. exp(m_a - m) and exp(m_b - m) with m = max(m_a, m_b): factors <= 1",
                    (m, ia * la + ib * lb, ia[:, None] * Oa + ib[:, None] * Ob)))
    out.append(("you added the two states without rescaling them to the common max m = max(m_a, m_b)",
                (m, la + lb, Oa + Ob)))
    out.append(("you rescaled l but not O: O = exp(m_a - m) O_a + exp(m_b - m) O_b",
                (m, wa * la + wb * lb, Oa + Ob)))
    out.append(("you rescaled O but not l: l = exp(m_a - m) l_a + exp(m_b - m) l_b",
                (m, la + lb, wa[:, None] * Oa + wb[:, None] * Ob)))
    for name, mm in (("m_a", ma), ("m_b", mb)):
        xa, xb = exp_diff(ma, mm), exp_diff(mb, mm)
        out.append((f"the merged max must be max(m_a, m_b); you kept {name}",
                    (mm, xa * la + xb * lb, xa[:, None] * Oa + xb[:, None] * Ob)))
    out.append(("averaging the two states is not merging: weight each by exp(m_x - m) (their l carries the weight)",
                (m, (wa * la + wb * lb), (Oa + Ob) / 2)))
    return out


def _merge_cases(rng):
    Br, d = 6, 4
    n_a, n_b = 5, 8
    Sa, Sb = rng.standard_normal((Br, n_a)), rng.standard_normal((Br, n_b))
    Sa[:3] += 3.0  # rows 0-2: state a holds the max; rows 3-5: state b does
    Sb[3:] += 3.0
    Va, Vb = rng.standard_normal((n_a, d)), rng.standard_normal((n_b, d))
    init = online_softmax.init(Br, d)
    plain = ("two states over 5 and 8 keys (a holds the max in rows 0-2, b in rows 3-5)",
             (tuple(online_softmax.update(init, Sa, Va)), tuple(online_softmax.update(init, Sb, Vb))))
    Sa, Sb = Sa.copy(), Sb.copy()
    Sa[0] = -np.inf  # row 0: a saw nothing
    Sb[1] = -np.inf  # row 1: b saw nothing
    Sa[2] = Sb[2] = -np.inf  # row 2: nobody saw anything
    empty = ("states where a row has seen no key (row 0 in a, row 1 in b, row 2 in both)",
             (tuple(online_softmax.update(init, Sa, Va)), tuple(online_softmax.update(init, Sb, Vb))))
    return [plain, empty]


def check_merge(merge, *, seed=None) -> None:
    """Check `merge(state_a, state_b) -> (m, l, O)` against flashkit.online_softmax.merge."""
    task = "merge two partial states"
    rng, seed = new_rng(seed)
    for case, (a, b) in _merge_cases(rng):
        want = tuple(online_softmax.merge([online_softmax.State(*a), online_softmax.State(*b)]))
        got = as_arrays(task, call(task, merge, tuple(x.copy() for x in a), tuple(x.copy() for x in b)), STATE)
        check_shapes(task, got, want, STATE)
        if all_close(got, want):
            continue
        named = diagnose(got, _merge_variants(a, b))
        if named:
            fail(task, f"on {case}: {named}.", seed)
        nan_rows = sorted({int(i[0]) for g in got for i in np.argwhere(np.isnan(g))})
        if nan_rows:
            r = nan_rows[0]
            who = {0: "state a has seen no key (m_a = -inf)", 1: "state b has seen no key (m_b = -inf)",
                   2: "neither state has seen a key"}.get(r, "")
            fail(task, f"on {case}: NaN in row {r}{', where ' + who if who else ''}. {NO_KEY_HINT}.", seed)
        wrong = [n for n, g, w in zip(STATE, got, want) if not close(g, w)]
        i = STATE.index(wrong[0])
        rule = " The merged max is m = max(m_a, m_b)." if "m" in wrong else ""
        fail(task, f"on {case}: {', '.join(wrong)} wrong; {wrong[0]}: {first_mismatches(got[i], want[i])}.{rule}", seed)
    return passed(task, "matches flashkit.online_softmax.merge, including rows where a state has seen no key")


__all__ = ["check_safe_softmax", "check_online_update", "check_merge", "ExerciseError"]


def __dir__():
    # Tab completion (dir) shows the checkers only, not the reference pieces they compare with.
    return __all__
