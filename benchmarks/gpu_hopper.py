"""Rung 7 (cupy-wgmma, Hopper only) in one device call: its SASS, its correctness, memcheck, and its speed
beside rung 6, torch's flash backend and cuDNN, in the same run.

    FLASHKIT_COMMIT=<sha> python -m benchmarks.gpu_hopper --out DIR

Each stage runs in its own process with a time limit, so a kernel that hangs costs its stage, not the call:
  sass      nvcc -cubin for sm_90a (the same ptxas as NVRTC 13.0) and cuobjdump --dump-sass: opcode counts
            (HGMMA = wgmma, UTMALDG = TMA loads, USETMAXREG = setmaxnreg, HMMA = mma.sync)
  check     flashkit.gpu.check's criteria on the awkward shapes (d = 64 and 128), fp16 and bf16, every allowed
            block on two shapes, a peaky softmax; outputs poisoned with NaN first; rung 7 and its earlier versions
            (VARIANTS: v1 without a producer warpgroup; with FA3's intra-warpgroup overlap; with ping-pong too)
  memcheck  compute-sanitizer --tool memcheck over small launches of all of them (CuPy's pool off)
  time      N = 4096, B*N = 16384, H*d = 2048 (benchmarks.gpu_forward's shapes, timing and FLOP count)
Writes DIR/hopper.json (results rows in gpu_forward's format; rung 7's ratio is to cuDNN, its peer); kept as
benchmarks/results/rung7-<card>.json (outside the gpu-*.json that benchmarks.report reads as headlines).
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

from flashkit.atomic import write_json

# Earlier versions of 7_wgmma.cu, as pseudo-rungs registered in this process only (number, name, defines):
VARIANTS = ((70, "cupy-wgmma-v1", "#define WARP_SPECIALIZE 0\n"),                      # no producer warpgroup
            (72, "cupy-wgmma-overlap", "#define OVERLAP 1\n"),                       # + FA3's intra-warpgroup overlap
            (73, "cupy-wgmma-pingpong", "#define OVERLAP 1\n#define PINGPONG 1\n"))  # + FA3's ping-pong
TIMED = (72, 73)  # the variants the time stage measures beside rung 7 (v1 was timed in the first run)

CHECK_CASES = (0, 1, 2, 4, 5, 6, 8)  # flashkit.gpu.check.CASES with d in {64, 128}


def register_nows():
    """7_wgmma.cu's earlier versions (VARIANTS) as pseudo-rungs of flashkit.gpu.flash."""
    from flashkit.gpu import flash
    from flashkit.gpu.rungs import rung

    src = (flash.KERNEL_DIR / "7_wgmma.cu").read_text()
    for number, name, defines in VARIANTS:
        path = Path(tempfile.gettempdir()) / f"7_wgmma_{number}.cu"
        path.write_text(defines + src)
        threads = (lambda Br, Bc: 2 * Br) if "WARP_SPECIALIZE 0" in defines else rung(7).threads
        flash.RUNGS[number] = replace(rung(7), number=number, name=name, source=str(path), threads=threads)


def stage_sass(out):
    from flashkit.gpu import flash

    rows = []
    for d, defs in ((128, ""), (64, ""), (128, "-DWARP_SPECIALIZE=0")):
        cubin = Path(tempfile.gettempdir()) / f"r7_{d}.cubin"
        cmd = (f"nvcc -cubin -o {cubin} -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -DHEAD_DIM={d} {defs} "
               f"-I{flash.KERNEL_DIR} {flash.KERNEL_DIR / '7_wgmma.cu'}")
        build = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        sass = subprocess.run(f"cuobjdump --dump-sass {cubin}", shell=True, capture_output=True, text=True).stdout
        ops = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "UTMALDG", "USETMAXREG", "WARPGROUP", "HMMA",
                                                                    "LDL", "STL", "SYNCS")}
        first = [ln.strip() for ln in sass.splitlines() if "HGMMA" in ln][:3]
        rows.append(dict(d=d, defines=defs, ptxas=build.stderr.strip().splitlines()[-3:], ops=ops, hgmma_lines=first))
        print(f"sass d={d} {defs}: {ops} {first[:1]}", flush=True)
    write_json(out, rows)


def stage_check(out):
    from flashkit.gpu import check
    from flashkit.gpu.rungs import rung

    register_nows()
    rows = []
    for ci in CHECK_CASES:
        case = check.CASES[ci]
        for number in (7,) + tuple(v[0] for v in VARIANTS):
            for element in ("f16", "bf16"):
                rows.append(check.check_rung(number, case, element, seed=ci))
    for bs in rung(7).allowed_blocks:
        for case in (check.CASES[2], check.CASES[5]):
            rows.append(check.check_rung(7, case, "f16", seed=100, block_size=bs))
    big = (1, 2, 1, 200, 180, 64, True, None)
    for element in ("f16", "bf16"):
        rows.append(check._check_scaled(7, big, element, 4.0, 7))
    check.print_table(rows)
    write_json(out, [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows])


