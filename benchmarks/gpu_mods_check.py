"""Check and measure score_mod / mask_mod / block masks / bool masks on the tensor-core rung (issues 12, 11 section 3).

    python -m benchmarks.gpu_mods_check [out_dir]       (or main(out_dir) from the coordinator's run)

1. correctness: every mod of flashkit.mods and some written by a user, alone and combined with causal,
   windows, GQA, Nq != Nk and bool masks, on awkward shapes, O and lse against the float64 dense
   reference (numpy-standard with the same mods), outputs poisoned (NaN) first; fully masked rows 0 / -inf;
2. bad mods: each raises the clear error it should (outside the subset, wrong type, out of bounds, NaN,
   division by zero), never a wrong answer;
3. measured: identity and softcap score_mods against no mod on rung 6 (N = 4096, d = 64 and 128, fp16:
   the public call and the kernel alone), the error of the kernels' tanh, and a document mask (8 documents
   in N = 65536; tile-aligned and uneven lengths) with its block mask, the same mask_mod evaluated on every
   tile (no block sparsity), given as a dense bool mask (classified on the GPU in the call: "dense bool
   classified"), and in torch FlexAttention (compiled) in the same run, with the memory each needs; with
   uneven documents also the block mask without the block order and without bits for PARTIAL tiles.
Writes gpu-mods-<card>.json to out_dir (default: $OUT, else benchmarks/results). The NVRTC builds of the
checks are made first by a pool of processes (they fill CuPy's on-disk cache), so the run fits a few minutes.
`--sanitize`: one small launch of every path, for compute-sanitizer; `--profile`: one launch of rung 6
without a mod, with identity and with softcap, for ncu.
"""
from __future__ import annotations

import math
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

import flashkit
from flashkit import mods

RUNG = "cupy-mma-2tile"
SHAPES = (  # B, Hq, Hkv, Nq, Nk, d
    (2, 4, 2, 77, 203, 64),
    (1, 2, 1, 300, 130, 128),
    (1, 1, 1, 1, 1, 32),
    (2, 2, 2, 129, 129, 64),
    (2, 4, 2, 200, 256, 64),  # Nk % 16 == 0: the bool mask's 16-byte loads (edge rows still byte by byte)
)


# ---------------------------------------------------------------------------------------------
# The cases: mods and masks for one shape, rebuilt the same way in the compiling processes
# ---------------------------------------------------------------------------------------------
def _user_softcap_if(score, b, h, q_idx, kv_idx):
    """A user's score_mod with statements: an if, a local, math.exp."""
    bias = 0.1 * (h + 1)
    if kv_idx % 2 == 0:
        return 8.0 * math.tanh(score / 8.0) - bias
    return score * 0.5 + math.exp(-abs(q_idx - kv_idx) / 16.0)


def _user_band(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx) % 5 != 1 and not (kv_idx > 3 * q_idx + 7)


