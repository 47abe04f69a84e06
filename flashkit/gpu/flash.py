"""Compile and launch the CUDA rungs (flashkit/gpu/kernels/*.cu) through CuPy's RawModule (NVRTC).

Each kernel is compiled at first use for one (head size d, element type, Br, Bc) and cached: in this
process by `functools.lru_cache`, on disk by CuPy (~/.cupy/kernel_cache), so only the first launch in a
fresh machine pays NVRTC's compile time. Every kernel has the same signature:

    flash_fwd(Q, K, V, O, lse, Hq, Hkv, Nq, Nk, scale_log2, left, right)    grid (Tr, Hq, B)

Block sizes are constants of each rung, listed here in `RUNGS` (defaults per d, and what may be forced
with block_size=(Br, Bc)); a block size a kernel cannot honour raises ValueError, never falls back.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

KERNEL_DIR = Path(__file__).parent / "kernels"
LOG2E = 1.4426950408889634
ELEMENTS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # dtype name -> kernel element type


@dataclass(frozen=True)
class Rung:
    number: int
    source: str  # file under kernels/
    elements: Tuple[str, ...]  # "f32", or "f16"/"bf16"
    default_blocks: Dict[int, Tuple[int, int]]  # d -> (Br, Bc)
    allowed_blocks: Tuple[Tuple[int, int], ...]  # what block_size may force
    threads: Callable[[int, int], int]  # (Br, Bc) -> threads per block
    smem: Callable[[int, int, int], int]  # (d, Br, Bc) -> dynamic shared bytes; must match the .cu layout
    defines_br: bool = True  # whether Br is a -D of the source (else fixed in it)
    defines_bc: bool = True


RUNGS = {
    # Q_s [Br][d+1] + K_s [Bc][d] + V_s [Bc][d] + S_s [Bc][Br], fp32.
    2: Rung(2, "2_fp32_row.cu", ("f32",),
            {32: (64, 32), 64: (64, 32), 128: (64, 32)},
            ((32, 16), (32, 32), (64, 16), (64, 32), (128, 16), (128, 32)),
            threads=lambda Br, Bc: Br,
            smem=lambda d, Br, Bc: 4 * (Br * (d + 1) + 2 * Bc * d + Bc * Br)),
    # Q_s [64][d+4] + KV_s [Bc][d+4] + P_s [64][Bc+8], fp32; the 16x8 thread grid fixes Br = 64, Bc = 8 x TN.
    # Bc = 32 at d = 128: 61 KB of shared memory, 3 blocks per SM instead of 2; measured 33.3 vs 30.4 TFLOP/s
    # (H100, N=4096, non-causal; benchmarks/results/gpu-h100-80gb-hbm3-history2.json).
    3: Rung(3, "3_fp32_tile.cu", ("f32",),
            {32: (64, 64), 64: (64, 64), 128: (64, 32)},
            ((64, 32), (64, 64)),
            threads=lambda Br, Bc: 128,
            smem=lambda d, Br, Bc: 4 * ((64 + Bc) * (d + 4) + 64 * (Bc + 8)),
            defines_br=False),
    # Q_s [64][d+8] + K_s [Bc][d+8] + V_s [Bc][d+8], 16-bit; 4 warps x 16 rows fix Br = 64.
    4: Rung(4, "4_mma.cu", ("f16", "bf16"),
            {32: (64, 64), 64: (64, 64), 128: (64, 64)},
            ((64, 32), (64, 64)),
            threads=lambda Br, Bc: 128,
            smem=lambda d, Br, Bc: 2 * (64 + 2 * Bc) * (d + 8),
            defines_br=False),
    # Q_s [Br][d+8] + K_s [2][Bc][d+8] + V_s [Bc][d+8], 16-bit; Br / 16 warps. Defaults: the best of the
    # block sweep on an H100 (N=4096, fp16, benchmarks/results/gpu-h100-80gb-hbm3-history2.json; d=32 not
    # swept, set like d=64).
    5: Rung(5, "5_mma_async.cu", ("f16", "bf16"),
            {32: (128, 64), 64: (128, 64), 128: (128, 128)},
            ((64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128)),
            threads=lambda Br, Bc: 2 * Br,
            smem=lambda d, Br, Bc: 2 * (Br + 3 * Bc) * (d + 8)),
    # Rung 5's layout with Br / 32 warps (two 16-row m-tiles each). Defaults from its sweep on an H100 (N=4096,
    # fp16, benchmarks/NOTES-gpu.md "Rung 6"; d=32 not swept). d = 128 with Bc = 128 spills (ptxas: 832 bytes)
    # and runs at 0.55x of 128 x 64: allowed, never a default.
    6: Rung(6, "6_mma_2tile.cu", ("f16", "bf16"),
            {32: (128, 64), 64: (128, 64), 128: (128, 64)},
            ((64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128)),
            threads=lambda Br, Bc: Br,
            smem=lambda d, Br, Bc: 2 * (Br + 3 * Bc) * (d + 8)),
}
HEAD_DIMS = (32, 64, 128)
COMPILE_SECONDS: Dict[tuple, float] = {}  # (rung, d, element, Br, Bc) -> seconds of the first build in this process


def _arch() -> str:
    import cupy

    return f"sm_{cupy.cuda.Device().compute_capability}"


@functools.lru_cache(maxsize=None)
def kernel(rung: int, d: int, element: str, Br: int, Bc: int):
    """The compiled `flash_fwd` of one rung for one (d, element, Br, Bc), with its shared-memory limit raised."""
    import cupy

    spec = RUNGS[rung]
    options = ["--std=c++17", f"--gpu-architecture={_arch()}", f"-DHEAD_DIM={d}"]
    if spec.defines_br:
        options.append(f"-DBR={Br}")
    if spec.defines_bc:
        options.append(f"-DBC={Bc}")
    if element == "bf16":
        options.append("-DUSE_BF16")
    source = (KERNEL_DIR / spec.source).read_text()
    t0 = time.perf_counter()  # NVRTC compile, or a hit in CuPy's on-disk cache
    fn = cupy.RawModule(code=source, options=tuple(options)).get_function("flash_fwd")
    COMPILE_SECONDS[(rung, d, element, Br, Bc)] = time.perf_counter() - t0
    smem = spec.smem(d, Br, Bc)
    if smem > 48 * 1024:  # above 48 KB a kernel must opt in to more dynamic shared memory
        fn.max_dynamic_shared_size_bytes = smem
    return fn


def blocks_for(rung: int, d: int, block_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    spec = RUNGS[rung]
    if d not in HEAD_DIMS:
        raise ValueError(f"rung {rung} supports head size d in {{32, 64, 128}}; got d={d}")
    if block_size is None:
        return spec.default_blocks[d]
    block_size = tuple(int(x) for x in block_size)
    if block_size not in spec.allowed_blocks:
        allowed = ", ".join(f"({a}, {b})" for a, b in spec.allowed_blocks)
        raise ValueError(f"rung {rung} ({spec.source}) supports block_size (Br, Bc) in {{{allowed}}}; got {block_size}")
    return block_size


def forward(rung: int, Q, K, V, *, scale: float, window=(-1, -1), element: Optional[str] = None,
            block_size=None, out=None, lse_out=None):
    """Run one rung on CuPy arrays Q (B, Hq, Nq, d), K and V (B, Hkv, Nk, d); returns (O, lse).

    `element` names the kernel's element type when the arrays' dtype cannot say it (bf16 data held as
    uint16 bits when CuPy has no bfloat16). `out` / `lse_out`, if given, are written in place (tests
    poison them with NaN first); lse is float32 (B, Hq, Nq) in natural-log units.
    """
    import cupy

    spec = RUNGS[rung]
    if element is None:
        element = ELEMENTS.get(Q.dtype.name)
    if element not in spec.elements:
        names = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
        raise TypeError(f"rung {rung} computes {', '.join(names[e] for e in spec.elements)}; got {Q.dtype.name}")
    if not (Q.dtype == K.dtype == V.dtype):
        raise TypeError(f"Q, K and V must have one dtype; got {Q.dtype}, {K.dtype}, {V.dtype}")
    if Q.ndim != 4 or K.ndim != 4 or K.shape != V.shape:
        raise ValueError(f"expected Q (B, Hq, Nq, d) and K, V (B, Hkv, Nk, d); got {Q.shape}, {K.shape}, {V.shape}")
    B, Hq, Nq, d = Q.shape
    _, Hkv, Nk, _ = K.shape
    if Hq % Hkv:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    Br, Bc = blocks_for(rung, d, block_size)
    # The kernels index rows as (b, h, n) * d: they need C-contiguous arrays. Copy explicitly, never guess.
    Q, K, V = (x if x.flags.c_contiguous else cupy.ascontiguousarray(x) for x in (Q, K, V))
    O = cupy.empty(Q.shape, Q.dtype) if out is None else out
    lse = cupy.empty((B, Hq, Nq), cupy.float32) if lse_out is None else lse_out
    if O.shape != Q.shape or O.dtype != Q.dtype or not O.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous array of Q's shape and dtype")
    if lse.shape != (B, Hq, Nq) or lse.dtype != cupy.float32 or not lse.flags.c_contiguous:
        raise ValueError("lse_out must be a C-contiguous float32 array (B, Hq, Nq)")
    fn = kernel(rung, d, element, Br, Bc)
    Tr = -(-Nq // Br)
    left, right = (int(w) for w in window)
    i32, f32 = cupy.int32, cupy.float32
    fn((Tr, Hq, B), (spec.threads(Br, Bc),),
       (Q, K, V, O, lse, i32(Hq), i32(Hkv), i32(Nq), i32(Nk), f32(scale * LOG2E), i32(left), i32(right)),
       shared_mem=spec.smem(d, Br, Bc))
    return O, lse


def _run(rung: int, problem):
    if problem.mask is not None:
        raise ValueError(f"rung {rung} does not support a custom mask (causal and sliding windows are supported)")
    return forward(rung, problem.Q, problem.K, problem.V, scale=problem.scale, window=problem.window,
                   block_size=problem.block_size)


def run_rung2(problem):
    """cupy-fp32-row: kernels/2_fp32_row.cu."""
    return _run(2, problem)


def run_rung3(problem):
    """cupy-fp32-tile: kernels/3_fp32_tile.cu."""
    return _run(3, problem)


def run_rung4(problem):
    """cupy-mma: kernels/4_mma.cu."""
    return _run(4, problem)


def run_rung5(problem):
    """cupy-mma-async: kernels/5_mma_async.cu."""
    return _run(5, problem)


def run_rung6(problem):
    """cupy-mma-2tile: kernels/6_mma_2tile.cu."""
    return _run(6, problem)


def flops(B: int, Hq: int, Nq: int, Nk: int, d: int, window=(-1, -1)) -> float:
    """Forward FLOPs as FlashAttention counts them: 4 B H Nq Nk d times the visible fraction of S."""
    from flashkit.masks import visible_fraction

    return 4.0 * B * Hq * Nq * Nk * d * visible_fraction(Nq, Nk, tuple(window))


__all__ = ["RUNGS", "forward", "kernel", "blocks_for", "flops"]
