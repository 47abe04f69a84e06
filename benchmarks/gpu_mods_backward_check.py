"""Check and measure the GPU backward with score_mod / mask_mod / block masks (backward rung 2, issue 12).

    python -m benchmarks.gpu_mods_backward_check [out_dir]     (or main(out_dir) from benchmarks/gpu_session.py)
    python -m benchmarks.gpu_mods_backward_check --sanitize    one small launch of each path, for compute-sanitizer
    (--no-bench: the checks alone; --bench-only: the measurements alone, added to the file the checks wrote)

1. correctness: dq, dk, dv of every mod of flashkit.mods and two written by a user, alone and with causal,
   windows, GQA, Nq != Nk, a block mask regridded to the rung's tiles, and rows the mods hide entirely (their
   gradients must be 0), on awkward shapes, through flashkit.attention_backward with the gradients poisoned
   (NaN) first, against the float64 reference (numpy-standard with the same mods on float64 copies). The
   criterion is check_backward's: err <= 2 x the error of the same backward computed in float16 (S, P, dP,
   dS and each product rounded) + twice float16's rounding step at the gradient's magnitude;
2. bad mods and bad lse: an index out of bounds (score_mod, its derivative, mask_mod), a division by zero, a
   NaN score, a non-differentiable score_mod, a lse from another call, a lse = -inf row the mods let see keys:
   each raises the error it should;
3. measured (fp16, N = 4096, B = 4, H x d = 2048, d = 64 and 128): backward rung 2 with identity and with softcap(50)
   against the plain rung, the kernels alone and the public call; a document mask (8 documents) as a block mask
   against the same mask with every tile visited (BlockMask.without_sparsity), N = 4096 and 16384, H = 16; torch
   FlexAttention's backward (compiled) on the same document mask at N = 16384 and its softcap cost at d = 64,
   where the machine's torch runs it; the same document mask as a dense bool mask= (rung 2 classifying its tiles
   on the GPU, and cupy-standard's O(N^2) backward at N = 4096).
Writes gpu-mods-backward-<card>.json to out_dir (default: $OUT, else benchmarks/results). The NVRTC builds
are made first by a pool of processes (they fill CuPy's on-disk cache).
"""
from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

import flashkit
from benchmarks.gpu_mods_check import _time, _user_band, _user_softcap_if, expect_raises  # shared with the forward's check
from flashkit import mods

RUNG = "cupy-bwd-mma"
SHAPES = (  # B, Hq, Hkv, Nq, Nk, d: none a multiple of the tiles (128 x 128 at d = 64, 64 x 128 at d = 128)
    (2, 4, 2, 77, 203, 64),    # GQA 4/2, Nq < Nk
    (1, 2, 1, 300, 130, 128),  # MQA, Nq > Nk: with causal the first 170 rows see no key
    (2, 2, 2, 129, 129, 64),
)


def cases(shape):
    """[(name, kwargs of attention and attention_backward)] for one shape, rebuilt the same way in every process."""
    B, Hq, Hkv, Nq, Nk, d = shape
    rng = np.random.default_rng(Nq * 1000 + Nk)
    half_q, half_k = max(1, Nq // 3), max(1, Nk // 3)
    docs = mods.document_mask([half_q, Nq - half_q], [half_k, Nk - half_k])
    offset = Nk - Nq

    def hidden_rows(b, h, q_idx, kv_idx):  # every 5th row sees no key: lse = -inf, gradients 0
        return (q_idx % 5 != 2) & (kv_idx <= q_idx + offset + 40)

    return [
        ("identity + causal", dict(score_mod=mods.identity, causal=True)),
        ("softcap(5) + causal", dict(score_mod=mods.softcap(5.0), causal=True)),
        ("alibi + window", dict(score_mod=mods.alibi(mods.alibi_slopes(Hq), offset=offset), window=(33, 0))),
        ("relative_position_bias", dict(score_mod=mods.relative_position_bias(rng.standard_normal((Hq, 32)), True, 64))),
        ("causal mod", dict(mask_mod=mods.causal(Nq, Nk))),
        ("sliding_window(16, 4)", dict(mask_mod=mods.sliding_window(Nq, Nk, 16, 4))),
        ("document_mask", dict(mask_mod=docs)),
        ("prefix_lm per batch + window", dict(mask_mod=mods.prefix_lm(np.arange(B) * 7 + 5, Nq, Nk), window=(40, 3))),
        ("dilated", dict(mask_mod=mods.dilated(Nq, Nk, 8, 2, 3))),
        ("strided", dict(mask_mod=mods.strided(Nq, Nk, 5))),
        ("global_window", dict(mask_mod=mods.global_window(Nq, Nk, 3, 6))),
        ("rows fully hidden by the mask_mod", dict(mask_mod=hidden_rows)),
        ("user score_mod (if, math) + document", dict(score_mod=_user_softcap_if, mask_mod=docs)),
        ("user mask_mod (and, not, %) + softcap", dict(mask_mod=_user_band, score_mod=mods.softcap(3.0))),
        ("softcap + and_masks(document, causal) block mask 64x64",
         dict(score_mod=mods.softcap(20.0), block_mask=(mods.and_masks(docs, mods.causal(Nq, Nk)), (64, 64)))),
    ]


def _materialise(kw, Nq, Nk):
    kw = dict(kw)
    if "block_mask" in kw:
        fn, bs = kw["block_mask"]
        kw["block_mask"] = flashkit.block_mask(fn, None, None, Nq, Nk, block_size=bs, engine="numpy")
    return kw


def _inputs(shape, seed):
    B, Hq, Hkv, Nq, Nk, d = shape
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float16)
            for s in ((B, Hq, Nq, d), (B, Hkv, Nk, d), (B, Hkv, Nk, d), (B, Hq, Nq, d))]


