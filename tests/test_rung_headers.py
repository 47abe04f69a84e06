"""Measured numbers quoted in rung headers agree with the results files they name.

A header line of the form

    Measured (<results file>; <field>=<value> ...): <TFLOP/s> TFLOP/s[, <ratio>x <peer>]

is a machine-readable link: the fields select exactly one row of the rung in
benchmarks/results/<results file>, and the quoted numbers must be that row's, rounded as quoted. Lines
without a results file (a run that wrote none, an older side-by-side comparison) are prose and are not
checked; a line that names a .json but does not parse fails, so a typo cannot hide a link.
"""
import json
import re
from pathlib import Path

import pytest

from flashkit.cpu import RUNGS as CPU_RUNGS
from flashkit.gpu.rungs import RUNGS as GPU_RUNGS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Every file that opens with a rung header, and the backend name its rows carry in the results files.
HEADERS = {ROOT / "flashkit" / "gpu" / "kernels" / r.source: r.name for r in GPU_RUNGS if r.source}
HEADERS[ROOT / "flashkit" / "gpu" / "standard.py"] = "cupy-standard"
HEADERS.update({ROOT / "flashkit" / "cpu" / f"{r.module}.py": r.name for r in CPU_RUNGS})

LINK = re.compile(r"Measured \((?P<file>[\w.-]+\.json); (?P<fields>[^)]*)\): (?P<tflops>\d+(?:\.\d+)?) TFLOP/s"
                  r"(?:, (?P<ratio>\d+(?:\.\d+)?)x (?P<peer>[\w-]+))?")


def _value(text):
    """A field's value as the results rows hold it: bool, int, float or str."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _decimals(number: str) -> int:
    return len(number.split(".")[1]) if "." in number else 0


def links():
    found = []
    for path, name in HEADERS.items():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "Measured (" in line and ".json" in line:
                found.append((path, n, name, line))
    return found


def test_header_files_exist_and_some_link_to_results():
    missing = [str(p) for p in HEADERS if not p.is_file()]
    assert not missing, missing
    assert links(), "no rung header links a measured number to a results file"


@pytest.mark.parametrize("path,line_no,name,line", links(), ids=[f"{p.name}:{n}" for p, n, _, _ in links()])
def test_quoted_numbers_match_the_results_file(path, line_no, name, line):
    where = f"{path.relative_to(ROOT)}:{line_no}"
    m = LINK.search(line)
    assert m, f"{where}: names a results file but is not 'Measured (<file>; k=v ...): X TFLOP/s[, Rx peer]'"
    results = RESULTS / m["file"]
    assert results.is_file(), f"{where}: no results file {results.relative_to(ROOT)}"
    fields = dict(kv.split("=", 1) for kv in m["fields"].split())
    want = {k: _value(v) for k, v in fields.items()}
    rows = [r for r in json.loads(results.read_text())["results"]
            if r.get("impl") == name and r.get("status", "ok") == "ok" and all(r.get(k) == v for k, v in want.items())]
    assert len(rows) == 1, f"{where}: {len(rows)} rows of {name} in {m['file']} match {fields} (want exactly one)"
    row = rows[0]
    quoted = float(m["tflops"])
    assert round(row["tflops"], _decimals(m["tflops"])) == quoted, \
        f"{where}: quotes {quoted} TFLOP/s, {m['file']} says {row['tflops']:.3f}"
    if m["ratio"]:
        assert row.get("peer") == m["peer"], f"{where}: quotes the ratio to {m['peer']}, the file's peer is {row.get('peer')}"
        assert round(row["ratio"], _decimals(m["ratio"])) == float(m["ratio"]), \
            f"{where}: quotes {m['ratio']}x {m['peer']}, {m['file']} says {row['ratio']:.4f}"
