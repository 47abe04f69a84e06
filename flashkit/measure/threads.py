"""How many threads the CPU kernels use, and a block that sets it for Numba and BLAS together.

`threads_limit(n)` sets Numba's thread count (numba.set_num_threads) and limits the BLAS that NumPy
calls (threadpoolctl) for the duration of the block, so "2 threads" means the same for every backend
(the sweep, the dashboard and the notebooks time under it). Numba is imported only when installed.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

from flashkit.validate import positive_int


def max_threads() -> int:
    """The most threads a point may use: Numba's pool size when Numba is installed, else the cores."""
    try:
        import numba
    except ImportError:
        return os.cpu_count() or 1
    return int(numba.config.NUMBA_NUM_THREADS)


def current_threads() -> int:
    """Threads the CPU kernels use now (Numba's setting, or the core count without Numba)."""
    try:
        import numba
    except ImportError:
        return os.cpu_count() or 1
    return int(numba.get_num_threads())


@contextlib.contextmanager
def threads_limit(n: Optional[int]):
    """Use n threads for Numba kernels and for BLAS inside the block; None leaves both as they are."""
    if n is None:
        yield
        return
    n = check_threads(n)
    with contextlib.ExitStack() as stack:
        try:
            import numba
        except ImportError:
            numba = None
        if numba is not None:
            previous = numba.get_num_threads()
            numba.set_num_threads(n)
            stack.callback(numba.set_num_threads, previous)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            stack.enter_context(threadpool_limits(limits=n, user_api="blas"))
        yield


def check_threads(v) -> int:
    """v as a thread count between 1 and max_threads(), else ValueError saying the range."""
    n = positive_int("threads", v)
    top = max_threads()
    if n > top:
        raise ValueError(f"threads must be between 1 and {top} (the thread pool of this machine); got {n}")
    return n
