"""Figures and source excerpts of notebook 7 (GPU kernels with CuPy).

    rung_source(r)        the rung's header and its key lines, read from the kernel file (never typed)
    ladder_figure(rows)   TFLOP/s of each rung beside torch's SDPA backends, one shape
    roofline_figure(...)  arithmetic intensity against TFLOP/s, with the card's ceilings from the files
    sdpa_figure(rows)     the best rung against each SDPA backend over N

Rows are those of flashkit.measure.gpu_results (committed results) or of live timings in the same
layout (impl, rung, N, d, causal, dtype, ms, tflops, flops). Nothing here imports CuPy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import plotly.graph_objects as go

import flashkit
from flashkit.measure import gpu_results

PACKAGE = Path(flashkit.__file__).resolve().parent
REPO = PACKAGE.parent
SDPA = ("torch-flash", "torch-efficient", "torch-cudnn", "torch-math")

# What makes a line "key": an algorithm comment in the paper's names (the line after it implements it), or
# an instruction that names the rung's idea. The lines themselves are read from the files.
_ALGORITHM = re.compile(r"^\s*(//|#)\s*(S_ij|P_ij|O_i|m_new|S = |P = |O = |Load |K_\{j\+1\}|V_j starts|Heavy)")
# The instructions that carry a rung's idea, written inline or through the shared helpers of kernels/*.cuh
# (mma16816 = mma.sync m16n8k16; ldmatrix_x4*, A_/B_rows and _cols = ldmatrix; async_tile, cp_async* = cp.async).
_INSTRUCTION = re.compile(r"mma\.sync|ldmatrix\.sync|cp\.async\.cg|__shfl_xor_sync|ex2\.approx|reinterpret_cast<const float4"
                          r"|mma16816\(|ldmatrix_x4\w*\(|\b[AB]_(rows|cols)\(|async_tile\(|cp_async\w*\(|wgmma\w*\(")


@dataclass(frozen=True)
class RungSource:
    rung: int
    name: str  # the backend's name, e.g. "cupy-mma"
    path: Path
    header: str  # the opening comment (or module docstring for rung 1)
    key_lines: List[Tuple[int, str]]  # (line number, text)
    n_lines: int

    def text(self, max_key_lines: int = 14) -> str:
        """Header, then the key lines with their numbers: for print()."""
        rel = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        shown = self.key_lines[:max_key_lines]
        more = len(self.key_lines) - len(shown)
        body = "\n".join(f"{n:4d}| {t}" for n, t in shown)
        tail = f"\n    ... {more} more key lines in the file" if more > 0 else ""
        return f"== rung {self.rung}: {self.name}  ({rel}, {self.n_lines} lines)\n{self.header}\n-- key lines --\n{body}{tail}"


def rung_files() -> dict:
    """{rung: (backend name, source path)} for the GPU ladder, from the registry and flashkit.gpu.flash.RUNGS."""
    from flashkit import registry
    from flashkit.gpu.flash import KERNEL_DIR, RUNGS  # plain Python: CuPy is imported only at launch

    # The forward ladder only: the backward rungs (cupy-bwd-*) are numbered 1-3 in their own ladder.
    names = {b.rung: b.name for b in registry.all_backends()
             if b.device == "gpu" and b.rung is not None and b.computes("forward")}
    files = {1: PACKAGE / "gpu" / "standard.py"}
    files.update({r: KERNEL_DIR / spec.source for r, spec in RUNGS.items()})
    return {r: (names.get(r, f"rung {r}"), files[r]) for r in sorted(files) if r in names}


def _header(lines: List[str], path: Path) -> Tuple[str, int]:
    """The opening comment block (CUDA) or module docstring (Python), and the index of the first body line."""
    if path.suffix == ".py":
        text = "\n".join(lines)
        m = re.match(r'\s*"""(.*?)"""', text, re.S)
        if not m:
            return "", 0
        return m.group(1).strip(), text[:m.end()].count("\n") + 1
    out = []
    for i, line in enumerate(lines):
        if not line.startswith("//"):
            return "\n".join(out), i
        out.append(line)
    return "\n".join(out), len(lines)


def rung_source(rung: int) -> RungSource:
    """Read rung `rung`'s file: its header and its key lines (algorithm comments + the line after, and
    the instructions that carry the rung's idea), in file order."""
    files = rung_files()
    if rung not in files:
        raise ValueError(f"rung must be one of {sorted(files)}; got {rung!r}")
    name, path = files[rung]
    lines = path.read_text().splitlines()
    header, start = _header(lines, path)
    keep = set()
    for i in range(start, len(lines)):
        if _ALGORITHM.search(lines[i]):
            keep.add(i)
            if i + 1 < len(lines) and lines[i + 1].strip() and not lines[i + 1].lstrip().startswith(("//", "#")):
                keep.add(i + 1)
        elif _INSTRUCTION.search(lines[i]):
            keep.add(i)
    key = [(i + 1, lines[i].rstrip()) for i in sorted(keep)]
    return RungSource(rung, name, path, header, key, len(lines))


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def _colour(i: int) -> str:
    return f"hsl({(i * 137 + 210) % 360}, 70%, 55%)"  # mid lightness: readable on light and dark themes