def cases(shape):
    """[(name, kwargs of flashkit.attention)] for one shape; each kwargs builds fresh NumPy inputs."""
    B, Hq, Hkv, Nq, Nk, d = shape
    rng = np.random.default_rng(Nq * 1000 + Nk)
    half_q, half_k = max(1, Nq // 3), max(1, Nk // 3)
    docs = mods.document_mask([half_q, Nq - half_q] if Nq > 1 else [1], [half_k, Nk - half_k] if Nk > 1 else [1])
    out = [
        ("causal mod", dict(mask_mod=mods.causal(Nq, Nk))),
        ("causal_top_left + causal", dict(mask_mod=mods.causal_top_left(), causal=True)),
        ("sliding_window(16, 4)", dict(mask_mod=mods.sliding_window(Nq, Nk, 16, 4))),
        ("document_mask", dict(mask_mod=docs)),
        ("prefix_lm per batch + window", dict(mask_mod=mods.prefix_lm(np.arange(B) * 7 + 5, Nq, Nk), window=(40, 3))),
        ("dilated", dict(mask_mod=mods.dilated(Nq, Nk, 8, 2, 3))),
        ("strided", dict(mask_mod=mods.strided(Nq, Nk, 5))),
        ("global_window", dict(mask_mod=mods.global_window(Nq, Nk, 3, 6))),
        ("or_masks(window, global)", dict(mask_mod=mods.or_masks(mods.sliding_window(Nq, Nk, 2, 2),
                                                                  mods.global_window(Nq, Nk, 2, 0)))),
        ("softcap(5) + causal", dict(score_mod=mods.softcap(5.0), causal=True)),
        ("alibi + window", dict(score_mod=mods.alibi(mods.alibi_slopes(Hq), offset=Nk - Nq), window=(33, 0))),
        ("relative_position_bias", dict(score_mod=mods.relative_position_bias(rng.standard_normal((Hq, 32)), True, 64))),
        ("identity + bool mask", dict(score_mod=mods.identity, mask=_bool_mask(rng, B, Nq, Nk))),
        ("bool mask (bits)", dict(mask=_bool_mask(rng, B, Nq, Nk))),
        ("user score_mod (if, math) + document", dict(score_mod=_user_softcap_if, mask_mod=docs)),
        ("user mask_mod (and, not, %)", dict(mask_mod=_user_band)),
        ("bool document mask (dense) + causal", dict(mask=_bool_documents(rng, Nq, Nk, (1, 1)), causal=True)),
        ("bool mask per head + sliding_window mod + softcap",
         dict(mask=_bool_documents(rng, Nq, Nk, (B, Hq)), mask_mod=mods.sliding_window(Nq, Nk, 70, 20),
              score_mod=mods.softcap(5.0))),
        ("softcap + and_masks(document, causal) block mask 128x128",
         dict(score_mod=mods.softcap(20.0), block_mask=(mods.and_masks(docs, mods.causal(Nq, Nk)), (128, 128)))),
    ]
    return out


def _bool_mask(rng, B, Nq, Nk):
    m = rng.random((B, 1, Nq, Nk)) < 0.7
    m[:, :, rng.random(Nq) < 0.15, :] = False  # some rows see nothing: 0 and -inf
    return m


def _bool_documents(rng, Nq, Nk, planes):
    """A dense bool mask with structure (whole tiles seen or not, as a document mask gives) and a few holes:
    SKIP, FULL and PARTIAL tiles all occur, in every plane a little differently."""
    out = np.zeros(planes + (Nq, Nk), bool)
    for p in np.ndindex(*planes):
        cuts_q = np.sort(rng.integers(0, Nq + 1, 2))
        cuts_k = np.sort(rng.integers(0, Nk + 1, 2))
        dq, dk = np.searchsorted(cuts_q, np.arange(Nq), "right"), np.searchsorted(cuts_k, np.arange(Nk), "right")
        out[p] = dq[:, None] == dk[None, :]
        out[p][rng.random((Nq, Nk)) < 0.002] ^= True
    return out


def _compile_one(job):
    """In a worker process: build (not run) the kernel of one case, filling CuPy's disk cache."""
    si, ci = job
    import cupy
    from flashkit import validate
    from flashkit.gpu import flash_mods

    shape = SHAPES[si]
    name, kw = cases(shape)[ci]
    B, Hq, Hkv, Nq, Nk, d = shape
    q = cupy.zeros((B, Hq, Nq, d), cupy.float16)
    k = cupy.zeros((B, Hkv, Nk, d), cupy.float16)
    kw = _materialise(kw, B, Hq, Nq, Nk, cupy)
    p = validate.check(q, k, k, **kw)
    t0 = time.perf_counter()
    flash_mods.prepare(6, p)
    return name, time.perf_counter() - t0


def _materialise(kw, B, Hq, Nq, Nk, xp):
    kw = dict(kw)
    if "mask" in kw:
        kw["mask"] = xp.asarray(kw["mask"])
    if "block_mask" in kw:
        fn, bs = kw["block_mask"]
        kw["block_mask"] = flashkit.block_mask(fn, None, None, Nq, Nk, block_size=bs, engine="numpy")
    return kw


# ---------------------------------------------------------------------------------------------
# 1. correctness
# ---------------------------------------------------------------------------------------------
def check_cases(log):
    import cupy
    from flashkit import problem as problem_mod

    rows = []
    problem_mod.POISON = True  # outputs start as NaN: a row the kernel forgets stays NaN
    try:
        for si, shape in enumerate(SHAPES):
            B, Hq, Hkv, Nq, Nk, d = shape
            rng = np.random.default_rng(si)
            q, k, v = (rng.standard_normal(s).astype(np.float16)
                       for s in ((B, Hq, Nq, d), (B, Hkv, Nk, d), (B, Hkv, Nk, d)))
            qc, kc, vc = (cupy.asarray(x) for x in (q, k, v))
            for name, kw in cases(shape):
                row = {"shape": list(shape), "case": name}
                try:
                    ref_kw = _materialise(kw, B, Hq, Nq, Nk, np)
                    gpu_kw = _materialise(kw, B, Hq, Nq, Nk, cupy)
                    O_ref, lse_ref = flashkit.attention(*(x.astype(np.float64) for x in (q, k, v)),
                                                        backend="numpy-standard", return_lse=True, **ref_kw)
                    O, lse = flashkit.attention(qc, kc, vc, backend=RUNG, return_lse=True, **gpu_kw)
                    O, lse = cupy.asnumpy(O).astype(np.float64), cupy.asnumpy(lse).astype(np.float64)
                    dead = np.isneginf(lse_ref)
                    err_o = float(np.abs(O - O_ref).max()) if O.size else 0.0
                    fin = ~dead
                    err_l = float(np.abs(lse[fin] - lse_ref[fin]).max()) if fin.any() else 0.0
                    ok = (not np.isnan(O).any() and err_o < 2e-2 and err_l < 2e-2
                          and bool(np.isneginf(lse[dead]).all()) and bool((O[dead] == 0).all()))
                    row.update(ok=bool(ok), max_err_O=err_o, max_err_lse=err_l, dead_rows=int(dead.sum()))
                except Exception as exc:  # a failure is a result row, not the end of the run
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-1500:])
                rows.append(row)
                log(f"  {'ok ' if row['ok'] else 'BAD'} {shape} {name}: "
                    + (f"O {row.get('max_err_O', 0):.1e} lse {row.get('max_err_lse', 0):.1e}" if "error" not in row
                       else row["error"][:300]))
    finally:
        problem_mod.POISON = False
    return rows


