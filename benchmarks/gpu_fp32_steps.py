"""The exact-fp32 CUDA-core rungs against torch's efficient fp32 backend, in one device call: check, sanitize, time.

    FLASHKIT_COMMIT=<sha> python -m benchmarks.gpu_fp32_steps --out $OUT [--old-b1 PATH] [--deadline 300]

Variants (registered in the processes of this script only, as benchmarks.gpu_forward's VARIANTS are):
  forward rung 3 (kernels/3_fp32_tile.cu): 3 = the table's default; 31 = TX 16 (8 rows of S per thread);
    32 = KV_ASYNC (K_j and V_j in two buffers filled by cp.async, each load overlapped with the other product);
    33 = both. (Since 2026-12-02 the kernel's own defaults are TX 16 at d = 128 and KV_ASYNC at d = 64, so some of
    these now repeat the default; the run at 86f596e, fp32-steps-h200.json, predates that.)
  backward rung 1 (kernels/b1_fp32.cu): cupy-bwd-fp32 = this tree; cupy-bwd-fp32-v1 = the source given by --old-b1
    (the kernel before this change), when given.
1. at the same time, untimed: every variant against the float64 reference on the awkward shapes of
   flashkit.gpu.check / flashkit.gpu.check_backward (every allowed block; the public call of the table's rungs);
   compute-sanitizer memcheck and racecheck over small launches of every variant (`--sanitize`).
2. then alone on the GPU: every variant and block beside torch's efficient fp32 backend, B*N = 16384, H*d = 2048,
   N = 4096, d 64 / 128, causal or not; the public calls (named backend and "auto"). Prints a table.
Writes into --out: fp32.json (checks, timings, card, versions, commit) and the steps' logs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

FWD_VARIANTS = ((31, "cupy-fp32-tile-tx16", "#define TX 16\n"),
                (32, "cupy-fp32-tile-async", "#define KV_ASYNC 1\n"),
                (33, "cupy-fp32-tile-tx16-async", "#define TX 16\n#define KV_ASYNC 1\n"))
BWD_OLD = "cupy-bwd-fp32-v1"


def register(old_b1=None):
    """Put the variants into flash.RUNGS / backward.RUNGS and the checkers' tables, in this process."""
    import tempfile

    from flashkit.gpu import backward, check, check_backward, flash

    spec = flash.RUNGS[3]
    src = (flash.KERNEL_DIR / spec.source).read_text()
    for number, name, defines in FWD_VARIANTS:
        path = Path(tempfile.gettempdir()) / f"variant_{number}_{spec.source}"
        path.write_text(defines + src)
        smem = spec.smem
        if "KV_ASYNC" in defines:  # V_s beside K_s: one more [Bc][d+4] tile (the table counts it at d = 64 already)
            smem = (lambda base: lambda d, Br, Bc: base(d, Br, Bc) + (4 * Bc * (d + 4) if d != 64 else 0))(spec.smem)
        flash.RUNGS[number] = replace(spec, number=number, name=name, source=str(path), smem=smem)
        check.ELEMENT_OF[number] = spec.elements
        check.HEAD_DIMS_OF[number] = spec.head_dims
    check._precision = lambda rung: "exact"
    if old_b1:
        b1 = backward.RUNGS["cupy-bwd-fp32"]
        backward.RUNGS[BWD_OLD] = replace(b1, name=BWD_OLD, source=str(Path(old_b1).resolve()))
        check_backward.RUNG_ELEMENTS[BWD_OLD] = b1.elements
        check_backward.RUNG_DIMS[BWD_OLD] = b1.head_dims


def fwd_rungs():
    return (3,) + tuple(n for n, _, _ in FWD_VARIANTS)


def bwd_rungs(old_b1):
    return ("cupy-bwd-fp32",) + ((BWD_OLD,) if old_b1 else ())


