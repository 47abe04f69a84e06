"""What the public call costs beyond its kernel on the GPU, piece by piece (issue: the public call at kernel speed).

    python -m benchmarks.gpu_overhead [--json PATH] [--quick]

Forward: fp16 and bf16 (from torch through DLPack), B*N = 16384, H*d = 2048, N in {2048, 4096}, d in
{64, 128}, causal and not. The baseline is the rung "auto" picks for the call (rung 7 on a Hopper) called
alone (flashkit.gpu.flash.run on a validated Problem), beside: flashkit.attention (what users call: the
NaN/Inf check of q, k, v inside rung 7's kernel, flashkit/gpu/kernels/input_check.cuh), the same with the
separate scan on a side stream (flashkit.finite.separate_scan(), the way before), the same with
check_finite=False, and rung 6 alone and public (rung 6 always uses the separate scan). Timing: flashkit.measure.timing.stream_time (calls back to
back, as a training loop issues them), the pieces in interleaved rounds (--rounds, 5): per piece the median
of its rounds, per ratio the median of the rounds' own ratios. Then, at d=64, N=4096, the pieces of the
difference: validate.check, the scan alone (start + wait), registry.choose; and the backward (the rung
alone, with its in-kernel lse check reported and waited for, attention_backward, validate.check_backward).
Results: benchmarks/results/gpu-overhead-<card>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path


def event_ms(fn, n=30):
    import cupy

    fn()
    cupy.cuda.Device().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="N = 4096 only")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape (medians reported)")
    args = ap.parse_args(argv)

    import cupy
    import torch

    import flashkit
    from benchmarks.gpu_forward import card_slug, environment
    from flashkit import finite, registry, validate
    from flashkit.atomic import write_json
    from flashkit.gpu import backward, flash
    from flashkit.measure.timing import stream_time

    rows, ratios = [], []  # ratios: a public call's time over its rung's, per shape (kept apart: rows all have ms)

    def timed(fn):
        return stream_time(fn, calls=20, rounds=1, budget_s=0.15)["median_s"] * 1e3

    for d in (64, 128):
        for N in ((4096,) if args.quick else (2048, 4096)):
            B, H = 16384 // N, 2048 // d
            for causal in (False, True):
                for dtype in ("float16", "bfloat16"):
                    gen = torch.Generator(device="cuda").manual_seed(0)
                    ts = [torch.randn(B, H, N, d, device="cuda", dtype=getattr(torch, dtype), generator=gen) for _ in range(3)]
                    q, k, v = (cupy.from_dlpack(t) for t in ts)
                    p = validate.check(q, k, v, causal=causal)
                    auto = registry.choose(p, "auto").rung

                    def public(**kw):
                        return lambda: flashkit.attention(q, k, v, causal=causal, **kw)

                    def public_separate_scan():
                        with finite.separate_scan():
                            return flashkit.attention(q, k, v, causal=causal)

                    pieces = {
                        "auto's rung alone": lambda: flash.run(auto, p),
                        "flashkit.attention": public(),
                        "flashkit.attention (separate scan)": public_separate_scan,
                        "flashkit.attention(check_finite=False)": public(check_finite=False),
                        "rung 6 alone": lambda: flash.run(6, p),
                        "flashkit.attention(backend=cupy-mma-2tile)": public(backend="cupy-mma-2tile"),
                    }
                    meta = dict(dtype=dtype, B=B, N=N, H=H, d=d, causal=causal, auto_rung=auto)
                    # interleaved rounds: the GPU's clocks drift over a run by more than the few percent looked for
                    rounds = [{name: timed(fn) for name, fn in pieces.items()} for _ in range(args.rounds)]
                    by = {name: statistics.median(r[name] for r in rounds) for name in pieces}
                    for name in pieces:
                        rows.append(dict(meta, what=name, ms=by[name], rounds_ms=[r[name] for r in rounds]))
                    pairs = (("flashkit.attention", "auto's rung alone"),
                             ("flashkit.attention (separate scan)", "auto's rung alone"),
                             ("flashkit.attention(check_finite=False)", "auto's rung alone"),
                             ("flashkit.attention(backend=cupy-mma-2tile)", "rung 6 alone"))
                    for public_name, alone in pairs:  # the median of the rounds' own ratios
                        ratios.append(dict(meta, what=f"{public_name} / {alone}",
                                           ratio=statistics.median(r[public_name] / r[alone] for r in rounds)))
                    ratio = {(p_, a_): statistics.median(r[p_] / r[a_] for r in rounds) for p_, a_ in pairs}
                    a, r6 = by["auto's rung alone"], by["rung 6 alone"]
                    public, separate, unchecked, public6 = ratio.values()
                    print(f"{dtype:9} d={d:3} N={N:5} causal={causal!s:5} rung {auto} alone {a:.3f} ms; public "
                          f"{public:.3f}x (separate scan {separate:.3f}x), unchecked {unchecked:.3f}x; "
                          f"rung 6 {r6:.3f} ms, public {public6:.3f}x", flush=True)
                    del q, k, v, ts, p
                    cupy.get_default_memory_pool().free_all_blocks()

    for dtype in ("float16", "bfloat16"):
        gen = torch.Generator(device="cuda").manual_seed(0)
        ts = [torch.randn(4, 32, 4096, 64, device="cuda", dtype=getattr(torch, dtype), generator=gen) for _ in range(4)]
        q, k, v, do = (cupy.from_dlpack(t) for t in ts)
        p = validate.check(q, k, v)
        o, lse = flashkit.attention(q, k, v, return_lse=True)
        pb = validate.check_backward(do, q, k, v, o, lse)
        names = [validate.dtype_name(x) for x in (q, k, v)]

        def rung2_checked():
            check = backward.LseCheck(pb.Q.shape[:3])
            backward.backward("cupy-bwd-mma", pb.Q, pb.K, pb.V, pb.O, pb.dO, pb.lse, scale=p.scale, element=p.element,
                              check=check)
            return check.error()

        pieces = {
            "validate.check (scan waited for)": lambda: validate.check(q, k, v),
            "validate.check (check deferred to the kernel or the scan)": lambda: validate.check(q, k, v, finite="async"),
            "finiteness scan of q, k, v (start + wait)": lambda: finite.start(cupy, (p.Q, p.K, p.V), names).wait(),
            "registry.choose": lambda: registry.choose(p, "auto"),
            "backward rung 2 alone": lambda: backward.backward("cupy-bwd-mma", pb.Q, pb.K, pb.V, pb.O, pb.dO, pb.lse,
                                                               scale=p.scale, element=p.element),
            "backward rung 2 with its lse check reported and waited for": rung2_checked,
            "flashkit.attention_backward": lambda: flashkit.attention_backward(do, q, k, v, o, lse),
            "validate.check_backward": lambda: validate.check_backward(do, q, k, v, o, lse),
        }
        for name, fn in pieces.items():
            ms = event_ms(fn)
            rows.append(dict(dtype=dtype, B=4, N=4096, H=32, d=64, causal=False, what=name, ms=ms))
            print(f"{dtype:9} {name:32} {ms:8.3f} ms", flush=True)
        cupy.get_default_memory_pool().free_all_blocks()
    env = environment()
    result = dict(env, benchmark="benchmarks/gpu_overhead.py", results=rows, ratios=ratios)
    path = Path(args.json) if args.json else Path(__file__).parent / "results" / f"gpu-overhead-{card_slug(env['card'])}.json"
    write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
