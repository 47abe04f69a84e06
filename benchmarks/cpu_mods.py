"""CPU attention variants: what a score_mod costs and what block sparsity saves, beside torch FlexAttention.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.cpu_mods     # N = 16384
    python -m benchmarks.cpu_mods --quick                                          # N = 2048
    python -m benchmarks.cpu_mods --ns 4096,16384 --no-torch
    python -m benchmarks.cpu_mods --table benchmarks/results/cpu-mods-<machine>.json

fp32, B = 1, H = 8, d = 64, all cores, flashkit.attention (validation included) timed after a warm-up,
up to 5 runs: median and minimum kept, ratios taken between minima (the machines here are shared). Every case is first checked against the float64 reference (numpy-standard
with the same mods) at N = 512. The cases, each at every N:

  dense                  backend numba, no mod: every tile computed (rung 4; with mods numba runs rung 4 too)
  identity / softcap     a score_mod: mods.identity (the hook alone) and mods.softcap(50.0) (Gemma 2)
  documents              mods.document_mask of 8 equal documents (a block-diagonal mask, 1/8 visible):
                           block mask    flashkit.block_mask(...) made once and passed: empty tiles skipped
                           every tile    the same mask_mod with a BlockMask marking every tile PARTIAL:
                                         what a kernel without block sparsity does (mask_mod everywhere)
                           mask= array   the (N, N) bool array through mask= of numba (rung 4) and of
                                         numba-gemm (rung 3): their block map skips empty tiles too, so
                                         this is not a dense computation; the array is O(N^2) memory,
                                         scanned on every call, and masked score by score on rung 4
                         with the extra peak memory of one call (VmHWM, reset before it) beside each: the
                         block mask's is O(N) (its tiles, (N/128)^2 bytes, and per-task buffers)
  window                 mods.sliding_window(N, N, 256, 0): the same three, the array replaced by rung 3's
                         built-in window=(256, 0)
  torch-flex             torch.compile(flex_attention) on the CPU with the same mods (create_block_mask
                         once, as here), and torch SDPA for the dense case, in a separate process (torch
                         timed after Numba in one process ran 5x slower); each output checked against
                         flashkit's; if FlexAttention does not run on this CPU, the reason is recorded

    FLOPs = 4 * B * H * N * N * d * (fraction of scores visible)   (the work that matters; skipped tiles
                                                                    cost nothing, partial ones in full)

Then time against the tiles computed: documents k = 1 .. 32 through a block mask, interleaved
(`sparsity_sweep`: time proportional to the visible tiles if t(k) / t(1) = 1/k).

Also what a score_mod costs, measured interleaved at N = 4096 (no mod, identity, softcap in turn, the
fastest of 11 rounds each; the same for the backward, 7 rounds, with softcap on rung 3 beside: --cost-only runs
only these and the checks), and the time to make each block mask (flashkit.block_mask with the compiled classifier, and torch's
create_block_mask), which a model pays once per batch of sequences, not per layer.
Results: benchmarks/results/cpu-mods-<machine>.json with the machine, versions and commit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.cpu_forward import _reexec_without_openblas_overrides, environment

B, H, D = 1, 8, 64
NS = (16384,)
NS_QUICK = (2048,)
DOCUMENTS = 8
WINDOW = 256
CHECK_N = 512


def inputs(N, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, H, N, D), dtype=np.float32) for _ in range(3))  # (B, H, N, d) each


def variants(N):
    """{case: (score_mod, mask_mod)} of flashkit.mods for N tokens."""
    from flashkit import mods

    docs = mods.document_mask([N // DOCUMENTS] * (DOCUMENTS - 1) + [N - (DOCUMENTS - 1) * (N // DOCUMENTS)])
    return {"dense": (None, None), "identity": (mods.identity, None), "softcap": (mods.softcap(50.0), None),
            "documents": (None, docs), "window": (None, mods.sliding_window(N, N, WINDOW, 0))}


def flashkit_calls(N, q, k, v):
    """{(case, impl): (function of no arguments, extra info)} for flashkit at N; block masks made here."""
    import time

    import flashkit

    calls, info = {}, {}
    for case, (score_mod, mask_mod) in variants(N).items():
        if mask_mod is None:
            calls[case, "numba"] = lambda s=score_mod: flashkit.attention(q, k, v, score_mod=s, backend="numba")
            continue
        flashkit.block_mask(mask_mod, None, None, 256, 256, engine="numba")  # compile the classifier first
        t0 = time.perf_counter()
        bm = flashkit.block_mask(mask_mod, None, None, N, N, block_size=128, engine="numba")
        info[case] = dict(block_mask_ms=(time.perf_counter() - t0) * 1e3, sparsity=bm.sparsity, **bm.counts(),
                          visible_fraction=visible_fraction(bm), block_mask_bytes=int(bm.tiles.nbytes),
                          dense_mask_bytes=N * N)
        calls[case, "numba block mask"] = lambda b=bm: flashkit.attention(q, k, v, block_mask=b, backend="numba")
        every = bm.without_sparsity()
        calls[case, "numba every tile"] = lambda b=every: flashkit.attention(q, k, v, block_mask=b, backend="numba")
        if case == "documents":
            dense = bm.dense()  # (N, N) bool, 1 byte a score
            calls[case, "numba mask= array"] = lambda m=dense: flashkit.attention(q, k, v, mask=m, backend="numba")
            calls[case, "numba-gemm mask= array"] = lambda m=dense: flashkit.attention(q, k, v, mask=m,
                                                                                        backend="numba-gemm")
        else:
            calls[case, "numba-gemm window="] = lambda: flashkit.attention(q, k, v, window=(WINDOW, 0),
                                                                          backend="numba-gemm")
    return calls, info


def visible_fraction(bm):
    """The fraction of the N x N scores the block mask's mask_mod leaves visible (from its tiles: FULL
    tiles count whole, PARTIAL ones are evaluated)."""
    import numpy as np

    from flashkit import blockmask
    from flashkit.masks import FULL, PARTIAL

    plane = bm.plane()
    visible = 0
    for i, j in zip(*np.nonzero(plane != 0)):
        i0, j0 = i * bm.Br, j * bm.Bc
        i1, j1 = min(bm.Nq, i0 + bm.Br), min(bm.Nk, j0 + bm.Bc)
        if plane[i, j] == FULL:
            visible += (i1 - i0) * (j1 - j0)
        elif plane[i, j] == PARTIAL:
            visible += int(blockmask.evaluate("mask_mod", bm.mask_mod, blockmask.index_grid(0, 0, i0, i1, j0, j1)).sum())
    return visible / (bm.Nq * bm.Nk)


def torch_calls(N, q, k, v):
    """{(case, impl): function} for torch at N (compiled FlexAttention, and SDPA for dense), the block mask
    build times, and None or the reason FlexAttention cannot run here."""
    import time

    import torch
    import torch.nn.functional as F

    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    calls = {("dense", "torch-sdpa"): lambda: F.scaled_dot_product_attention(tq, tk, tv)}
    info = {}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        return calls, info, f"torch {torch.__version__} has no torch.nn.attention.flex_attention: {exc}"
    # Inductor compiles in worker processes by default; a pool left running took the cores from the timed
    # calls (measured: SDPA at N = 8192 4.1 s after the compilation, 0.78 s in a fresh process). In-process:
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    flex = torch.compile(flex_attention, dynamic=False)
    doc = torch.arange(N) // (N // DOCUMENTS)
    doc = torch.minimum(doc, torch.tensor(DOCUMENTS - 1))  # the same documents as flashkit's

    def documents(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx <= WINDOW)

    def identity(score, b, h, q_idx, kv_idx):
        return score

    def softcap(score, b, h, q_idx, kv_idx):
        return 50.0 * torch.tanh(score / 50.0)

    try:
        calls["dense", "torch-flex"] = lambda: flex(tq, tk, tv)
        calls["identity", "torch-flex"] = lambda: flex(tq, tk, tv, score_mod=identity)
        calls["softcap", "torch-flex"] = lambda: flex(tq, tk, tv, score_mod=softcap)
        for case, mask_mod in (("documents", documents), ("window", window)):
            create_block_mask(mask_mod, None, None, N, N, device="cpu")  # compile it first
            t0 = time.perf_counter()
            bm = create_block_mask(mask_mod, None, None, N, N, device="cpu")
            info[case] = dict(block_mask_ms=(time.perf_counter() - t0) * 1e3, sparsity_percent=float(bm.sparsity()))
            calls[case, "torch-flex block mask"] = lambda b=bm: flex(tq, tk, tv, block_mask=b)
        calls["dense", "torch-flex"]()  # compile (tens of seconds) now, to fail here if it cannot
    except Exception as exc:  # no C++ compiler, an unsupported CPU path, ...
        return {("dense", "torch-sdpa"): calls["dense", "torch-sdpa"]}, info, \
            f"torch {torch.__version__} flex_attention on the CPU failed: {type(exc).__name__}: {str(exc)[:300]}"
    return calls, info, None


def rel_err(o, ref):
    import numpy as np

    o, ref = np.asarray(o, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(o - ref) / np.linalg.norm(ref))


def check_all():
    """Each flashkit case at N = 512 against the float64 reference with the same mods (O's relative error).
    torch is checked at the timed N against flashkit's checked result (torch.compile specialises on N:
    a check at another N would cost another compilation of tens of seconds per case)."""
    import numpy as np

    import flashkit

    N = CHECK_N
    q, k, v = inputs(N, seed=1)
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    calls, _ = flashkit_calls(N, q, k, v)
    out = []
    for (case, impl), fn in calls.items():
        score_mod, mask_mod = variants(N)[case]
        ref = flashkit.attention(q64, k64, v64, score_mod=score_mod, mask_mod=mask_mod, backend="numpy-standard")
        err = rel_err(fn(), ref)
        out.append(dict(case=case, impl=impl, rel_err=err, ok=err <= 1e-5))
        print(f"  check N={N} {case:10s} {impl:24s} rel err {err:.2e} {'ok' if err <= 1e-5 else 'FAIL'}", flush=True)
    return out


SWEEP_DOCUMENTS = (1, 2, 4, 8, 16, 32)


def sparsity_sweep(N, documents=SWEEP_DOCUMENTS, rounds=3):
    """Time against the fraction of tiles computed: a document mask of k equal documents (1/k of the
    tiles visible, each FULL: document edges fall on tile edges) through a block mask, k = 1 (every tile,
    mask_mod never called) to 32, interleaved rounds, the fastest of each. Time proportional to the
    visible tiles means t(k) / t(1) = 1/k: `efficiency` = (1/k) / (t(k) / t(1)) stays near 1."""
    import time

    import flashkit
    from flashkit import mods

    q, k, v = inputs(N)
    bms = {}
    for n_docs in documents:
        docs = mods.document_mask([N // n_docs] * (n_docs - 1) + [N - (n_docs - 1) * (N // n_docs)])
        bms[n_docs] = flashkit.block_mask(docs, None, None, N, N, block_size=128, engine="numba")
    best = {n: float("inf") for n in documents}
    for bm in bms.values():
        flashkit.attention(q, k, v, block_mask=bm, backend="numba")  # warm up
    for _ in range(rounds):
        for n_docs, bm in bms.items():
            t0 = time.perf_counter()
            flashkit.attention(q, k, v, block_mask=bm, backend="numba")
            best[n_docs] = min(best[n_docs], time.perf_counter() - t0)
    rows = []
    for n_docs, bm in bms.items():
        frac = 1.0 - bm.sparsity
        ratio = best[n_docs] / best[documents[0]]
        rows.append(dict(N=N, documents=n_docs, tile_fraction=frac, min_ms=best[n_docs] * 1e3,
                         time_vs_one_document=ratio, efficiency=frac / ratio))
        print(f"  sweep N={N} {n_docs:3d} documents: {frac:.4f} of the tiles, {best[n_docs] * 1e3:9.1f} ms, "
              f"{ratio:.4f} of the time with 1 (efficiency {frac / ratio:.2f})", flush=True)
    return rows


MOD_COST_N, MOD_COST_ROUNDS = 4096, 11
MOD_COST_BACKWARD_ROUNDS = 7


def mod_cost(N=MOD_COST_N, rounds=MOD_COST_ROUNDS):
    """What a score_mod costs, measured interleaved: each round runs no mod, mods.identity and
    mods.softcap(50.0) once each, in turn, so a neighbour's load hits all three alike; the fastest of
    the rounds for each, and their ratios. (Timed one after the other, the ratio moved from 0.95 to 1.31
    between two runs on the shared machine.)"""
    import statistics
    import time

    import flashkit

    q, k, v = inputs(N)
    runs = {"none": None, "identity": variants(N)["identity"][0], "softcap": variants(N)["softcap"][0]}
    best = {name: float("inf") for name in runs}
    cpu = {name: float("inf") for name in runs}  # CPU time of the process, which a neighbour's load disturbs least
    per_round = {name: [] for name in runs}  # wall times of each round, for the median of the rounds' ratios
    for fn in runs.values():
        flashkit.attention(q, k, v, score_mod=fn, backend="numba")  # compile, warm up
    for _ in range(rounds):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            flashkit.attention(q, k, v, score_mod=fn, backend="numba")
            best[name] = min(best[name], time.perf_counter() - t0)
            per_round[name].append(time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    out = dict(N=N, rounds=rounds, min_ms={n: t * 1e3 for n, t in best.items()},
               min_cpu_ms={n: t * 1e3 for n, t in cpu.items()},
               identity_vs_none=best["identity"] / best["none"], softcap_vs_none=best["softcap"] / best["none"],
               identity_vs_none_cpu=cpu["identity"] / cpu["none"], softcap_vs_none_cpu=cpu["softcap"] / cpu["none"],
               **{f"{n}_vs_none_median_of_rounds": statistics.median(a / b for a, b in zip(per_round[n], per_round["none"]))
                  for n in ("identity", "softcap")})
    print(f"  mod cost N={N}, {rounds} interleaved rounds: no mod {out['min_ms']['none']:.1f} ms, identity "
          f"{out['identity_vs_none']:.3f}x, softcap {out['softcap_vs_none']:.3f}x (CPU time: "
          f"{out['identity_vs_none_cpu']:.3f}x, {out['softcap_vs_none_cpu']:.3f}x; median of the rounds' ratios: "
          f"{out['identity_vs_none_median_of_rounds']:.3f}x, {out['softcap_vs_none_median_of_rounds']:.3f}x)", flush=True)
    return out


def mod_cost_backward(N=MOD_COST_N, rounds=MOD_COST_BACKWARD_ROUNDS):
    """The same for flashkit.attention_backward (backend numba: rung 4's backward, with the mods' hooks when
    there is a mod), interleaved: no mod, identity, softcap(50), and softcap on rung 3 (numba-mods, which
    "numba" ran with mods before rung 4's backward took them); each call gets the lse of its own forward."""
    import statistics
    import time

    import numpy as np

    import flashkit

    q, k, v = inputs(N)
    do = np.random.default_rng(1).standard_normal(q.shape).astype(q.dtype)
    runs = {"none": (None, "numba"), "identity": (variants(N)["identity"][0], "numba"),
            "softcap": (variants(N)["softcap"][0], "numba"), "softcap rung 3": (variants(N)["softcap"][0], "numba-mods")}
    saved = {}
    for name, (fn, backend) in runs.items():
        o, lse = flashkit.attention(q, k, v, score_mod=fn, backend="numba", return_lse=True)
        saved[name] = (o, lse)
        flashkit.attention_backward(do, q, k, v, o, lse, score_mod=fn, backend=backend)  # compile, warm up
    best = {name: float("inf") for name in runs}
    per_round = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (fn, backend) in runs.items():
            o, lse = saved[name]
            t0 = time.perf_counter()
            flashkit.attention_backward(do, q, k, v, o, lse, score_mod=fn, backend=backend)
            per_round[name].append(time.perf_counter() - t0)
            best[name] = min(best[name], per_round[name][-1])
    out = dict(N=N, rounds=rounds, min_ms={n: t * 1e3 for n, t in best.items()},
               **{f"{n.replace(' ', '_')}_vs_none": best[n] / best["none"] for n in runs if n != "none"},
               **{f"{n.replace(' ', '_')}_vs_none_median_of_rounds":
                  statistics.median(a / b for a, b in zip(per_round[n], per_round["none"])) for n in runs if n != "none"})
    print(f"  backward mod cost N={N}, {rounds} interleaved rounds: no mod {out['min_ms']['none']:.1f} ms, identity "
          f"{out['identity_vs_none']:.3f}x, softcap {out['softcap_vs_none']:.3f}x, softcap on rung 3 "
          f"{out['softcap_rung_3_vs_none']:.3f}x (median of the rounds' ratios: "
          f"{out['identity_vs_none_median_of_rounds']:.3f}x, {out['softcap_vs_none_median_of_rounds']:.3f}x, "
          f"{out['softcap_rung_3_vs_none_median_of_rounds']:.3f}x)", flush=True)
    return out


def time_calls(N, calls, info, checked=None):
    """One row per (case, impl): median and fastest of up to `repeats` runs; torch's output checked
    against `checked[case]` (flashkit's, itself checked against float64 at N = 512) when given."""
    from flashkit.measure.timing import median_time
    from flashkit.measure.provenance import load_average

    rows = []
    for (case, impl), fn in calls.items():
        t = median_time(fn, repeats=REPEATS[0], budget_s=60.0)
        extra = peak_extra_bytes(fn) if case in ("documents", "window") and not impl.startswith("torch") else None
        frac = info.get(case, {}).get("visible_fraction", 1.0)
        row = dict(N=N, case=case, impl=impl, ms=t["median_s"] * 1e3, min_ms=t["min_s"] * 1e3,
                   cpu_ms=t["cpu_median_s"] * 1e3, runs=len(t["runs_s"]), visible_fraction=frac,
                   gflops=4.0 * B * H * N * N * D * frac / t["median_s"] / 1e9, load_average=load_average())
        if extra is not None:
            row["extra_peak_bytes"] = extra
        rows.append(row)
        mem = f", +{extra / 2**20:.1f} MiB peak" if extra is not None else ""
        print(f"  N={N:5d} {case:10s} {impl:24s} {row['ms']:10.1f} ms  (min {row['min_ms']:.1f}, "
              f"{row['gflops']:6.1f} GFLOP/s of visible work{mem}, load {row['load_average'][:1]})", flush=True)
    return rows


REPEATS = [5]


def peak_extra_bytes(fn):
    """Peak resident memory one call adds above what the process held before it (Linux VmHWM, reset
    first; None where it cannot be reset). The dense mask= array is made before, so it is not counted:
    its N^2 bytes are listed in the block mask rows ("dense_mask_bytes")."""
    import gc

    from benchmarks._common import peak_rss_reset, rss_bytes

    gc.collect()
    if not peak_rss_reset():
        return None
    before = rss_bytes("VmRSS")
    fn()
    return max(0, rss_bytes("VmHWM") - before)


def torch_child(N, threads):
    """In a fresh process (no Numba threads, nothing else loaded): torch's rows at N, then each output
    checked against flashkit's; one JSON line. Measured in the parent process after flashkit's runs,
    torch SDPA took 4-5 s at N = 8192 instead of the 0.8 s it takes alone."""
    import torch

    torch.set_num_threads(threads)
    q, k, v = inputs(N)
    tcalls, tinfo, reason = torch_calls(N, q, k, v)
    rows = time_calls(N, tcalls, {})
    fcalls, finfo = flashkit_calls(N, q, k, v)  # Numba from here on: after torch's timings
    for row in rows:
        mine = fcalls.get((row["case"], "numba block mask")) or fcalls.get((row["case"], "numba"))
        row["visible_fraction"] = finfo.get(row["case"], {}).get("visible_fraction", 1.0)
        row["gflops"] = 4.0 * B * H * N * N * D * row["visible_fraction"] / (row["ms"] / 1e3) / 1e9
        row["rel_err_vs_flashkit"] = rel_err(tcalls[row["case"], row["impl"]](), mine())
    print(json.dumps(dict(rows=rows, block_masks=[dict(N=N, case=c, impl="torch create_block_mask", **i)
                                                  for c, i in tinfo.items()], reason=reason)))
    return 0


def run_grid(Ns, with_torch, threads):
    from benchmarks.cpu_forward import _child

    rows, block_masks, torch_reason = [], [], None
    for N in Ns:
        q, k, v = inputs(N)
        calls, info = flashkit_calls(N, q, k, v)
        for case, i in info.items():
            block_masks.append(dict(N=N, case=case, impl="flashkit.block_mask (numba)", **i))
        rows += time_calls(N, calls, info)
        del q, k, v, calls
        if with_torch:
            out = _child(["--torch-child", str(N), "--threads", str(threads), "--repeats", str(REPEATS[0])],
                         timeout=3600, module="benchmarks.cpu_mods")
            if "error" in out:
                torch_reason = f"the torch process failed: {out['error']}"
                continue
            for r in out["rows"]:
                print(f"  N={N:5d} {r['case']:10s} {r['impl']:24s} {r['ms']:10.1f} ms  (min {r['min_ms']:.1f}), "
                      f"rel err vs flashkit {r['rel_err_vs_flashkit']:.1e}  [separate process]", flush=True)
            rows += out["rows"]
            block_masks += out["block_masks"]
            torch_reason = torch_reason or out["reason"]
    # Ratios of the fastest runs: on a machine shared with other work the minimum is what the code costs
    # (medians of the same runs are kept beside them).
    by = {(r["N"], r["case"], r["impl"]): r for r in rows}
    for r in rows:
        dense = by.get((r["N"], "dense", "numba"))
        every = by.get((r["N"], r["case"], "numba every tile"))
        flex = by.get((r["N"], r["case"], "torch-flex block mask" if r["case"] in ("documents", "window") else "torch-flex"))
        if dense:
            r["time_vs_dense_numba"] = r["min_ms"] / dense["min_ms"]
            r["speedup_vs_dense_numba"] = dense["min_ms"] / r["min_ms"]
        if every and r["impl"] != "numba every tile" and not r["impl"].startswith("torch"):
            r["speedup_vs_every_tile"] = every["min_ms"] / r["min_ms"]
        if flex and not r["impl"].startswith("torch"):
            r["time_vs_torch_flex"] = r["min_ms"] / flex["min_ms"]
    return rows, block_masks, torch_reason


def show(path):
    with open(path) as f:
        res = json.load(f)
    m = res["machine"]
    print(f"{m['cpu']} ({m.get('llvm_cpu')}, {m['cores']} cores); {res['date']}; commit {str(res.get('commit', '?'))[:10]}"
          f"; load at start {res.get('load_average_at_start')}")
    if res.get("torch_flex_unavailable"):
        print(f"torch FlexAttention: {res['torch_flex_unavailable']}")
    print("ratios of the fastest runs: x dense = speed-up over numba with no mask (every tile), x every = speed-up "
          "over every tile computed with the mask_mod, "
          "t/flex = time / torch FlexAttention")
    print(f"{'N':>6} {'case':10} {'impl':24} {'median ms':>9} {'min ms':>9} {'GFLOP/s':>8} {'x dense':>8} {'x every':>8} "
          f"{'t/flex':>7} {'+MiB':>7}")
    for r in res["results"]:
        def f(key, fmt):
            return format(r[key], fmt) if key in r else ""
        print(f"{r['N']:>6} {r['case']:10} {r['impl']:24} {r['ms']:9.1f} {r['min_ms']:9.1f} {r['gflops']:8.1f} "
              f"{f('speedup_vs_dense_numba', '8.2f'):>8} {f('speedup_vs_every_tile', '8.2f'):>8} {f('time_vs_torch_flex', '7.2f'):>7}"
              f" {format(r['extra_peak_bytes'] / 2**20, '7.1f') if r.get('extra_peak_bytes') is not None else '':>7}")
    c = res.get("mod_cost")
    if c:
        cpu = (f" (CPU time: identity {c['identity_vs_none_cpu']:.3f}x, softcap {c['softcap_vs_none_cpu']:.3f}x)"
               if "identity_vs_none_cpu" in c else "")
        print(f"score_mod cost at N={c['N']} ({c['rounds']} interleaved rounds, fastest): no mod {c['min_ms']['none']:.1f} ms, "
              f"identity {c['identity_vs_none']:.3f}x, softcap {c['softcap_vs_none']:.3f}x{cpu}")
    for w in res.get("sparsity_sweep", []):
        print(f"sweep N={w['N']} {w['documents']:3d} documents: {w['tile_fraction']:.4f} of the tiles, "
              f"{w['min_ms']:9.1f} ms, {w['time_vs_one_document']:.4f} of the time with 1 (efficiency {w['efficiency']:.2f})")
    for b in res.get("block_masks", []):
        extra = f", {b['sparsity']:.1%} of tiles skipped" if "sparsity" in b else f", {b['sparsity_percent']:.1f}% sparse"
        print(f"block mask N={b['N']} {b['case']:10s} {b['impl']:28s} {b['block_mask_ms']:8.1f} ms{extra}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"N = {NS_QUICK[0]} only, 3 runs each")
    ap.add_argument("--ns", help=f"comma-separated N (default {','.join(map(str, NS))})")
    ap.add_argument("--out", help="results file (default benchmarks/results/cpu-mods-<machine>.json)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-torch", action="store_true", help="flashkit only")
    ap.add_argument("--cost-only", action="store_true",
                    help="the checks and the interleaved mod costs (forward and backward) only, into cpu-mods-cost-<machine>.json")
    ap.add_argument("--keep-openblas-env", action="store_true", help="do not unset OPENBLAS_CORETYPE/L2_SIZE")
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    ap.add_argument("--repeats", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--torch-child", type=int, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.table:
        return show(args.table)
    REPEATS[0] = args.repeats or (3 if args.quick else 5)
    if args.torch_child:
        return torch_child(args.torch_child, args.threads)
    if not args.keep_openblas_env:
        _reexec_without_openblas_overrides(argv, module="benchmarks.cpu_mods")
    import numba

    from benchmarks._common import RESULTS, write_json_atomic
    from flashkit.measure import provenance

    numba.set_num_threads(args.threads)
    with_torch = not args.no_torch  # torch runs in its own process (torch_child)
    env = environment(args.threads)
    print(json.dumps({k: env[k] for k in ("machine", "versions", "commit")}), flush=True)
    print(f"correctness (fp32 against the float64 reference, N = {CHECK_N}):", flush=True)
    checks = check_all()
    Ns = tuple(int(n) for n in args.ns.split(",")) if args.ns else NS_QUICK if args.quick else NS
    print("what a score_mod costs (interleaved):", flush=True)
    cost = mod_cost(N=min(MOD_COST_N, max(Ns)))
    cost_backward = mod_cost_backward(N=min(MOD_COST_N, max(Ns)))
    if args.cost_only:
        result = dict(env, benchmark="benchmarks/cpu_mods.py --cost-only", shape=dict(B=B, H=H, d=D, dtype="float32"),
                      checks=checks, mod_cost=cost, mod_cost_backward=cost_backward,
                      load_average_at_end=provenance.load_average())
        out = args.out or RESULTS / f"cpu-mods-cost-{provenance.machine_slug(env['machine'])}.json"
        write_json_atomic(out, result)
        print(f"wrote {out}")
        return 0
    rows, block_masks, torch_reason = run_grid(Ns, with_torch, args.threads)
    print("time against the tiles computed (documents through a block mask):", flush=True)
    sweep = sparsity_sweep(max(Ns), rounds=2 if args.quick else 3)
    result = dict(env, benchmark="benchmarks/cpu_mods.py", shape=dict(B=B, H=H, d=D, dtype="float32"),
                  documents=DOCUMENTS, window=WINDOW, block_size=(128, 128),
                  flops_formula="4*B*H*N*N*d*visible_fraction", checks=checks, mod_cost=cost,
                  mod_cost_backward=cost_backward, results=rows,
                  sparsity_sweep=sweep,
                  block_masks=block_masks, torch_flex_unavailable=torch_reason,
                  load_average_at_end=provenance.load_average())
    out = args.out or RESULTS / f"cpu-mods-{provenance.machine_slug(env['machine'])}.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")
    show(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
