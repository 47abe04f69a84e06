"""Checker for writing a mask_mod (exercise 9, after notebook 13): packed documents, a sliding window,
causal when the window has no right side, aligned bottom-right as every flashkit mask.

Task signature:
    make_mask_mod(seq_lens, Nq, Nk, left, right) -> mask_mod(b, h, q_idx, kv_idx) -> bool
        seq_lens: lengths of the documents packed into the Nk key positions (they sum to Nk);
        the Nq queries are the LAST Nq positions (bottom-right: q_idx sits at position
        q_pos = q_idx + Nk - Nq); a query may attend to key kv_idx when both are in the same document
        and q_pos - left <= kv_idx <= q_pos + right (right = 0: causal, no key after the query).
The reference is built from flashkit.mods (document_ids, sliding_window), evaluated on every
(q_idx, kv_idx) pair; a wrong mask is diagnosed by the pairs it gets wrong, whatever the code looks like.
"""
from __future__ import annotations

import numpy as np

from flashkit.exercises.checking import ExerciseError, call, fail, new_rng, passed
from flashkit.mods import document_ids


def _want(seq_lens, Nq, Nk, left, right, *, offset=None, doc_offset=None, left_pad=0, right_pad=0, docs=True):
    """The dense (Nq, Nk) mask of the pattern, with one mistake switched on by the keywords."""
    off = Nk - Nq if offset is None else offset
    doff = off if doc_offset is None else doc_offset
    ids = document_ids(seq_lens)
    q = np.arange(Nq)[:, None]
    kv = np.arange(Nk)[None, :]
    q_pos, q_doc_pos = q + off, np.clip(q + doff, 0, Nk - 1)
    lo, hi = q_pos - (left + left_pad), q_pos + (right + right_pad)
    mask = (kv >= lo) & (kv <= hi)
    if docs:
        mask &= ids[q_doc_pos] == ids[kv]
    return mask


def _cases(rng):
    """(name, seq_lens, Nq, Nk, left, right): Nq < Nk (a chunk of queries at the end), Nq == Nk, causal
    (right = 0) and a window that looks ahead (right > 0, left != right, so swapped sides show)."""
    cases = []
    for n_docs, Nq, left, right in ((4, 13, 5, 0), (3, 30, 4, 0), (5, 9, 3, 2), (2, 24, 7, 0), (4, 17, 2, 5)):
        lens = rng.integers(3, 12, n_docs)
        Nk = int(lens.sum())
        Nq = min(Nq, Nk)
        if Nq == Nk and len(cases) != 1:
            Nq = Nk - 3
        what = "causal" if right == 0 else f"a window that looks {right} keys ahead"
        cases.append((f"seq_lens={list(map(int, lens))} (Nk={Nk}), Nq={Nq}, left={left}, right={right} ({what})",
                      [int(x) for x in lens], Nq, Nk, left, right))
    return cases


def _evaluate(task, mask_mod, Nq, Nk):
    out = np.zeros((Nq, Nk), bool)
    for i in range(Nq):
        for j in range(Nk):
            r = call(task, mask_mod, 0, 0, i, j)
            if not isinstance(r, (bool, np.bool_)):
                fail(task, f"mask_mod(0, 0, {i}, {j}) returned {r!r} ({type(r).__name__}); a mask_mod returns True "
                           "(may attend) or False, e.g. `return (a == b) and (c <= d)` (the comparisons are bools)")
            out[i, j] = bool(r)
    return out


def _pairs(mask, limit=3):
    idx = np.argwhere(mask)
    text = ", ".join(f"(q_idx={int(i)}, kv_idx={int(j)})" for i, j in idx[:limit])
    return text + (f" and {len(idx) - limit} more" if len(idx) > limit else "")