def _compile_one(job):
    """In a worker process: build (not run) the kernels of one case, filling CuPy's disk cache."""
    si, ci = job
    import cupy

    from flashkit import validate
    from flashkit.gpu import flash_mods_backward as fmb

    shape = SHAPES[si]
    name, kw = cases(shape)[ci]
    B, Hq, Hkv, Nq, Nk, d = shape
    q = cupy.zeros((B, Hq, Nq, d), cupy.float16)
    k = cupy.zeros((B, Hkv, Nk, d), cupy.float16)
    lse = cupy.zeros((B, Hq, Nq), cupy.float32)
    p = validate.check_backward(q, q, k, k, q, lse, finite=False, **_materialise(kw, Nq, Nk))
    t0 = time.perf_counter()
    fmb.prepare(p)
    return name, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# 1. correctness
# ---------------------------------------------------------------------------------------------
def lowp_reference(q, k, v, do, o16, lse, kw):
    """(dQ, dK, dV) of standard attention with the mods, computed as a framework does in float16: float32
    arithmetic with S, P, dP, dS and each product rounded to float16, D from the O the kernel was handed."""
    from flashkit import blockmask, mods_grad, reference, validate
    from flashkit.gpu.check_backward import round_to

    def rnd(x):
        return round_to(x, "f16", np)

    Q, K, V, dO, O = (x.astype(np.float32) for x in (q, k, v, do, o16))
    p = validate.check(Q, K, V, finite=False, **kw)
    B, Hkv, g, Nq, Nk, d = p.B, p.Hkv, p.group, p.Nq, p.Nk, p.d
    Q5, dO5, O5 = (x.reshape(B, Hkv, g, Nq, d) for x in (Q, dO, O))  # (B, Hkv, group, Nq, d)
    K4, V4 = K[:, :, None], V[:, :, None]  # (B, Hkv, 1, Nk, d)
    S = rnd(Q5 @ K4.transpose(0, 1, 2, 4, 3) * np.float32(p.scale))  # (B, Hkv, group, Nq, Nk)
    vis = reference.visibility(p)
    if vis is not None:
        S = np.where(vis, S, -np.inf).astype(np.float32)
    S_raw = S
    S = reference.modified_scores(S, p).astype(np.float32)
    lse5 = lse.reshape(B, Hkv, g, Nq).astype(np.float32)
    empty = np.isneginf(lse5)
    with np.errstate(invalid="ignore", over="ignore"):
        P = np.exp(S - np.where(empty, 0, lse5)[..., None])
    P = rnd(np.where(empty[..., None], 0, P))
    dV = rnd((P.transpose(0, 1, 2, 4, 3) @ dO5).sum(axis=2))
    dP = rnd(dO5 @ V4.transpose(0, 1, 2, 4, 3))
    D = (dO5 * O5).sum(axis=-1)
    dS = P * (dP - D[..., None])
    if p.score_mod is not None:
        visible = (S > -np.inf).reshape(B, p.Hq, Nq, Nk)
        scores = np.where(visible, S_raw.reshape(B, p.Hq, Nq, Nk), 0).astype(np.float32)
        slope = blockmask.evaluate("score_mod", mods_grad.derivative(p.score_mod),
                                   (scores,) + reference.index_grid(np.arange(B), np.arange(p.Hq), 0, Nq, 0, Nk),
                                   where=visible)
        slope = np.broadcast_to(slope, (B, p.Hq, Nq, Nk)).reshape(dS.shape)
        with np.errstate(invalid="ignore", over="ignore"):
            dS = np.where(P > 0, dS * slope, 0)
    dS = rnd(dS)
    dQ = rnd(rnd(dS @ K4) * np.float32(p.scale)).reshape(B, p.Hq, Nq, d)
    dK = rnd(rnd((dS.transpose(0, 1, 2, 4, 3) @ Q5).sum(axis=2)) * np.float32(p.scale))
    return dQ, dK, dV


