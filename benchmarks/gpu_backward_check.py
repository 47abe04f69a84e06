"""Check and measure the GPU backward rungs in one go (issue 10): anyone with a GPU runs

    python -m benchmarks.gpu_backward_check [--no-sanitizer] [--no-bench] [--no-pytest]

1. at the same time, each in its own process (none of them is timed): correctness
   (`python -m flashkit.gpu.check_backward`, every rung, dtype and awkward shape against a float64
   reference), compute-sanitizer --tool memcheck and --tool racecheck on
   `python -m flashkit.gpu.check_backward --sanitize` (one small launch per rung and dtype, CuPy's memory pool
   off), and pytest tests/test_gpu_backward.py;
2. then alone on the GPU, the benchmark `python -m benchmarks.gpu_backward` and the per-kernel timings
   `python -m benchmarks.gpu_backward_parts`, merged into benchmarks/results/gpu-bwd-<card>.json with the
   correctness rows and the sanitizer and pytest summaries.
Logs go to $OUT when it is set (the device tool's output folder), else to a temporary folder; the results
file is copied there too.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_check import ROOT, sanitizer_summary
from flashkit.atomic import write_json


def start(name, cmd, log, env):
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    f = open(log, "w")
    return dict(name=name, log=log, file=f, t0=time.time(),
                proc=subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))


def finish(job, timeout):
    try:
        rc = job["proc"].wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        job["proc"].kill()
        job["proc"].wait()
        rc = "timeout"
    job["file"].close()
    dt = time.time() - job["t0"]
    out = Path(job["log"]).read_text(errors="replace")
    print(f"   {job['name']}: rc={rc} in {dt:.0f} s, log {job['log']}", flush=True)
    return rc, out, dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-sanitizer", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-pytest", action="store_true")
    ap.add_argument("--deadline", type=float, default=540, help="seconds for everything (steps are cut to fit)")
    ap.add_argument("--bench-args", default="", help="extra arguments for benchmarks.gpu_backward")
    ap.add_argument("--bench-budget", type=float, default=200, help="seconds of the deadline kept for the benchmarks")
    args = ap.parse_args(argv)
    t_start = time.time()
    def left():
        return args.deadline - (time.time() - t_start)

    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="flashkit-gpu-bwd-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("CUPY_CACHE_DIR", tempfile.mkdtemp(prefix="cupy-cache-"))
    py = sys.executable
    summary = {}

    tmp = Path(tempfile.mkdtemp(prefix="flashkit-bwd-"))  # JSON merged into the results file; $OUT keeps logs
    check_json = tmp / "check_bwd.json"
    jobs = [start("correctness", [py, "-m", "flashkit.gpu.check_backward", "--json", str(check_json)],
                  out / "check_bwd.log", env)]
    if not args.no_sanitizer:
        san = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
        for tool in ("memcheck", "racecheck"):
            cmd = [san, "--tool", tool, py, "-m", "flashkit.gpu.check_backward", "--sanitize"]
            jobs.append(start(f"sanitizer_{tool}", cmd, out / f"sanitizer_{tool}.log", env))
    if not args.no_pytest:
        jobs.append(start("pytest", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                                     "tests/test_gpu_backward.py"], out / "pytest_bwd.log", env))
    bench_budget = 0 if args.no_bench else args.bench_budget
    for job in jobs:
        rc, log, dt = finish(job, left() - bench_budget)
        s = dict(rc=rc, seconds=round(dt, 1), **sanitizer_summary(log))
        if job["name"] == "pytest":
            tail = [l for l in log.strip().splitlines() if l.strip()][-1:]
            s["tail"] = tail
        summary[job["name"]] = s
        keep = [l for l in log.splitlines() if "FAIL" in l or "checks pass" in l or "Error" in l or "SUMMARY" in l
                or l.startswith("       ") or "passed" in l or "failed" in l]
        print("\n".join(keep)[-3000:], flush=True)

    if not args.no_bench:
        bench_json, parts_json = tmp / "bench_bwd.json", tmp / "parts_bwd.json"
        cmd = [py, "-m", "benchmarks.gpu_backward", "--json", str(bench_json)] + args.bench_args.split()
        job = start("benchmark", cmd, out / "bench_bwd.log", env)
        rc, log, dt = finish(job, left() - 40)
        summary["benchmark"] = dict(rc=rc, seconds=round(dt, 1))
        job = start("parts", [py, "-m", "benchmarks.gpu_backward_parts", "--json", str(parts_json)], out / "parts_bwd.log", env)
        rc_p, log_p, dt_p = finish(job, left() - 5)
        summary["parts"] = dict(rc=rc_p, seconds=round(dt_p, 1))
        print(log_p[-3000:], flush=True)
        if bench_json.exists():
            from benchmarks.gpu_backward import print_table
            from benchmarks.gpu_forward import card_slug

            result = json.loads(bench_json.read_text())
            result["checks"] = summary
            if parts_json.exists():
                result["parts"] = json.loads(parts_json.read_text())["parts"]
            if check_json.exists():
                c = json.loads(check_json.read_text())
                result["correctness"] = dict(passed=c["passed"], total=c["total"], rows=c["rows"],
                                             compile_seconds_first_launch=c["compile_seconds"])
            dest = ROOT / "benchmarks" / "results" / f"gpu-bwd-{card_slug(result['card'])}.json"
            write_json(dest, result)
            shutil.copy(dest, out / dest.name)
            print_table(result["results"])
            for r in result.get("memory", []):
                print(f"memory N={r['N']} {r['impl']:<22} " + (f"{r['extra_bytes'] / 2**20:10.1f} MiB" if "extra_bytes" in r else r["status"][:60]))
            print(f"wrote {dest}")
        else:
            print(log[-4000:])
    print("\nsummary:", json.dumps(summary), flush=True)
    ok = summary["correctness"]["rc"] == 0 and all(
        v.get("errors") in (0, None) and v.get("hazards") in (0, None) and v["rc"] == 0
        for k, v in summary.items() if k.startswith("sanitizer"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
