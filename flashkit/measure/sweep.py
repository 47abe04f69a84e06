"""A sweep: every combination of backends and shapes, timed one point at a time.

    from flashkit.measure.sweep import sweep
    for row in sweep(backends=["numpy-standard"], N=[128, 256], d=[64], heads=[4]):
        print(row["backend"], row["N"], row["ms"], row["gflops"])

`Sweep` holds what to measure (its lists checked once, with messages that name the argument); `sweep`
yields one result row per point (the columns in COLUMNS), timed by flashkit.measure.timing.time_attention
in its live form (time_robust: warm-up apart, calls per sample by autorange, samples for about
`seconds_per_point`, the minimum with the 75th percentile beside it) under
flashkit.measure.threads.threads_limit. `budget_s` bounds the whole sweep's timing: once it is spent,
the remaining points are skipped with that reason (a sweep on a busy or oversubscribed machine cannot run
for minutes). Rows are written out by flashkit.measure.export.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np

from flashkit import registry, validate
from flashkit.measure.threads import check_threads, current_threads, threads_limit
from flashkit.measure.timing import time_attention
from flashkit.validate import nonneg_int, positive_int

DTYPES = ("float16", "float32", "float64")

# Peers timed beside flashkit's backends in the same sweep, on the same inputs and thread count; their
# rows name them so that no chart mistakes them for flashkit (torch is in the bench extra).
PEERS = {"torch-sdpa-cpu": "torch.nn.functional.scaled_dot_product_attention on the CPU (a peer, not flashkit)"}

# The columns of a result row, in the order tables and CSV files show them.
# ms is the fastest sample (per call), ms_p75 and ms_median its spread, noisy whether that spread is
# large (flashkit.measure.timing.NOISY_SPREAD); repeats is the samples taken, calls the calls a sample
# held, warmup_ms the untimed warm-up (Numba's compile on a first call).
COLUMNS = ("backend", "device", "B", "H", "N", "d", "causal", "dtype", "threads", "ms", "ms_p75",
           "ms_median", "noisy", "gflops", "flops", "repeats", "calls", "warmup_ms", "skipped", "machine")


@dataclass(frozen=True)
class Sweep:
    """What to measure: every combination of the lists below, N innermost, one result row each.

    backends   names from flashkit.backends() (None: the available CPU baselines, see default_backends)
    peers      names from PEERS, timed like a backend (default_peers(): those installed here)
    N          sequence lengths (Nq = Nk = N)
    d, heads   head sizes and numbers of heads; batch is B
    causal     a list of booleans (False, True or both)
    dtype      dtype names from DTYPES
    threads    thread counts (None: leave the current setting)
    repeats    the fewest timed samples a point takes; more while seconds_per_point lasts
    budget_s   seconds of timing for the whole sweep (warm-ups not counted); None: no limit
    """

    backends: Optional[Sequence[str]] = None
    peers: Sequence[str] = ()
    N: Sequence[int] = (128, 256, 512)
    d: Sequence[int] = (64,)
    heads: Sequence[int] = (4,)
    causal: Sequence[bool] = (False,)
    dtype: Sequence[str] = ("float32",)
    threads: Sequence[Optional[int]] = (None,)
    batch: int = 1
    warmup: int = 1
    repeats: int = 3
    seconds_per_point: float = 0.2
    budget_s: Optional[float] = None
    seed: int = 0

    def __post_init__(self):
        names = default_backends() if self.backends is None else self.backends
        set_ = object.__setattr__  # frozen: normalise the lists once, here
        set_(self, "backends", _list_of("backends", names, _backend_arg))
        set_(self, "peers", _list_of("peers", self.peers, _peer_arg) if len(self.peers) else ())
        set_(self, "N", _list_of("N", self.N, lambda v: positive_int("N", v)))
        set_(self, "d", _list_of("d", self.d, lambda v: positive_int("d", v)))
        set_(self, "heads", _list_of("heads", self.heads, lambda v: positive_int("heads", v)))
        set_(self, "causal", _list_of("causal", self.causal, _bool_arg))
        set_(self, "dtype", _list_of("dtype", self.dtype, check_dtype))
        set_(self, "threads", _list_of("threads", self.threads, lambda v: None if v is None else check_threads(v)))
        set_(self, "batch", positive_int("batch", self.batch))
        set_(self, "warmup", nonneg_int("warmup", self.warmup))
        set_(self, "repeats", positive_int("repeats", self.repeats))
        set_(self, "seconds_per_point", _seconds("seconds_per_point", self.seconds_per_point))
        if self.budget_s is not None:
            set_(self, "budget_s", _seconds("budget_s", self.budget_s))

    def points(self) -> List[dict]:
        """The points in the order they are measured (N innermost, so each line of a chart grows)."""
        return [
            {"backend": b, "B": self.batch, "H": h, "N": n, "d": d, "causal": c, "dtype": t, "threads": th}
            for th, t, d, h, c, b, n in itertools.product(self.threads, self.dtype, self.d, self.heads,
                                                          self.causal, self.backends + self.peers, self.N)
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


def peer_unavailable_reason(name: str) -> Optional[str]:
    """None if the peer `name` (a key of PEERS) can run here, else why not."""
    if name not in PEERS:
        return f"unknown peer (known: {', '.join(PEERS)})"
    try:
        import torch  # noqa: F401
    except Exception as exc:  # not installed, or a broken install
        return f"torch does not import ({type(exc).__name__}: {exc}); it is in flashkit's bench extra"
    return None


def default_peers() -> List[str]:
    """The peers that run on this machine (torch's CPU attention when torch is installed)."""
    return [name for name in PEERS if peer_unavailable_reason(name) is None]


def _time_peer(name, q, k, v, causal, threads, spec) -> dict:
    """Time a peer as time_attention times a backend (time_robust), on the same NumPy inputs."""
    import torch
    import torch.nn.functional as F

    from flashkit.measure.timing import time_robust

    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))  # shares the arrays' memory: no copy timed
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the point's thread count, as for flashkit's backends
    try:
        with torch.inference_mode():
            t = time_robust(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal),
                            warmup=spec.warmup, budget_s=spec.seconds_per_point, min_repeats=spec.repeats)
    finally:
        torch.set_num_threads(previous)
    return {"ms": t.min_ms, "ms_p75": t.p75_ms, "ms_median": t.median_ms, "noisy": t.noisy,
            "repeats": len(t.times_ms), "calls": t.number, "warmup_ms": t.warmup_ms}


