"""Forward attention on one GPU: every flashkit rung beside torch's scaled_dot_product_attention backends.

    python -m benchmarks.gpu_forward [--quick] [--Ns 4096,16384] [--rungs 3,7,8] [--peers flash,cudnn] [--json PATH]

Shapes: B*N = 16384 tokens, H*d = 2048, d in {64, 128}, N in {1024, 4096, 16384}, causal and not;
float16 and bfloat16 for the tensor-core rungs, float32 for the fp32 rungs. Every implementation reads
the same input tensors (torch allocates them; CuPy sees them through DLPack, bfloat16 as int16 bits).

Every rung is timed twice: called directly (flashkit.gpu.flash.forward, the ladder: the kernel) and through
the public call `flashkit.attention(q, k, v, backend=<rung>)` (what users get: validation with its NaN/Inf
scan, the choice, the launch; impl "<rung> (public)", `public_over_rung` = its time over the rung's), and
`flashkit.attention` with backend "auto". Each flashkit row gets `ratio_fastest`, the fastest torch
backend's time over its own (cuDNN where it runs), `ratio_flash` (torch flash's) beside it, and `ratio`
against the rung's own peer.

Timing: flashkit.measure.timing.stream_time: CUDA events around up to 20 calls issued back to back on the
default stream (torch and CuPy share it), as a training loop issues them, so a call's host work overlaps
the previous call's kernel; 3 rounds after a warm-up call (NVRTC compile and cuBLAS/cuDNN handle creation
stay out), the median round's time per call reported.
FLOPs = 4 * B * H * N^2 * d, times the visible fraction when causal (N(N+1)/2 / N^2 = about one half).
TFLOP/s = FLOPs / median time. Ratios compare each rung with the torch backend it is aimed at, its `peer`
in flashkit/gpu/rungs.py: rung 1 -> math (same dtype), rungs 2-3 -> efficient (float32), rungs 4-6 -> flash,
rung 7 (Hopper only, timed only where its probe passes) -> cudnn, rung 8 (TF32, called with precision="tf32"
through the public call) -> efficient (float32).
Rung 7 is also timed with 192 x 128 blocks ("cupy-wgmma-192x128") in every cell. float32 rows of rungs 3 and 8
(TF32) and torch's efficient backend carry `max_rel_err_head0`: max|O - O_64| / max|O_64| on batch 0, head 0
against float64 attention of the same inputs, the error beside the speed.
Memory: extra GPU bytes beyond inputs at B=1, H=16, d=128, fp16, N = 16384 and 65536 (CuPy pool for the
flashkit rungs, torch.cuda.max_memory_allocated for torch's flash backend).
Ceilings: the card's GEMM TFLOP/s (float16, bfloat16, float32; 8192^3) and device copy bandwidth, measured
first in the same run (flashkit.measure.ceilings) and written as `ceilings` with the rows: notebook 07's
roofline and the table's "of GEMM ceiling" column read them from the results file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flashkit.atomic import write_json
from flashkit.gpu.rungs import ELEMENTS, RUNGS, rung
from flashkit.measure.timing import stream_time

FORWARD = tuple(r for r in RUNGS if r.direction == "forward")  # the rungs this script times, ladder order
TORCH_BACKENDS = ("flash", "efficient", "cudnn", "math")


def flops(B, H, N, d, causal):
    """4 B H N^2 d, times (N + 1) / (2N) when causal: flashkit.problem.flops of the N x N problem."""
    from flashkit.problem import flops as attention_flops

    return attention_flops(B, H, N, N, d, (-1, 0) if causal else (-1, -1))


def free_all():
    import cupy
    import torch

    torch.cuda.synchronize()
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def sdpa_call(backend, q, k, v, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def run():
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def rung_call(number, q, k, v, causal, dtype, block_size=None):
    """A closure running flashkit rung `number` on torch tensors q, k, v (shared with CuPy, no copy)."""
    import cupy
    import torch

    from flashkit.gpu.flash import forward
    from flashkit.masks import effective_window

    d = q.shape[-1]
    as_cupy = (lambda t: cupy.from_dlpack(t.view(torch.int16))) if dtype == "bfloat16" else cupy.from_dlpack
    Q, K, V = (as_cupy(t) for t in (q, k, v))
    window = effective_window(causal, None)
    if number == 1:
        from flashkit.gpu.standard import standard_attention
        from flashkit.problem import Problem

        if dtype == "bfloat16":
            return None  # CuPy has no bfloat16 arithmetic for the standard path: not measured
        pb = Problem(Q=Q, K=K, V=V, scale=d ** -0.5, causal=causal, window=window, mask=None, block_size=None, xp=cupy)
        return lambda: standard_attention(pb)
    return lambda: forward(number, Q, K, V, scale=d ** -0.5, window=window, element=ELEMENTS[dtype], block_size=block_size)


def measure(label, fn, rows, meta):
    import cupy
    import torch

    row = dict(meta, impl=label)
    if fn is None:
        row.update(status="not applicable")
    else:
        try:
            t = stream_time(fn, calls=20, rounds=3, budget_s=0.3)
            ms, reps = t["median_s"] * 1e3, t["calls"] * len(t["rounds_s"])
            row.update(status="ok", ms=ms, reps=reps, tflops=meta["flops"] / (ms * 1e-3) / 1e12)
        except (torch.cuda.OutOfMemoryError, cupy.cuda.memory.OutOfMemoryError) as exc:
            row.update(status=f"out of memory: {str(exc).splitlines()[0][:120]}")
        except RuntimeError as exc:  # an SDPA backend that does not support this input
            row.update(status=f"unsupported: {str(exc).splitlines()[0][:160]}")
    rows.append(row)
    free_all()
    shown = f"{row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s" if row["status"] == "ok" else row["status"][:60]
    print(f"  {label:<22} {shown}", flush=True)
    return row


def public_call(name, q, k, v, causal):
    """flashkit.attention on the CuPy arrays a user holds (bfloat16 from torch through DLPack: '|V2'); a TF32
    rung is asked for by its precision, as a user asks for it."""
    import cupy

    import flashkit

    precision = rung(name).precision if name != "auto" else "exact"
    Qc, Kc, Vc = (cupy.from_dlpack(t) for t in (q, k, v))
    return lambda: flashkit.attention(Qc, Kc, Vc, causal=causal, backend=name, precision=precision)


def head0_error(out, q, k, v, causal):
    """max|O - O_64| / max|O_64| on batch 0, head 0 of one call's output (a CuPy array, a torch tensor, or
    a rung's (O, lse)), against float64 attention of the same inputs."""
    import cupy

    O = out[0] if isinstance(out, tuple) else out
    O = cupy.from_dlpack(O) if not isinstance(O, cupy.ndarray) else O
    q0, k0, v0 = (cupy.from_dlpack(t)[0, 0].astype(cupy.float64) for t in (q, k, v))
    S = q0 @ k0.T * q0.shape[-1] ** -0.5
    if causal:
        n = S.shape[0]
        S = cupy.where(cupy.tri(n, n, dtype=bool), S, -cupy.inf)
    P = cupy.exp(S - S.max(axis=-1, keepdims=True))
    O64 = (P / P.sum(axis=-1, keepdims=True)) @ v0
    return float(cupy.abs(O[0, 0].astype(cupy.float64) - O64).max() / cupy.abs(O64).max())


