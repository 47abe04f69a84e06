"""The arrows of ARCHITECTURE.md that a test can hold: the package never imports a benchmark script,
and the only thing it reads under benchmarks/ is the results folder (JSON written by the scripts)."""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flashkit"


def _code_strings_and_imports(path):
    """(imported module names, string constants outside docstrings) of one module."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    imports, strings = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            imports.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            strings.append(node.value)
    return imports, strings


def test_no_arrow_from_the_package_to_benchmarks():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        imports, strings = _code_strings_and_imports(path)
        rel = path.relative_to(PACKAGE.parent)
        offenders += [f"{rel}: imports {m}" for m in imports if m.split(".")[0] == "benchmarks"]
        # a path into benchmarks/ other than its results folder: a script or notes read as data
        offenders += [f"{rel}: {s!r}" for s in strings if re.search(r"benchmarks/(?!results)\w", s)]
    # the one place the package names the folder, as path parts: gpu_results.RESULTS
    holders = [p.relative_to(PACKAGE.parent).as_posix() for p in sorted(PACKAGE.rglob("*.py"))
               if "benchmarks" in _code_strings_and_imports(p)[1]]
    assert holders == ["flashkit/measure/gpu_results.py"], holders
    assert not offenders, offenders
    from flashkit.measure import gpu_results

    assert gpu_results.RESULTS.parts[-2:] == ("benchmarks", "results")
