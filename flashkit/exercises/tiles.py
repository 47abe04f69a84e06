"""Checkers for the tiling tasks: the FA2 inner loop for one query tile, the test that decides which
tiles causal/window attention skips, and block sizes from a fast-memory budget.

Task signatures:
    fa2_tile(Q_i, K, V, Bc, scale)          Q_i (Br, d), K and V (Nk, d) -> (O_i (Br, d), lse_i (Br,))
    skip_tile(i0, i1, j0, j1, Nq, Nk, window) -> bool: True when no query row in [i0, i1) may see a key
                                               in [j0, j1); window = (left, right), -1 unbounded, aligned
                                               bottom-right (row i sees i + Nk - Nq - left <= j <= i + Nk - Nq + right)
    block_sizes(M, d)                       -> (Br, Bc) ints: Bc = ceil(M / 4d), Br = min(Bc, d)
References: flashkit.reference (the float64 oracle), flashkit.masks (dense_mask), flashkit.tiled.block_sizes.
"""
from __future__ import annotations

import math

import numpy as np

from flashkit import tiled, validate
from flashkit.exercises.checking import (ExerciseError, all_close, as_arrays, call, check_shapes, close, diagnose,
                                         exp_diff, fail, first_mismatches, new_rng, passed)
from flashkit.masks import dense_mask
from flashkit.reference import reference

# ---------------------------------------------------------------- the FA2 inner loop for one query tile


def _attention(Q, K, V, scale):
    """(O, lse) of one head from the float64 oracle."""
    O, lse = reference(validate.check(Q, K, V, scale=scale))
    return O.reshape(Q.shape), lse.reshape(Q.shape[0])


def _fa2_loop(Q, K, V, scale, starts, width, *, rescale="right", divide_inside=False, lse="m+log l",
              divide_at_end=True):
    """One query tile, FA2 order, with one classic mistake switched on by the keyword arguments."""
    Br, d = Q.shape
    m, l, O = np.full(Br, -np.inf), np.zeros(Br), np.zeros((Br, d))
    with np.errstate(all="ignore"):
        for j in starts:
            K_j, V_j = K[j:j + width], V[j:j + width]
            S = Q @ K_j.T * scale  # S_ij = Q_i K_j^T * scale
            m_new = np.maximum(m, S.max(axis=1)) if rescale != "forget max" else S.max(axis=1)
            P = exp_diff(S, m_new[:, None])
            alpha = {"right": exp_diff(m, m_new), "inverted": np.exp(m_new - m), "none": np.ones(Br),
                     "forget max": exp_diff(m, m_new), "l only": exp_diff(m, m_new)}[rescale]
            l_new = alpha * l + P.sum(axis=1)
            O = (np.ones(Br) if rescale == "l only" else alpha)[:, None] * O + P @ V_j
            if divide_inside:
                O = O / l_new[:, None]
            m, l = m_new, l_new
        O_final = O if (divide_inside or not divide_at_end) else O / l[:, None]
        lse_out = {"m+log l": m + np.log(l), "m": m, "log l": np.log(l)}[lse]
    return O_final, lse_out


def _fa2_variants(Q, K, V, Bc, scale):
    Nk = K.shape[0]
    ceil_starts = range(0, Nk, Bc)

    def v(**kw):
        starts = kw.pop("starts", ceil_starts)
        width = kw.pop("width", Bc)
        return lambda: _fa2_loop(Q, K, V, kw.pop("scale", scale), starts, width, **kw)

    return [
        ("you rescale the old state with exp(m_new - m_old); it must be exp(m_old - m_new) (<= 1)", v(rescale="inverted")),
        ("your running max forgets the previous max: m_new = max(m_old, rowmax(S_ij)), not rowmax(S_ij)", v(rescale="forget max")),
        ("you never rescale l and O when the max grows: multiply both by exp(m_old - m_new)", v(rescale="none")),
        ("you rescaled l but forgot to rescale O: O_i = exp(m_old - m_new) * O_i + P_ij V_j", v(rescale="l only")),
        ("you divided O_i by l_i inside the loop over K/V blocks; keep O_i un-normalised and divide once, "
         "after the last block (that is FA2's saving over FA1)", v(divide_inside=True)),
        ("you never divided O_i by l_i: after the last block, O_i = O_i / l_i (once)", v(divide_at_end=False)),
        ("your lse is the running max m; lse = m + log(l)", v(lse="m")),
        ("your lse is log(l); it needs the max back: lse = m + log(l)", v(lse="log l")),
        ("you forgot to multiply the scores by `scale`: S_ij = Q_i K_j^T * scale", v(scale=1.0)),
        ("your K/V blocks overlap by one key (K[j : j + Bc + 1]): Python slices exclude their end, "
         "use K[j : j + Bc] and the boundary key is counted once", v(width=Bc + 1)),
    ]


