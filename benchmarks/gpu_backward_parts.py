"""Where the backward's time goes: each kernel of the backward rungs timed alone, plus one diagnostic variant.

    python -m benchmarks.gpu_backward_parts [--json PATH]

fp16, B*N = 16384, H*d = 2048, N = 4096, d in {64, 128}, non-causal, default blocks. Timed alone, by CUDA
events (flashkit.measure.timing.stream_time): the preprocessing kernel (D = rowsum(dO * O)), rung 2's main
kernel, its dQ conversion, rung 3's dK/dV kernel and its dQ kernel, rung 4's main kernel (on Hopper); and rung 2's
and rung 4's main kernels compiled with their dQ additions replaced by a store that never happens (so the compiler keeps the dQ products): the
difference to the real kernel is what the fp32 atomics cost. The main kernels are timed without their
preprocessing, so rung 2's dQ buffer keeps accumulating (the time does not depend on its values).
"""
from __future__ import annotations

import argparse
import sys

from flashkit.atomic import write_json

SINK = '''
// diagnostic (benchmarks/gpu_backward_parts.py): the dQ addition replaced by a store that never happens
__device__ __forceinline__ void diag_sink(float* dst, float4 v) {
    if (v.x == 1.2345e30f && v.w == -1.2345e30f) dst[0] = v.y;
}
'''


