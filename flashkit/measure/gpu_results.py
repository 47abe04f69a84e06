"""Read a committed GPU results file (benchmarks/results/gpu-*.json) as labelled rows, and the card's ceilings.

    from flashkit.measure import gpu_results
    res = gpu_results.load()                        # the H100 file committed with the repository
    res.card, res.date, res.commit                  # where the numbers came from
    gpu_results.select(res.rows, N=4096, d=64, causal=False, dtype="float16")

The file is written by benchmarks/gpu_forward.py (layout described in benchmarks/NOTES-gpu.md): top-level
`card`, `date`, `commit`, versions, `ceilings`, and lists `results` (one row per implementation and shape:
impl, rung (None for torch's SDPA peers), B, H, N, d, causal, dtype, flops, ms, tflops, peer, ratio),
`block_sweep` and `memory`. Every row returned here carries the card, date and commit it came from, so a
table or figure built from it can say so. Only the JSON is read: nothing here parses a script or notes.

Ceilings (for a roofline) come from the same file, measured on its card in its run (`ceilings`:
gemm_tflops per dtype, bandwidth_tbps, and `source`, which says how they were measured); a file that
records none gives none. Ceilings of the GPU in use are measured by flashkit.measure.ceilings.measure().

The traffic model for arithmetic intensity (FLOPs per byte of HBM traffic), stated so it can be argued:
  every implementation reads Q, K, V once and writes O once: 4·B·H·N·d·itemsize bytes (the least any
  implementation moves); one that materialises S (cupy-standard, torch-math) also writes S and reads it
  back as P at least once: + 2·B·H·Nq·Nk·itemsize_S bytes (float32 for cupy-standard, which computes
  16-bit input in float32; the input's dtype for torch-math). Both are lower bounds on the real traffic.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import flashkit

REPO = Path(flashkit.__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"  # the results files (JSON) committed with the repository
DEFAULT_PATH = RESULTS / "gpu-h100-80gb-hbm3.json"

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
MATERIALISED = {"cupy-standard": "float32", "torch-math": None}  # impl -> dtype of S (None: the input's)
LABELS = ("card", "date", "commit")


@dataclass(frozen=True)
class GpuResults:
    """One results file: where it came from, and its rows (each labelled with card, date, commit)."""

    path: Path
    card: str
    date: str
    commit: str
    versions: dict
    rows: List[dict] = field(default_factory=list)
    block_sweep: List[dict] = field(default_factory=list)
    memory: List[dict] = field(default_factory=list)
    ceilings: dict = field(default_factory=dict)  # as the file records them ({} if it does not)

    @property
    def label(self) -> str:
        """One line for a caption: card, date and commit."""
        return f"{self.card}, measured {self.date}, commit {self.commit}"


def load(path=None) -> GpuResults:
    """Load a results JSON (default: the H100 file committed in benchmarks/results/)."""
    path = Path(DEFAULT_PATH if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no GPU results file at {path} (the benchmarks/ folder ships with the "
                                f"repository, not with an installed package)")
    with open(path) as f:
        data = json.load(f)
    missing = [k for k in (*LABELS, "results") if k not in data]
    if missing:
        raise ValueError(f"path: {path} is not a gpu_forward.py results file (missing {', '.join(missing)})")
    labels = {k: str(data[k]) for k in LABELS}

    def labelled(rows):
        return [dict(r, **labels) for r in rows or []]

    versions = {k: data[k] for k in ("driver", "cuda_runtime", "nvrtc", "cupy", "torch", "python", "sm_count")
                if k in data}
    return GpuResults(path=path, versions=versions, rows=labelled(data["results"]),
                      block_sweep=labelled(data.get("block_sweep")), memory=labelled(data.get("memory")),
                      ceilings=dict(data.get("ceilings") or {}), **labels)


def committed_files() -> List[Path]:
    """Every GPU results file of benchmarks/results/ that is not a superseded run (`-history<N>`), newest
    name last: the forward ladder's (gpu-<card>.json), the backward's (gpu-bwd-*) and the launch
    overheads' (gpu-overhead-*). Use `load` on the forward ones; `card_and_ceilings` reads any of them."""
    return sorted(p for p in RESULTS.glob("gpu-*.json") if "-history" not in p.stem)


# What a GPU results file records, by how its name starts; anything else is the forward ladder (gpu-<card>.json)
KINDS = {"gpu-bwd": "backward", "gpu-overhead": "overhead", "gpu-mods": "mods", "gpu-ring": "ring",
         "gpu-session": "session", "gpu-input-check": "input-check"}


def kind_of(path) -> str:
    """The kind of a GPU results file: "forward" or one of KINDS' values."""
    return next((k for prefix, k in KINDS.items() if Path(path).stem.startswith(prefix)), "forward")


def card_and_ceilings(path) -> dict:
    """{"file", "card", "date", "kind" ("forward" or one of KINDS' values), "ceilings"} of one results file, the
    ceilings as `ceilings()` gives them ({} of each when the file records none)."""
    path = Path(path)
    with open(path) as f:
        data = json.load(f)
    kind = kind_of(path)
    recorded = data.get("ceilings") or {}
    return {"file": path.name, "card": str(data.get("card", "card not recorded")), "date": str(data.get("date", ""))[:10],
            "kind": kind, "gemm_tflops": {str(k): float(v) for k, v in (recorded.get("gemm_tflops") or {}).items()},
            "bandwidth_tbps": recorded.get("bandwidth_tbps"), "source": recorded.get("source")}


