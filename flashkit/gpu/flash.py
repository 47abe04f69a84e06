"""Compile and launch the CUDA rungs (flashkit/gpu/kernels/*.cu) through CuPy's RawModule (NVRTC).

Each kernel is compiled at first use for one (head size d, element type, Br, Bc) and cached: in this
process by `functools.cache`, on disk by CuPy (~/.cupy/kernel_cache), so only the first launch in a
fresh machine pays NVRTC's compile time. Every kernel has the same signature:

    flash_fwd(Q, K, V, O, lse, Hq, Hkv, Nq, Nk, scale_log2, left, right)    grid (Tr, Hq, B)

rung 7 adds its TMA tensor maps (flashkit.gpu.tma) and the six arguments of its fused NaN/Inf check of Q, K and
V (flashkit.finite.Fused.launch_args, or NO_CHECK).

Block sizes are constants of each rung, listed in the ladder's table (flashkit/gpu/rungs.py: defaults per d,
and what may be forced with block_size=(Br, Bc)); a block size a kernel cannot honour raises ValueError,
never falls back. The registry runs every forward rung through `run`: `flashkit.gpu.flash:<backend name>`
is `run` bound to that rung.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from flashkit.gpu.rungs import ELEMENTS, kernels

KERNEL_DIR = Path(__file__).parent / "kernels"
LOG2E = 1.4426950408889634
RUNGS = {r.number: r for r in kernels("forward")}  # the forward CUDA rows of flashkit.gpu.rungs, by number
COMPILE_SECONDS: Dict[tuple, float] = {}  # (rung, d, element, Br, Bc) -> seconds of the first build in this process


def _arch() -> str:
    import cupy

    return f"sm_{cupy.cuda.Device().compute_capability}"


def options(rung: int, d: int, element: str, Br: int, Bc: int) -> tuple:
    """NVRTC's options for one forward rung and one (d, element, Br, Bc)."""
    spec = RUNGS[rung]
    return build_options(d, element, Br if spec.defines_br else None, Bc if spec.defines_bc else None, arch=spec.arch)


@functools.cache
def include_options() -> Tuple[str, ...]:
    """NVRTC options that let a kernel `#include "mma.cuh"` (the shared helpers beside the .cu files).

    CuPy's on-disk cache keys a module by its source and options, not by the headers it includes: the
    headers' hash goes into the options, so editing a header recompiles every kernel that could use it."""
    import hashlib

    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(KERNEL_DIR.glob("*.cuh")))).hexdigest()[:16]
    return (f"-I{KERNEL_DIR}", f"-DFLASHKIT_HEADERS=0x{digest}")


def build_options(d: int, element: str, Br: Optional[int] = None, Bc: Optional[int] = None,
                  arch: Optional[str] = None) -> Tuple[str, ...]:
    """The NVRTC options of one compiled variant: target (`arch`, default the device's own), head size,
    block sizes, element type, includes."""
    options = ["--std=c++17", f"--gpu-architecture={arch or _arch()}", f"-DHEAD_DIM={d}"]
    if Br is not None:
        options.append(f"-DBR={Br}")
    if Bc is not None:
        options.append(f"-DBC={Bc}")
    if element == "bf16":
        options.append("-DUSE_BF16")
    return tuple(options) + include_options()


@functools.cache
def kernel(rung: int, d: int, element: str, Br: int, Bc: int):
    """The compiled `flash_fwd` of one rung for one (d, element, Br, Bc), with its shared-memory limit raised."""
    import cupy

    spec = RUNGS[rung]
    source = (KERNEL_DIR / spec.source).read_text()
    t0 = time.perf_counter()  # NVRTC compile, or a hit in CuPy's on-disk cache
    fn = cupy.RawModule(code=source, options=options(rung, d, element, Br, Bc)).get_function("flash_fwd")
    COMPILE_SECONDS[(rung, d, element, Br, Bc)] = time.perf_counter() - t0
    smem = spec.smem(d, Br, Bc)
    if smem > 48 * 1024:  # above 48 KB a kernel must opt in to more dynamic shared memory
        fn.max_dynamic_shared_size_bytes = smem
    return fn


