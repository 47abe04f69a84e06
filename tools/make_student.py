"""Build the student edition of the exercise notebooks: solutions out, stubs in, outputs cleared.

The solution notebooks in notebooks/exercises/ mark each solution the nbgrader way:

    def softmax(x):
        \"\"\"...\"\"\"
        ### BEGIN SOLUTION
        m = x.max(axis=-1, keepdims=True)
        ...
        ### END SOLUTION

In a code cell the lines from `### BEGIN SOLUTION` to `### END SOLUTION` become a stub indented like
the markers (`# YOUR CODE HERE` and `raise NotImplementedError("...")` naming the function); in a
markdown cell they become "YOUR ANSWER HERE". Everything else is kept (the checker cells included),
`# NBVAL_...` marker lines are dropped (they only matter to our tests), and every output and execution
count is cleared. nbgrader does the same job but drags in a database and a server; this is the 100-line
part of it we need.

    python tools/make_student.py [--src notebooks/exercises] [--out build/student]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

from flashkit.atomic import write_text

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
_DEF = re.compile(r"^(\s*)(?:async\s+)?def\s+(\w+)\s*\(")
_LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
GLOSSARY = "glossary.md"  # copied into the edition: its links keep working there


def _enclosing_function(lines, index, indent):
    """Name of the nearest `def` above lines[index] that is indented less than the marker, or None."""
    for line in reversed(lines[:index]):
        match = _DEF.match(line)
        if match and len(match.group(1)) < len(indent):
            return match.group(2)
    return None


def stub_source(source: str, cell_type: str = "code", where: str = "cell") -> str:
    """`source` with every solution region replaced by a stub. Raises ValueError on unbalanced markers."""
    lines = source.split("\n")
    out, inside, indent, name = [], False, "", None
    for i, line in enumerate(lines):
        text = line.strip()
        if text == BEGIN:
            if inside:
                raise ValueError(f"{where}, line {i + 1}: {BEGIN} inside another solution region")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            name = _enclosing_function(lines, i, indent)
            if cell_type == "code":
                what = f"the body of `{name}`" if name else "this part"
                out += [f"{indent}# YOUR CODE HERE",
                        f'{indent}raise NotImplementedError("write {what}, then run the check below")']
            else:
                out.append(f"{indent}YOUR ANSWER HERE")
        elif text == END:
            if not inside:
                raise ValueError(f"{where}, line {i + 1}: {END} without a {BEGIN}")
            inside = False
        elif not inside and not (cell_type == "code" and text.startswith("# NBVAL_")):
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN} without an {END}")
    return "\n".join(out)


def student_notebook(nb, name: str = "notebook"):
    """A new notebook: solutions stubbed, outputs and execution counts cleared. `nb` is not modified."""
    nb = nbformat.from_dict(nb)  # a deep copy
    regions = 0
    for k, cell in enumerate(nb.cells):
        if cell.cell_type in ("code", "markdown"):
            regions += sum(line.strip() == BEGIN for line in cell.source.split("\n"))
            cell.source = stub_source(cell.source, cell.cell_type, where=f"{name}, cell {k}")
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
    nb.metadata["flashkit"] = {"edition": "student", "solution_regions_replaced": regions}
    return nb


def relink(source: str, src: Path) -> str:
    """Markdown `source` of a notebook in `src` with its relative links made to work in the edition, whose
    lab (`make lab-student`) serves only the edition's folder: a link into the glossary points at the
    copy beside the notebooks; a link to another file of the repository becomes its text and the file's
    path in the repository (opened by `make lab`). URLs and links inside the edition stay."""
    def fix(match):
        text, target = match.group(1), match.group(2)
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            return match.group(0)
        file, _, anchor = target.partition("#")
        resolved = (src / file).resolve()
        if resolved.parent == src.resolve():
            return match.group(0)  # another exercise: in the edition too
        if resolved.name == GLOSSARY:
            return f"[{text}]({GLOSSARY}{'#' + anchor if anchor else ''})"
        root = src.resolve().parents[1]
        where = resolved.relative_to(root) if resolved.is_relative_to(root) else resolved
        return f"{text} (`{where.as_posix()}`, in `make lab`)"
    return _LINK.sub(fix, source)


def _write_atomic(nb, path: Path):
    write_text(path, nbformat.writes(nb))


def build(src: Path, out: Path) -> list:
    """Write the student edition of every notebook in `src` to `out`; returns the written paths."""
    src, out = Path(src), Path(out)
    notebooks = sorted(p for p in src.glob("*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no .ipynb files in {src}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        student = student_notebook(nb, name=path.name)
        for cell in student.cells:
            if cell.cell_type == "markdown":
                cell.source = relink(cell.source, src)
        nbformat.validate(student)
        _write_atomic(student, out / path.name)
        written.append(out / path.name)
    glossary = src.resolve().parent / GLOSSARY
    if glossary.is_file():
        write_text(out / GLOSSARY, glossary.read_text())
    return written


def main(argv=None):
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=root / "notebooks" / "exercises",
                        help="folder of solution notebooks (default: notebooks/exercises)")
    parser.add_argument("--out", type=Path, default=root / "build" / "student",
                        help="folder for the student edition (default: build/student)")
    args = parser.parse_args(argv)
    for path in build(args.src, args.out):
        nb = nbformat.read(path, as_version=4)
        n = nb.metadata["flashkit"]["solution_regions_replaced"]
        print(f"{path}: {n} solution{'s' * (n != 1)} replaced by stubs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