def main(argv=None):
    import cupy
    import numpy as np
    import torch

    from benchmarks.gpu_backward import ELEMENT, FlashkitBackward, flops
    from benchmarks.gpu_forward import environment, free_all
    from flashkit.gpu.backward import LSE_TILES, RUNGS, kernels, tensor_maps
    from flashkit.gpu.flash import KERNEL_DIR, build_options
    from flashkit.measure.timing import stream_time

    def time_ms(fn):
        t = stream_time(fn, calls=20, rounds=3, budget_s=0.3)
        return t["median_s"] * 1e3, t["calls"] * len(t["rounds_s"])

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    N, dtype = 4096, "float16"
    i32, f32, i64 = cupy.int32, cupy.float32, cupy.int64
    for d in (64, 128):
        B, H = 16384 // N, 2048 // d
        gen = torch.Generator(device="cuda").manual_seed(3)
        q, k, v, do = (torch.randn(B, H, N, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(4))
        fk = FlashkitBackward(q, k, v, do, False, dtype)
        Q, K, V, O, dO, lse = fk.Q, fk.K, fk.V, fk.O, fk.dO, fk.lse
        dQ, dK, dV = fk.out
        Dvec = cupy.empty((B, H, N), cupy.float32)
        dQacc = cupy.zeros(Q.shape, cupy.float32)
        Psum = cupy.zeros((B, H, N), cupy.float32)
        dims = (i32(H), i32(H), i32(N), i32(N), f32(d ** -0.5), i32(-1), i32(-1))
        rows_n = B * H * N
        parts = {}
        r2, r3 = RUNGS["cupy-bwd-mma"], RUNGS["cupy-bwd-mma-2kernel"]
        Br2, Bc2 = r2.default_blocks[d]
        Br3, Bc3 = r3.default_blocks[d]
        k2 = kernels("cupy-bwd-mma", d, ELEMENT[dtype], Br2, Bc2)
        k3 = kernels("cupy-bwd-mma-2kernel", d, ELEMENT[dtype], Br3, Bc3)
        smem2 = r2.kernel("main").smem(d, Br2, Bc2)
        q_tiles = -(-N // Br2)
        every2 = (i32(max(1, -(-q_tiles // LSE_TILES))),)
        parts["rung 2 preprocess (D, zero dQacc and Psum)"] = lambda: k2["preprocess"](
            (-(-rows_n * (d // 8) // 256),), (256,), (O, dO, Dvec, dQacc, Psum, i64(rows_n)))
        parts["rung 2 main kernel"] = lambda: k2["main"](
            (-(-N // Bc2), H, B), (2 * Bc2,), (Q, K, V, dO, lse, Dvec, dQacc, dK, dV, Psum) + dims + every2,
            shared_mem=smem2)
        parts["rung 2 dQ convert"] = lambda: k2["convert"](
            (-(-Q.size // (8 * 256)),), (256,), (dQacc, dQ, i64(Q.size), f32(d ** -0.5)))
        parts["rung 2 lse check (bwd_lse_check)"] = lambda: k2["check"](
            (-(-rows_n // 256),), (256,), (Psum, lse, i64(rows_n), i32(N), i32(N), i32(-1), i32(-1), f32(1e-3),
                                           i32(Br2)) + every2 + (np.uint64(0), i64(0)))
        # rung 2's main kernel without its atomics
        src = (KERNEL_DIR / r2.source).read_text()
        marker = 'extern "C" __global__ void __launch_bounds__(NT,'  # before the main kernel
        src = src.replace(marker, SINK + marker, 1).replace("red_add4(dQh", "diag_sink(dQh")
        noatom = cupy.RawModule(code=src, options=build_options(d, ELEMENT[dtype], Br2, Bc2)).get_function("flash_bwd")
        noatom.max_dynamic_shared_size_bytes = smem2
        parts["rung 2 main kernel, dQ additions removed (diagnostic)"] = lambda: noatom(
            (-(-N // Bc2), H, B), (2 * Bc2,), (Q, K, V, dO, lse, Dvec, dQacc, dK, dV, Psum) + dims + every2,
            shared_mem=smem2)
        parts["rung 3 dK/dV kernel"] = lambda: k3["dkdv"](
            (-(-N // Bc3), H, B), (2 * Bc3,), (Q, K, V, dO, lse, Dvec, dK, dV) + dims,
            shared_mem=r3.kernel("dkdv").smem(d, Br3, Bc3))
        parts["rung 3 dQ kernel (with the lse check)"] = lambda: k3["dq"](
            (-(-N // Bc3), H, B), (2 * Bc3,), (Q, K, V, dO, lse, Dvec, dQ) + dims + (f32(1e-3), np.uint64(0), i64(0)),
            shared_mem=r3.kernel("dq").smem(d, Br3, Bc3))
        if RUNGS["cupy-bwd-wgmma"].backend().available:  # a Hopper
            r4 = RUNGS["cupy-bwd-wgmma"]
            Br4, Bc4 = r4.default_blocks[d]
            k4 = kernels("cupy-bwd-wgmma", d, ELEMENT[dtype], Br4, Bc4)
            smem4 = r4.kernel("main").smem(d, Br4, Bc4)
            tiles4 = -(-N // Br4)
            every4 = (i32(max(1, -(-tiles4 // LSE_TILES))),)
            maps4 = (tensor_maps(Q, K, V, dO, Br4, Bc4),)
            parts["rung 4 main kernel"] = lambda: k4["main"](
                (-(-N // Bc4), H, B), (384,), (Q, K, V, dO, lse, Dvec, dQacc, dK, dV, Psum) + dims + every4 + maps4,
                shared_mem=smem4)
            src4 = (KERNEL_DIR / r4.source).read_text()
            src4 = src4.replace(marker, SINK + marker, 1).replace("red_add4(dQh", "diag_sink(dQh")
            noatom4 = cupy.RawModule(code=src4, options=build_options(d, ELEMENT[dtype], Br4, Bc4, arch=r4.arch)
                                     ).get_function("flash_bwd")
            noatom4.max_dynamic_shared_size_bytes = smem4
            parts["rung 4 main kernel, dQ additions removed (diagnostic)"] = lambda: noatom4(
                (-(-N // Bc4), H, B), (384,), (Q, K, V, dO, lse, Dvec, dQacc, dK, dV, Psum) + dims + every4 + maps4,
                shared_mem=smem4)
            parts["rung 4 whole backward"] = fk.call("cupy-bwd-wgmma")
        parts["rung 2 whole backward"] = fk.call("cupy-bwd-mma")
        parts["rung 3 whole backward"] = fk.call("cupy-bwd-mma-2kernel")
        fl = flops(B, H, N, d, False)
        print(f"d={d} N={N} B={B} H={H} fp16 non-causal; rung 2 blocks {(Br2, Bc2)}, rung 3 blocks {(Br3, Bc3)}", flush=True)
        for name, fn in parts.items():
            ms, reps = time_ms(fn)
            rows.append(dict(d=d, N=N, B=B, H=H, dtype=dtype, causal=False, part=name, ms=ms, reps=reps,
                             tflops_if_whole=fl / (ms * 1e-3) / 1e12))
            print(f"  {name:<58} {ms:8.3f} ms", flush=True)
        del fk, q, k, v, do
        free_all()
    if args.json:
        write_json(args.json, dict(environment(), parts=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