def _impl_label(r: dict) -> str:
    return f"{r['rung']} {r['impl']}" if r.get("rung") is not None else r["impl"]


def ladder_figure(rows: Sequence[dict], title: str) -> go.Figure:
    """Horizontal bars of TFLOP/s, rungs in ladder order then the SDPA peers, one bar per (impl, dtype)."""
    rows = sorted(gpu_results.ok(rows), key=lambda r: (r.get("rung") is None, r.get("rung") or 0, r["impl"], r["dtype"]))
    fig = go.Figure()
    dtypes = sorted({r["dtype"] for r in rows})
    for i, dt in enumerate(dtypes):
        sub = [r for r in rows if r["dtype"] == dt]
        fig.add_bar(y=[_impl_label(r) for r in sub], x=[r["tflops"] for r in sub], orientation="h", name=dt,
                    marker_color=_colour(i), text=[f"{r['tflops']:.1f}" for r in sub], textposition="outside")
    fig.update_xaxes(title_text="throughput (TFLOP/s, 4·B·H·N²·d FLOPs / time)")
    order = list(dict.fromkeys(_impl_label(r) for r in rows))  # ladder order, whatever trace comes first
    fig.update_yaxes(title_text="implementation (rung number, then torch SDPA backends)", autorange="reversed",
                     categoryorder="array", categoryarray=order)
    # A title of three lines (title and a two-line subtitle) needs a taller top margin, or the subtitle is cut off.
    fig.update_layout(title=dict(text=title, y=0.98, yanchor="top"), margin=dict(t=130), barmode="group",
                      height=260 + 28 * len(rows), legend_title_text="dtype")
    return fig