def run_checks(old_b1, out):
    """Every variant, every allowed block, on the awkward shapes; then the public calls of the table's rungs."""
    from flashkit.gpu import backward, check, check_backward, flash

    rows = []
    for number in fwd_rungs():
        for case in check.CASES:
            if case[5] not in (check.HEAD_DIMS_OF[number] or (case[5],)):
                continue
            for blocks in flash.RUNGS[number].allowed(case[5]):
                try:
                    r = check.check_rung(number, case, "f32", seed=11, block_size=blocks)
                    rows.append(dict(direction="forward", rung=number, case=list(case), block=list(blocks),
                                     ok=bool(r["ok"]), err=r["err"], tol=r["tol"]))
                except Exception as exc:  # noqa: BLE001 - recorded as a failure, never hidden
                    rows.append(dict(direction="forward", rung=number, case=list(case), block=list(blocks), ok=False,
                                     error=repr(exc)[:300]))
    for case in check.CASES[:5]:
        r = check.check_public(3, case, "f32", seed=12)
        rows.append(dict(r, direction="forward", rung="public cupy-fp32-tile", ok=bool(r["ok"])))
    for name in bwd_rungs(old_b1):
        for case in check_backward.CASES:
            if case[5] not in (check_backward.RUNG_DIMS[name] or (case[5],)):
                continue
            for blocks in backward.RUNGS[name].allowed(case[5]):
                try:
                    r = check_backward.check_rung(name, case, "f32", seed=13, block_size=blocks)
                    rows.append(dict(direction="backward", rung=name, case=list(case), block=list(blocks),
                                     ok=bool(r["ok"]), err={g: r[g]["err"] for g in ("dq", "dk", "dv")}))
                except Exception as exc:  # noqa: BLE001
                    rows.append(dict(direction="backward", rung=name, case=list(case), block=list(blocks), ok=False,
                                     error=repr(exc)[:300]))
    for case in check_backward.CASES[:6]:
        r = check_backward.check_public("cupy-bwd-fp32", case, "f32", seed=14)
        rows.append(dict(r, direction="backward", rung="public cupy-bwd-fp32", ok=bool(r["ok"])))
    bad = [r for r in rows if not r["ok"]]
    print(f"checks: {len(rows) - len(bad)}/{len(rows)} pass")
    for r in bad[:20]:
        print("  FAIL", r)
    (Path(out) / "check.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0 if not bad else 1


def run_sanitize(old_b1):
    """Small launches of every variant, CuPy's pool off (each array its own allocation), for compute-sanitizer."""
    import cupy

    from flashkit.gpu import check, check_backward, flash

    cupy.cuda.set_allocator(None)
    n = bad = 0
    for case in ((1, 2, 1, 70, 90, 64, True, None), (1, 1, 1, 33, 47, 128, False, (8, 4))):
        for number in fwd_rungs():
            for blocks in flash.RUNGS[number].allowed(case[5]):
                r = check.check_rung(number, case, "f32", seed=3, block_size=blocks)
                n, bad = n + 1, bad + (not r["ok"])
    for case in check_backward.SANITIZE_CASES:
        for name in bwd_rungs(old_b1):
            r = check_backward.check_rung(name, case, "f32", seed=3)
            n, bad = n + 1, bad + (not r["ok"])
        r = check_backward.check_lse_detection("cupy-bwd-fp32", case, "f32", seed=4)
        n, bad = n + 1, bad + (not r["ok"])
    cupy.cuda.Device().synchronize()
    print(f"sanitize launches: {n}, wrong results: {bad}")
    return 0 if bad == 0 else 1


def run_timing(old_b1, out, quick=False):
    import cupy
    import torch

    import flashkit
    from benchmarks.gpu_backward import FlashkitBackward, flops as bwd_flops, measure as measure_bwd, torch_backward
    from benchmarks.gpu_forward import flops as fwd_flops, free_all, measure, rung_call, sdpa_call
    from flashkit.gpu import backward, flash

    rows = []
    N = 4096
    for d in (64, 128):
        B, H = 16384 // N, 2048 // d
        for causal in (False, True):
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, do = (torch.randn(B, H, N, d, device="cuda", dtype=torch.float32, generator=gen) for _ in range(4))
            meta = dict(d=d, N=N, B=B, H=H, causal=causal, dtype="float32", direction="forward",
                        flops=fwd_flops(B, H, N, d, causal))
            print(f"forward d={d} causal={causal}", flush=True)
            measure("torch-efficient", sdpa_call("efficient", q, k, v, causal), rows, dict(meta, rung=None))
            for number in fwd_rungs():
                # TX = 16 only at 64 x 64 (at 64 x 32 it lost 3-10%: fwd-issue11-h200.json's sweep)
                blocks = ((flash.RUNGS[number].default_blocks[d],) if quick else
                          ((64, 64),) if number in (31, 33) else flash.RUNGS[number].allowed(d))
                for bl in blocks:
                    measure(f"{number} {flash.RUNGS[number].name} {bl[0]}x{bl[1]}",
                            rung_call(number, q, k, v, causal, "float32", block_size=bl), rows,
                            dict(meta, rung=number, block=list(bl)))
            Q, K, V = (cupy.from_dlpack(t) for t in (q, k, v))
            for backend in ("cupy-fp32-tile", "auto"):
                measure(f"flashkit.attention ({backend})",
                        (lambda b: lambda: flashkit.attention(Q, K, V, causal=causal, backend=b))(backend), rows,
                        dict(meta, rung=None, public=True, backend=backend))
            Q = K = V = None  # the views dropped, so that free_all can hand their memory back
            free_all()
            # backward
            meta = dict(meta, direction="backward", flops=bwd_flops(B, H, N, d, causal))
            print(f"backward d={d} causal={causal}", flush=True)
            for t in (q, k, v):
                t.requires_grad_(True)
            fn, _ = torch_backward("efficient", q, k, v, do, causal)
            measure_bwd("torch-efficient", fn, rows, dict(meta, rung=None))
            del fn
            free_all()
            fk = FlashkitBackward(q, k, v, do, causal, "float32")
            for name in bwd_rungs(old_b1):
                # the kernel before this change at its default only; 32 x 64 and 64 x 32 lost 18-27% (gpu-bwd-h200-history3.json)
                blocks = ((64, 64),) if quick or name == BWD_OLD else \
                    tuple(b for b in backward.RUNGS[name].allowed(d) if b in ((64, 64), (64, 128)))
                for bl in blocks:
                    measure_bwd(f"{name} {bl[0]}x{bl[1]}", fk.call(name, bl), rows, dict(meta, rung=name, block=list(bl)))
            for backend in ("cupy-bwd-fp32", "auto"):
                measure_bwd(f"flashkit.attention_backward ({backend})", fk.public(causal, backend), rows,
                            dict(meta, rung=None, public=True, backend=backend))
            del fk, q, k, v, do
            free_all()
    peers = {(r["direction"], r["d"], r["causal"]): r for r in rows if r["impl"] == "torch-efficient" and r.get("ms")}
    print("\n| direction | d | causal | impl | ms | TFLOP/s | x torch efficient |\n|---|---|---|---|---|---|---|")
    for r in rows:
        p = peers.get((r["direction"], r["d"], r["causal"]))
        if r.get("ms") and p:
            r["ratio"] = p["ms"] / r["ms"]
        print(f"| {r['direction']} | {r['d']} | {r['causal']} | {r['impl']} | {r.get('ms', float('nan')):.3f} | "
              f"{r.get('tflops', float('nan')):.1f} | {r.get('ratio', float('nan')):.3f} |", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--old-b1", help="the source of backward rung 1 before this change (timed beside it)")
    ap.add_argument("--mode", default="all", choices=("all", "check", "sanitize", "time"))
    ap.add_argument("--quick", action="store_true", help="time the default blocks only")
    ap.add_argument("--no-sanitize", action="store_true")
    ap.add_argument("--deadline", type=float, default=300.0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    register(args.old_b1)
    if args.mode == "check":
        return run_checks(args.old_b1, out)
    if args.mode == "sanitize":
        return run_sanitize(args.old_b1)
    if args.mode == "time":
        from benchmarks.gpu_forward import environment

        rows = run_timing(args.old_b1, out, args.quick)
        (out / "timing.json").write_text(json.dumps(dict(environment=environment(), rows=rows), indent=1, default=str))
        return 0
    t0 = time.time()
    me = [sys.executable, "-m", "benchmarks.gpu_fp32_steps", "--out", str(out)] + \
        (["--old-b1", args.old_b1] if args.old_b1 else [])
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    san = ["compute-sanitizer", "--error-exitcode", "1"]
    parallel = [("check", me + ["--mode", "check"])]
    if not args.no_sanitize:
        parallel += [("memcheck", san + ["--tool", "memcheck"] + me + ["--mode", "sanitize"]),
                     ("racecheck", san + ["--tool", "racecheck"] + me + ["--mode", "sanitize"])]
    steps = []
    procs = [(n, subprocess.Popen(c, stdout=(out / f"{n}.log").open("w"), stderr=subprocess.STDOUT, env=env), time.time())
             for n, c in parallel]
    for name, proc, started in procs:
        try:
            rc = proc.wait(timeout=max(1.0, 0.5 * args.deadline - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        steps.append(dict(step=name, rc=rc, seconds=round(time.time() - started, 1)))
        print(f"[{time.time() - t0:6.1f} s] {name}: rc={rc}\n" + (out / f"{name}.log").read_text(errors="replace")[-1500:],
              flush=True)
    left = args.deadline - (time.time() - t0)
    proc = subprocess.Popen(me + ["--mode", "time"] + (["--quick"] if args.quick else []),
                            stdout=(out / "time.log").open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        rc = proc.wait(timeout=max(5.0, left))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    steps.append(dict(step="time", rc=rc, seconds=round(time.time() - t0, 1)))
    print(f"[{time.time() - t0:6.1f} s] time: rc={rc}\n" + (out / "time.log").read_text(errors="replace")[-9000:], flush=True)
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").exists() else {}
    checks = json.loads((out / "check.json").read_text()) if (out / "check.json").exists() else []
    result = dict(commit=os.environ.get("FLASHKIT_COMMIT"), steps=steps, environment=timing.get("environment"),
                  timing=timing.get("rows"), checks=checks)
    (out / "fp32.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
