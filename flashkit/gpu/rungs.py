"""The GPU ladder in one table: every fact about a rung is written once, here.

Each row of `RUNGS` is one rung. The registry's backends (flashkit.gpu.BACKENDS), the kernel build and
launch (flashkit.gpu.flash), the correctness checks (flashkit.gpu.check), the benchmark
(benchmarks/gpu_forward.py) and the tests all read this table; adding a rung is adding a row (and its
kernels/N_name.cu file).

A row's `direction` says what its runner computes from a Problem:
  "forward"   (O, lse): O (B, Hq, Nq, d) in the input dtype, lse (B, Hq, Nq) float32, natural log;
  "backward"  (dQ, dK, dV): the gradients of the forward's loss, shaped as Q, K and V.
Forward CUDA rows use the one generic launcher (flashkit.gpu.flash.forward); a backward row names its
own `runner`.

Plain Python: importing this module imports neither CuPy nor NumPy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from flashkit.registry import Backend

HEAD_DIMS = (32, 64, 128)  # the head sizes every CUDA rung is compiled for (-DHEAD_DIM)
ELEMENTS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # dtype name -> kernel element type
DIRECTIONS = ("forward", "backward")

PROBE = "flashkit.gpu:_probe"
PROBE_TENSOR_CORES = "flashkit.gpu:_probe_tensor_cores"
PROBE_HOPPER = "flashkit.gpu:_probe_hopper"


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
                    kernel's FK_* hooks with the mods translated by flashkit.gpu.modlang)
    probe           "module:function" giving None when the rung can run here, else why not
    runner          "module:function" taking a Problem; None for a forward CUDA rung (the generic launcher)
    default_blocks  d -> (Br, Bc) used when the user forces none
    allowed_blocks  the (Br, Bc) a user may force with block_size=
    threads         (Br, Bc) -> threads per block
    smem            (d, Br, Bc) -> dynamic shared-memory bytes; must match the layout in the .cu file
    defines_br      whether Br is a -DBR of the source (else fixed in it); defines_bc likewise
    arch            the exact compile target when the kernel needs one (e.g. "sm_90a"); None: the device's own
    tensor_maps     whether the kernel takes TMA tensor maps of Q, K, V as a last argument (flashkit.gpu.tma)
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
    allowed_blocks: Tuple[Tuple[int, int], ...] = ()
    threads: Optional[Callable[[int, int], int]] = None
    smem: Optional[Callable[[int, int, int], int]] = None
    defines_br: bool = True
    defines_bc: bool = True
    arch: Optional[str] = None
    tensor_maps: bool = False

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"rung {self.number}: direction must be one of {DIRECTIONS}; got {self.direction!r}")
        if self.runner is None and (self.source is None or self.direction != "forward"):
            raise ValueError(f"rung {self.number}: only a forward CUDA rung may leave `runner` to the generic launcher")

    @property
    def is_kernel(self) -> bool:
        """True for a CUDA kernel file compiled by flashkit.gpu.flash."""
        return self.source is not None

    @property
    def elements(self) -> Tuple[str, ...]:
        """The kernel element types ("f32", "f16", "bf16") of a CUDA rung's dtypes."""
        return tuple(ELEMENTS[d] for d in self.dtypes)

    def backend(self) -> Backend:
        """This rung's entry in the registry."""
        return Backend(
            name=self.name,
            device="gpu",
            summary=self.summary,
            runner=self.runner or f"flashkit.gpu.flash:{self.name}",
            dtypes=self.dtypes,
            head_dims=self.head_dims,
            mask=self.mask,
            mods=self.mods,
            priority=self.priority,
            probe=self.probe,
            rung=self.number,
        )


RUNGS = (
    Rung(
        1, "cupy-standard",
        "CuPy/cuBLAS, materialises S and P (Nq x Nk per head) on the GPU: the O(N^2) baseline",
        dtypes=("float16", "bfloat16", "float32", "float64"), peer="math", priority=60,
        runner="flashkit.gpu.standard:standard_attention", head_dims=None, mask=True,
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
    # Q_s [64][d+4] + KV_s [Bc][d+4] + P_s [64][Bc+8], fp32; the 16x8 thread grid fixes Br = 64, Bc = 8 x TN.
    # Bc = 32 at d = 128: 61 KB of shared memory, 3 blocks per SM instead of 2; measured 33.3 vs 30.4 TFLOP/s
    # (H100, N=4096, non-causal; benchmarks/results/gpu-h100-80gb-hbm3-history2.json).
    Rung(
        3, "cupy-fp32-tile",
        "CUDA fp32, register-blocked S tiles, warp-shuffle reductions (kernels/3_fp32_tile.cu)",
        dtypes=("float32",), peer="efficient", priority=80, source="3_fp32_tile.cu",
        default_blocks={32: (64, 64), 64: (64, 64), 128: (64, 32)},
        allowed_blocks=((64, 32), (64, 64)),
        threads=lambda Br, Bc: 128,
        smem=lambda d, Br, Bc: 4 * ((64 + Bc) * (d + 4) + 64 * (Bc + 8)),
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
    # rung 6: checked correct and 1.41-1.77x rung 6 in all eight cells on an H200 (rung7-h200.json). Defaults
    # 128 x 128; 192 x 128 measured 7-12% faster (fp16 non-causal only) and spills 100 bytes at d = 128.
    Rung(
        7, "cupy-wgmma",
        "Hopper: wgmma from shared memory, TMA + mbarrier pipeline, producer/consumer warpgroups (kernels/7_wgmma.cu)",
        dtypes=("float16", "bfloat16"), peer="cudnn", priority=120, source="7_wgmma.cu", probe=PROBE_HOPPER,
        head_dims=(64, 128),
        default_blocks={64: (128, 128), 128: (128, 128)},
        allowed_blocks=((64, 64), (64, 128), (128, 64), (128, 128), (192, 64), (192, 128)),
        threads=lambda Br, Bc: 128 * (Br // 64 + 1),
        smem=lambda d, Br, Bc: 2 * d * (Br + 4 * Bc) + 8 * 9 + 1024,
        arch="sm_90a", tensor_maps=True,
    ),
)


def rung(number: int) -> Rung:
    """The row of rung `number`."""
    for r in RUNGS:
        if r.number == number:
            return r
    raise ValueError(f"no GPU rung {number}; the ladder has {', '.join(str(r.number) for r in RUNGS)}")


def kernels(direction: str = "forward") -> Tuple[Rung, ...]:
    """The CUDA-kernel rows of one direction, in ladder order."""
    return tuple(r for r in RUNGS if r.is_kernel and r.direction == direction)
