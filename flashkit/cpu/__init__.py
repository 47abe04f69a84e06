"""Numba kernels on the CPU: a ladder of FlashAttention-2 forward kernels, fastest last.

    rung 1  numba-loops     plain loops, one query row at a time                flashkit/cpu/rung1_loops.py
    rung 2  numba-regblock  loops over 4 query rows at once (register blocking) flashkit/cpu/rung2_regblock.py
    rung 3  numba-gemm      block GEMMs through np.dot (BLAS) + polynomial exp  flashkit/cpu/rung3_gemm.py
            its backward    FA2's Algorithm 2, the same GEMMs, dQ in per-thread partials  rung3_gemm_backward.py
    rung 4  numba-fused     no BLAS: packed K/V panels, an 8 x 2-register micro-kernel with the softmax
                            fused on it (lazy max), written with explicit vectors (vec.py)  rung4_fused.py
            its backward    the same micro-kernel for all five products, P and dS made in registers from
                            lse, dQ in per-thread partials                      rung4_fused_backward.py
    numba                   the highest rung that can run here (rung 4); the backward: the highest rung
                            with one (rung 4); with a score_mod / mask_mod / block_mask, rung 4 with the
                            hooks on its micro-tiles, forward (mods_jit.run_fused) and backward
    numba-mods              rung 3 with FlexAttention's hooks: the user's score_mod and mask_mod compiled
                            by Numba into rung 3's tile step (rung3_gemm.online_softmax_tile; mods_jit.py
                            compiles them), empty tiles of the BlockMask skipped; forward and backward

Each rung is one row of `RUNGS` below, from which the registry's backends, the tests and the CPU benchmark
derive. Every rung module has `run(problem, stats=False) -> (O, lse)` (and the tiles computed per task with
stats=True) and `BLOCKS`, its preferred (Br, Bc) before the L2 rule of common.default_block_size.

Nothing here imports Numba: the kernels load when a backend first runs (import flashkit stays fast).
simd.py holds the primitives the kernels share (FASTMATH, the polynomial exp and exp2, order keys); vec.py
SIMD registers as Numba values (rung 4 and split-K decoding are written with them); simd_lab.py
the teaching lab of notebook 06 (micro-kernels with their scalar twins, the asm, a micro-benchmark).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass

from flashkit.registry import Backend

# What every CPU rung shares: NumPy arrays, float32/float64 computed natively, masks and windows.
_COMMON = dict(device="cpu", dtypes=("float32", "float64"), mask=True, jit=True)


@dataclass(frozen=True)
class Rung:
    """One rung of the CPU ladder.

    number    place in the ladder (file flashkit/cpu/rung<number>_<name>.py)
    name      the backend name users pass as backend=...
    module    the rung's module under flashkit.cpu
    summary   one line for the backends table
    priority  "auto" picks the available backend with the highest priority that supports the request
    probe     "module:function" giving None when the rung can run here, else why not
    backward_module  the module of the rung's backward pass under flashkit.cpu, or None
    """

    number: int
    name: str
    module: str
    summary: str
    priority: int
    probe: str = "flashkit.cpu:_probe"
    backward_module: str | None = None  # the module of this rung's backward (its `run` -> dQ, dK, dV), if any

    def load(self):
        """The rung's module (imports Numba and compiles on first call)."""
        return importlib.import_module(f"flashkit.cpu.{self.module}")

    def backend(self) -> Backend:
        backward = None if self.backward_module is None else f"flashkit.cpu.{self.backward_module}:run"
        return Backend(name=self.name, summary=self.summary, runner=f"flashkit.cpu.{self.module}:run",
                       backward=backward, probe=self.probe, priority=self.priority, rung=self.number, **_COMMON)


def _probe():
    """None when Numba can be imported here, else the reason."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install numba)"
    return None


@functools.cache
def _probe_gemm():
    """Rung 3 calls BLAS through SciPy (Numba's np.dot) and pins it to one thread with threadpoolctl."""
    reason = _probe()
    if reason is not None:
        return reason
    missing = [m for m in ("scipy", "threadpoolctl") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Numba's np.dot needs SciPy's BLAS)"
    return None


RUNGS = (
    Rung(1, "numba-loops", "rung1_loops", "Numba rung 1: plain loops, one query row at a time", priority=20),
    Rung(2, "numba-regblock", "rung2_regblock", "Numba rung 2: register-blocked loops, 4 query rows at once",
         priority=30),
    Rung(3, "numba-gemm", "rung3_gemm", "Numba rung 3: block GEMMs (BLAS np.dot) and a vectorised exp",
         priority=40, probe="flashkit.cpu:_probe_gemm", backward_module="rung3_gemm_backward"),
    Rung(4, "numba-fused", "rung4_fused", "Numba rung 4: no BLAS; packed panels, a register-tiled micro-kernel "
         "with the softmax fused on it", priority=42, backward_module="rung4_fused_backward"),
)

_LADDER = tuple(r.backend() for r in RUNGS)


def available_rungs():
    """The rows of `RUNGS` that can run on this machine, in ladder order."""
    return tuple(r for r, b in zip(RUNGS, _LADDER) if b.available)


def run_fastest_backward(problem):
    """The "numba" backend's backward: the highest rung here that has one (rung 4), with the mods' hooks
    when the problem has a score_mod, mask_mod or block_mask (rung4_fused_backward.run takes them)."""
    if problem.has_mods:
        reason = _probe_gemm()
        if reason is not None:
            raise RuntimeError(f"score_mod / mask_mod on the CPU need backend 'numba-mods', which cannot run here: "
                               f"{reason}; backend='numpy-tiled' takes them without Numba")
        return importlib.import_module("flashkit.cpu.rung4_fused_backward").run(problem)  # rung 4 with the hooks
    with_backward = [r for r in available_rungs() if r.backward_module is not None]
    if not with_backward:
        raise RuntimeError("no Numba rung with a backward can run here")
    return importlib.import_module(f"flashkit.cpu.{with_backward[-1].backward_module}").run(problem)


def run_fastest(problem):
    """The "numba" backend: the highest rung that can run here (rung 4, which needs only Numba); with a
    score_mod or mask_mod, rung 4 with the mods' hooks (mods_jit.run_fused)."""
    if problem.has_mods:
        reason = _probe_gemm()
        if reason is not None:
            raise RuntimeError(f"score_mod / mask_mod on the CPU need backend 'numba-mods', which cannot run here: "
                               f"{reason}; backend='numpy-tiled' takes them without Numba")
        return importlib.import_module("flashkit.cpu.mods_jit").run_fused(problem)  # rung 4 with the hooks
    return available_rungs()[-1].load().run(problem)


BACKENDS = (
    Backend(name="numba", summary="Numba, FlashAttention-2 on all cores: the fastest rung below",
            runner="flashkit.cpu:run_fastest", backward="flashkit.cpu:run_fastest_backward",
            probe="flashkit.cpu:_probe", priority=50, mods=True, backward_mods=True, **_COMMON),
    *_LADDER,
    # Beside the ladder, not in RUNGS: rung 3's module with the mods; "numba" runs it when a mod is given.
    Backend(name="numba-mods", summary="Numba rung 3 + score_mod/mask_mod compiled into the tile loop, "
            "BlockMask tiles skipped", runner="flashkit.cpu.rung3_gemm:run",
            backward="flashkit.cpu.rung3_gemm_backward:run", probe="flashkit.cpu:_probe_gemm",
            priority=45, mods=True, backward_mods=True, **_COMMON),
)
