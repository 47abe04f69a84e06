"""The backward checkers: a correct solution passes, and each classic mistake, written here on its own as a
learner would write it (not taken from the checker's variants), is rejected with its named mistake.
Every case runs on several seeds, since the checkers draw fresh inputs."""
import numpy as np
import pytest

from flashkit.exercises import ExerciseError, check_attention_backward, check_softmax_backward

SEEDS = [0, 1, 2, 7, 12345]


# ------------------------------------------------------------------ task 13: dS from P and dP
def softmax_backward(P, dP):
    D = (P * dP).sum(axis=1, keepdims=True)  # one number per row
    return P * (dP - D)


SOFTMAX_MISTAKES = [
    (lambda P, dP: P * dP, "you forgot D"),
    (lambda P, dP: P * (dP - dP.sum(axis=1, keepdims=True)), "you used rowsum(dP)"),
    (lambda P, dP: dP - (P * dP).sum(axis=1, keepdims=True), "dropped the factor P"),
    (lambda P, dP: P * dP - (P * dP).sum(axis=1, keepdims=True), "only dP is multiplied by P"),
    (lambda P, dP: P * ((P * dP).sum(axis=1, keepdims=True) - dP), "sign is flipped"),
    (lambda P, dP: P * (dP - (P * dP).sum(axis=0)), "summed down the columns"),
    (lambda P, dP: (P * (dP - (P * dP).sum(axis=1, keepdims=True))).astype(np.float32), "is float32"),
    (lambda P, dP: np.where(P > 0.5, np.nan, softmax_backward(P, dP)), "NaN in dS"),
]


@pytest.mark.parametrize("seed", SEEDS)
def test_softmax_backward_accepts_a_correct_solution(seed, capsys):
    check_softmax_backward(softmax_backward, seed=seed)
    assert capsys.readouterr().out.startswith("✓ the softmax's backward")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", SOFTMAX_MISTAKES, ids=[e[:24] for _, e in SOFTMAX_MISTAKES])
def test_softmax_backward_names_the_mistake(fn, expected, seed):
    with np.errstate(all="ignore"), pytest.raises(ExerciseError) as info:
        check_softmax_backward(fn, seed=seed)
    assert expected in str(info.value), str(info.value)
    assert f"seed={seed}" in str(info.value) or "float32" in str(info.value)


# ------------------------------------------------------------------ task 14: dQ, dK, dV with GQA
def attention_backward(Q, K, V, O, dO, lse, scale):
    Hq, Hkv = Q.shape[0], K.shape[0]
    g = Hq // Hkv
    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    for h in range(Hq):
        kv = h // g  # the K/V head this query head reads
        S = Q[h] @ K[kv].T * scale
        P = np.exp(S - lse[h][:, None])  # the forward's softmax, recomputed from lse
        dV[kv] += P.T @ dO[h]
        dP = dO[h] @ V[kv].T
        D = (dO[h] * O[h]).sum(axis=1)
        dS = P * (dP - D[:, None])
        dQ[h] = dS @ K[kv] * scale
        dK[kv] += dS.T @ Q[h] * scale
    return dQ, dK, dV


def forgot_D(Q, K, V, O, dO, lse, scale):
    Hq, Hkv = Q.shape[0], K.shape[0]
    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    for h in range(Hq):
        kv = h * Hkv // Hq
        P = np.exp(Q[h] @ K[kv].T * scale - lse[h][:, None])
        dV[kv] += P.T @ dO[h]
        dS = P * (dO[h] @ V[kv].T)  # no D
        dQ[h] = dS @ K[kv] * scale
        dK[kv] += dS.T @ Q[h] * scale
    return dQ, dK, dV


