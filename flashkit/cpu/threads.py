"""How many threads a Numba kernel runs on, and on which threading layer.

Two measured facts decide it (benchmarks/cpu_small.py, results in benchmarks/results/cpu-small-*.json):

* On a machine whose cores are busy with something else (a browser, a notebook server, another job:
  every laptop in a workshop), Numba's default `omp` layer (GNU OpenMP) made the median of a small
  parallel call about 8 ms whatever its size, 10-40x its single-thread time: a parallel region waits
  for its slowest thread, and a descheduled OpenMP worker is woken late. Numba's own `workqueue` layer
  recovered most of it. flashkit therefore selects `workqueue` unless the user chose a layer
  (NUMBA_THREADING_LAYER or numba.config.THREADING_LAYER set before flashkit's first kernel).
* Below about `SERIAL_FLOPS` of work a second thread saves less than a parallel region can cost on a
  busy machine, so small calls run on the calling thread alone.

NumPy's own BLAS (numpy-standard) has the same trouble: a 128 x 128 x 64 product on its 2-thread
OpenBLAS pool took 12-16 ms instead of 0.03 ms while another process kept a core busy (measured here,
load average 2 on 2 cores), because the product waits for a second thread that is not running. So the
small calls of numpy-standard run their BLAS on one thread too (`blas_for_work`).

`workqueue` is not thread-safe (two Python threads launching parallel kernels at once abort the
process), so every flashkit kernel launch holds `_LAUNCH`.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

# About 5 ms of work on one core at 50 GFLOP/s: below it one thread, above it all of them.
SERIAL_FLOPS = 2.5e8

_LAUNCH = threading.Lock()
_CONFIGURED = []


def choose_layer() -> None:
    """Prefer Numba's workqueue layer unless the user picked one; a no-op once a kernel has run."""
    if _CONFIGURED:
        return
    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "workqueue"
    _CONFIGURED.append(True)


@contextlib.contextmanager
def for_work(flops: float):
    """Run the body (one kernel launch) on one thread when `flops` is small, else on Numba's count."""
    import numba

    choose_layer()
    with _LAUNCH:
        if flops >= SERIAL_FLOPS:
            yield
            return
        previous = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            yield
        finally:
            numba.set_num_threads(previous)


@functools.cache
def _blas_controller():
    import scipy.linalg.cython_blas  # noqa: F401  (load SciPy's OpenBLAS so threadpoolctl sees it)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_blas_thread():
    """A context in which BLAS runs on one thread: each prange task of rung 3 calls it, so threads must
    not nest. scipy.linalg.cython_blas (the BLAS behind Numba's np.dot) is imported first; otherwise
    threadpoolctl does not see SciPy's OpenBLAS, and 2 tasks x 2 BLAS threads oversubscribe the cores
    (measured on a 2-core znver5 machine: one 51 ms call took 1.7 s)."""
    return _blas_controller().limit(limits=1, user_api="blas")


@functools.cache
def _numpy_blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # NumPy's own BLAS is loaded already; SciPy's is not needed here


def numpy_blas_one_thread():
    """NumPy's BLAS on one thread while the context lasts (a threadpoolctl limit). A decoding step's
    matrix-vector products are too small to share, and OpenBLAS's idle threads spin on the cores the
    split-K decode threads need: TinyDecoder at B = 1, L = 16k went from 5.3 to 13.0 tokens/s with it on a
    loaded 2-core machine (benchmarks/decode.py, its blas_threads=1 row)."""
    return _numpy_blas_controller().limit(limits=1, user_api="blas")


@contextlib.contextmanager
def blas_for_work(flops: float):
    """NumPy code (numpy-standard): BLAS on one thread below SERIAL_FLOPS, else as configured. Only
    NumPy's BLAS is limited: importing SciPy for its BLAS (one_blas_thread) took 1.2 s of a first
    NumPy call on a loaded 2-core machine."""
    if flops >= SERIAL_FLOPS:
        yield
        return
    with _numpy_blas_controller().limit(limits=1, user_api="blas"):
        yield