def compare(got, ref, lowp):
    """check_backward's criterion for one gradient: (ok, err, tol, lowp error)."""
    from flashkit.gpu.check_backward import round_to

    err = float(np.abs(np.where(np.isfinite(got), got - ref, 0)).max()) if got.size else 0.0
    lp_err = float(np.abs(lowp - ref).max()) if got.size else 0.0
    w = round_to(ref, "f16", np)
    atol = 2 * float(np.abs(round_to(w + 0.3, "f16", np) - 0.3 - w).max()) if got.size else 0.0
    tol = 2 * lp_err + atol
    return bool(np.isfinite(got).all() and err <= tol), err, tol, lp_err


def check_case(shape, name, kw, seed):
    import cupy

    from flashkit import problem as problem_mod

    B, Hq, Hkv, Nq, Nk, d = shape
    q, k, v, do = _inputs(shape, seed)
    kw = _materialise(kw, Nq, Nk)
    x64 = [a.astype(np.float64) for a in (q, k, v, do)]
    o64, lse64 = flashkit.attention(*x64[:3], backend="numpy-standard", return_lse=True, **kw)
    ref = flashkit.attention_backward(x64[3], *x64[:3], o64, lse64, backend="numpy-standard", **kw)
    o16 = o64.astype(np.float16)
    lse32 = lse64.astype(np.float32)
    lowp = lowp_reference(q, k, v, do, o16, lse32, kw)
    problem_mod.POISON = True  # the gradients start as NaN: an element the kernel forgets stays NaN
    try:
        got = flashkit.attention_backward(cupy.asarray(do), *(cupy.asarray(a) for a in (q, k, v)), cupy.asarray(o16),
                                          cupy.asarray(lse32), backend=RUNG, **kw)
    finally:
        problem_mod.POISON = False
    got = [cupy.asnumpy(g).astype(np.float64) for g in got]
    row = {"shape": list(shape), "case": name, "seed": seed, "ok": True,
           "criterion": "err <= 2 x float16 reference's err + 2 x float16 step (check_backward)"}
    for label, g, r, lp in zip(("dq", "dk", "dv"), got, ref, lowp):
        ok, err, tol, lp_err = compare(g, r, lp.astype(np.float64))
        row[label] = {"ok": ok, "err": err, "tol": tol, "ref_lowp_err": lp_err, "nan": bool(np.isnan(g).any())}
        if not ok:
            bad = np.argwhere(~(np.abs(g - r) <= tol))[:3]
            row[label]["first_mismatches"] = "; ".join(f"{tuple(int(x) for x in i)}: got {g[tuple(i)]:.5g}, want "
                                                      f"{r[tuple(i)]:.5g}" for i in bad)
        row["ok"] = row["ok"] and ok
    dead = np.isneginf(lse64)
    row["dead_rows"] = int(dead.sum())
    row["dead_rows_zero"] = bool((got[0][dead] == 0).all())
    row["ok"] = row["ok"] and row["dead_rows_zero"]
    return row


def check_cases(log):
    rows = []
    for si, shape in enumerate(SHAPES):
        for ci, (name, kw) in enumerate(cases(shape)):
            try:
                row = check_case(shape, name, kw, seed=100 * si + ci)
            except Exception as exc:  # a failure is a result row, not the end of the run
                row = {"shape": list(shape), "case": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                       "trace": traceback.format_exc()[-1500:]}
            rows.append(row)
            if "error" in row:
                log(f"  BAD {shape} {name}: {row['error'][:300]}")
            else:
                log(f"  {'ok ' if row['ok'] else 'BAD'} {shape} {name}: " + ", ".join(
                    f"{g} {row[g]['err']:.1e}/{row[g]['tol']:.1e}" for g in ("dq", "dk", "dv"))
                    + f"; dead rows {row['dead_rows']}" + ("" if row["dead_rows_zero"] else " NOT 0"))
    return rows