def run_grid(Ns=(1024, 4096, 16384), ds=(64, 128), dtypes=("float16", "bfloat16", "float32"), only=None,
             peers_of=None):
    """Every cell; `only` (rung numbers) limits the flashkit rungs timed, `peers_of` (dtype -> torch
    backends) the torch ones."""
    import torch

    rows = []
    for d in ds:
        for N in Ns:
            B, H = 16384 // N, 2048 // d
            for causal in (False, True):
                for dtype in dtypes:
                    tdt = getattr(torch, dtype)
                    gen = torch.Generator(device="cuda").manual_seed(0)
                    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=tdt, generator=gen) for _ in range(3))
                    meta = dict(d=d, N=N, B=B, H=H, causal=causal, dtype=dtype, flops=flops(B, H, N, d, causal))
                    print(f"d={d} N={N} B={B} H={H} causal={causal} {dtype}", flush=True)
                    peers = (peers_of or {"float16": TORCH_BACKENDS, "bfloat16": ("flash", "cudnn"),
                                          "float32": ("efficient", "math")})[dtype]
                    for spec in FORWARD:
                        if not spec.backend().available:  # rung 7 on a GPU that is not a Hopper
                            continue
                        if only is not None and spec.number not in only:
                            continue
                        call = rung_call(spec.number, q, k, v, causal, dtype) if dtype in spec.dtypes else None
                        if call is None:  # the rung does not compute this dtype here
                            continue
                        measure(spec.name, call, rows, dict(meta, rung=spec.number))
                        if dtype == "float32" and spec.number in (3, 8):
                            rows[-1]["max_rel_err_head0"] = head0_error(call(), q, k, v, causal)
                        # the same rung through the public call (validation, NaN/Inf scan, choice, launch)
                        if spec.number != 1 or dtype != "bfloat16":
                            measure(f"{spec.name} (public)", public_call(spec.name, q, k, v, causal), rows,
                                    dict(meta, rung=spec.number, public=True, backend=spec.name))
                        if spec.number == 7:  # the larger block in every cell (the header's open question)
                            measure("cupy-wgmma-192x128", rung_call(7, q, k, v, causal, dtype, (192, 128)), rows,
                                    dict(meta, rung=7, block_size=[192, 128]))
                    # What "auto" gives a user: flashkit.attention on CuPy arrays, validation included.
                    measure("flashkit.attention", public_call("auto", q, k, v, causal), rows,
                            dict(meta, rung=None, public=True, backend="auto"))
                    for p in peers:
                        measure(f"torch-{p}", sdpa_call(p, q, k, v, causal), rows, dict(meta, rung=None))
                        if dtype == "float32" and p == "efficient" and rows[-1]["status"] == "ok":
                            rows[-1]["max_rel_err_head0"] = head0_error(sdpa_call(p, q, k, v, causal)(), q, k, v, causal)
                    del q, k, v
                    free_all()
    return rows


