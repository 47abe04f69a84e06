"""Everything the GPU ladder needs checked and measured, in one call on a GPU machine:

    FLASHKIT_COMMIT=$(git rev-parse HEAD) python -m benchmarks.gpu_session [--deadline 470] [--Ns 4096] [--pytest]

(about 4.5 minutes on an H200 with the defaults: step 1 ~100 s, step 2 ~170 s, measured in two partial runs.
It writes at most 8 files into $OUT itself: copy nothing else there, or the device tool leaves files behind.)

1. at the same time, each in its own process (none of them timed, so they may share the GPU):
   - correctness of every rung of the table flashkit/gpu/rungs.py, forward (`python -m flashkit.gpu.check`)
     and backward (`python -m flashkit.gpu.check_backward`): awkward shapes against a float64 oracle,
     outputs poisoned with NaN first, every allowed block size, the backward's in-kernel lse check;
   - compute-sanitizer: memcheck and racecheck on one small launch per rung and dtype, forward and backward
     (`--sanitize`: CuPy's memory pool off, so every array is its own allocation);
   - every extra check script found by the convention `benchmarks/gpu_*_check.py` defining `main(out_dir)`
     (what a new rung brings along: it writes JSON into out_dir and returns 0 when all is well);
   - optionally (--pytest) pytest tests/test_gpu*.py;
2. then alone on the GPU, one after another: `benchmarks.gpu_forward` and `benchmarks.gpu_backward` (every
   rung alone and through the public call, torch's backends, the GEMM and copy ceilings of this card, all
   in the same run) and `benchmarks.gpu_overhead` (the public call's cost, piece by piece).
3. Results: benchmarks/results/gpu-<card>.json (forward), gpu-bwd-<card>.json (backward), gpu-overhead-<card>.json
   and gpu-session-<card>.json (each step's exit status, time, summaries, the correctness rows and the tail of
   its log), copied to $OUT when it is set (the device tool's output folder; at most 8 files go there: the four,
   plus the extra scripts' JSON), then one summary table is printed.
Each step runs in its own process, so a crash in one (an illegal address, say) cannot hide the others; a step
is stopped when the deadline leaves it no time. Nothing here knows a rung by name: rungs come from the table.
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
MAX_OUT_FILES = 8  # what the device tool brings back from $OUT


def sanitizer_summary(out):
    """Counts a compute-sanitizer or check log reports: errors, hazards, 'n/m checks pass'."""
    m = re.search(r"ERROR SUMMARY: (\d+) error", out)
    r = re.search(r"RACECHECK SUMMARY: (\d+) hazard", out)
    passed = re.search(r"(\d+)/(\d+) checks pass", out)
    return dict(errors=int(m.group(1)) if m else None, hazards=int(r.group(1)) if r else None,
                checks=passed.group(0) if passed else None)


def extra_checks():
    """benchmarks/gpu_*_check.py modules whose main takes out_dir (the convention for a rung's own checks)."""
    found = []
    for path in sorted((ROOT / "benchmarks").glob("gpu_*_check.py")):
        text = path.read_text()
        if re.search(r"^def main\(out_dir", text, re.M):
            found.append(f"benchmarks.{path.stem}")
    return found


class Job:
    """One step in its own process, its output in a log file (kept if it is killed)."""

    def __init__(self, name, cmd, logs, env):
        self.name, self.cmd = name, cmd
        self.log = logs / f"{name}.log"
        self.file = open(self.log, "w")
        self.t0 = time.time()
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.file, stderr=subprocess.STDOUT)

    def finish(self, timeout):
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = "timeout"
        self.file.close()
        seconds = time.time() - self.t0
        out = self.log.read_text(errors="replace")
        summary = dict(rc=rc, seconds=round(seconds, 1), **sanitizer_summary(out),
                       tail=[l for l in out.splitlines() if l.strip()][-12:])
        print(f"   {self.name}: rc={rc} in {seconds:.0f} s", flush=True)
        return summary, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deadline", type=float, default=470, help="seconds for everything (steps are cut to fit)")
    ap.add_argument("--bench-budget", type=float, default=230, help="seconds of the deadline kept for step 2")
    ap.add_argument("--Ns", default="4096", help="sequence lengths of the benchmarks (comma-separated)")
    ap.add_argument("--pytest", action="store_true", help="also run pytest tests/test_gpu*.py in step 1")
    ap.add_argument("--no-checks", action="store_true", help="skip the correctness steps (benchmarks only)")
    ap.add_argument("--no-sanitizer", action="store_true")
    ap.add_argument("--no-extra", action="store_true",
                    help="skip the benchmarks/gpu_*_check.py scripts (to run one alone, e.g. when it also times)")
    ap.add_argument("--sanitize", default="forward:memcheck,forward:racecheck,backward:memcheck,backward:racecheck",
                    help="which sanitizer runs (direction:tool, comma-separated)")
    ap.add_argument("--bench-args", default="", help="extra arguments for both benchmarks (e.g. '--ds 64')")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.time()

    def left():
        return args.deadline - (time.time() - t_start)

    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    work = Path(tempfile.mkdtemp(prefix="flashkit-gpu-session-"))  # logs and step JSON; $OUT gets the merged files
    logs, extra_out = work / "logs", work / "extra"
    logs.mkdir()
    extra_out.mkdir()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("CUPY_CACHE_DIR", tempfile.mkdtemp(prefix="cupy-cache-"))  # fresh: first launches really compile
    py = sys.executable
    san = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    steps, results = {}, {}

    # 1. correctness, sanitizers, extra checks, at once
    jobs = [] if args.no_checks else [
        Job("check_forward", [py, "-m", "flashkit.gpu.check", "--json", str(work / "check_forward.json")], logs, env),
        Job("check_backward", [py, "-m", "flashkit.gpu.check_backward", "--json", str(work / "check_backward.json")],
            logs, env)]
    if not args.no_sanitizer:
        modules = {"forward": "flashkit.gpu.check", "backward": "flashkit.gpu.check_backward"}
        for which in args.sanitize.split(","):
            short, tool = which.split(":")
            jobs.append(Job(f"sanitizer_{tool}_{short}", [san, "--tool", tool, py, "-m", modules[short], "--sanitize"],
                            logs, env))
    for module in [] if args.no_extra else extra_checks():
        name = module.split(".")[-1]
        (extra_out / name).mkdir()
        code = "import importlib, sys; sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2]) or 0)"
        jobs.append(Job(name, [py, "-c", code, module, str(extra_out / name)], logs, env))
    if args.pytest:
        tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_gpu*.py"))
        jobs.append(Job("pytest", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="] + tests,
                        logs, env))
    bench_budget = 0 if args.no_bench else args.bench_budget
    for job in jobs:
        steps[job.name], _ = job.finish(left() - bench_budget)

    # 2. the benchmarks, alone on the GPU
    if not args.no_bench:
        common = ["--Ns", args.Ns, "--no-sweep", "--no-memory"] + args.bench_args.split()
        plan = [("bench_forward", "benchmarks.gpu_forward", common, 0.45),
                ("bench_backward", "benchmarks.gpu_backward", common, 0.75),
                ("overhead", "benchmarks.gpu_overhead", [], 1.0)]
        for name, module, extra, share in plan:
            path = work / f"{name}.json"
            job = Job(name, [py, "-m", module, "--json", str(path)] + extra, logs, env)
            steps[name], _ = job.finish((left() - 5) * share)
            if path.exists():
                results[name] = json.loads(path.read_text())

    # 3. results files: the benchmarks' with the checks merged in, and the session's own
    from benchmarks.gpu_forward import card_slug, environment

    env_info = next((r for r in results.values()), None) or environment()
    slug = card_slug(env_info["card"])
    corr = {}
    for which in ("forward", "backward"):
        p = work / f"check_{which}.json"
        if p.exists():
            c = json.loads(p.read_text())
            corr[which] = dict(passed=c["passed"], total=c["total"], rows=c["rows"],
                               compile_seconds_first_launch=c["compile_seconds"])
    names = {"bench_forward": f"gpu-{slug}.json", "bench_backward": f"gpu-bwd-{slug}.json",
             "overhead": f"gpu-overhead-{slug}.json"}
    written = []
    for step, data in results.items():
        data = dict(data, checks={k: {f: v for f, v in s.items() if f != "tail"} for k, s in steps.items()})
        if step == "bench_forward" and "forward" in corr:
            data["correctness"] = corr["forward"]
        if step == "bench_backward" and "backward" in corr:
            data["correctness"] = corr["backward"]
        dest = ROOT / "benchmarks" / "results" / names[step]
        write_json(dest, data)
        written.append(dest)
    session = dict({k: env_info[k] for k in ("card", "driver", "cuda_runtime", "nvrtc", "cupy", "torch", "python", "commit",
                                             "dirty", "date") if k in env_info},
                   benchmark="benchmarks/gpu_session.py", deadline_s=args.deadline, seconds=round(time.time() - t_start, 1),
                   steps=steps, correctness={k: {f: v for f, v in c.items() if f != "rows"} for k, c in corr.items()},
                   failed_checks=[r for c in corr.values() for r in c["rows"] if not r.get("ok")][:40],
                   extra_checks={m: sorted(p.name for p in (extra_out / m.split(".")[-1]).glob("*.json"))
                                 for m in ([] if args.no_extra else extra_checks())})
    dest = ROOT / "benchmarks" / "results" / f"gpu-session-{slug}.json"
    write_json(dest, session)
    written.append(dest)
    extra_files = sorted(extra_out.rglob("*.json"))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for p in written + extra_files[:max(0, MAX_OUT_FILES - len(written))]:
            shutil.copy(p, out / p.name)
        if len(written) + len(extra_files) > MAX_OUT_FILES:
            print(f"note: {len(extra_files)} extra JSON files, only {MAX_OUT_FILES - len(written)} fit in $OUT", flush=True)

    print_summary(steps, corr, results)
    ok = all(s["rc"] == 0 and s.get("errors") in (0, None) and s.get("hazards") in (0, None) for s in steps.values())
    print(f"\n{'all steps passed' if ok else 'SOME STEPS FAILED'} in {time.time() - t_start:.0f} s; wrote "
          + ", ".join(p.name for p in written), flush=True)
    return 0 if ok else 1


