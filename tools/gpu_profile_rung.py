"""Launch one GPU rung a few times on the benchmark shape, for ncu to read its hardware counters.

    ncu --clock-control none --kernel-name regex:flash_bwd --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats ... \\
        python tools/gpu_profile_rung.py --rung cupy-bwd-fp32 --d 64 --dtype float32 [--causal]

The shape is the benchmarks' (B*N = 16384, H*d = 2048, N = 4096). A backward rung (one that
flashkit.gpu.backward knows) gets a forward of `flashkit.attention` first for its O and lse; a forward rung
runs through flashkit.gpu.flash.run on a Problem validated once. Each rung runs --repeats times, so
--launch-skip can step over the first launches (the compile and a warm-up).
"""
from __future__ import annotations

import argparse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rung", required=True, help="a rung's name, e.g. cupy-bwd-fp32 or cupy-fp32-tile")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import cupy

    import flashkit
    from flashkit import validate
    from flashkit.gpu import backward as gb
    from flashkit.gpu import flash, rungs

    B, H = 16384 // args.N, 2048 // args.d
    q, k, v, do = (cupy.random.standard_normal((B, H, args.N, args.d), dtype=cupy.float32).astype(args.dtype)
                   for _ in range(4))
    window = (-1, 0) if args.causal else (-1, -1)
    row = rungs.rung(args.rung)
    if row.direction == "backward":
        o, lse = flashkit.attention(q, k, v, causal=args.causal, return_lse=True)
        for _ in range(args.repeats):
            gb.backward(args.rung, q, k, v, o, do, lse, scale=args.d ** -0.5, window=window)
    else:
        p = validate.check(q, k, v, causal=args.causal)
        for _ in range(args.repeats):
            flash.run(row.number, p)
    cupy.cuda.Device().synchronize()
    print(f"{args.rung} d={args.d} {args.dtype} causal={args.causal}: {args.repeats} launches done")


if __name__ == "__main__":
    main()
