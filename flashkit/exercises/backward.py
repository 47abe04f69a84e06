"""Checkers for the backward tasks: the softmax's backward (dS from P and dP), then the whole backward of
attention for several heads with grouped K/V heads, P recomputed from the forward's logsumexp.

Task signatures (float64 NumPy arrays):
    softmax_backward(P, dP)                       P, dP (rows, n) -> dS (rows, n); each row of P a softmax
    attention_backward(Q, K, V, O, dO, lse, scale) Q, O, dO (Hq, Nq, d); K, V (Hkv, Nk, d); lse (Hq, Nq)
                                                  -> (dQ, dK, dV) shaped like Q, K, V; Hq % Hkv == 0 and
                                                  query head h reads K/V head h // (Hq // Hkv)
The references are flashkit's own: the standard backward of flashkit.reference (P and dP materialised,
P recomputed from lse) on the problem validate.check_backward builds.
"""
from __future__ import annotations

import numpy as np

from flashkit import validate
from flashkit.exercises.checking import (ExerciseError, all_close, as_arrays, call, check_shapes, close, diagnose,
                                         fail, first_mismatches, new_rng, passed)
from flashkit.reference import reference, standard_backward

GRADS = ("dQ", "dK", "dV")


# ---------------------------------------------------------------- task 13: the softmax's backward
def _softmax_backward_variants(P, dP):
    """Known-wrong dS, each one mistake away from P * (dP - rowsum(P * dP))."""
    D = (P * dP).sum(axis=-1, keepdims=True)
    return [
        ("you forgot D: the softmax couples every score of a row, dS = P * (dP - D) with D = rowsum(P * dP), "
         "not P * dP (that would be the backward of exp alone)", lambda: P * dP),
        ("D is the P-weighted sum of dP, rowsum(P * dP); you used rowsum(dP)",
         lambda: P * (dP - dP.sum(axis=-1, keepdims=True))),
        ("you dropped the factor P in front: dS = P * (dP - D), so a key with weight 0 gets no gradient",
         lambda: dP - D),
        ("only dP is multiplied by P: dS = P * (dP - D) = P * dP - P * D, not P * dP - D", lambda: P * dP - D),
        ("the sign is flipped: dS = P * (dP - D), not P * (D - dP)", lambda: P * (D - dP)),
        ("D must be summed along each ROW (axis=-1, one D per query); you summed down the columns",
         lambda: P * (dP - (P * dP).sum(axis=0, keepdims=True))),
    ]


def _softmax_rows(S):
    m = S.max(axis=-1, keepdims=True)
    E = np.exp(S - np.where(np.isneginf(m), 0.0, m))
    s = E.sum(axis=-1, keepdims=True)
    return np.where(s > 0, E / np.where(s > 0, s, 1.0), 0.0)


def _softmax_cases(rng):
    """(name, P, dP): plain rows, a square case (so axis mistakes compute), masked keys and a row that sees none."""
    plain = rng.standard_normal((5, 7)) * 2
    square = rng.standard_normal((6, 6)) * 2
    masked = rng.standard_normal((4, 9)) * 2
    hide = rng.random((4, 9)) < 0.4
    hide[:, 0] = False
    hide[3] = True  # row 3 sees no key: P = 0, so dS = 0
    masked[hide] = -np.inf
    return [(name, _softmax_rows(S), rng.standard_normal(S.shape)) for name, S in (
        ("5 rows x 7 keys", plain), ("6 rows x 6 keys", square),
        ("masked keys (P = 0 there), row 3 sees no key at all", masked))]


def check_softmax_backward(softmax_backward, *, seed=None) -> None:
    """Check `softmax_backward(P, dP) -> dS`, the gradient through P = softmax(S) row by row."""
    task = "the softmax's backward"
    rng, seed = new_rng(seed)
    for case, P, dP in _softmax_cases(rng):
        want = P * (dP - (P * dP).sum(axis=-1, keepdims=True))
        (got,) = as_arrays(task, call(task, softmax_backward, P.copy(), dP.copy()), ["dS"])
        check_shapes(task, [got], [want], ["dS"])
        if close(got, want):
            continue
        named = diagnose(got, _softmax_backward_variants(P, dP))
        if named:
            fail(task, f"on {case}: {named}.", seed)
        if np.isnan(got).any():
            fail(task, f"on {case}: NaN in dS (the reference has none); dS needs no exp and no division.", seed)
        fail(task, f"on {case}: wrong values {first_mismatches(got, want)}. dS = P * (dP - D), D = rowsum(P * dP).", seed)
    return passed(task, "dS = P * (dP - rowsum(P * dP)) on plain rows, a square case and masked rows")