# ---------------------------------------------------------------------------------------------
# 2. bad mods, bad lse
# ---------------------------------------------------------------------------------------------
def bad_cases(log):
    import cupy

    from flashkit.gpu.modlang import UnsupportedMod

    N, d = 70, 64
    ids = np.arange(N)
    rng = np.random.default_rng(1)
    q, k, v, do = (cupy.asarray(rng.standard_normal((1, 2, N, d)).astype(np.float16)) for _ in range(4))

    def oob_score(score, b, h, q_idx, kv_idx):
        return score + ids[kv_idx + 5] * 0.0

    def oob_mask(b, h, q_idx, kv_idx):
        return ids[q_idx + 3] >= 0

    def div_zero(score, b, h, q_idx, kv_idx):
        return score / (kv_idx - kv_idx)

    def nan_score(score, b, h, q_idx, kv_idx):
        big = 1e308 * 10.0
        return score + (big - big) if kv_idx == 3 else score

    def mod_by_score(score, b, h, q_idx, kv_idx):  # (floor and int have a derivative: 0, almost everywhere)
        return score - score % (score * score + 1.0)

    def loops(b, h, q_idx, kv_idx):
        for _ in range(2):
            pass
        return True

    def everything_hidden_but_diagonal(b, h, q_idx, kv_idx):
        return q_idx == kv_idx

    o, lse = flashkit.attention(q, k, v, return_lse=True)  # no mod: what a wrong lse looks like
    o_c, lse_c = flashkit.attention(q, k, v, return_lse=True, mask_mod=everything_hidden_but_diagonal)
    lse_dead = lse_c.copy()
    lse_dead[0, 0, 10] = -cupy.inf  # a row the mask_mod lets see key 10, with lse = -inf
    cases_ = [
        ("score_mod index out of bounds", dict(score_mod=oob_score), (o, lse), IndexError, "out of bounds"),
        ("mask_mod index out of bounds", dict(mask_mod=oob_mask), (o, lse), IndexError, "out of bounds"),
        ("division by zero", dict(score_mod=div_zero), (o, lse), ZeroDivisionError, "division by zero"),
        ("a NaN score", dict(score_mod=nan_score), (o, lse), ValueError, "kv_idx=3"),
        ("a score_mod without a derivative (% by the score)", dict(score_mod=mod_by_score), (o, lse), TypeError,
         "cannot differentiate"),
        ("a for loop", dict(mask_mod=loops), (o, lse), UnsupportedMod, "For"),
        ("a lse from another call", dict(mask_mod=everything_hidden_but_diagonal), (o, lse), ValueError,
         "lse does not belong"),
        ("lse = -inf on a row that sees a key", dict(mask_mod=everything_hidden_but_diagonal), (o_c, lse_dead),
         ValueError, "lse does not belong"),
    ]
    return expect_raises([(name, lambda kw=kw, o_=o_, lse_=lse_: flashkit.attention_backward(do, q, k, v, o_, lse_,
                                                                                          backend=RUNG, **kw),
                           exc_type, words) for name, kw, (o_, lse_), exc_type, words in cases_], log)


# ---------------------------------------------------------------------------------------------
# 3. measured
# ---------------------------------------------------------------------------------------------
def _grads_inputs(B, H, N, d):
    import cupy

    q, k, v, do = (cupy.random.standard_normal((B, H, N, d), dtype=cupy.float32).astype(cupy.float16)
                   for _ in range(4))
    return q, k, v, do


