"""Timing attention: one call, the FLOP count, a sweep that yields one point at a time, and exports.

    from flashkit.measure import timing
    for row in timing.sweep(backends=["numpy-standard"], N=[128, 256], d=[64], heads=[4]):
        print(row["backend"], row["N"], row["ms"], row["gflops"])

How a point is timed: `warmup` untimed calls (Numba compiles, caches fill), then `repeats` timed
calls; we report the median (robust to a neighbour stealing a core) and the minimum. The CPU clock is
time.perf_counter; for CuPy arrays a pair of CUDA events brackets each call, because the launch
returns before the GPU has finished. The time is that of the whole flashkit.attention call, input
checks included: what a user waits for. On the GPU the NaN/Inf check costs a device-to-host sync,
which shows at small N (measured on an H100: about 0.5 ms a call at N = 512).

FLOPs of a forward pass, as FlashAttention counts them: S = QK^T is 2·Nq·Nk·d, O = PV another
2·Nq·Nk·d, per batch and head: 4·B·H·Nq·Nk·d, times the fraction of S a causal mask or window leaves
visible (about one half for causal). The softmax's exp and sums are not counted. The formula is
flashkit.problem.flops, the one every benchmark uses. GFLOP/s = FLOPs / seconds / 1e9.

Threads: `threads=n` sets Numba's thread count (numba.set_num_threads) and limits the BLAS that
NumPy calls (threadpoolctl) for the duration of the point, so "2 threads" means the same for every
backend. Numba and CuPy are imported only when needed.
"""
from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import numbers
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np

from flashkit import registry, validate
from flashkit.atomic import write_text
from flashkit.measure import provenance
from flashkit.problem import flops as problem_flops

DTYPES = ("float16", "float32", "float64")

# The columns of a result row, in the order tables and CSV files show them.
COLUMNS = ("backend", "device", "B", "H", "N", "d", "causal", "dtype", "threads", "ms", "ms_min",
           "gflops", "flops", "repeats", "skipped", "machine")


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
# Threads
# ---------------------------------------------------------------------------------------------
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
    n = _threads_arg(n)
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


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sweep:
    """What to measure: every combination of the lists below, N innermost, one result row each.

    backends   names from flashkit.backends() (None: the available CPU baselines, see default_backends)
    N          sequence lengths (Nq = Nk = N)
    d, heads   head sizes and numbers of heads; batch is B
    causal     a list of booleans (False, True or both)
    dtype      dtype names from DTYPES
    threads    thread counts (None: leave the current setting)
    """

    backends: Optional[Sequence[str]] = None
    N: Sequence[int] = (128, 256, 512)
    d: Sequence[int] = (64,)
    heads: Sequence[int] = (4,)
    causal: Sequence[bool] = (False,)
    dtype: Sequence[str] = ("float32",)
    threads: Sequence[Optional[int]] = (None,)
    batch: int = 1
    warmup: int = 1
    repeats: int = 3
    seed: int = 0

    def __post_init__(self):
        names = default_backends() if self.backends is None else self.backends
        set_ = object.__setattr__  # frozen: normalise the lists once, here
        set_(self, "backends", _list_of("backends", names, _backend_arg))
        set_(self, "N", _list_of("N", self.N, lambda v: _positive_int("N", v)))
        set_(self, "d", _list_of("d", self.d, lambda v: _positive_int("d", v)))
        set_(self, "heads", _list_of("heads", self.heads, lambda v: _positive_int("heads", v)))
        set_(self, "causal", _list_of("causal", self.causal, _bool_arg))
        set_(self, "dtype", _list_of("dtype", self.dtype, _dtype_arg))
        set_(self, "threads", _list_of("threads", self.threads, lambda v: None if v is None else _threads_arg(v)))
        set_(self, "batch", _positive_int("batch", self.batch))
        set_(self, "warmup", _nonneg_int("warmup", self.warmup))
        set_(self, "repeats", _positive_int("repeats", self.repeats))

    def points(self) -> List[dict]:
        """The points in the order they are measured (N innermost, so each line of a chart grows)."""
        return [
            {"backend": b, "B": self.batch, "H": h, "N": n, "d": d, "causal": c, "dtype": t, "threads": th}
            for th, t, d, h, c, b, n in itertools.product(self.threads, self.dtype, self.d, self.heads,
                                                          self.causal, self.backends, self.N)
        ]

    def __len__(self) -> int:
        return len(self.points())


