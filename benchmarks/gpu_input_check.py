"""What rung 7's NaN/Inf check inside its kernel costs (kernels/input_check.cuh), variants side by side.

    python -m benchmarks.gpu_input_check [--json PATH] [--rounds 5]

fp16, B*N = 16384, H*d = 2048, N = 4096, d 64 and 128, causal and not (the shapes of benchmarks/gpu_overhead.py).
Variants of the check: the L2 eviction hint of its copies, the bytes one block tests (flashkit.finite.FUSED_SHARE),
and for causal calls, whether the heavy half of the query tiles takes the shares or every block
(flashkit.gpu.flash.CHECK_HEAVY_HALF). For each variant, in interleaved rounds (GPU clocks drift over a run
by several percent, more than the effects looked for), the time per call of 20 calls back to back
(flashkit.measure.timing.stream_time) of:
  alone      the kernel without the check (flash.run on a validated Problem)
  fused      the kernel with the check claimed, never waited for: what the check costs the kernel
  public     flashkit.attention(q, k, v) with this variant's kernel, the fused check taken whatever the shape
             (by default flashkit.gpu.flash.check_columns takes it only where this benchmark found it pays)
  separate   flashkit.attention with the separate scan instead (flashkit.finite.separate_scan())
  unchecked  flashkit.attention(q, k, v, check_finite=False)
and, from an idle GPU, the answer's latency (launch to Fused.wait returning) beside the kernel's end. Printed
as ratios over "alone" of the same round, median over rounds. Results: benchmarks/results/gpu-input-check-<card>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

# name -> (-D defines of input_check.cuh, FUSED_SHARE bytes, causal grids check in their heavy half only);
# every variant keeps 48 KB of buffers (the rung's shared memory)
VARIANTS = {
    "16K x 3, evict_first, 256K, heavy half": ({"SCAN_CHUNK": 16384, "SCAN_STAGES": 3, "SCAN_EVICT_FIRST": 1}, 256 << 10, True),
    "16K x 3, evict_normal, 256K, heavy half": ({"SCAN_CHUNK": 16384, "SCAN_STAGES": 3, "SCAN_EVICT_FIRST": 0}, 256 << 10, True),
    "16K x 3, evict_first, 512K, heavy half": ({"SCAN_CHUNK": 16384, "SCAN_STAGES": 3, "SCAN_EVICT_FIRST": 1}, 512 << 10, True),
    "16K x 3, evict_first, 256K, whole grid": ({"SCAN_CHUNK": 16384, "SCAN_STAGES": 3, "SCAN_EVICT_FIRST": 1}, 256 << 10, False),
}


def answer_latency(claimed):
    """From an idle GPU: (ms from the launch to the answer, ms to the kernel's end, whether the answer came from
    the backstop) of `claimed()`, a launch returning its flashkit.finite.Deferred with the check claimed."""
    import cupy

    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    fused = claimed().start()
    fused.wait()
    t1 = time.perf_counter()
    cupy.cuda.Device().synchronize()
    return (t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3, fused.backstop


@contextlib.contextmanager
def variant(defines, share, heavy_half):
    """flash.launch_config answering with this variant's kernel, finite.FUSED_SHARE = share and
    flash.CHECK_HEAVY_HALF = heavy_half, inside; the fused check taken on every shape (CHECK_MIN_KEY_TILES = 0)."""
    import cupy

    from flashkit import finite
    from flashkit.gpu import flash

    real, real_share, real_half = flash.launch_config, finite.FUSED_SHARE, flash.CHECK_HEAVY_HALF
    real_tiles = flash.CHECK_MIN_KEY_TILES
    cache = {}

    def launch_config(rung, d, element, Br, Bc):
        fn, threads, smem = real(rung, d, element, Br, Bc)
        if rung != 7:
            return fn, threads, smem
        key = (d, element, Br, Bc)
        if key not in cache:
            source = (flash.KERNEL_DIR / flash.RUNGS[7].source).read_text()
            options = flash.options(7, d, element, Br, Bc) + tuple(f"-D{k}={v}" for k, v in defines.items())
            cache[key] = cupy.RawModule(code=source, options=options).get_function("flash_fwd")
            cache[key].max_dynamic_shared_size_bytes = smem
        return cache[key], threads, smem

    flash.launch_config, finite.FUSED_SHARE, flash.CHECK_HEAVY_HALF = launch_config, share, heavy_half
    flash.CHECK_MIN_KEY_TILES = 0  # the fused check on every shape: where it pays is what this measures
    flash.check_columns.cache_clear()
    try:
        yield
    finally:
        flash.launch_config, finite.FUSED_SHARE, flash.CHECK_HEAVY_HALF = real, real_share, real_half
        flash.CHECK_MIN_KEY_TILES = real_tiles
        flash.check_columns.cache_clear()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ds", default="64,128")
    ap.add_argument("--Ns", default="4096", help="sequence lengths (B = 16384 / N)")
    ap.add_argument("--variants", help="indices into VARIANTS, comma-separated (default: all)")
    args = ap.parse_args(argv)

    import cupy
    import torch

    import flashkit
    from benchmarks.gpu_forward import card_slug, environment
    from flashkit import finite, validate
    from flashkit.atomic import write_json
    from flashkit.gpu import flash
    from flashkit.measure.timing import stream_time

    def timed(fn):
        return stream_time(fn, calls=20, rounds=1, budget_s=0.25)["median_s"] * 1e3

    variants = VARIANTS if not args.variants else {
        name: VARIANTS[name] for i, name in enumerate(VARIANTS) if str(i) in args.variants.split(",")}
    rows = []
    for d, N, causal in ((d, N, c) for d in (int(x) for x in args.ds.split(",")) for N in
                         (int(x) for x in args.Ns.split(",")) for c in (False, True)):
        B, H = 16384 // N, 2048 // d
        gen = torch.Generator(device="cuda").manual_seed(0)
        ts = [torch.randn(B, H, N, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3)]
        q, k, v = (cupy.from_dlpack(t) for t in ts)
        p = validate.check(q, k, v, causal=causal, finite=False)

        def claimed():
            check = finite.Deferred(cupy, (p.Q, p.K, p.V), ("float16",) * 3, ("q", "k", "v"))
            flash.forward(7, p.Q, p.K, p.V, scale=p.scale, window=p.window, check=check)
            return check

        def separate():
            with finite.separate_scan():
                return flashkit.attention(q, k, v, causal=causal)

        modes = {"alone": lambda: flash.run(7, p), "fused": claimed,
                 "public": lambda: flashkit.attention(q, k, v, causal=causal), "separate": separate,
                 "unchecked": lambda: flashkit.attention(q, k, v, causal=causal, check_finite=False)}
        ratios = {name: {m: [] for m in modes if m != "alone"} for name in variants}
        alone_ms = []
        latency = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (defines, share, heavy_half) in variants.items():
                with variant(defines, share, heavy_half):
                    ms = {m: timed(fn) for m, fn in modes.items()}
                    alone_ms.append(ms["alone"])
                    for m in ratios[name]:
                        ratios[name][m].append(ms[m] / ms["alone"])
                    latency[name].append(answer_latency(claimed))
        for name in variants:
            med = {m: statistics.median(r) for m, r in ratios[name].items()}
            ans = statistics.median(a for a, _, _ in latency[name])
            end = statistics.median(e for _, e, _ in latency[name])
            backstops = int(sum(b for *_, b in latency[name]))
            row = dict(d=d, causal=causal, N=N, B=B, H=H, dtype="float16", variant=name,
                       defines=VARIANTS[name][0], share_bytes=VARIANTS[name][1], heavy_half=VARIANTS[name][2],
                       rounds=args.rounds,
                       alone_ms=statistics.median(alone_ms), ratios=med, ratios_rounds=ratios[name],
                       answer_ms=ans, end_ms=end, backstops=backstops)
            rows.append(row)
            print(f"d={d:3} causal={causal!s:5} {name:38} alone {row['alone_ms']:.3f} ms | "
                  + "  ".join(f"{m} {r:.3f}x" for m, r in med.items())
                  + f" | answer {ans:.3f} / end {end:.3f} ms, backstop {backstops}", flush=True)
        cupy.get_default_memory_pool().free_all_blocks()
    env = environment()
    path = Path(args.json) if args.json else Path(__file__).parent / "results" / f"gpu-input-check-{card_slug(env['card'])}.json"
    write_json(path, dict(env, benchmark="benchmarks/gpu_input_check.py", results=rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
