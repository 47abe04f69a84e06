"""CPU forward attention, side by side: NumPy standard, NumPy tiled, every Numba rung, torch SDPA.

    make bench                                  # = env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.cpu_forward
    python -m benchmarks.cpu_forward --quick    # N in {512, 1024}; no N = 16384 memory, no N = 65536 run
    python -m benchmarks.cpu_forward --out results.json
    python -m benchmarks.cpu_forward --isa avx2 # on an AVX-512 machine: AVX2 code for every side

fp32, B = 1, H = 8, d = 64, N in {512, 1024, 2048, 4096, 8192}, causal and not, all cores. Every
implementation is first checked against the float64 reference at N = 512, then timed through the
public API (flashkit.attention, validation included) after a warm-up: the median of up to 5 runs.

    FLOPs = 4 * B * H * N * N * d * visible fraction          (1 without a mask, (N + 1) / 2N causal)

counting the two matrix products (2 FLOPs a multiply-add); the softmax's exp and max are not counted.
The 2-thread sgemm rate (NumPy, 4096^2 fp32) is measured in the same run as the ceiling to compare with.
numpy-tiled runs only up to N = 1024: it loops over tiles in Python (seconds per call beyond that).
Peak extra memory (beyond inputs and outputs) is measured in a fresh process per case: tracemalloc for
NumPy-owned buffers and the peak RSS for everything (Numba's own allocator is invisible to tracemalloc).
The first-call compile time of each Numba rung is measured in a fresh process with an empty cache,
then again in a second process that loads the cache.

The machines here set OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which slow OpenBLAS 30-50%: if they are
set, this script re-executes itself once without them (they stay set for tests and CI), and records
the BLAS kernel threadpoolctl reports. Results go to benchmarks/results/cpu-<machine>.json.

--isa avx2 measures an AVX2 machine on an AVX-512 one, every side limited alike (AVX2_ENV): Numba
compiles for Haswell's features, torch's kernels, oneDNN and MKL stop at AVX2, and OpenBLAS (the sgemm
ceiling, numpy-standard, rung 3) runs its Haswell kernels; results go to cpu-<machine>-avx2.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from flashkit.cpu import RUNGS as CPU_RUNGS
from flashkit.sysinfo import AVX2_ENV

OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
B, H, D = 1, 8, 64
NS = (512, 1024, 2048, 4096, 8192)
NS_QUICK = (512, 1024)
TILED_MAX_N = 1024  # numpy-tiled loops over tiles in Python: seconds per call beyond this
RUNGS = tuple(r.name for r in CPU_RUNGS)  # ladder order; "numba" runs the fastest of them
FASTEST = CPU_RUNGS[-1].name


def _reexec_for_avx2(argv, module="benchmarks.cpu_forward") -> None:
    """Re-run this script once with AVX2_ENV set (and OPENBLAS_L2_SIZE removed)."""
    if os.environ.get("FLASHKIT_BENCH_ISA") == "avx2":
        return
    from benchmarks._common import ROOT

    found = {k: os.environ[k] for k in OPENBLAS_VARS if k in os.environ}
    env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_VARS}
    env.update(AVX2_ENV, FLASHKIT_BENCH_ISA="avx2", FLASHKIT_BENCH_REEXEC="1", FLASHKIT_BENCH_UNSET=json.dumps(found))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    print(f"re-executing with AVX2 code everywhere: {AVX2_ENV}", flush=True)
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def _reexec_without_openblas_overrides(argv, module="benchmarks.cpu_forward") -> None:
    """Re-run this script (`module`) once with the OpenBLAS overrides removed from its own environment."""
    found = {k: os.environ[k] for k in OPENBLAS_VARS if k in os.environ}
    if not found or os.environ.get("FLASHKIT_BENCH_REEXEC") == "1":
        return
    from benchmarks._common import ROOT

    env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_VARS}
    env.update(FLASHKIT_BENCH_REEXEC="1", FLASHKIT_BENCH_UNSET=json.dumps(found))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    print(f"re-executing without {', '.join(found)} (set here: {found})", flush=True)
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


# ---------------------------------------------------------------------------------------------
# What is timed
# ---------------------------------------------------------------------------------------------
def inputs(N, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, H, N, D), dtype=np.float32) for _ in range(3))  # (B, H, N, d) each


def call(impl, q, k, v, causal):
    """A function of no arguments that runs `impl` once on (q, k, v)."""
    if impl == "torch-sdpa":
        import torch
        import torch.nn.functional as F

        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))  # zero-copy views of the same arrays
        # torch's is_causal is top-left aligned; with Nq == Nk it is the same mask as flashkit's.
        return lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    import flashkit

    return lambda: flashkit.attention(q, k, v, causal=causal, backend=impl)


def flops(N, causal):
    """Forward FLOPs of the sweep's problem at N (flashkit.problem.flops)."""
    from flashkit.problem import flops as attention_flops

    return attention_flops(B, H, N, N, D, (-1, 0) if causal else (-1, -1))


