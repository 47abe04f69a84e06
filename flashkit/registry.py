"""The named backends: what each one is, whether it can run here, and which one "auto" picks.

A backend is a name, a device, what it supports, a `run(problem) -> (O, lse)` and, where it has them,
a `run_backward(problem) -> (dQ, dK, dV)` and a split-K `run_decode(decode_problem, splits) -> (O, lse)`,
all loaded lazily, so `import flashkit` never imports Numba or CuPy. Modules that provide backends
(flashkit.reference, flashkit.tiled, flashkit.cpu, flashkit.gpu, flashkit.decode) list them in a
`BACKENDS` tuple; this file gathers them, and `choose` picks one for a request in one of three
directions: "forward" (flashkit.attention), "backward" (flashkit.attention_backward) and "decode"
(flashkit.decode.attention_decode).
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

DIRECTIONS = ("forward", "backward", "decode")


@dataclass(frozen=True)
class Backend:
    """One implementation of attention.

    name       what users pass as backend=...
    device     "cpu" (NumPy arrays) or "gpu" (CuPy arrays)
    summary    one line for the backends table
    dtypes     dtype names computed natively; float16 input to a backend without it runs in float32
    head_dims  supported head sizes d, or None for any
    mask       whether a custom boolean mask is supported (causal and sliding windows every backend
               supports: each kernel takes the (left, right) window of the Problem)
    mods       whether its forward takes FlexAttention's score_mod / mask_mod / block_mask (flashkit.mods)
    backward_mods  whether its backward takes them too (the derivative of score_mod: flashkit.mods_grad)
    priority   "auto" picks the available backend with the highest priority that supports the request
    auto_max_flops  "auto" prefers this backend, whatever its priority, for problems of at most this many
               forward FLOPs (numpy-standard for tiny calls, where a kernel's fixed cost is the whole time)
    runner     "module:function" that takes a Problem and returns (O, lse); None for a backward-only rung
    backward   "module:function" that takes a Problem carrying dO, O and lse (validate.check_backward)
               and returns (dQ, dK, dV) shaped like Q, K, V; None when the backend has no backward
    decode     "module:function" that takes a DecodeProblem (validate.check_decode) and a number of
               splits (or "auto") and returns (O, lse): split-K decoding against a KV cache read in
               place. None: the backend serves a decoding step only unsplit, through its runner
    probe      "module:function" returning None when usable here, else the reason it is not
    supports   "module:function" taking a problem of this backend's device and returning None or why
               it cannot serve it: limits the fields above cannot state (head sizes per dtype, alignment)
    jit        whether its kernels compile on first use (Numba); once one has run for a direction and
               dtype, `is_compiled` says so, and "auto" stops serving that request from NumPy
    checks_inputs  whether its forward kernel tests q, k, v for NaN/Inf itself when it can (rung 7:
               flashkit/gpu/kernels/input_check.cuh): validate.begin then leaves the check to its runner
    """

    name: str
    device: str
    summary: str
    runner: Optional[str]
    backward: Optional[str] = None
    decode: Optional[str] = None
    dtypes: Tuple[str, ...] = ("float32", "float64")
    head_dims: Optional[Tuple[int, ...]] = None
    mask: bool = True
    mods: bool = False
    backward_mods: bool = False
    priority: int = 0
    auto_max_flops: Optional[float] = None
    probe: Optional[str] = None
    supports: Optional[str] = None
    rung: Optional[int] = None  # place in its ladder (None for baselines outside a ladder)
    jit: bool = False  # compiled by Numba on first use: "auto" serves from NumPy meanwhile (flashkit.precompile)
    checks_inputs: bool = False  # the forward kernel tests q, k, v for NaN/Inf itself (flashkit.finite.Deferred.claim)

    def unavailable_reason(self) -> Optional[str]:
        """None if this backend can run on this machine, else why not (probed once per process)."""
        return None if self.probe is None else _probe_reason(self.probe)

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    @property
    def has_forward(self) -> bool:
        return self.runner is not None

    @property
    def has_backward(self) -> bool:
        return self.backward is not None

    @property
    def has_decode(self) -> bool:
        return self.decode is not None

    def computes(self, direction: str) -> bool:
        """Whether this backend has its own runner for `direction` ("forward", "backward" or "decode")."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
        return {"forward": self.has_forward, "backward": self.has_backward, "decode": self.has_decode}[direction]

    def cannot_serve(self, problem, direction: str = "forward", ask_supports: bool = True) -> Optional[str]:
        """None if this backend supports `problem` in `direction` ("forward", "backward" or "decode"),
        else a sentence saying what it lacks. A backend with a forward runner but no decode runner
        serves a decoding step unsplit (flashkit.decode runs it on the filled rows of the cache)."""
        if direction == "backward" and not self.has_backward:
            return f"backend {self.name!r} has no backward pass (see flashkit.backends(): column 'backward')"
        if direction == "forward" and not self.has_forward:
            return f"backend {self.name!r} computes only the backward pass; use flashkit.attention_backward"
        if direction == "decode" and not (self.has_decode or self.has_forward):
            return f"backend {self.name!r} computes only the backward pass; it cannot decode"
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
        if getattr(problem, "has_mods", False) and not (self.backward_mods if direction == "backward" else self.mods):
            takers = ", ".join(b.name for b in all_backends() if b.device == self.device
                               and (b.backward_mods if direction == "backward" else b.mods))
            column = "backward_mods" if direction == "backward" else "mods"
            return (f"backend {self.name!r} does not take a score_mod or mask_mod {'in its backward ' * (direction == 'backward')}"
                    f"(flashkit.backends(): column '{column}'); "
                    + (f"these do: {takers}" if takers else f"no {self.device.upper()} backend does yet"))
        if self.supports is not None and ask_supports:
            return self._function("supports")(problem)
        return None

    def run(self, problem):
        """Compute (O, lse) for a validated Problem (float16 input is computed in float32 if needed)."""
        if problem.dtype_name not in self.dtypes:
            problem = problem.astype("float32")  # float16 only: cannot_serve refused the rest
        out = self._function("runner")(problem)
        self._ran("forward", problem)
        return out

    def run_backward(self, problem):
        """Compute (dQ, dK, dV) for a Problem from validate.check_backward (float16 in float32 if needed)."""
        if problem.dtype_name not in self.dtypes:
            problem = problem.astype("float32")
        out = self._function("backward")(problem)
        self._ran("backward", problem)
        return out

    def run_decode(self, problem, splits="auto"):
        """Compute (O, lse) of a DecodeProblem with split-K. No dtype conversion here: a decode runner
        converts float16 itself, and only the filled rows of the cache, not the whole buffer."""
        out = self._function("decode")(problem, splits)
        self._ran("decode", problem)
        return out

    def _ran(self, direction, problem):
        if self.jit and not getattr(problem, "has_mods", False):  # a mod's kernel is compiled per mod
            name = problem.dtype_name
            _COMPILED.add((self.name, direction, name if name in self.dtypes else "float32"))

    def _function(self, which: str) -> Callable:
        return _resolve(getattr(self, which))


# Both are cached with functools.cache, as every compiled kernel of the package is: a probe may import
# CuPy or Numba (seconds), and resolving a runner imports its module.
@functools.cache
def _resolve(path: str) -> Callable:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@functools.cache
def _probe_reason(probe: str) -> Optional[str]:
    """None if the probe "module:function" finds its backend usable here, else the reason it is not."""
    try:
        return _resolve(probe)()
    except Exception as exc:  # a broken optional dependency is a reason, not a crash
        return f"{type(exc).__name__}: {exc}"


# (backend name, direction, dtype) of every jit backend that has run in this process: its kernels are
# compiled (or loaded from the cache) for that dtype. A set's add and `in` are atomic under the GIL.
_COMPILED: set = set()


def is_compiled(name: str, direction: str, dtype: str) -> bool:
    return (name, direction, dtype) in _COMPILED


def compiled_for(name: str) -> Tuple[Tuple[str, str], ...]:
    """The (direction, dtype) pairs backend `name` has run for in this process."""
    return tuple(sorted((d, t) for n, d, t in set(_COMPILED) if n == name))


# Modules that contribute backends, in the order the table lists them.
_PROVIDERS = ("flashkit.reference", "flashkit.tiled", "flashkit.cpu", "flashkit.gpu", "flashkit.decode")


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
    """The backend to run `problem` in `direction` ("forward", "backward" or "decode"): the named one
    (or a clear error), or for "auto" the best available one with its own runner for `direction`."""
    if name != "auto":
        backend = get(name)
        reason = backend.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend {name!r} is not available on this machine: {reason}")
        why_not = backend.cannot_serve(problem, direction)
        if why_not is not None:
            raise ValueError(why_not)
        return backend
    # The same kind of request (direction, array library, dtype, d, mask or not, mods or not, and which
    # auto_max_flops limits it is under) always ranks the same backends: rank them once. Only a backend's
    # `supports` function looks further (alignment, head size per dtype), so it is asked on every call.
    key = _request_key(problem, direction)
    ranked = _RANKED.get(key)
    if ranked is not None:
        for b in ranked:
            if b.supports is None or b.cannot_serve(problem, direction) is None:
                return b
    chosen = _choose_auto(problem, direction)
    if key not in _RANKED:
        _RANKED[key] = _rank(problem, direction)
    return chosen


# (direction, array library, dtype, d, mask?, mods?, small?) -> the backends that serve such a request, best
# first, `supports` not yet asked (registry.choose).
_RANKED: dict = {}


@functools.cache
def _flops_limits() -> Tuple[float, ...]:
    return tuple(sorted({b.auto_max_flops for b in all_backends() if b.auto_max_flops is not None}))


def _request_key(problem, direction):
    limits = _flops_limits()
    small = tuple(problem.flops() <= t for t in limits) if limits else ()
    return (direction, problem.xp.__name__, problem.dtype_name, problem.d, problem.mask is not None,
            bool(getattr(problem, "has_mods", False)), small)


def _preference(problem):
    """The sort key of choose: a backend computing the input dtype natively, then one made for a problem
    this small, then the highest priority."""
    flops = problem.flops()

    def key(b):
        small = b.auto_max_flops is not None and flops <= b.auto_max_flops
        return (problem.dtype_name in b.dtypes, small, b.priority)

    return key


def _rank(problem, direction):
    """The backends that could serve requests like `problem`, best first (their `supports` not asked)."""
    serving = [b for b in all_backends() if b.computes(direction)
               and b.cannot_serve(problem, direction, ask_supports=False) is None and b.available]
    return tuple(sorted(serving, key=_preference(problem), reverse=True))


def _choose_auto(problem, direction):
    # The request is checked before the machine: probing a GPU backend imports CuPy, which a NumPy
    # request never needs.
    computing = [b for b in all_backends() if b.computes(direction)]
    candidates = [b for b in computing if b.cannot_serve(problem, direction) is None and b.available]
    if not candidates:
        if getattr(problem, "has_mods", False):
            device = "cpu" if problem.xp.__name__ == "numpy" else "gpu"
            takers = [b.name for b in all_backends() if b.device == device and b.available
                      and (b.backward_mods if direction == "backward" else b.mods)]
            raise RuntimeError(f"no available backend takes a score_mod or mask_mod for this {direction} request "
                               f"({problem.xp.__name__} arrays); backends that take them here: "
                               f"{', '.join(takers) or 'none'} (see flashkit.backends(): column 'mods')")
        # Backends of the request's device that could run here but refuse this request: the request is
        # what is wrong (say a head size no kernel has), so say what each one lacks.
        device = "gpu" if problem.xp.__name__ == "cupy" else "cpu"
        refusals = [b.cannot_serve(problem, direction) for b in computing if b.device == device and b.available]
        if refusals:
            raise ValueError(f"no available backend supports this {direction} request: " + "; ".join(refusals))
        raise RuntimeError(f"no available backend supports this {direction} request; see flashkit.backends()")
    return max(candidates, key=_preference(problem))