def default_backends() -> List[str]:
    """The available CPU baselines (backends outside a ladder: rung None), e.g. NumPy standard and the
    fastest Numba kernel; all available CPU backends if there is no such baseline. The split-K decoding
    kernels are left out: a sweep of N x N problems is a prefill, which they serve only slowly."""
    cpu = [b for b in registry.all_backends() if b.device == "cpu" and b.available and not b.has_decode]
    baselines = [b.name for b in cpu if b.rung is None]
    return baselines or [b.name for b in cpu]


def sweep(spec: Optional[Sweep] = None, **kwargs) -> Iterator[dict]:
    """Measure every point of `spec` (or Sweep(**kwargs)), yielding one result row as each finishes.

    A row holds the point (backend, device, B, H, N, d, causal, dtype, threads), the result (ms =
    median, ms_min, flops, gflops = GFLOP/s, repeats) and the machine. A point the backend cannot serve
    (a dtype or head size it lacks) is not an error: its row has ms and gflops None and `skipped` saying
    why. Inputs are fresh random arrays, the same for every backend at a point.
    """
    if spec is None:
        spec = Sweep(**kwargs)
    elif kwargs:
        raise TypeError("pass either a Sweep or keyword arguments, not both")
    inputs = {}  # (B, H, N, d, dtype, device) -> (q, k, v), drawn from a seed per shape: every backend
    for point in spec.points():  # sees the same numbers, and only the current set is kept in memory
        backend = registry.get(point["backend"])
        key = (point["B"], point["H"], point["N"], point["d"], point["dtype"], backend.device)
        if key not in inputs:
            inputs.clear()
            inputs[key] = _random_qkv(*key, seed=spec.seed)
        q, k, v = inputs[key]
        row = dict(point, device=backend.device, ms=None, ms_min=None, gflops=None, repeats=spec.repeats,
                   skipped="", machine=_machine_name(backend.device))
        problem = validate.check(q, k, v, causal=point["causal"])
        row["flops"] = problem.flops()
        reason = backend.cannot_serve(problem)
        if reason is not None:
            row["skipped"] = reason
        else:
            with threads_limit(point["threads"]):
                row["threads"] = current_threads() if backend.device == "cpu" else point["threads"]
                result = time_attention(q, k, v, backend=backend.name, causal=point["causal"],
                                        warmup=spec.warmup, repeats=spec.repeats)
            row.update(ms=result["ms"], ms_min=result["ms_min"], gflops=result["gflops"])
        yield {c: row[c] for c in COLUMNS}


def _random_qkv(B, H, N, d, dtype, device, seed=0):
    rng = np.random.default_rng([seed, B, H, N, d])
    q, k, v = (rng.standard_normal((B, H, N, d), dtype=np.float32).astype(dtype) for _ in range(3))  # (B, H, N, d)
    if device == "gpu":
        import cupy

        q, k, v = cupy.asarray(q), cupy.asarray(k), cupy.asarray(v)
    return q, k, v


def _machine_name(device: str) -> str:
    from flashkit import sysinfo

    if device == "gpu":
        gpus = sysinfo.gpus()
        return gpus[0]["name"] if gpus else "GPU"
    return f"{sysinfo.cpu_model()} ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------
