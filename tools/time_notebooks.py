"""Run every notebook top to bottom in a fresh kernel (nbclient) and record how long each takes.

The workshop agenda (WORKSHOP.md) is planned from these measured times, not from guesses. Results go to
benchmarks/results/notebook-times-<machine>.json (written atomically); with --workshop FILE the table
between the markers `<!-- notebook-times:begin -->` and `<!-- notebook-times:end -->` in FILE is
regenerated from the same numbers, and in the agenda table between `<!-- agenda:begin -->` and
`<!-- agenda:end -->` the last column of each row becomes the measured run time of the notebooks named
in backticks in that row (e.g. `03_tiling`, `exercises/03_fa2_tile`). Notebooks are executed on copies
in memory: the committed files are never modified. A notebook that fails or times out is recorded as
such and the run goes on.

    python tools/time_notebooks.py                      # every notebook under notebooks/
    python tools/time_notebooks.py --workshop WORKSHOP.md
    python tools/time_notebooks.py --workshop WORKSHOP.md --from-results benchmarks/results/notebook-times-X.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from tqdm import tqdm

from flashkit.atomic import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- notebook-times:begin -->", "<!-- notebook-times:end -->"
AGENDA_BEGIN, AGENDA_END = "<!-- agenda:begin -->", "<!-- agenda:end -->"
SERIES = [f"{n:02d}" for n in range(15)]  # the numbered walkthroughs 00..14 we expect in notebooks/


def machine() -> tuple:
    """(info dict, file-name slug), as the benchmark scripts record them (flashkit.measure.provenance)."""
    from flashkit.measure.provenance import cpu_info, machine_slug

    info = cpu_info()
    return info, machine_slug(info)


def find_notebooks(folder: Path) -> list:
    return sorted(p for p in Path(folder).rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _parse(stamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _cell_times(nb):
    """[(start, end)] of every executed cell, from the timestamps nbclient records in cell metadata."""
    out = []
    for cell in nb.cells:
        ex = cell.get("metadata", {}).get("execution", {})
        if ex.get("iopub.execute_input") and ex.get("shell.execute_reply"):
            out.append((_parse(ex["iopub.execute_input"]), _parse(ex["shell.execute_reply"])))
    return out


def time_notebook(path: Path, timeout: int) -> dict:
    """Execute one notebook (a copy) in a fresh python3 kernel and time it.

    `seconds` is what a learner waits for Kernel > Restart and Run All: kernel start (until the first
    cell begins) plus the cells' own run times. `wall_seconds` is nbclient's whole run, which also counts
    waits between cells: on this machine nbclient sometimes sat a full `timeout` after a cell that
    displays ipywidgets before starting the next cell (not seen in JupyterLab); `gaps_seconds` shows them.
    """
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    status, detail = "ok", ""
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellTimeoutError as e:
        status, detail = "timeout", str(e).splitlines()[0] if str(e) else "a cell timed out"
    except DeadKernelError as e:
        status, detail = "kernel died", str(e)
    wall = time.perf_counter() - t0
    errors = [f"cell {k}: {o.ename}: {o.evalue}"[:300] for k, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    if errors and status == "ok":
        status = "errors"
    times = _cell_times(nb)
    cells = sum((end - start).total_seconds() for start, end in times)
    kernel_start = (min(s for s, _ in times) - started).total_seconds() if times else wall
    span = (max(e for _, e in times) - min(s for s, _ in times)).total_seconds() if times else 0.0
    return {"seconds": round(kernel_start + cells, 2), "kernel_start_seconds": round(kernel_start, 2),
            "cells_seconds": round(cells, 2), "gaps_seconds": round(max(0.0, span - cells), 2),
            "wall_seconds": round(wall, 2), "code_cells": sum(c.cell_type == "code" for c in nb.cells),
            "status": status, "detail": detail, "errors": errors}


def write_json_atomic(path: Path, data) -> None:
    write_json(path, data)


def missing_series(folder: Path, found: list) -> list:
    """Numbers of the 00..14 series with no notebook named NN_*.ipynb directly in `folder`."""
    have = {p.name[:2] for p in found if p.parent == Path(folder)}
    return [n for n in SERIES if n not in have]


def markdown_table(results: dict, results_file: str) -> str:
    """The table WORKSHOP.md shows, generated from a results dict."""
    rows = ["| notebook | Run All (s) | kernel start (s) | cells (s) | status |", "|---|---:|---:|---:|---|"]
    for nb in results["notebooks"]:
        rows.append(f"| `{nb['path']}` | {nb['seconds']:.1f} | {nb['kernel_start_seconds']:.1f} | "
                    f"{nb['cells_seconds']:.1f} | {nb['status']} |")
    total = sum(nb["seconds"] for nb in results["notebooks"])
    rows.append(f"| **all {len(results['notebooks'])} notebooks** | **{total:.0f}** | | | |")
    missing = ", ".join(results["missing_series"]) or "none"
    head = (f"Measured {results['date']} on {results['machine'].get('cpu', '?')} "
            f"({results['machine'].get('cores', '?')} cores, shared with other work), a fresh kernel per notebook; "
            "Run All = kernel start + the cells' own run times. "
            f"From `{results_file}` (regenerate: `python tools/time_notebooks.py --workshop WORKSHOP.md`). "
            f"Series notebooks ({SERIES[0]}-{SERIES[-1]}) missing at that time: {missing}.")
    return head + "\n\n" + "\n".join(rows)


def _replace_block(text: str, begin: str, end: str, fill) -> str:
    """text with the part between the markers replaced by fill(old part)."""
    if begin not in text or end not in text:
        raise ValueError(f"no {begin} ... {end} block to fill")
    before, rest = text.split(begin, 1)
    inside, after = rest.split(end, 1)
    return f"{before}{begin}\n{fill(inside).strip()}\n{end}{after}"


def fill_agenda(agenda: str, results: dict) -> str:
    """The agenda table with its last column set to the summed run time of the notebooks each row names."""
    seconds = {re.sub(r"^notebooks/|\.ipynb$", "", nb["path"]): nb["seconds"] for nb in results["notebooks"]}
    lines, used, column = [], [], 3
    for line in agenda.strip().splitlines():
        cells = line.split("|")
        if not line.startswith("|") or len(cells) < 4 or set(line) <= set("|-: "):
            lines.append(line)
            continue
        if cells[1].strip() == "time":  # the header: find the column that names the notebooks
            column = next((k for k, c in enumerate(cells) if c.strip() == "notebooks"), column)
            lines.append(line)
            continue
        names = re.findall(r"`([\w/.-]+)`", cells[column])
        found = [n for n in names if n in seconds]
        gone = [n for n in names if n not in seconds]
        used += found
        text = f"{sum(seconds[n] for n in found):.0f} s" if found else ""
        if gone:
            text += (", " if text else "") + "not measured: " + ", ".join(gone)
        cells[-2] = f" {text} "
        lines.append("|".join(cells))
    total = sum(seconds[n] for n in set(used))
    lines.append("")
    lines.append(f"Run time of every notebook in the agenda, measured {results['date']}: {total:.0f} s in all, "
                 f"{total / 60:.1f} of the {_planned_minutes(agenda)} minutes (kernel start included).")
    return "\n".join(lines)


def _planned_minutes(agenda: str) -> int:
    """The agenda's length: the latest end time of its "H:MM-H:MM" rows (180, a 3-hour day, without any)."""
    ends = [int(h) * 60 + int(m) for h, m in re.findall(r"\d+:\d\d-(\d+):(\d\d)", agenda)]
    return max(ends, default=180)