# ---------------------------------------------------------------- task 14: the backward of attention, GQA
def _backward(Q, K, V, O, dO, lse, scale, *, D="dO*O", P="lse", dV_from="P", scale_S=True, scale_dQ=True,
              scale_dK=True, group="sum", swap_dS=False, swap_P=False):
    """The backward head by head, with one classic mistake switched on by the keyword arguments."""
    Hq, Hkv = Q.shape[0], K.shape[0]
    g = Hq // Hkv
    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    with np.errstate(all="ignore"):
        for h in range(Hq):
            kv = h // g
            S = Q[h] @ K[kv].T * (scale if scale_S else 1.0)  # (Nq, Nk)
            m = S.max(axis=1, keepdims=True)
            P_h = np.exp(S - lse[h][:, None]) if P == "lse" else np.exp(S - m)
            P_v = np.exp(S - m) if dV_from == "unnormalised" else P_h
            dV_h = (P_v if swap_P else P_v.T) @ dO[h]
            dP = dO[h] @ V[kv].T
            D_h = {"dO*O": (dO[h] * O[h]).sum(axis=1), "none": 0.0 * O[h][:, 0], "O": O[h].sum(axis=1),
                   "dO": dO[h].sum(axis=1)}[D]
            dS = P_h * (dP - D_h[:, None])
            dQ[h] = (dS.T if swap_dS else dS) @ K[kv] * (scale if scale_dQ else 1.0)
            dK_h = (dS if swap_dS else dS.T) @ Q[h] * (scale if scale_dK else 1.0)
            if group == "sum":
                dK[kv] += dK_h
                dV[kv] += dV_h
            elif group == "mean":
                dK[kv] += dK_h / g
                dV[kv] += dV_h / g
            elif group == "last" or (group == "first" and h % g == 0):
                dK[kv], dV[kv] = dK_h, dV_h
    return dQ, dK, dV


def _backward_variants(Q, K, V, O, dO, lse, scale):
    square = Q.shape[1] == K.shape[1]  # a transposed dS or P only computes when Nq == Nk

    def v(**kw):
        return lambda: _backward(Q, K, V, O, dO, lse, scale, **kw)

    out = [
        ("you forgot D: dS = P * (dP - D) with D = rowsum(dO * O), one number per query row", v(D="none")),
        ("D = rowsum(dO * O), not rowsum(O): D_i = sum_j P_ij dP_ij = dO_i . (sum_j P_ij v_j) = dO_i . O_i", v(D="O")),
        ("D = rowsum(dO * O), not rowsum(dO): the O is what replaces P in D_i = sum_j P_ij dP_ij", v(D="dO")),
        ("you recomputed P with the row max m: exp(S - m) is not normalised (its rows sum to l, not 1). "
         "The forward's lse = m + log(l) gives the softmax back in one step: P = exp(S - lse)", v(P="m")),
        ("dV comes from P^T dO with the normalised P; you used exp(S - m)^T dO, which is missing the division by "
         "l (use P = exp(S - lse) for dV too)", v(dV_from="unnormalised")),
        ("you recomputed S without the scale: S = Q K^T * scale, exactly as in the forward, before P = exp(S - lse)",
         v(scale_S=False)),
        ("dQ and dK both lack the scale: S = Q K^T * scale, so dQ = dS K * scale and dK = dS^T Q * scale",
         v(scale_dQ=False, scale_dK=False)),
        ("dQ lacks the scale: S = Q K^T * scale, so dQ = dS K * scale", v(scale_dQ=False)),
        ("dK lacks the scale: S = Q K^T * scale, so dK = dS^T Q * scale", v(scale_dK=False)),
        ("GQA: the query heads of a group share one K/V head, so their dK and dV must be SUMMED over the group; "
         "you kept only the last head's (dK[kv] = ... where it must be dK[kv] += ...)", v(group="last")),
        ("GQA: the query heads of a group share one K/V head, so their dK and dV must be SUMMED over the group; "
         "you kept only the first head's", v(group="first")),
        ("GQA: you averaged dK and dV over the query heads of a group; the heads' gradients add up (sum, not mean)",
         v(group="mean")),
    ]
    if square:
        out += [
            ("dS is (Nq, Nk) like S: dQ = dS K and dK = dS^T Q; you swapped dS and dS^T (with Nq == Nk both "
             "shapes fit, so nothing complained)", v(swap_dS=True)),
            ("dV = P^T dO (P is (Nq, Nk), dV is (Nk, d)); you used P dO (with Nq == Nk the shapes fit)",
             v(swap_P=True)),
        ]
    return out


