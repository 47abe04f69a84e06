"""FlashAttention forward kernels on an NVIDIA GPU, written in CUDA C++ and launched from CuPy.

A ladder: rung 1 in standard.py, rungs 2-7 one file each under flashkit/gpu/kernels/ (read them in order,
each opens with what changed, why, and what it measured). Each rung is one row of the table in rungs.py:

  rung 1  cupy-standard     S = Q K^T and P = softmax(S) materialised with CuPy (cuBLAS): O(N^2) memory;
                            its backward too (P and dP materialised: the GPU backward of mask= and float64)
  rung 2  cupy-fp32-row     fp32, one thread per query row, K_j/V_j tiles in shared memory
  rung 3  cupy-fp32-tile    fp32, 4x8 register blocks of S per thread, warp-shuffle row reductions
  rung 4  cupy-mma          fp16/bf16 tensor cores (inline PTX mma.sync.m16n8k16), FA2 warp partition
  rung 5  cupy-mma-async    + ldmatrix, padded bank-conflict-free tiles, cp.async pipelining (FA2 order)
  rung 6  cupy-mma-2tile    + two 16-row m-tiles per warp (FA2's 4 warps x 32 rows), Q re-read from shared;
                            also score_mod / mask_mod / block masks / bool masks (flash_mods.py, modlang.py)
  rung 7  cupy-wgmma        Hopper only: wgmma from shared memory, TMA loads on mbarriers, producer/consumer warpgroups

and the backward (FlashAttention-2's Algorithm 2), rows of the same table launched by backward.py:

  backward rung 1  cupy-bwd-fp32         fp32, dQ by fp32 atomics
  backward rung 2  cupy-bwd-mma          fp16/bf16 mma.sync, dQ by fp32 vector atomics, then converted
  backward rung 3  cupy-bwd-mma-2kernel  fp16/bf16, a dK/dV kernel and a dQ kernel: no atomics, deterministic
  backward rung 4  cupy-bwd-wgmma        Hopper only: wgmma for the five products, TMA, producer warp + two consumer
                                         warpgroups, dQ by fp32 vector atomics

CuPy arrays in, CuPy arrays out. Nothing here imports CuPy until a kernel runs. Correctness:
`python -m flashkit.gpu.check`; everything at once (tests, sanitizer, benchmark):
`python -m benchmarks.gpu_check`; measured results: benchmarks/NOTES-gpu.md.
"""
from __future__ import annotations

from flashkit.gpu.rungs import RUNGS

# Every row of the ladder's table is a backend: a forward row a forward backend, a backward row a
# backward-only one (flashkit.attention_backward).
BACKENDS = tuple(r.backend() for r in RUNGS)


def _probe():
    """None if CuPy imports and sees a CUDA device, else the reason it cannot run here."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CuPy built for another CUDA
        return f"CuPy is not installed or does not load ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no CUDA device visible to CuPy ({type(exc).__name__}: {exc})"
    if n == 0:
        return "no CUDA device visible to CuPy"
    return None


def _probe_tensor_cores():
    """The tensor-core rungs need mma.sync m16n8k16 with bf16, ldmatrix and cp.async: compute capability >= 8.0."""
    reason = _probe()
    if reason is not None:
        return reason
    import cupy

    cc = int(cupy.cuda.Device().compute_capability)
    if cc < 80:
        return f"needs a GPU of compute capability >= 8.0 (mma.sync bf16, cp.async); this one is {cc // 10}.{cc % 10}"
    return None


def _probe_hopper():
    """Rung 7 is built for sm_90a (wgmma, setmaxnreg, TMA): it runs on compute capability 9.0 only."""
    reason = _probe()
    if reason is not None:
        return reason
    import cupy

    cc = int(cupy.cuda.Device().compute_capability)
    if cc != 90:
        return f"needs a Hopper GPU (compute capability 9.0: wgmma, TMA, setmaxnreg); this one is {cc // 10}.{cc % 10}"
    return None