def sweep(spec: Optional[Sweep] = None, **kwargs) -> Iterator[dict]:
    """Measure every point of `spec` (or Sweep(**kwargs)), yielding one result row as each finishes.

    A row holds the point (backend, device, B, H, N, d, causal, dtype, threads), the result (ms = the
    fastest sample, ms_p75, ms_median, noisy, flops, gflops = GFLOP/s at ms, repeats, calls, warmup_ms)
    and the machine. A point the backend cannot serve (a dtype or head size it lacks), or one reached
    after the sweep's budget_s is spent, is not an error: its row has ms and gflops None and `skipped`
    saying why. Inputs are fresh random arrays, the same for every backend at a point.
    """
    if spec is None:
        spec = Sweep(**kwargs)
    elif kwargs:
        raise TypeError("pass either a Sweep or keyword arguments, not both")
    inputs = {}  # (B, H, N, d, dtype, device) -> (q, k, v), drawn from a seed per shape: every backend
    timed_s = 0.0  # seconds spent timing so far (warm-ups excluded), against spec.budget_s
    for point in spec.points():  # sees the same numbers, and only the current set is kept in memory
        peer = point["backend"] in spec.peers
        backend = None if peer else registry.get(point["backend"])
        device = "cpu" if peer else backend.device
        key = (point["B"], point["H"], point["N"], point["d"], point["dtype"], device)
        if key not in inputs:
            inputs.clear()
            inputs[key] = _random_qkv(*key, seed=spec.seed)
        q, k, v = inputs[key]
        row = dict(point, device=device, ms=None, ms_p75=None, ms_median=None, noisy=None, gflops=None,
                   repeats=0, calls=None, warmup_ms=None, skipped="", machine=_machine_name(device))
        problem = validate.check(q, k, v, causal=point["causal"])
        row["flops"] = problem.flops()
        reason = None if peer else backend.cannot_serve(problem)
        if reason is not None:
            row["skipped"] = reason
        elif spec.budget_s is not None and timed_s >= spec.budget_s:
            row["skipped"] = f"not timed: the sweep's time budget ({spec.budget_s:g} s) was spent"
        else:
            with threads_limit(point["threads"]):
                row["threads"] = current_threads() if device == "cpu" else point["threads"]
                t0 = time.perf_counter()
                if peer:
                    result = _time_peer(point["backend"], q, k, v, point["causal"], row["threads"], spec)
                    result["gflops"] = row["flops"] / (result["ms"] * 1e-3) / 1e9
                else:
                    result = time_attention(q, k, v, backend=backend.name, causal=point["causal"], warmup=spec.warmup,
                                            repeats=spec.repeats, budget_s=spec.seconds_per_point)
                timed_s += time.perf_counter() - t0 - result["warmup_ms"] * 1e-3
            row.update({c: result[c] for c in ("ms", "ms_p75", "ms_median", "noisy", "gflops", "repeats", "calls",
                                               "warmup_ms")})
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


# Argument checks of a Sweep (clear messages that name the argument)
def _bool_arg(v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"causal must be a list of True/False; got {v!r}")
    return bool(v)


def check_dtype(v) -> str:
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


def _seconds(name, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v >= 0:
        raise ValueError(f"{name} must be a number of seconds >= 0; got {v!r}")
    return float(v)


def _peer_arg(v) -> str:
    reason = peer_unavailable_reason(v) if isinstance(v, str) else "not a name"
    if reason is not None:
        raise ValueError(f"peers must be names from PEERS ({', '.join(PEERS)}) that run here; got {v!r}: {reason}")
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
