"""Check and measure the whole GPU ladder in one go: anyone with a GPU runs

    python -m benchmarks.gpu_check [--quick] [--no-sanitizer] [--no-bench] [--pytest]

1. correctness: `python -m flashkit.gpu.check` (every rung, dtype and awkward shape vs a float64 oracle),
   in a fresh CuPy kernel cache, so the NVRTC compile times it records are real first-launch times;
2. compute-sanitizer --tool memcheck and --tool racecheck on `python -m flashkit.gpu.check --sanitize`
   (one small launch per rung and dtype, CuPy's memory pool off);
3. the benchmark `python -m benchmarks.gpu_forward`, which writes benchmarks/results/gpu-<card>.json,
   then gets the correctness and sanitizer summaries added, and a short table printed;
4. optionally (--pytest) the pytest tests tests/test_gpu*.py.
Each step runs in its own process, so a crash in one (an illegal address, say) cannot hide the others.
Logs go to $OUT when it is set (the device tool's output folder), else to a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flashkit.atomic import write_json

ROOT = Path(__file__).resolve().parent.parent


def step(name, cmd, log, env, timeout):
    """Run one step in its own process, its output streamed to `log` (kept even if the step is killed)."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    out = log.read_text(errors="replace")
    dt = time.time() - t0
    print(f"   rc={rc} in {dt:.0f} s, log {log}", flush=True)
    return rc, out, dt


def sanitizer_summary(out):
    m = re.search(r"ERROR SUMMARY: (\d+) error", out)
    r = re.search(r"RACECHECK SUMMARY: (\d+) hazard", out)
    passed = re.search(r"(\d+)/(\d+) checks pass", out)
    return dict(errors=int(m.group(1)) if m else None, hazards=int(r.group(1)) if r else None,
                checks=passed.group(0) if passed else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="benchmark N in {1024, 4096} only")
    ap.add_argument("--no-sanitizer", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--pytest", action="store_true", help="also run pytest tests/test_gpu*.py")
    ap.add_argument("--bench-args", default="", help="extra arguments for benchmarks.gpu_forward")
    args = ap.parse_args(argv)

    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="flashkit-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["CUPY_CACHE_DIR"] = tempfile.mkdtemp(prefix="cupy-cache-")  # fresh: the first launches really compile
    py = sys.executable
    summary = {}

    rc, log, dt = step("correctness", [py, "-m", "flashkit.gpu.check", "--json", str(out / "check.json")],
                       out / "check.log", env, 300)
    summary["correctness"] = dict(rc=rc, seconds=round(dt, 1), **sanitizer_summary(log))
    print("\n".join(l for l in log.splitlines() if "FAIL" in l or "checks pass" in l or "Error" in l)[-3000:])

    if not args.no_sanitizer:
        san = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
        for tool in ("memcheck", "racecheck"):
            cmd = [san, "--tool", tool, py, "-m", "flashkit.gpu.check", "--sanitize"]
            rc, log, dt = step(f"sanitizer {tool}", cmd, out / f"sanitizer-{tool}.log", env, 240)
            summary[f"sanitizer_{tool}"] = dict(rc=rc, seconds=round(dt, 1), **sanitizer_summary(log))
            print("   " + " | ".join(l.strip() for l in log.splitlines() if "SUMMARY" in l or "checks pass" in l))

    bench_json = out / "bench.json"
    if not args.no_bench:
        cmd = [py, "-m", "benchmarks.gpu_forward", "--json", str(bench_json)] + args.bench_args.split() + (["--quick"] if args.quick else [])
        rc, log, dt = step("benchmark", cmd, out / "bench.log", env, 1200)
        summary["benchmark"] = dict(rc=rc, seconds=round(dt, 1))
        if bench_json.exists():
            from benchmarks.gpu_forward import card_slug, print_table

            result = json.loads(bench_json.read_text())
            result["checks"] = summary
            check_json = out / "check.json"
            if check_json.exists():
                c = json.loads(check_json.read_text())
                result["correctness"] = dict(passed=c["passed"], total=c["total"], rows=c["rows"],
                                             compile_seconds_first_launch=c["compile_seconds"])
            dest = ROOT / "benchmarks" / "results" / f"gpu-{card_slug(result['card'])}.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_json(dest, result)
            shutil.copy(dest, out / dest.name)
            print_table(result["results"])
            for r in result.get("block_sweep", []):
                if r["status"] == "ok":
                    print(f"sweep d={r['d']} causal={r['causal']} {r['impl']:<28} {r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s")
            for r in result.get("memory", []):
                print(f"memory N={r['N']} {r['impl']:<16} " + (f"{r['extra_bytes'] / 2**20:10.1f} MiB" if "extra_bytes" in r else r["status"][:60]))
            print(f"wrote {dest}")
        else:
            print(log[-4000:])
    if args.pytest:
        tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_gpu*.py"))
        rc, log, dt = step("pytest", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="] + tests, out / "pytest.log", env, 900)
        summary["pytest"] = dict(rc=rc, seconds=round(dt, 1), tail=log.strip().splitlines()[-1:] if log.strip() else [])
        print("   " + " ".join(summary["pytest"]["tail"]))
        if not args.no_bench and bench_json.exists():  # the results file records the test run too
            result["checks"] = summary
            write_json(dest, result)
            shutil.copy(dest, out / dest.name)

    print("\nsummary:", json.dumps(summary))
    ok = summary["correctness"]["rc"] == 0 and all(
        v.get("errors") in (0, None) and v.get("hazards") in (0, None) and v["rc"] == 0
        for k, v in summary.items() if k.startswith("sanitizer"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