def roofline_figure(rows: Sequence[dict], ceilings: dict, title: str) -> go.Figure:
    """Log-log roofline: each row at (FLOPs/byte, TFLOP/s); horizontal GEMM ceilings and the bandwidth slope
    where the files record them (ceilings as from gpu_results.ceilings())."""
    rows = gpu_results.ok(rows)
    fig = go.Figure()
    impls = sorted({r["impl"] for r in rows}, key=lambda n: (n in SDPA, n))
    x_all = [gpu_results.intensity(r) for r in rows]
    symbols = {"float16": "circle", "bfloat16": "diamond", "float32": "square"}
    for i, impl in enumerate(impls):
        sub = [r for r in rows if r["impl"] == impl]
        fig.add_scatter(x=[gpu_results.intensity(r) for r in sub], y=[r["tflops"] for r in sub], mode="markers",
                        name=impl, marker=dict(color=_colour(i), size=9, symbol=[symbols.get(r["dtype"], "x") for r in sub]),
                        text=[f"{r['dtype']} d={r['d']} N={r['N']} causal={r['causal']}" for r in sub],
                        hovertemplate="%{text}<br>%{x:.0f} FLOP/B, %{y:.1f} TFLOP/s<extra>" + impl + "</extra>")
    bw = ceilings.get("bandwidth_tbps")
    ridges = [peak / bw for peak in ceilings.get("gemm_tflops", {}).values()] if bw else []  # FLOP/B where roofs bend
    lo, hi = (min(x_all) / 2, max(x_all) * 2) if x_all else (1.0, 1e4)
    lo = min([lo] + [r / 4 for r in ridges])
    xs = np.geomspace(lo, hi, 96)
    src = ceilings.get("sources", {})
    by_peak = {}  # dtypes that share a ceiling (float16 and bfloat16) share one line
    for dt, peak in sorted(ceilings.get("gemm_tflops", {}).items()):
        by_peak.setdefault(peak, []).append(dt)
    for peak, dts in sorted(by_peak.items(), reverse=True):
        y = np.full_like(xs, peak) if bw is None else np.minimum(peak, bw * xs)  # TB/s x FLOP/B = TFLOP/s
        fig.add_scatter(x=xs, y=y, mode="lines", line=dict(dash="dash", width=1.5),
                        name=f"roof {'/'.join(dts)}: GEMM {peak:g} TFLOP/s ({src.get('gemm_tflops')})"
                             + (f", copy {bw:g} TB/s ({src.get('bandwidth_tbps')})" if bw is not None else ""))
    if bw is not None and not ceilings.get("gemm_tflops"):
        fig.add_scatter(x=xs, y=bw * xs, mode="lines", line=dict(dash="dot", width=1),
                        name=f"copy bandwidth {bw:g} TB/s ({src.get('bandwidth_tbps')})")
    top = max([r["tflops"] for r in rows] + list(ceilings.get("gemm_tflops", {}).values()) + [1.0])
    fig.update_xaxes(type="log", title_text="arithmetic intensity (FLOP per byte of HBM traffic, log scale)")
    fig.update_yaxes(type="log", title_text="throughput (TFLOP/s, log scale)", range=[0, np.log10(top * 2)])
    fig.update_layout(title=dict(text=title, y=0.98, yanchor="top"), margin=dict(t=120),
                      legend=dict(orientation="h", y=-0.3), height=660)
    return fig


# One marker per dtype, so a backend drawn in two dtypes (one colour) stays two legible series.
_SYMBOL = {"float16": "circle", "bfloat16": "diamond", "float32": "square"}


def sdpa_figure(rows: Sequence[dict], best_rung: dict, title: str) -> go.Figure:
    """TFLOP/s against N: each SDPA backend and the best flashkit rung for the dtype (best_rung: dtype -> impl)."""
    rows = gpu_results.ok(rows)
    fig = go.Figure()
    names = [*SDPA, *sorted(set(best_rung.values()))]
    for i, impl in enumerate(names):
        for dt in sorted({r["dtype"] for r in rows}):
            if impl not in SDPA and best_rung.get(dt) != impl:
                continue
            sub = sorted((r for r in rows if r["impl"] == impl and r["dtype"] == dt), key=lambda r: r["N"])
            if not sub:
                continue
            fig.add_scatter(x=[r["N"] for r in sub], y=[r["tflops"] for r in sub], mode="lines+markers",
                            name=f"{impl} {dt}", marker_color=_colour(i), marker_symbol=_SYMBOL.get(dt, "circle"),
                            line=dict(dash="solid" if impl in SDPA else "dash"))
    fig.update_xaxes(type="log", title_text="sequence length N (tokens, log scale)")
    fig.update_yaxes(title_text="throughput (TFLOP/s)")
    fig.update_layout(title=dict(text=title, y=0.98, yanchor="top"), margin=dict(t=110),
                      legend=dict(orientation="h", y=-0.25))
    return fig


def table(rows: Sequence[dict], columns: Sequence[str], formats: Optional[dict] = None) -> str:
    """A plain-text table of `columns` for print(): deterministic, no dependency."""
    formats = formats or {}

    def cell(r, c):
        v = r.get(c)
        if v is None:
            return "-"
        if c in formats:
            return format(v, formats[c])
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    cells = [list(columns)] + [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