def _fa2_cases(rng):
    """(name, Q_i, K, V, Bc, scale): tails of 7 and of 1 key, one short block, an exact multiple, huge scores."""
    cases = []
    for Br, Nk, Bc, d, spread in ((5, 23, 8, 4, 1.0), (4, 17, 4, 3, 1.0), (3, 5, 8, 4, 1.0), (6, 24, 8, 5, 1.0),
                                  (4, 19, 6, 4, 20.0)):
        Q = rng.standard_normal((Br, d)) * spread
        K = rng.standard_normal((Nk, d)) * spread
        V = rng.standard_normal((Nk, d))
        tail = Nk - (math.ceil(Nk / Bc) - 1) * Bc
        name = f"Br={Br}, Nk={Nk}, Bc={Bc} (Tc={math.ceil(Nk / Bc)} blocks, the last of {tail} keys), d={d}"
        if spread > 1:
            name += ", scores up to about +-1000"
        cases.append((name, Q, K, V, Bc, 1.0 / math.sqrt(d) if spread == 1 else 1.0))
    return cases


# Diagnosis by property. Matching the learner's output against our own versions of each mistake only
# names a mistake written exactly our way (a guarded exp(m_new - m_old), say, is not NaN like ours). So
# the learner's loop is also probed with K = V = identity (d = Nk): then S_ij = Q_i K_j^T * scale is
# whatever scores we choose (Q_i = S / scale) and O_i is the weight the loop gave each key, which says
# what went wrong whatever the code looks like.
_PROBE_NK, _PROBE_BC, _PROBE_BR = 11, 4, 3  # blocks [0, 4), [4, 8), [8, 11): a short last block


def _probe(fa2_tile, task, S):
    """(weights (Br, Nk), lse) from the learner's loop on scores S, or None if it fails on the probe."""
    Nk = S.shape[1]
    eye = np.eye(Nk)
    scale = 1.0 / math.sqrt(Nk)
    try:
        out = as_arrays(task, call(task, fa2_tile, S / scale, eye.copy(), eye.copy(), _PROBE_BC, scale), ("O_i", "lse_i"))
    except ExerciseError:
        return None
    return out if all(np.shape(o) == w for o, w in zip(out, ((S.shape[0], Nk), (S.shape[0],)))) else None


def _ranges(keys) -> str:
    """[8, 9, 10, 3] -> '3 and 8..10'."""
    keys, parts = sorted(int(k) for k in keys), []
    for k in keys:
        if parts and k == parts[-1][1] + 1:
            parts[-1][1] = k
        else:
            parts.append([k, k])
    text = [f"{a}" if a == b else f"{a}..{b}" for a, b in parts]
    return ", ".join(text[:-1]) + (" and " if len(text) > 1 else "") + text[-1]


