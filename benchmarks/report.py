"""Write the README's generated sections from the code and the committed results files.

    python -m benchmarks.report          # rewrite README.md between the <!-- NAME:begin/end --> markers
    python -m benchmarks.report --check  # exit 1 if README.md is out of date (a test runs this)

Numbers in the README are never typed: they come from benchmarks/results/*.json, which the benchmark
scripts write together with the machine, versions and commit they were measured on.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def backends_table() -> str:
    from flashkit import registry

    rows = ["| backend | device | rung | dtypes | head size d | custom mask | what it is |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in registry.all_backends():
        dims = "any" if b.head_dims is None else ", ".join(map(str, b.head_dims))
        rung = "" if b.rung is None else str(b.rung)
        rows.append(f"| `{b.name}` | {b.device} | {rung} | {', '.join(b.dtypes)} | {dims} | "
                    f"{'yes' if b.mask else 'no'} | {b.summary} |")
    return "\n".join(rows)


def _load(pattern: str):
    return [(p, json.loads(p.read_text())) for p in sorted(RESULTS.glob(pattern))]


def results_section() -> str:
    """Headline numbers from every results file found, each labelled with where it was measured."""
    parts = []
    for path, data in _load("cpu-*.json"):
        parts.append(_cpu_headline(path, data))
    for path, data in _load("gpu-*.json"):
        parts.append(_gpu_headline(path, data))
    for path, data in _load("decode-*.json"):
        parts.append(_decode_headline(path, data))
    if not parts:
        return "No results recorded yet: run `make bench` (CPU) or `python -m benchmarks.gpu_check` (GPU)."
    return "\n\n".join(p for p in parts if p)


def _label(path, data) -> str:
    m = data.get("machine", {})
    where = m.get("cpu") or m.get("card") or m.get("gpu") or data.get("card") or "unknown machine"
    when = data.get("date", "unknown date")
    commit = str(data.get("commit", "unknown"))[:10]
    return f"_{where}; {when}; commit {commit}; file `{path.relative_to(ROOT)}`_"


def _cpu_headline(path, data) -> str:
    return ""


def _gpu_headline(path, data) -> str:
    return ""


def _decode_headline(path, data) -> str:
    return ""


SECTIONS = {"backends": backends_table, "results": results_section}


def render(text: str) -> str:
    for name, fn in SECTIONS.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README.md lacks the markers <!-- {name}:begin --> ... <!-- {name}:end -->")
        text = pattern.sub(lambda m: m.group(1) + fn() + "\n" + m.group(2), text)
    return text


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = ap.parse_args(argv)
    readme = ROOT / "README.md"
    old = readme.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md is out of date: run `python -m benchmarks.report`", file=sys.stderr)
            return 1
        return 0
    if new != old:
        write_atomic(readme, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