def check_all(impls):
    """Every implementation against the float64 reference at N = 512 (B=1, H=8, d=64), causal and not."""
    import numpy as np

    from flashkit import validate
    from flashkit.reference import reference

    q, k, v = inputs(512, seed=1)
    out = []
    for causal in (False, True):
        ref = reference(validate.check(q, k, v, causal=causal))[0]
        for impl in impls:
            o = np.asarray(call(impl, q, k, v, causal)(), dtype=np.float64)
            err = float(np.linalg.norm(o - ref) / np.linalg.norm(ref))
            out.append(dict(impl=impl, causal=causal, rel_err=err, ok=err <= 1e-5))
            print(f"  check N=512 causal={causal!s:5} {impl:15s} rel err {err:.2e} {'ok' if err <= 1e-5 else 'FAIL'}",
                  flush=True)
    return out


def sgemm_rate(n=4096):
    import numpy as np

    from flashkit.measure.timing import median_time

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    t = median_time(lambda: a @ a, repeats=5)
    return dict(n=n, gflops=2.0 * n**3 / t["median_s"] / 1e9, median_s=t["median_s"], min_s=t["min_s"],
                cpu_median_s=t["cpu_median_s"])


def run_grid(Ns, impls, repeats):
    from flashkit.measure.provenance import load_average
    from flashkit.measure.timing import median_time

    rows = []
    for N in Ns:
        q, k, v = inputs(N)
        for causal in (False, True):
            for impl in impls:
                if impl == "numpy-tiled" and N > TILED_MAX_N:
                    continue
                t = median_time(call(impl, q, k, v, causal), repeats=repeats, budget_s=20.0)
                row = dict(N=N, causal=causal, impl=impl, ms=t["median_s"] * 1e3, min_ms=t["min_s"] * 1e3,
                           cpu_ms=t["cpu_median_s"] * 1e3, runs=len(t["runs_s"]),
                           gflops=flops(N, causal) / t["median_s"] / 1e9, load_average=load_average())
                rows.append(row)
                print(f"  N={N:5d} causal={causal!s:5} {impl:15s} {row['ms']:10.1f} ms {row['gflops']:7.1f} GFLOP/s"
                      f"  (cpu {row['cpu_ms']:.1f} ms, load {row['load_average'][:1]})", flush=True)
    return rows


def add_ratios(rows, sgemm_gflops):
    """numba/torch and numpy-standard/numba time ratios, and each row's share of the sgemm rate."""
    by = {(r["N"], r["causal"], r["impl"]): r for r in rows}
    for r in rows:
        r["pct_sgemm"] = 100.0 * r["gflops"] / sgemm_gflops
        torch_row = by.get((r["N"], r["causal"], "torch-sdpa"))
        std_row = by.get((r["N"], r["causal"], "numpy-standard"))
        if torch_row:
            r["time_vs_torch"] = r["ms"] / torch_row["ms"]
        if std_row:
            r["speedup_vs_numpy_standard"] = std_row["ms"] / r["ms"]