def D_from_O(Q, K, V, O, dO, lse, scale):
    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    g = Q.shape[0] // K.shape[0]
    for h in range(Q.shape[0]):
        P = np.exp(Q[h] @ K[h // g].T * scale - lse[h][:, None])
        dV[h // g] += P.T @ dO[h]
        D = O[h].sum(axis=1, keepdims=True)  # should be (dO * O).sum
        dS = P * (dO[h] @ V[h // g].T - D)
        dQ[h] = scale * dS @ K[h // g]
        dK[h // g] += scale * dS.T @ Q[h]
    return dQ, dK, dV


def D_from_dO(Q, K, V, O, dO, lse, scale):
    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    g = Q.shape[0] // K.shape[0]
    for h in range(Q.shape[0]):
        P = np.exp(Q[h] @ K[h // g].T * scale - lse[h][:, None])
        dV[h // g] += P.T @ dO[h]
        dS = P * (dO[h] @ V[h // g].T - dO[h].sum(axis=1, keepdims=True))
        dQ[h] = scale * dS @ K[h // g]
        dK[h // g] += scale * dS.T @ Q[h]
    return dQ, dK, dV


def P_from_max(Q, K, V, O, dO, lse, scale):
    """Recomputes P the way the forward's first pass would, with the row max and no normalisation."""
    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    g = Q.shape[0] // K.shape[0]
    for h in range(Q.shape[0]):
        S = Q[h] @ K[h // g].T * scale
        P = np.exp(S - S.max(axis=1, keepdims=True))
        dV[h // g] += P.T @ dO[h]
        dS = P * (dO[h] @ V[h // g].T - (dO[h] * O[h]).sum(axis=1, keepdims=True))
        dQ[h] = scale * dS @ K[h // g]
        dK[h // g] += scale * dS.T @ Q[h]
    return dQ, dK, dV


def dV_unnormalised(Q, K, V, O, dO, lse, scale):
    """Normalises P for dS but takes dV from exp(S - m), before the division by l."""
    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    g = Q.shape[0] // K.shape[0]
    for h in range(Q.shape[0]):
        S = Q[h] @ K[h // g].T * scale
        E = np.exp(S - S.max(axis=1, keepdims=True))
        dV[h // g] += E.T @ dO[h]  # the final normalisation by l is missing here
        P = E / E.sum(axis=1, keepdims=True)
        dS = P * (dO[h] @ V[h // g].T - (dO[h] * O[h]).sum(axis=1, keepdims=True))
        dQ[h] = scale * dS @ K[h // g]
        dK[h // g] += scale * dS.T @ Q[h]
    return dQ, dK, dV


def S_without_scale(Q, K, V, O, dO, lse, scale):
    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    g = Q.shape[0] // K.shape[0]
    for h in range(Q.shape[0]):
        P = np.exp(Q[h] @ K[h // g].T - lse[h][:, None])  # scale forgotten in S
        dV[h // g] += P.T @ dO[h]
        dS = P * (dO[h] @ V[h // g].T - (dO[h] * O[h]).sum(axis=1)[:, None])
        dQ[h] = dS @ K[h // g] * scale
        dK[h // g] += dS.T @ Q[h] * scale
    return dQ, dK, dV


def without_scale(which):
    def fn(Q, K, V, O, dO, lse, scale):
        dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
        g = Q.shape[0] // K.shape[0]
        for h in range(Q.shape[0]):
            P = np.exp(Q[h] @ K[h // g].T * scale - lse[h][:, None])
            dV[h // g] += P.T @ dO[h]
            dS = P * (dO[h] @ V[h // g].T - (dO[h] * O[h]).sum(axis=1)[:, None])
            dQ[h] = dS @ K[h // g] * (1.0 if "dQ" in which else scale)
            dK[h // g] += dS.T @ Q[h] * (1.0 if "dK" in which else scale)
        return dQ, dK, dV
    return fn


def gqa_overwrites(Q, K, V, O, dO, lse, scale):
    """dK[kv] = ... inside the loop over query heads: the last head of each group wins."""
    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    g = Q.shape[0] // K.shape[0]
    for h in range(Q.shape[0]):
        P = np.exp(Q[h] @ K[h // g].T * scale - lse[h][:, None])
        dS = P * (dO[h] @ V[h // g].T - (dO[h] * O[h]).sum(axis=1)[:, None])
        dQ[h] = dS @ K[h // g] * scale
        dK[h // g] = dS.T @ Q[h] * scale
        dV[h // g] = P.T @ dO[h]
    return dQ, dK, dV


def gqa_first_head_only(Q, K, V, O, dO, lse, scale):
    """The gradients of K/V head kv taken from query head kv * g alone, as if there were no group."""
    dQ = attention_backward(Q, K, V, O, dO, lse, scale)[0]
    g = Q.shape[0] // K.shape[0]
    first = slice(0, Q.shape[0], g)
    _, dK, dV = attention_backward(Q[first], K, V, O[first], dO[first], lse[first], scale)
    return dQ, dK, dV


def gqa_mean(Q, K, V, O, dO, lse, scale):
    dQ, dK, dV = attention_backward(Q, K, V, O, dO, lse, scale)
    g = Q.shape[0] // K.shape[0]
    return dQ, dK / g, dV / g


def dS_transposed(Q, K, V, O, dO, lse, scale):
    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    g = Q.shape[0] // K.shape[0]
    for h in range(Q.shape[0]):
        P = np.exp(Q[h] @ K[h // g].T * scale - lse[h][:, None])
        dV[h // g] += P.T @ dO[h]
        dS = P * (dO[h] @ V[h // g].T - (dO[h] * O[h]).sum(axis=1)[:, None])
        dQ[h] = dS.T @ K[h // g] * scale  # fits only when Nq == Nk
        dK[h // g] += dS @ Q[h] * scale
    return dQ, dK, dV


def dV_from_P_not_PT(Q, K, V, O, dO, lse, scale):
    dQ, dK, _ = attention_backward(Q, K, V, O, dO, lse, scale)
    dV = np.zeros_like(V)
    g = Q.shape[0] // K.shape[0]
    for h in range(Q.shape[0]):
        dV[h // g] += np.exp(Q[h] @ K[h // g].T * scale - lse[h][:, None]) @ dO[h]
    return dQ, dK, dV


def exp_then_divide(Q, K, V, O, dO, lse, scale):
    """Right algebra, but exp(S) / exp(lse) overflows for large scores."""
    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    g = Q.shape[0] // K.shape[0]
    for h in range(Q.shape[0]):
        P = np.exp(Q[h] @ K[h // g].T * scale) / np.exp(lse[h])[:, None]
        dV[h // g] += P.T @ dO[h]
        dS = P * (dO[h] @ V[h // g].T - (dO[h] * O[h]).sum(axis=1)[:, None])
        dQ[h] = dS @ K[h // g] * scale
        dK[h // g] += dS.T @ Q[h] * scale
    return dQ, dK, dV


def only_dV_wrong(Q, K, V, O, dO, lse, scale):
    dQ, dK, dV = attention_backward(Q, K, V, O, dO, lse, scale)
    return dQ, dK, dV + 0.01


BACKWARD_MISTAKES = [
    (forgot_D, "you forgot D"),
    (D_from_O, "not rowsum(O)"),
    (D_from_dO, "not rowsum(dO)"),
    (P_from_max, "recomputed P with the row max m"),
    (dV_unnormalised, "missing the division by l"),
    (S_without_scale, "recomputed S without the scale"),
    (without_scale("dQ"), "dQ lacks the scale"),
    (without_scale("dK"), "dK lacks the scale"),
    (without_scale("dQ dK"), "dQ and dK both lack the scale"),
    (gqa_overwrites, "you kept only the last head's"),
    (gqa_first_head_only, "you kept only the first head's"),
    (gqa_mean, "you averaged dK and dV"),
    (dS_transposed, "you swapped dS and dS^T"),
    (dV_from_P_not_PT, "you used P dO"),
    (exp_then_divide, "never exp(S) / exp(lse)"),
    (only_dV_wrong, "dV = P^T dO, summed over the query heads"),
    (lambda *a: attention_backward(*a)[:2], "return the tuple (dQ, dK, dV)"),
]


@pytest.mark.parametrize("seed", SEEDS)
def test_attention_backward_accepts_a_correct_solution(seed, capsys):
    check_attention_backward(attention_backward, seed=seed)
    assert capsys.readouterr().out.startswith("✓ the backward of attention")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, expected", BACKWARD_MISTAKES, ids=[e[:24] for _, e in BACKWARD_MISTAKES])
def test_attention_backward_names_the_mistake(fn, expected, seed):
    with np.errstate(all="ignore"), pytest.raises(ExerciseError) as info:
        check_attention_backward(fn, seed=seed)
    assert expected in str(info.value), str(info.value)


def test_the_checks_use_the_inputs_they_say():
    """The large-score case really overflows exp(S) (else its NaN hint would be untested), and every case's
    lse is the forward's (P = exp(S - lse) sums to 1)."""
    from flashkit.exercises.backward import _backward_cases

    for seed in SEEDS:
        cases = _backward_cases(np.random.default_rng(seed))
        big = cases[-1]
        Q, K, scale = big[1], big[2], big[7]
        assert (Q @ np.repeat(K, Q.shape[0] // K.shape[0], axis=0).transpose(0, 2, 1) * scale).max() > 709
        for _, Q, K, _V, _O, _dO, lse, scale in cases:
            g = Q.shape[0] // K.shape[0]
            S = Q @ np.repeat(K, g, axis=0).transpose(0, 2, 1) * scale
            np.testing.assert_allclose(np.exp(S - lse[..., None]).sum(axis=-1), 1.0, rtol=1e-12)


def test_stub_and_in_place_messages():
    def stub(*args):
        raise NotImplementedError("write attention_backward")

    with pytest.raises(ExerciseError, match="still a stub"):
        check_attention_backward(stub, seed=0)

    def in_place(Q, K, V, O, dO, lse, scale):
        out = attention_backward(Q, K, V, O, dO, lse, scale)
        dO *= 2
        return out

    with pytest.raises(ExerciseError, match="modified its argument #5 in place"):
        check_attention_backward(in_place, seed=0)