def bench_mod_cost(log, N=4096, B=4, dims=(64, 128)):
    """The plain rung against identity and softcap(50): the kernels alone (preprocess, main, convert) and
    the public call, fp16; ratios of minima taken in this run."""
    from flashkit import validate
    from flashkit.gpu import backward as gb
    from flashkit.gpu import flash_mods_backward as fmb

    rows = []
    for d in dims:
        H = 2048 // d
        q, k, v, do = _grads_inputs(B, H, N, d)
        for causal in (False, True):
            o, lse = flashkit.attention(q, k, v, causal=causal, return_lse=True)
            row = {"N": N, "B": B, "H": H, "d": d, "causal": causal, "dtype": "float16",
                   "block": list(fmb.blocks(validate.check(q, k, v)))}
            win = (-1, 0) if causal else (-1, -1)
            row["kernel_none"] = _time(lambda: gb.backward(RUNG, q, k, v, o, do, lse, scale=d ** -0.5, window=win))
            row["public_none"] = _time(lambda: flashkit.attention_backward(do, q, k, v, o, lse, causal=causal,
                                                                           backend=RUNG))
            for label, sm in (("identity", mods.identity), ("softcap50", mods.softcap(50.0))):
                o_m, lse_m = flashkit.attention(q, k, v, causal=causal, score_mod=sm, return_lse=True)
                p = validate.check_backward(do, q, k, v, o_m, lse_m, causal=causal, score_mod=sm, finite=False)
                launch, finish, *_ = fmb.prepare(p)
                launch()
                finish()
                row[f"kernel_{label}"] = _time(launch)
                row[f"public_{label}"] = _time(lambda: flashkit.attention_backward(
                    do, q, k, v, o_m, lse_m, causal=causal, score_mod=sm, backend=RUNG))
                row[f"ratio_kernel_{label}"] = row[f"kernel_{label}"]["min_ms"] / row["kernel_none"]["min_ms"]
                row[f"ratio_public_{label}"] = row[f"public_{label}"]["min_ms"] / row["public_none"]["min_ms"]
                if label == "softcap50":  # beside it, the generic hooks (the cap not folded: flash_mods.softcap_of)
                    from flashkit.gpu import flash_mods

                    with flash_mods.generic_softcap():
                        generic, finish_g, *_ = fmb.prepare(p)
                        generic()
                        finish_g()
                    row["kernel_softcap50_generic"] = _time(generic)
                    row["ratio_kernel_softcap50_generic"] = (row["kernel_softcap50_generic"]["min_ms"]
                                                             / row["kernel_none"]["min_ms"])
                # the other tiles the rung allows at this d beside its default (at 128 x 128 with a derivative
                # kept per score ptxas spills; 64 x 128 does not)
                for other in gb.rung_of(RUNG).allowed(d):
                    if tuple(other) == tuple(row["block"]) or other[1] != 128:
                        continue
                    p = validate.check_backward(do, q, k, v, o_m, lse_m, causal=causal, score_mod=sm, finite=False,
                                                block_size=other)
                    launch, finish, *_ = fmb.prepare(p)
                    launch()
                    finish()
                    tag = f"kernel_{label}_{other[0]}x{other[1]}"
                    row[tag] = _time(launch)
                    row[f"ratio_{tag}"] = row[tag]["min_ms"] / row["kernel_none"]["min_ms"]
                    log(f"    {label} at {other[0]} x {other[1]}: x{row[f'ratio_{tag}']:.3f} the plain rung's default")
            flops = validate.check(q, k, v, causal=causal).flops() * 2.5
            row["tflops_kernel_none"] = flops / (row["kernel_none"]["min_ms"] * 1e-3) / 1e12
            rows.append(row)
            log(f"  d={d} causal={causal}: none {row['kernel_none']['min_ms']:.2f} ms "
                f"({row['tflops_kernel_none']:.0f} TFLOP/s); identity x{row['ratio_kernel_identity']:.3f} (public "
                f"x{row['ratio_public_identity']:.3f}); softcap x{row['ratio_kernel_softcap50']:.3f} (public "
                f"x{row['ratio_public_softcap50']:.3f}; the generic hooks x{row['ratio_kernel_softcap50_generic']:.3f})")
    return rows


