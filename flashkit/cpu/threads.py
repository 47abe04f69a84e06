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

`workqueue` is not thread-safe (two Python threads launching parallel kernels at once abort the
process), so every flashkit kernel launch holds `_LAUNCH`.
"""
from __future__ import annotations

import contextlib
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