def check_cupy_capture(log):
    """A mod capturing a CuPy array (document ids on the GPU) gives the NumPy-captured mod's answer."""
    import cupy

    N, d = 300, 64
    rng = np.random.default_rng(7)
    q, k, v = (cupy.asarray(rng.standard_normal((1, 2, N, d)).astype(np.float16)) for _ in range(3))
    ids_np = np.repeat(np.arange(3), [100, 120, 80])
    ids_gpu = cupy.asarray(ids_np)

    def on_gpu(b, h, q_idx, kv_idx):
        return ids_gpu[q_idx] == ids_gpu[kv_idx]

    O1 = flashkit.attention(q, k, v, backend=RUNG, mask_mod=on_gpu)
    O2 = flashkit.attention(q, k, v, backend=RUNG, mask_mod=mods.document_mask([100, 120, 80]))
    err = float(cupy.abs(O1.astype(cupy.float32) - O2.astype(cupy.float32)).max())
    log(f"  cupy-captured ids vs numpy-captured: max diff {err:.1e}")
    return {"case": "mask_mod capturing a CuPy array", "ok": err == 0.0, "max_diff": err}


# ---------------------------------------------------------------------------------------------
# 2. bad mods
# ---------------------------------------------------------------------------------------------
def bad_mods(log):
    import cupy
    from flashkit.gpu.modlang import UnsupportedMod

    N = 70
    ids = np.arange(N)
    q = cupy.asarray(np.random.default_rng(1).standard_normal((1, 1, N, 64)).astype(np.float16))

    def loops(b, h, q_idx, kv_idx):
        for _ in range(2):
            pass
        return True

    def float_mask(b, h, q_idx, kv_idx):
        return q_idx * 0.5

    def out_of_bounds(b, h, q_idx, kv_idx):
        return ids[kv_idx + 5] >= 0

    def nan_score(score, b, h, q_idx, kv_idx):
        big = 1e308 * 10.0  # inf, in Python as in CUDA (no exception: a float overflow)
        return score + (big - big) if kv_idx == 3 else score  # NaN at key 3 only

    def div_zero(score, b, h, q_idx, kv_idx):
        return score / (kv_idx - kv_idx)

    def raises(b, h, q_idx, kv_idx):
        raise ValueError("no")

    cases_ = [
        ("a for loop", dict(mask_mod=loops), UnsupportedMod, "For"),
        ("a mask_mod returning a float", dict(mask_mod=float_mask), UnsupportedMod, "must return a bool"),
        ("an index out of bounds", dict(mask_mod=out_of_bounds), IndexError, "out of bounds"),
        ("a NaN score", dict(score_mod=nan_score), ValueError, "kv_idx=3"),
        ("a division by zero", dict(score_mod=div_zero), ZeroDivisionError, "division by zero"),
        ("raise", dict(mask_mod=raises), UnsupportedMod, "Raise"),
    ]
    return expect_raises([(name, lambda kw=kw: flashkit.attention(q, q, q, backend=RUNG, **kw), exc_type, words)
                          for name, kw, exc_type, words in cases_], log)


