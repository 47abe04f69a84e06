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
            imports += [f"{node.module}.{a.name}" for a in node.names]  # from flashkit import measure
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


# Below measure and viz in ARCHITECTURE.md's layers: the call path and every kernel. cpu/simd_lab.py is
# the teaching lab of notebook 06 (it times with flashkit.measure), not a kernel: none of these imports it.
IMPLEMENTATIONS = ["api.py", "validate.py", "problem.py", "registry.py", "reference.py", "tiled.py", "decode.py",
                   "online_softmax.py", "masks.py", "kvcache.py", "layers.py", "rope.py", "atomic.py", "cpu", "gpu"]


def test_implementations_never_import_measure_viz_or_the_lab():
    files = []
    for name in IMPLEMENTATIONS:
        path = PACKAGE / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    files = [f for f in files if f.name != "simd_lab.py"]
    assert len(files) > 20
    offenders = []
    for path in files:
        imports, _ = _code_strings_and_imports(path)
        offenders += [f"{path.relative_to(PACKAGE.parent)}: imports {m}" for m in imports
                      if m.startswith(("flashkit.measure", "flashkit.viz", "flashkit.cpu.simd_lab"))]
    assert not offenders, offenders
