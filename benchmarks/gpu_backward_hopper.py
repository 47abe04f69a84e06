"""Backward rung 4 (cupy-bwd-wgmma, Hopper only) in one device call: correctness, sanitizers and speed of the
backward rungs, with rung 4's variants beside it, torch's flash, cuDNN and efficient backward in the same run.

    FLASHKIT_COMMIT=<sha> python -m benchmarks.gpu_backward_hopper --out DIR [--rungs cupy-bwd-mma,cupy-bwd-wgmma]

Stages, each in its own process with a time limit (a kernel that hangs costs its stage, not the call); the first
three at once, the timed ones alone afterwards:
  check      flashkit.gpu.check_backward on the awkward shapes (outputs poisoned, every allowed block, the in-kernel
             lse check, the public call) for the rungs named by --rungs and rung 4's VARIANTS
  memcheck   compute-sanitizer --tool memcheck over check_backward's small launches of the same rungs
  racecheck  compute-sanitizer --tool racecheck, likewise
  bench      benchmarks.gpu_backward: every backward rung and variant alone and through the public call, torch's
             backward backends, the ceilings, the fp16 block sweep (N = 4096, B*N = 16384, H*d = 2048)
  parts      benchmarks.gpu_backward_parts: each kernel alone, and the dQ additions' cost
DIR gets check.json, bench.json, parts.json and one log per stage (at most 8 files: what the device tool brings back).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

# Versions of b4_wgmma.cu, as pseudo-rungs registered in one process only: (name, defines, extra shared bytes of the
# main kernel as a function of (d, Br, Bc)).
VARIANTS = (
    # dQ_i's tile through shared memory (fp32 [Br][d + 4], after the mbarriers) and bulk reductions by a warp of
    # the producer warpgroup, instead of the consumers' vector atomics
    ("cupy-bwd-wgmma-bulkdq", "#define DQ_BULK 1\n", lambda d, Br, Bc: 64 + Br * (d + 4) * 4),
)
CHECKED = ("cupy-bwd-mma", "cupy-bwd-wgmma")  # the rungs this driver's check and sanitizer stages cover by default


def register_variants():
    """b4_wgmma.cu's VARIANTS as pseudo-rungs of flashkit.gpu.backward, check_backward and benchmarks.gpu_backward."""
    import benchmarks.gpu_backward as bench
    from flashkit.gpu import backward, check_backward

    base = backward.RUNGS["cupy-bwd-wgmma"]
    src = (backward.KERNEL_DIR / base.source).read_text()
    for name, defines, extra in VARIANTS:
        path = Path(tempfile.gettempdir()) / f"{name}.cu"
        path.write_text(defines + src)
        main = base.kernel("main")
        grown = replace(main, smem=lambda d, Br, Bc, main=main, extra=extra: main.smem(d, Br, Bc) + extra(d, Br, Bc))
        spec = replace(base, name=name, source=str(path),
                       kernels=tuple(grown if k.role == "main" else k for k in base.kernels))
        backward.RUNGS[name] = spec
        check_backward.RUNG_ELEMENTS[name] = spec.elements
        check_backward.RUNG_DIMS[name] = spec.head_dims
        bench.SPEC[name] = spec
        for dt in spec.dtypes:
            bench.RUNGS[dt] = bench.RUNGS[dt] + (name,)


def stage(argv):
    """One stage inside its own process (python -m benchmarks.gpu_backward_hopper --stage NAME ...)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", required=True)
    ap.add_argument("--json")
    ap.add_argument("--rungs", default=",".join(CHECKED))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    register_variants()
    only = args.rungs.split(",") + [v[0] for v in VARIANTS]
    from flashkit.gpu import check_backward

    if args.stage == "check":
        return check_backward.main(sum((["--rung", r] for r in only), []) + ["--json", args.json])
    if args.stage == "sanitize":
        return check_backward.main(sum((["--rung", r] for r in only), []) + ["--sanitize"])
    if args.stage == "bench":
        from benchmarks import gpu_backward

        quick = ["--no-sweep", "--dtypes", "float16,bfloat16"] if args.quick else ["--sweep-dtypes", "float16"]
        return gpu_backward.main(["--json", args.json, "--no-memory"] + quick)
    if args.stage == "parts":
        from benchmarks import gpu_backward_parts

        return gpu_backward_parts.main(["--json", args.json])
    raise SystemExit(f"unknown stage {args.stage!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rungs", default=",".join(CHECKED), help="rungs of the check and sanitizer stages")
    ap.add_argument("--check-timeout", type=float, default=110)
    ap.add_argument("--bench-timeout", type=float, default=110)
    ap.add_argument("--parts-timeout", type=float, default=35)
    ap.add_argument("--quick", action="store_true",
                    help="a short call: the bench without fp32 and the block sweep, no parts stage")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.stage:
        return stage(["--stage", args.stage, "--rungs", args.rungs] + (["--quick"] if args.quick else []) + rest)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "benchmarks.gpu_backward_hopper", "--rungs", args.rungs] + (
        ["--quick"] if args.quick else []) + ["--stage"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def start(name, cmd):
        log = open(out / f"{name}.log", "w")
        return name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log

    def finish(job, timeout):
        name, proc, log = job
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        log.close()
        text = (out / f"{name}.log").read_text()
        summary = {k: (m.group(0) if m else None) for k, m in (
            ("checks", re.search(r"\d+/\d+ checks pass", text)), ("errors", re.search(r"ERROR SUMMARY: \d+ error", text)),
            ("hazards", re.search(r"RACECHECK SUMMARY: \d+ hazard", text)))}
        print(f"== {name}: rc={rc} {summary}", flush=True)
        return rc

    san = "compute-sanitizer"
    jobs = [start("check", py + ["check", "--json", str(out / "check.json")]),
            start("memcheck", [san, "--tool", "memcheck"] + py + ["sanitize"]),
            start("racecheck", [san, "--tool", "racecheck"] + py + ["sanitize"])]
    rcs = {job[0]: finish(job, args.check_timeout) for job in jobs}
    if rcs["check"] == "timeout":  # a hang in a kernel: timing it would hang too
        print("the check timed out: no timing", flush=True)
        return 1
    rcs["bench"] = finish(start("bench", py + ["bench", "--json", str(out / "bench.json")]), args.bench_timeout)
    if not args.quick:
        rcs["parts"] = finish(start("parts", py + ["parts", "--json", str(out / "parts.json")]), args.parts_timeout)
    if (out / "bench.json").exists():
        from benchmarks.gpu_backward import print_table

        rows = json.loads((out / "bench.json").read_text())["results"]
        print_table(rows)
    return 0 if all(rc == 0 for rc in rcs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
