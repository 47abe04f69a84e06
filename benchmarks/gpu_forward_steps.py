"""The forward work of one device call: check, sanitize, then time, each step in its own process with a limit.

    FLASHKIT_COMMIT=<sha> python -m benchmarks.gpu_forward_steps --out $OUT [--rungs 3,8] [--deadline 280]

1. at the same time (none of them timed): flashkit.gpu.check --rungs R (the awkward shapes, every allowed
   block, the public call with NaN in each input); compute-sanitizer memcheck and racecheck over
   `check --sanitize --rungs R` and over the NaN/Inf scan (flashkit.finite) on small arrays;
   pytest tests/test_gpu_finite.py tests/test_gpu_public.py tests/test_decode.py (-k: the GPU ones);
2. then alone on the GPU, one after another: benchmarks.gpu_overhead, benchmarks.gpu_forward (--Ns 4096, the
   rungs of --time-rungs, torch flash / cuDNN / efficient), its block sweep of rung 3 with its variants (a
   process of its own), and the GPU part of benchmarks.decode (cache 32768, batch 1 and 8, its splits sweep).
Writes into --out: steps.json (each step's exit status, seconds, the head and tail of its log), check.json,
overhead.json, forward.json, sweep.json and decode-*.json. A step is stopped when the deadline leaves it no time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCAN_UNDER_SANITIZER = """
import cupy
from flashkit import finite
cupy.cuda.set_allocator(None)  # every array its own cudaMalloc: memcheck sees any overrun
for dtype in ("float16", "float32", "float64"):
    for n in (1, 9, 4099, 100003, 2 ** 20 + 3):
        x = cupy.ones(n, dtype)
        assert finite.start(cupy, (x, x), (dtype, dtype)).wait() is None
        x[n - 1] = cupy.nan
        assert finite.start(cupy, (x,), (dtype,)).wait() == 0
print("scan under sanitizer: ok")
"""
# Compile now, beside the checks, what the timed steps will launch (NVRTC is slow cold; CuPy keeps the
# cubins on disk, so the timed processes find them there).
WARM = """
from benchmarks.gpu_forward import register_variants
from flashkit import finite
from flashkit.gpu import flash
register_variants()
for element in ("f16", "bf16"):
    for d in (64, 128):
        for blocks in ((128, 128), (192, 128)):
            flash.kernel(7, d, element, *blocks)
        flash.kernel(6, d, element, *flash.RUNGS[6].default_blocks[d])
for d in (64, 128):
    for rung in (3, 8, 31):
        for blocks in flash.RUNGS[rung].allowed(d):
            flash.kernel(rung, d, "f32", *blocks)
finite._module()
print("compiled")
"""
WARM_DECODE = """
from flashkit.gpu import decode
for prefetch in (True, False):
    for l2_hint in (True, False):
        for rows in (4,):
            decode._kernels("float16", 128, rows, prefetch, l2_hint)
print("compiled")
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rungs", default="3,8", help="forward rungs to check and sanitize ('' for none)")
    ap.add_argument("--pytest-k", default="finite or 16bit or nan or tf32 or wgmma or without_prefetch or splitk_matches",
                    help="which tests of tests/test_gpu_finite.py and tests/test_gpu_public.py to run")
    ap.add_argument("--quick-overhead", action="store_true", help="benchmarks.gpu_overhead at N = 4096 only")
    ap.add_argument("--time-rungs", default="3,7,8", help="forward rungs benchmarks.gpu_forward times")
    ap.add_argument("--deadline", type=float, default=270.0, help="seconds for all steps")
    ap.add_argument("--parallel", type=float, default=100.0, help="seconds for the untimed steps (1.)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    logs = Path("/tmp/gfwd_logs")
    logs.mkdir(exist_ok=True)
    san = ["compute-sanitizer", "--error-exitcode", "1"]
    parallel = []
    if args.rungs:
        parallel += [
            ("check", [py, "-m", "flashkit.gpu.check", "--rungs", args.rungs, "--json", str(out / "check.json")]),
            ("memcheck", san + ["--tool", "memcheck", py, "-m", "flashkit.gpu.check", "--sanitize", "--rungs", args.rungs]),
            ("racecheck", san + ["--tool", "racecheck", py, "-m", "flashkit.gpu.check", "--sanitize", "--rungs", args.rungs]),
        ]
    parallel += [
        ("memcheck-scan", san + ["--tool", "memcheck", py, "-c", SCAN_UNDER_SANITIZER]),
        ("racecheck-scan", san + ["--tool", "racecheck", py, "-c", SCAN_UNDER_SANITIZER]),
        ("pytest", [py, "-m", "pytest", "-x", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                    "tests/test_gpu_finite.py", "tests/test_gpu_public.py", "tests/test_decode.py", "-k", args.pytest_k]),
        ("warm", [py, "-c", WARM]),
        ("warm-decode", [py, "-c", WARM_DECODE]),
    ]
    sequential = [
        ("overhead", [py, "-m", "benchmarks.gpu_overhead", "--json", str(out / "overhead.json")]
         + (["--quick"] if args.quick_overhead else []), 60),
        ("forward", [py, "-m", "benchmarks.gpu_forward", "--Ns", "4096", "--rungs", args.time_rungs,
                     "--peers", "flash,cudnn,efficient", "--no-memory", "--no-sweep", "--json", str(out / "forward.json")], 60),
        ("sweep", [py, "-m", "benchmarks.gpu_forward", "--rungs", "3", "--only-sweep", "--no-memory",
                   "--json", str(out / "sweep.json")], 30),
        ("decode", [py, "-m", "benchmarks.decode", "--device", "gpu", "--lengths", "32768", "--batches", "1,8",
                    "--model-length", "0", "--out", str(out)], 40),
    ]
    steps = []

    def record(name, proc, log, started):
        try:
            rc = proc.wait(timeout=max(1.0, args.parallel - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        text = log.read_text(errors="replace")
        steps.append(dict(step=name, rc=rc, seconds=round(time.time() - started, 1), tail=text[-4000:]))
        print(f"[{time.time() - t0:6.1f} s] {name}: rc={rc}", flush=True)

    running = []
    for name, cmd in parallel:
        log = logs / f"{name}.log"
        running.append((name, subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env), log,
                        time.time()))
    for name, proc, log, started in running:
        record(name, proc, log, started)
    for name, cmd, limit in sequential:
        left = args.deadline - (time.time() - t0)
        if left < 10:
            steps.append(dict(step=name, rc="skipped: no time left", seconds=0, tail=""))
            continue
        log = logs / f"{name}.log"
        started = time.time()
        proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=min(limit, left))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        text = log.read_text(errors="replace")
        steps.append(dict(step=name, rc=rc, seconds=round(time.time() - started, 1), head=text[:3000], tail=text[-6000:]))
        print(f"[{time.time() - t0:6.1f} s] {name}: rc={rc}", flush=True)
    (out / "steps.json").write_text(json.dumps(dict(commit=os.environ.get("FLASHKIT_COMMIT"), steps=steps), indent=1))
    for s in steps:
        print(f"--- {s['step']} rc={s['rc']} {s['seconds']} s\n{s['tail'][-1500:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
