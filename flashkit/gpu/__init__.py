"""FlashAttention forward kernels on an NVIDIA GPU, written in CUDA C++ and launched from CuPy.

A ladder: rung 1 in standard.py, rungs 2-6 one file each under flashkit/gpu/kernels/ (read them in order,
each opens with what changed, why, and what it measured):

  rung 1  cupy-standard     S = Q K^T and P = softmax(S) materialised with CuPy (cuBLAS): O(N^2) memory
  rung 2  cupy-fp32-row     fp32, one thread per query row, K_j/V_j tiles in shared memory
  rung 3  cupy-fp32-tile    fp32, 4x8 register blocks of S per thread, warp-shuffle row reductions
  rung 4  cupy-mma          fp16/bf16 tensor cores (inline PTX mma.sync.m16n8k16), FA2 warp partition
  rung 5  cupy-mma-async    + ldmatrix, padded bank-conflict-free tiles, cp.async pipelining (FA2 order)
  rung 6  cupy-mma-2tile    + two 16-row m-tiles per warp (FA2's 4 warps x 32 rows), Q re-read from shared

CuPy arrays in, CuPy arrays out. Nothing here imports CuPy until a kernel runs. Correctness:
`python -m flashkit.gpu.check`; everything at once (tests, sanitizer, benchmark):
`python -m benchmarks.gpu_check`; measured results: benchmarks/NOTES-gpu.md.
"""
from __future__ import annotations

from flashkit.registry import Backend

_KERNEL_DTYPES = ("float16", "bfloat16")
_DIMS = (32, 64, 128)

# What every CUDA rung (2-6) shares: GPU only, d in _DIMS, causal and windows, no custom mask.
_KERNEL = dict(device="gpu", head_dims=_DIMS, mask=False, window=True)

BACKENDS = (
    Backend(
        name="cupy-standard",
        device="gpu",
        summary="CuPy/cuBLAS, materialises S and P (Nq x Nk per head) on the GPU: the O(N^2) baseline",
        runner="flashkit.gpu.standard:standard_attention",
        dtypes=("float16", "bfloat16", "float32", "float64"),
        head_dims=None,
        mask=True,
        window=True,
        priority=60,
        probe="flashkit.gpu:_probe",
        rung=1,
    ),
    Backend(
        name="cupy-fp32-row",
        summary="CUDA fp32, one thread per query row, K/V tiles in shared memory (kernels/2_fp32_row.cu)",
        runner="flashkit.gpu.flash:run_rung2",
        dtypes=("float32",),
        priority=70,
        probe="flashkit.gpu:_probe",
        rung=2,
        **_KERNEL,
    ),
    Backend(
        name="cupy-fp32-tile",
        summary="CUDA fp32, register-blocked S tiles, warp-shuffle reductions (kernels/3_fp32_tile.cu)",
        runner="flashkit.gpu.flash:run_rung3",
        dtypes=("float32",),
        priority=80,
        probe="flashkit.gpu:_probe",
        rung=3,
        **_KERNEL,
    ),
    Backend(
        name="cupy-mma",
        summary="CUDA fp16/bf16 tensor cores, mma.sync m16n8k16, FA2 partition (kernels/4_mma.cu)",
        runner="flashkit.gpu.flash:run_rung4",
        dtypes=_KERNEL_DTYPES,
        priority=90,
        probe="flashkit.gpu:_probe_tensor_cores",
        rung=4,
        **_KERNEL,
    ),
    Backend(
        name="cupy-mma-async",
        summary="rung 4 + ldmatrix, cp.async pipelining, mask-free full tiles (kernels/5_mma_async.cu)",
        runner="flashkit.gpu.flash:run_rung5",
        dtypes=_KERNEL_DTYPES,
        priority=100,
        probe="flashkit.gpu:_probe_tensor_cores",
        rung=5,
        **_KERNEL,
    ),
    Backend(
        name="cupy-mma-2tile",
        summary="rung 5 with 32 query rows per warp: each K/V fragment feeds 2 mma (kernels/6_mma_2tile.cu)",
        runner="flashkit.gpu.flash:run_rung6",
        dtypes=_KERNEL_DTYPES,
        priority=110,
        probe="flashkit.gpu:_probe_tensor_cores",
        rung=6,
        **_KERNEL,
    ),
)


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
