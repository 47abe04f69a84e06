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


def host_and_stream_ms(fn, calls=20):
    """(host ms, stream ms) a call of fn: the calling thread's time for `calls` calls issued back to back
    without a wait, and the GPU's time a call over the same number (flashkit.measure.timing.stream_time)."""
    import cupy

    from flashkit.measure.timing import stream_time

    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e3
    cupy.cuda.Device().synchronize()
    return host, stream_time(fn, calls=calls, rounds=5, budget_s=0.5)["median_s"] * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", default="64,128", help="head sizes, comma-separated")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--trace", action="store_true", help="one call of each inside the profiler's range (for ncu)")
    ap.add_argument("--profile", action="store_true", help="also cProfile 20 public calls (host time by function)")
    ap.add_argument("--backward-mods", action="store_true",
                    help="the backward with a block mask and with softcap instead (backward_mods' docstring)")
    args = ap.parse_args(argv)

    import cupy
    import torch

    import flashkit
    from flashkit import registry, validate
    from flashkit.gpu import flash

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
            host, gpu = host_and_stream_ms(fn)
            print(f"d={d:3} {args.dtype} rung {rung} {name:9}  host {host:7.3f} ms a call   stream {gpu:7.3f} ms a call",
                  flush=True)
        if registry.choose(p, "auto").checks_inputs:
            fused_check(p, rung, host_and_stream_ms)
        if args.profile:  # where the public call's host time goes, by function
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(lambda: [calls["public"]() for _ in range(20)])
            cupy.cuda.Device().synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(14)

    if args.backward_mods:
        return backward_mods(args)
    for d in (int(x) for x in args.d.split(",")):
        one_size(d)
        cupy.get_default_memory_pool().free_all_blocks()


def fused_check(p, rung, host_and_stream_ms):
    """A rung that checks its own inputs (rung 7, kernels/input_check.cuh): its kernel with the check claimed
    (20 launches back to back, never waited for: what the check costs the kernel), then from an idle GPU, 7
    times: the host's time from the launch to the answer (Fused.wait) and to the kernel's end, and whether
    the answer came from the done word or from the backstop (the kernel's end event)."""
    import statistics

    import cupy

    from benchmarks.gpu_input_check import answer_latency
    from flashkit import finite
    from flashkit.gpu import flash

    def claimed():
        check = finite.Deferred(cupy, (p.Q, p.K, p.V), (p.dtype_name,) * 3, ("q", "k", "v"))
        flash.forward(rung, p.Q, p.K, p.V, scale=p.scale, window=p.window, element=p.element, check=check)
        return check

    host, gpu = host_and_stream_ms(claimed)
    print(f"      rung {rung} with its check claimed, never waited for: stream {gpu:7.3f} ms a call", flush=True)
    runs = [answer_latency(claimed) for _ in range(7)]
    print(f"      from an idle GPU: the answer after {statistics.median(r[0] for r in runs):.3f} ms, the kernel's end "
          f"after {statistics.median(r[1] for r in runs):.3f} ms (medians of 7); answers from the backstop: "
          f"{sum(r[2] for r in runs)} of 7", flush=True)


def backward_mods(args):
    """The backward with mods (backward rung 2's FK_* hooks): the kernels alone (flash_mods_backward.prepare's
    launch) against the public call, host and stream time, and cProfile of 20 public calls (--profile): a
    document block mask (8 documents, B=1, H=16, N=4096, d=64), and softcap(50) (B=4, H=32, N=4096, d=64);
    then the forward with the same mods (rung 6's hooks, flash_mods.prepare) the same way."""
    import cProfile
    import pstats

    import cupy

    import flashkit
    from flashkit import mods, validate
    from flashkit.gpu import flash_mods
    from flashkit.gpu import flash_mods_backward as fmb

    def inputs(B, H, N, d):
        return [cupy.random.standard_normal((B, H, N, d), dtype=cupy.float32).astype(cupy.float16) for _ in range(4)]

    cases = []
    q, k, v, do = inputs(1, 16, 4096, 64)
    bm = flashkit.block_mask(mods.document_mask([512] * 8), None, None, 4096, 4096, block_size=(128, 128), engine="cuda")
    cases.append(("documents N=4096", q, k, v, do, dict(block_mask=bm)))
    q, k, v, do = inputs(4, 32, 4096, 64)
    cases.append(("softcap(50) N=4096", q, k, v, do, dict(score_mod=mods.softcap(50.0))))
    for label, q, k, v, do, kw in cases + [("forward " + label, q, k, v, None, kw) for label, q, k, v, _, kw in cases]:
        if do is None:  # the forward with the same mods, rung 6's hooks (flash_mods.prepare's launch alone)
            p = validate.check(q, k, v, **kw)
            launch, *_ = flash_mods.prepare(6, p)
            calls = {"kernel": launch,
                     "public": lambda: flashkit.attention(q, k, v, backend="cupy-mma-2tile", **kw),
                     "unchecked": lambda: flashkit.attention(q, k, v, backend="cupy-mma-2tile", check_finite=False,
                                                             **kw)}
        else:
            o, lse = flashkit.attention(q, k, v, return_lse=True, **kw)
            p = validate.check_backward(do, q, k, v, o, lse, finite=False, **kw)
            launch, finish, *_ = fmb.prepare(p)
            calls = {"kernel": launch,
                     "public": lambda: flashkit.attention_backward(do, q, k, v, o, lse, backend="cupy-bwd-mma", **kw),
                     "unchecked": lambda: flashkit.attention_backward(do, q, k, v, o, lse, backend="cupy-bwd-mma",
                                                                      check_finite=False, **kw)}
        for fn in calls.values():
            fn()
        cupy.cuda.Device().synchronize()
        for name, fn in calls.items():
            host, gpu = host_and_stream_ms(fn)
            print(f"{label:20} {name:9}  host {host:7.3f} ms a call   stream {gpu:7.3f} ms a call", flush=True)
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(lambda: [calls["public"]() for _ in range(20)])
            cupy.cuda.Device().synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
            pstats.Stats(prof).sort_stats("cumtime").print_stats(25)


if __name__ == "__main__":
    main()
