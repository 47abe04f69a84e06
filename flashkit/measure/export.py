"""Sweep rows out of Python: JSON and CSV (written atomically, with where they were measured) and an
aligned text table.

Every file carries its provenance (flashkit.measure.provenance: machine, versions, git commit, time,
load, BLAS) and, for a sweep, its settings: a number without them cannot be compared with another.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from flashkit.atomic import write_text
from flashkit.measure import provenance

if TYPE_CHECKING:
    from flashkit.measure.sweep import Sweep


def metadata(spec: Optional[Sweep] = None) -> dict:
    """Where results came from (flashkit.measure.provenance): flashkit.info() (machine, versions), git
    commit, UTC time, load average, BLAS; and the sweep's settings."""
    from flashkit import info

    meta = {"created": provenance.now_utc(), "commit": provenance.commit_label(), "info": info(),
            "load_average": provenance.load_average(), "blas": provenance.blas_info()}
    if spec is not None:
        meta["sweep"] = {k: getattr(spec, k) for k in ("backends", "peers", "N", "d", "heads", "causal", "dtype",
                                                         "threads", "batch", "warmup", "repeats",
                                                         "seconds_per_point", "budget_s", "seed")}
    return meta


def write_atomic(path, text: str) -> Path:
    """Write text to path atomically (flashkit.atomic): a reader never sees half a file."""
    return write_text(path, text)


def to_json(rows: Sequence[dict], meta: Optional[dict] = None) -> str:
    """{"meta": ..., "results": [...]} as indented JSON."""
    return json.dumps({"meta": metadata() if meta is None else meta, "results": list(rows)}, indent=2,
                      default=_json_default) + "\n"


def to_csv(rows: Sequence[dict], meta: Optional[dict] = None) -> str:
    """One row per point (COLUMNS), plus the flashkit, NumPy and Numba versions and the git commit in
    every row, so the file stays one plain table that any CSV reader loads."""
    meta = metadata() if meta is None else meta
    versions = meta["info"]["versions"]
    extra = {"flashkit": meta["info"]["flashkit"], "numpy": versions.get("numpy", ""),
             "numba": versions.get("numba", ""), "commit": meta.get("commit") or "", "created": meta["created"]}
    from flashkit.measure.sweep import COLUMNS  # here, not at the top: sweep imports timing, which imports this

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS) + list(extra), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**{c: ("" if row.get(c) is None else row.get(c)) for c in COLUMNS}, **extra})
    return out.getvalue()


def write_json(rows: Sequence[dict], path, meta: Optional[dict] = None) -> Path:
    return write_atomic(path, to_json(rows, meta))


def write_csv(rows: Sequence[dict], path, meta: Optional[dict] = None) -> Path:
    return write_atomic(path, to_csv(rows, meta))


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def format_table(rows: Sequence[dict]) -> str:
    """Rows as an aligned text table: backend, B, H, N, d, causal, dtype, threads, ms (the fastest
    sample), p75 (its spread, "!" when noisy), GFLOP/s, and a note column (why a point was skipped, or
    that its spread is large) when any has one."""
    head = ["backend", "B", "H", "N", "d", "causal", "dtype", "threads", "ms (min)", "ms (p75)", "GFLOP/s"]
    def note(r):
        if r["skipped"]:
            return r["skipped"]
        return "noisy: p75 far above min" if r.get("noisy") else ""

    notes = any(note(r) for r in rows)
    if notes:
        head.append("note")
    body = []
    for r in rows:
        timed = r["ms"] is not None
        p75 = r.get("ms_p75")
        cells = [r["backend"], str(r["B"]), str(r["H"]), str(r["N"]), str(r["d"]), "yes" if r["causal"] else "no",
                 r["dtype"], "-" if r["threads"] is None else str(r["threads"]),
                 f"{r['ms']:.3f}" if timed else "-",
                 (f"{p75:.3f}" + ("!" if r.get("noisy") else "")) if timed and p75 is not None else "-",
                 f"{r['gflops']:.2f}" if timed else "-"]
        body.append(cells + ([note(r)] if notes else []))
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    numeric = {1, 2, 3, 4, 7, 8, 9, 10}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])
