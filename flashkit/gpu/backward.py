"""Compile and launch the CUDA backward rungs (flashkit/gpu/kernels/b*.cu) through CuPy's RawModule (NVRTC).

FlashAttention-2's Algorithm 2: given Q, K, V, the forward's O and lse, and dO = dL/dO, compute

    D   = rowsum(dO * O)                            (B, Hq, Nq)    a preprocessing kernel, fp32
    P   = exp(Q_i K_j^T * scale - lse_i)            recomputed per tile, never stored
    dV_j = sum_i P^T dO_i      dP = dO_i V_j^T      dS = P * (dP - D_i)
    dK_j = scale * sum_i dS^T Q_i                   dQ_i = scale * sum_j dS K_j

GQA: K/V head hk serves query heads hk * group .. hk * group + group - 1, and dK, dV sum over them. A row
with lse = -inf (it saw no key) has P = 0 and gets dQ = 0. The rungs (one file each, read in order):

  backward rung 1  cupy-bwd-fp32          b1_fp32.cu         fp32 FMAs; dQ by fp32 atomics
  backward rung 2  cupy-bwd-mma           b2_mma.cu          fp16/bf16 mma.sync; dQ by fp32 atomics + convert
  backward rung 3  cupy-bwd-mma-2kernel   b3_mma_2kernel.cu  fp16/bf16 mma.sync; dK/dV and dQ kernels, no atomics
  backward rung 4  cupy-bwd-wgmma         b4_wgmma.cu        fp16/bf16 Hopper wgmma + TMA; dQ by fp32 atomics + convert

Every fact about a rung (its source, element types, block sizes, the kernels one call launches and their
shared memory) is its row in the one table of GPU rungs, flashkit/gpu/rungs.py; a block size a rung cannot
honour raises ValueError. Br is the query tile, Bc the key
tile, as in the paper: the dK/dV kernels hold Bc keys per block and step over Br queries. The two-kernel
rung's dQ kernel holds Bc queries per block and steps over Br keys (each kernel's block holds Bc rows of its
own side), so one (Br, Bc) sets both.

The lse check is computed inside the kernels (kernels/bwd_check.cuh): every kernel recomputes P from the
forward's lse, and P must sum to 1 over each row's keys. The two-kernel rung's dQ kernel visits a row's whole
key range and tests its sum in registers; the atomics rungs add each block's partial row sums into one fp32
word per row, on about LSE_TILES query tiles of each head, and a last small kernel tests those rows. A bad row is written to page-locked host memory
(flashkit.finite.HostFlags); the public call (`run_problem`) records an event right after the testing kernel
and validate.finish waits for that event alone (for the two-kernel rung the dK/dV kernel runs behind it).

Compilation and caching as in flash.py: the first launch of a (rung, d, element, Br, Bc) compiles (NVRTC,
then CuPy's on-disk cache), `functools.cache` keeps the module for the process.
"""
from __future__ import annotations

import functools
import time
from typing import Dict, Optional, Tuple

import numpy as np

from flashkit.gpu.flash import KERNEL_DIR, build_options
from flashkit.gpu.rungs import ELEMENTS, Rung, kernels as table_rows

RUNGS: Dict[str, Rung] = {r.name: r for r in table_rows("backward")}  # the backward CUDA rows, by name
NUMBERS = {r.number: name for name, r in RUNGS.items()}
COMPILE_SECONDS: Dict[tuple, float] = {}  # (rung name, d, element, Br, Bc) -> seconds of the first build here
LSE_TOLERANCE = 1e-3  # validate.lse_tolerance(float32): how far a row sum of P may stray from 1
# The atomics rungs sum P for the lse check on about this many query tiles per head (1 tile in lse_every),
# all tiles up to that many: summing every tile cost backward rung 2 9% at d = 64 (H200, N = 4096,
# benchmarks/results/gpu-overhead-h200-history6.json), and a wrong lse is off on every row. The two-kernel rung
# checks every row (its dQ kernel's sums are free).
LSE_TILES = 8


def rung_of(rung) -> Rung:
    """The table row of a backward rung name ("cupy-bwd-mma") or backward rung number (2)."""
    if isinstance(rung, Rung):
        return rung
    name = NUMBERS.get(rung, rung)
    if name not in RUNGS:
        raise ValueError(f"unknown backward rung {rung!r}; known: {', '.join(RUNGS)}")
    return RUNGS[name]