def add_ratios(rows):
    """Ratios of a flashkit row against torch in the same row group (same shape and dtype; > 1: flashkit
    faster): `ratio_fastest` against the fastest torch backend (`fastest_peer`, cuDNN where it runs),
    `ratio_flash` against torch flash, `ratio` against the rung's own `peer` (rungs.py); a public row also
    gets `public_over_rung`, its time over the rung called directly."""
    def key(r):
        return r["d"], r["N"], r["causal"], r["dtype"]

    peers = {(key(r), r["impl"]): r for r in rows if r["impl"].startswith("torch-") and r["status"] == "ok"}
    fastest = {}
    for (k, _), p in peers.items():
        if k not in fastest or p["ms"] < fastest[k]["ms"]:
            fastest[k] = p
    alone = {(key(r), r["rung"]): r for r in rows
             if r.get("rung") and not r.get("public") and not r.get("block_size") and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok" or r["impl"].startswith("torch-"):
            continue
        f = fastest.get(key(r))
        if f is not None:
            r["fastest_peer"], r["ratio_fastest"] = f["impl"], f["ms"] / r["ms"]
        flash = peers.get((key(r), "torch-flash"))
        if flash is not None:
            r["ratio_flash"] = flash["ms"] / r["ms"]
        peer = f"torch-{rung(r['rung']).peer}" if r.get("rung") else "torch-flash"
        p = peers.get((key(r), peer))
        if p is not None:
            r["peer"], r["ratio"] = p["impl"], p["ms"] / r["ms"]
        a = alone.get((key(r), r.get("rung")))
        if r.get("public") and a is not None:
            r["public_over_rung"] = r["ms"] / a["ms"]


# Variants of a rung's source, registered in this process only for the sweep: (pseudo-rung number, name,
# rung, defines put before the source). Rung 3 with 16 threads per row group (8 rows of S per thread,
# twice rung 3's default register block along the rows).
VARIANTS = ((31, "cupy-fp32-tile-tx16", 3, "#define TX 16\n"),)


def register_variants():
    import tempfile
    from dataclasses import replace

    from flashkit.gpu import flash

    for number, name, base, defines in VARIANTS:
        spec = rung(base)
        path = Path(tempfile.gettempdir()) / f"variant_{number}_{spec.source}"
        path.write_text(defines + (flash.KERNEL_DIR / spec.source).read_text())
        flash.RUNGS[number] = replace(spec, number=number, name=name, source=str(path))


def block_sweep(only=None):
    """Every allowed (Br, Bc) of rung 5 (fp16) and rung 3 (fp32), and of rung 3's VARIANTS, at N=4096:
    evidence for the defaults. `only`: the rung numbers to sweep."""
    import torch

    register_variants()
    rows = []
    N = 4096
    sweeps = [(5, "float16", (5,)), (3, "float32", (3,) + tuple(n for n, _, base, _ in VARIANTS if base == 3))]
    for number, dtype, numbers in sweeps:
        if only is not None and number not in only:
            continue
        spec = rung(number)
        for d in (64, 128):
            B, H = 16384 // N, 2048 // d
            for causal in (False, True):
                gen = torch.Generator(device="cuda").manual_seed(1)
                q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=getattr(torch, dtype), generator=gen) for _ in range(3))
                meta = dict(d=d, N=N, B=B, H=H, causal=causal, dtype=dtype, flops=flops(B, H, N, d, causal),
                            rung=spec.number)
                print(f"sweep rung {spec.number}: d={d} N={N} causal={causal} {dtype}", flush=True)
                for n in numbers:
                    name = next((v[1] for v in VARIANTS if v[0] == n), spec.name)
                    for bs in spec.allowed(d):
                        measure(f"{name}{bs}", rung_call(n, q, k, v, causal, dtype, bs), rows,
                                dict(meta, block_size=list(bs), variant=name))
                del q, k, v
    return rows


