"""The command line: `flashkit info` and `flashkit bench`, as a subprocess and through main(argv)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flashkit
from flashkit.cli import main

# A bench that takes well under a second: two NumPy backends, tiny sizes, one timed call a point.
TINY = ["bench", "--backends", "numpy-standard", "numpy-tiled", "--N", "16", "40", "--d", "8",
        "--heads", "2", "--repeats", "1", "--warmup", "0", "--seconds-per-point", "0.01", "--quiet"]


def flashkit_cmd(*args, **kw):
    return subprocess.run([sys.executable, "-m", "flashkit", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_module_info():
    out = flashkit_cmd("info")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("flashkit ")
    for label in ("CPU", "SIMD", "threads", "GPUs", "versions"):
        assert re.search(rf"^{label}\s", out.stdout, re.M), label


def test_module_info_json():
    out = flashkit_cmd("info", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == set(flashkit.info())
    assert data["flashkit"] == flashkit.__version__


def test_module_bench_writes_json_csv_and_offline_html(tmp_path):
    files = {kind: tmp_path / f"r.{kind}" for kind in ("json", "csv", "html")}
    args = TINY[:-1] + ["--causal", "both"]  # with the progress bar this time
    for kind, path in files.items():
        args += [f"--{kind}", str(path)]
    out = flashkit_cmd(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "flashkit bench" in out.stderr  # tqdm's progress bar
    table = [line for line in out.stdout.splitlines() if line.startswith("numpy-")]
    assert len(table) == 2 * 2 * 2  # backends x N x causal

    data = json.loads(files["json"].read_text())
    assert set(data) == {"meta", "results"}
    assert {"created", "commit", "info", "sweep"} <= set(data["meta"])
    assert data["meta"]["info"]["cpu"]
    results = data["results"]
    assert len(results) == 8
    assert {(r["backend"], r["N"], r["causal"]) for r in results} == {
        (b, n, c) for b in ("numpy-standard", "numpy-tiled") for n in (16, 40) for c in (False, True)}
    assert all(r["ms"] > 0 and r["gflops"] > 0 and r["d"] == 8 and r["H"] == 2 for r in results)

    assert len(files["csv"].read_text().splitlines()) == 1 + 8

    page = files["html"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "Plotly.newPlot" in page and len(page) > 1_000_000  # plotly.js itself is inlined
    assert not re.search(r"<script[^>]*\bsrc=", page), "the report must not load scripts from a CDN"
    assert "numpy-tiled" in page
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.html", "r.json"]  # no temporary files left


def test_main_in_process(capsys, tmp_path):
    path = tmp_path / "r.json"
    assert main(TINY + ["--dtype", "float64", "--threads", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}" in out
    results = json.loads(path.read_text())["results"]
    assert {r["dtype"] for r in results} == {"float64"} and {r["threads"] for r in results} == {1}


def test_main_info_in_process(capsys):
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["python"] == sys.version.split()[0]


@pytest.mark.parametrize("argv, message", [
    ([], "required: COMMAND"),
    (["nope"], "invalid choice: 'nope'"),
    (["bench", "--N", "0"], "argument --N: expected a positive integer, got '0'"),
    (["bench", "--N", "abc"], "argument --N: expected a positive integer, got 'abc'"),
    (["bench", "--repeats", "0"], "argument --repeats"),
    (["bench", "--warmup", "-1"], "argument --warmup"),
    (["bench", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["bench", "--causal", "maybe"], "argument --causal: invalid choice"),
    (["bench", "--backends", "no-such"], "backends must be names from flashkit.backends()"),
    (["bench", "--threads", "10000"], "threads must be between 1 and"),
    (["bench", "--json", "/no/such/folder/r.json"], "argument --json: folder '/no/such/folder' does not exist"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: flashkit" in err and message in err


def test_bad_argument_through_the_module():
    out = flashkit_cmd("bench", "--heads", "-3")
    assert out.returncode == 2
    assert "flashkit bench: error: argument --heads" in out.stderr
    assert out.stdout == ""


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("flashkit")
    if not script.exists():
        pytest.skip("the flashkit console script is not installed next to this Python")
    out = subprocess.run([str(script), "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("flashkit ")
