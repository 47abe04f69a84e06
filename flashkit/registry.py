"""The named backends: what each one is, whether it can run here, and which one "auto" picks.

A backend is a name, a device, what it supports, a `run(problem) -> (O, lse)` and, where it has one,
a `run_backward(problem) -> (dQ, dK, dV)`, both loaded lazily, so `import flashkit` never imports
Numba or CuPy. Modules that provide backends (flashkit.cpu,
flashkit.gpu) list them in a `BACKENDS` tuple; this file gathers them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple


@dataclass(frozen=True)
class Backend:
    """One implementation of attention.

    name       what users pass as backend=...
    device     "cpu" (NumPy arrays) or "gpu" (CuPy arrays)
    summary    one line for the backends table
    dtypes     dtype names computed natively; float16 input to a backend without it runs in float32
    head_dims  supported head sizes d, or None for any
    mask       whether a custom boolean mask is supported
    mods       whether it takes FlexAttention's score_mod / mask_mod / block_mask (flashkit.mods); the
               forward only: no backward takes them yet
    priority   "auto" picks the available backend with the highest priority that supports the request
    runner     "module:function" that takes a Problem and returns (O, lse); None for a backward-only rung
    backward   "module:function" that takes a Problem carrying dO, O and lse (validate.check_backward)
               and returns (dQ, dK, dV) shaped like Q, K, V; None when the backend has no backward
    probe      "module:function" returning None when usable here, else the reason it is not
    """

    name: str
    device: str
    summary: str
    runner: Optional[str]
    backward: Optional[str] = None
    dtypes: Tuple[str, ...] = ("float32", "float64")
    head_dims: Optional[Tuple[int, ...]] = None
    mask: bool = True
    mods: bool = False
    window: bool = True
    priority: int = 0
    probe: Optional[str] = None
    rung: Optional[int] = None  # place in its ladder (None for baselines outside a ladder)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def unavailable_reason(self) -> Optional[str]:
        """None if this backend can run on this machine, else why not (cached)."""
        if "reason" not in self._cache:
            reason = None
            if self.probe is not None:
                try:
                    reason = _resolve(self.probe)()
                except Exception as exc:  # a broken optional dependency is a reason, not a crash
                    reason = f"{type(exc).__name__}: {exc}"
            self._cache["reason"] = reason
        return self._cache["reason"]

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    @property
    def has_forward(self) -> bool:
        return self.runner is not None

    @property
    def has_backward(self) -> bool:
        return self.backward is not None

    def cannot_serve(self, problem, direction: str = "forward") -> Optional[str]:
        """None if this backend supports `problem` in `direction` ("forward" or "backward"), else a
        sentence saying what it lacks."""
        if direction == "backward" and not self.has_backward:
            return f"backend {self.name!r} has no backward pass (see flashkit.backends(): column 'backward')"
        if direction == "forward" and not self.has_forward:
            return f"backend {self.name!r} computes only the backward pass; use flashkit.attention_backward"
        if self.device == "gpu" and problem.xp.__name__ != "cupy":
            return f"backend {self.name!r} runs on the GPU and needs CuPy arrays; got NumPy arrays"
        if self.device == "cpu" and problem.xp.__name__ != "numpy":
            return f"backend {self.name!r} runs on the CPU and needs NumPy arrays; got CuPy arrays"
        name = problem.dtype_name
        if name not in self.dtypes and not (name == "float16" and "float32" in self.dtypes):
            return f"backend {self.name!r} supports dtypes {', '.join(self.dtypes)}; got {name}"
        if self.head_dims is not None and problem.d not in self.head_dims:
            dims = ", ".join(map(str, self.head_dims))
            return f"backend {self.name!r} supports head size d in {{{dims}}}; got d={problem.d}"
        if problem.mask is not None and not self.mask:
            return f"backend {self.name!r} does not support a custom mask (causal and window are supported)"
        if problem.has_mods and not self.mods:
            takers = ", ".join(b.name for b in all_backends() if b.mods and b.device == self.device)
            return (f"backend {self.name!r} does not take a score_mod or mask_mod (flashkit.backends(): column "
                    f"'mods'); " + (f"these do: {takers}" if takers else f"no {self.device.upper()} backend does yet"))
        if problem.has_window and not problem.causal and not self.window:
            return f"backend {self.name!r} does not support a sliding window"
        return None

    def run(self, problem):
        """Compute (O, lse) for a validated Problem (float16 input is computed in float32 if needed)."""
        if problem.dtype_name not in self.dtypes:
            problem = problem.astype("float32")  # float16 only: cannot_serve refused the rest
        return self._function("runner")(problem)

    def run_backward(self, problem):
        """Compute (dQ, dK, dV) for a Problem from validate.check_backward (float16 in float32 if needed)."""
        if problem.dtype_name not in self.dtypes:
            problem = problem.astype("float32")
        return self._function("backward")(problem)

    def _function(self, which: str) -> Callable:
        if which not in self._cache:
            self._cache[which] = _resolve(getattr(self, which))
        return self._cache[which]


def _resolve(path: str) -> Callable:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


# Modules that contribute backends, in the order the table lists them.
_PROVIDERS = ("flashkit.reference", "flashkit.tiled", "flashkit.cpu", "flashkit.gpu")


def all_backends() -> Tuple[Backend, ...]:
    found = []
    for module in _PROVIDERS:
        found.extend(getattr(importlib.import_module(module), "BACKENDS", ()))
    return tuple(found)


def get(name: str) -> Backend:
    for b in all_backends():
        if b.name == name:
            return b
    names = ", ".join(repr(b.name) for b in all_backends())
    raise ValueError(f"backend must be 'auto' or one of {names}; got {name!r}")


def choose(problem, name: str = "auto", direction: str = "forward") -> Backend:
    """The backend to run `problem` in `direction` ("forward" or "backward"): the named one (or a
    clear error), or the best for "auto"."""
    if name != "auto":
        backend = get(name)
        reason = backend.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend {name!r} is not available on this machine: {reason}")
        why_not = backend.cannot_serve(problem, direction)
        if why_not is not None:
            raise ValueError(why_not)
        return backend
    candidates = [b for b in all_backends() if b.cannot_serve(problem, direction) is None and b.available]
    if not candidates:
        if problem.has_mods:
            device = "cpu" if problem.xp.__name__ == "numpy" else "gpu"
            takers = [b.name for b in all_backends() if b.mods and b.device == device and b.available]
            raise RuntimeError(f"no available backend takes a score_mod or mask_mod for this {direction} request "
                               f"({problem.xp.__name__} arrays); backends that take them here: "
                               f"{', '.join(takers) or 'none'} (see flashkit.backends(): column 'mods')")
        raise RuntimeError(f"no available backend supports this {direction} request; see flashkit.backends()")
    # Prefer a backend that computes the input dtype natively, then the highest priority.
    return max(candidates, key=lambda b: (problem.dtype_name in b.dtypes, b.priority))