def _diagnose_by_probing(fa2_tile, task):
    """A message naming the mistake from the weights the learner's loop gives each key, or None."""
    Br, Nk, Bc = _PROBE_BR, _PROBE_NK, _PROBE_BC
    block = np.arange(Nk) // Bc  # block index of each key
    blocks = ", ".join(f"[{j}, {min(j + Bc, Nk)})" for j in range(0, Nk, Bc))
    how = (f" (Probed with K = V = identity, so O_i holds the weight your loop gives each key; Nk={Nk}, Bc={Bc}, "
           f"blocks {blocks}.)")
    with np.errstate(all="ignore"):
        # 1. Equal scores: every key should get 1/Nk, and no rescaling can matter (the max never moves).
        got = _probe(fa2_tile, task, np.zeros((Br, Nk)))
        if got is None or not np.isfinite(got[0]).all():
            return None
        W = got[0]
        rel = W / np.where(W.max(axis=1, keepdims=True) > 0, W.max(axis=1, keepdims=True), 1.0)
        dropped = np.flatnonzero((np.abs(W) < 1e-12).all(axis=0))
        if dropped.size and dropped.size < Nk:
            return (f"keys {_ranges(dropped)} get no weight at all: your loop never reaches them. With Tc = ceil(Nk / Bc) "
                    f"= {math.ceil(Nk / Bc)} blocks the last one is shorter; check the loop bound and slice "
                    f"K[j : min(j + Bc, Nk)]." + how)
        once, twice = np.isclose(rel, 0.5, rtol=1e-6).all(axis=0), np.isclose(rel, 1.0, rtol=1e-6).all(axis=0)
        if once.any() and twice.any() and (once | twice).all():
            n = int(twice.sum())
            return (f"{'keys' if n > 1 else 'key'} {_ranges(np.flatnonzero(twice))} {'weigh' if n > 1 else 'weighs'} "
                    f"twice as much as the others with equal scores: {'they are' if n > 1 else 'it is'} counted "
                    "twice, your K/V blocks overlap (a last block that starts at Nk - Bc, or "
                    "K[j : j + Bc + 1]). Each key must be in exactly one block: K[j : min(j + Bc, Nk)]." + how)
        per_block = np.array([rel[:, block == b].mean(axis=1) for b in range(block.max() + 1)]).T  # (Br, Tc)
        if (np.diff(per_block, axis=1) > 1e-6).all():
            return ("with equal scores, earlier blocks get less weight than later ones: you divided O_i by l_i "
                    "inside the loop, which shrinks everything summed before. Keep O_i un-normalised (a running "
                    "sum of exp(s - m) v) and divide by l_i once, after the last block." + how)
        total = W.sum(axis=1)
        if np.isclose(rel, 1.0, rtol=1e-6).all():
            if np.allclose(total, Nk, rtol=1e-6):
                return ("with equal scores each key gets weight 1, not 1/Nk: you never divided O_i by l_i. After the "
                        "last block, O_i = O_i / l_i (once)." + how)
            if np.allclose(total * Nk, 1.0, rtol=1e-6):
                return (f"with equal scores each key gets 1/Nk**2 = {1 / Nk**2:.4g}, not 1/Nk: O_i * l_i matches, so you "
                        "divided by l_i twice (inside the loop and again at the end, or twice at the end). Divide once, "
                        "after the last block." + how)
        # 2. Scores rising block by block (row r by r + 1 per block): the running max moves at every block,
        # so the old state must shrink by alpha = exp(m_old - m_new) < 1. Relative to the right weight, a key
        # of block b gets exp(k * (m_final - m_b)): k = 0 right, k = 2 rescaled the wrong way, k = 1 never rescaled.
        slope = np.arange(1, Br + 1)[:, None]
        S = slope * block[None, :].astype(float)
        got = _probe(fa2_tile, task, S)
        if got is None or not np.isfinite(got[0]).all() or (got[0] <= 0).any():
            return None
        P = np.exp(S - S.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
        if not close(got[0], P, rtol=1e-6, atol=1e-12):
            logr = np.log(got[0] / P)
            gap = (S.max(axis=1, keepdims=True) - S)[:, block < block.max()]  # m_final - m_b, > 0
            k = (logr[:, block < block.max()] - logr[:, block == block.max()].mean(axis=1, keepdims=True)) / gap
            sums_to_1 = np.allclose(got[0].sum(axis=1), 1.0, rtol=1e-6)
            if np.allclose(k, 2.0, rtol=1e-3):
                return ("when the max grows, your earlier blocks grow instead of shrinking: you rescale with "
                        "exp(m_new - m_old) (guarded or not); it must be alpha = exp(m_old - m_new) <= 1, applied to "
                        "both l_i and O_i." + how)
            if np.allclose(k, 1.0, rtol=1e-3):
                return (("you never rescale l_i and O_i when the max grows: multiply both by exp(m_old - m_new)."
                         if sums_to_1 else "you rescaled l_i but not O_i when the max grows: O_i = exp(m_old - m_new) "
                                           "* O_i + P_ij V_j.") + how)
            if np.allclose(k, 0.0, atol=1e-6) and not sums_to_1:
                return ("you rescaled O_i but not l_i when the max grows: l_i = exp(m_old - m_new) * l_i + rowsum(P_ij)."
                        + how)
            return ("your weights are wrong when the running max grows from block to block (scores rising by block): "
                    "check m_new = max(m_old, rowmax(S_ij)), P_ij = exp(S_ij - m_new) and the rescale "
                    "alpha = exp(m_old - m_new) of both l_i and O_i." + how)
        # 3. Scores falling block by block: the max stays where the first block put it.
        S = -S
        got = _probe(fa2_tile, task, S)
        if got is not None and np.isfinite(got[0]).all():
            P = np.exp(S - S.max(axis=1, keepdims=True))
            P /= P.sum(axis=1, keepdims=True)
            if not close(got[0], P, rtol=1e-6, atol=1e-12):
                return ("right while the max grows, wrong when a later block's scores are all below the running max: "
                        "your running max forgets the previous max. m_new = max(m_old, rowmax(S_ij))." + how)
    return None


def _diagnose_lse(Q, K, scale, lse_got, lse_want):
    """When O_i is right and lse_i is not: which wrong formula lse_i follows, or None."""
    S = Q @ K.T * scale
    m = S.max(axis=1)
    l = np.exp(S - m[:, None]).sum(axis=1)
    for message, value in (
        ("your lse is in base 2 (lse / ln 2 matches): flashkit's lse is the natural-log logsumexp, lse = m + log(l) "
         "(kernels that work with exp2 convert back by multiplying by ln 2)", lse_want / math.log(2)),
        ("your lse uses log2(l): lse = m + log(l), the natural log", m + np.log2(l)),
        ("your lse is the running max m; lse = m + log(l)", m),
        ("your lse is log(l); it needs the max back: lse = m + log(l)", np.log(l)),
        ("your lse is m + l; it is m + log(l)", m + l),
    ):
        if close(lse_got, value, rtol=1e-6, atol=1e-9):
            return message
    return None


def check_fa2_tile(fa2_tile, *, seed=None) -> None:
    """Check `fa2_tile(Q_i, K, V, Bc, scale) -> (O_i, lse_i)` against the float64 reference."""
    task = "FA2 inner loop for one query tile"
    names = ("O_i", "lse_i")
    rng, seed = new_rng(seed)
    for case, Q, K, V, Bc, scale in _fa2_cases(rng):
        want = _attention(Q, K, V, scale)
        got = as_arrays(task, call(task, fa2_tile, Q.copy(), K.copy(), V.copy(), Bc, scale), names)
        check_shapes(task, got, want, names)
        if all_close(got, want):
            continue
        named = diagnose(got, _fa2_variants(Q, K, V, Bc, scale))
        if named:
            fail(task, f"on {case}: {named}.", seed)
        Nk, Tc = K.shape[0], math.ceil(K.shape[0] / Bc)
        for n in range(1, Nk):  # off-by-one tails: is it attention over a prefix (or a suffix) of the keys?
            for keys, where in ((slice(0, n), f"the first {n}"), (slice(Nk - n, Nk), f"the last {n}")):
                if all_close(got, _attention(Q, K[keys], V[keys], scale)):
                    fail(task, f"on {case}: your result is attention over only {where} of the {Nk} keys. "
                               f"With Nk={Nk} and Bc={Bc} there are Tc = ceil(Nk / Bc) = {Tc} blocks and the last "
                               f"one holds {Nk - (Tc - 1) * Bc} keys: check the loop bound (off by one?) and "
                               "slice the tail as K[j : min(j + Bc, Nk)].", seed)
        if close(got[0], want[0]):
            named = _diagnose_lse(Q, K, scale, got[1], want[1])
        else:
            named = _diagnose_by_probing(fa2_tile, task)
        if named:
            end = "" if named.endswith((".", ".)")) else "."
            fail(task, f"on {case}: O_i{' right, lse_i' if close(got[0], want[0]) else ''} wrong; {named}{end}", seed)
        if any(np.isnan(g).any() for g in got):
            fail(task, f"on {case}: NaN in your output (the reference has none). Keep every exp() argument <= 0 "
                       "by subtracting the running max.", seed)
        wrong = [n for n, g, w in zip(names, got, want) if not close(g, w)]
        i = names.index(wrong[0])
        fail(task, f"on {case}: {' and '.join(wrong)} wrong; {wrong[0]}: {first_mismatches(got[i], want[i])}.", seed)
    return passed(task, "matches the float64 reference for Nk a multiple of Bc or not (tails of 1 and 7), "
                        "one short block, and scores near +-1000")


# ---------------------------------------------------------------- which tiles causal / window attention skips


def _skip_truth(i0, i1, j0, j1, Nq, Nk, window):
    return not dense_mask(Nq, Nk, window)[i0:i1, j0:j1].any()


def _skip_variants():
    """Known-wrong skip tests, as functions of (i0, i1, j0, j1, Nq, Nk, window)."""
    def rule(offset=lambda Nq, Nk: Nk - Nq, right_row=lambda i0, i1: i1 - 1, right_cmp=lambda a, b: a > b,
             left_key=lambda j0, j1: j1 - 1, use_left=True, use_right=True):
        def skip(i0, i1, j0, j1, Nq, Nk, window):
            left, right = window
            off = offset(Nq, Nk)
            if use_right and right >= 0 and right_cmp(j0, right_row(i0, i1) + off + right):
                return True
            if use_left and left >= 0 and left_key(j0, j1) < i0 + off - left:
                return True
            return False
        return skip

    return [
        ("you aligned the diagonal top-left (row i sees keys j <= i + right). flashkit aligns it bottom-right, "
         "as FlashAttention >= 2.1 does: row i sees j <= i + (Nk - Nq) + right, so with Nq != Nk the diagonal "
         "shifts by Nk - Nq", rule(offset=lambda Nq, Nk: 0)),
        ("off by one: i1 is an exclusive end, so the tile's last row is i1 - 1; with i1 you keep tiles that "
         "are entirely hidden (wasted work)", rule(right_row=lambda i0, i1: i1)),
        ("off by one: you skip a tile whose first key j0 is exactly on the last row's edge (j0 == i1 - 1 + "
         "offset + right is visible): use >, not >=", rule(right_cmp=lambda a, b: a >= b)),
        ("the tile's LAST row (i1 - 1) decides its right edge, not its first row i0: rows further down see "
         "further right, so you skipped tiles that later rows can see", rule(right_row=lambda i0, i1: i0)),
        ("off by one: j1 is an exclusive end, so the tile's last key is j1 - 1; with j1 you keep tiles left of "
         "the window that are entirely hidden", rule(left_key=lambda j0, j1: j1)),
        ("you never skip tiles left of a sliding window: a tile is also hidden when its last key j1 - 1 < "
         "i0 + (Nk - Nq) - left", rule(use_left=False)),
        ("you never skip tiles right of the diagonal (causal or window right edge): a tile is hidden when "
         "j0 > (i1 - 1) + (Nk - Nq) + right", rule(use_right=False)),
    ]


def _skip_cases(rng):
    """(Nq, Nk, Br, Bc, window) configurations: causal with Nq <, >, = Nk, windows, decode, plus random ones."""
    fixed = [(7, 13, 3, 4, (-1, 0)), (13, 7, 4, 3, (-1, 0)), (10, 10, 3, 3, (-1, 0)), (11, 17, 4, 5, (3, 0)),
             (9, 14, 2, 3, (2, 3)), (6, 8, 4, 4, (-1, -1)), (1, 20, 1, 6, (-1, 0)), (12, 9, 5, 2, (1, -1))]
    for _ in range(4):
        Nq, Nk = (int(x) for x in rng.integers(1, 24, 2))
        Br, Bc = (int(x) for x in rng.integers(1, 7, 2))
        left, right = (int(x) for x in rng.integers(-1, 6, 2))
        fixed.append((Nq, Nk, Br, Bc, (left, right)))
    return fixed


def _tiles(Nq, Nk, Br, Bc):
    for i0 in range(0, Nq, Br):
        for j0 in range(0, Nk, Bc):
            yield i0, min(Nq, i0 + Br), j0, min(Nk, j0 + Bc)


def _picture(i0, i1, j0, j1, Nq, Nk, window):
    vis = dense_mask(Nq, Nk, window)
    lines = [f"    keys {j0}..{j1 - 1}; x = visible, . = hidden"]
    lines += [f"    row {i:3d}  " + " ".join("x" if vis[i, j] else "." for j in range(j0, j1)) for i in range(i0, i1)]
    return "\n".join(lines)


def check_skip_tile(skip_tile, *, seed=None) -> None:
    """Check `skip_tile(i0, i1, j0, j1, Nq, Nk, window) -> bool` on every tile of many grids."""
    task = "which tiles to skip"
    rng, seed = new_rng(seed)
    cases = _skip_cases(rng)
    answers = {}
    for Nq, Nk, Br, Bc, window in cases:
        for t in _tiles(Nq, Nk, Br, Bc):
            got = call(task, skip_tile, *t, Nq, Nk, window)
            if not isinstance(got, (bool, np.bool_)):
                fail(task, f"return True or False; got {got!r} ({type(got).__name__}) for tile {t}.", seed)
            answers[t + (Nq, Nk, window)] = bool(got)
    truth = {key: _skip_truth(*key) for key in answers}
    if answers == truth:
        n_skip = sum(truth.values())
        return passed(task, f"right on all {len(truth)} tiles of {len(cases)} grids ({n_skip} skipped): "
                            "causal with Nq <, = and > Nk, sliding windows, decode (Nq = 1)")
    for message, variant in _skip_variants():
        if all(variant(*key) == got for key, got in answers.items()):
            fail(task, message + ".", seed)
    key = next(k for k in answers if answers[k] != truth[k])
    i0, i1, j0, j1, Nq, Nk, window = key
    where = f"tile rows [{i0}, {i1}) x keys [{j0}, {j1}) with Nq={Nq}, Nk={Nk}, window={window}"
    if answers[key]:
        fail(task, f"you skip {where}, but some of its keys are visible (the output would be wrong):\n"
                   + _picture(*key), seed)
    fail(task, f"you keep {where}, but every key in it is hidden (wasted work):\n" + _picture(*key), seed)


# ---------------------------------------------------------------- block sizes from a fast-memory budget


def check_block_sizes(block_sizes, *, seed=None) -> None:
    """Check `block_sizes(M, d) -> (Br, Bc)` against flashkit.tiled.block_sizes (the paper's rule)."""
    task = "block sizes from a fast-memory budget"
    rng, seed = new_rng(seed)
    cases = [(65536, 64), (100000, 64), (65536, 96), (12288, 128), (1000, 3), (200, 64), (48 * 256, 80)]
    cases += [(int(rng.integers(100, 300000)), int(rng.choice([16, 32, 40, 64, 80, 96, 128, 256]))) for _ in range(5)]
    variants = [
        ("you rounded M / 4d down; the paper rounds up: Bc = ceil(M / (4 d))",
         lambda M, d: (min(M // (4 * d), d), M // (4 * d))),
        ("you rounded M / 4d down (with at least 1); the paper rounds up: Bc = ceil(M / (4 d))",
         lambda M, d: (min(max(1, M // (4 * d)), d), max(1, M // (4 * d)))),
        ("you forgot the 4: four tiles (Q_i, K_j, V_j and O_i) share the fast memory, so Bc = ceil(M / (4 d))",
         lambda M, d: (min(math.ceil(M / d), d), math.ceil(M / d))),
        ("you returned (Bc, Br); return (Br, Bc)", lambda M, d: tiled.block_sizes(M, d)[::-1]),
        ("Br = min(Bc, d), not Bc: a query block of more than d rows does not help",
         lambda M, d: (math.ceil(M / (4 * d)),) * 2),
        ("Br = min(Bc, d), not d: when the budget is small Bc < d and Br must shrink too",
         lambda M, d: (d, math.ceil(M / (4 * d)))),
    ]
    results = {}
    for M, d in cases:
        got = call(task, block_sizes, M, d)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            fail(task, f"return the pair (Br, Bc); got {got!r} for M={M}, d={d}.", seed)
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in got):
            fail(task, f"Br and Bc count rows, so return ints (math.ceil or -(-a // b)); got {got!r} for M={M}, d={d}.", seed)
        results[(M, d)] = tuple(int(x) for x in got)
    wrong = [(k, g) for k, g in results.items() if g != tiled.block_sizes(*k)]
    if not wrong:
        return passed(task, f"matches flashkit.tiled.block_sizes on {len(cases)} budgets (M from 200 to 300k floats)")
    for message, variant in variants:
        if all(tuple(variant(*k)) == g for k, g in results.items()):
            fail(task, message + ".", seed)
    (M, d), g = wrong[0]
    fail(task, f"for M={M} floats, d={d}: expected (Br, Bc) = {tiled.block_sizes(M, d)}, got {g}.", seed)


__all__ = ["check_fa2_tile", "check_skip_tile", "check_block_sizes", "ExerciseError"]


def __dir__():
    # Tab completion (dir) shows the checkers only, not the reference pieces they compare with.
    return __all__
