"""Timing: one call, timed a few times; live timings robust to a busy machine; the FLOP count.

    from flashkit.measure import timing
    t = timing.time_call(lambda: flashkit.attention(q, k, v), warmup=1, repeats=5)
    t.median_ms, t.min_ms
    t = timing.time_robust(lambda: flashkit.attention(q, k, v), budget_s=0.2)
    t.min_ms, t.p75_ms, t.spread, t.noisy

This is the one clock of flashkit and its benchmarks. How a call is timed: `warmup` untimed calls
(Numba compiles, caches fill), then `repeats` timed calls; we report the median (robust to a neighbour
stealing a core) and the minimum. The CPU clock is time.perf_counter; for CuPy arrays a pair of CUDA
events brackets each call, because the launch returns before the GPU has finished. `median_time` is the
benchmark scripts' form: timed calls until a count or a time budget runs out, with the process's CPU
time beside the wall time. `time_attention` times the whole flashkit.attention call, input checks
included: what a user waits for. On the GPU the NaN/Inf check costs a device-to-host sync, which shows
at small N (measured on an H100: about 0.5 ms a call at N = 512).

Live timings (the dashboard, the notebooks' sweeps) use `time_robust`, because a notebook shares its
cores with the browser, the server and whatever else the laptop runs: with one core busy, medians of
small calls jumped 10x and maxima 40x while the minimum stayed put (measured on the 2-core machines,
shared/FACTS.md). So: the warm-up calls are timed apart (`warmup_ms`: Numba's compile shows there, not
in the result); the number of calls in one sample is chosen as timeit's autorange chooses it (1, 2, 5,
10, 20, 50, ... until a sample lasts `min_sample_s`, so the clock's resolution does not matter); samples
are taken until a time budget is spent (at least `min_repeats`, at most `max_repeats`); and the result
is the minimum with the spread kept beside it: the 75th percentile, and `spread` = p75 / min - 1. A
point whose spread is above NOISY_SPREAD is `noisy`: the figures draw it with a warning.

FLOPs of a forward pass, as FlashAttention counts them: S = QK^T is 2·Nq·Nk·d, O = PV another
2·Nq·Nk·d, per batch and head: 4·B·H·Nq·Nk·d, times the fraction of S a causal mask or window leaves
visible (about one half for causal). The softmax's exp and sums are not counted. The formula is
flashkit.problem.flops, the one every benchmark uses. GFLOP/s = FLOPs / seconds / 1e9.

The rest of measuring lives beside this module: threads.py (how many threads, for Numba and BLAS
together), sweep.py (a grid of points), export.py (JSON, CSV and a text table of the rows).
Numba and CuPy are imported only when needed.
"""
from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

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
# A point whose 75th percentile is more than 1.5x its minimum is marked noisy: on a quiet machine the
# spread of these calls stays within a few tens of percent.
NOISY_SPREAD = 0.5


