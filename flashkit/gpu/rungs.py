"""The GPU ladder in one table: every fact about a rung is written once, here.

Each row of `RUNGS` is one rung, forward or backward. The registry's backends (flashkit.gpu.BACKENDS),
the kernel build and launch (flashkit.gpu.flash, flashkit.gpu.backward), the correctness checks
(flashkit.gpu.check, flashkit.gpu.check_backward), the benchmarks (benchmarks/gpu_forward.py,
gpu_backward.py, gpu_session.py) and the tests all read this table; adding a rung is adding a row (and its
kernels/N_name.cu file, bN_name.cu for a backward one).

A row's `direction` says what its runner computes from a Problem:
  "forward"   (O, lse): O (B, Hq, Nq, d) in the input dtype, lse (B, Hq, Nq) float32, natural log;
  "backward"  (dQ, dK, dV): the gradients of the forward's loss, shaped as Q, K and V.
CUDA rows use the generic launcher of their direction (flashkit.gpu.flash.forward,
flashkit.gpu.backward.backward) unless they name a `runner`. A row's `kernels` lists what one call
launches, in order (a backward: D preprocessing, the dK/dV kernel, the dQ kernel or conversion), each
with its own shared-memory size: see `Kernel`.

Plain Python: importing this module imports neither CuPy nor NumPy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from flashkit.registry import Backend

HEAD_DIMS = (32, 64, 128)  # the head sizes every CUDA rung is compiled for (-DHEAD_DIM)
ELEMENTS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # dtype name -> kernel element type
INPUT_CHECK_SMEM = 3 * 16384  # rung 7's buffers for its fused NaN/Inf check: SCAN_SMEM of kernels/input_check.cuh
DIRECTIONS = ("forward", "backward")

PROBE = "flashkit.gpu:_probe"
PROBE_TENSOR_CORES = "flashkit.gpu:_probe_tensor_cores"
PROBE_HOPPER = "flashkit.gpu:_probe_hopper"


@dataclass(frozen=True)
class Kernel:
    """One `extern "C" __global__` function of a rung's source, launched once per call.

    name   the function's name in the .cu file
    role   what it does in the call ("attention" for a forward; "preprocess" (D = rowsum(dO * O), zeroing),
           "main" (dK, dV and dQ by atomics), "dkdv", "dq", "convert" (fp32 dQ to the input dtype), "check")
    smem   (d, Br, Bc) -> dynamic shared-memory bytes (None: none); must match the layout in the .cu file
    """

    name: str
    role: str
    smem: Optional[Callable[[int, int, int], int]] = None


@dataclass(frozen=True)
class Rung:
    """One rung of the GPU ladder.

    number          place in the ladder (1 = the materialising baseline)
    name            the backend name users pass as backend=...
    summary         one line for the backends table
    dtypes          dtype names the rung computes
    peer            the torch SDPA backend it is measured against ("flash", "efficient", "cudnn", "math")
    priority        "auto" picks the available backend with the highest priority that supports the request
    direction       "forward" or "backward" (what the runner returns: see the module docstring)
    source          file under flashkit/gpu/kernels/ (None: not a CUDA kernel, rung 1 is CuPy calls)
    head_dims       supported head sizes d (None: any)
    mask            whether a custom boolean mask is supported
    mods            whether it takes score_mod / mask_mod / block_mask (flashkit.gpu.flash_mods fills the
                    kernel's FK_* hooks with the mods translated by flashkit.gpu.modlang; for a backward row,
                    flashkit.gpu.flash_mods_backward, and the registry's column is `backward_mods`)
    probe           "module:function" giving None when the rung can run here, else why not
    runner          "module:function" taking a Problem; None for a forward CUDA rung (the generic launcher)
    backward_runner for a forward row that also serves attention_backward: its "module:function"
    default_blocks  d -> (Br, Bc) used when the user forces none
    allowed_blocks  the (Br, Bc) a user may force with block_size=: one tuple for every d, or d -> tuple
    threads         (Br, Bc) -> threads per block (of the main kernels)
    smem            (d, Br, Bc) -> dynamic shared-memory bytes of a forward kernel; must match the .cu file
    kernels         what one call launches, in order (Kernel rows); a forward rung launches one, `flash_fwd`
    defines_br      whether Br is a -DBR of the source (else fixed in it); defines_bc likewise
    arch            the exact compile target when the kernel needs one (e.g. "sm_90a"); None: the device's own
    tensor_maps     whether the kernel takes TMA tensor maps as an argument (flashkit.gpu.tma): of Q, K, V for
                    a forward, of Q, K, V, dO for a backward (its main kernel)
    checks_inputs   whether the forward kernel tests Q, K, V for NaN/Inf itself (its last six arguments:
                    flashkit.finite.Fused.launch_args; kernels/input_check.cuh), so the public call needs no
                    separate scan
    precision       "exact": the dtype's own arithmetic; "tf32": float32 inputs rounded to TF32 for the
                    tensor cores (opt-in only, flashkit.attention(..., precision="tf32"); lowest priority,
                    so "auto" never picks it otherwise; flashkit.gpu.check holds it to a TF32 reference)
    """

    number: int
    name: str
    summary: str
    dtypes: Tuple[str, ...]
    peer: str
    priority: int
    direction: str = "forward"
    source: Optional[str] = None
    head_dims: Optional[Tuple[int, ...]] = HEAD_DIMS
    mask: bool = False
    mods: bool = False
    probe: str = PROBE
    runner: Optional[str] = None
    default_blocks: Dict[int, Tuple[int, int]] = field(default_factory=dict)
    allowed_blocks: Tuple[Tuple[int, int], ...] | Dict[int, Tuple[Tuple[int, int], ...]] = ()
    threads: Optional[Callable[[int, int], int]] = None
    smem: Optional[Callable[[int, int, int], int]] = None
    kernels: Tuple[Kernel, ...] = ()
    defines_br: bool = True
    defines_bc: bool = True
    arch: Optional[str] = None
    tensor_maps: bool = False
    checks_inputs: bool = False
    precision: str = "exact"
    backward_runner: Optional[str] = None  # a forward row that also serves attention_backward (cupy-standard)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"rung {self.number}: direction must be one of {DIRECTIONS}; got {self.direction!r}")
        if self.runner is None and self.source is None:
            raise ValueError(f"rung {self.number}: a rung without a CUDA source must name its `runner`")
        if self.source is not None and self.direction == "forward" and not self.kernels:
            object.__setattr__(self, "kernels", (Kernel("flash_fwd", "attention", self.smem),))

    def allowed(self, d: int) -> Tuple[Tuple[int, int], ...]:
        """The (Br, Bc) a user may force at head size d."""
        return self.allowed_blocks.get(d, ()) if isinstance(self.allowed_blocks, dict) else self.allowed_blocks

    def kernel(self, role: str) -> Kernel:
        """The kernel of this rung that plays `role`."""
        for k in self.kernels:
            if k.role == role:
                return k
        raise KeyError(f"{self.name} has no {role!r} kernel; it launches {', '.join(k.role for k in self.kernels)}")

    @property
    def file_prefix(self) -> str:
        """How the rung's source file name starts: "6_" for forward rung 6, "b2_" for backward rung 2."""
        return f"{self.number}_" if self.direction == "forward" else f"b{self.number}_"
    @property
    def is_kernel(self) -> bool:
        """True for a CUDA kernel file compiled by flashkit.gpu.flash."""
        return self.source is not None

    @property
    def elements(self) -> Tuple[str, ...]:
        """The kernel element types ("f32", "f16", "bf16") of a CUDA rung's dtypes."""
        return tuple(ELEMENTS[d] for d in self.dtypes)

    def backend(self) -> Backend:
        """This rung's entry in the registry: a forward backend, or a backward-only one
        (flashkit.attention_backward) for a backward row."""
        if self.direction == "forward":
            runner, backward = self.runner or f"flashkit.gpu.flash:{self.name}", self.backward_runner
        else:
            runner, backward = None, self.runner or f"flashkit.gpu.backward:{self.name}"
        return Backend(
            name=self.name,
            device="gpu",
            summary=self.summary,
            runner=runner,
            backward=backward,
            dtypes=self.dtypes,
            head_dims=self.head_dims,
            mask=self.mask,
            mods=self.mods and self.direction == "forward",
            backward_mods=self.mods and self.direction == "backward",
            priority=self.priority,
            probe=self.probe,
            rung=self.number,
            checks_inputs=self.checks_inputs,
        )


RUNGS = (
    Rung(
        1, "cupy-standard",
        "CuPy/cuBLAS, materialises S and P (Nq x Nk per head) on the GPU: the O(N^2) baseline",
        dtypes=("float16", "bfloat16", "float32", "float64"), peer="math", priority=60,
        runner="flashkit.gpu.standard:standard_attention", head_dims=None, mask=True,
        backward_runner="flashkit.gpu.standard:standard_backward",  # P and dP materialised: also O(N^2)
    ),
    # Q_s [Br][d+1] + K_s [Bc][d] + V_s [Bc][d] + S_s [Bc][Br], fp32.
    Rung(
        2, "cupy-fp32-row",
        "CUDA fp32, one thread per query row, K/V tiles in shared memory (kernels/2_fp32_row.cu)",
        dtypes=("float32",), peer="efficient", priority=70, source="2_fp32_row.cu",
        default_blocks={32: (64, 32), 64: (64, 32), 128: (64, 32)},
        allowed_blocks=((32, 16), (32, 32), (64, 16), (64, 32), (128, 16), (128, 32)),
        threads=lambda Br, Bc: Br,
        smem=lambda d, Br, Bc: 4 * (Br * (d + 1) + 2 * Bc * d + Bc * Br),
    ),
    # Q_s [64][d+4] + KV_s [Bc][d+4] + P_s [64][Bc+8], fp32, + V_s [Bc][d+4] at d = 64 (the kernel's KV_ASYNC rule:
    # K_j and V_j in two buffers filled by cp.async); 128 threads fix Br = 64. Defaults 64 x 64 everywhere (2026-12-02,
    # H200, benchmarks/results/fp32-steps-h200.json): d = 64 with KV_ASYNC 1.06-1.07x torch efficient; d = 128 with
    # TX = 16 (8 rows of S per thread) 0.78-0.79x, against 0.70-0.72x for the old 64 x 32 with TX = 8.
    Rung(
        3, "cupy-fp32-tile",
        "CUDA fp32, register-blocked S tiles, warp-shuffle reductions (kernels/3_fp32_tile.cu)",
        dtypes=("float32",), peer="efficient", priority=80, source="3_fp32_tile.cu",
        default_blocks={32: (64, 64), 64: (64, 64), 128: (64, 64)},
        allowed_blocks=((64, 32), (64, 64)),
        threads=lambda Br, Bc: 128,
        smem=lambda d, Br, Bc: 4 * ((64 + Bc * (2 if d == 64 else 1)) * (d + 4) + 64 * (Bc + 8)),
        defines_br=False,
    ),
    # Q_s [64][d+8] + K_s [Bc][d+8] + V_s [Bc][d+8], 16-bit; 4 warps x 16 rows fix Br = 64.
    Rung(
        4, "cupy-mma",
        "CUDA fp16/bf16 tensor cores, mma.sync m16n8k16, FA2 partition (kernels/4_mma.cu)",
        dtypes=("float16", "bfloat16"), peer="flash", priority=90, source="4_mma.cu", probe=PROBE_TENSOR_CORES,
        default_blocks={32: (64, 64), 64: (64, 64), 128: (64, 64)},
        allowed_blocks=((64, 32), (64, 64)),
        threads=lambda Br, Bc: 128,
        smem=lambda d, Br, Bc: 2 * (64 + 2 * Bc) * (d + 8),
        defines_br=False,
    ),
    # Q_s [Br][d+8] + K_s [2][Bc][d+8] + V_s [Bc][d+8], 16-bit; Br / 16 warps. Defaults: the best of the
    # block sweep on an H100 (N=4096, fp16, benchmarks/results/gpu-h100-80gb-hbm3-history2.json; d=32 not
    # swept, set like d=64).
    Rung(
        5, "cupy-mma-async",
        "rung 4 + ldmatrix, cp.async pipelining, mask-free full tiles (kernels/5_mma_async.cu)",
        dtypes=("float16", "bfloat16"), peer="flash", priority=100, source="5_mma_async.cu", probe=PROBE_TENSOR_CORES,
        default_blocks={32: (128, 64), 64: (128, 64), 128: (128, 128)},
        allowed_blocks=((64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128)),
        threads=lambda Br, Bc: 2 * Br,
        smem=lambda d, Br, Bc: 2 * (Br + 3 * Bc) * (d + 8),
    ),
    # Rung 5's layout with Br / 32 warps (two 16-row m-tiles each). Defaults from its sweep on an H100 (N=4096,
    # fp16, benchmarks/NOTES-gpu.md "Rung 6"; d=32 not swept). d = 128 with Bc = 128 spills (ptxas: 832 bytes)
    # and runs at 0.55x of 128 x 64: allowed, never a default.
    Rung(
        6, "cupy-mma-2tile",
        "rung 5 with 32 query rows per warp: each K/V fragment feeds 2 mma (kernels/6_mma_2tile.cu)",
        dtypes=("float16", "bfloat16"), peer="flash", priority=110, source="6_mma_2tile.cu", probe=PROBE_TENSOR_CORES,
        mask=True, mods=True,
        default_blocks={32: (128, 64), 64: (128, 64), 128: (128, 64)},
        allowed_blocks=((64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128)),
        threads=lambda Br, Bc: Br,
        smem=lambda d, Br, Bc: 2 * (Br + 3 * Bc) * (d + 8),
    ),
    # Q_s [Br][d] + K_s, V_s [2 stages][Bc][d], 16-bit, 128-byte swizzled, + 9 mbarriers + 1024 bytes to align
    # the base; Br / 64 consumer warpgroups + 1 producer warpgroup. sm_90a only (wgmma, setmaxnreg). Priority above
    # rung 6: checked correct and 1.41-1.77x rung 6 in all eight cells on an H200 (rung7-h200.json). Defaults:
    # 192 x 128 at d = 64 (+3% to +12% over 128 x 128 in its four cells, fwd-issue11-h200.json), 128 x 128 at
    # d = 128 (192 x 128 spills 100 bytes there: +5% / +12% non-causal but -7% / -1% causal).
    Rung(
        7, "cupy-wgmma",
        "Hopper: wgmma from shared memory, TMA + mbarrier pipeline, producer/consumer warpgroups (kernels/7_wgmma.cu)",
        dtypes=("float16", "bfloat16"), peer="cudnn", priority=120, source="7_wgmma.cu", probe=PROBE_HOPPER,
        head_dims=(64, 128),
        default_blocks={64: (192, 128), 128: (128, 128)},
        allowed_blocks=((64, 64), (64, 128), (128, 64), (128, 128), (192, 64), (192, 128)),
        threads=lambda Br, Bc: 128 * (Br // 64 + 1),
        smem=lambda d, Br, Bc: 2 * d * (Br + 4 * Bc) + 128 + INPUT_CHECK_SMEM + 1024,
        arch="sm_90a", tensor_maps=True, checks_inputs=True,
    ),
    # K_s, V_s [2 stages][Bc][d+4], fp32; 4 warps x 16 rows fix Br = 64. Default Bc = 32 at d = 128 (204 registers,
    # 67.6 KB: two blocks per SM; Bc = 64 takes 223 registers and 135 KB, one block per SM); not swept yet.
    # H200: 91-96 TFLOP/s, 2.1-2.7x torch efficient, max rel error 2.7e-4 - 6.3e-4 (fwd-issue11-h200.json).
    Rung(
        8, "cupy-tf32",
        "CUDA fp32 inputs as TF32 on tensor cores, mma.sync m16n8k8 (opt-in: precision='tf32'; kernels/8_tf32_mma.cu)",
        dtypes=("float32",), peer="efficient", priority=1, source="8_tf32_mma.cu", probe=PROBE_TENSOR_CORES,
        default_blocks={32: (64, 64), 64: (64, 64), 128: (64, 32)},
        allowed_blocks=((64, 32), (64, 64)),
        threads=lambda Br, Bc: 128,
        smem=lambda d, Br, Bc: 4 * 2 * 2 * Bc * (d + 4),
        defines_br=False, precision="tf32",
    ),
    # ---- the backward ladder (FlashAttention-2's Algorithm 2; flashkit/gpu/backward.py launches it) ----------
    # K_s, V_s [Bc][d+4], Q_s, dO_s [Br][d+4], P^T_s, dS^T_s [Bc][Br+4], lse_s, D_s [Br]; fp32. 64 x 128 only up to
    # d = 64 (at d = 128 it would need 273 KB of shared memory; at d = 64 175 KB and 229 registers, one block per SM).
    # Default 64 x 64: the best of the sweep on the H200 at d = 64 and 128 (fp32, N = 4096).
    Rung(
        1, "cupy-bwd-fp32",
        "CUDA fp32 backward, FA2 Algorithm 2, dQ by fp32 atomics (kernels/b1_fp32.cu)",
        dtypes=("float32",), peer="efficient", priority=80, direction="backward", source="b1_fp32.cu",
        default_blocks={32: (64, 64), 64: (64, 64), 128: (64, 64)},
        allowed_blocks={d: ((32, 32), (32, 64), (64, 32), (64, 64)) + (((64, 128),) if d <= 64 else ())
                        for d in HEAD_DIMS},
        threads=lambda Br, Bc: 256,
        kernels=(Kernel("bwd_preprocess", "preprocess"),
                 Kernel("flash_bwd", "main",
                        lambda d, Br, Bc: 4 * (2 * (Bc + Br) * (d + 4) + 2 * Bc * (Br + 4) + 2 * Br)),
                 Kernel("bwd_lse_check", "check")),
    ),
    # K_s, V_s [Bc][d+8], Q_s, dO_s [2][Br][d+8], dS^T_s [Bc][Br+8] (16-bit), lse_s, D_s [2][Br], psum_s [Bc/16][Br]
    # (fp32).
    # Bc / 16 warps; the dQ step splits Br x d over them, which needs d / (warps / (Br/16)) % 16 == 0.
    # Default 64 x 128 at d = 128: the best of the sweep on the H200 (fp16, N = 4096; 64 x 64 loses 25-30%: twice the
    # dQ atomics). d = 64: 128 x 128 (8 warps of 16 keys, Br = 128 queries per step), +7% over 64 x 128 in the sweep
    # (229.2 vs 212.0 TFLOP/s, fp16 non-causal, benchmarks/results/gpu-bwd-h200-history3.json); only at d <= 64: at
    # d = 128 ptxas spills 152 bytes. d = 32 not swept.
    Rung(
        2, "cupy-bwd-mma",
        "CUDA fp16/bf16 backward, mma.sync, dQ by fp32 vector atomics (kernels/b2_mma.cu)",
        dtypes=("float16", "bfloat16"), peer="flash", priority=110, direction="backward", source="b2_mma.cu",
        probe=PROBE_TENSOR_CORES, mods=True,  # score_mod / mask_mod / block_mask: flashkit/gpu/flash_mods_backward.py
        mask=True,  # a bool mask= as bits of its PARTIAL tiles, empty tiles skipped (flash_mods_backward too)
        default_blocks={32: (64, 128), 64: (128, 128), 128: (64, 128)},
        allowed_blocks={32: ((32, 64), (64, 64), (64, 128), (128, 128)),
                        64: ((32, 64), (64, 64), (32, 128), (64, 128), (128, 128)),
                        128: ((32, 64), (64, 64), (32, 128), (64, 128))},
        threads=lambda Br, Bc: 2 * Bc,
        kernels=(Kernel("bwd_preprocess", "preprocess"),
                 Kernel("flash_bwd", "main",
                        lambda d, Br, Bc: 2 * ((2 * Bc + 4 * Br) * (d + 8) + Bc * (Br + 8)) + 16 * Br + Bc * Br // 4),
                 Kernel("bwd_lse_check", "check"),
                 Kernel("bwd_dq_convert", "convert")),
    ),
    # dK/dV kernel: rung 2's layout without dS^T_s; dQ kernel: Q_s, dO_s [Bc][d+8], K_s, V_s [2][Br][d+8].
    # Defaults from the block sweep on the H200 (fp16, N = 4096, non-causal; benchmarks/results/gpu-bwd-h200-history1.json,
    # confirmed in gpu-bwd-h200-history3.json): d = 64 64 x 64 (201.7 / 196.8 TFLOP/s vs 179.1 / 178.6 at 64 x 128); d = 128
    # 64 x 128 (204.9 / 206.3, 64 x 64 204.5 / 200.0); d = 32 not swept, set like d = 64. The dQ kernel's blocks hold
    # Bc queries and step over Br keys, so one (Br, Bc) sets both kernels.
    Rung(
        3, "cupy-bwd-mma-2kernel",
        "CUDA fp16/bf16 backward, a dK/dV kernel and a dQ kernel, no atomics (kernels/b3_mma_2kernel.cu)",
        dtypes=("float16", "bfloat16"), peer="flash", priority=100, direction="backward",
        source="b3_mma_2kernel.cu", probe=PROBE_TENSOR_CORES,
        default_blocks={32: (64, 64), 64: (64, 64), 128: (64, 128)},
        allowed_blocks={d: ((32, 64), (64, 64), (32, 128), (64, 128)) for d in HEAD_DIMS},
        threads=lambda Br, Bc: 2 * Bc,
        kernels=(Kernel("bwd_preprocess", "preprocess"),
                 Kernel("flash_bwd_dkdv", "dkdv", lambda d, Br, Bc: 2 * (2 * Bc + 4 * Br) * (d + 8) + 16 * Br),
                 Kernel("flash_bwd_dq", "dq", lambda d, Br, Bc: 2 * (2 * Bc + 4 * Br) * (d + 8))),
    ),
    # K_s, V_s [d/64][Bc][64]; Q_s, dO_s [2 stages][d/64][Br][64]; dS^T_s [2][Br/64][Bc][64] (16-bit, each [rows][64]
    # block 128-byte swizzled, 1024-aligned); lse_s, D_s [2][Br], psum_s [2][8][Br] (fp32); 5 mbarriers; + 1024 for
    # the alignment. One (Br, Bc) per d: every product is then 64 x 64 or 64 x 128 per consumer warpgroup (the dQ_i
    # split of kernels/b4_wgmma.cu). Hopper only (wgmma, TMA, setmaxnreg: sm_90a). Priority above b2's: measured
    # 1.47-1.66x b2 in every cell on the H200 (benchmarks/results/gpu-bwd-h200-history7.json), so "auto" picks it there.
    Rung(
        4, "cupy-bwd-wgmma",
        "CUDA fp16/bf16 backward for Hopper: wgmma, TMA, a producer warp and two consumer warpgroups, dQ by fp32 "
        "vector atomics (kernels/b4_wgmma.cu)",
        dtypes=("float16", "bfloat16"), peer="flash", priority=115, direction="backward", source="b4_wgmma.cu",
        probe=PROBE_HOPPER, head_dims=(64, 128),
        default_blocks={64: (128, 128), 128: (64, 128)},
        allowed_blocks={64: ((128, 128),), 128: ((64, 128),)},
        threads=lambda Br, Bc: 384,
        kernels=(Kernel("bwd_preprocess", "preprocess"),
                 Kernel("flash_bwd", "main",
                        lambda d, Br, Bc: 1024 + 2 * (2 * Bc * d + 4 * Br * d + 2 * Br * Bc) + 4 * (4 * Br + 16 * Br) + 8 * 5),
                 Kernel("bwd_lse_check", "check"),
                 Kernel("bwd_dq_convert", "convert")),
        arch="sm_90a", tensor_maps=True,
    ),
)


def rung(number, direction: str = "forward") -> Rung:
    """The row of rung `number` of one direction's ladder, or of the rung named `number` ("cupy-bwd-mma")."""
    for r in RUNGS:
        if r.name == number or (r.number == number and r.direction == direction):
            return r
    known = ", ".join(str(r.number) for r in RUNGS if r.direction == direction)
    raise ValueError(f"no GPU {direction} rung {number!r}; the {direction} ladder has {known}")


def kernels(direction: str = "forward") -> Tuple[Rung, ...]:
    """The CUDA-kernel rows of one direction, in ladder order."""
    return tuple(r for r in RUNGS if r.is_kernel and r.direction == direction)
