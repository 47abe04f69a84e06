"""Ring attention on the GPU: exact against one GPU's flashkit.attention, over NCCL and the simulated ring.

    PYTHONPATH=. python -m benchmarks.gpu_ring_check --out "$OUT"     # < 60 s on one H200

With the GPUs there (G of them, at most 8):

1. NCCL ranks: G processes (multiprocessing spawn; in this process when G = 1), rank r on GPU r, an
   NcclComm each; ring_attention on its chunk of CuPy arrays against flashkit.attention of the whole
   sequence on that GPU (causal zigzag and contiguous, a window across chunk boundaries, GQA, a length
   no multiple of the rank count), then the ring forward timed (CUDA synchronised, min of 5) beside the
   one-GPU call. With one GPU the ring has one rank and moves nothing, so an NCCL exchange of a block
   with itself (one group of send and receive) checks the transport too.
2. The simulated ring of 2 and 4 virtual ranks on GPU 0 (threads, CuPy arrays): the same schedule as
   real ranks, forward in float32 and float16 and the backward in float32, against the one-GPU calls.

Writes <out>/gpu-ring-check.json (results, errors, provenance) and prints a table; exits 1 when a check
fails, 2 (with "gpu_ring_check: no GPU ...") when CuPy sees no CUDA device. Without NCCL the simulated ring still
runs and the missing NCCL is reported as an error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


TOL = {"float32": 2e-5, "float16": 5e-3}
# (name, B, Hq, Hkv, N, d, dtype, causal, window, split)
CASES = [
    ("causal zigzag GQA", 1, 8, 2, 4099, 64, "float32", True, None, "zigzag"),
    ("causal contiguous", 1, 4, 4, 3001, 64, "float32", True, None, "contiguous"),
    ("window across chunks", 2, 4, 1, 2053, 64, "float32", False, (300, 40), "contiguous"),
    ("causal zigzag fp16", 1, 8, 8, 4096, 64, "float16", True, None, "zigzag"),
]
TIMED = dict(B=1, Hq=16, Hkv=16, N=32768, d=64, dtype="float16", causal=True, split="zigzag")


def _inputs(cp, seed, B, Hq, Hkv, N, d, dtype):
    rng = cp.random.default_rng(seed)
    return tuple(rng.standard_normal(s, dtype=cp.float32).astype(dtype) for s in
                 ((B, Hq, N, d), (B, Hkv, N, d), (B, Hkv, N, d), (B, Hq, N, d)))


def _rel(cp, a, b):
    a, b = a.astype(cp.float64), b.astype(cp.float64)
    return float(cp.linalg.norm(a - b) / cp.linalg.norm(b))


def _timed(cp, fn, repeats=5):
    fn()
    cp.cuda.Device().synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def nccl_rank(rank, size, uid, timeout, results, abort_event=None):
    """One NCCL rank: checks and timings of its chunk; puts a dict on `results` (a list or a queue)."""
    out = {"rank": rank, "checks": [], "errors": []}
    try:
        import cupy as cp

        import flashkit
        from flashkit.distributed import NcclComm, ring_attention, split_sequence, unsplit_sequence  # noqa: F401

        cp.cuda.Device(rank).use()
        comm = NcclComm(rank, size, uid, timeout=timeout, abort_event=abort_event)
        for n, (name, B, Hq, Hkv, N, d, dtype, causal, window, split) in enumerate(CASES):
            q, k, v, _ = _inputs(cp, 100 + n, B, Hq, Hkv, N, d, dtype)
            o_ref = flashkit.attention(q, k, v, causal=causal, window=window)
            parts = [split_sequence(x, size, split) for x in (q, k, v)]
            o = ring_attention(*(p[rank] for p in parts), comm=comm, causal=causal, window=window, split=split)
            ref_rows = split_sequence(o_ref, size, split)[rank]
            err = _rel(cp, o, ref_rows)
            out["checks"].append({"what": f"nccl {size} rank(s): {name}", "dtype": dtype, "N": N, "rel_err": err,
                                  "ok": err <= TOL[dtype]})
        t = TIMED
        q, k, v, _ = _inputs(cp, 7, t["B"], t["Hq"], t["Hkv"], t["N"], t["d"], t["dtype"])
        q_r, k_r, v_r = (split_sequence(x, size, t["split"])[rank] for x in (q, k, v))
        out["ring_s"] = _timed(cp, lambda: ring_attention(q_r, k_r, v_r, comm=comm, causal=t["causal"], split=t["split"]))
        if rank == 0:
            out["single_gpu_s"] = _timed(cp, lambda: flashkit.attention(q, k, v, causal=t["causal"]))
        if size == 1:  # nothing moved in a ring of one: exchange a block with ourselves through NCCL, last
            x = cp.arange(3 * 1000, dtype=cp.float32).reshape(3, 1000)
            y = cp.empty_like(x)
            comm.isendrecv([x], 0, [y], 0, what="NCCL self-exchange").wait()
            out["checks"].append({"what": "nccl self-exchange of a block", "dtype": "float32", "N": 1000,
                                  "rel_err": _rel(cp, y, x), "ok": bool(cp.array_equal(x, y))})
    except Exception as exc:  # noqa: BLE001 - reported, loudly, by the parent
        out["errors"].append(f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}")
        if abort_event is not None:
            abort_event.set()
    results.append(out) if isinstance(results, list) else results.put(out)


def simulated(checks, errors, deadline):
    """The simulated ring of 2 and 4 virtual ranks on GPU 0, forward (fp32, fp16) and backward (fp32);
    cases that would start after `deadline` (time.perf_counter()) are reported as not run."""
    import cupy as cp

    import flashkit
    from flashkit.distributed import ring_attention, ring_attention_backward, simulate, split_sequence, unsplit_sequence

    for size in (2, 4):
        for n, (name, B, Hq, Hkv, N, d, dtype, causal, window, split) in enumerate(CASES):
            what = f"simulated {size} ranks: {name}"
            if time.perf_counter() > deadline:
                errors.append(f"{what}: not run, the 60 s budget was nearly spent (compiles on a cold machine?)")
                continue
            try:
                q, k, v, do = _inputs(cp, 200 + n, B, Hq, Hkv, N, d, dtype)
                o_ref, lse_ref = flashkit.attention(q, k, v, causal=causal, window=window, return_lse=True)
                parts = [split_sequence(x, size, split) for x in (q, k, v, do)]
                backward = dtype == "float32"

                def rank(c):
                    q_r, k_r, v_r, do_r = (p[c.rank] for p in parts)
                    o, lse = ring_attention(q_r, k_r, v_r, comm=c, causal=causal, window=window, split=split,
                                            return_lse=True)
                    grads = (ring_attention_backward(do_r, q_r, k_r, v_r, o, lse, comm=c, causal=causal, window=window,
                                                     split=split) if backward else ())
                    return (o,) + tuple(grads)

                res = simulate(rank, size, timeout=30)
                o = unsplit_sequence([r[0] for r in res], split)
                err = _rel(cp, o, o_ref)
                checks.append({"what": what, "dtype": dtype, "N": N, "rel_err": err, "ok": err <= TOL[dtype]})
                if backward:
                    g_ref = flashkit.attention_backward(do, q, k, v, o_ref, lse_ref, causal=causal, window=window)
                    errs = [_rel(cp, unsplit_sequence([r[1 + i] for r in res], split), g_ref[i]) for i in range(3)]
                    checks.append({"what": what + " (backward dq, dk, dv)", "dtype": dtype, "N": N, "rel_err": max(errs),
                                   "ok": max(errs) <= 1e-4})
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{what}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu-ring-check.json (default $OUT)")
    ap.add_argument("--ranks", type=int, help="NCCL ranks (default: every GPU, at most 8)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds a receive may wait")
    args = ap.parse_args(argv)
    from flashkit.distributed import nccl

    try:
        import cupy as cp

        gpus = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - ImportError, or no CUDA driver/device
        print(f"gpu_ring_check: no GPU to check the ring on: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if gpus < 1:
        print("gpu_ring_check: no GPU to check the ring on: CuPy sees no CUDA device", file=sys.stderr)
        return 2
    if not args.out:
        print("gpu_ring_check: give --out DIR or set OUT", file=sys.stderr)
        return 2
    nccl_ok, nccl_why = nccl.available()  # without NCCL the simulated ring still runs; the check fails loudly

    from flashkit.measure import provenance

    t0 = time.perf_counter()
    size = args.ranks or min(gpus, 8)
    if not 1 <= size <= gpus:
        print(f"gpu_ring_check: --ranks must be between 1 and the {gpus} GPU(s) here; got {size}", file=sys.stderr)
        return 2
    ranks = []
    if not nccl_ok:
        ranks.append({"rank": -1, "checks": [], "errors": [f"NCCL ranks not run: {nccl_why}"]})
        size = 0
    elif size == 1:
        uid = nccl.unique_id()
        nccl_rank(0, 1, uid, args.timeout, ranks)
    else:
        import multiprocessing as mp

        uid = nccl.unique_id()
        ctx = mp.get_context("spawn")
        queue, abort_event = ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=nccl_rank, args=(r, size, uid, args.timeout, queue, abort_event)) for r in range(size)]
        for p in procs:
            p.start()
        deadline = time.time() + 45
        while len(ranks) < size and time.time() < deadline:
            try:
                ranks.append(queue.get(timeout=1))
            except Exception:  # noqa: BLE001 - queue.Empty: keep waiting until the deadline
                pass
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.time()))
            if p.is_alive():
                p.kill()
        if len(ranks) < size:
            ranks.append({"rank": -1, "checks": [], "errors": [f"only {len(ranks)} of {size} NCCL ranks reported in 45 s"]})
    checks = [c for r in ranks for c in r["checks"]]
    errors = [e for r in ranks for e in r["errors"]]
    simulated(checks, errors, deadline=t0 + 45)
    timing = {"shape": TIMED, "nccl_ranks": size,
              "ring_s_per_rank": [r.get("ring_s") for r in sorted(ranks, key=lambda r: r["rank"])],
              "single_gpu_s": next((r["single_gpu_s"] for r in ranks if "single_gpu_s" in r), None)}
    result = {"benchmark": "benchmarks/gpu_ring_check.py", "gpu": provenance.gpu_info(), "date": provenance.now_utc(),
              "versions": provenance.versions("numpy", "cupy-cuda13x", "cupy-cuda12x"), "nccl_ranks": size, "gpus": gpus,
              "checks": checks, "errors": errors, "timing": timing, "wall_s": time.perf_counter() - t0}
    result.update(provenance.commit())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu-ring-check.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("| check | dtype | N | rel. error | ok |\n| --- | --- | --- | --- | --- |")
    for c in checks:
        print(f"| {c['what']} | {c['dtype']} | {c['N']} | {c['rel_err']:.2e} | {'yes' if c['ok'] else 'NO'} |")
    ring_s = [s for s in timing["ring_s_per_rank"] if s is not None]
    if ring_s and timing["single_gpu_s"]:
        print(f"timed {TIMED}: ring on {size} NCCL rank(s) {max(ring_s) * 1e3:.2f} ms, one GPU's flashkit.attention "
              f"{timing['single_gpu_s'] * 1e3:.2f} ms")
    for e in errors:
        print("ERROR " + e, file=sys.stderr)
    failed = errors or not checks or not all(c["ok"] for c in checks)
    print(f"gpu_ring_check: {'FAILED' if failed else 'OK'}, {len(checks)} checks, {len(errors)} errors, "
          f"{result['wall_s']:.1f} s; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