def select(rows, **where) -> List[dict]:
    """The rows whose fields equal every keyword (e.g. N=4096, d=64, causal=False, dtype="float16")."""
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def ok(rows) -> List[dict]:
    """Rows that ran (status "ok") and have a time."""
    return [r for r in rows if r.get("status", "ok") == "ok" and r.get("ms") is not None]


# ---------------------------------------------------------------------------------------------
# Ceilings, as the results file records them
# ---------------------------------------------------------------------------------------------
def ceilings(results: Optional[GpuResults] = None) -> dict:
    """{"gemm_tflops": {dtype: TFLOP/s}, "bandwidth_tbps": value or None, "sources": {...}} of a results
    file (default: load()), the form flashkit.viz.gpu.roofline_figure takes; each source names the file
    and how the numbers were measured."""
    res = load() if results is None else results
    recorded = res.ceilings
    gemm = {str(k): float(v) for k, v in (recorded.get("gemm_tflops") or {}).items()}
    bw = recorded.get("bandwidth_tbps")
    where = f"{res.path.name}: {recorded.get('source', 'source not recorded')}"
    return {"gemm_tflops": gemm, "bandwidth_tbps": None if bw is None else float(bw),
            "sources": {"gemm_tflops": where if gemm else None, "bandwidth_tbps": where if bw is not None else None}}


# ---------------------------------------------------------------------------------------------
# Arithmetic intensity
# ---------------------------------------------------------------------------------------------
def traffic_bytes(row: dict) -> float:
    """Lower bound on HBM bytes of one forward call (see the module docstring for the model)."""
    B, H, N, d = row["B"], row["H"], row["N"], row["d"]
    size = ITEMSIZE[row["dtype"]]
    qkvo = 4.0 * B * H * N * d * size  # Q, K, V read once, O written once
    impl = row["impl"].split("(")[0]
    if impl in MATERIALISED:
        s_size = ITEMSIZE[MATERIALISED[impl] or row["dtype"]]
        return qkvo + 2.0 * B * H * N * N * s_size  # S written, read back as P
    return qkvo


def intensity(row: dict) -> float:
    """FLOPs per byte of the traffic model: where the row sits on a roofline's x axis."""
    return row["flops"] / traffic_bytes(row)


# ---------------------------------------------------------------------------------------------
# Live: the same rows, measured on this machine's GPU
# ---------------------------------------------------------------------------------------------
def time_rungs(N: int = 4096, d: int = 64, causal: bool = False, *, tokens: int = 16384, width: int = 2048,
               dtypes=("float16", "float32"), repeats: int = 5, seed: int = 0) -> List[dict]:
    """Time every available GPU rung on this machine at the results file's shape family (B·N = tokens,
    H·d = width), one row per (rung, dtype) in the results file's layout, labelled with this card.

    What is timed is the rung itself on a problem validated once (Backend.run: output allocation and
    launch), as benchmarks/gpu_forward.py times it, not flashkit.attention's input checks (whose NaN/Inf
    test costs a device-to-host sync per call). Median of `repeats` calls bracketed by CUDA events
    (flashkit.measure.timing.time_call) after one warm-up call, which also compiles the kernel.
    Needs CuPy and a CUDA device."""
    for name, value in (("N", N), ("d", d), ("tokens", tokens), ("width", width), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if tokens % N or width % d:
        raise ValueError(f"tokens ({tokens}) must be a multiple of N ({N}) and width ({width}) of d ({d})")
    import cupy  # only now: the checks above work without a GPU
    import numpy as np

    from flashkit import registry, validate
    from flashkit.measure import timing

    B, H = tokens // N, width // d
    card = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    card = card.decode() if isinstance(card, bytes) else str(card)
    rungs = sorted((b for b in registry.all_backends() if b.device == "gpu" and b.available and b.rung is not None),
                   key=lambda b: b.rung)
    rows, rng = [], np.random.default_rng(seed)
    for dtype in dtypes:
        q, k, v = (cupy.asarray(rng.standard_normal((B, H, N, d), dtype=np.float32).astype(dtype))
                   for _ in range(3))  # (B, H, N, d)
        for b in rungs:
            if dtype not in b.dtypes or (b.head_dims is not None and d not in b.head_dims):
                continue
            problem = validate.check(q, k, v, causal=causal)
            t = timing.time_call(lambda: b.run(problem), warmup=1, repeats=repeats, cuda=True)
            flops = problem.flops()
            rows.append(dict(impl=b.name, rung=b.rung, B=B, H=H, N=N, d=d, causal=causal, dtype=dtype,
                             flops=flops, ms=t.median_ms, tflops=flops / t.median_ms / 1e9, reps=repeats, status="ok",
                             card=card, date="live", commit="working tree"))
        del q, k, v
    return rows


MODS_PATH = RESULTS / "gpu-mods-h200.json"  # benchmarks/gpu_mods_check.py: score_mod / mask_mod on rung 6


def load_mods(path=None) -> dict:
    """The results of benchmarks/gpu_mods_check.py (checks, mod costs, the document mask, FlexAttention),
    with `card`, `date` and `commit` at the top level for labels (the commit of the code that ran, where
    the file records it apart from the checkout's)."""
    data = json.loads(Path(path or MODS_PATH).read_text())
    prov = data.get("provenance", {})
    code = prov.get("code") or prov.get("commit") or {}
    data["card"] = prov.get("gpu", {}).get("card")
    data["date"] = prov.get("date")
    data["commit"] = str(code.get("commit", ""))[:7] if isinstance(code, dict) else str(code)[:7]
    return data
