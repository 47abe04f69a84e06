"""Backward attention on one GPU: flashkit's backward rungs beside torch SDPA's backward backends, in one run.

    python -m benchmarks.gpu_backward [--json PATH] [--no-sweep] [--no-memory]

Shapes: B*N = 16384 tokens, H*d = 2048, N = 4096, d in {64, 128}, causal and not. float16 and
bfloat16: cupy-bwd-mma, cupy-bwd-mma-2kernel and (on a Hopper) cupy-bwd-wgmma beside torch's flash, cudnn and efficient backward;
float32: cupy-bwd-fp32 beside torch's efficient backward (the only torch fused fp32 backward).

What is timed is the backward alone, each rung called directly and, beside it, the same rung through the
public call `flashkit.attention_backward(..., backend=<rung>)` (impl "<rung> (public)": validation with its
NaN/Inf scan, the in-kernel lse check and its wait, the choice; `public_over_rung` is its time over the
rung's), and the public call with backend "auto". torch: the forward runs once under the backend (sdpa_kernel), then
`torch.autograd.grad(o, (q, k, v), do, retain_graph=True)` with a fixed dO is timed. flashkit: O and lse come
once from the forward rung 6 (fp16/bf16) or 3 (fp32), then `flashkit.gpu.backward.backward(...)` is timed:
its preprocessing kernel (D = rowsum(dO * O)), the main kernel(s) and, for the atomics rung, the dQ
conversion, into preallocated dQ, dK, dV. Every implementation reads the same input tensors (torch allocates
them; CuPy sees them through DLPack, bfloat16 as int16 bits). CUDA events, one warm-up call, the median of
3-30 calls (~0.25 s), as benchmarks.gpu_forward.

FLOPs = 2.5 x the forward's 4 B H Nq Nk d x the visible fraction (flashkit.masks.visible_fraction; about
one half causal): the five Nq x Nk x d products S, dP, dV, dK, dQ against the forward's two, as FlashAttention
counts them. TFLOP/s = FLOPs / median time. ratio = peer time / rung time (> 1: the rung is faster); the peer is
torch's flash backend for fp16/bf16 (the issue's goal) and its efficient backend for fp32; the ratio to cuDNN
is recorded beside it. Each rung's gradients are also compared with the peer's (relative Frobenius error).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flashkit.atomic import write_json

from flashkit.gpu.rungs import ELEMENTS as ELEMENT, kernels as table_rows

BACKWARD = table_rows("backward")  # the backward rungs of flashkit/gpu/rungs.py, ladder order
SPEC = {r.name: r for r in BACKWARD}  # (a driver may add pseudo-rungs here and to RUNGS: variants of a kernel)
TABLE = frozenset(SPEC)  # the table's rungs: those with a public backend
DTYPES = ("float16", "bfloat16", "float32")
RUNGS = {dt: tuple(r.name for r in BACKWARD if dt in r.dtypes) for dt in DTYPES}
PEERS = {"float16": ("flash", "cudnn", "efficient"), "bfloat16": ("flash", "cudnn", "efficient"), "float32": ("efficient",)}
PEER = {dt: next(r.peer for r in BACKWARD if dt in r.dtypes) for dt in DTYPES}  # the rungs' peer per dtype
FORWARD_RUNG = {"float16": 6, "bfloat16": 6, "float32": 3}


def flops(B, H, N, d, causal):
    """2.5 x 4 B H N^2 d x the visible fraction of the N x N score matrix."""
    from flashkit.gpu.backward import flops as bwd_flops
    from flashkit.masks import effective_window

    return bwd_flops(B, H, N, N, d, effective_window(causal, None))


def torch_backward(backend, q, k, v, do, causal):
    """(closure timing torch's backward alone for one SDPA backend, the forward's output)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
    with sdpa_kernel(which):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return (lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)), o


