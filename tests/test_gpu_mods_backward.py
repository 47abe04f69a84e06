"""Backward rung 2 with score_mod / mask_mod / block masks (flashkit/gpu/flash_mods_backward.py).

Without a GPU: the key-block-major tile lists against a NumPy oracle (which query tiles each key block must
visit, from the dense mask), the generated source compiled by the local nvcc (skipped without it), and the
registry. With a GPU (skipped without CuPy and a
CUDA device): gradients against the float64 reference on awkward shapes, through the public call."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

import flashkit
from flashkit import blockmask, masks, mods
from flashkit.gpu import _probe_tensor_cores
from flashkit.gpu import flash_mods_backward as fmb
from flashkit.gpu.flash import KERNEL_DIR
from flashkit.masks import FULL, PARTIAL, SKIP

REASON = _probe_tensor_cores()
needs_gpu = pytest.mark.skipif(REASON is not None, reason=str(REASON))
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


# ---- the tile lists, without a GPU ------------------------------------------------------------------------
def _oracle(visible, Br, Bc):
    """{(b, h, j): [(i, partial)]} from a dense (B, H, Nq, Nk) bool array: the query tiles key tile j has a
    visible score in, in order, and whether some score of the tile is hidden."""
    B, H, Nq, Nk = visible.shape
    out = {}
    for b in range(B):
        for h in range(H):
            for j in range(-(-Nk // Bc)):
                row = []
                for i in range(-(-Nq // Br)):
                    tile = visible[b, h, i * Br:(i + 1) * Br, j * Bc:(j + 1) * Bc]
                    if tile.any():
                        row.append((i, not tile.all()))
                out[(b, h, j)] = row
    return out


@pytest.mark.parametrize("Nq, Nk, window, Br, Bc", [(77, 203, (-1, -1), 32, 64), (300, 130, (-1, 0), 64, 128),
                                                    (129, 129, (20, 5), 64, 64), (1, 1, (-1, -1), 64, 128)])
def test_key_major_lists_match_the_dense_mask(Nq, Nk, window, Br, Bc):
    docs = mods.document_mask([max(1, Nq // 3), Nq - max(1, Nq // 3)] if Nq > 1 else [1],
                              [max(1, Nk // 3), Nk - max(1, Nk // 3)] if Nk > 1 else [1])
    B, H = 2, 1
    mod = blockmask.classify_numpy(docs, 1, 1, Nq, Nk, Br, Bc)
    win = masks.block_map(Nq, Nk, Br, Bc, window)
    start, count, index, _ = fmb.key_major_lists(win, mod)
    qi, ki = np.arange(Nq)[:, None], np.arange(Nk)[None, :]
    dense = masks.dense_mask(Nq, Nk, window) if tuple(window) != (-1, -1) else np.ones((Nq, Nk), bool)
    visible = np.broadcast_to(dense & docs(0, 0, qi, ki), (B, H, Nq, Nk))
    want = _oracle(visible, Br, Bc)
    assert count.shape == (1, 1, win.shape[1])  # rows: key tiles (the axes swapped)
    for (_, _, j), row in want.items():
        s, n = int(start[0, 0, j]), int(count[0, 0, j])
        got = [(int(e) >> 1, bool(e & 1)) for e in index[s:s + n]]
        # every tile with a visible score is visited, in order; the others visited are those the window and the
        # mask_mod each call PARTIAL (block-level classification cannot see that they miss each other)
        listed = [i for i, _ in got]
        assert listed == sorted(listed) and {i for i, _ in row} <= set(listed), (j, got, row)
        assert listed == [i for i in range(win.shape[0]) if win[i, j] != SKIP and mod[0, 0, i, j] != SKIP]
        # the flag marks the mask_mod's PARTIAL tiles (the window's own the kernel finds itself): every tile
        # the oracle calls partial is PARTIAL for the window or flagged, and no flagged tile is FULL for both
        for (i, flag), (_, partial) in zip(got, row):
            if partial:
                assert flag or win[i, j] == PARTIAL, (i, j)
            if flag:
                assert mod[0, 0, i, j] == PARTIAL


def test_key_major_lists_per_head_and_bits_offsets():
    states = np.array([[[[FULL, SKIP], [PARTIAL, FULL]], [[SKIP, SKIP], [FULL, PARTIAL]]]], np.int8)  # (1, 2, 2, 2)
    win = np.full((2, 2), FULL, np.int8)
    offsets = np.where(states == PARTIAL, np.arange(states.size).reshape(states.shape) * 10, -1)
    start, count, index, bits_at = fmb.key_major_lists(win, states, offsets)
    assert count.tolist() == [[[2, 1], [1, 1]]]  # head 0: key tile 0 sees query tiles 0, 1; key tile 1 sees 1
    rows = [[(int(index[s + k]), int(bits_at[s + k])) for k in range(n)]
            for s, n in zip(start.ravel(), count.ravel())]
    assert rows == [[(0, -1), (3, 20)], [(2, -1)], [(2, -1)], [(3, 70)]]


# ---- the generated CUDA, without a GPU ----------------------------------------------------------------------
def test_source_has_the_hooks_and_the_derivative():
    text = fmb.source(mods.softcap(20.0), mods.document_mask([10, 20]), bits=True)
    for word in ("fks_score_mod", "fkd_score_grad", "fkm_mask_mod", "#define FK_LSE_COUNTS 1", "#define FK_HAS_BITS 1",
                 "backward rung 2"):
        assert word in text
    assert "fkd_score_grad" not in fmb.source(None, mods.document_mask([10, 20]))


def _ptx(tmp_path, name, text, d=64, Br=128, Bc=128):
    src = tmp_path / f"{name}.cu"
    src.write_text(text)
    run = subprocess.run(["nvcc", "-ptx", "-arch=sm_90", f"-DHEAD_DIM={d}", f"-DBR={Br}", f"-DBC={Bc}",
                          f"-I{KERNEL_DIR}", "-o", str(tmp_path / f"{name}.ptx"), str(src)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return (tmp_path / f"{name}.ptx").read_text()


@needs_nvcc
@pytest.mark.parametrize("score_mod, mask_mod, bits", [
    (mods.softcap(20.0), mods.document_mask([100, 200]), True),
    (mods.alibi(mods.alibi_slopes(4)), mods.sliding_window(300, 300, 30, 0), False),
    (None, mods.prefix_lm(np.array([5, 9]), 300, 300), False),
])
def test_generated_backward_compiles_with_nvcc(tmp_path, score_mod, mask_mod, bits):
    ptx = _ptx(tmp_path, "bwd", fmb.source(score_mod, mask_mod, bits))
    assert ".entry flash_bwd" in ptx and ".entry bwd_lse_check" in ptx


# ---- the registry --------------------------------------------------------------------------------------------
def test_backends_show_the_backward_mods():
    rows = {b["name"]: b for b in flashkit.backends()}
    assert rows["cupy-bwd-mma"]["backward_mods"] and not rows["cupy-bwd-mma"]["mods"]
    assert not rows["cupy-bwd-wgmma"]["backward_mods"]


# ---- on the GPU ----------------------------------------------------------------------------------------------
def _case(shape, kw, seed):
    import cupy

    from flashkit import problem as problem_mod

    B, Hq, Hkv, Nq, Nk, d = shape
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal(s).astype(np.float16)
                   for s in ((B, Hq, Nq, d), (B, Hkv, Nk, d), (B, Hkv, Nk, d), (B, Hq, Nq, d)))
    x64 = [a.astype(np.float64) for a in (q, k, v, do)]
    o64, lse64 = flashkit.attention(*x64[:3], backend="numpy-standard", return_lse=True, **kw)
    ref = flashkit.attention_backward(x64[3], *x64[:3], o64, lse64, backend="numpy-standard", **kw)
    o16 = cupy.asarray(o64.astype(np.float16))
    problem_mod.POISON = True
    try:
        got = flashkit.attention_backward(cupy.asarray(do), *(cupy.asarray(a) for a in (q, k, v)), o16,
                                          cupy.asarray(lse64.astype(np.float32)), **kw)
    finally:
        problem_mod.POISON = False
    return [cupy.asnumpy(g).astype(np.float64) for g in got], ref, lse64


@needs_gpu
@pytest.mark.parametrize("name", ["softcap causal", "alibi window GQA", "document", "prefix_lm Nq>Nk"])
def test_gradients_against_the_float64_reference(name):
    shape = {"softcap causal": (1, 2, 2, 77, 203, 64), "alibi window GQA": (2, 4, 2, 129, 129, 64),
             "document": (1, 2, 1, 300, 130, 128), "prefix_lm Nq>Nk": (1, 2, 2, 150, 100, 64)}[name]
    B, Hq, Hkv, Nq, Nk, d = shape
    kw = {"softcap causal": dict(score_mod=mods.softcap(5.0), causal=True),
          "alibi window GQA": dict(score_mod=mods.alibi(mods.alibi_slopes(Hq)), window=(33, 0)),
          "document": dict(mask_mod=mods.document_mask([100, 200], [50, 80])),
          "prefix_lm Nq>Nk": dict(mask_mod=mods.and_masks(mods.prefix_lm(np.array([20]), Nq, Nk),
                                                          mods.causal(Nq, Nk)))}[name]
    got, ref, lse = _case(shape, kw, seed=len(name))
    for g, r, label in zip(got, ref, ("dq", "dk", "dv")):
        assert not np.isnan(g).any(), label
        err = np.abs(g - r).max() / max(1.0, np.abs(r).max())
        assert err < 2e-2, (name, label, err)
    assert (got[0][np.isneginf(lse)] == 0).all()  # rows that see no key: dq = 0


@needs_gpu
def test_out_of_bounds_mod_raises():
    import cupy

    ids = np.arange(10)

    def bad(score, b, h, q_idx, kv_idx):
        return score + ids[kv_idx]

    q = cupy.asarray(np.random.default_rng(0).standard_normal((1, 1, 40, 64)).astype(np.float16))
    o, lse = flashkit.attention(q, q, q, score_mod=mods.identity, return_lse=True)
    with pytest.raises(IndexError, match="out of bounds"):
        flashkit.attention_backward(q, q, q, q, o, lse, score_mod=bad)


@needs_gpu
@pytest.mark.parametrize("name", ["random GQA Nq<Nk", "causal + mask MQA Nq>Nk d=128", "per-head + softcap",
                                  "documents aligned"])
def test_bool_mask_gradients_against_the_float64_reference(name):
    """mask= on backward rung 2 (the tiles classified on the GPU, PARTIAL ones as bits), through the public call:
    "auto" picks it for fp16; against numpy-standard in float64 with the same mask, rows it hides give dq = 0."""
    import cupy

    from flashkit import problem as problem_mod

    shape, extra = {"random GQA Nq<Nk": ((2, 4, 2, 77, 203, 64), {}),
                    "causal + mask MQA Nq>Nk d=128": ((1, 2, 1, 300, 130, 128), dict(causal=True)),
                    "per-head + softcap": ((1, 2, 2, 129, 129, 64), dict(score_mod=mods.softcap(5.0))),
                    "documents aligned": ((1, 2, 2, 256, 256, 64), {})}[name]
    B, Hq, Hkv, Nq, Nk, d = shape
    rng = np.random.default_rng(len(name))
    if name == "documents aligned":  # Nk % 16 == 0: the 16-byte loads of the classifier; whole tiles empty and full
        doc = np.repeat(np.arange(4), Nq // 4)
        mask = (doc[:, None] == doc[None, :])[None, None]
        mask = np.ascontiguousarray(mask & (rng.random((1, 1, Nq, Nk)) < 0.97))
    else:
        mask = rng.random((B if name != "per-head + softcap" else 1, Hq if name == "per-head + softcap" else 1,
                           Nq, Nk)) < 0.7
        mask[..., 5, :] = False  # a row that sees no key
        mask[..., :64, :64] = True  # a FULL tile
    q, k, v, do = (rng.standard_normal(s).astype(np.float16)
                   for s in ((B, Hq, Nq, d), (B, Hkv, Nk, d), (B, Hkv, Nk, d), (B, Hq, Nq, d)))
    x64 = [a.astype(np.float64) for a in (q, k, v, do)]
    o64, lse64 = flashkit.attention(*x64[:3], mask=mask, backend="numpy-standard", return_lse=True, **extra)
    ref = flashkit.attention_backward(x64[3], *x64[:3], o64, lse64, mask=mask, backend="numpy-standard", **extra)
    dev = [cupy.asarray(a) for a in (do, q, k, v)] + [cupy.asarray(o64.astype(np.float16)),
                                                      cupy.asarray(lse64.astype(np.float32))]
    p = flashkit.validate.check_backward(*dev, mask=cupy.asarray(mask), **extra)
    assert flashkit.registry.choose(p, "auto", direction="backward").name in ("cupy-bwd-mma",)
    problem_mod.POISON = True
    try:
        got = flashkit.attention_backward(*dev, mask=cupy.asarray(mask), **extra)
    finally:
        problem_mod.POISON = False
    got = [cupy.asnumpy(g).astype(np.float64) for g in got]
    for g, r, label in zip(got, ref, ("dq", "dk", "dv")):
        assert not np.isnan(g).any(), (name, label)
        err = np.abs(g - r).max() / max(1.0, np.abs(r).max())
        assert err < 2e-2, (name, label, err)
    assert (got[0][np.isneginf(lse64)] == 0).all()
    wrong = dev[5].copy()
    wrong[0, 0, Nq - 1] = -np.inf  # lse = -inf on a row the mask lets see keys: the lse check must catch it
    with pytest.raises(ValueError, match="lse does not belong"):
        flashkit.attention_backward(*dev[:5], wrong, mask=cupy.asarray(mask), **extra)