def bench_documents(log, N, H=16, d=64, n_docs=8, flex=False):
    """A document mask of 8 equal documents: its block mask against every tile visited (the same mask_mod,
    BlockMask.without_sparsity), the kernels alone and the public call."""
    from flashkit import validate
    from flashkit.gpu import flash_mods_backward as fmb

    lens = [N // n_docs] * n_docs
    doc_mask = mods.document_mask(lens)
    q, k, v, do = _grads_inputs(1, H, N, d)
    bm = flashkit.block_mask(doc_mask, None, None, N, N, block_size=(128, 128), engine="cuda")
    out = {"N": N, "H": H, "d": d, "B": 1, "documents": n_docs, "dtype": "float16"}
    o, lse = flashkit.attention(q, k, v, block_mask=bm, return_lse=True)
    for label, mask in (("block_mask", bm), ("every_tile", bm.without_sparsity())):
        p = validate.check_backward(do, q, k, v, o, lse, block_mask=mask, finite=False)
        out[f"{label}_tiles"] = fmb.visited_tiles(p)
        launch, finish, *_ = fmb.prepare(p)
        launch()
        finish()
        out[f"{label}_kernel"] = _time(launch, repeats=5)
        out[f"{label}_public"] = _time(lambda: flashkit.attention_backward(do, q, k, v, o, lse, block_mask=mask,
                                                                           backend=RUNG), repeats=5)
    out["speedup_kernel"] = out["every_tile_kernel"]["min_ms"] / out["block_mask_kernel"]["min_ms"]
    out["speedup_public"] = out["every_tile_public"]["min_ms"] / out["block_mask_public"]["min_ms"]
    t = out["block_mask_tiles"]
    out["visible_fraction_tiles"] = t["visited"] / t["total"]
    log(f"  documents N={N}: tiles visited {out['visible_fraction_tiles']:.3f}; block mask "
        f"{out['block_mask_kernel']['min_ms']:.2f} ms (public {out['block_mask_public']['min_ms']:.2f}), every tile "
        f"{out['every_tile_kernel']['min_ms']:.2f} ms (public {out['every_tile_public']['min_ms']:.2f}): "
        f"x{out['speedup_kernel']:.2f} kernel, x{out['speedup_public']:.2f} public")
    if flex:
        out["flex"] = flex_backward(log, q, k, v, do, mask_lens=lens)
        if "min_ms" in out["flex"]:
            out["ratio_flashkit_public_vs_flex"] = out["flex"]["min_ms"] / out["block_mask_public"]["min_ms"]
            gq, gk, gv = flashkit.attention_backward(do, q, k, v, o, lse, block_mask=bm, backend=RUNG)
            out["flex"]["max_diff_vs_flashkit"] = [float(abs(a.astype("float32") - b.astype("float32")).max())
                                                   for a, b in zip((gq, gk, gv), out["flex"].pop("grads"))]
        out["flex"].pop("grads", None)
    return out


def bench_bool_mask(log, N, H=16, d=64, n_docs=8):
    """The same document mask as a dense bool mask= (1, 1, N, N) on the GPU: backward rung 2 with the tiles
    classified on the GPU in the call (what "auto" picks for fp16) against the block mask, and, at N <= 4096,
    cupy-standard's backward (P and dP materialised); the public calls, and the largest difference of the
    gradients from the block mask's."""
    import cupy

    q, k, v, do = _grads_inputs(1, H, N, d)
    lens = [N // n_docs] * n_docs
    doc = np.repeat(np.arange(n_docs), N // n_docs)
    dense = cupy.asarray((doc[:, None] == doc[None, :])[None, None])
    bm = flashkit.block_mask(mods.document_mask(lens), None, None, N, N, block_size=(128, 128), engine="cuda")
    o, lse = flashkit.attention(q, k, v, block_mask=bm, return_lse=True)
    want = flashkit.attention_backward(do, q, k, v, o, lse, block_mask=bm, backend=RUNG)
    out = {"N": N, "H": H, "d": d, "B": 1, "documents": n_docs, "dtype": "float16"}
    runs = {"block_mask": lambda: flashkit.attention_backward(do, q, k, v, o, lse, block_mask=bm, backend=RUNG),
            "bool_mask_auto": lambda: flashkit.attention_backward(do, q, k, v, o, lse, mask=dense)}
    if N <= 4096:
        runs["bool_mask_cupy_standard"] = lambda: flashkit.attention_backward(do, q, k, v, o, lse, mask=dense,
                                                                              backend="cupy-standard")
    for label, fn in runs.items():
        got = fn()
        out[f"{label}_public"] = _time(fn, repeats=5)
        out[f"{label}_max_diff"] = max(float(abs(a.astype(cupy.float32) - b.astype(cupy.float32)).max())
                                       for a, b in zip(got, want))
    out["auto_backend"] = flashkit.registry.choose(flashkit.validate.check_backward(do, q, k, v, o, lse, mask=dense),
                                                   "auto", direction="backward").name
    log(f"  bool mask N={N}: " + ", ".join(f"{label} {out[f'{label}_public']['min_ms']:.2f} ms (diff "
                                            f"{out[f'{label}_max_diff']:.1e})" for label in runs)
        + f"; auto = {out['auto_backend']}")
    return out


def flex_backward(log, q, k, v, do, mask_lens=None, softcap=None):
    """torch FlexAttention's backward (torch.compile'd flex_attention, autograd.grad of its output) on the same
    inputs: with a document block mask (mask_lens) or a softcap score_mod; its time alone, as ours is timed."""
    info = {}
    try:
        import cupy
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        info["torch"] = torch.__version__
        qt, kt, vt = (torch.from_dlpack(x).detach().clone().requires_grad_(True) for x in (q, k, v))
        dot = torch.from_dlpack(do)
        N = qt.shape[2]
        kw = {}
        if mask_lens is not None:
            doc = torch.repeat_interleave(torch.arange(len(mask_lens), device="cuda"),
                                          torch.tensor(mask_lens, device="cuda"))

            def doc_mask(b, h, q_idx, kv_idx):
                return doc[q_idx] == doc[kv_idx]

            kw["block_mask"] = create_block_mask(doc_mask, None, None, N, N, device="cuda")
        if softcap is not None:
            def capped(score, b, h, q_idx, kv_idx):
                return softcap * torch.tanh(score / softcap)

            kw["score_mod"] = capped
        # a compiled backward with donated buffers refuses retain_graph=True, which timing it again needs
        torch._functorch.config.donated_buffer = False
        flex = torch.compile(flex_attention)
        t0 = time.perf_counter()
        out = flex(qt, kt, vt, **kw)
        grads = torch.autograd.grad(out, (qt, kt, vt), dot, retain_graph=True)
        torch.cuda.synchronize()
        info["compile_s"] = time.perf_counter() - t0
        info.update(_time(lambda: torch.autograd.grad(out, (qt, kt, vt), dot, retain_graph=True), repeats=5))
        info["grads"] = [cupy.from_dlpack(g.detach()) for g in grads]
        log(f"  FlexAttention backward{' documents' if mask_lens else ''}{' softcap' if softcap else ''} "
            f"N={N}: {info['min_ms']:.2f} ms (compile {info['compile_s']:.1f} s)")
    except Exception as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"[:1500]
        log(f"  FlexAttention backward failed: {info['error'][:300]}")
    return info


def flex_softcap_backward(log, N=4096, B=4, d=64):
    """FlexAttention's backward with softcap(50) against its backward with no score_mod (bench_mod_cost's ratio)."""
    H = 2048 // d
    q, k, v, do = _grads_inputs(B, H, N, d)
    none = flex_backward(log, q, k, v, do)
    capped = flex_backward(log, q, k, v, do, softcap=50.0)
    for x in (none, capped):
        x.pop("grads", None)
    out = {"N": N, "B": B, "H": H, "d": d, "none": none, "softcap50": capped}
    if "min_ms" in none and "min_ms" in capped:
        out["ratio_softcap50"] = capped["min_ms"] / none["min_ms"]
        log(f"  FlexAttention backward softcap x{out['ratio_softcap50']:.3f}")
    return out


# ---------------------------------------------------------------------------------------------
def sanitize_case():
    """One small launch of each path (score_mod + derivative + block mask + causal, mask_mod as bits, mask_mod
    in the kernel, GQA, a bool mask=) with CuPy's memory pool off, for compute-sanitizer (`--sanitize`)."""
    import cupy

    from flashkit.gpu import flash_mods

    cupy.cuda.set_allocator(None)
    shape = SHAPES[0]
    B, Hq, Hkv, Nq, Nk, d = shape
    q, k, v, do = (cupy.asarray(x) for x in _inputs(shape, 0))
    for name, kw in cases(shape):
        if name not in ("softcap + and_masks(document, causal) block mask 64x64", "rows fully hidden by the mask_mod"):
            continue
        kw = _materialise(kw, Nq, Nk)
        for bits in (True, False):
            flash_mods.MOD_BITS = bits
            flash_mods.clear_caches()
            o, lse = flashkit.attention(q, k, v, return_lse=True, **kw)
            flashkit.attention_backward(do, q, k, v, o, lse, backend=RUNG, **kw)
    flash_mods.MOD_BITS = True
    mask = cupy.asarray(np.random.default_rng(1).random((1, 1, Nq, Nk)) < 0.7)  # a bool mask=, with causal
    o, lse = flashkit.attention(q, k, v, mask=mask, causal=True, return_lse=True)
    flashkit.attention_backward(do, q, k, v, o, lse, mask=mask, causal=True, backend=RUNG)
    cupy.cuda.Device().synchronize()
    print("sanitize case done")


def _benches(log):
    return [("mod_cost", lambda: bench_mod_cost(log))] + [
        (f"documents_{N}", functools.partial(bench_documents, log, N, flex=N == 16384)) for N in (4096, 16384)] + [
        (f"bool_mask_{N}", functools.partial(bench_bool_mask, log, N)) for N in (4096, 16384)] + [
        ("flex_softcap", lambda: flex_softcap_backward(log))]


def _section(result, name, fn, log, path=None):
    try:
        result[name] = fn()
    except Exception as exc:  # one section failing leaves the others' results
        result[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        log(f"  {name} FAILED: {result[name]['error'][:400]}")
    if path is not None:
        from flashkit.atomic import write_json

        write_json(path, dict(result, summary={"partial": f"written after section {name!r}"}))


def main(out_dir=None, bench: bool = True, checks: bool = True) -> int:
    """Checks (1, 2) and measurements (3) into gpu-mods-backward-<card>.json; 0 when every check passed.
    checks=False (`--bench-only`): only the measurements, added to the file an earlier run left there."""
    import json

    from flashkit.atomic import write_json
    from flashkit.measure import provenance

    t_start = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    out_dir = Path(out_dir or os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = provenance.gpu_info()
    card = str(gpu.get("card", "gpu")).lower().replace("nvidia ", "").replace(" ", "-")
    result = {"provenance": {"commit": provenance.commit(), "gpu": gpu, "date": provenance.now_utc(),
                             "versions": provenance.versions("cupy", "numpy", "torch"),
                             "load": provenance.load_average()}}
    versions = result["provenance"]["versions"]
    result.update(card=gpu.get("card"), driver=gpu.get("driver"), cupy=gpu.get("cupy"), torch=versions.get("torch"),
                  date=result["provenance"]["date"], commit=result["provenance"]["commit"])
    path = out_dir / f"gpu-mods-backward-{card}.json"
    if not checks:
        earlier = json.loads(path.read_text()) if path.exists() else {}
        result = dict(earlier, **{k: v for k, v in result.items() if k != "provenance"},
                      bench_provenance=result["provenance"])
        log("== 3. measured")
        for key, fn in _benches(log):
            _section(result, key, fn, log, path)
        write_json(path, result)
        log(f"wrote {path}")
        return 0
    jobs = [(si, ci) for si, shape in enumerate(SHAPES) for ci in range(len(cases(shape)))]
    log(f"== compiling {len(jobs)} kernels in a process pool")
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(max_workers=min(15, os.cpu_count() or 2), mp_context=get_context("spawn")) as ex:
            built = list(ex.map(_compile_one, jobs))
        result["compile_s_each"] = sorted(round(t, 2) for _, t in built)
    except Exception as exc:  # the checks below compile what is missing themselves
        log(f"  pool failed: {type(exc).__name__}: {exc}")
    result["compile_wall_s"] = time.perf_counter() - t0
    log(f"   {result['compile_wall_s']:.1f} s")
    log("== 1. correctness against the float64 reference")
    _section(result, "checks", lambda: check_cases(log), log, path)
    log("== 2. bad mods and bad lse")
    _section(result, "bad", lambda: bad_cases(log), log, path)
    if bench:
        log("== 3. measured")
        for key, fn in _benches(log):
            _section(result, key, fn, log, path)
    rows = [r for key in ("checks", "bad") if isinstance(result[key], list) for r in result[key]]
    n_bad = sum(not r["ok"] for r in rows) + sum(not isinstance(result[key], list) for key in ("checks", "bad"))
    result["summary"] = {"checks": len(rows), "failed": n_bad, "seconds": time.perf_counter() - t_start}
    log(f"== {n_bad} failed of {len(rows)}; {len(rows) - n_bad}/{len(rows)} checks pass; "
        f"{result['summary']['seconds']:.0f} s")
    write_json(path, result)
    log(f"wrote {path}")
    return int(n_bad > 0)


if __name__ == "__main__":
    if "--sanitize" in sys.argv:
        sanitize_case()
    else:
        sys.exit(main(next((a for a in sys.argv[1:] if not a.startswith("--")), None), bench="--no-bench" not in sys.argv,
                      checks="--bench-only" not in sys.argv))