# Argument checks (clear messages that name the argument)
# ---------------------------------------------------------------------------------------------
def _positive_int(name, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer; got {v!r}")
    return int(v)


def _nonneg_int(name, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {v!r}")
    return int(v)


def _threads_arg(v) -> int:
    n = _positive_int("threads", v)
    top = max_threads()
    if n > top:
        raise ValueError(f"threads must be between 1 and {top} (the thread pool of this machine); got {n}")
    return n


def _bool_arg(v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"causal must be a list of True/False; got {v!r}")
    return bool(v)


def _dtype_arg(v) -> str:
    name = np.dtype(v).name if not isinstance(v, str) else v
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {v!r}")
    return name


def _backend_arg(v) -> str:
    if not isinstance(v, str):
        raise ValueError(f"backends must be a list of backend names; got {v!r}")
    known = [b.name for b in registry.all_backends()]
    if v not in known:
        raise ValueError(f"backends must be names from flashkit.backends() ({', '.join(known)}); got {v!r}")
    backend = registry.get(v)
    reason = backend.unavailable_reason()
    if reason is not None:
        raise ValueError(f"backend {v!r} is not available on this machine: {reason}")
    return v


def _list_of(name, values, check) -> tuple:
    if not isinstance(values, (list, tuple, range, np.ndarray)):
        values = [values]  # one value stands for a list of one
    out = []
    for v in values:
        v = check(v)
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError(f"{name} must not be empty")
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Export: CSV and JSON, written atomically, with the machine, versions and git commit
# ---------------------------------------------------------------------------------------------
def metadata(spec: Optional[Sweep] = None) -> dict:
    """Where results came from (flashkit.measure.provenance): flashkit.info() (machine, versions), git
    commit, UTC time, load average, BLAS; and the sweep's settings."""
    from flashkit import info

    meta = {"created": provenance.now_utc(), "commit": provenance.commit_label(), "info": info(),
            "load_average": provenance.load_average(), "blas": provenance.blas_info()}
    if spec is not None:
        meta["sweep"] = {k: getattr(spec, k) for k in ("backends", "N", "d", "heads", "causal", "dtype",
                                                         "threads", "batch", "warmup", "repeats", "seed")}
    return meta


def write_atomic(path, text: str) -> Path:
    """Write text to path atomically (flashkit.atomic): a reader never sees half a file."""
    return write_text(path, text)


def to_json(rows: Sequence[dict], meta: Optional[dict] = None) -> str:
    """{"meta": ..., "results": [...]} as indented JSON."""
    return json.dumps({"meta": metadata() if meta is None else meta, "results": list(rows)}, indent=2,
                      default=_json_default) + "\n"


def to_csv(rows: Sequence[dict], meta: Optional[dict] = None) -> str:
    """One row per point (COLUMNS), plus the flashkit, NumPy and Numba versions and the git commit in
    every row, so the file stays one plain table that any CSV reader loads."""
    meta = metadata() if meta is None else meta
    versions = meta["info"]["versions"]
    extra = {"flashkit": meta["info"]["flashkit"], "numpy": versions.get("numpy", ""),
             "numba": versions.get("numba", ""), "commit": meta.get("commit") or "", "created": meta["created"]}
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS) + list(extra), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**{c: ("" if row.get(c) is None else row.get(c)) for c in COLUMNS}, **extra})
    return out.getvalue()


def write_json(rows: Sequence[dict], path, meta: Optional[dict] = None) -> Path:
    return write_atomic(path, to_json(rows, meta))


def write_csv(rows: Sequence[dict], path, meta: Optional[dict] = None) -> Path:
    return write_atomic(path, to_csv(rows, meta))


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


# ---------------------------------------------------------------------------------------------
# A text table
# ---------------------------------------------------------------------------------------------
def format_table(rows: Sequence[dict]) -> str:
    """Rows as an aligned text table: backend, B, H, N, d, causal, dtype, threads, ms, GFLOP/s, and a
    note column (why a point was skipped) when any was."""
    head = ["backend", "B", "H", "N", "d", "causal", "dtype", "threads", "ms (median)", "GFLOP/s"]
    notes = any(r["skipped"] for r in rows)
    if notes:
        head.append("note")
    body = []
    for r in rows:
        timed = r["ms"] is not None
        cells = [r["backend"], str(r["B"]), str(r["H"]), str(r["N"]), str(r["d"]), "yes" if r["causal"] else "no",
                 r["dtype"], "-" if r["threads"] is None else str(r["threads"]),
                 f"{r['ms']:.3f}" if timed else "-", f"{r['gflops']:.2f}" if timed else "-"]
        body.append(cells + ([r["skipped"] or ""] if notes else []))
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    numeric = {1, 2, 3, 4, 7, 8, 9}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])