def _backward_cases(rng):
    """(name, Q, K, V, O, dO, lse, scale): square first (so transposes show), then GQA and MQA with
    Nq != Nk, then large scores."""
    cases = []
    for Hq, Hkv, Nq, Nk, d, spread, name in (
            (1, 1, 6, 6, 4, 1.0, "one head, Nq = Nk = 6"),
            (4, 2, 5, 9, 3, 1.0, "GQA: 4 query heads on 2 K/V heads, Nq = 5, Nk = 9"),
            (3, 1, 7, 4, 5, 1.0, "MQA: 3 query heads on 1 K/V head, Nq = 7, Nk = 4"),
            (2, 1, 6, 8, 4, 20.0, "GQA 2/1 with large scores")):
        Q = rng.standard_normal((Hq, Nq, d)) * spread
        K = rng.standard_normal((Hkv, Nk, d)) * spread
        V, dO = rng.standard_normal((Hkv, Nk, d)), rng.standard_normal((Hq, Nq, d))
        scale = 1.0 / np.sqrt(d)
        O, lse = reference(validate.check(Q, K, V, scale=scale))
        if spread > 1:  # exp(S) alone would overflow float64 beyond 709
            name += f" (|S| up to {np.abs(Q @ np.repeat(K, Hq // Hkv, axis=0).transpose(0, 2, 1)).max() * scale:.0f})"
        cases.append((name, Q, K, V, O.reshape(Q.shape), dO, lse.reshape(Hq, Nq), scale))
    return cases


def _hint(wrong):
    """What to look at when only some of dQ, dK, dV are wrong."""
    if wrong == ["dV"]:
        return " dV = P^T dO, summed over the query heads of each K/V head."
    if "dV" not in wrong:
        return " dV is right, so P is: look at dP = dO V^T, D and dS = P * (dP - D), then dQ = dS K * scale, dK = dS^T Q * scale."
    return " Start from P = exp(S - lse) with S = Q K^T * scale: every gradient uses it."


def check_attention_backward(attention_backward, *, seed=None) -> None:
    """Check `attention_backward(Q, K, V, O, dO, lse, scale) -> (dQ, dK, dV)` against flashkit's standard backward."""
    task = "the backward of attention"
    rng, seed = new_rng(seed)
    for case, Q, K, V, O, dO, lse, scale in _backward_cases(rng):
        problem = validate.check_backward(dO, Q, K, V, O, lse, scale=scale)
        want = tuple(g.reshape(x.shape) for g, x in zip(standard_backward(problem), (Q, K, V)))
        args = [a.copy() for a in (Q, K, V, O, dO, lse)] + [scale]
        got = as_arrays(task, call(task, attention_backward, *args), GRADS)
        check_shapes(task, got, want, GRADS)
        if all_close(got, want):
            continue
        named = diagnose(got, _backward_variants(Q, K, V, O, dO, lse, scale))
        if named:
            fail(task, f"on {case}: {named}.", seed)
        if any(not np.isfinite(g).all() for g in got):
            fail(task, f"on {case}: NaN or inf in your gradients (the reference has none). With large scores "
                       "exp(S) overflows: compute P = exp(S - lse) as one exponent, never exp(S) / exp(lse).", seed)
        wrong = [n for n, g, w in zip(GRADS, got, want) if not close(g, w)]
        i = GRADS.index(wrong[0])
        fail(task, f"on {case}: {', '.join(wrong)} wrong; {wrong[0]}: {first_mismatches(got[i], want[i])}.{_hint(wrong)}",
             seed)
    return passed(task, "dQ, dK and dV match flashkit's backward for one head (Nq = Nk), GQA and MQA with Nq != Nk, "
                        "and scores in the hundreds")


__all__ = ["check_softmax_backward", "check_attention_backward", "ExerciseError"]