def expect_raises(cases_, log):
    """[(name, call, exception type, words)] -> a row per case: ok when call() raised that type with those words."""
    rows = []
    for name, call, exc_type, words in cases_:
        try:
            call()
            got, msg = None, "no error"
        except Exception as exc:
            got, msg = type(exc), str(exc)
        ok = got is not None and issubclass(got, exc_type) and words in msg
        rows.append({"case": name, "ok": bool(ok), "raised": getattr(got, "__name__", None), "message": msg[:400]})
        log(f"  {'ok ' if ok else 'BAD'} {name}: {getattr(got, '__name__', None)}: {msg[:200]}")
    return rows


# ---------------------------------------------------------------------------------------------
# 3. measured
# ---------------------------------------------------------------------------------------------
def _time(fn, repeats=10):
    from flashkit.measure.timing import time_call

    t = time_call(fn, warmup=2, repeats=repeats, cuda=True)
    return {"median_ms": t.median_ms, "min_ms": t.min_ms}


def bench_mod_cost(log, N=4096, B=4, H=16):
    import cupy
    from flashkit import validate
    from flashkit.gpu import flash, flash_mods

    rows = []
    for d in (64, 128):
        H_d = 2048 // d
        q, k, v = (cupy.random.standard_normal((B, H_d, N, d), dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
        for causal in (False, True):
            row = {"N": N, "B": B, "H": H_d, "d": d, "causal": causal, "dtype": "float16"}
            p0 = validate.check(q, k, v, causal=causal)
            row["kernel_none"] = _time(lambda: flash.run(6, p0))
            row["public_none"] = _time(lambda: flashkit.attention(q, k, v, backend=RUNG, causal=causal))
            for label, sm in (("identity", mods.identity), ("softcap50", mods.softcap(50.0))):
                p = validate.check(q, k, v, causal=causal, score_mod=sm)
                launch, check, _, _ = flash_mods.prepare(6, p)
                launch()
                check()
                row[f"kernel_{label}"] = _time(launch)
                row[f"public_{label}"] = _time(lambda: flashkit.attention(q, k, v, backend=RUNG, causal=causal,
                                                                           score_mod=sm))
                row[f"ratio_kernel_{label}"] = row[f"kernel_{label}"]["min_ms"] / row["kernel_none"]["min_ms"]
                row[f"ratio_public_{label}"] = row[f"public_{label}"]["min_ms"] / row["public_none"]["min_ms"]
                if label == "softcap50":  # beside it, the generic hook (the cap not folded into the scales)
                    with flash_mods.generic_softcap():
                        generic, _, _, _ = flash_mods.prepare(6, p)
                    generic()
                    row["kernel_softcap50_generic"] = _time(generic)
                    row["ratio_kernel_softcap50_generic"] = (row["kernel_softcap50_generic"]["min_ms"]
                                                             / row["kernel_none"]["min_ms"])
            flops = p0.flops()
            row["tflops_kernel_none"] = flops / (row["kernel_none"]["min_ms"] * 1e-3) / 1e12
            rows.append(row)
            log(f"  d={d} causal={causal}: none {row['kernel_none']['min_ms']:.2f} ms; identity x"
                f"{row['ratio_kernel_identity']:.3f} (public x{row['ratio_public_identity']:.3f}); softcap x"
                f"{row['ratio_kernel_softcap50']:.3f} (public x{row['ratio_public_softcap50']:.3f}; the generic hook x"
                f"{row['ratio_kernel_softcap50_generic']:.3f})")
    return rows


UNEVEN = [5000, 9000, 3000, 12000, 7000, 11000, 8536, 10000]  # 8 documents whose edges cut tiles: PARTIAL ones


def bench_documents(log, N=65536, H=16, d=64, lens=None, flex_budget_s=150.0, every_tile=True):
    """A document mask in one packed sequence: its block mask, the same mask evaluated on every tile (no
    block sparsity), given as a dense bool mask (classified on the GPU in the call), and FlexAttention."""
    import cupy
    from flashkit import registry, validate
    from flashkit.gpu import flash, flash_mods

    pool = cupy.get_default_memory_pool()
    lens = list(lens or [N // 8] * 8)
    n_docs = len(lens)
    doc_mask = mods.document_mask(lens)
    out = {"N": N, "H": H, "d": d, "B": 1, "documents": n_docs, "lengths": lens, "dtype": "float16"}
    q, k, v = (cupy.random.standard_normal((1, H, N, d), dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
    Br, Bc = flash.blocks_for(6, d, None)
    t0 = time.perf_counter()
    bm = flashkit.block_mask(doc_mask, None, None, N, N, block_size=(Br, Bc), engine="cuda")
    out["block_mask_build_s"] = time.perf_counter() - t0  # includes the classifier's NVRTC build
    t0 = time.perf_counter()
    flashkit.block_mask(doc_mask, None, None, N, N, block_size=(Br, Bc), engine="cuda")
    out["block_mask_rebuild_s"] = time.perf_counter() - t0
    c = bm.counts()
    out["tiles"] = c
    out["visible_fraction_tiles"] = (c["partial"] + c["full"]) / c["total"]

    p_none = validate.check(q, k, v)
    out["no_mask_kernel"] = _time(lambda: flash.run(6, p_none), repeats=3)

    p_bm = validate.check(q, k, v, block_mask=bm)
    launch, check, O_bm, _ = flash_mods.prepare(6, p_bm)
    launch()
    check()
    out["block_mask_kernel"] = _time(launch)
    out["block_mask_public"] = _time(lambda: flashkit.attention(q, k, v, backend=RUNG, block_mask=bm))
    lists = flash_mods._mod_lists(p_bm, Br, Bc)
    out["block_mask_extra_bytes"] = int(sum(a.nbytes for a in lists if hasattr(a, "nbytes")))  # lists, bits, order
    out["block_mask_partial_as_bits"] = lists[4] is not None
    out["block_mask_blocks_reordered"] = bool(lists[6])
    if lists[4] is not None or lists[6]:  # what each of the two costs or saves: the same call without it
        for label, order, bits in (("natural_order", False, True), ("mask_mod_in_kernel", True, False),
                                   ("neither", False, False)):
            flash_mods.ORDER_BLOCKS, flash_mods.MOD_BITS = order, bits
            flash_mods.clear_caches()
            try:
                lx, cx, O_x, _ = flash_mods.prepare(6, p_bm)
                lx()
                cx()
                out[f"block_mask_kernel_{label}"] = _time(lx)
                out[f"block_mask_same_answer_{label}"] = float(cupy.abs(O_x.astype(cupy.float32)
                                                                        - O_bm.astype(cupy.float32)).max())
            finally:
                flash_mods.ORDER_BLOCKS, flash_mods.MOD_BITS = True, True
                flash_mods.clear_caches()
        log("  block mask kernel: " + ", ".join(f"{k[18:]} {v['min_ms']:.2f} ms" for k, v in out.items()
                                                 if k.startswith("block_mask_kernel_")))

    if every_tile:  # the mask_mod on every score of every tile: what block sparsity saves
        p_dense_mod = validate.check(q, k, v, block_mask=bm.without_sparsity())
        launch2, check2, O_ns, _ = flash_mods.prepare(6, p_dense_mod)
        launch2()
        check2()
        out["every_tile_mask_mod_kernel"] = _time(launch2, repeats=3)
        out["same_answer_every_tile"] = bool(cupy.array_equal(O_bm, O_ns))
        del O_ns

    ids = cupy.asarray(np.repeat(np.arange(n_docs), lens))
    dense = (ids[:, None] == ids[None, :])[None, None]  # (1, 1, N, N) bool: 4 GiB, the user's input
    out["dense_mask_bytes"] = int(dense.nbytes)
    p_dense = validate.check(q, k, v, mask=dense)
    out["auto_backend_for_bool_mask"] = registry.choose(p_dense).name
    O_dense = flashkit.attention(q, k, v, mask=dense)  # backend "auto": the tensor-core rung
    out["dense_mask_same_answer"] = float(cupy.abs(O_dense.astype(cupy.float32) - O_bm.astype(cupy.float32)).max())
    del O_dense
    pool.free_all_blocks()
    before = pool.total_bytes()
    made = flash_mods._bool_mask_lists(p_dense, Br, Bc)
    out["dense_mask_lists_bytes"] = int(sum(a.nbytes for a in made if hasattr(a, "nbytes")))  # lists, bits, order
    out["dense_mask_partial_tiles"] = int(made[5])
    out["dense_mask_blocks_reordered"] = bool(made[7])
    out["dense_mask_pool_growth_bytes"] = int(pool.total_bytes() - before)
    del made
    out["dense_mask_classify"] = _time(lambda: flash_mods._bool_mask_lists(p_dense, Br, Bc), repeats=5)
    launch3, check3, _, _ = flash_mods.prepare(6, p_dense)
    launch3()
    check3()
    out["dense_mask_kernel"] = _time(launch3)
    out["dense_mask_public"] = _time(lambda: flashkit.attention(q, k, v, backend=RUNG, mask=dense), repeats=5)
    dense = p_dense = None  # the 4 GiB input freed before FlexAttention runs
    launch3 = check3 = None
    pool.free_all_blocks()

    if every_tile:
        out["speedup_block_mask_vs_every_tile"] = (out["every_tile_mask_mod_kernel"]["min_ms"]
                                                   / out["block_mask_kernel"]["min_ms"])
    out["speedup_block_mask_vs_dense_bool_classified"] = (out["dense_mask_public"]["min_ms"]
                                                          / out["block_mask_public"]["min_ms"])
    out["speedup_dense_bool_classified_vs_no_mask"] = out["no_mask_kernel"]["min_ms"] / out["dense_mask_public"]["min_ms"]
    out["time_fraction_vs_no_mask"] = out["block_mask_kernel"]["min_ms"] / out["no_mask_kernel"]["min_ms"]
    log(f"  documents N={N} {lens}: tiles visible {out['visible_fraction_tiles']:.3f} (partial {c['partial']}); no mask "
        f"{out['no_mask_kernel']['min_ms']:.2f} ms, block mask {out['block_mask_kernel']['min_ms']:.2f} ms "
        f"(time fraction {out['time_fraction_vs_no_mask']:.3f}; public {out['block_mask_public']['min_ms']:.2f}), "
        + (f"every tile {out['every_tile_mask_mod_kernel']['min_ms']:.2f}, " if every_tile else "")
        + f"dense bool mask public {out['dense_mask_public']['min_ms']:.2f} ms (classify "
        f"{out['dense_mask_classify']['min_ms']:.2f}, kernel {out['dense_mask_kernel']['min_ms']:.2f}; auto -> "
        f"{out['auto_backend_for_bool_mask']}; lists+bits {out['dense_mask_lists_bytes'] / 2**20:.1f} MiB)")
    if flex_budget_s > 0:
        out["flex"] = flex_documents(q, k, v, lens, flex_budget_s, log)
        if "min_ms" in out["flex"]:
            out["ratio_flashkit_public_vs_flex"] = out["flex"]["min_ms"] / out["block_mask_public"]["min_ms"]
    return out


def tanh_error(log):
    """The error of the kernels' tanh (modlang's fk_tanh: tanh.approx.f32) against float64, on the GPU."""
    import cupy
    from flashkit.gpu import flash, modlang

    src = modlang.RUNTIME + r"""
extern "C" __global__ void fk_tanh_all(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = fk_tanh(x[i]);
}"""
    fn = cupy.RawModule(code=src, options=("--std=c++17", f"--gpu-architecture={flash._arch()}")).get_function("fk_tanh_all")
    x = np.concatenate([np.linspace(-12, 12, 1 << 20), np.geomspace(1e-6, 12, 1 << 16)]).astype(np.float32)
    xd, yd = cupy.asarray(x), cupy.empty(x.size, cupy.float32)
    fn((-(-x.size // 256),), (256,), (xd, yd, np.int32(x.size)))
    y, ref = cupy.asnumpy(yd).astype(np.float64), np.tanh(x.astype(np.float64))
    abs_err = np.abs(y - ref)
    rel_err = abs_err[ref != 0] / np.abs(ref[ref != 0])
    out = {"max_abs_error": float(abs_err.max()), "max_rel_error": float(rel_err.max()),
           "softcap50_max_score_error_at_|score|<=20": float((50 * abs_err[np.abs(x) <= 0.4]).max())}
    log(f"  fk_tanh (tanh.approx.f32): max abs error {out['max_abs_error']:.2e}, max rel error {out['max_rel_error']:.2e}")
    return out


def flex_documents(q, k, v, lens, budget_s, log):
    """torch FlexAttention (torch.compile'd) on the same document mask and inputs: time and memory."""
    info = {}
    if budget_s < 20:
        return {"skipped": f"{budget_s:.0f} s of the deadline left"}
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        info["torch"] = torch.__version__
        qt, kt, vt = (torch.from_dlpack(x) for x in (q, k, v))
        N = qt.shape[2]
        doc = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))

        def doc_mask(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        t0 = time.perf_counter()
        bm = create_block_mask(doc_mask, None, None, N, N, device="cuda")
        info["create_block_mask_s"] = time.perf_counter() - t0
        flex = torch.compile(flex_attention)
        t0 = time.perf_counter()
        out = flex(qt, kt, vt, block_mask=bm)
        torch.cuda.synchronize()
        info["first_call_s (compile)"] = time.perf_counter() - t0
        if info["first_call_s (compile)"] > budget_s:
            info["note"] = "compile took longer than the budget; timed anyway"
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = _time(lambda: flex(qt, kt, vt, block_mask=bm))
        info.update(t)
        info["peak_extra_bytes"] = int(torch.cuda.max_memory_allocated() - base)
        import cupy

        ours = flashkit.attention(q, k, v, backend=RUNG, mask_mod=mods.document_mask(lens))
        info["max_diff_vs_flashkit"] = float((out.float() - torch.from_dlpack(ours).float()).abs().max())
        log(f"  FlexAttention: {info['min_ms']:.2f} ms (compile {info['first_call_s (compile)']:.1f} s)")
        del cupy
    except Exception as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"[:1500]
        log(f"  FlexAttention failed: {info['error'][:300]}")
    return info


def flex_softcap(log, N=4096, B=4, d=64):
    """FlexAttention's softcap against no score_mod (the same ratio as bench_mod_cost's, for torch)."""
    info = {}
    try:
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        H = 2048 // d
        q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.float16) for _ in range(3))

        def softcap(score, b, h, q_idx, kv_idx):
            return 50.0 * torch.tanh(score / 50.0)

        flex = torch.compile(flex_attention)
        t0 = time.perf_counter()
        flex(q, k, v)
        flex(q, k, v, score_mod=softcap)
        torch.cuda.synchronize()
        info["compile_s"] = time.perf_counter() - t0
        info["none"] = _time(lambda: flex(q, k, v))
        info["softcap50"] = _time(lambda: flex(q, k, v, score_mod=softcap))
        info["ratio_softcap50"] = info["softcap50"]["min_ms"] / info["none"]["min_ms"]
        log(f"  FlexAttention N={N} d={d}: none {info['none']['min_ms']:.2f} ms, softcap x{info['ratio_softcap50']:.3f}")
    except Exception as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"[:1500]
        log(f"  FlexAttention softcap failed: {info['error'][:300]}")
    return info


# ---------------------------------------------------------------------------------------------
def sanitize_case():
    """One small launch of each path (score_mod, mask_mod, block mask, bool-mask bits, classifier) with
    CuPy's memory pool off, for compute-sanitizer (`--sanitize`)."""
    import cupy

    cupy.cuda.set_allocator(None)
    rng = np.random.default_rng(3)
    B, H, Nq, Nk, d = 1, 2, 150, 200, 64
    q = cupy.asarray(rng.standard_normal((B, H, Nq, d)).astype(np.float16))
    k, v = (cupy.asarray(rng.standard_normal((B, H, Nk, d)).astype(np.float16)) for _ in range(2))
    docs = mods.document_mask([50, 100], [80, 120])
    bm = flashkit.block_mask(docs, None, None, Nq, Nk, block_size=(128, 64), engine="cuda")
    flashkit.attention(q, k, v, backend=RUNG, score_mod=mods.softcap(10.0), block_mask=bm, causal=True)
    flashkit.attention(q, k, v, backend=RUNG, mask=cupy.asarray(_bool_mask(rng, B, Nq, Nk)),
                       score_mod=mods.alibi(mods.alibi_slopes(H)))
    k2, v2 = (cupy.asarray(rng.standard_normal((B, H, 256, d)).astype(np.float16)) for _ in range(2))
    flashkit.attention(q, k2, v2, backend=RUNG, mask=cupy.asarray(_bool_documents(rng, Nq, 256, (B, H))),
                       mask_mod=mods.sliding_window(Nq, 256, 90, 10))  # the 16-byte loads, per-head lists
    cupy.cuda.Device().synchronize()
    print("sanitize case done")


def profile_case():
    """One launch each of rung 6 without a mod, with identity and with softcap (d = 64, N = 4096), for ncu
    (`--profile`): which pipe limits softcap (the XU pipe runs ex2 and tanh)."""
    import cupy
    from flashkit import validate
    from flashkit.gpu import flash, flash_mods

    B, N, d = 4, 4096, 64
    q, k, v = (cupy.random.standard_normal((B, 2048 // d, N, d), dtype=cupy.float32).astype(cupy.float16)
               for _ in range(3))
    flash.run(6, validate.check(q, k, v))
    for sm in (mods.identity, mods.softcap(50.0)):
        launch, check, _, _ = flash_mods.prepare(6, validate.check(q, k, v, score_mod=sm))
        launch()
        check()
    cupy.cuda.Device().synchronize()
    print("profile case done")


def _section(result, name, fn, log, path=None):
    try:
        result[name] = fn()
    except Exception as exc:  # one section failing leaves the others' results
        result[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        log(f"  {name} FAILED: {result[name]['error'][:400]}")
    if path is not None:  # what is done so far, should the run be stopped before the end
        from flashkit.atomic import write_json

        write_json(path, dict(result, summary={"partial": f"written after section {name!r}"}))


def main(out_dir=None, bench: bool = True, deadline_s: float = 200.0) -> int:
    """Checks and measurements into gpu-mods-<card>.json; 0 when every check passed (benchmarks/gpu_session.py's
    convention for its extra check scripts: it read the results dict returned before as a failure)."""
    from flashkit.atomic import write_json
    from flashkit.measure import provenance

    t_start = time.perf_counter()
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    out_dir = Path(out_dir or os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = provenance.gpu_info()
    card = str(gpu.get("card", "gpu")).lower().replace("nvidia ", "").replace(" ", "-")
    result = {"provenance": {"commit": provenance.commit(), "gpu": gpu, "date": provenance.now_utc(),
                             "versions": provenance.versions("cupy", "numpy", "torch"),
                             "load": provenance.load_average()}}
    versions = result["provenance"]["versions"]
    result.update(card=gpu.get("card"), driver=gpu.get("driver"), cupy=gpu.get("cupy"), torch=versions.get("torch"),
                  date=result["provenance"]["date"], commit=result["provenance"]["commit"])  # the README's label
    path = out_dir / f"gpu-mods-{card}.json"
    jobs = [(si, ci) for si, shape in enumerate(SHAPES) for ci in range(len(cases(shape)))]
    log(f"== compiling {len(jobs)} kernels in a process pool")
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(max_workers=min(14, os.cpu_count() or 2), mp_context=get_context("spawn")) as ex:
            built = list(ex.map(_compile_one, jobs))
        result["compile_s_each"] = sorted(round(t, 2) for _, t in built)
    except Exception as exc:  # the checks below compile what is missing themselves
        log(f"  pool failed: {type(exc).__name__}: {exc}")
    result["compile_wall_s"] = time.perf_counter() - t0
    log(f"   {result['compile_wall_s']:.1f} s")
    log("== 1. correctness against the float64 reference")
    _section(result, "checks", lambda: check_cases(log) + [check_cupy_capture(log)], log, path)
    log("== 2. bad mods")
    _section(result, "bad_mods", lambda: bad_mods(log), log, path)
    if bench:
        log("== 3. measured")
        _section(result, "mod_cost", lambda: bench_mod_cost(log), log, path)
        _section(result, "tanh_error", lambda: tanh_error(log), log, path)
        left = deadline_s - (time.perf_counter() - t_start)
        _section(result, "documents", lambda: bench_documents(log, flex_budget_s=left - 60), log, path)
        _section(result, "documents_uneven", lambda: bench_documents(log, lens=UNEVEN, flex_budget_s=0), log, path)
        if deadline_s - (time.perf_counter() - t_start) > 40:
            _section(result, "flex_softcap", lambda: flex_softcap(log), log, path)
        else:
            result["flex_softcap"] = {"skipped": "not enough of the deadline left"}
    rows = [r for key in ("checks", "bad_mods") if isinstance(result[key], list) for r in result[key]]
    n_bad = sum(not r["ok"] for r in rows) + sum(not isinstance(result[key], list) for key in ("checks", "bad_mods"))
    result["summary"] = {"checks": len(rows), "failed": n_bad, "seconds": time.perf_counter() - t_start}
    log(f"== {n_bad} failed of {len(rows)}; {result['summary']['seconds']:.0f} s")
    write_json(path, result)
    log(f"wrote {path}")
    return int(n_bad > 0)


if __name__ == "__main__":
    if "--sanitize" in sys.argv:
        sanitize_case()
    elif "--profile" in sys.argv:
        profile_case()
    else:
        sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