@dataclass(frozen=True)
class Timing:
    """The times of the timed samples, in milliseconds per call (a sample of `number` calls counts
    its mean), and the time the untimed warm-up calls took."""

    times_ms: tuple
    number: int = 1
    warmup_ms: float = 0.0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    def quantile_ms(self, q: float) -> float:
        """The q-quantile of the samples (0 the minimum, 0.5 the median, 1 the maximum), interpolated
        between the order statistics as numpy.quantile does by default."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be between 0 and 1; got {q!r}")
        ordered = sorted(self.times_ms)
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    @property
    def p75_ms(self) -> float:
        return self.quantile_ms(0.75)

    @property
    def spread(self) -> float:
        """How far the samples stray above the fastest: p75 / min - 1 (0 for identical samples)."""
        return self.p75_ms / self.min_ms - 1.0 if self.min_ms > 0 else 0.0

    @property
    def noisy(self) -> bool:
        """True when the spread is above NOISY_SPREAD, or there are too few samples (< 3) to tell."""
        return len(self.times_ms) < 3 or self.spread > NOISY_SPREAD


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


def time_attention(q, k, v, *, backend: str = "auto", warmup: int = 1, repeats: int = 5,
                   budget_s: Optional[float] = None, **kwargs) -> dict:
    """Time flashkit.attention(q, k, v, backend=..., **kwargs).

    budget_s=None: `repeats` calls after `warmup` (time_call); ms is the median, ms_min the minimum.
    budget_s a number: the live form (time_robust), samples for about budget_s seconds, at least
    `repeats`; ms is the minimum, ms_median and ms_p75 the spread, `noisy` says whether it is large.
    Both give flops and gflops (from ms), repeats (samples taken), calls (calls a sample) and warmup_ms.
    kwargs are attention's (causal, window, mask, scale, block_size). CuPy arrays are timed with CUDA
    events. A custom mask does not change the FLOP count (only causal and window do).
    """
    from flashkit.api import attention

    problem = validate.check(q, k, v, **{key: kwargs[key] for key in
                                        ("causal", "scale", "window", "mask", "block_size") if key in kwargs})
    chosen = registry.choose(problem, backend)  # the real name when backend="auto"; raises if it cannot serve
    cuda = problem.xp.__name__ == "cupy"

    def call():
        return attention(q, k, v, backend=chosen.name, **kwargs)

    flops = problem.flops()
    if budget_s is None:
        t = time_call(call, warmup=warmup, repeats=repeats, cuda=cuda)
        return {"backend": chosen.name, "ms": t.median_ms, "ms_min": t.min_ms, "flops": flops,
                "gflops": flops / (t.median_ms * 1e-3) / 1e9, "repeats": repeats}
    t = time_robust(call, warmup=warmup, budget_s=budget_s, min_repeats=repeats, cuda=cuda)
    return {"backend": chosen.name, "ms": t.min_ms, "ms_median": t.median_ms, "ms_p75": t.p75_ms,
            "noisy": t.noisy, "flops": flops, "gflops": flops / (t.min_ms * 1e-3) / 1e9,
            "repeats": len(t.times_ms), "calls": t.number, "warmup_ms": t.warmup_ms}


# ---------------------------------------------------------------------------------------------
# Live timings: calls per sample chosen by time, samples until a budget is spent, min and spread
# ---------------------------------------------------------------------------------------------
def autorange(fn: Callable[[], object], *, min_sample_s: float = 1e-3, clock=time.perf_counter,
              max_number: int = 10**6) -> tuple:
    """How many calls one sample should hold: the first of 1, 2, 5, 10, 20, 50, ... whose sample lasts
    at least `min_sample_s` (timeit.Timer.autorange's sequence). Returns (number, seconds of that
    sample): the trial samples are real samples, so the caller may keep the last one."""
    number = 1
    for scale in itertools.count():
        for step in (1, 2, 5):
            number = step * 10**scale
            t0 = clock()
            for _ in range(number):
                fn()
            seconds = clock() - t0
            if seconds >= min_sample_s or number >= max_number:
                return number, seconds
    raise AssertionError("unreachable")


def time_robust(fn: Callable[[], object], *, warmup: int = 1, budget_s: float = 0.2, min_repeats: int = 5,
                max_repeats: int = 100, min_sample_s: float = 1e-3, cuda: bool = False,
                clock=time.perf_counter) -> Timing:
    """Time fn() as a live figure should (see the module docstring): `warmup` untimed calls (their
    time is kept as warmup_ms), calls per sample by `autorange`, then samples until `budget_s` seconds
    of sampling are spent, never fewer than `min_repeats` nor more than `max_repeats`.

    cuda=True: each sample is one call bracketed by CUDA events (time_call), as the GPU's clock is the
    event pair; `clock` (a function returning seconds) is the CPU clock, replaceable in tests.
    """
    warmup = _nonneg_int("warmup", warmup)
    min_repeats = _positive_int("min_repeats", min_repeats)
    max_repeats = _positive_int("max_repeats", max_repeats)
    if max_repeats < min_repeats:
        raise ValueError(f"max_repeats must be at least min_repeats ({min_repeats}); got {max_repeats}")
    if not budget_s >= 0:
        raise ValueError(f"budget_s must be a number of seconds >= 0; got {budget_s!r}")
    t0 = clock()
    for _ in range(warmup):
        fn()
    warmup_ms = (clock() - t0) * 1e3
    start = clock()
    if cuda:
        times, number = [], 1
        while len(times) < max_repeats and (len(times) < min_repeats or clock() - start < budget_s):
            times.append(time_call(fn, warmup=0, repeats=1, cuda=True).times_ms[0])
        return Timing(tuple(times), number, warmup_ms)
    number, seconds = autorange(fn, min_sample_s=min_sample_s, clock=clock)
    times = [seconds * 1e3 / number]
    while len(times) < max_repeats and (len(times) < min_repeats or clock() - start < budget_s):
        s0 = clock()
        for _ in range(number):
            fn()
        times.append((clock() - s0) * 1e3 / number)
    return Timing(tuple(times), number, warmup_ms)


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
