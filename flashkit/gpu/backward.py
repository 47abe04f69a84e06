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

Block sizes (Br, Bc) are constants of each compiled variant, listed in `RUNGS` (defaults per d and what
block_size may force); a block size a rung cannot honour raises ValueError. Br is the query tile, Bc the key
tile, as in the paper: the dK/dV kernels hold Bc keys per block and step over Br queries. The two-kernel
rung's dQ kernel holds Bc queries per block and steps over Br keys (each kernel's block holds Bc rows of its
own side), so one (Br, Bc) sets both.

Compilation and caching as in flash.py: the first launch of a (rung, d, element, Br, Bc) compiles (NVRTC,
then CuPy's on-disk cache), `functools.lru_cache` keeps the module for the process.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from flashkit.gpu.flash import KERNEL_DIR, _arch
from flashkit.gpu.rungs import ELEMENTS, HEAD_DIMS

_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class BackwardRung:
    name: str  # the backend name the public API uses
    number: int  # backward rung number (ladder order)
    source: str  # file under kernels/
    elements: Tuple[str, ...]  # "f32", or "f16"/"bf16"
    default_blocks: Dict[int, Tuple[int, int]]  # d -> (Br, Bc)
    allowed_blocks: Dict[int, Tuple[Tuple[int, int], ...]]  # d -> what block_size may force
    kernels: Tuple[str, ...]  # the kernels of the source, in launch order
    threads: Callable[[int, int], int]  # (Br, Bc) -> threads per block of the main kernel(s)
    smem: Callable[[int, int, int], int]  # (d, Br, Bc) -> dynamic shared bytes of the main kernel; must match the .cu
    dq_smem: Optional[Callable[[int, int, int], int]] = None  # the two-kernel rung's dQ kernel
    direction: str = "backward"
    summary: str = ""  # one line for the backends table
    priority: int = 0  # "auto" picks the highest available that serves the request
    peer: str = "flash"  # the torch SDPA backend it is measured against

    @property
    def dtypes(self) -> Tuple[str, ...]:
        return tuple(_NAMES[e] for e in self.elements)

    def backend(self):
        """This rung's entry in the registry: a backward-only backend (flashkit.attention_backward)."""
        from flashkit.registry import Backend

        probe = "flashkit.gpu:_probe" if self.elements == ("f32",) else "flashkit.gpu:_probe_tensor_cores"
        return Backend(name=self.name, device="gpu", summary=self.summary, runner=None,
                       backward=f"flashkit.gpu.backward:{self.name}", dtypes=self.dtypes, head_dims=HEAD_DIMS,
                       mask=False, priority=self.priority, probe=probe, rung=self.number)


def _blocks(*pairs):
    return tuple(pairs)


RUNGS: Dict[str, BackwardRung] = {
    # K_s, V_s [Bc][d+4], Q_s, dO_s [Br][d+4], P^T_s, dS^T_s [Bc][Br+4], lse_s, D_s [Br]; fp32.
    # Default 64 x 64: the best of the sweep on the H200 at d = 64 and 128 (fp32, N = 4096).
    "cupy-bwd-fp32": BackwardRung(
        "cupy-bwd-fp32", 1, "b1_fp32.cu", ("f32",),
        {32: (64, 64), 64: (64, 64), 128: (64, 64)},
        {d: _blocks((32, 32), (32, 64), (64, 32), (64, 64)) for d in HEAD_DIMS},
        ("bwd_preprocess", "flash_bwd"),
        threads=lambda Br, Bc: 256,
        smem=lambda d, Br, Bc: 4 * (2 * (Bc + Br) * (d + 4) + 2 * Bc * (Br + 4) + 2 * Br),
        summary="CUDA fp32 backward, FA2 Algorithm 2, dQ by fp32 atomics (kernels/b1_fp32.cu)",
        priority=80, peer="efficient"),
    # K_s, V_s [Bc][d+8], Q_s, dO_s [2][Br][d+8], dS^T_s [Bc][Br+8] (16-bit), lse_s, D_s [2][Br] (fp32).
    # Bc / 16 warps; the dQ step splits Br x d over them, which needs d / (warps / (Br/16)) % 16 == 0.
    # Default 64 x 128: the best of the sweep on the H200 at d = 64 and 128 (fp16, N = 4096; 64 x 64 loses
    # 25-30%: twice the dQ atomics). d = 32 not swept. 128 x 128 (8 warps of 16 keys, Br = 128 queries per step)
    # only at d <= 64: at d = 128 ptxas spills 152 bytes.
    "cupy-bwd-mma": BackwardRung(
        "cupy-bwd-mma", 2, "b2_mma.cu", ("f16", "bf16"),
        {32: (64, 128), 64: (64, 128), 128: (64, 128)},
        {32: _blocks((32, 64), (64, 64), (64, 128), (128, 128)),
         64: _blocks((32, 64), (64, 64), (32, 128), (64, 128), (128, 128)),
         128: _blocks((32, 64), (64, 64), (32, 128), (64, 128))},
        ("bwd_preprocess", "flash_bwd", "bwd_dq_convert"),
        threads=lambda Br, Bc: 2 * Bc,
        smem=lambda d, Br, Bc: 2 * ((2 * Bc + 4 * Br) * (d + 8) + Bc * (Br + 8)) + 16 * Br,
        summary="CUDA fp16/bf16 backward, mma.sync, dQ by fp32 vector atomics (kernels/b2_mma.cu)",
        priority=110),
    # dK/dV kernel: rung 2's layout without dS^T_s; dQ kernel: Q_s, dO_s [Bc][d+8], K_s, V_s [2][Br][d+8].
    # Defaults from the block sweep on the H200 (fp16, N = 4096, non-causal; benchmarks/results/gpu-bwd-h200-history1.json,
    # confirmed in gpu-bwd-h200-history3.json): d = 64 64 x 64 (201.7 / 196.8 TFLOP/s vs 179.1 / 178.6 at 64 x 128); d = 128
    # 64 x 128 (204.9 / 206.3, 64 x 64 204.5 / 200.0); d = 32 not swept, set like d = 64.
    "cupy-bwd-mma-2kernel": BackwardRung(
        "cupy-bwd-mma-2kernel", 3, "b3_mma_2kernel.cu", ("f16", "bf16"),
        {32: (64, 64), 64: (64, 64), 128: (64, 128)},
        {d: _blocks((32, 64), (64, 64), (32, 128), (64, 128)) for d in HEAD_DIMS},
        ("bwd_preprocess", "flash_bwd_dkdv", "flash_bwd_dq"),
        threads=lambda Br, Bc: 2 * Bc,
        smem=lambda d, Br, Bc: 2 * (2 * Bc + 4 * Br) * (d + 8) + 16 * Br,
        dq_smem=lambda d, Br, Bc: 2 * (2 * Bc + 4 * Br) * (d + 8),
        summary="CUDA fp16/bf16 backward, a dK/dV kernel and a dQ kernel, no atomics (kernels/b3_mma_2kernel.cu)",
        priority=100),
}
NUMBERS = {r.number: name for name, r in RUNGS.items()}
COMPILE_SECONDS: Dict[tuple, float] = {}  # (rung name, d, element, Br, Bc) -> seconds of the first build here


def rung_of(rung) -> BackwardRung:
    """The table entry for a rung name ("cupy-bwd-mma") or backward rung number (2)."""
    if isinstance(rung, BackwardRung):
        return rung
    name = NUMBERS.get(rung, rung)
    if name not in RUNGS:
        raise ValueError(f"unknown backward rung {rung!r}; known: {', '.join(RUNGS)}")
    return RUNGS[name]


def blocks_for(rung, d: int, block_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    spec = rung_of(rung)
    if d not in HEAD_DIMS:
        raise ValueError(f"{spec.name} supports head size d in {{32, 64, 128}}; got d={d}")
    if block_size is None:
        return spec.default_blocks[d]
    block_size = tuple(int(x) for x in block_size)
    if block_size not in spec.allowed_blocks[d]:
        allowed = ", ".join(f"({a}, {b})" for a, b in spec.allowed_blocks[d])
        raise ValueError(f"{spec.name} ({spec.source}) at d={d} supports block_size (Br, Bc) in {{{allowed}}}; "
                         f"got {block_size}")
    return block_size


@functools.cache
def kernels(rung: str, d: int, element: str, Br: int, Bc: int):
    """The compiled kernels of one rung for one (d, element, Br, Bc), by name, shared-memory limits raised."""
    import cupy

    spec = RUNGS[rung]
    options = ["--std=c++17", f"--gpu-architecture={_arch()}", f"-DHEAD_DIM={d}", f"-DBR={Br}", f"-DBC={Bc}"]
    if element == "bf16":
        options.append("-DUSE_BF16")
    source = (KERNEL_DIR / spec.source).read_text()
    t0 = time.perf_counter()  # NVRTC compile, or a hit in CuPy's on-disk cache
    module = cupy.RawModule(code=source, options=tuple(options))
    fns = {name: module.get_function(name) for name in spec.kernels}
    COMPILE_SECONDS[(rung, d, element, Br, Bc)] = time.perf_counter() - t0
    limits = [(spec.kernels[1], spec.smem(d, Br, Bc))]  # the main kernel (the dK/dV one for the 2-kernel rung)
    if spec.dq_smem is not None:
        limits.append(("flash_bwd_dq", spec.dq_smem(d, Br, Bc)))
    for name, nbytes in limits:
        if nbytes > 48 * 1024:  # above 48 KB a kernel must opt in to more dynamic shared memory
            fns[name].max_dynamic_shared_size_bytes = nbytes
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


def backward(rung, Q, K, V, O, dO, lse, *, scale: float, window=(-1, -1), element: Optional[str] = None,
             block_size=None, dq_out=None, dk_out=None, dv_out=None):
    """Run one backward rung on CuPy arrays; returns (dQ, dK, dV) with the shapes and dtypes of Q, K, V.

    Q, O, dO: (B, Hq, Nq, d); K, V: (B, Hkv, Nk, d), Hq % Hkv == 0; lse: float32 (B, Hq, Nq), natural log,
    from the forward of the same Q, K, V, scale and window (-inf for a row that saw no key). `window` is
    (left, right) around the bottom-right diagonal, -1 unbounded; causal is (-1, 0). `element` names the
    kernel's element type when the dtype cannot say it (bf16 data held as uint16 bits). dq_out, dk_out,
    dv_out, if given, are written in place (tests poison them with NaN first). Inputs are never modified.
    """
    import cupy

    spec = rung_of(rung)
    if element is None:
        element = ELEMENTS.get(Q.dtype.name)
    if element not in spec.elements:
        raise TypeError(f"{spec.name} computes {', '.join(_NAMES[e] for e in spec.elements)}; got {Q.dtype.name}"
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
    i32, f32, i64 = cupy.int32, cupy.float32, cupy.int64
    rows = B * Hq * Nq
    Dvec = cupy.empty((B, Hq, Nq), cupy.float32)  # D = rowsum(dO * O)
    dims = (i32(Hq), i32(Hkv), i32(Nq), i32(Nk), f32(scale), i32(left), i32(right))
    Tc = -(-Nk // Bc)
    threads = spec.threads(Br, Bc)

    if spec.name == "cupy-bwd-fp32":
        tpr = d // 4  # preprocess: threads per row (one float4 each)
        fns["bwd_preprocess"]((-(-rows * tpr // 256),), (256,), (O, dO, Dvec, dQ, i64(rows)))  # also zeroes dQ
        fns["flash_bwd"]((Tc, Hkv, B), (threads,), (Q, K, V, dO, lse, Dvec, dQ, dK, dV) + dims,
                         shared_mem=spec.smem(d, Br, Bc))
    elif spec.name == "cupy-bwd-mma":
        tpr = d // 8  # preprocess: threads per row (16 bytes each)
        dQacc = cupy.empty(Q.shape, cupy.float32)  # the atomics' target, zeroed by the preprocessing kernel
        fns["bwd_preprocess"]((-(-rows * tpr // 256),), (256,), (O, dO, Dvec, dQacc, i64(rows)))
        fns["flash_bwd"]((Tc, Hkv, B), (threads,), (Q, K, V, dO, lse, Dvec, dQacc, dK, dV) + dims,
                         shared_mem=spec.smem(d, Br, Bc))
        n = Q.size
        fns["bwd_dq_convert"]((-(-n // (8 * 256)),), (256,), (dQacc, dQ, i64(n), f32(scale)))
    else:  # cupy-bwd-mma-2kernel
        tpr = d // 8
        fns["bwd_preprocess"]((-(-rows * tpr // 256),), (256,), (O, dO, Dvec, i64(rows)))
        fns["flash_bwd_dkdv"]((Tc, Hkv, B), (threads,), (Q, K, V, dO, lse, Dvec, dK, dV) + dims,
                              shared_mem=spec.smem(d, Br, Bc))
        Tr = -(-Nq // Bc)  # the dQ kernel's blocks hold Bc queries
        fns["flash_bwd_dq"]((Tr, Hq, B), (threads,), (Q, K, V, dO, lse, Dvec, dQ) + dims,
                            shared_mem=spec.dq_smem(d, Br, Bc))
    return dQ, dK, dV


def run(rung, problem, O, dO, lse, element: Optional[str] = None):
    """backward() for a validated flashkit Problem (what the public API hands a backend)."""
    if problem.mask is not None:
        raise ValueError(f"{rung_of(rung).name} does not support a custom mask (causal and sliding windows are supported)")
    return backward(rung, problem.Q, problem.K, problem.V, O, dO, lse, scale=problem.scale, window=problem.window,
                    element=element, block_size=problem.block_size)


def spot_check_lse(problem, heads: int = 8, rows_per_head: int = 2) -> None:
    """Raise unless the forward's lse fits these Q, K on a sample of rows (the CPU backends check every row
    while they recompute P; the CUDA kernels do not, so a sample is recomputed here).

    Rows 0 and Nq - 1 of up to `heads` (b, h) pairs spread over the batch and heads: their S = Q_i K^T *
    scale under the window, P = exp(S - lse_i) in float32, must sum to 1 (a row with lse = -inf must see no
    key). A lse in log2 units, from another call or with q and k swapped is off on every row, so a sample
    finds it; only the sampled heads' K are converted to float32 (all of K cost 1.4 ms at B=4, H=32, N=4096,
    d=64 on an H200: benchmarks/results/gpu-overhead-*.json). A custom mask is refused before this."""
    import cupy
    import numpy as np

    from flashkit import validate
    from flashkit.gpu.standard import bf16_bits_to_float32
    from flashkit.masks import row_bounds

    B, Hq, Nq, Nk, g = problem.B, problem.Hq, problem.Nq, problem.Nk, problem.group
    flat = np.unique(np.linspace(0, B * Hq - 1, min(heads, B * Hq)).astype(np.int64))
    bs, hs = flat // Hq, flat % Hq  # the sampled (b, h)
    rows = np.unique(np.linspace(0, Nq - 1, rows_per_head).astype(np.int64))
    as32 = bf16_bits_to_float32 if problem.element == "bf16" else (lambda x: x.astype(cupy.float32))
    b_, h_ = cupy.asarray(bs), cupy.asarray(hs)
    Q_r = as32(problem.Q[b_, h_][:, cupy.asarray(rows)])  # (n, r, d)
    K_n = as32(problem.K[b_, h_ // g])  # (n, Nk, d): the K/V head each sampled query head reads
    S = cupy.matmul(Q_r, K_n.transpose(0, 2, 1)) * cupy.float32(problem.scale)  # (n, r, Nk)
    lo, hi = row_bounds(Nq, Nk, problem.window)
    j = cupy.arange(Nk)
    vis = (j[None, :] >= cupy.asarray(lo[rows])[:, None]) & (j[None, :] < cupy.asarray(hi[rows])[:, None])  # (r, Nk)
    lse = problem.lse[b_, h_][:, cupy.asarray(rows)].astype(cupy.float32)  # (n, r)
    empty = cupy.isneginf(lse)
    P = cupy.where(vis & ~empty[..., None], cupy.exp(S - cupy.where(empty, 0, lse)[..., None]), 0)
    psum = cupy.where(empty, vis.sum(axis=-1).astype(cupy.float32), P.sum(axis=-1))
    labels = [[(int(b), int(h), int(i)) for i in rows] for b, h in zip(bs, hs)]
    validate.check_lse_rowsums(cupy.asnumpy(psum), cupy.asnumpy(lse), np.float32, labels=labels)


def run_problem(name: str, problem):
    """The registry's backward runner: (dQ, dK, dV) of a Problem from validate.check_backward."""
    if problem.mask is not None:
        raise ValueError(f"{name} does not support a custom mask (causal and sliding windows are supported)")
    spot_check_lse(problem)
    return backward(name, problem.Q, problem.K, problem.V, problem.O, problem.dO, problem.lse,
                    scale=problem.scale, window=problem.window, element=problem.element,
                    block_size=problem.block_size)


def __getattr__(name: str):
    """`flashkit.gpu.backward:cupy-bwd-mma` (a backend's backward runner) is run_problem bound to that rung."""
    if name in RUNGS:
        return functools.partial(run_problem, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def flops(B: int, Hq: int, Nq: int, Nk: int, d: int, window=(-1, -1)) -> float:
    """Backward FLOPs as FlashAttention counts them: 2.5x the forward's 4 B H Nq Nk d x the visible fraction.

    (Five Nq x Nk x d products against the forward's two: S, dP, dV, dK, dQ; recomputing S is counted, the
    two-kernel rung's second S and dP are not.)
    """
    from flashkit.masks import visible_fraction

    return 2.5 * 4.0 * B * Hq * Nq * Nk * d * visible_fraction(Nq, Nk, tuple(window))


__all__ = ["RUNGS", "BackwardRung", "backward", "kernels", "blocks_for", "rung_of", "run", "flops"]