class FlashkitBackward:
    """O and lse from flashkit's forward once; then a closure running one backward rung into fixed outputs."""

    def __init__(self, q, k, v, do, causal, dtype):
        import cupy
        import torch

        from flashkit.gpu.flash import forward
        from flashkit.masks import effective_window

        as_cupy = (lambda t: cupy.from_dlpack(t.detach().view(torch.int16))) if dtype == "bfloat16" else \
            (lambda t: cupy.from_dlpack(t.detach()))
        self.Q, self.K, self.V, self.dO = (as_cupy(t) for t in (q, k, v, do))
        self.d = q.shape[-1]
        self.window = effective_window(causal, None)
        self.element = ELEMENT[dtype]
        self.O, self.lse = forward(FORWARD_RUNG[dtype], self.Q, self.K, self.V, scale=self.d ** -0.5,
                                   window=self.window, element=self.element)
        self.out = tuple(cupy.empty_like(x) for x in (self.Q, self.K, self.V))

    def call(self, rung, block_size=None):
        from flashkit.gpu.backward import backward

        dq, dk, dv = self.out
        return lambda: backward(rung, self.Q, self.K, self.V, self.O, self.dO, self.lse, scale=self.d ** -0.5,
                                window=self.window, element=self.element, block_size=block_size,
                                dq_out=dq, dk_out=dk, dv_out=dv)

    def public(self, causal, backend="auto"):
        """flashkit.attention_backward on the arrays a user holds (bfloat16 as CuPy '|V2', as DLPack gives it)."""
        import flashkit

        view = (lambda x: x.view("|V2")) if self.element == "bf16" else (lambda x: x)
        dO, Q, K, V, O = (view(x) for x in (self.dO, self.Q, self.K, self.V, self.O))
        return lambda: flashkit.attention_backward(dO, Q, K, V, O, self.lse, causal=causal, backend=backend)

    def grads_torch(self, dtype):
        """The last backward's dQ, dK, dV as float32 torch tensors."""
        import torch

        ts = [torch.from_dlpack(x) for x in self.out]
        if dtype == "bfloat16":
            ts = [t.view(torch.bfloat16) for t in ts]
        return [t.float() for t in ts]


def measure(label, fn, rows, meta):
    """benchmarks.gpu_forward.measure, with a launcher error (a block size a rung refuses, say) recorded, not raised."""
    from benchmarks.gpu_forward import measure as measure_fwd

    try:
        return measure_fwd(label, fn, rows, meta)
    except (ValueError, TypeError) as exc:
        rows.append(dict(meta, impl=label, status=f"error: {str(exc).splitlines()[0][:160]}"))
        print(f"  {label:<22} {rows[-1]['status'][:80]}", flush=True)
        return rows[-1]


def rel_errs(ours, theirs):
    return {name: float((a - b.float()).norm() / b.float().norm().clamp_min(1e-30))
            for name, a, b in zip(("dq", "dk", "dv"), ours, theirs)}


def run_grid(Ns=(4096,), ds=(64, 128), dtypes=DTYPES):
    import torch

    from benchmarks.gpu_forward import free_all

    rows = []
    for d, N in ((d, N) for d in ds for N in Ns):
        B, H = 16384 // N, 2048 // d
        for causal in (False, True):
            for dtype in dtypes:
                tdt = getattr(torch, dtype)
                gen = torch.Generator(device="cuda").manual_seed(0)
                q, k, v, do = (torch.randn(B, H, N, d, device="cuda", dtype=tdt, generator=gen) for _ in range(4))
                for t in (q, k, v):
                    t.requires_grad_(True)
                meta = dict(d=d, N=N, B=B, H=H, causal=causal, dtype=dtype, flops=flops(B, H, N, d, causal),
                            direction="backward")
                print(f"d={d} N={N} B={B} H={H} causal={causal} {dtype}", flush=True)
                peer_grads = {}
                for p in PEERS[dtype]:
                    try:
                        fn, _ = torch_backward(p, q, k, v, do, causal)
                    except RuntimeError as exc:  # a backend that does not support this input
                        rows.append(dict(meta, impl=f"torch-{p}", rung=None, status=f"unsupported: {str(exc).splitlines()[0][:160]}"))
                        continue
                    measure(f"torch-{p}", fn, rows, dict(meta, rung=None))
                    if p == PEER[dtype] and rows[-1]["status"] == "ok":
                        peer_grads = [g.float() for g in fn()]
                    del fn
                    free_all()
                fk = FlashkitBackward(q, k, v, do, causal, dtype)
                for r in RUNGS[dtype]:
                    if not SPEC[r].backend().available:  # cupy-bwd-wgmma on a GPU that is not a Hopper
                        continue
                    row = measure(r, fk.call(r), rows, dict(meta, rung=r))
                    if row["status"] == "ok" and peer_grads:
                        fk.call(r)()
                        row["rel_err_vs_peer"] = rel_errs(fk.grads_torch(dtype), peer_grads)
                        print(f"    rel. error vs torch-{PEER[dtype]}: " +
                              ", ".join(f"{k_} {v_:.1e}" for k_, v_ in row["rel_err_vs_peer"].items()), flush=True)
                    # the same rung through the public call: validation, the NaN/Inf scan, the lse check, the choice
                    if r in TABLE:  # a pseudo-rung of one process (benchmarks/gpu_backward_hopper.py) has no backend
                        measure(f"{r} (public)", fk.public(causal, r), rows, dict(meta, rung=r, public=True, backend=r))
                # What "auto" gives a user
                measure("flashkit.attention_backward", fk.public(causal), rows,
                        dict(meta, rung=None, public=True, backend="auto"))
                del fk, q, k, v, do, peer_grads
                free_all()
    return rows


