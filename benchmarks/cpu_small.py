"""Small CPU calls: what "auto" costs at N <= 1024, on an idle machine and with one core busy.

    python -m benchmarks.cpu_small            # all cases (about 2 minutes on 2 cores)
    python -m benchmarks.cpu_small --table benchmarks/results/cpu-small-<machine>.json

fp32, d = 64, B = 1, H in {1, 8}, N in {64, 128, 256, 512, 1024}, not causal. For each Numba threading
layer (omp, workqueue: a layer is fixed for a process at its first parallel call, so each runs in a
fresh process) and each load (idle; one core kept busy by a spinning process), it times

  numpy-standard       flashkit.attention(..., backend="numpy-standard")
  auto                 flashkit.attention(...): what a user gets (numpy-standard below
                       reference.BACKENDS' auto_max_flops, else numba, on one thread below
                       flashkit.cpu.threads.SERIAL_FLOPS)
  numba-1-thread       backend="numba" on one thread
  numba-all-threads    backend="numba" on every core, the serial rule switched off

each for at least 0.2 s after a warm-up, reporting the minimum, the median and the 90th percentile
(a busy machine shows in the median and the tail, not in the minimum). The two thresholds in the
code are read off these tables: the N where numba-1-thread beats numpy-standard, and the work where
numba-all-threads' median beats numba-1-thread's with one core busy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

NS = (64, 128, 256, 512, 1024)
HEADS = (1, 8)
D = 64
IMPLS = ("numpy-standard", "auto", "numba-1-thread", "numba-all-threads")


def quantiles(fn, budget_s=0.2, min_runs=15):
    fn()  # warm-up: compile or load the cache
    runs = []
    start = time.perf_counter()
    while len(runs) < min_runs or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
        if len(runs) > 2000:
            break
    runs.sort()
    return dict(min_ms=runs[0] * 1e3, median_ms=runs[len(runs) // 2] * 1e3,
                p90_ms=runs[int(0.9 * (len(runs) - 1))] * 1e3, runs=len(runs))


def child(layer, load):
    """One process: one threading layer, one load; prints one JSON line of rows."""
    import numba
    import numpy as np

    import flashkit
    from flashkit.cpu import threads

    if hasattr(flashkit, "warmup"):  # "auto" serves from NumPy until its rung is compiled: time it after
        flashkit.warmup(directions="forward")
    rows = []
    rng = np.random.default_rng(0)
    cores = numba.get_num_threads()
    for H in HEADS:
        for N in NS:
            q, k, v = (rng.standard_normal((1, H, N, D), dtype=np.float32) for _ in range(3))
            for impl in IMPLS:
                serial = threads.SERIAL_FLOPS
                if impl == "numba-all-threads":
                    threads.SERIAL_FLOPS = 0.0
                if impl == "numba-1-thread":
                    numba.set_num_threads(1)
                backend = {"numpy-standard": "numpy-standard", "auto": "auto"}.get(impl, "numba")
                try:
                    r = quantiles(lambda: flashkit.attention(q, k, v, backend=backend))
                finally:
                    threads.SERIAL_FLOPS = serial
                    numba.set_num_threads(cores)
                rows.append(dict(layer=numba.threading_layer(), load=load, H=H, N=N, impl=impl,
                                 flops=4.0 * H * N * N * D, **r))
    print(json.dumps(rows))


def spinner():
    """A process that keeps one core busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def show(path):
    with open(path) as f:
        res = json.load(f)
    print(f"{res['machine'].get('cpu')} ({res['machine'].get('cores')} cores); {res['date']}; commit {res['commit'][:10]}")
    rows = res["results"]
    for layer in sorted({r["layer"] for r in rows}):
        for load in ("idle", "one core busy"):
            sel = [r for r in rows if r["layer"] == layer and r["load"] == load]
            if not sel:
                continue
            print(f"\nlayer {layer}, {load}: median ms (min)")
            print(f"{'H':>3} {'N':>5} " + " ".join(f"{i:>22}" for i in IMPLS))
            for H in HEADS:
                for N in NS:
                    cells = {r["impl"]: r for r in sel if r["H"] == H and r["N"] == N}
                    print(f"{H:>3} {N:>5} " + " ".join(
                        f"{cells[i]['median_ms']:>12.3f} ({cells[i]['min_ms']:6.3f})" if i in cells else " " * 22
                        for i in IMPLS))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", metavar="JSON")
    ap.add_argument("--out")
    ap.add_argument("--child", nargs=2, metavar=("LAYER", "LOAD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.table:
        return show(args.table)
    if args.child:
        return child(*args.child)

    from flashkit.atomic import write_json
    from flashkit.measure import provenance

    rows = []
    for layer in ("omp", "workqueue"):
        for load in ("idle", "one core busy"):
            spin = spinner() if load != "idle" else None
            try:
                env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
                out = subprocess.run([sys.executable, "-m", "benchmarks.cpu_small", "--child", layer, load],
                                     env=env, capture_output=True, text=True, timeout=900)
            finally:
                if spin is not None:
                    spin.kill()
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[")]
            if out.returncode or not lines:
                print(f"{layer} {load}: failed: {out.stderr[-500:]}", flush=True)
                continue
            rows.extend(json.loads(lines[-1]))
            print(f"{layer} {load}: done", flush=True)
    c = provenance.commit()
    result = dict(benchmark="benchmarks/cpu_small.py", machine=provenance.cpu_info(), date=provenance.now_utc(),
                  commit=c["commit"], dirty=c["dirty"], load_average_at_end=provenance.load_average(),
                  versions=provenance.versions("numpy", "numba", "scipy"), results=rows)
    path = args.out or os.path.join(os.path.dirname(__file__), "results",
                                    f"cpu-small-{provenance.machine_slug(result['machine'])}.json")
    write_json(path, result)
    show(path)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
