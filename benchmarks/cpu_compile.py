"""The first flashkit.attention call in a new process: what it compiles, cold (empty Numba cache) and warm.

    python -m benchmarks.cpu_compile                       # this checkout, 3 rounds
    python -m benchmarks.cpu_compile --compare /work/main  # and another checkout, interleaved
    python -m benchmarks.cpu_compile --table benchmarks/results/cpu-compile-<machine>.json

Each round, for each checkout and each mode: a fresh process with NUMBA_CACHE_DIR an empty directory
("cold": a new machine) runs the first call, then a second fresh process on the same cache directory
("warm": a cache hit) does the same. Modes: "background" (the default of "auto": the first calls are
served by NumPy while the Numba rung compiles in a background thread, flashkit.precompile) and "sync"
(FLASHKIT_BACKGROUND_COMPILE=0: the first call waits for the compile, as before; the compile's own
cost). The call is flashkit.attention(q, k, v) with the default backend ("auto", which picks numba
here) on fp32 (1, 8, 1024, 64); the child reports: import flashkit, the first call, the time from the
first call's start until the rung is ready (background: flashkit.warmup() waited for), the next call,
and every Numba dispatcher compile (or cache load) over 50 ms that the process triggered, by function
(the compilations nested inside a kernel's are counted in it too). Rounds are interleaved so that load
from other work hits every checkout alike; the minimum of the rounds is kept with the load average.
Goal: the first call < 2 s cold (empty Numba cache), < 0.5 s from the cache.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = (1, 8, 1024, 64)
MODES = ("background", "sync")


def child():
    """One process: the timings of the first call, of the rung being ready, of the next call, and what
    compiled, as one JSON line."""
    t0 = time.perf_counter()
    import numpy as np

    import flashkit
    from numba.core import dispatcher

    t_import = time.perf_counter() - t0
    where = os.path.dirname(os.path.dirname(flashkit.__file__))
    compiles = []
    original = dispatcher.Dispatcher.compile

    def timed(self, sig):
        s = time.perf_counter()
        try:
            return original(self, sig)
        finally:
            compiles.append((self.py_func.__qualname__, time.perf_counter() - s))

    dispatcher.Dispatcher.compile = timed
    q, k, v = (np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32) for _ in range(3))
    t0 = time.perf_counter()
    flashkit.attention(q, k, v)
    first = time.perf_counter() - t0
    state = {r["name"]: r.get("compiled", "") for r in flashkit.backends()}.get("numba", "")
    warmup = getattr(flashkit, "warmup", None)  # a checkout without background compiles has none
    if warmup is not None:
        warmup(directions="forward")
    ready = time.perf_counter() - t0
    t1 = time.perf_counter()
    flashkit.attention(q, k, v)
    second = time.perf_counter() - t1
    by_function = {}
    for name, s in compiles:
        if "<locals>" not in name:  # Numba's own overloads: inside the kernels' times
            by_function[name] = by_function.get(name, 0.0) + s
    print(json.dumps(dict(flashkit_from=where, import_s=t_import, first_call_s=first, numba_after_first_call=state,
                          ready_s=ready, second_call_s=second,
                          compiles_s={k: v for k, v in sorted(by_function.items(), key=lambda x: -x[1]) if v > 0.05})))


def run_child(checkout: Path, cache: str, mode: str) -> dict:
    # This file run as a script from a neutral directory: sys.path then holds benchmarks/ and the checkout
    # (PYTHONPATH), so `import flashkit` is the checkout's, not this one's
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(checkout),
               FLASHKIT_BACKGROUND_COMPILE="1" if mode == "background" else "0")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"], env=env, capture_output=True,
                          text=True, timeout=1800, cwd=cache)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]}
    return json.loads(lines[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare", action="append", default=[], metavar="CHECKOUT",
                    help="another checkout to measure beside this one (its root directory)")
    ap.add_argument("--out", help="results file (default benchmarks/results/cpu-compile-<machine>.json)")
    ap.add_argument("--table", metavar="JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child()
        return 0
    if args.table:
        return show(args.table)
    from benchmarks._common import RESULTS, write_json_atomic
    from flashkit.measure import provenance

    here = Path(__file__).resolve().parents[1]
    checkouts = [here] + [Path(c).resolve() for c in args.compare]
    runs = {f"{c} {m}": [] for c in checkouts for m in MODES}
    for r in range(args.rounds):
        for c in checkouts:
            for m in MODES:
                with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
                    load = provenance.load_average()
                    cold = run_child(c, cache, m)
                    warm = run_child(c, cache, m)
                runs[f"{c} {m}"].append(dict(round=r, load_average=load, cold=cold, warm=warm))
                print(f"round {r} {c} {m}: load {load[:1] if load else None}, cold first call "
                      f"{cold.get('first_call_s', float('nan')):.2f} s (ready {cold.get('ready_s', float('nan')):.2f} s), "
                      f"warm {warm.get('first_call_s', float('nan')):.2f} s (ready {warm.get('ready_s', float('nan')):.2f} s)"
                      f" {cold.get('error', '')}{warm.get('error', '')}", flush=True)
    summary = {}
    for c, rows in runs.items():
        ok = [x for x in rows if "error" not in x["cold"] and "error" not in x["warm"]]
        if ok:
            summary[c] = dict(cold_first_call_min_s=min(x["cold"]["first_call_s"] for x in ok),
                              warm_first_call_min_s=min(x["warm"]["first_call_s"] for x in ok),
                              cold_ready_min_s=min(x["cold"]["ready_s"] for x in ok),
                              warm_ready_min_s=min(x["warm"]["ready_s"] for x in ok),
                              import_min_s=min(x["warm"]["import_s"] for x in ok),
                              steady_call_min_s=min(x["warm"]["second_call_s"] for x in ok),
                              cold_compiles_s=min(ok, key=lambda x: x["cold"]["ready_s"])["cold"]["compiles_s"],
                              warm_compiles_s=min(ok, key=lambda x: x["warm"]["ready_s"])["warm"]["compiles_s"])
    env = dict(machine=provenance.cpu_info(), versions=provenance.versions("numpy", "numba", "llvmlite", "scipy"),
               date=provenance.now_utc(), **provenance.commit())
    result = dict(env, benchmark="benchmarks/cpu_compile.py", shape=SHAPE, dtype="float32", rounds=args.rounds,
                  goal="first call < 2 s cold, < 0.5 s warm", checkouts=[str(c) for c in checkouts],
                  runs=runs, summary=summary, load_average_at_end=provenance.load_average())
    out = args.out or RESULTS / f"cpu-compile-{provenance.machine_slug(env['machine'])}.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return show(out)


def show(path):
    with open(path) as f:
        res = json.load(f)
    print(f"{res['machine']['cpu']}; {res['date']}; commit {str(res.get('commit', '?'))[:10]}; fp32 {res['shape']}, "
          f"min of {res['rounds']} rounds")
    for c, s in res["summary"].items():
        loads = [x["load_average"][0] for x in res["runs"][c] if x.get("load_average")]
        ready = (f" (rung ready after {s['cold_ready_min_s']:.2f} s cold, {s['warm_ready_min_s']:.2f} s warm)"
                 if "cold_ready_min_s" in s else "")
        print(f"{c}: first call cold {s['cold_first_call_min_s']:.2f} s, warm {s['warm_first_call_min_s']:.2f} s{ready}, "
              f"import {s['import_min_s']:.2f} s, steady call {s['steady_call_min_s'] * 1e3:.1f} ms "
              f"(load {min(loads, default=float('nan')):.1f}-{max(loads, default=float('nan')):.1f})")
        for which in ("cold", "warm"):
            for name, t in s.get(f"{which}_compiles_s", {}).items():
                print(f"    {which}: {name:32s} {t:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
