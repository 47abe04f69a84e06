"""What one public call does on the GPU beyond its rung: the kernels it launches and the host time it takes.

    python tools/gpu_public_trace.py [--d 64,128] [--dtype float16]                    # host and stream times
    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \\
        python tools/gpu_public_trace.py --trace                                       # every kernel, in order

For each head size (B*N = 16384, H*d = 2048, N = 4096, not causal, as benchmarks/gpu_overhead.py), three calls:
"alone" (flashkit.gpu.flash.run on a Problem validated once, what gpu_overhead calls "auto's rung alone"),
"public" (flashkit.attention(q, k, v)) and "unchecked" (the same with check_finite=False). Printed per call:
  host ms    the calling thread's time for 20 calls issued back to back without a wait (Python, validation,
             the launch): where it exceeds the kernel's time the GPU waits for the host
  stream ms  GPU time per call over the same 20 calls (flashkit.measure.timing.stream_time)
With --profile, cProfile's functions of 20 public calls, by their own time.
With --trace, each call runs once inside cudaProfilerStart/Stop, separated by a one-element marker kernel
(`fk_marker`), so the kernels ncu lists between two markers are what one call launched.
"""
from __future__ import annotations

import argparse
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", default="64,128", help="head sizes, comma-separated")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--trace", action="store_true", help="one call of each inside the profiler's range (for ncu)")
    ap.add_argument("--profile", action="store_true", help="also cProfile 20 public calls (host time by function)")
    args = ap.parse_args(argv)

    import cupy
    import torch

    import flashkit
    from flashkit import registry, validate
    from flashkit.gpu import flash
    from flashkit.measure.timing import stream_time

    marker = cupy.ElementwiseKernel("float32 x", "float32 y", "y = x + 1", "fk_marker")
    one = cupy.zeros(1, cupy.float32)

    def one_size(d):
        N, B, H = 4096, 16384 // 4096, 2048 // d
        gen = torch.Generator(device="cuda").manual_seed(0)
        ts = [torch.randn(B, H, N, d, device="cuda", dtype=getattr(torch, args.dtype), generator=gen) for _ in range(3)]
        q, k, v = (cupy.from_dlpack(t) for t in ts)
        p = validate.check(q, k, v)
        rung = registry.choose(p, "auto").rung
        calls = {"alone": lambda: flash.run(rung, p),
                 "public": lambda: flashkit.attention(q, k, v),
                 "unchecked": lambda: flashkit.attention(q, k, v, check_finite=False)}
        for fn in calls.values():  # compile and warm every path first
            fn()
        cupy.cuda.Device().synchronize()
        if args.trace:
            cupy.cuda.runtime.profilerStart()
            for fn in calls.values():
                marker(one)
                fn()
            marker(one)
            cupy.cuda.Device().synchronize()
            cupy.cuda.runtime.profilerStop()
            print(f"d={d}: traced, in order, between fk_marker kernels: {', '.join(calls)} (rung {rung})", flush=True)
            return
        for name, fn in calls.items():
            cupy.cuda.Device().synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            host = (time.perf_counter() - t0) / 20 * 1e3
            cupy.cuda.Device().synchronize()
            gpu = stream_time(fn, calls=20, rounds=5, budget_s=0.5)["median_s"] * 1e3
            print(f"d={d:3} {args.dtype} rung {rung} {name:9}  host {host:7.3f} ms a call   stream {gpu:7.3f} ms a call",
                  flush=True)
        if args.profile:  # where the public call's host time goes, by function
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(lambda: [calls["public"]() for _ in range(20)])
            cupy.cuda.Device().synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(14)

    for d in (int(x) for x in args.d.split(",")):
        one_size(d)
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
