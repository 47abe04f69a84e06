"""What the public call costs beyond its kernel on the GPU, piece by piece (issue: the public call at kernel speed).

    python -m benchmarks.gpu_overhead [--json PATH]

fp16 (and bf16 from torch through DLPack), B=4, N=4096, H=32, d=64 (H*d = 2048), not causal. CUDA events
around 30 calls after a warm-up, mean per call: the rung alone (flashkit.gpu.flash.run on a validated
Problem), flashkit.attention (what users call), and the pieces of the difference: validate.check, the
finiteness scan alone (one kernel on a side stream, then its wait), registry.choose; the same for the
backward (the rung alone, with its in-kernel lse check reported and waited for, attention_backward,
validate.check_backward). Results: benchmarks/results/gpu-overhead-<card>.json.
"""
from __future__ import annotations

import argparse
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
    args = ap.parse_args(argv)

    import cupy
    import torch

    import flashkit
    from benchmarks.gpu_forward import card_slug, environment
    from flashkit import finite, registry, validate
    from flashkit.atomic import write_json
    from flashkit.gpu import backward, flash

    rows = []
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
            "forward rung 6 alone": lambda: flash.run(6, p),
            "flashkit.attention": lambda: flashkit.attention(q, k, v),
            "flashkit.attention(backend=cupy-mma-2tile)": lambda: flashkit.attention(q, k, v, backend="cupy-mma-2tile"),
            "validate.check (scan waited for)": lambda: validate.check(q, k, v),
            "validate.check (scan started, not waited for)": lambda: validate.check(q, k, v, finite="async"),
            "finiteness scan of q, k, v (start + wait)": lambda: finite.first_nonfinite(cupy, (p.Q, p.K, p.V), names),
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
        by = {r["what"]: r["ms"] for r in rows if r["dtype"] == dtype}
        for public, alone in (("flashkit.attention", "forward rung 6 alone"),
                              ("flashkit.attention_backward", "backward rung 2 alone")):
            print(f"{dtype:9} {public} / rung alone: {by[public] / by[alone]:.3f}", flush=True)
        cupy.get_default_memory_pool().free_all_blocks()
    env = environment()
    result = dict(env, benchmark="benchmarks/gpu_overhead.py", results=rows)
    path = Path(args.json) if args.json else Path(__file__).parent / "results" / f"gpu-overhead-{card_slug(env['card'])}.json"
    write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