def print_summary(steps, corr, results):
    print(f"\n{'step':<28} {'rc':>8} {'s':>6}  result")
    for name, s in steps.items():
        what = " ".join(x for x in (s.get("checks") or "", "" if s.get("errors") is None else f"{s['errors']} errors",
                                    "" if s.get("hazards") is None else f"{s['hazards']} hazards") if x)
        print(f"{name:<28} {str(s['rc']):>8} {s['seconds']:>6.0f}  {what or (s['tail'][-1][:70] if s['tail'] else '')}")
    for which, c in corr.items():
        bad = [r for r in c["rows"] if not r.get("ok")]
        print(f"correctness {which}: {c['passed']}/{c['total']}" + (f"; first failure: {bad[0].get('rung')} "
                                                                    f"{bad[0].get('element')} {bad[0].get('case')}" if bad else ""))
    for step in ("bench_forward", "bench_backward"):
        rows = (results.get(step) or {}).get("results", [])
        if not rows:
            continue
        print(f"\n{step}: rung alone and public call, ms (ratio_fastest = fastest torch time / ours; ratio_flash likewise)")
        print(f"{'d':>4} {'N':>6} {'causal':>6} {'dtype':>9} {'rung':<34} {'alone':>8} {'public':>8} {'pub/alone':>9} "
              f"{'r_fast':>6} {'r_flash':>7}  fastest")
        alone = {(r["d"], r["N"], r["causal"], r["dtype"], r["impl"]): r for r in rows
                 if r.get("rung") and not r.get("public") and r["status"] == "ok"}
        for r in rows:
            if not (r.get("public") and r.get("rung") and r["status"] == "ok"):
                continue
            a = alone.get((r["d"], r["N"], r["causal"], r["dtype"], r["backend"]))
            print(f"{r['d']:>4} {r['N']:>6} {str(r['causal']):>6} {r['dtype']:>9} {r['backend']:<34} "
                  f"{a['ms'] if a else float('nan'):8.3f} {r['ms']:8.3f} {r.get('public_over_rung', float('nan')):9.3f} "
                  f"{r.get('ratio_fastest', float('nan')):6.2f} {r.get('ratio_flash', float('nan')):7.2f}  "
                  f"{r.get('fastest_peer', '')}")
    over = (results.get("overhead") or {}).get("results", [])
    if over:
        print("\noverhead (ms per call, back to back):")
        for r in over:
            print(f"  {r['dtype']:9} {r['what']:<58} {r['ms']:8.3f}")


if __name__ == "__main__":
    sys.exit(main())