def print_table(rows, sgemm):
    """ms and GFLOP/s are wall-clock medians; "GF/cpu-s" divides the FLOPs by the CPU time the process
    used (all its threads): on a machine shared with other work it shows the per-core efficiency that
    wall-clock numbers hide (on an idle machine, GFLOP/s ~ GF/cpu-s x threads)."""
    print(f"\nfp32, B={B}, H={H}, d={D}; sgemm {sgemm['n']}^2 on all cores: {sgemm['gflops']:.1f} GFLOP/s"
          + (f" (GF/cpu-s {2.0 * sgemm['n'] ** 3 / sgemm['cpu_median_s'] / 1e9:.1f})" if sgemm.get("cpu_median_s") else ""))
    print(f"{'N':>6} {'causal':>6} {'impl':<15} {'ms':>10} {'GFLOP/s':>8} {'%sgemm':>7} {'t/torch':>8} "
          f"{'x numpy-std':>12} {'GF/cpu-s':>9}")
    for r in rows:
        vt = f"{r['time_vs_torch']:8.2f}" if "time_vs_torch" in r else " " * 8
        vs = f"{r['speedup_vs_numpy_standard']:12.2f}" if "speedup_vs_numpy_standard" in r else " " * 12
        gc = f"{flops(r['N'], r['causal']) / (r['cpu_ms'] / 1e3) / 1e9:9.1f}" if r.get("cpu_ms") else " " * 9
        print(f"{r['N']:>6} {str(r['causal']):>6} {r['impl']:<15} {r['ms']:10.1f} {r['gflops']:8.1f} "
              f"{r['pct_sgemm']:7.1f} {vt} {vs} {gc}")


# ---------------------------------------------------------------------------------------------
# Memory and compile time, each in a fresh process
# ---------------------------------------------------------------------------------------------
def _child(args_list, env=None, timeout=900, module="benchmarks.cpu_forward"):
    import subprocess

    from benchmarks._common import ROOT

    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-m", module, *args_list], env=full_env,
                          capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]}
    return json.loads(lines[-1])


def memory_child(impl, N, threads):
    """Peak extra bytes of one call (beyond inputs and outputs), printed as one JSON line."""
    import gc
    import tracemalloc

    import numpy as np

    from benchmarks._common import peak_rss_reset, rss_bytes

    _set_threads(threads)
    q, k, v = inputs(256)
    call(impl, q, k, v, False)()  # compile or load the cache, import everything, outside the measurement
    q, k, v = inputs(N)
    out_bytes = q.nbytes + B * H * N * np.dtype(np.float32).itemsize  # O and lse
    gc.collect()
    tracemalloc.start()
    rss0 = rss_bytes()
    reset = peak_rss_reset()
    o = call(impl, q, k, v, False)()
    traced_peak = tracemalloc.get_traced_memory()[1]
    hwm = rss_bytes("VmHWM")
    tracemalloc.stop()
    del o
    print(json.dumps(dict(impl=impl, N=N, causal=False, output_bytes=out_bytes,
                          extra_bytes_tracemalloc=traced_peak - out_bytes,
                          extra_bytes_rss=hwm - rss0 - out_bytes if reset else None,
                          rss_peak_reset=reset)))


