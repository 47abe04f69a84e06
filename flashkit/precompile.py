"""Compiling the Numba kernels without making the first call wait for them.

A Numba backend compiles its kernels on its first call in a new process: rung 4's forward, the first
flashkit.attention call of fp32 (1, 8, 1024, 64), took 21.8 s on a shared 2-core Intel Xeon with an
empty Numba cache and 0.90 s from the cache (load average 3-4, min of 2 rounds; most of the 0.9 s is
importing Numba, which imports SciPy's linalg, and Numba's first type registries).
"auto" does not make its caller wait for that: while the kernel it picks compiles in a background
thread, its calls are served by NumPy, and once the kernel is ready "auto" uses it. Measured in the
same run: the first call 0.20 s with an empty cache (the rung ready 19.7 s later) and 0.19 s from the
cache (ready after 1.0 s); benchmarks/cpu_compile.py, results/cpu-compile-*.json.

    served meanwhile by    numpy-standard (S and P materialised), or numpy-tiled once S of the call
                           would exceed STANDARD_MAX_SCORES scores; decoding by numpy-splitk
    not in the background  a backend named explicitly (backend="numba", "numba-fused", ...): it compiles
                           on the calling thread, as before; and calls with a score_mod / mask_mod (their
                           kernel is compiled for the user's functions)
    flashkit.warmup()      compiles (or loads from the cache) the kernels "auto" uses here, and waits;
                           warmup(wait=False) starts it and returns at once
    flashkit.backends()    key "compiled": "yes", "compiling", "no", "failed: why" ("" for a backend with
                           nothing to compile)
    FLASHKIT_BACKGROUND_COMPILE=0   "auto" compiles on the calling thread (the first call waits)

The two paths agree to float rounding, not bit for bit: the first calls of a process may differ from
later ones in the last bits (both are checked against the float64 reference in tests/).

A kernel is specialised by Numba for the types of its arguments, and flashkit's kernels see the same
types whatever the shape (C-contiguous arrays of the dtype, int64 and float64 scalars), so compiling
one backend for one dtype is done by running it once on a tiny problem; readiness is tracked per
(backend, direction, dtype) in the registry, and a backend that has run once is ready. One worker
thread compiles, one kernel after the other. It is not a daemon: a process that ends while it works
waits for it (the kernels then land in the cache for the next process) rather than killing the
compiler mid-write. If a background compile fails, "auto" stops serving from NumPy for that backend
and calls it, so the error reaches the caller.
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading

from flashkit import registry

STANDARD_MAX_SCORES = 2**24  # B * Hq * Nq * Nk: S in float32 is 64 MiB, and NumPy makes 2-3 arrays of it
FALLBACK = {"forward": ("numpy-standard", "numpy-tiled"), "backward": ("numpy-standard", "numpy-tiled")}

_LOCK = threading.Lock()
_QUEUE: collections.deque = collections.deque()  # keys (backend name, direction, dtype) to compile, in order
_DONE: dict = {}  # key -> threading.Event, set when its compile ended (ready or failed)
_FAILED: dict = {}  # key -> the reason
_WORKER: list = []  # the running worker thread, if any


def background_enabled() -> bool:
    return os.environ.get("FLASHKIT_BACKGROUND_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def key_of(backend, problem, direction):
    """(name, direction, dtype computed): float16 runs in float32 on a backend without it."""
    dtype = problem.dtype_name if problem.dtype_name in backend.dtypes else "float32"
    return backend.name, direction, dtype


def serve(problem, chosen, direction, requested, *, start=True):
    """The backend to run now: `chosen`, or, when "auto" chose a Numba backend that is not compiled yet
    for this direction and dtype, a NumPy backend while it compiles in the background. start=False
    returns (backend, key) instead and leaves starting the compile of `key` (None: nothing to start)
    to the caller: `serving` starts it once the call is done."""
    backend, key = chosen, None
    if requested == "auto" and chosen.jit and not getattr(problem, "has_mods", False) and background_enabled():
        wanted = key_of(chosen, problem, direction)
        with _LOCK:
            failed = wanted in _FAILED  # then it compiles (and fails) on this thread: the caller sees the error
        if not registry.is_compiled(*wanted) and not failed:
            fallback = _fallback(problem, direction)
            if fallback is not None:
                backend, key = fallback, wanted
    if not start:
        return backend, key
    if key is not None:
        with _LOCK:
            _submit(key)
    return backend


@contextlib.contextmanager
def serving(problem, chosen, direction, requested):
    """`serve` for one call: the backend to run it with, the background compile started when the call
    returns, so the compiler's Python work does not compete for the GIL with that call (on a loaded
    2-core machine the first NumPy-served call took 0.85 s with the compile beside it; measured by
    benchmarks/cpu_compile.py; 0.20 s with the compile started after it)."""
    backend, key = serve(problem, chosen, direction, requested, start=False)
    try:
        yield backend
    finally:
        if key is not None:
            with _LOCK:
                _submit(key)


def _fallback(problem, direction):
    """A backend with nothing to compile that serves `problem`, or None."""
    ok = [b for b in registry.all_backends() if not b.jit and b.computes(direction) and b.available
          and b.cannot_serve(problem, direction) is None]
    if direction in FALLBACK:
        small, large = FALLBACK[direction]
        want = small if problem.B * problem.Hq * problem.Nq * problem.Nk <= STANDARD_MAX_SCORES else large
        named = [b for b in ok if b.name == want]
        if named:
            return named[0]
    return max(ok, key=lambda b: b.priority, default=None)


def _submit(key):
    """Queue `key` unless it is queued or done; start the worker if none runs. Holds _LOCK."""
    if key in _DONE:
        return
    _DONE[key] = threading.Event()
    _QUEUE.append(key)
    if not _WORKER:
        worker = threading.Thread(target=_work, name="flashkit-compile", daemon=False)
        _WORKER.append(worker)
        worker.start()


def _work():
    while True:
        with _LOCK:
            if not _QUEUE:
                _WORKER.clear()
                return
            key = _QUEUE.popleft()
        try:
            compile_now(*key)
        except Exception as exc:  # reported by serve (the caller's own call raises it) and backends()
            with _LOCK:
                _FAILED[key] = f"{type(exc).__name__}: {exc}"
        finally:
            _DONE[key].set()


def compile_now(name, direction, dtype):
    """Compile (or load from Numba's cache) what backend `name` runs in `direction` for `dtype`, on
    this thread: run it on tiny problems. Decoding runs two sizes, one below and one above the size
    where the kernel moves from the calling thread to the thread pool (two kernels)."""
    import numpy as np

    from flashkit import validate

    backend = registry.get(name)
    rng = np.random.default_rng(0)

    def rand(*shape):
        return rng.standard_normal(shape).astype(dtype)

    q, k, v = rand(1, 4, 16, 64), rand(1, 1, 16, 64), rand(1, 1, 16, 64)
    if direction == "forward":
        backend.run(validate.check(q, k, v))
    elif direction == "backward":
        from flashkit.reference import standard_attention

        o, lse = standard_attention(validate.check(q, k, v))
        backend.run_backward(validate.check_backward(rand(*q.shape), q, k, v, o.astype(dtype), lse))
    elif direction == "decode":
        from flashkit.cpu.decode import SERIAL_BYTES

        n_large = SERIAL_BYTES // (2 * 64 * np.dtype(dtype).itemsize) + 64
        for n in (16, n_large):
            kc, vc = rand(1, 1, n, 64), rand(1, 1, n, 64)
            backend.run_decode(validate.check_decode(q[:, :, :1], kc, vc), "auto")
    else:
        raise ValueError(f"direction must be one of {registry.DIRECTIONS}; got {direction!r}")


def state(name):
    """What backends() reports for backend `name`: "" (nothing to compile), "yes" (compiled for at least
    one direction and dtype), "compiling", "failed: why" or "no"."""
    backend = registry.get(name)
    if not backend.jit:
        return ""
    with _LOCK:
        mine = [key for key in _DONE if key[0] == name]
        failed = [_FAILED[key] for key in mine if key in _FAILED]
        busy = any(not _DONE[key].is_set() for key in mine)
    if busy:
        return "compiling"
    if registry.compiled_for(name):
        return "yes"
    return f"failed: {failed[0]}" if failed else "no"


def _auto_problem(direction, dtype):
    """A problem of the size "auto" meets in practice (beyond the small-call rule), to ask choose with."""
    import numpy as np

    from flashkit import validate

    q = np.zeros((1, 1, 1024, 64), dtype)
    if direction == "forward":
        return validate.check(q, q, q)
    if direction == "backward":
        return validate.check_backward(q, q, q, q, q, np.zeros((1, 1, 1024), "float32"))
    return validate.check_decode(q[:, :, :1], q, q)


def warmup(directions=("forward", "backward", "decode"), dtypes=("float32",), *, wait=True, timeout=None):
    """Compile (or load from Numba's cache) the CPU kernels that "auto" picks on this machine for each
    direction ("forward": flashkit.attention, "backward": attention_backward, "decode":
    flashkit.decode.attention_decode) and dtype, in the background thread "auto" uses.

    wait : True (default) returns when they are ready (or `timeout` seconds passed); False returns at once.
    Returns {(backend, direction, dtype): "yes" | "compiling" | "failed: why"}; a failure is reported,
    not raised. Calling it again costs nothing for what is compiled.
    """
    if isinstance(directions, str):
        directions = (directions,)
    if isinstance(dtypes, str):
        dtypes = (dtypes,)
    keys = []
    for direction in directions:
        if direction not in registry.DIRECTIONS:
            raise ValueError(f"directions must be among {registry.DIRECTIONS}; got {direction!r}")
        for dtype in dtypes:
            if dtype not in ("float32", "float64"):
                raise ValueError(f"dtypes must be among ('float32', 'float64'); got {dtype!r}")
            problem = _auto_problem(direction, dtype)
            chosen = registry.choose(problem, "auto", direction=direction)
            if chosen.jit:
                keys.append(key_of(chosen, problem, direction))
    with _LOCK:
        for key in keys:
            if not registry.is_compiled(*key) and key not in _FAILED:
                _submit(key)
        events = [_DONE[key] for key in keys if key in _DONE]
    if wait:
        for event in events:
            event.wait(timeout)
    result = {}
    for key in keys:
        with _LOCK:
            failed = _FAILED.get(key)
        result[key] = ("yes" if registry.is_compiled(*key) else f"failed: {failed}" if failed else "compiling")
    return result