def add_ratios(rows):
    """As benchmarks.gpu_forward.add_ratios: `ratio_fastest` (against the fastest torch backward of the same
    shape and dtype, `fastest_peer`), `ratio_flash`, `ratio` against the rungs' peer and `ratio_cudnn`;
    `public_over_rung` for a public row."""
    def key(r):
        return (r["d"], r["N"], r["causal"], r["dtype"])
    torch_rows = {(key(r), r["impl"]): r for r in rows if r["impl"].startswith("torch-") and r["status"] == "ok"}
    fastest = {}
    for (k, _), p in torch_rows.items():
        if k not in fastest or p["ms"] < fastest[k]["ms"]:
            fastest[k] = p
    alone = {(key(r), r["rung"]): r for r in rows if r.get("rung") and not r.get("public") and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok" or r["impl"].startswith("torch-"):
            continue
        p = torch_rows.get((key(r), f"torch-{PEER[r['dtype']]}"))
        if p is not None:
            r["peer"], r["ratio"] = p["impl"], p["ms"] / r["ms"]
        for name, field in (("torch-cudnn", "ratio_cudnn"), ("torch-flash", "ratio_flash")):
            c = torch_rows.get((key(r), name))
            if c is not None:
                r[field] = c["ms"] / r["ms"]
        f = fastest.get(key(r))
        if f is not None:
            r["fastest_peer"], r["ratio_fastest"] = f["impl"], f["ms"] / r["ms"]
        a = alone.get((key(r), r.get("rung")))
        if r.get("public") and a is not None:
            r["public_over_rung"] = r["ms"] / a["ms"]


def block_sweep(N=4096, dtypes=("float16", "float32")):
    """Every allowed (Br, Bc) of each rung at N = 4096, fp16 (fp32 for the fp32 rung), non-causal."""
    import torch

    from benchmarks.gpu_forward import free_all
    from flashkit.gpu.backward import RUNGS as SPECS

    rows = []
    for d in (64, 128):
        B, H = 16384 // N, 2048 // d
        for dtype in dtypes:
            for causal in (False,):
                gen = torch.Generator(device="cuda").manual_seed(1)
                q, k, v, do = (torch.randn(B, H, N, d, device="cuda", dtype=getattr(torch, dtype), generator=gen)
                               for _ in range(4))
                fk = FlashkitBackward(q, k, v, do, causal, dtype)
                meta = dict(d=d, N=N, B=B, H=H, causal=causal, dtype=dtype, flops=flops(B, H, N, d, causal),
                            direction="backward")
                print(f"sweep d={d} N={N} causal={causal} {dtype}", flush=True)
                for r in RUNGS[dtype]:
                    if not SPECS[r].backend().available:
                        continue
                    for bs in SPECS[r].allowed(d):
                        measure(f"{r}{bs}", fk.call(r, bs), rows, dict(meta, rung=r, block_size=list(bs)))
                del fk, q, k, v, do
                free_all()
    return rows


def memory_rows():
    """Extra GPU memory of one backward call beyond inputs and gradients (B=1, H=16, d=128, fp16)."""
    import cupy
    import torch

    from benchmarks.gpu_forward import free_all

    pool = cupy.get_default_memory_pool()
    rows = []
    B, H, d = 1, 16, 128
    for N in (16384, 65536):
        gen = torch.Generator(device="cuda").manual_seed(2)
        q, k, v, do = (torch.randn(B, H, N, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(4))
        fk = FlashkitBackward(q, k, v, do, False, "float16")
        for r in RUNGS["float16"]:
            if not SPEC[r].backend().available:
                continue
            free_all()
            before = pool.total_bytes()
            row = dict(impl=r, N=N, B=B, H=H, d=d, dtype="float16",
                       analytic_standard_bytes=4 * B * H * N * N)  # one float32 P matrix per head
            try:
                fk.call(r)()
                torch.cuda.synchronize()
                row.update(status="ok", extra_bytes=pool.total_bytes() - before)
            except cupy.cuda.memory.OutOfMemoryError as exc:
                row.update(status=f"out of memory: {str(exc).splitlines()[0][:120]}")
            rows.append(row)
            print(f"  memory N={N} {r:<22} {row.get('extra_bytes', row['status'])}", flush=True)
        del fk, q, k, v, do
        free_all()
    return rows


def print_table(rows):
    print(f"\n{'d':>4} {'N':>6} {'causal':>6} {'dtype':>9} {'impl':<34} {'ms':>9} {'TFLOP/s':>8} {'ratio':>6} {'cudnn':>6}  peer")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['d']:>4} {r['N']:>6} {str(r['causal']):>6} {r['dtype']:>9} {r['impl']:<34} {r['status'][:50]}")
            continue
        ratio = f"{r['ratio']:6.2f}" if "ratio" in r else "      "
        rc = f"{r['ratio_cudnn']:6.2f}" if "ratio_cudnn" in r else "      "
        print(f"{r['d']:>4} {r['N']:>6} {str(r['causal']):>6} {r['dtype']:>9} {r['impl']:<34} {r['ms']:9.3f} "
              f"{r['tflops']:8.1f} {ratio} {rc}  {r.get('peer', '')}")


def markdown_table(result):
    """The rungs and peers as a markdown table (for NOTES-gpu.md), every number read from `result`."""
    lines = ["| d | causal | dtype | impl | ms | TFLOP/s | ratio to peer | peer | ratio to cuDNN |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        if r["status"] != "ok":
            continue
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        rc = f"{r['ratio_cudnn']:.2f}" if "ratio_cudnn" in r else ""
        lines.append(f"| {r['d']} | {r['causal']} | {r['dtype']} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
                     f"{ratio} | {r.get('peer', '')} | {rc} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="where to write the results (default benchmarks/results/gpu-bwd-<card>.json)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--sweep-dtypes", default="float16,float32", help="dtypes of the block sweep (comma-separated)")
    ap.add_argument("--Ns", default="4096", help="comma-separated sequence lengths (default 4096)")
    ap.add_argument("--ds", default="64,128", help="comma-separated head sizes (default 64,128)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes")
    ap.add_argument("--table-from", help="print the markdown table of a results JSON (no GPU needed) and exit")
    args = ap.parse_args(argv)
    if args.table_from:
        import json

        print(markdown_table(json.loads(Path(args.table_from).read_text())))
        return 0

    from benchmarks.gpu_forward import card_slug, ceilings_of_this_run, environment

    env = environment()
    print(env, flush=True)
    roof = ceilings_of_this_run()
    rows = run_grid(tuple(int(n) for n in args.Ns.split(",")), tuple(int(x) for x in args.ds.split(",")),
                    tuple(args.dtypes.split(",")))
    add_ratios(rows)
    print_table(rows)
    sweep = [] if args.no_sweep else block_sweep(dtypes=tuple(args.sweep_dtypes.split(",")))
    mem = [] if args.no_memory else memory_rows()
    from flashkit.gpu.backward import COMPILE_SECONDS

    result = dict(env, recorded="measured by benchmarks/gpu_backward.py; shown elsewhere as recorded, not live",
                  flops="2.5 x 4 B H Nq Nk d x visible fraction", ceilings=roof, results=rows, block_sweep=sweep, memory=mem,
                  compile_seconds_this_process=[dict(rung=k[0], d=k[1], element=k[2], Br=k[3], Bc=k[4], seconds=v)
                                                for k, v in COMPILE_SECONDS.items()])
    path = Path(args.json) if args.json else Path(__file__).parent / "results" / f"gpu-bwd-{card_slug(env['card'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)  # atomic: a crash never leaves half a results file
    if sweep:
        print_table(sweep)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
