"""The two ceilings of the GPU in use, measured: dense GEMM TFLOP/s and device copy bandwidth (CuPy).

    from flashkit.measure import ceilings
    roof = ceilings.measure()   # {"gemm_tflops": {"float16": ..., "float32": ...}, "bandwidth_tbps": ..., "sources": ...}

A roofline bounds a kernel by min(peak, bandwidth x intensity); both numbers belong to the card the
kernel ran on, so they are measured there, in the same run, never copied from another card (an H100's
790 TFLOP/s and 2.97 TB/s are not an H200's 752 and 4.18).

- GEMM: C = A B with A, B of n x n, 2·n³ FLOPs (a multiply-add is 2), n = 8192: large enough for cuBLAS
  to reach its peak. float32 is true fp32 (CuPy uses TF32 only when CUPY_TF32=1). CuPy has no bfloat16;
  benchmarks/gpu_forward.py times that GEMM with torch through `time_gemm`.
- Copy: a device-to-device copy of a 2 GiB buffer reads and writes every byte once: 2·bytes per second,
  the traffic model of flashkit.measure.gpu_results counts reads and writes alike.

Each is the median of 10 calls bracketed by CUDA events (flashkit.measure.timing.median_time) after two
warm-up calls. Needs CuPy and a CUDA device; nothing is imported until a function runs.
"""
from __future__ import annotations

from flashkit.measure.timing import median_time

GEMM_N = 8192
COPY_BYTES = 2 * 2**30
REPEATS = 10


def time_gemm(matmul, n: int, repeats: int = REPEATS) -> float:
    """TFLOP/s of `matmul()`, one product of two n x n matrices on the GPU: 2·n³ over its median time."""
    t = median_time(matmul, repeats=repeats, budget_s=float("inf"), warmup=2, cuda=True)
    return 2.0 * n**3 / t["median_s"] / 1e12


def gemm_tflops(dtype: str = "float16", n: int = GEMM_N, repeats: int = REPEATS) -> float:
    """TFLOP/s of a CuPy (cuBLAS) GEMM of n x n matrices in `dtype` ("float16" or "float32")."""
    import cupy

    rng = cupy.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=cupy.float32).astype(dtype) for _ in range(2))
    c = cupy.empty_like(a)  # allocated once, outside the timed calls
    return time_gemm(lambda: cupy.matmul(a, b, out=c), n, repeats)


def copy_tbps(nbytes: int = COPY_BYTES, repeats: int = REPEATS) -> float:
    """TB/s of a device-to-device copy of `nbytes`, counting the bytes read and the bytes written."""
    import cupy

    a = cupy.ones(nbytes // 4, cupy.float32)
    b = cupy.empty_like(a)
    t = median_time(lambda: b.data.copy_from_device_async(a.data, a.nbytes), repeats=repeats,
                    budget_s=float("inf"), warmup=2, cuda=True)
    return 2.0 * a.nbytes / t["median_s"] / 1e12


def measure(dtypes=("float16", "float32"), n: int = GEMM_N, nbytes: int = COPY_BYTES) -> dict:
    """The ceilings of this machine's current GPU, in the form gpu_results.ceilings() returns and
    flashkit.viz.gpu.roofline_figure takes: gemm_tflops per dtype, bandwidth_tbps, and their sources."""
    from flashkit.measure import provenance

    card = provenance.gpu_info()["card"]
    where = f"measured live on {card} (flashkit.measure.ceilings)"
    return {"gemm_tflops": {dt: gemm_tflops(dt, n) for dt in dtypes}, "bandwidth_tbps": copy_tbps(nbytes),
            "gemm_n": n, "copy_bytes": nbytes, "sources": {"gemm_tflops": where, "bandwidth_tbps": where}}
