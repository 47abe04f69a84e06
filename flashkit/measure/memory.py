"""Peak memory of one attention call beyond its inputs and its output: measured, and counted.

Measured, three ways, each for the allocator it can see:
  tracemalloc  NumPy reports every array buffer it allocates to Python's tracemalloc, so the traced
               peak during the call is the NumPy working memory (S, P, tiles, temporaries). Used for
               NumPy arrays and the NumPy backends. Blind to Numba's own allocator and to BLAS buffers.
  rss          the process's peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs):
               sees every allocator (Numba, BLAS) but also page-level noise of a few hundred KiB.
  cupy-pool    a CuPy memory hook that follows every malloc/free of CuPy's memory pool during the
               call and keeps the peak in use. Used only when CuPy arrays are given (CuPy is imported
               lazily, so this file needs no GPU).

Counted (the "analytic" memory), for the same shapes:
  standard     S and P, B·H·Nq·Nk words each: O(N^2). (flashkit's numpy-standard computes P in the
               buffer of S, so it measures one N^2 matrix, not two.)
  tiled        the working set of one worker: Q_i, O_i (Br x d), K_j, V_j (Bc x d), m_i, l_i (Br) and
               the tile S_ij / P_ij (Br x Bc), times the number of workers: independent of N, while the
               inputs and output it streams are O(N·d).

"Beyond its inputs and output": the peak counts from what was allocated when the call started, and
the arrays the call returns (O, and lse) are subtracted, so what is left is the memory the algorithm
needed on top of the problem it was given.
"""
from __future__ import annotations

import os
import time
import tracemalloc
from dataclasses import dataclass
from typing import Callable

import numpy as np

from flashkit.validate import positive_int

METHODS = ("tracemalloc", "rss", "cupy-pool")
MiB = 2 ** 20


@dataclass(frozen=True)
class MemoryReport:
    """One measured call. Bytes are exact integers as the method reports them."""

    peak_bytes: int  # highest memory in use during the call, above what was in use when it started
    output_bytes: int  # bytes of the arrays the call returned (kept alive after it)
    method: str  # "tracemalloc", "rss" or "cupy-pool"
    seconds: float  # wall time of the call (slowed down by tracemalloc: not a benchmark)

    @property
    def extra_bytes(self) -> int:
        """Working memory beyond the inputs and the output: peak minus what the call returned."""
        return max(0, self.peak_bytes - self.output_bytes)

    @property
    def extra_mib(self) -> float:
        return self.extra_bytes / MiB


def _is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def _returned_bytes(result) -> int:
    """nbytes of every array in what a call returned (an array or a tuple of arrays)."""
    items = result if isinstance(result, (tuple, list)) else (result,)
    return int(sum(getattr(a, "nbytes", 0) for a in items))


def _measure_tracemalloc(fn: Callable, *args, **kwargs):
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if started_here:
            tracemalloc.stop()
    return result, MemoryReport(peak - before, _returned_bytes(result), "tracemalloc", seconds)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def rss_available() -> bool:
    """True where the peak resident memory can be reset and read (Linux /proc)."""
    return os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")


