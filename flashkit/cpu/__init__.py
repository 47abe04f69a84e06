"""Numba kernels on the CPU: a ladder of FlashAttention-2 forward kernels, fastest last.

    rung 1  numba-loops     plain loops, one query row at a time              flashkit/cpu/loops.py
    rung 2  numba-regblock  loops over 4 query rows at once (register blocking) flashkit/cpu/regblock.py
    rung 3  numba-gemm      block GEMMs through np.dot (BLAS) + polynomial exp  flashkit/cpu/gemm.py
    numba                   the fastest rung available here (rung 3; rung 2 without SciPy)

Nothing here imports Numba: the kernels load when a backend first runs (import flashkit stays fast).
simd.py holds the micro-kernels (dot product, weighted add, exp) with their scalar twins.
"""
from __future__ import annotations

import functools
import importlib.util

from flashkit.registry import Backend


def _probe():
    """None when Numba can be imported here, else the reason."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install numba)"
    return None


@functools.lru_cache(maxsize=None)
def _probe_gemm():
    """Rung 3 calls BLAS through SciPy (Numba's np.dot) and pins it to one thread with threadpoolctl."""
    reason = _probe()
    if reason is not None:
        return reason
    missing = [m for m in ("scipy", "threadpoolctl") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Numba's np.dot needs SciPy's BLAS)"
    return None


def run_fastest_backward(problem):
    """The "numba" backend's backward: backward rung 3 (FA2 Algorithm 2 with BLAS tile GEMMs)."""
    reason = _probe_gemm()
    if reason is not None:
        raise RuntimeError(f"the numba backward needs SciPy's BLAS: {reason}")
    from flashkit.cpu import backward_gemm

    return backward_gemm.run(problem)


def run_fastest(problem):
    """The "numba" backend: rung 3 where SciPy and threadpoolctl are installed, else rung 2."""
    if _probe_gemm() is None:
        from flashkit.cpu import gemm

        return gemm.run(problem)
    from flashkit.cpu import regblock

    return regblock.run(problem)


_COMMON = dict(device="cpu", dtypes=("float32", "float64"), mask=True, window=True)

BACKENDS = (
    Backend(name="numba", summary="Numba, FlashAttention-2 on all cores: the fastest rung below",
            runner="flashkit.cpu:run_fastest", backward="flashkit.cpu:run_fastest_backward",
            probe="flashkit.cpu:_probe", priority=50, **_COMMON),
    Backend(name="numba-loops", summary="Numba rung 1: plain loops, one query row at a time",
            runner="flashkit.cpu.loops:run", probe="flashkit.cpu:_probe", priority=20, rung=1, **_COMMON),
    Backend(name="numba-regblock", summary="Numba rung 2: register-blocked loops, 4 query rows at once",
            runner="flashkit.cpu.regblock:run", probe="flashkit.cpu:_probe", priority=30, rung=2, **_COMMON),
    Backend(name="numba-gemm", summary="Numba rung 3: block GEMMs (BLAS np.dot) and a vectorised exp",
            runner="flashkit.cpu.gemm:run", backward="flashkit.cpu.backward_gemm:run",
            probe="flashkit.cpu:_probe_gemm", priority=40, rung=3, **_COMMON),
)
