"""Decoding speed: one new token against a KV cache of 1k..32k tokens, as tokens/s and bytes/s.

    python -m benchmarks.decode                  # CPU (and the GPU when CuPy sees one)
    python -m benchmarks.decode --device gpu --out $OUT

A decoding step reads the whole cache once: 2 * B * H_kv * L * d * itemsize bytes of K and V, and
does 4 * B * Hq * L * d FLOPs, about g / itemsize FLOPs per byte (1 for fp32 GQA 32/8): far below
what any CPU or GPU needs to be compute-bound, so the yardstick is memory bandwidth. Each run measures
the machine's bandwidth with a large copy (bytes read + bytes written) in the same process and
reports every method's K+V bytes per second beside it.

Methods, one attention layer, batch B (default 1 and 8), GQA Hq/H_kv (default 32/8, d = 128, like
Llama-3-8B):
  CPU  numba-splitk (splits="auto"), numba-splitk with splits=1 (unsplit: only the B * H_kv heads run
       in parallel), numba-splitk-loops and numba-splitk-vector (the same splits through the kernel with
       flashkit/cpu/decode.py's split_task, plain loops, and its split_task_vec, explicit vector registers:
       which one numba-splitk takes depends on the registers, decode.VECTOR_PREFERRED), numpy-standard (batch 1: materialises S, P:
       flashkit.attention on the filled cache); an MQA case (H_kv = 1) where unsplit leaves all but
       one core idle; and TinyDecoder generation (32/8 heads of 128, d_model 1024, 2 layers, a cache
       of --model-length random tokens a layer): tokens/s beside the bandwidth limit, the bytes of
       every weight and every layer's K and V read once a step at the copy bandwidth; "auto" also with
       NumPy's BLAS on one thread (blas_threads=1).
  GPU  cupy-splitk (auto splits and a sweep), splits=1, and torch's SDPA backends (flash, cuDNN,
       efficient, math) when torch sees the GPU. Timed with CUDA events over back-to-back calls.
Results go to benchmarks/results/decode-<machine>.json (written atomically).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, write_json_atomic
from flashkit.measure.provenance import commit, cpu_info, load_average, machine_slug, now_utc, versions
from flashkit.measure.timing import median_time


def kv_bytes(B, Hkv, L, d, itemsize):
    return 2 * B * Hkv * L * d * itemsize


# --------------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------------
def cpu_bandwidth(nbytes=512 * 2**20, repeats=5):
    """Copy (read + write counted) and read-only bandwidth of large arrays, in GB/s: NumPy's copy (one
    thread) and Numba parallel loops (all threads)."""
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def par_copy(a, b):
        for i in prange(a.shape[0]):
            b[i] = a[i]

    from flashkit.cpu.vec import hsum, lanes, load, splat

    @njit(parallel=True, cache=False)
    def par_sum(a):
        n_blocks = a.shape[0] // 65536  # one float32 sum per block of 256 KiB, 4 chains of vector adds
        sums = np.zeros(n_blocks, np.float32)
        W = lanes(a)
        for i in prange(n_blocks):
            z = splat(np.float32(0))
            s0, s1, s2, s3 = z, z, z, z
            for j in range(i * 65536, (i + 1) * 65536, 4 * W):
                s0 = s0 + load(a, j)
                s1 = s1 + load(a, j + W)
                s2 = s2 + load(a, j + 2 * W)
                s3 = s3 + load(a, j + 3 * W)
            sums[i] = hsum(s0 + s1 + s2 + s3)
        return sums.sum()

    a = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    b = np.empty_like(a)
    out = {"bytes": int(a.nbytes)}
    t1 = median_time(lambda: np.copyto(b, a), repeats=repeats)
    t2 = median_time(lambda: par_copy(a, b), repeats=repeats, warmup=2)
    t3 = median_time(lambda: par_sum(a), repeats=repeats, warmup=2)
    out["numpy_copy_GBps"] = 2 * a.nbytes / t1["median_s"] / 1e9
    out["parallel_copy_GBps"] = 2 * a.nbytes / t2["median_s"] / 1e9
    out["parallel_read_GBps"] = a.nbytes / t3["median_s"] / 1e9
    out["copy_GBps"] = max(out["numpy_copy_GBps"], out["parallel_copy_GBps"])  # the yardstick (median runs)
    out["copy_best_GBps"] = 2 * a.nbytes / min(t1["min_s"], t2["min_s"]) / 1e9  # the fastest copy seen
    return out


def run_cpu(lengths, repeats, batches=(1,), Hq=32, Hkv=8, d=128):
    import numba

    import flashkit
    from flashkit.decode import attention_decode
    from flashkit.cpu import decode as cpu_decode

    flashkit.warmup(directions="decode")  # "auto" serves from NumPy until numba-splitk is compiled

    rng = np.random.default_rng(0)
    rows = []
    cases = [("GQA", B, Hq, Hkv, L) for B in batches for L in lengths] + [("MQA", 1, Hq // 4, 1, max(lengths))]
    for kind, B, hq, hkv, L in tqdm_(cases, "cpu"):
        q = rng.standard_normal((B, hq, 1, d), dtype=np.float32)
        k = rng.standard_normal((B, hkv, L, d), dtype=np.float32)
        v = rng.standard_normal((B, hkv, L, d), dtype=np.float32)
        nbytes = kv_bytes(B, hkv, L, d, 4)
        methods = [("numba-splitk", dict(backend="numba-splitk", splits="auto")),
                   ("numba-unsplit", dict(backend="numba-splitk", splits=1))]
        if L == max(lengths) and kind == "GQA":
            # the kernel before registers (one dot product per row and key through LLVM's loops), same splits
            methods.append(("numba-splitk-loops", dict(vector=False)))
            if cpu_decode.vector_path(d, np.float32):  # and the register task, whichever "auto" prefers here
                methods.append(("numba-splitk-vector", dict(vector=True)))
        if B == 1:  # numpy-standard repeats K and V over the group: 4x the cache in memory at batch 8
            methods.append(("numpy-standard", dict(backend="numpy-standard")))
        if L == max(lengths) and B == 1:  # the kernel on one core: no wait for a second thread (a busy machine's worst case)
            methods.append(("numba-1-thread", dict(backend="numba-splitk", splits="auto", threads=1)))
        for name, kw in methods:
            kw = dict(kw)
            n_threads = kw.pop("threads", None)
            previous = numba.get_num_threads()
            if n_threads:
                numba.set_num_threads(n_threads)
            if "vector" in kw:
                P = check_decode(q, k, v)  # the same problem the public call builds
                fn = lambda P=P, vec=kw["vector"]: cpu_decode.decode(P, "auto", vector=vec)  # noqa: E731
            else:
                fn = lambda kw=kw, q=q, k=k, v=v: attention_decode(q, k, v, **kw)  # noqa: E731
            try:
                t = median_time(fn, repeats=repeats, warmup=2)
            finally:
                numba.set_num_threads(previous)
            splits = kw.get("splits", "auto")
            rows.append(dict(kind=kind, method=name, B=B, Hq=hq, Hkv=hkv, d=d, L=L, dtype="float32",
                             threads=n_threads or previous,
                             splits=(cpu_decode.auto_splits(B, hkv, L, n_threads or previous) if splits == "auto"
                                     else splits),
                             ms=t["median_s"] * 1e3, ms_min=t["min_s"] * 1e3, tokens_per_s=B / t["median_s"],
                             kv_GBps=nbytes / t["median_s"] / 1e9, kv_bytes=nbytes))
        del q, k, v
    return rows


def check_decode(q, k, v):
    from flashkit.decode import check

    return check(q, k, v)


def run_model(L, steps, batches=(1,), Hq=32, Hkv=8, d=128, d_model=1024, n_layers=2):
    """TinyDecoder generation: `steps` decoding steps after a cache of L random tokens per layer, the
    time of each step beside the bytes it must read (every weight once, every layer's K and V): tokens
    per second against the bandwidth limit. backend "auto" (the layer's decoding step: split-K on the
    cache in place) and "numba" (unsplit: the prefill kernel on a copy of the filled cache)."""
    from threadpoolctl import threadpool_limits

    import flashkit
    from flashkit.layers import TinyDecoder

    flashkit.warmup(directions=("forward", "decode"))  # the model's "auto" steps, compiled before the clock
    rows = []
    for B in batches:
        model = TinyDecoder(vocab=256, d_model=d_model, n_heads=Hq, n_kv_heads=Hkv, n_layers=n_layers, seed=0,
                            head_dim=d)
        weight_bytes = sum(w.nbytes for w in model.parameters().values()) - model.embed.nbytes  # one embedding row read
        rng = np.random.default_rng(1)
        # "auto" twice: BLAS as configured, and NumPy's BLAS on one thread (its idle threads spin for a
        # while after each product, on the cores the split-K threads need)
        for backend, blas in (("auto", None), ("auto", 1), ("numba", None)):
            caches = model.new_caches(L + steps + 2, batch=B)
            for c in caches:
                c.append(rng.standard_normal((B, Hkv, L, d), dtype=np.float32),
                         rng.standard_normal((B, Hkv, L, d), dtype=np.float32))
            tok = np.zeros((B, 1), np.int64)
            model.forward(tok, caches, backend=backend)  # warm-up: compile or load
            times = []
            with threadpool_limits(blas, user_api="blas"):
                for _ in range(steps):
                    step_bytes = weight_bytes + model.cache_bytes(caches)
                    t0 = time.perf_counter()
                    logits = model.forward(tok, caches, backend=backend)
                    times.append(time.perf_counter() - t0)
                    tok = logits[:, -1].argmax(-1)[:, None]
            best = min(times)
            method = f"TinyDecoder backend={backend}" + ("" if blas is None else f" blas_threads={blas}")
            rows.append(dict(method=method, B=B, Hq=Hq, Hkv=Hkv, d=d, d_model=d_model,
                             n_layers=n_layers, L=L, steps=steps, ms=float(np.median(times)) * 1e3, ms_min=best * 1e3,
                             tokens_per_s=B / float(np.median(times)), step_bytes=int(step_bytes),
                             weight_bytes=int(weight_bytes), GBps=step_bytes / float(np.median(times)) / 1e9,
                             GBps_best=step_bytes / best / 1e9))
            del caches
    return rows


def tqdm_(items, desc):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, file=sys.stderr, leave=False)
    except ImportError:
        return items


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------
def gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def cuda_time(fn, inner=50, outer=7, warmup=5):
    """Median microseconds per call of fn() over `outer` groups of `inner` back-to-back calls, each group
    timed with CUDA events (flashkit.measure.timing.median_time): the launches overlap as in a decoding
    loop. torch calls are timed the same way: torch and CuPy share the default stream."""
    for _ in range(warmup):
        fn()

    def group():
        for _ in range(inner):
            fn()

    t = median_time(group, repeats=outer, budget_s=float("inf"), warmup=0, cuda=True)
    return t["median_s"] * 1e6 / inner


def gpu_bandwidth(nbytes=2 * 2**30):
    """Device-to-device copy of a large buffer, bytes read + written per second (GB/s): the card's copy
    ceiling as flashkit.measure.ceilings measures it for the roofline."""
    from flashkit.measure import ceilings

    return {"bytes": int(nbytes), "copy_GBps": ceilings.copy_tbps(nbytes) * 1e3}


# BULK kernel variants timed beside the default: (stages, bytes of K per stage)
BULK_SWEEP = ((2, 16384), (3, 16384), (4, 8192))


def run_gpu(lengths, batches, Hq=32, Hkv=8, d=128, sweep=(8, 16, 32, 64, 128, 256)):
    import cupy

    from flashkit.decode import check
    from flashkit.gpu import decode as gpu_decode

    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        has_torch = torch.cuda.is_available()
    except Exception:
        has_torch = False
    rows, errors = [], []
    rng = cupy.random.default_rng(0)
    for B in batches:
        for L in tqdm_(lengths, f"gpu B={B}"):
            q = rng.standard_normal((B, Hq, 1, d), dtype=cupy.float32).astype(cupy.float16)
            k = rng.standard_normal((B, Hkv, L, d), dtype=cupy.float32).astype(cupy.float16)
            v = rng.standard_normal((B, Hkv, L, d), dtype=cupy.float32).astype(cupy.float16)
            nbytes = kv_bytes(B, Hkv, L, d, 2)
            P = check(q, k, v)
            auto = gpu_decode.auto_splits(P)
            splits_list = [("cupy-splitk", auto, True, None), ("cupy-unsplit", 1, True, None),
                           ("cupy-splitk-noprefetch", auto, False, None),
                           ("cupy-splitk-l2hint" if not gpu_decode.L2_HINT else "cupy-splitk-no-l2hint", auto, True,
                            not gpu_decode.L2_HINT)]
            if L == max(lengths):
                splits_list += [("cupy-splitk-sweep", s, True, None) for s in sweep if s != auto]
            splits_list = [row + (None,) for row in splits_list]
            for stages, tile in BULK_SWEEP:  # the BULK kernel (cp.async.bulk into shared memory): one wave, and twice that
                bulk = (stages, tile)
                if L != max(lengths) and bulk != BULK_SWEEP[1]:
                    continue
                s_auto = gpu_decode.auto_splits(P, bulk=bulk)
                for s in (s_auto, 2 * s_auto):
                    splits_list.append((f"cupy-splitk-bulk-s{stages}-t{tile // 1024}k", s, True, None, bulk))
            ref = None
            for name, s, prefetch, l2_hint, bulk in splits_list:
                step = gpu_decode.prepare(P, s, prefetch=prefetch, l2_hint=l2_hint, bulk=bulk)
                O, _ = step()
                if ref is None:
                    ref = O.astype(cupy.float32).copy()
                err = float(cupy.abs(O.astype(cupy.float32) - ref).max())
                us = cuda_time(step)
                rows.append(dict(method=name, B=B, Hq=Hq, Hkv=Hkv, d=d, L=L, dtype="float16", splits=s, us=us, prefetch=prefetch,
                                 blocks_per_sm=step.config["blocks_per_sm"], bulk=bulk,
                                 tokens_per_s=B / (us * 1e-6), kv_GBps=nbytes / (us * 1e-6) / 1e9, kv_bytes=nbytes,
                                 max_abs_diff_vs_auto=err, grid=list(step.config["grid"])))
            if has_torch:
                tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
                for tname, be in (("torch-flash", SDPBackend.FLASH_ATTENTION), ("torch-cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("torch-efficient", SDPBackend.EFFICIENT_ATTENTION), ("torch-math", SDPBackend.MATH)):
                    def call(be=be):
                        with sdpa_kernel(be):
                            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)
                    try:
                        out = call()
                        err = float((cupy.from_dlpack(out.detach()).astype(cupy.float32) - ref).__abs__().max())
                        us = cuda_time(call, inner=20 if be == SDPBackend.MATH else 50)
                        rows.append(dict(method=tname, B=B, Hq=Hq, Hkv=Hkv, d=d, L=L, dtype="float16", splits=None,
                                         us=us, tokens_per_s=B / (us * 1e-6), kv_GBps=nbytes / (us * 1e-6) / 1e9,
                                         kv_bytes=nbytes, max_abs_diff_vs_auto=err))
                    except Exception as exc:  # a backend that cannot run this shape: say so, keep going
                        errors.append(f"{tname} B={B} L={L}: {type(exc).__name__}: {str(exc)[:200]}")
            del q, k, v, P
            cupy.get_default_memory_pool().free_all_blocks()
    return rows, errors


def gpu_name():
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode() if isinstance(name, bytes) else name


# --------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "gpu", "all"), default="all",
                    help="what to measure (all: the CPU, and the GPU when CuPy sees one)")
    ap.add_argument("--lengths", default="1024,4096,16384,32768", help="cache lengths L, comma-separated")
    ap.add_argument("--batches", default="1,8", help="batch sizes (CPU and GPU), comma-separated")
    ap.add_argument("--model-length", type=int, default=16384, help="cached tokens of the TinyDecoder run (0: none)")
    ap.add_argument("--model-steps", type=int, default=5, help="timed decoding steps of the TinyDecoder run")
    ap.add_argument("--repeats", type=int, default=7, help="timed CPU calls per point (median reported)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for decode-<machine>.json")
    ap.add_argument("--note", default="", help="a note stored with the results (e.g. what else ran)")
    ap.add_argument("--tag", default="", help="appended to the results file name (decode-<machine>-<tag>.json)")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    do_cpu = args.device in ("cpu", "all")
    do_gpu = args.device == "gpu" or (args.device == "all" and gpu_available())
    if args.device == "gpu" and not gpu_available():
        ap.error("--device gpu: CuPy sees no GPU here")

    result = {"benchmark": "decode", "when": now_utc(), "command": " ".join(["python -m benchmarks.decode"] + (argv or sys.argv[1:])),
              "commit": commit(), "versions": versions("numpy", "numba", "cupy-cuda13x", "cupy-cuda12x", "torch"),
              "note": args.note, "load_average_before": load_average()}
    info = cpu_info()
    result["cpu_info"] = info
    slug = machine_slug(info)
    if do_cpu:
        import numba
        from threadpoolctl import threadpool_limits

        from flashkit.cpu import threads as cpu_threads

        cpu_threads.choose_layer()  # before the bandwidth kernels start Numba's pool: the layer flashkit uses

        # NumPy's BLAS (numpy-standard) gets one thread: its pool and Numba's fight over the same cores
        # otherwise (a 2-thread BLAS matrix-vector product measured 10-30x slower on a busy 2-core machine).
        with threadpool_limits(1, user_api="blas"):
            batches = [int(x) for x in args.batches.split(",")]
            result["cpu"] = {"threads": numba.get_num_threads(), "blas_threads": 1, "bandwidth": cpu_bandwidth(),
                             "rows": run_cpu(lengths, args.repeats, batches)}
        if args.model_length:  # the model's matrix products are large enough for BLAS threads
            result["cpu"]["model"] = run_model(args.model_length, args.model_steps, batches)
        result["cpu"]["numba_threading_layer"] = numba.threading_layer()  # omp, tbb or workqueue
        bw = result["cpu"]["bandwidth"]["copy_GBps"]
        for r in result["cpu"]["rows"]:
            r["fraction_of_copy_bandwidth"] = r["kv_GBps"] / bw  # median time
            r["fraction_of_copy_bandwidth_best"] = (r["kv_bytes"] / (r["ms_min"] * 1e-3) / 1e9
                                                    / result["cpu"]["bandwidth"]["copy_best_GBps"])  # fastest runs
        for r in result["cpu"].get("model", []):
            r["fraction_of_copy_bandwidth"] = r["GBps"] / bw
            r["fraction_of_copy_bandwidth_best"] = r["GBps_best"] / result["cpu"]["bandwidth"]["copy_best_GBps"]
            r["bandwidth_limit_tokens_per_s"] = r["B"] * bw * 1e9 / r["step_bytes"]
    if do_gpu:
        name = gpu_name()
        slug = "-".join(filter(None, [slug if do_cpu else None, name.lower()]))
        slug = "".join(c if c.isalnum() else "-" for c in slug).strip("-")
        bw = gpu_bandwidth()
        rows, errors = run_gpu(lengths, [int(x) for x in args.batches.split(",")])
        for r in rows:
            r["fraction_of_copy_bandwidth"] = r["kv_GBps"] / bw["copy_GBps"]
        result["gpu"] = {"name": name, "bandwidth": bw, "rows": rows, "errors": errors}
    result["load_average_after"] = load_average()
    path = Path(args.out) / f"decode-{slug}{'-' + args.tag if args.tag else ''}.json"
    write_json_atomic(path, result)
    print_tables(result)
    print(f"wrote {path}")
    return result


def print_tables(result):
    if "cpu" in result:
        c = result["cpu"]
        bw = c["bandwidth"]
        print(f"CPU ({c['threads']} threads, Numba threading layer {c['numba_threading_layer']}): copy {bw['copy_GBps']:.1f} GB/s, fastest {bw['copy_best_GBps']:.1f} (numpy {bw['numpy_copy_GBps']:.1f}, "
              f"parallel {bw['parallel_copy_GBps']:.1f}), parallel read {bw['parallel_read_GBps']:.1f} GB/s")
        print(f"{'case':5} {'method':18} {'B':>2} {'Hq/Hkv':>7} {'L':>6} {'splits':>6} {'ms':>8} {'tok/s':>8} {'K+V GB/s':>9} {'of copy':>8} {'best':>6}")
        for r in c["rows"]:
            print(f"{r['kind']:5} {r['method']:18} {r.get('B', 1):>2} {r['Hq']:>3}/{r['Hkv']:<3} {r['L']:>6} {str(r['splits']):>6} {r['ms']:8.2f} "
                  f"{r['tokens_per_s']:8.1f} {r['kv_GBps']:9.2f} {r['fraction_of_copy_bandwidth']:8.0%} {r['fraction_of_copy_bandwidth_best']:6.0%}")
        for r in c.get("model", []):
            print(f"{r['method']:43} B={r['B']} L={r['L']} {r['n_layers']} layers: {r['ms']:8.1f} ms/step, {r['tokens_per_s']:7.1f} tok/s "
                  f"(limit {r['bandwidth_limit_tokens_per_s']:.1f} at copy bandwidth), {r['step_bytes'] / 2**20:.0f} MiB a step, "
                  f"{r['GBps']:.1f} GB/s = {r['fraction_of_copy_bandwidth']:.0%} of copy (best {r['fraction_of_copy_bandwidth_best']:.0%})")
    if "gpu" in result:
        g = result["gpu"]
        print(f"GPU {g['name']}: copy {g['bandwidth']['copy_GBps']:.0f} GB/s (read + write)")
        print(f"{'method':18} {'B':>2} {'L':>6} {'splits':>6} {'us':>8} {'tok/s':>9} {'K+V GB/s':>9} {'of copy':>8} {'maxdiff':>8}")
        for r in g["rows"]:
            print(f"{r['method']:18} {r['B']:>2} {r['L']:>6} {str(r['splits']):>6} {r['us']:8.1f} {r['tokens_per_s']:9.0f} "
                  f"{r['kv_GBps']:9.0f} {r['fraction_of_copy_bandwidth']:8.0%} {r['max_abs_diff_vs_auto']:8.1e}")
        for e in g["errors"]:
            print("error:", e)


if __name__ == "__main__":
    main()
