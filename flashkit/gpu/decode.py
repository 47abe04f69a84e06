"""Split-K decoding on the GPU: launches kernels/decode_splitk.cu through CuPy (imported lazily).

Two launches per step: `decode_splitk` (grid = splits x (H_kv * row groups) x B blocks of 128 threads,
each writing the (m, l, O) state of its chunk of keys) and `decode_merge` (one block per query row,
the exact merge of flashkit.online_softmax.merge done on the device, so nothing leaves the GPU).

    step = prepare(problem, splits)   # compiles once, allocates the partial states and outputs
    O, lse = step()                   # the two launches only: what the benchmark times

Measured on an H100 80GB HBM3 (benchmarks/results/decode-nvidia-h100-80gb-hbm3.json; GQA 32/8, d = 128,
fp16, one new token, cache of 32768 tokens; copy bandwidth 3.01 TB/s read + write, CUDA events):
    batch 1: 63.6 us, 2.11 TB/s of K+V (70% of copy); torch flash 89.5 us, cuDNN 88.5 us; unsplit 742 us
    batch 8: 364.5 us, 2.95 TB/s (98% of copy); torch flash 363.2 us, cuDNN 360.7 us
    without PREFETCH: 67.3 us and 396.0 us. Splits sweep at batch 1: 32 splits 61.2 us, auto (49) 63.6 us.
Measured on an NVIDIA H200 (benchmarks/results/decode-nvidia-h200-history1.json, commit 6325270, the same shapes, copy bandwidth 4.2
TB/s; CUDA events):
    batch 1: 51.0 us (2.63 TB/s of K+V); torch flash 78.6 us, cuDNN 68.0 us (1.33x ahead of cuDNN)
    batch 8: 263.0 us (4.08 TB/s, 96% of copy); torch flash 286.1 us, cuDNN 249.7 us (0.95x cuDNN: the goal,
      >= 1.0x, is not met; an earlier run of the same code: 259.0 against 242.2, 0.94x). Splits sweep: auto
      (6: one wave) is the best of 6, 8, 16, 32 ... 256; the .L2::256B load hint (L2_HINT) 279.5 us, slower.

Again on the H200 (decode-nvidia-h200.json, commit f5ee5dc): batch 1 50.7 us, cuDNN 43.7 (0.86x: cuDNN was 68.0
in the earlier run, so "ahead at batch 1" no longer holds); batch 8 281.0 us, cuDNN 249.6 (0.89x). The BULK kernel
(bulk=(stages, tile bytes): cp.async.bulk into shared memory) 49.2-50.6 us / 283.0-302.7 us: not the default.

Supported: float16 and float32; head size d in {64, 128, 256} (float16) or {64, 128} (float32);
any GQA group and few query rows (the rows of a group are cut into blocks of at most 8).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).parent / "kernels" / "decode_splitk.cu"
THREADS = 128
L2_HINT = False  # loads with the .L2::256B prefetch hint (kernels/decode_splitk.cu, DECODE_L2_256B): measured, not the default
HEAD_DIMS = {"float16": (64, 128, 256), "float32": (64, 128)}


def _rows_per_block(R: int) -> int:
    """Query rows a block serves (ROWS, a template parameter): the smallest of 1, 2, 4, 8 >= R, at most 8."""
    for rows in (1, 2, 4, 8):
        if R <= rows:
            return rows
    return 8


def _kernels(dtype_name: str, D: int, rows: int, prefetch: bool = True, l2_hint: bool = None, bulk=None):
    """(split kernel, decode_merge) compiled for one (dtype, D, ROWS, PREFETCH, L2 hint) or, with bulk = (stages,
    tile bytes), the BULK kernel; cached per process (and on disk by CuPy)."""
    if bulk:
        return _compile_bulk(dtype_name, D, rows, int(bulk[0]), int(bulk[1]))
    return _compile(dtype_name, D, rows, bool(prefetch), L2_HINT if l2_hint is None else bool(l2_hint))


def bulk_tile_keys(dtype_name: str, D: int, tile_bytes: int) -> int:
    """TK, the keys of one BULK stage: tile_bytes of K (and as many of V)."""
    return max(1, tile_bytes // (D * np.dtype(dtype_name).itemsize))


def bulk_smem(dtype_name: str, D: int, stages: int, tile_bytes: int) -> int:
    """Dynamic shared memory of the BULK kernel: STAGES stages of K and V tiles (the block merge reuses them)."""
    return 2 * stages * bulk_tile_keys(dtype_name, D, tile_bytes) * D * np.dtype(dtype_name).itemsize


_LAUNCH = {}  # id(kernel) -> (threads, dynamic shared memory) where not (THREADS, 0)


def _launch(kernel):
    return _LAUNCH.get(id(kernel), (THREADS, 0))


@functools.cache
def _compile_bulk(dtype_name: str, D: int, rows: int, stages: int, tile_bytes: int):
    import cupy

    from flashkit.gpu.flash import include_options

    T = "__half" if dtype_name == "float16" else "float"
    TK = bulk_tile_keys(dtype_name, D, tile_bytes)
    split_name = f"decode_splitk_bulk<{T}, {D}, {rows}, 4, {TK}, {stages}>"
    merge_name = f"decode_merge<{T}>"
    module = cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++17",) + include_options(),
                            name_expressions=(split_name, merge_name))
    split = module.get_function(split_name)
    smem = bulk_smem(dtype_name, D, stages, tile_bytes)
    if smem > 48 * 1024:
        split.max_dynamic_shared_size_bytes = smem
    _LAUNCH[id(split)] = (160, smem)  # 4 consumer warps and the producer warp (the kernel is cached: id stays)
    return split, module.get_function(merge_name)


@functools.cache
def _compile(dtype_name: str, D: int, rows: int, prefetch: bool, l2_hint: bool = False):
    import cupy

    T = "__half" if dtype_name == "float16" else "float"
    U = 4 if rows <= 4 else 2  # keys in flight per lane; 8 rows x 4 keys would exceed the registers
    split_name = f"decode_splitk<{T}, {D}, {rows}, {U}, {'true' if prefetch else 'false'}>"
    merge_name = f"decode_merge<{T}>"
    options = ("-std=c++17",) + (("-DDECODE_L2_256B",) if l2_hint else ())
    from flashkit.gpu.flash import include_options

    module = cupy.RawModule(code=SOURCE.read_text(), options=options + include_options(),
                            name_expressions=(split_name, merge_name))
    return module.get_function(split_name), module.get_function(merge_name)


def sm_count() -> int:
    import cupy

    return cupy.cuda.Device().attributes["MultiProcessorCount"]


def blocks_per_sm(kernel) -> int:
    """How many blocks of `kernel` (128 threads, or the BULK kernel's 160 and its dynamic shared memory) fit on
    one SM at once (registers, shared memory)."""
    threads, smem = _launch(kernel)
    try:
        from cupy.cuda import driver

        fn = getattr(kernel, "kernel", kernel)  # a RawKernel's driver function
        return max(1, int(driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, threads, smem)))
    except Exception:  # no occupancy call: the ptxas-derived figures (3 for the register kernel; BULK: 2 by
        # its ~160 registers, fewer where its stages do not fit twice in 227 KB)
        return 3 if not smem else max(1, min(2, (227 * 1024) // (smem + 1024)))


def _layout(Q, K):
    """(rows per block, row groups) for a problem's shapes."""
    B, Hq, Nq, D = Q.shape
    R = (Hq // K.shape[1]) * Nq
    rows = _rows_per_block(R)
    return rows, math.ceil(R / rows)


def _unsupported(Q, K, V):
    """None if the kernel can serve these CuPy arrays, else why not (nothing is compiled)."""
    name, D = Q.dtype.name, Q.shape[-1]
    if name not in HEAD_DIMS:
        return f"backend 'cupy-splitk' supports float16 and float32; got {name}"
    if D not in HEAD_DIMS[name]:
        return (f"backend 'cupy-splitk' supports head size d in {{{', '.join(map(str, HEAD_DIMS[name]))}}} "
                f"for {name}; got d={D}")
    for label, x in (("q", Q), ("k_cache", K), ("v_cache", V)):
        if x.data.ptr % 16:
            return f"{label} must start on a 16-byte boundary for the kernel's vector loads; pass a copy"
    return None


def unsupported_reason(problem):
    """The registry's `supports` check of "cupy-splitk" (a Problem or a DecodeProblem with CuPy arrays):
    the head sizes per dtype and the alignment, which the Backend's fields cannot state."""
    return _unsupported(problem.Q, problem.K, problem.V)


def check_supported(Q, K, V):
    """Raise ValueError, before anything is compiled, if the kernel cannot serve these arrays."""
    reason = _unsupported(Q, K, V)
    if reason is not None:
        raise ValueError(reason)


def auto_splits(problem, prefetch: bool = True, bulk=None) -> int:
    """Exactly one wave: as many blocks as fit on the GPU at once, never chunks under 128 keys."""
    check_supported(problem.Q, problem.K, problem.V)
    B, Hkv = problem.Q.shape[0], problem.K.shape[1]
    rows, row_groups = _layout(problem.Q, problem.K)
    split_kernel, _ = _kernels(problem.Q.dtype.name, problem.Q.shape[3], rows, prefetch, bulk=bulk)
    slots = sm_count() * blocks_per_sm(split_kernel)
    want = max(1, slots // (B * Hkv * row_groups))
    return max(1, min(want, math.ceil(max(problem.n_keys, 1) / 128)))


def prepare(problem, splits: int, prefetch: bool = True, l2_hint: bool = None, bulk=None):
    """A callable running one decoding step of `problem` (a flashkit.problem.DecodeProblem with CuPy
    arrays) with `splits` chunks; it returns (O (B, Hq, Nq, d) of Q's dtype, lse (B, Hq, Nq) float32).
    prefetch: the kernel variant that issues the loads of step t + 1 before the arithmetic of step t;
    l2_hint: loads with the .L2::256B hint (default L2_HINT); bulk = (stages, tile bytes): the BULK kernel
    (cp.async.bulk into shared memory, sm_90), which ignores prefetch and l2_hint."""
    import cupy

    Q, K, V = problem.Q, problem.K, problem.V
    name = Q.dtype.name
    B, Hq, Nq, D = Q.shape
    Hkv, Nmax = K.shape[1], K.shape[2]
    check_supported(Q, K, V)
    rows, row_groups = _layout(Q, K)
    split_kernel, merge_kernel = _kernels(name, D, rows, prefetch, l2_hint, bulk=bulk)
    threads, smem = _launch(split_kernel)
    n_keys = problem.n_keys
    chunk = max(1, math.ceil(n_keys / splits))
    lo = cupy.asarray(np.ascontiguousarray(problem.lo, dtype=np.int32))
    hi = cupy.asarray(np.ascontiguousarray(problem.hi, dtype=np.int32))
    n_rows = B * Hq * Nq
    Mp = cupy.empty((splits, n_rows), cupy.float32)
    Lp = cupy.empty((splits, n_rows), cupy.float32)
    Op = cupy.empty((splits, n_rows, D), cupy.float32)
    O = cupy.empty((B, Hq, Nq, D), Q.dtype)
    lse = cupy.empty((B, Hq, Nq), cupy.float32)
    scale_log2 = np.float32(problem.scale * math.log2(math.e))  # scores in base 2: exp(x) = exp2(x log2 e)
    split_args = (Q, K, V, lo, hi, scale_log2, np.int32(Hq), np.int32(Hkv), np.int32(Nq), np.int32(Nmax),
                  np.int32(n_keys), np.int32(chunk), np.int32(row_groups), Mp, Lp, Op)
    merge_args = (Mp, Lp, Op, np.int32(splits), np.int32(n_rows), np.int32(D), O, lse)
    merge_threads = min(D, THREADS)

    def step():
        split_kernel((splits, Hkv * row_groups, B), (threads,), split_args, shared_mem=smem)
        merge_kernel((n_rows,), (merge_threads,), merge_args)
        return O, lse

    step.partials = (Mp, Lp, Op)  # (m, l, O) of every split after a call, for tests and pictures
    step.config = dict(splits=splits, chunk=chunk, rows_per_block=rows, row_groups=row_groups, prefetch=bool(prefetch),
                       grid=(splits, Hkv * row_groups, B), threads=threads, bulk=bulk, smem=smem, blocks_per_sm=blocks_per_sm(split_kernel))
    return step


def decode(problem, splits="auto"):
    """The "cupy-splitk" decode runner: (O, lse) of a DecodeProblem on the GPU (new arrays each call).
    "auto": auto_splits, one wave of blocks."""
    if splits == "auto":
        splits = auto_splits(problem)
    return prepare(problem, splits)()  # prepare allocates fresh outputs


def run(problem):
    """(O, lse) of a flashkit Problem (the "cupy-splitk" runner of flashkit.attention: causal and
    windows, no custom mask): the whole of K and V as a filled cache."""
    from flashkit.problem import DecodeProblem

    return decode(DecodeProblem.from_problem(problem))
