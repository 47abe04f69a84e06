"""The README's first command: `make lab` (and `make lab-student`, the student edition) starts JupyterLab on 127.0.0.1 with a token, as whoever runs it
(root included: containers and cloud machines run as root), and installs only what the lab needs.

The lab runs from this interpreter's environment (`BIN=...`, so no .venv is created or installed into),
on a free port, with its Jupyter folders in a temporary directory."""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost never goes to a proxy

needs_make_and_lab = pytest.mark.skipif(
    shutil.which("make") is None or not (BIN / "jupyter").exists()
    or subprocess.run([sys.executable, "-c", "import jupyterlab"], capture_output=True).returncode != 0,
    reason="needs make and jupyterlab in this interpreter's environment (the notebooks extra)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with _NO_PROXY.open(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _get_json(url: str):
    import json

    with _NO_PROXY.open(url, timeout=10) as r:
        return json.load(r)


@needs_make_and_lab
@pytest.mark.parametrize("target", ["lab", "lab-student"])
def test_make_lab_serves_the_lab_with_its_token(tmp_path, target):
    """`make lab` serves notebooks/; `make lab-student` builds the student edition (here into tmp_path)
    and serves it the same way: localhost, the token required."""
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env.pop("PLOTLY_RENDERER", None)
    env.update(
        JUPYTER_TOKEN=token,  # jupyter_server reads the token from here; `make lab` must not override it
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        IPYTHONDIR=str(tmp_path / "ipython"),
    )
    student = tmp_path / "student"
    log = tmp_path / "make-lab.log"
    with open(log, "wb") as out:
        # Its own process group, so the kill below reaches make, JupyterLab and anything it started.
        proc = subprocess.Popen(["make", "--no-print-directory", target, f"BIN={BIN}", f"PORT={port}",
                                 f"STUDENT={student}"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"make {target} exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
            try:
                status = _get(f"{base}/lab?token={token}")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        assert status == 200, f"/lab with the token answered {status}:\n{log.read_text(errors='replace')}"
        # The token is really required: without it the lab redirects to the login page (or refuses).
        code = _get(f"{base}/api/status")
        assert code == 403, f"/api/status without the token answered {code}, expected 403"
        text = log.read_text(errors="replace")
        assert f"127.0.0.1:{port}" in text, f"the lab does not say it listens on 127.0.0.1:{port}:\n{text}"
        # What the lab serves: the notebooks, or the student edition of every exercise.
        served = sorted(item["name"] for item in _get_json(f"{base}/api/contents?token={token}")["content"])
        if target == "lab":
            assert "00_start_here.ipynb" in served and "exercises" in served, served
        else:
            exercises = sorted(p.name for p in (ROOT / "notebooks" / "exercises").glob("*.ipynb"))
            assert exercises and [n for n in served if n.endswith(".ipynb")] == exercises, served
            import nbformat

            first = nbformat.read(student / exercises[0], as_version=4)
            assert first.metadata["flashkit"]["edition"] == "student"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def test_make_lab_installs_only_the_notebooks_extra_and_make_test_adds_the_test_extra():
    """`make -n` shows what would run in a fresh clone (no .venv yet): the lab's install names only the
    notebooks extra; the tests' install adds the test extra to the same .venv."""
    if shutil.which("make") is None:
        pytest.skip("needs make")
    fresh = ["make", "--no-print-directory", "-n", "-B", "-C", str(ROOT)]
    lab = subprocess.run(fresh + ["lab"], capture_output=True, text=True, check=True).stdout
    test = subprocess.run(fresh + ["test"], capture_output=True, text=True, check=True).stdout
    installs = [line for line in lab.splitlines() if "pip install" in line and "-e" in line]
    assert installs == ['.venv/bin/python -m pip install --quiet -e ".[notebooks]"'], lab
    assert "--ip=127.0.0.1" in lab and "--no-browser" in lab
    assert ('.venv/bin/python -m pip install --quiet -e ".[notebooks,test]"' in test
            and "pytest" in test), test
    assert ("--allow-root" in lab) == (os.getuid() == 0), "--allow-root exactly when running as root"
    student = subprocess.run(fresh + ["lab-student"], capture_output=True, text=True, check=True).stdout
    assert "tools/make_student.py" in student and "--notebook-dir=build/student" in student, student
    assert "--ip=127.0.0.1" in student and "--no-browser" in student, student


def test_skipped_browser_tests_end_the_run_with_the_command_that_enables_them(tmp_path):
    """Without Chromium, the last lines of the run say how many browser tests did not run and how to
    run them (the reason alone sits in the skip list, where nobody reads it)."""
    env = dict(os.environ)
    env["FLASHKIT_CHROMIUM"] = str(tmp_path / "no-chromium")  # as on a machine without it
    # on two xdist workers, as `make test` runs: the skip is seen in a worker, the line printed by the controller
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile",
                          "tests/browser/test_lab_settings.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = run.stdout.strip().splitlines()
    summary = [line for line in lines if "browser tests skipped" in line]
    assert summary, run.stdout
    assert summary[0].startswith("3 browser tests skipped"), summary[0]
    assert "apt-get install chromium" in summary[0], summary[0]
    assert lines.index(summary[0]) >= len(lines) - 3, "the line must be at the end of the run"