def stage_small():
    """Small launches for compute-sanitizer (CuPy's pool off: every array its own allocation)."""
    import cupy

    from flashkit.gpu import check

    register_nows()
    cupy.cuda.set_allocator(None)
    rows = []
    for case in ((1, 2, 1, 70, 90, 64, True, None), (1, 1, 1, 33, 47, 128, False, (8, 4)), (1, 2, 2, 200, 130, 128, True, None)):
        for number in (7,) + tuple(v[0] for v in VARIANTS):
            rows.append(check.check_rung(number, case, "f16", 3))
    cupy.cuda.Device().synchronize()
    check.print_table(rows)


def stage_time(out):
    import torch

    from benchmarks.gpu_forward import add_ratios, environment, flops, measure, rung_call, sdpa_call

    register_nows()
    rows, N = [], 4096
    for d in (64, 128):
        B, H = 16384 // N, 2048 // d
        for causal in (False, True):
            for dtype in ("float16", "bfloat16"):
                gen = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=getattr(torch, dtype), generator=gen) for _ in range(3))
                meta = dict(d=d, N=N, B=B, H=H, causal=causal, dtype=dtype, flops=flops(B, H, N, d, causal))
                print(f"d={d} N={N} causal={causal} {dtype}", flush=True)
                measure("cupy-mma-2tile", rung_call(6, q, k, v, causal, dtype), rows, dict(meta, rung=6))
                measure("cupy-wgmma", rung_call(7, q, k, v, causal, dtype), rows, dict(meta, rung=7))
                for number, name, defines in (v for v in VARIANTS if v[0] in TIMED):
                    measure(name, rung_call(number, q, k, v, causal, dtype), rows, dict(meta, rung=None, variant=defines))
                if dtype == "float16" and not causal:
                    for bs in ((192, 64), (192, 128)):
                        measure(f"cupy-wgmma{bs}", rung_call(7, q, k, v, causal, dtype, bs), rows,
                                dict(meta, rung=None, block_size=list(bs)))
                for p in ("flash", "cudnn"):
                    measure(f"torch-{p}", sdpa_call(p, q, k, v, causal), rows, dict(meta, rung=None))
                del q, k, v
    add_ratios(rows)
    by = {(r["d"], r["causal"], r["dtype"], r["impl"]): r for r in rows if r["status"] == "ok"}
    for r in rows:  # rung 7 and its variants against rung 6 in the same run
        six = by.get((r["d"], r["causal"], r["dtype"], "cupy-mma-2tile"))
        if r["impl"].startswith("cupy-wgmma") and r["status"] == "ok" and six:
            r["ratio_rung6"] = six["ms"] / r["ms"]
    env = environment()
    if os.environ.get("FLASHKIT_COMMIT"):  # the tree is a copy inside another checkout: git would name that one
        env.update(commit=os.environ["FLASHKIT_COMMIT"], dirty=None, tree="copy of the worktree at that commit")
    write_json(out, dict(environment=env, results=rows))
    print(f"\n{'d':>4} {'causal':>6} {'dtype':>9} {'impl':<26} {'ms':>8} {'TFLOP/s':>8} {'/cudnn':>7} {'/rung6':>7}")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['d']:>4} {str(r['causal']):>6} {r['dtype']:>9} {r['impl']:<26} {r['ms']:8.3f} {r['tflops']:8.1f} "
                  f"{r.get('ratio_fastest', float('nan')):7.2f} {r.get('ratio_rung6', float('nan')):7.2f}")


def run_stage(name, out_dir, timeout, prefix=""):
    cmd = f"{prefix}{sys.executable} -m benchmarks.gpu_hopper --stage {name} --out {out_dir}"
    print(f"==== {name}: {cmd}", flush=True)
    try:
        p = subprocess.run(cmd, shell=True, timeout=timeout, capture_output=True, text=True)
        text = p.stdout + p.stderr
        print(text[-6000:], flush=True)
        return dict(stage=name, rc=p.returncode, tail=text[-3000:])
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        print(f"{name}: TIMEOUT after {timeout} s\n{text[-3000:]}", flush=True)
        return dict(stage=name, rc="timeout", tail=text[-3000:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", choices=("sass", "check", "small", "time"))
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.stage == "sass":
        return stage_sass(out / "sass.json")
    if args.stage == "check":
        return stage_check(out / "check.json")
    if args.stage == "small":
        return stage_small()
    if args.stage == "time":
        return stage_time(out / "time.json")
    skip = set(args.skip.split(","))
    out.mkdir(parents=True, exist_ok=True)
    log = []
    for name, timeout, prefix in (("sass", 40, ""), ("check", 75, ""),
                                  ("small", 60, "compute-sanitizer --tool memcheck --print-limit 5 "),
                                  ("time", 110, "")):
        if name in skip:
            continue
        log.append(run_stage(name, out, timeout, prefix))
        if name == "check" and log[-1]["rc"] == "timeout":  # a hung kernel would hang the later stages too
            break
    merged = {"stages": log}
    for part in ("sass", "check", "time"):
        f = out / f"{part}.json"
        if f.is_file():
            merged[part] = json.loads(f.read_text())
    time_part = merged.pop("time", None) or {}
    merged.update(time_part)  # environment, results at the top level, as the other results files
    write_json(out / "hopper.json", merged)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