def update_workshop(path: Path, table: str, results: dict) -> None:
    text = _replace_block(path.read_text(encoding="utf-8"), BEGIN, END, lambda old: table)
    if AGENDA_BEGIN in text:
        text = _replace_block(text, AGENDA_BEGIN, AGENDA_END,
                              lambda old: fill_agenda(old.split("\n\nRun time of every notebook")[0], results))
    write_text(path, text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--notebooks", type=Path, default=ROOT / "notebooks", help="folder searched recursively")
    ap.add_argument("--out", type=Path, help="results file (default benchmarks/results/notebook-times-<machine>.json)")
    ap.add_argument("--timeout", type=int, default=120,
                    help="seconds a cell may run (default 120; every notebook should run in well under 60 s)")
    ap.add_argument("--workshop", type=Path, help="regenerate the times table in this markdown file")
    ap.add_argument("--from-results", type=Path, metavar="JSON",
                    help="run nothing: regenerate --workshop's tables from this earlier results file")
    args = ap.parse_args(argv)
    if args.from_results:
        if not args.workshop:
            ap.error("--from-results needs --workshop")
        results = json.loads(args.from_results.read_text())
        try:
            shown = str(args.from_results.resolve().relative_to(ROOT))
        except ValueError:
            shown = str(args.from_results)
        update_workshop(args.workshop, markdown_table(results, shown), results)
        print(f"updated the times table in {args.workshop} from {shown}")
        return 0
    found = find_notebooks(args.notebooks)
    if not found:
        raise SystemExit(f"no notebooks under {args.notebooks}")
    info, slug = machine()
    out = args.out or ROOT / "benchmarks" / "results" / f"notebook-times-{slug}.json"
    rows = []
    for path in tqdm(found, desc="notebooks", unit="nb", file=sys.stderr):
        row = {"path": str(path.relative_to(args.notebooks.parent) if args.notebooks.parent in path.parents else path)}
        row.update(time_notebook(path, args.timeout))
        rows.append(row)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info, "python": platform.python_version(),
        "notebooks": rows, "missing_series": missing_series(args.notebooks, found),
        "total_seconds": round(sum(r["seconds"] for r in rows), 1),
        "columns": {"seconds": "kernel start + the cells' own run times (what Run All costs a learner)",
                    "wall_seconds": "nbclient's whole run, including waits between cells (gaps_seconds)"},
    }
    write_json_atomic(out, results)
    try:
        shown = str(out.relative_to(ROOT))
    except ValueError:
        shown = str(out)
    table = markdown_table(results, shown)
    print(table)
    print(f"\nwrote {out}")
    if args.workshop:
        update_workshop(args.workshop, table, results)
        print(f"updated the times table in {args.workshop}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
