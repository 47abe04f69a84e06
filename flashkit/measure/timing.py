"""Timing: one call, timed a few times; the FLOP count; attention timed as a user calls it.

    from flashkit.measure import timing
    t = timing.time_call(lambda: flashkit.attention(q, k, v), warmup=1, repeats=5)
    t.median_ms, t.min_ms

This is the one clock of flashkit and its benchmarks. How a call is timed: `warmup` untimed calls
(Numba compiles, caches fill), then `repeats` timed calls; we report the median (robust to a neighbour
stealing a core) and the minimum. The CPU clock is time.perf_counter; for CuPy arrays a pair of CUDA
events brackets each call, because the launch returns before the GPU has finished. `median_time` is the
benchmark scripts' form: timed calls until a count or a time budget runs out, with the process's CPU
time beside the wall time. `time_attention` times the whole flashkit.attention call, input checks
included: what a user waits for. On the GPU the NaN/Inf check costs a device-to-host sync, which shows
at small N (measured on an H100: about 0.5 ms a call at N = 512).

FLOPs of a forward pass, as FlashAttention counts them: S = QK^T is 2·Nq·Nk·d, O = PV another
2·Nq·Nk·d, per batch and head: 4·B·H·Nq·Nk·d, times the fraction of S a causal mask or window leaves
visible (about one half for causal). The softmax's exp and sums are not counted. The formula is
flashkit.problem.flops, the one every benchmark uses. GFLOP/s = FLOPs / seconds / 1e9.

The rest of measuring lives beside this module: threads.py (how many threads, for Numba and BLAS
together), sweep.py (a grid of points), export.py (JSON, CSV and a text table of the rows).
Numba and CuPy are imported only when needed.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

from flashkit import registry, validate
from flashkit.problem import flops as problem_flops
from flashkit.validate import nonneg_int as _nonneg_int
from flashkit.validate import positive_int as _positive_int

# Notebooks 06 and 08 call these through `timing`; they live in threads.py and export.py.
from flashkit.measure.export import format_table  # noqa: F401
from flashkit.measure.threads import current_threads, max_threads, threads_limit  # noqa: F401


# ---------------------------------------------------------------------------------------------
# One call
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """The times of the timed calls, in milliseconds."""

    times_ms: tuple

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, cuda: bool = False) -> Timing:
    """Call fn() `warmup` times untimed, then `repeats` times timed.

    cuda=True brackets each call with CUDA events (CuPy, imported here) and waits for the end event,
    so the time is the GPU's, not the launch's.
    """
    warmup = _nonneg_int("warmup", warmup)
    repeats = _positive_int("repeats", repeats)
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        import cupy

        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        cupy.cuda.get_current_stream().synchronize()
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(float(cupy.cuda.get_elapsed_time(start, end)))  # ms
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(tuple(times))


def attention_flops(B: int, H: int, Nq: int, Nk: int, d: int, *, causal: bool = False, window=None) -> float:
    """Forward FLOPs (flashkit.problem.flops) with `causal` and `window` given as flashkit.attention takes them."""
    from flashkit.masks import effective_window

    return problem_flops(B, H, Nq, Nk, d, effective_window(causal, window))


def time_attention(q, k, v, *, backend: str = "auto", warmup: int = 1, repeats: int = 5, **kwargs) -> dict:
    """Time flashkit.attention(q, k, v, backend=..., **kwargs): ms (median), ms_min, flops, gflops.

    kwargs are attention's (causal, window, mask, scale, block_size). CuPy arrays are timed with CUDA
    events. A custom mask does not change the FLOP count (only causal and window do).
    """
    from flashkit.api import attention

    problem = validate.check(q, k, v, **{key: kwargs[key] for key in
                                        ("causal", "scale", "window", "mask", "block_size") if key in kwargs})
    chosen = registry.choose(problem, backend)  # the real name when backend="auto"; raises if it cannot serve
    timing = time_call(lambda: attention(q, k, v, backend=chosen.name, **kwargs),
                       warmup=warmup, repeats=repeats, cuda=problem.xp.__name__ == "cupy")
    flops = problem.flops()
    return {"backend": chosen.name, "ms": timing.median_ms, "ms_min": timing.min_ms,
            "flops": flops, "gflops": flops / (timing.median_ms * 1e-3) / 1e9, "repeats": repeats}


# ---------------------------------------------------------------------------------------------
# The benchmarks' loop: a count or a time budget, whichever ends first
# ---------------------------------------------------------------------------------------------
def median_time(fn, *, repeats=5, budget_s=20.0, warmup=1, cuda=False) -> dict:
    """Warm up, then time `fn()` up to `repeats` times (fewer if over budget, never fewer than 3):
    median, min, all runs (s). Each run is one time_call sample (CUDA events with cuda=True).

    Also the median CPU time of this process per run (all its threads): on an idle machine with n
    threads busy, wall ~ cpu / n; a wall time well above that means other processes took the cores."""
    for _ in range(warmup):
        fn()
    runs, cpu = [], []
    start = time.perf_counter()
    while len(runs) < repeats and (len(runs) < 3 or time.perf_counter() - start < budget_s):
        c0 = time.process_time()
        runs.append(time_call(fn, warmup=0, repeats=1, cuda=cuda).times_ms[0] / 1e3)
        cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(runs), "min_s": min(runs), "runs_s": runs,
            "cpu_median_s": statistics.median(cpu)}


def stream_time(fn, *, calls=20, rounds=3, budget_s=1.0, warmup=1) -> dict:
    """GPU time per call of `fn` issued back to back, as a training loop issues them: CUDA events around
    `calls` calls with no wait between them, `rounds` times; the median round's time per call (s).

    A call's host work (validation, the launch) overlaps the previous call's kernel, as it does for a user;
    where the host work is longer than the kernel, the GPU waits and the time shows it. `calls` shrinks
    (to >= 3) so that one round takes about budget_s / rounds."""
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    t0 = time.perf_counter()
    fn()
    cupy.cuda.get_current_stream().synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    calls = max(3, min(calls, int(budget_s / rounds / one)))
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    per_call = []
    for _ in range(rounds):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        per_call.append(cupy.cuda.get_elapsed_time(start, end) / 1e3 / calls)
    return {"median_s": statistics.median(per_call), "min_s": min(per_call), "rounds_s": per_call, "calls": calls}