def _variants(seq_lens, Nq, Nk, left, right):
    w = lambda **kw: (lambda: _want(seq_lens, Nq, Nk, left, right, **kw))  # noqa: E731
    return [
        ("you aligned the queries top-left (q_pos = q_idx): the Nq queries are the LAST Nq positions, so "
         "q_pos = q_idx + Nk - Nq (bottom-right, as flashkit and FlashAttention >= 2.1). Top-left would let the "
         "last query see only the first keys", w(offset=0)),
        ("the window is aligned bottom-right but the document of a query is looked up at q_idx: the query's "
         "position is q_pos = q_idx + Nk - Nq, use it for doc[q_pos] too", w(doc_offset=0)),
        ("the document test uses q_pos but the window is aligned top-left (q_idx): use q_pos = q_idx + Nk - Nq "
         "in the window too", w(offset=0, doc_offset=None if Nq == Nk else Nk - Nq)),
        ("the window's sides are swapped: `left` counts keys BEFORE the query (q_pos - left <= kv_idx) and "
         "`right` keys after it (kv_idx <= q_pos + right)",
         lambda: _want(seq_lens, Nq, Nk, right, left)),
        ("there is no document mask: a query may only see keys of its own document (doc[q_pos] == doc[kv_idx])",
         w(docs=False)),
        ("your window is one key too narrow on the left: q_pos - left <= kv_idx keeps `left` keys before the "
         "query (<=, not <)", w(left_pad=-1)),
        ("your window is one key too wide on the left: q_pos - left <= kv_idx, not q_pos - left - 1 <= kv_idx",
         w(left_pad=1)),
        ("your window is one key too narrow on the right: kv_idx <= q_pos + right (with right = 0 the query "
         "still sees itself)", w(right_pad=-1)),
        ("your window is one key too wide on the right: kv_idx <= q_pos + right (with right = 0 a query sees "
         "no key after it)", w(right_pad=1)),
    ]


def _by_property(got, want, seq_lens, Nq, Nk, left, right) -> str:
    """A sentence naming what the wrong pairs have in common."""
    off = Nk - Nq
    starts = np.concatenate(([0], np.cumsum(seq_lens)[:-1]))
    edges = np.concatenate((starts, np.cumsum(seq_lens) - 1))  # first and last token of every document
    ids = document_ids(seq_lens)
    extra, missing = got & ~want, ~got & want
    bad = np.argwhere(extra | missing)
    if (np.isin(bad[:, 1], edges) | np.isin(bad[:, 0] + off, edges)).all():
        return ("every wrong pair involves the first or last token of a document (documents start at positions "
                f"{list(map(int, starts))}): your document boundaries are off by one. Document k covers positions "
                "[start_k, start_k + len_k), start_k = the sum of the lengths before it; "
                "np.repeat(np.arange(len(seq_lens)), seq_lens) gives each position's document")
    if extra.any() and not missing.any():
        e = np.argwhere(extra)
        q_pos, kv = e[:, 0] + off, e[:, 1]
        if (ids[q_pos] != ids[kv]).all():
            return f"you let pairs across documents through, e.g. {_pairs(extra)}: a query sees only its own document"
        if (kv > q_pos + right).all():
            return f"you let keys after q_pos + right through (right = {right}; 0 means causal), e.g. {_pairs(extra)}"
        if (kv < q_pos - left).all():
            return f"you let keys before q_pos - left through (left = {left}), e.g. {_pairs(extra)}"
    parts = []
    if extra.any():
        parts.append(f"lets through {int(extra.sum())} hidden pairs, e.g. {_pairs(extra)}")
    if missing.any():
        parts.append(f"hides {int(missing.sum())} visible pairs, e.g. {_pairs(missing)}")
    return ("your mask " + " and ".join(parts) + f" (here q_pos = q_idx + {off}). Check each condition alone: the "
            "same document, q_pos - left <= kv_idx, kv_idx <= q_pos + right")


def check_mask_mod(make_mask_mod, *, seed=None) -> None:
    """Check `make_mask_mod(seq_lens, Nq, Nk, left, right)`'s mask_mod on every (q_idx, kv_idx) of 5 layouts."""
    task = "a mask_mod for packed documents with a window"
    rng, seed = new_rng(seed)
    for case, seq_lens, Nq, Nk, left, right in _cases(rng):
        mask_mod = call(task, make_mask_mod, list(seq_lens), Nq, Nk, left, right)
        if not callable(mask_mod):
            fail(task, f"make_mask_mod must return a function mask_mod(b, h, q_idx, kv_idx); got a "
                       f"{type(mask_mod).__name__}", seed)
        got = _evaluate(task, mask_mod, Nq, Nk)
        want = _want(seq_lens, Nq, Nk, left, right)
        if np.array_equal(got, want):
            continue
        for message, variant in _variants(seq_lens, Nq, Nk, left, right):
            if np.array_equal(got, variant()):
                fail(task, f"on {case}: {message}.", seed)
        fail(task, f"on {case}: {_by_property(got, want, seq_lens, Nq, Nk, left, right)}.", seed)
    return passed(task, "right on every (q_idx, kv_idx) of 5 packed layouts (Nq < Nk and Nq = Nk, causal and "
                        "look-ahead windows)")


__all__ = ["check_mask_mod", "ExerciseError"]


def __dir__():
    # Tab completion (dir) shows the checker only, not the answer it compares with.
    return __all__