def blocks_for(rung, d: int, block_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    spec = rung_of(rung)
    if d not in spec.head_dims:
        dims = ", ".join(map(str, spec.head_dims))
        raise ValueError(f"{spec.name} supports head size d in {{{dims}}}; got d={d}")
    if block_size is None:
        return spec.default_blocks[d]
    block_size = tuple(int(x) for x in block_size)
    if block_size not in spec.allowed(d):
        allowed = ", ".join(f"({a}, {b})" for a, b in spec.allowed(d))
        raise ValueError(f"{spec.name} ({spec.source}) at d={d} supports block_size (Br, Bc) in {{{allowed}}}; "
                         f"got {block_size}")
    return block_size


@functools.cache
def kernels(rung: str, d: int, element: str, Br: int, Bc: int):
    """The compiled kernels of one rung for one (d, element, Br, Bc), by role ("preprocess", "main", ...: the
    table's Kernel rows), shared-memory limits raised."""
    import cupy

    spec = RUNGS[rung]
    source = (KERNEL_DIR / spec.source).read_text()
    t0 = time.perf_counter()  # NVRTC compile, or a hit in CuPy's on-disk cache
    module = cupy.RawModule(code=source, options=build_options(d, element, Br, Bc, arch=spec.arch))
    fns = {k.role: module.get_function(k.name) for k in spec.kernels}
    COMPILE_SECONDS[(rung, d, element, Br, Bc)] = time.perf_counter() - t0
    for k in spec.kernels:
        nbytes = 0 if k.smem is None else k.smem(d, Br, Bc)
        if nbytes > 48 * 1024:  # above 48 KB a kernel must opt in to more dynamic shared memory
            fns[k.role].max_dynamic_shared_size_bytes = nbytes
    return fns


def _contiguous(x):
    import cupy

    return x if x.flags.c_contiguous else cupy.ascontiguousarray(x)


def _out(given, shape, dtype, what):
    import cupy

    if given is None:
        return cupy.empty(shape, dtype)
    if given.shape != tuple(shape) or given.dtype != dtype or not given.flags.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous {dtype} array of shape {tuple(shape)}")
    return given


class LseCheck:
    """The in-kernel lse check of one backward call: where its kernels report a bad row (two words of
    page-locked host memory, flashkit.finite.HostFlags), the call's serial number, and the event recorded
    right after the kernel that tests the rows. `error()` waits for that event and returns the sentence
    to raise, or None. It goes into the Problem's `pending` list, which validate.finish reads."""

    def __init__(self, shape):
        from flashkit import finite

        self.flags = finite.host_flags()
        self.serial = self.flags.next_serial()
        self.address = np.uint64(int(self.flags.device_ptr) + 8 * finite.LSE_WORD)
        self.word = finite.LSE_WORD
        self.event = self.flags.event("lse")
        self.shape = tuple(shape)  # (B, Hq, Nq): to name a flat row as (b, h, i)

    def record(self):
        """Called by backward() right after the kernel that tests the rows, on the launching stream."""
        self.event.record()

    def error(self) -> Optional[str]:
        self.event.synchronize()
        words = self.flags.words
        if int(words[self.word]) != self.serial:
            return None
        packed = int(words[self.word + 1]) & 0xFFFFFFFFFFFFFFFF
        row = packed >> 32
        shown = float(np.array([packed & 0xFFFFFFFF], np.uint32).view(np.float32)[0])
        where = tuple(int(x) for x in np.unravel_index(min(row, int(np.prod(self.shape)) - 1), self.shape))
        fix = ("Pass the lse that attention(q, k, v, ..., return_lse=True) returned for the same q, k, causal, "
               "window, mask and scale (natural-log units, not log2)")
        if shown < 0:
            return (f"lse does not belong to these q and k: at row (b, h, i) = {where} lse is -inf (a row that saw "
                    f"no key) but the row sees {int(-shown)} keys. {fix}")
        return (f"lse does not belong to these q and k: at row (b, h, i) = {where} the recomputed softmax sums to "
                f"{shown:.6g} instead of 1. {fix}")


def backward(rung, Q, K, V, O, dO, lse, *, scale: float, window=(-1, -1), element: Optional[str] = None,
             block_size=None, dq_out=None, dk_out=None, dv_out=None, check: Optional[LseCheck] = None):
    """Run one backward rung on CuPy arrays; returns (dQ, dK, dV) with the shapes and dtypes of Q, K, V.

    Q, O, dO: (B, Hq, Nq, d); K, V: (B, Hkv, Nk, d), Hq % Hkv == 0; lse: float32 (B, Hq, Nq), natural log,
    from the forward of the same Q, K, V, scale and window (-inf for a row that saw no key). `window` is
    (left, right) around the bottom-right diagonal, -1 unbounded; causal is (-1, 0). `element` names the
    kernel's element type when the dtype cannot say it (bf16 data held as uint16 bits). dq_out, dk_out,
    dv_out, if given, are written in place (tests poison them with NaN first). Inputs are never modified.
    `check`: an LseCheck to report a lse that does not fit these Q, K into (the kernels test every row's
    sum of P either way; without one nothing is reported).
    """
    import cupy

    spec = rung_of(rung)
    if element is None:
        element = ELEMENTS.get(Q.dtype.name)
    if element not in spec.elements:
        raise TypeError(f"{spec.name} computes {', '.join(spec.dtypes)}; got {Q.dtype.name}"
                        + (f" (element {element!r})" if element else ""))
    if not (Q.dtype == K.dtype == V.dtype == O.dtype == dO.dtype):
        raise TypeError(f"Q, K, V, O and dO must have one dtype; got {Q.dtype}, {K.dtype}, {V.dtype}, {O.dtype}, {dO.dtype}")
    if Q.ndim != 4 or K.ndim != 4 or K.shape != V.shape or O.shape != Q.shape or dO.shape != Q.shape:
        raise ValueError(f"expected Q, O, dO (B, Hq, Nq, d) and K, V (B, Hkv, Nk, d); got Q {Q.shape}, K {K.shape}, "
                         f"V {V.shape}, O {O.shape}, dO {dO.shape}")
    B, Hq, Nq, d = Q.shape
    _, Hkv, Nk, dk = K.shape
    if K.shape[0] != B or dk != d:
        raise ValueError(f"K and V must be (B={B}, Hkv, Nk, d={d}); got {K.shape}")
    if Hq % Hkv:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    if lse.shape != (B, Hq, Nq) or lse.dtype != cupy.float32:
        raise ValueError(f"lse must be float32 of shape {(B, Hq, Nq)}; got {lse.dtype} {lse.shape}")
    Br, Bc = blocks_for(spec, d, block_size)
    # The kernels index rows as (b, h, n) * d: they need C-contiguous arrays. Copy explicitly, never guess.
    Q, K, V, O, dO, lse = (_contiguous(x) for x in (Q, K, V, O, dO, lse))
    dQ = _out(dq_out, Q.shape, Q.dtype, "dq_out")
    dK = _out(dk_out, K.shape, K.dtype, "dk_out")
    dV = _out(dv_out, V.shape, V.dtype, "dv_out")
    fns = kernels(spec.name, d, element, Br, Bc)
    left, right = (int(w) for w in window)
    i32, f32, i64, u64 = cupy.int32, cupy.float32, cupy.int64, np.uint64
    rows = B * Hq * Nq
    Dvec = cupy.empty((B, Hq, Nq), cupy.float32)  # D = rowsum(dO * O)
    dims = (i32(Hq), i32(Hkv), i32(Nq), i32(Nk), f32(scale), i32(left), i32(right))
    report = (u64(0), i64(0)) if check is None else (check.address, i64(check.serial))
    threads = spec.threads(Br, Bc)
    tpr = d // (4 if element == "f32" else 8)  # preprocessing: threads per row (16 bytes each)
    pre_grid = (-(-rows * tpr // 256),)

    def smem(role):
        k = spec.kernel(role)
        return 0 if k.smem is None else k.smem(d, Br, Bc)

    if "main" in fns:  # one kernel over key blocks: dK, dV, and dQ by atomics (FA2's way)
        acc = cupy.empty(Q.shape, cupy.float32) if "convert" in fns else dQ  # the atomics' target, zeroed first
        Psum = cupy.empty((B, Hq, Nq), cupy.float32)  # rowsum(P), added up by the key blocks; zeroed first
        fns["preprocess"](pre_grid, (256,), (O, dO, Dvec, acc, Psum, i64(rows)))
        q_tiles = -(-Nq // Br)
        every = max(1, -(-q_tiles // LSE_TILES))  # sum P on 1 query tile in `every`
        maps = (tensor_maps(Q, K, V, dO, Br, Bc),) if spec.tensor_maps else ()
        fns["main"]((-(-Nk // Bc), Hkv, B), (threads,), (Q, K, V, dO, lse, Dvec, acc, dK, dV, Psum) + dims
                    + (i32(every),) + maps, shared_mem=smem("main"))
        if check is not None:  # before the conversion: the host's wait for the check then ends while it runs
            fns["check"]((-(-rows // 256),), (256,), (Psum, lse, i64(rows), i32(Nq), i32(Nk), i32(left), i32(right),
                                                      f32(LSE_TOLERANCE), i32(Br), i32(every)) + report)
            check.record()
        if "convert" in fns:
            n = Q.size
            fns["convert"]((-(-n // (8 * 256)),), (256,), (acc, dQ, i64(n), f32(scale)))
    else:  # a dQ kernel over query blocks (it tests lse), then a dK/dV kernel over key blocks: no atomics
        fns["preprocess"](pre_grid, (256,), (O, dO, Dvec, i64(rows)))
        fns["dq"]((-(-Nq // Bc), Hq, B), (threads,), (Q, K, V, dO, lse, Dvec, dQ) + dims
                  + (f32(LSE_TOLERANCE),) + report, shared_mem=smem("dq"))  # its blocks hold Bc queries
        if check is not None:
            check.record()  # the host waits for this, while the dK/dV kernel runs
        fns["dkdv"]((-(-Nk // Bc), Hkv, B), (threads,), (Q, K, V, dO, lse, Dvec, dK, dV) + dims,
                    shared_mem=smem("dkdv"))
    return dQ, dK, dV


@functools.lru_cache(maxsize=64)
def _maps(device, q, k, v, do, B, Hq, Hkv, Nq, Nk, d, Br, Bc):
    import cupy

    from flashkit.gpu.tma import encode

    blob = (encode(q, B * Hq, Nq, d, Br) + encode(k, B * Hkv, Nk, d, Bc) + encode(v, B * Hkv, Nk, d, Bc)
            + encode(do, B * Hq, Nq, d, Br))
    return cupy.asarray(np.frombuffer(blob, np.uint8))  # CuPy allocations are 512-byte aligned


def tensor_maps(Q, K, V, dO, Br: int, Bc: int):
    """The TMA maps of a backward main kernel that reads its tiles by TMA (b4_wgmma.cu's BwdMaps: Q and dO boxes of
    Br rows, K and V of Bc rows), in one small device array, cached by pointers and shapes as flashkit.gpu.tma's
    forward maps are (a map holds addresses and sizes, never data)."""
    B, Hq, Nq, d = Q.shape
    _, Hkv, Nk, _ = K.shape
    return _maps(Q.device.id, Q.data.ptr, K.data.ptr, V.data.ptr, dO.data.ptr, B, Hq, Hkv, Nq, Nk, d, Br, Bc)


def run(rung, problem, O, dO, lse, element: Optional[str] = None):
    """backward() for a validated flashkit Problem (what the public API hands a backend)."""
    if problem.mask is not None:
        raise ValueError(f"{rung_of(rung).name} does not support a custom mask (causal and sliding windows are supported)")
    return backward(rung, problem.Q, problem.K, problem.V, O, dO, lse, scale=problem.scale, window=problem.window,
                    element=element, block_size=problem.block_size)


def run_problem(name: str, problem):
    """The registry's backward runner: (dQ, dK, dV) of a Problem from validate.check_backward.

    The kernels test the lse (LseCheck). The check joins the Problem's `pending` list, which the public call
    reads after this returns (validate.finish), so the host waits for the testing kernel's event only then;
    a Problem without that list is checked here before returning."""
    if problem.has_mods or (problem.mask is not None and rung_of(name).mods):
        # score_mod / mask_mod / block_mask, or a bool mask= as bits: the rung compiled with its FK_* hooks filled
        if problem.has_mods and not rung_of(name).mods:
            raise ValueError(f"{name} does not take a score_mod or mask_mod (flashkit.backends(): 'backward_mods')")
        from flashkit.gpu import flash_mods_backward

        return flash_mods_backward.run_problem(problem)
    if problem.mask is not None:
        raise ValueError(f"{name} does not support a custom mask (causal and sliding windows are supported)")
    check = LseCheck(problem.Q.shape[:3])
    grads = backward(name, problem.Q, problem.K, problem.V, problem.O, problem.dO, problem.lse,
                     scale=problem.scale, window=problem.window, element=problem.element,
                     block_size=problem.block_size, check=check)
    report(problem, check)
    return grads


def report(problem, check) -> None:
    """The lse check of a launch: joined to the Problem's `pending` list (the public call waits for it there,
    validate.finish), or waited for and raised here for a Problem without that list."""
    if problem.pending is not None:
        problem.pending.append(check)
    else:
        message = check.error()
        if message is not None:
            raise ValueError(message)


def __getattr__(name: str):
    """`flashkit.gpu.backward:cupy-bwd-mma` (a backend's backward runner) is run_problem bound to that rung."""
    if name in RUNGS:
        return functools.partial(run_problem, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def flops(B: int, Hq: int, Nq: int, Nk: int, d: int, window=(-1, -1)) -> float:
    """Backward FLOPs as FlashAttention counts them (flashkit.problem.backward_flops: 2.5x the forward's).

    (Five Nq x Nk x d products against the forward's two: S, dP, dV, dK, dQ; recomputing S is counted, the
    two-kernel rung's second S and dP are not.)
    """
    from flashkit.problem import backward_flops

    return backward_flops(B, Hq, Nq, Nk, d, tuple(window))


__all__ = ["RUNGS", "backward", "kernels", "blocks_for", "rung_of", "run", "run_problem", "report", "flops", "LseCheck"]