def numba_buffer_bytes(N, threads):
    """Analytic: what "numba" (rung 4) allocates beyond inputs and outputs: the packed K and V panels
    (one copy of K and V, padded to whole panels), the buffers of each worker (one worker a thread,
    reused by all its tasks) and the tile map."""
    from flashkit import validate
    from flashkit.cpu import rung4_fused
    from flashkit.cpu.vec import VECTOR_BYTES

    import numpy as np

    W = VECTOR_BYTES // 4
    q = np.zeros((B, H, 1, D), np.float32)  # only its shape matters below, and N through Nq, Nk
    q = np.broadcast_to(q, (B, H, N, D))
    Br, Bc, BcP, Dp = rung4_fused.blocks(validate.check(q, q, q), 4, W)
    BrP = -(-Br // rung4_fused.MR) * rung4_fused.MR
    packed = B * H * (-(-N // Bc)) * BcP * (D + Dp) * 4
    per_task = (BrP * D + BrP * Dp + BrP + BrP * W + rung4_fused.MR * BcP + 2 * W * rung4_fused.MR) * 4
    return packed + threads * per_task + (-(-N // Br)) * (-(-N // Bc))


def memory_rows(Ns, threads):
    rows = []
    for N in Ns:
        for impl in ("numpy-standard", "numba"):
            r = _child(["--memory-child", impl, str(N), "--threads", str(threads)])
            r.setdefault("impl", impl)
            r.setdefault("N", N)
            if impl == "numba":
                r["extra_bytes_analytic"] = numba_buffer_bytes(N, threads)
            else:
                r["extra_bytes_analytic"] = B * H * N * N * 4  # S (then P, in place), fp32
            rows.append(r)
            print(f"  memory N={N} {impl:15s} {r}", flush=True)
    for N in Ns:
        std = next((r for r in rows if r["N"] == N and r["impl"] == "numpy-standard"), {})
        nb = next((r for r in rows if r["N"] == N and r["impl"] == "numba"), {})
        s_bytes = std.get("extra_bytes_rss") or std.get("extra_bytes_tracemalloc")
        n_bytes = nb.get("extra_bytes_rss")
        if s_bytes and n_bytes is not None:
            nb["pct_of_numpy_standard"] = 100.0 * max(n_bytes, 0) / s_bytes
    return rows


def compile_child(backend):
    """Seconds of the first call (compile or cache load + run) and of the second call, as JSON."""
    import time

    import numpy as np

    import flashkit

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 100, 64), dtype=np.float32) for _ in range(3))
    t0 = time.perf_counter()
    flashkit.attention(q, k, v, causal=True, backend=backend)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    flashkit.attention(q, k, v, causal=True, backend=backend)
    second = time.perf_counter() - t0
    print(json.dumps(dict(backend=backend, first_call_s=first, second_call_s=second)))


def compile_rows():
    import tempfile

    rows = []
    for backend in RUNGS:
        with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
            env = {"NUMBA_CACHE_DIR": cache}
            cold = _child(["--compile-child", backend], env=env)
            warm = _child(["--compile-child", backend], env=env)
        row = dict(backend=backend, dtype="float32",
                   first_process_first_call_s=cold.get("first_call_s"),
                   second_process_first_call_s=warm.get("first_call_s"),
                   steady_call_s=warm.get("second_call_s"), errors=[x["error"] for x in (cold, warm) if "error" in x])
        rows.append(row)
        print(f"  compile {backend:15s} {row}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
def _set_threads(threads):
    import numba
    import torch

    numba.set_num_threads(threads)
    torch.set_num_threads(threads)


def environment(threads):
    from flashkit.measure import provenance

    env = dict(machine=provenance.cpu_info(), load_average_at_start=provenance.load_average(),
               versions=provenance.versions("numpy", "numba", "llvmlite", "scipy", "threadpoolctl", "torch"),
               blas=provenance.blas_info(), threads=threads, date=provenance.now_utc(),
               openblas_env_unset=json.loads(os.environ.get("FLASHKIT_BENCH_UNSET", "{}")),
               openblas_env_now={k: os.environ.get(k) for k in OPENBLAS_VARS},
               isa=os.environ.get("FLASHKIT_BENCH_ISA", "native"),
               isa_env={k: os.environ[k] for k in AVX2_ENV if k in os.environ})
    env.update(provenance.commit())
    return env


def show(path):
    """Print the tables of a results file: timings, memory, long runs, compile times."""
    with open(path) as f:
        res = json.load(f)
    m = res["machine"]
    print(f"{m['cpu']} ({m.get('llvm_cpu')}, {m['cores']} cores, {', '.join(m.get('llvm_features', []))}); "
          f"{res['date']}; commit {res.get('commit', '?')[:10]}; BLAS "
          + ", ".join(f"{b['file']} {b['architecture']}" for b in res["blas"] if b.get("internal_api") == "openblas"))
    print(f"load average at start {res.get('load_average_at_start')}; code for {res.get('isa', 'native')}"
          + (f" ({res['isa_env']})" if res.get("isa_env") else ""))
    print_table(res["results"], res["sgemm"])
    for r in res.get("memory", []):
        print(f"memory N={r['N']:6d} {r['impl']:15s} extra RSS {r.get('extra_bytes_rss', 0) / 2**20:10.1f} MiB, "
              f"tracemalloc {r.get('extra_bytes_tracemalloc', 0) / 2**20:10.1f} MiB, analytic "
              f"{r.get('extra_bytes_analytic', 0) / 2**20:10.1f} MiB"
              + (f", {r['pct_of_numpy_standard']:.3f}% of numpy-standard" if "pct_of_numpy_standard" in r else "")
              + (f"  ERROR {r['error']}" if "error" in r else ""))
    for r in res.get("long_runs", []):
        print(f"N={r['N']} causal={r['causal']!s:5} {r['impl']}: {r['seconds']:.1f} s, {r['gflops']:.1f} GFLOP/s, "
              f"load {r.get('load_average', [None])[0]}")
    for r in res.get("compile", []):
        print(f"compile {r['backend']:15s} first process {r['first_process_first_call_s']:.2f} s, second process "
              f"{r['second_process_first_call_s']:.2f} s, steady call {r['steady_call_s'] * 1e3:.1f} ms")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N in {512, 1024}, memory at 4096 only, no N=65536 run")
    ap.add_argument("--out", help="results file (default benchmarks/results/cpu-<machine>.json)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for Numba, torch and BLAS")
    ap.add_argument("--keep-openblas-env", action="store_true", help="do not unset OPENBLAS_CORETYPE/L2_SIZE")
    ap.add_argument("--ns", help="comma-separated N to time (default 512,...,8192)")
    ap.add_argument("--impls", help="comma-separated implementations to time (default all)")
    ap.add_argument("--no-long", action="store_true", help="skip the single N=65536 runs")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: AVX2 code for Numba, torch and the BLAS on an AVX-512 machine (AVX2_ENV)")
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    ap.add_argument("--memory-child", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--compile-child", metavar="BACKEND", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]), args.threads)
    if args.compile_child:
        return compile_child(args.compile_child)
    if args.table:
        return show(args.table)
    if args.isa == "avx2":
        _reexec_for_avx2(argv)
    elif not args.keep_openblas_env:
        _reexec_without_openblas_overrides(argv)

    import time

    import flashkit
    from benchmarks import _common
    from flashkit.measure import provenance

    _set_threads(args.threads)
    env = environment(args.threads)
    print(json.dumps({k: env[k] for k in ("machine", "versions", "blas", "commit", "openblas_env_unset")}), flush=True)
    impls = args.impls.split(",") if args.impls else ["numpy-standard", "numpy-tiled", *RUNGS, "torch-sdpa"]
    compile_ = [] if args.no_compile else compile_rows()  # first: the cache dirs are fresh, nothing else runs
    print("correctness (fp32 against the float64 reference):", flush=True)
    checks = check_all(impls)
    print("sgemm:", flush=True)
    sgemm = sgemm_rate()
    sgemm["load_average"] = provenance.load_average()
    print(f"  {sgemm}", flush=True)
    Ns = tuple(int(n) for n in args.ns.split(",")) if args.ns else NS_QUICK if args.quick else NS
    rows = run_grid(Ns, impls, repeats=3 if args.quick else 5)
    add_ratios(rows, sgemm["gflops"])
    mem = [] if args.no_memory else memory_rows((4096,) if args.quick else (4096, 16384), args.threads)
    long_runs = []
    if not (args.quick or args.no_long):
        q, k, v = inputs(65536)
        for causal in (False, True):
            t0 = time.perf_counter()
            flashkit.attention(q, k, v, causal=causal, backend="numba")
            s = time.perf_counter() - t0
            long_runs.append(dict(impl="numba", N=65536, causal=causal, seconds=s, gflops=flops(65536, causal) / s / 1e9,
                                  load_average=provenance.load_average()))
            print(f"  N=65536 causal={causal!s:5} numba: {s:.1f} s ({long_runs[-1]['gflops']:.1f} GFLOP/s), single run",
                  flush=True)
        del q, k, v

    result = dict(env, benchmark="benchmarks/cpu_forward.py", shape=dict(B=B, H=H, d=D, dtype="float32"),
                  flops_formula="4*B*H*N*N*d*visible_fraction", fastest_numba_rung=FASTEST,
                  numpy_tiled_max_N=TILED_MAX_N, sgemm=sgemm, checks=checks, results=rows, memory=mem,
                  long_runs=long_runs, compile=compile_, quick=args.quick)
    suffix = "-avx2" if env["isa"] == "avx2" else ""
    path = args.out or _common.RESULTS / f"cpu-{provenance.machine_slug(env['machine'])}{suffix}.json"
    _common.write_json_atomic(path, result)
    show(path)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
