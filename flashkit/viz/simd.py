"""Figures and asm readers of notebook 6 (SIMD on the CPU with Numba).

    asm_counts(text)       lines of vector code by kind: ymm (256-bit), zmm (512-bit), packed FMA, NEON
    asm_excerpt(text)      the packed arithmetic lines themselves, to print
    micro_figure(rows)     scalar against vector GFLOP/s of each micro-kernel (rows of simd.compare())
    speed_figure(...)      a bar per configuration (threads, block sizes, backends) with its unit

Counting is done on the asm text Numba returns (flashkit.cpu.simd_lab.asm), so whatever the CPU (AVX2,
AVX-512, or ARM NEON with v0.4s registers) the notebook prints what was found, not what we expect.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import plotly.graph_objects as go

from flashkit.viz import spread

# x86: "vfmadd231ps %ymm1, %ymm2, %ymm0" (AT&T) or "vfmadd231ps ymm0, ymm1, ymm2" (Intel)
_X86 = re.compile(r"^\s*(v[a-z0-9]+)\s+(.*)$")
# ARM NEON / SVE: "fmla v0.4s, v1.4s, v2.4s", "fmul z0.s, ..."
_ARM = re.compile(r"^\s*([a-z][a-z0-9]*)\s+.*\b[vz]\d+\.(?:\d+)?[bhsd]\b")
_SCALAR_FP = re.compile(r"^\s*v?(add|sub|mul|div|fmadd\d*|fnmadd\d*|max|min)s[sd]\b")
_PACKED_ARITH = re.compile(r"^(v?(fn?madd|fn?msub)\w*|v(add|sub|mul|div|max|min)p[sd]|fmla|fmls|fmul|fadd)$")


def _code_lines(asm_text: str) -> List[str]:
    """Instruction lines only: comments, labels and assembler directives dropped."""
    out = []
    for line in asm_text.splitlines():
        line = line.split("#")[0].split("//")[0].strip()
        if not line or line.endswith(":") or line.startswith("."):
            continue
        out.append(line)
    return out


def asm_counts(asm_text: str) -> Dict[str, int]:
    """Instruction lines by what they use: {'lines', 'ymm', 'zmm', 'vector_fma', 'packed_arith', 'scalar_fp',
    'neon', 'calls'}. 'ymm'/'zmm' count lines naming a 256/512-bit register; 'vector_fma' packed fused multiply-adds
    on ymm/zmm (x86) or fmla on NEON vectors; 'scalar_fp' one-element float ops (addss, vfmadd231ss...); 'calls' call instructions
    (e.g. one libm expf per element)."""
    c = dict(lines=0, ymm=0, zmm=0, vector_fma=0, packed_arith=0, scalar_fp=0, neon=0, calls=0)
    for line in _code_lines(asm_text):
        c["lines"] += 1
        mnemonic = line.split()[0]
        wide = set(re.findall(r"%?([yz])mm\d+", line))
        c["ymm"] += "y" in wide
        c["zmm"] += "z" in wide
        arm = _ARM.match(line)
        c["neon"] += bool(arm)
        c["calls"] += mnemonic in ("call", "callq", "bl", "blr")
        vector = bool(wide) or bool(arm)
        if vector and _PACKED_ARITH.match(mnemonic):
            c["packed_arith"] += 1
            c["vector_fma"] += bool(re.match(r"v?fn?m(add|sub)|fmla|fmls", mnemonic))
        if _SCALAR_FP.match(line):
            c["scalar_fp"] += 1
    return c


def asm_excerpt(asm_text: str, limit: int = 8) -> List[str]:
    """Up to `limit` packed arithmetic lines (vector FMAs first), as they appear in the asm."""
    lines = []
    for line in _code_lines(asm_text):
        wide = re.search(r"%?[yz]mm\d+", line) or _ARM.match(line)
        if wide and _PACKED_ARITH.match(line.split()[0]):
            lines.append(" ".join(line.split()))
    fma = [ln for ln in lines if re.match(r"v?fn?m(add|sub)|fmla", ln)]
    rest = [ln for ln in lines if ln not in fma]
    return (fma + rest)[:limit]


def scalar_excerpt(asm_text: str, limit: int = 4) -> List[str]:
    """Up to `limit` one-element float instructions (the scalar twin's inner loop)."""
    return [" ".join(ln.split()) for ln in _code_lines(asm_text) if _SCALAR_FP.match(ln)][:limit]


def _colour(i: int) -> str:
    return f"hsl({(i * 137 + 210) % 360}, 70%, 55%)"  # mid lightness: readable on light and dark themes


def micro_figure(rows: Sequence[dict], title: str) -> go.Figure:
    """Grouped bars: GFLOP/s of the scalar twin and the vector kernel, one group per micro-kernel."""
    fig = go.Figure()
    kernels = [r["kernel"] for r in rows]
    for i, (label, key) in enumerate((("scalar twin", "scalar_gflops"), ("vectorised", "vector_gflops"))):
        fig.add_bar(x=kernels, y=[r[key] for r in rows], name=label, marker_color=_colour(i),
                    text=[f"{r[key]:.2f}" for r in rows], textposition="outside")
    fig.update_xaxes(title_text="micro-kernel (n float32 elements per call)")
    fig.update_yaxes(title_text="throughput (GFLOP/s, median of timed calls)")
    fig.update_layout(title=title, barmode="group")
    return fig


def speed_figure(labels: Sequence[str], values: Sequence[float], title: str, x_title: str,
                 y_title: str = "throughput (GFLOP/s, 4·B·H·N²·d / fastest time)", low: Optional[Sequence[float]] = None,
                 noisy: Optional[Sequence[bool]] = None) -> go.Figure:
    """One bar per configuration, value printed on the bar. `low` (the rate at the 75th percentile of the
    samples, flashkit.measure.timing.time_robust) draws an error bar down to it; `noisy` rings the bars
    whose spread is large and says so in the title (flashkit.viz.spread)."""
    values = list(values)
    fig = go.Figure(go.Bar(x=list(labels), y=values, marker_color=[_colour(i) for i in range(len(labels))],
                           text=[f"{v:.1f}" for v in values], textposition="outside",
                           error_y=spread.bar_down(values, list(low)) if low is not None else None))
    n_noisy = 0
    if noisy is not None:
        flagged = [i for i, flag in enumerate(noisy) if flag]
        n_noisy = spread.ring_noisy(fig, [list(labels)[i] for i in flagged], [values[i] for i in flagged])
    fig.update_xaxes(title_text=x_title, type="category")
    fig.update_yaxes(title_text=y_title)
    fig.update_layout(title=spread.title(title, n_noisy), showlegend=n_noisy > 0)
    return fig


def table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """A plain-text table for print(): numbers right-aligned, deterministic."""
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else f"{c:,.2f}" if isinstance(c, float) else str(c)
                                           for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