def blocks_for(rung: int, d: int, block_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    spec = RUNGS[rung]
    if d not in spec.head_dims:
        dims = ", ".join(map(str, spec.head_dims))
        raise ValueError(f"rung {rung} supports head size d in {{{dims}}}; got d={d}")
    if block_size is None:
        return spec.default_blocks[d]
    block_size = tuple(int(x) for x in block_size)
    if block_size not in spec.allowed(d):
        allowed = ", ".join(f"({a}, {b})" for a, b in spec.allowed(d))
        raise ValueError(f"rung {rung} ({spec.source}) supports block_size (Br, Bc) in {{{allowed}}}; got {block_size}")
    return block_size


def forward(rung: int, Q, K, V, *, scale: float, window=(-1, -1), element: Optional[str] = None,
            block_size=None, out=None, lse_out=None, check=None):
    """Run one rung on CuPy arrays Q (B, Hq, Nq, d), K and V (B, Hkv, Nk, d); returns (O, lse).

    `element` names the kernel's element type when the arrays' dtype cannot say it (bf16 data held as
    uint16 bits when CuPy has no bfloat16). `out` / `lse_out`, if given, are written in place (tests
    poison them with NaN first); lse is float32 (B, Hq, Nq) in natural-log units. `check`: a
    flashkit.finite.Deferred of Q, K, V for a rung whose kernel tests its inputs (checks_inputs): the
    kernel claims it (or the separate scan starts, before the launch).
    """
    import cupy

    spec = RUNGS[rung]
    if element is None:
        element = ELEMENTS.get(Q.dtype.name)
    if element not in spec.elements:
        raise TypeError(f"rung {rung} computes {', '.join(spec.dtypes)}; got {Q.dtype.name}")
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
    fn, threads, smem = launch_config(rung, d, element, Br, Bc)
    left, right = window
    i32, f32 = cupy.int32, cupy.float32
    args = (Q, K, V, O, lse, i32(Hq), i32(Hkv), i32(Nq), i32(Nk), f32(scale * LOG2E), i32(left), i32(right))
    if spec.tensor_maps:  # rung 7 reads Q, K and V through TMA tensor maps
        from flashkit.gpu.tma import tensor_maps

        args += (tensor_maps(Q, K, V, Br, Bc),)
    grid = (-(-Nq // Br), Hq, B)
    fused = None
    if check is not None and spec.checks_inputs:  # None: the claim started the separate scan, before the launch
        columns = check_columns(Nq, Nk, Br, Bc, tuple(window))
        fused = check.claim((Q, K, V), columns * Hq * B, columns)
    elif check is not None:
        check.start()
    if spec.checks_inputs:
        args += fused.launch_args if fused is not None else NO_CHECK
    fn(grid, threads, args, shared_mem=smem)
    if fused is not None:
        fused.launched(cupy.cuda.get_current_stream())
    return O, lse


CHECK_HEAVY_HALF = True  # False: causal grids check in all their blocks (benchmarks/gpu_input_check.py times both)
CHECK_MIN_KEY_TILES = 32  # the fused check only where its blocks average this many K/V tiles each (see check_columns)


@functools.lru_cache(maxsize=256)
def check_columns(Nq: int, Nk: int, Br: int, Bc: int, window: tuple) -> int:
    """How many values of blockIdx.x take shares of rung 7's fused NaN/Inf check (kernels/input_check.cuh), or 0
    for the separate scan instead.

    A block's share (finite.FUSED_SHARE bytes) hides behind its compute only if the block has enough of it:
    measured on an H200 (benchmarks/results/gpu-input-check-h200.json, fp16, B*N = 16384, H*d = 2048, 7
    interleaved rounds), the public call over the kernel alone was 1.01-1.05x with the fused check against
    1.03-1.08x with the separate scan where the checking blocks average 32 or more key tiles of 128 (N >= 4096
    non-causal, N = 8192 causal), but 1.09-1.78x against 1.08-1.19x with 8-16 tiles (N = 2048), and mixed with 24
    (N = 4096 causal: 1.05x against 1.08x at d = 64, 1.24x against 1.07x at d = 128, the answer coming late).
    Causal grids (right = 0) check in their heavy half (blockIdx.x < Tr / 2: the kernel runs the longest key
    ranges first), where the whole grid cost causal calls 8-37%: light blocks outlasted their work."""
    from flashkit.masks import row_bounds

    lo, hi = row_bounds(Nq, Nk, window)
    Tr = -(-Nq // Br)
    tiles = []
    for x in range(Tr):  # as the kernel: block x computes query tile Tr - 1 - x
        i0 = (Tr - 1 - x) * Br
        begin, end = int(lo[i0]), int(hi[min(i0 + Br, Nq) - 1])
        first = begin // Bc * Bc
        tiles.append(-(-(end - first) // Bc) if end > first else 0)
    columns = -(-Tr // 2) if window[1] == 0 and CHECK_HEAVY_HALF else Tr
    return columns if sum(tiles[:columns]) >= CHECK_MIN_KEY_TILES * columns else 0

# the fused check's arguments when it is off: no block tests anything (flashkit.finite.Fused.launch_args)
NO_CHECK = (np.int32(0), np.int32(0), np.uint64(0), np.int32(0), np.int64(0), np.uint64(0))


@functools.cache
def launch_config(rung: int, d: int, element: str, Br: int, Bc: int):
    """(compiled kernel, block shape, dynamic shared bytes) of one variant, worked out once per process."""
    spec = RUNGS[rung]
    return kernel(rung, d, element, Br, Bc), (spec.threads(Br, Bc),), spec.smem(d, Br, Bc)


def run(rung: int, problem):
    """(O, lse) of a validated Problem computed by one forward CUDA rung, written into the Problem's
    fresh outputs (problem.new_outputs: NaN when the tests poison them, so a row a kernel forgets stays NaN).
    A rung with `mods` in its row runs score_mod / mask_mod / block masks / bool masks through
    flashkit.gpu.flash_mods (the same kernel with its hooks filled in)."""
    if RUNGS[rung].mods and (problem.has_mods or problem.mask is not None):
        from flashkit.gpu import flash_mods

        return flash_mods.run(rung, problem)
    if problem.mask is not None:
        raise ValueError(f"rung {rung} does not support a custom mask (causal and sliding windows are supported)")
    O, lse = problem.new_outputs(lse_dtype="float32")
    check = None
    if RUNGS[rung].checks_inputs:  # validate.begin left the NaN/Inf check to this kernel
        from flashkit import finite

        check = next((c for c in problem.pending or () if isinstance(c, finite.Deferred)), None)
    return forward(rung, problem.Q, problem.K, problem.V, scale=problem.scale, window=problem.window,
                   element=problem.element, block_size=problem.block_size, out=O, lse_out=lse, check=check)


_BY_NAME = {r.name: r.number for r in RUNGS.values()}


def __getattr__(name: str):
    """`flashkit.gpu.flash:cupy-mma` (a backend's runner) is `run` bound to that rung.

    The registry resolves a runner as "module:attribute" and calls it with the Problem alone; looking the
    attribute up by backend name gives every rung the one `run` without a wrapper function per rung.
    """
    if name in _BY_NAME:
        return functools.partial(run, _BY_NAME[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RUNGS", "forward", "run", "kernel", "blocks_for", "options"]