def memory_rows():
    """Extra GPU memory of one forward call beyond the inputs and the output (B=1, H=16, d=128, fp16)."""
    import cupy
    import torch

    pool = cupy.get_default_memory_pool()
    rows = []
    B, H, d = 1, 16, 128
    for N in (16384, 65536):
        gen = torch.Generator(device="cuda").manual_seed(2)
        q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3))
        out_bytes = q.numel() * 2 + B * H * N * 4  # O (fp16) + lse (fp32)
        analytic_standard = 4 * B * H * N * N  # one float32 S/P matrix per head
        for spec in (rung(1), rung(4), rung(5)):
            label = spec.name
            free_all()
            before = pool.total_bytes()
            row = dict(impl=label, N=N, B=B, H=H, d=d, dtype="float16", out_bytes=out_bytes,
                       analytic_standard_bytes=analytic_standard)
            try:
                res = rung_call(spec.number, q, k, v, False, "float16")()
                torch.cuda.synchronize()
                row.update(status="ok", extra_bytes=pool.total_bytes() - before, extra_beyond_output=pool.total_bytes() - before - out_bytes)
                del res
            except cupy.cuda.memory.OutOfMemoryError as exc:
                row.update(status=f"out of memory: {str(exc).splitlines()[0][:120]}")
            rows.append(row)
            print(f"  memory N={N} {label:<16} {row.get('extra_bytes', row['status'])}", flush=True)
        free_all()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        row = dict(impl="torch-flash", N=N, B=B, H=H, d=d, dtype="float16", out_bytes=out_bytes)
        try:
            res = sdpa_call("flash", q, k, v, False)()
            torch.cuda.synchronize()
            row.update(status="ok", extra_bytes=torch.cuda.max_memory_allocated() - base)
            del res
        except RuntimeError as exc:
            row.update(status=f"error: {str(exc).splitlines()[0][:120]}")
        rows.append(row)
        print(f"  memory N={N} torch-flash      {row.get('extra_bytes', row['status'])}", flush=True)
        del q, k, v
        free_all()
    return rows


def environment():
    """The card and versions (flashkit.measure.provenance), torch's version, the commit and the date."""
    import torch

    from flashkit.measure import provenance

    c = provenance.commit()
    return dict(provenance.gpu_info(), torch=torch.__version__, python=provenance.versions()["python"],
                commit=c["commit"], dirty=c["dirty"], load_average=provenance.load_average(),
                date=provenance.now_utc())


def card_slug(card):
    s = "".join(c if c.isalnum() else "-" for c in card.lower()).replace("nvidia-", "")
    while "--" in s:
        s = s.replace("--", "-")
    return s.strip("-")


def print_table(rows):
    print(f"\n{'d':>4} {'N':>6} {'causal':>6} {'dtype':>9} {'impl':<22} {'ms':>9} {'TFLOP/s':>8} {'ratio':>6}  peer")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['d']:>4} {r['N']:>6} {str(r['causal']):>6} {r['dtype']:>9} {r['impl']:<22} {r['status'][:50]}")
            continue
        ratio = f"{r['ratio']:6.2f}" if "ratio" in r else "      "
        print(f"{r['d']:>4} {r['N']:>6} {str(r['causal']):>6} {r['dtype']:>9} {r['impl']:<22} {r['ms']:9.3f} "
              f"{r['tflops']:8.1f} {ratio}  {r.get('peer', '')}")


