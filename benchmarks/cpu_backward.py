"""CPU backward attention, side by side: NumPy standard, the Numba backward rungs (rung 3 both ways), torch SDPA.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.cpu_backward
    python -m benchmarks.cpu_backward --quick          # N in {512, 1024}, no N = 16384 memory
    python -m benchmarks.cpu_backward --table benchmarks/results/cpu-backward-<machine>.json

fp32, B = 1, H = 8, d = 64, N in {1024, 2048, 4096, 8192}, causal and not, all cores. Each backward is
checked against the float64 reference at N = 512 first, then timed after a warm-up (median of up to 5):

  numpy-standard   flashkit.attention_backward(..., backend="numpy-standard"): P and dP materialised
  numba            flashkit.attention_backward(..., backend="numba"): the public call (rung 4's backward,
                   flashkit/cpu/rung4_fused_backward.py: no BLAS, the fused micro-kernel, per-thread dQ partials)
  numba-gemm       backend="numba-gemm": rung 3's backward (BLAS tile GEMMs, per-thread dQ partials)
  numba-two-pass   rung 3 with a separate dQ pass instead (flashkit.cpu.rung3_gemm_backward.run, variant)
  torch-sdpa       torch.autograd.grad of scaled_dot_product_attention's output (the forward run once,
                   outside the timing, with retain_graph=True): the backward alone

    FLOPs of a backward = 2.5 x the forward's 4 * B * H * N * N * d * visible fraction

as FlashAttention's papers count it (5 matrix products against the forward's 2). The 2-thread sgemm rate
is measured in the same run. Extra memory of one backward call beyond its inputs and gradients is
measured in a fresh process (tracemalloc and peak RSS). Results: benchmarks/results/cpu-backward-<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.cpu_forward import B, D, H, _reexec_without_openblas_overrides, _set_threads, environment, \
    inputs, sgemm_rate

NS = (1024, 2048, 4096, 8192)
NS_QUICK = (512, 1024)
STANDARD_MAX_N = 4096  # numpy-standard's S, P, dP, dS: 4 x 8 x 8192^2 x 4 bytes = 8.6 GB at N = 8192
IMPLS = ("numpy-standard", "numba", "numba-gemm", "numba-two-pass", "torch-sdpa")


def problem_arrays(N, causal, seed=0):
    """q, k, v, the forward's o and lse (flashkit's numba forward), and a random do."""
    import numpy as np

    import flashkit

    q, k, v = inputs(N, seed)
    o, lse = flashkit.attention(q, k, v, causal=causal, return_lse=True)
    do = np.random.default_rng(seed + 1).standard_normal(o.shape, dtype=np.float32)
    return do, q, k, v, o, lse


def call(impl, do, q, k, v, o, lse, causal):
    """A function of no arguments that runs one backward of `impl`, returning (dq, dk, dv)."""
    import flashkit

    if impl == "torch-sdpa":
        import torch
        import torch.nn.functional as F

        tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
        out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)  # Nq == Nk: same mask as flashkit's
        tdo = torch.from_numpy(do)
        return lambda: tuple(g.numpy() for g in torch.autograd.grad(out, (tq, tk, tv), tdo, retain_graph=True))
    if impl == "numba-two-pass":
        from flashkit import validate
        from flashkit.cpu import rung3_gemm_backward as backward_gemm

        def run():
            problem = validate.check_backward(do, q, k, v, o, lse, causal=causal)  # as the public call does
            return backward_gemm.run(problem, "two-pass")
        return run
    return lambda: flashkit.attention_backward(do, q, k, v, o, lse, causal=causal, backend=impl)


def flops(N, causal):
    from flashkit.problem import Problem  # noqa: F401  (the formula's home)
    from flashkit.masks import visible_fraction

    return 2.5 * 4.0 * B * H * N * N * D * (visible_fraction(N, N, (-1, 0)) if causal else 1.0)


def check_all(impls):
    import numpy as np

    from flashkit import validate
    from flashkit.reference import reference_backward

    out = []
    for causal in (False, True):
        args = problem_arrays(512, causal, seed=3)
        ref = reference_backward(validate.check_backward(*(x.astype(np.float64) for x in args), causal=causal))
        for impl in impls:
            grads = call(impl, *args, causal)()
            errs = [float(np.linalg.norm(g - r) / np.linalg.norm(r)) for g, r in zip(grads, ref)]
            ok = max(errs) <= 1e-4
            out.append(dict(impl=impl, causal=causal, rel_err_dq_dk_dv=errs, ok=ok))
            print(f"  check N=512 causal={causal!s:5} {impl:15s} rel err dq {errs[0]:.1e} dk {errs[1]:.1e} "
                  f"dv {errs[2]:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    return out


def run_grid(Ns, impls, repeats):
    from flashkit.measure.provenance import load_average
    from flashkit.measure.timing import median_time

    rows = []
    for N in Ns:
        for causal in (False, True):
            args = problem_arrays(N, causal)
            for impl in impls:
                if impl == "numpy-standard" and N > STANDARD_MAX_N:
                    continue
                t = median_time(call(impl, *args, causal), repeats=repeats, budget_s=30.0)
                row = dict(N=N, causal=causal, impl=impl, ms=t["median_s"] * 1e3, min_ms=t["min_s"] * 1e3,
                           cpu_ms=t["cpu_median_s"] * 1e3, runs=len(t["runs_s"]),
                           gflops=flops(N, causal) / t["median_s"] / 1e9, load_average=load_average())
                rows.append(row)
                print(f"  N={N:5d} causal={causal!s:5} {impl:15s} {row['ms']:10.1f} ms {row['gflops']:7.1f} GFLOP/s"
                      f"  (min {row['min_ms']:.1f} ms, load {row['load_average'][:1]})", flush=True)
    by = {(r["N"], r["causal"], r["impl"]): r for r in rows}
    for r in rows:
        for peer, key in (("torch-sdpa", "time_vs_torch"), ("numpy-standard", "speedup_vs_numpy_standard")):
            p = by.get((r["N"], r["causal"], peer))
            if p:
                r[key] = r["ms"] / p["ms"] if key == "time_vs_torch" else p["ms"] / r["ms"]
                # the same from the fastest run of each: on a loaded machine the least disturbed
                r[key + "_min"] = r["min_ms"] / p["min_ms"] if key == "time_vs_torch" else p["min_ms"] / r["min_ms"]
    return rows


def memory_child(impl, N, threads):
    """Peak extra bytes of one backward (beyond its inputs and the three gradients), one JSON line."""
    import gc
    import tracemalloc

    from benchmarks._common import peak_rss_reset, rss_bytes

    _set_threads(threads)
    call(impl, *problem_arrays(256, False), False)()  # compile or load the cache outside the measurement
    args = problem_arrays(N, False)
    grad_bytes = 3 * args[1].nbytes
    fn = call(impl, *args, False)
    gc.collect()
    tracemalloc.start()
    rss0 = rss_bytes()
    reset = peak_rss_reset()
    grads = fn()
    traced = tracemalloc.get_traced_memory()[1]
    hwm = rss_bytes("VmHWM")
    tracemalloc.stop()
    del grads
    print(json.dumps(dict(impl=impl, N=N, grad_bytes=grad_bytes, extra_bytes_tracemalloc=traced - grad_bytes,
                          extra_bytes_rss=hwm - rss0 - grad_bytes if reset else None)))


def memory_rows(cases, threads):
    from benchmarks.cpu_forward import _child

    rows = []
    for impl, N in cases:
        r = _child(["--memory-child", impl, str(N), "--threads", str(threads)], module="benchmarks.cpu_backward")
        r.setdefault("impl", impl)
        r.setdefault("N", N)
        # analytic: numpy-standard holds S/P, dP and dS (Nq x Nk per head, fp32) at once; numba (rung 4) is
        # O(N): one private dQ copy per thread, their row sums for the lse check, D and lse', and the packed
        # panels of Q, dO, K and V (d = 64: their rows are read in place)
        r["extra_bytes_analytic"] = (3 * B * H * N * N * 4) if impl == "numpy-standard" else \
            (threads * B * H * N * D * 4 + threads * B * H * N * 4 + 2 * B * H * N * 4 + 4 * B * H * N * D * 4)
        rows.append(r)
        print(f"  memory N={N} {impl:15s} {r}", flush=True)
    return rows


def show(path):
    with open(path) as f:
        res = json.load(f)
    m = res["machine"]
    print(f"{m['cpu']} ({m.get('llvm_cpu')}, {m['cores']} cores); {res['date']}; commit {str(res.get('commit', '?'))[:10]}")
    print(f"sgemm on all cores: {res['sgemm']['gflops']:.1f} GFLOP/s; load average at start {res.get('load_average_at_start')}")
    print("median of the runs; (min): the same from each one's fastest run")
    print(f"{'N':>6} {'causal':>6} {'impl':<15} {'ms':>10} {'min ms':>9} {'GFLOP/s':>8} {'t/torch':>8} {'(min)':>6} "
          f"{'x numpy-std':>12} {'(min)':>6}")

    def col(r, key, width):
        return f"{r[key]:{width}.2f}" if key in r else " " * width

    for r in res["results"]:
        print(f"{r['N']:>6} {str(r['causal']):>6} {r['impl']:<15} {r['ms']:10.1f} {r['min_ms']:9.1f} {r['gflops']:8.1f} "
              f"{col(r, 'time_vs_torch', 8)} {col(r, 'time_vs_torch_min', 6)} {col(r, 'speedup_vs_numpy_standard', 12)} "
              f"{col(r, 'speedup_vs_numpy_standard_min', 6)}")
    for r in res.get("memory", []):
        print(f"memory N={r['N']:6d} {r['impl']:15s} extra RSS {(r.get('extra_bytes_rss') or 0) / 2**20:10.1f} MiB, "
              f"tracemalloc {(r.get('extra_bytes_tracemalloc') or 0) / 2**20:10.1f} MiB, analytic "
              f"{r['extra_bytes_analytic'] / 2**20:10.1f} MiB" + (f"  ERROR {r['error']}" if "error" in r else ""))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N in {512, 1024}, memory at N = 4096 only")
    ap.add_argument("--out", help="results file (default benchmarks/results/cpu-backward-<machine>.json)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ns", help="comma-separated N to time")
    ap.add_argument("--impls", help=f"comma-separated, from {', '.join(IMPLS)}")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    ap.add_argument("--memory-child", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]), args.threads)
    if args.table:
        return show(args.table)
    _reexec_without_openblas_overrides(argv, module="benchmarks.cpu_backward")

    from benchmarks import _common
    from flashkit.measure.provenance import machine_slug

    _set_threads(args.threads)
    env = environment(args.threads)
    impls = args.impls.split(",") if args.impls else list(IMPLS)
    print("correctness (fp32 against the float64 reference):", flush=True)
    checks = check_all(impls)
    sgemm = sgemm_rate()
    print(f"sgemm: {sgemm['gflops']:.1f} GFLOP/s", flush=True)
    Ns = tuple(int(n) for n in args.ns.split(",")) if args.ns else NS_QUICK if args.quick else NS
    rows = run_grid(Ns, impls, repeats=3 if args.quick else 5)
    for r in rows:
        r["pct_sgemm"] = 100.0 * r["gflops"] / sgemm["gflops"]
    cases = [("numpy-standard", 4096), ("numba", 4096)] + ([] if args.quick else [("numba", 16384)])
    mem = [] if args.no_memory else memory_rows(cases, args.threads)
    result = dict(env, benchmark="benchmarks/cpu_backward.py", shape=dict(B=B, H=H, d=D, dtype="float32"),
                  flops_formula="2.5*4*B*H*N*N*d*visible_fraction", sgemm=sgemm, checks=checks, results=rows,
                  memory=mem, quick=args.quick)
    path = args.out or _common.RESULTS / f"cpu-backward-{machine_slug(env['machine'])}.json"
    _common.write_json_atomic(path, result)
    show(path)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
