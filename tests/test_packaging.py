"""pyproject.toml and environment.yml install the same set; import stays light."""
import re
import subprocess
import sys
from pathlib import Path

import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# PyPI name -> conda-forge name, where they differ.
CONDA_NAME = {}
# Extras kept out of environment.yml on purpose: torch downloads a multi-GB CUDA build, cupy needs a GPU.
NOT_IN_CONDA_ENV = {"bench", "gpu"}


def _split(req: str):
    req = req.split(";")[0].strip()
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")
    return name, req[len(name):].strip()


def pyproject_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        if extra not in NOT_IN_CONDA_ENV:
            reqs += items
    return dict(_split(r) for r in reqs)


def conda_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    found = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):  # a pip: section
            for r in dep.get("pip", []):
                name, spec = _split(r)
                found[name] = spec
            continue
        name, spec = _split(dep)
        found[name] = spec
    return found


def test_environment_yml_matches_pyproject():
    py, conda = pyproject_requirements(), conda_requirements()
    conda.pop("python"), conda.pop("pip", None)
    expected = {CONDA_NAME.get(n, n): spec for n, spec in py.items()}
    missing = sorted(set(expected) - set(conda))
    extra = sorted(set(conda) - set(expected))
    assert not missing, f"in pyproject.toml but not environment.yml: {missing}"
    assert not extra, f"in environment.yml but not pyproject.toml: {extra}"
    differ = {n: (expected[n], conda[n]) for n in expected if expected[n] != conda[n]}
    assert not differ, f"version constraints differ (pyproject, environment.yml): {differ}"


def test_python_requirement_agrees():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert project["requires-python"] == ">=3.10"
    assert "python>=3.10" in env["dependencies"]


def test_torch_stays_out_of_lab_and_test_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra in ("notebooks", "test"):
        assert not any(_split(r)[0] == "torch" for r in project["optional-dependencies"][extra])
    assert not any(_split(r)[0] == "torch" for r in project["dependencies"])


def test_import_is_light_and_fast():
    code = ("import sys, time; t = time.perf_counter(); import flashkit; dt = time.perf_counter() - t; "
            "heavy = [m for m in ('numba', 'cupy', 'torch', 'plotly', 'ipywidgets', 'scipy') if m in sys.modules]; "
            "print(dt, heavy)")
    # best of three fresh processes: a busy 2-core machine can stall any one of them
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
            for _ in range(3)]
    out = min(runs, key=lambda r: float(r[0]))
    assert float(out[0]) < 0.5, f"import flashkit took {out[0]} s (best of 3)"
    assert out[1].strip() == "[]", f"import flashkit pulled in {out[1].strip()}"