def ceilings_of_this_run():
    """The card's GEMM ceilings (float16 and float32 with CuPy, bfloat16 with torch, which CuPy lacks) and
    its copy bandwidth, measured now (flashkit.measure.ceilings): the roofline of this run's rows."""
    import torch

    from flashkit.measure import ceilings

    def bfloat16_gemm(n):
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty_like(a)  # allocated once, outside the timed calls
        return ceilings.time_gemm(lambda: torch.matmul(a, b, out=c), n)

    roof = ceilings.measure()
    n = roof["gemm_n"]
    roof["gemm_tflops"]["bfloat16"] = bfloat16_gemm(n)
    free_all()
    print("ceilings: " + ", ".join(f"{dt} GEMM {v:.0f}" for dt, v in roof["gemm_tflops"].items())
          + f" TFLOP/s, copy {roof['bandwidth_tbps']:.2f} TB/s", flush=True)
    return dict(gemm_tflops=roof["gemm_tflops"], bandwidth_tbps=roof["bandwidth_tbps"], gemm_n=n,
                copy_bytes=roof["copy_bytes"],
                source=f"measured in this run: {n}^3 GEMM (CuPy; bfloat16 with torch.matmul) and a "
                       f"{roof['copy_bytes'] // 2**20} MiB device copy, medians of CUDA-event timings "
                       "(flashkit.measure.ceilings)")


def markdown_table(result, N=4096):
    """The rungs at one N as a markdown table (for NOTES-gpu.md), every number read from `result`
    (the GEMM ceilings too: blank where the file records none)."""
    peaks = (result.get("ceilings") or {}).get("gemm_tflops", {})
    lines = ["| rung | d | causal | dtype | ms | TFLOP/s | ratio | peer | of GEMM ceiling |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        if r["N"] != N or r["status"] != "ok" or not r.get("rung"):
            continue
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        of_peak = f"{r['tflops'] / peaks[r['dtype']]:.0%}" if r["dtype"] in peaks else ""
        lines.append(f"| {r['rung']} {r['impl']} | {r['d']} | {r['causal']} | {r['dtype']} | {r['ms']:.3f} | "
                     f"{r['tflops']:.1f} | {ratio} | {r.get('peer', '')} | {of_peak} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N in {1024, 4096} only")
    ap.add_argument("--Ns", help="comma-separated sequence lengths (default 1024,4096,16384)")
    ap.add_argument("--ds", default="64,128", help="comma-separated head sizes (default 64,128)")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32", help="comma-separated dtypes")
    ap.add_argument("--json", help="where to write the results (default benchmarks/results/gpu-<card>.json)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--only-sweep", action="store_true", help="the block sweep alone (no grid, no memory rows)")
    ap.add_argument("--rungs", help="comma-separated forward rung numbers to time (default: all)")
    ap.add_argument("--peers", help="comma-separated torch backends to time (default: all that apply)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--table-from", help="print the markdown table of a results JSON (no GPU needed) and exit")
    ap.add_argument("--N", type=int, default=4096, help="with --table-from: which N")
    args = ap.parse_args(argv)
    if args.table_from:
        print(markdown_table(json.loads(Path(args.table_from).read_text()), args.N))
        return 0

    env = environment()
    print(env, flush=True)
    roof = None if args.only_sweep else ceilings_of_this_run()
    Ns = tuple(int(n) for n in args.Ns.split(",")) if args.Ns else (1024, 4096) if args.quick else (1024, 4096, 16384)
    only = {int(x) for x in args.rungs.split(",")} if args.rungs else None
    peers_of = None
    if args.peers:
        wanted = args.peers.split(",")
        peers_of = {"float16": tuple(p for p in TORCH_BACKENDS if p in wanted),
                    "bfloat16": tuple(p for p in ("flash", "cudnn") if p in wanted),
                    "float32": tuple(p for p in ("efficient", "math") if p in wanted)}
    rows = [] if args.only_sweep else run_grid(Ns, tuple(int(x) for x in args.ds.split(",")),
                                               tuple(args.dtypes.split(",")), only, peers_of)
    add_ratios(rows)
    sweep = [] if args.no_sweep else block_sweep(only)
    mem = [] if args.no_memory else memory_rows()
    from flashkit.gpu.flash import COMPILE_SECONDS

    result = dict(env, recorded="measured by benchmarks/gpu_forward.py; shown elsewhere as recorded, not live",
                  ceilings=roof, results=rows, block_sweep=sweep, memory=mem,
                  compile_seconds_this_process=[dict(rung=k[0], d=k[1], element=k[2], Br=k[3], Bc=k[4], seconds=v)
                                                for k, v in COMPILE_SECONDS.items()])
    path = Path(args.json) if args.json else Path(__file__).parent / "results" / f"gpu-{card_slug(env['card'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)  # atomic: a crash never leaves half a results file
    print_table(rows)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