def _release_free_heap() -> None:
    """Ask glibc to hand freed heap memory back to the OS (malloc_trim); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure_rss(fn: Callable, *args, **kwargs):
    if not rss_available():
        raise RuntimeError("method='rss' needs Linux's /proc/self/clear_refs and /proc/self/status")
    _release_free_heap()  # so that memory freed by earlier calls and reused now shows as new pages
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # "5" resets VmHWM (the peak resident set) to the current resident set
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return result, MemoryReport((peak - before) * 1024, _returned_bytes(result), "rss", seconds)


def _measure_cupy_pool(fn: Callable, *args, **kwargs):
    import cupy  # lazily: only CuPy arrays bring us here

    class _PeakHook(cupy.cuda.MemoryHook):
        """Follows the memory pool's mallocs and frees during the call; keeps the peak in use."""

        name = "flashkit-peak"

        def __init__(self):
            self.in_use = 0
            self.peak = 0

        def malloc_postprocess(self, **kw):
            self.in_use += kw["mem_size"]
            self.peak = max(self.peak, self.in_use)

        def free_postprocess(self, **kw):
            self.in_use -= kw["mem_size"]

    cupy.cuda.Device().synchronize()
    hook = _PeakHook()
    t0 = time.perf_counter()
    with hook:
        result = fn(*args, **kwargs)
        cupy.cuda.Device().synchronize()
    seconds = time.perf_counter() - t0
    # The pool rounds each block up (512 B granularity), so subtract the outputs' rounded sizes.
    items = result if isinstance(result, (tuple, list)) else (result,)
    out = int(sum(-(-a.nbytes // 512) * 512 for a in items if hasattr(a, "nbytes")))
    return result, MemoryReport(hook.peak, out, "cupy-pool", seconds)


def measure(fn: Callable, *args, method: str = "auto", **kwargs):
    """Call fn(*args, **kwargs) once and measure its peak memory. Returns (result, MemoryReport).

    method "auto" picks "cupy-pool" when any positional argument is a CuPy array, else "tracemalloc".
    """
    if method not in ("auto",) + METHODS:
        raise ValueError(f"method must be 'auto' or one of {', '.join(METHODS)}; got {method!r}")
    if method == "auto":
        method = "cupy-pool" if any(_is_cupy(a) for a in args) else "tracemalloc"
    runner = {"tracemalloc": _measure_tracemalloc, "rss": _measure_rss, "cupy-pool": _measure_cupy_pool}[method]
    return runner(fn, *args, **kwargs)


def default_method(backend: str, q=None) -> str:
    """The method that sees a backend's allocations: CuPy arrays -> "cupy-pool"; the NumPy backends
    ("numpy-*", whose every buffer is a NumPy array) -> "tracemalloc"; any other CPU backend (Numba
    allocates through its own runtime, invisible to tracemalloc) -> "rss" where Linux offers it."""
    if q is not None and _is_cupy(q):
        return "cupy-pool"
    if backend.startswith("numpy") or not rss_available():
        return "tracemalloc"
    return "rss"


def attention_peak(q, k, v, *, method: str = "auto", **attention_kwargs) -> MemoryReport:
    """Peak memory of one flashkit.attention(q, k, v, **attention_kwargs) call beyond inputs and output;
    `measure_attention` is the same and also returns (o, lse)."""
    return measure_attention(q, k, v, method=method, **attention_kwargs)[1]


def measure_attention(q, k, v, *, method: str = "auto", **attention_kwargs):
    """((o, lse), MemoryReport) of one flashkit.attention(q, k, v, **attention_kwargs) call.

    The call is made with return_lse=True so that both outputs it allocates (O and lse) are returned
    and subtracted; what remains in `extra_bytes` is the algorithm's working memory. method "auto"
    uses `default_method` for the backend named (backend="auto" counts as a NumPy backend only when
    no Numba backend is available: name the backend to be sure what is measured).
    """
    import flashkit

    if method == "auto":
        backend = attention_kwargs.get("backend", "auto")
        if backend == "auto":
            names = [b["name"] for b in flashkit.backends() if b["available"] and b["device"] == "cpu"]
            backend = "numpy" if all(n.startswith("numpy") for n in names) else "other"
        method = default_method(backend, q)
    attention_kwargs = dict(attention_kwargs, return_lse=True)
    return measure(flashkit.attention, q, k, v, method=method, **attention_kwargs)


# ---------------------------------------------------------------------------------- analytic counts
def _positive_ints(**values):
    for name, value in values.items():
        positive_int(name, value)


def analytic_standard(B: int, H: int, Nq: int, Nk: int, itemsize: int = 4) -> dict:
    """Bytes of the matrices standard attention materialises: S = QK^T·scale and P = softmax(S)."""
    _positive_ints(B=B, H=H, Nq=Nq, Nk=Nk, itemsize=itemsize)
    words = B * H * Nq * Nk  # one Nq x Nk matrix per (batch, head)
    return {"S": words * itemsize, "P": words * itemsize}


def analytic_tiled(d: int, Br: int, Bc: int, itemsize: int = 4, workers: int = 1) -> dict:
    """Bytes of the tiled working set: per worker Q_i, O_i (Br x d), K_j, V_j (Bc x d), m_i, l_i (Br)
    and the tile S_ij (P_ij is computed in its place), times `workers` (threads or thread blocks)."""
    _positive_ints(d=d, Br=Br, Bc=Bc, itemsize=itemsize, workers=workers)
    per_worker = {
        "Q_i": Br * d, "O_i": Br * d, "K_j": Bc * d, "V_j": Bc * d,
        "m_i": Br, "l_i": Br, "S_ij": Br * Bc,
    }
    return {name: words * itemsize * workers for name, words in per_worker.items()}


def fit_loglog_slope(N, bytes_) -> float:
    """Least-squares slope of log(bytes) against log(N): 2 for memory growing as N^2, 1 as N."""
    N = np.asarray(N, np.float64)
    y = np.asarray(bytes_, np.float64)
    if N.shape != y.shape or N.size < 2:
        raise ValueError("N and bytes_ must be two sequences of the same length (at least 2)")
    if (N <= 0).any() or (y <= 0).any():
        raise ValueError("N and bytes_ must be positive to fit on a log-log scale")
    return float(np.polyfit(np.log(N), np.log(y), 1)[0])


def fit_power_law(N, bytes_) -> dict:
    """Fit bytes = a + b·N^p (a fixed part, a part growing as a power of N), least squares in log space.

    A plain log-log slope bends towards 0 where a fixed working set (the tiles) is as large as the part
    that grows with N; fitting the fixed part separately gives the exponent p of the growing part.
    Returns {"a": bytes, "b": bytes per N^p, "p": exponent}.
    """
    from scipy.optimize import curve_fit

    N = np.asarray(N, np.float64)
    y = np.asarray(bytes_, np.float64)
    if N.shape != y.shape or N.size < 4:
        raise ValueError("N and bytes_ must be two sequences of the same length (at least 4 points for 3 parameters)")
    if (N <= 0).any() or (y <= 0).any():
        raise ValueError("N and bytes_ must be positive")
    model = lambda n, a, b, p: np.log(a + b * n ** p)  # noqa: E731
    p0 = (0.5 * y.min(), y[-1] / N[-1], 1.0)
    (a, b, p), _ = curve_fit(model, N, np.log(y), p0=p0, bounds=([0.0, 0.0, 0.0], [np.inf, np.inf, 4.0]))
    return {"a": float(a), "b": float(b), "p": float(p)}


def total_ram_bytes() -> int:
    """This machine's total RAM, from /proc/meminfo (Linux) or os.sysconf elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def available_ram_bytes() -> int:
    """RAM available now without swapping (MemAvailable), or the total where /proc is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return total_ram_bytes()


def largest_n_that_fits(bytes_per_n2: float, ram_bytes: int, bytes_per_n: float = 0.0) -> int:
    """Largest N with bytes_per_n2·N^2 + bytes_per_n·N <= ram_bytes (a measured memory model)."""
    if bytes_per_n2 <= 0 or ram_bytes <= 0:
        raise ValueError("bytes_per_n2 and ram_bytes must be positive")
    a, b, c = bytes_per_n2, bytes_per_n, -float(ram_bytes)
    return int((-b + np.sqrt(b * b - 4 * a * c)) / (2 * a))
