"""Fixtures of the browser tests: one JupyterLab server and one headless Chromium for the whole run,
both always shut down (also when a test fails or the run is interrupted), and a fresh page per test.

Skipped, with the reason, when Chromium (/usr/bin/chromium, or $FLASHKIT_CHROMIUM) or the playwright
client is missing. Screenshots and the server's log go to test-artifacts/browser/, reported at the
end of the run. $FLASHKIT_BROWSER_NOTEBOOKS points the tests at another notebooks folder (to try the
driver on a scratch copy); $FLASHKIT_BROWSER_TIMEOUT is the seconds one Run All may take (180).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from . import lab_driver

_REPORT = lab_driver.REPORT


def pytest_sessionstart(session):
    """Empty test-artifacts/browser/ of the previous run's screenshots and logs, once per run: in the
    controller under pytest-xdist (`make test` runs with -n), whose workers share the folder."""
    if getattr(session.config, "workerinput", None) is None:
        lab_driver.ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for old in list(lab_driver.ARTIFACTS.glob("*.png")) + list(lab_driver.ARTIFACTS.glob("*.log")):
            old.unlink()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """test-artifacts/browser/, where screenshots and the JupyterLab log go."""
    lab_driver.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return lab_driver.ARTIFACTS


@pytest.fixture(scope="session")
def browser_ready():
    reason = lab_driver.why_no_browser()
    if reason:
        _REPORT["skipped"] = reason
        pytest.skip(reason)


@pytest.fixture(scope="session")
def lab(browser_ready, artifacts, tmp_path_factory):
    """A JupyterLab on a free 127.0.0.1 port with a random token, serving the notebooks folder."""
    server = lab_driver.LabServer(lab_driver.NOTEBOOKS_ROOT, tmp_path_factory.mktemp("jupyter"), artifacts / _log_name())
    _REPORT["server_log"] = server.log_path
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser(browser_ready):
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        chromium = lab_driver.launch_chromium(pw)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        pw.stop()


@pytest.fixture
def page(browser, lab):
    """A fresh context and page, with its kernel traffic recorded as `page.traffic` and its
    JavaScript errors as `page.page_errors`; closed afterwards, and the server's kernels shut down
    so the next notebook starts clean. (One context for the whole run was measured no faster.)"""
    context = browser.new_context(viewport=lab_driver.VIEWPORT)
    try:
        pg = context.new_page()
        pg.set_default_timeout(30_000)
        pg.traffic = lab_driver.KernelTraffic().attach(pg)
        pg.page_errors = []
        pg.on("pageerror", lambda e: pg.page_errors.append(str(e)))
        yield pg
    finally:
        context.close()
        lab.shutdown_kernels()


def _log_name() -> str:
    """One JupyterLab log per xdist worker: two workers may each start a server (one per test file)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return f"jupyterlab-{worker}.log" if worker else "jupyterlab.log"


def pytest_sessionfinish(session):
    """Under pytest-xdist the browser tests run in a worker: hand its report to the controller, which
    prints the summary (`make test` runs with -n)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["flashkit_browser"] = json.dumps({
            "screenshots": [str(s) for s in _REPORT["screenshots"]], "timings": _REPORT["timings"],
            "server_log": str(_REPORT["server_log"]) if _REPORT["server_log"] else None,
            "skipped": _REPORT.get("skipped")})


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The controller's side of the hand-over above (an xdist hook: unknown without xdist)."""
    data = getattr(node, "workeroutput", {}).get("flashkit_browser")
    if not data:
        return
    got = json.loads(data)
    _REPORT["screenshots"].extend(Path(s) for s in got["screenshots"])
    _REPORT["timings"].extend((name, seconds) for name, seconds in got["timings"])
    if got["server_log"]:
        _REPORT["server_log"] = Path(got["server_log"])
    if got["skipped"]:
        _REPORT["skipped"] = got["skipped"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    shots, timings = _REPORT["screenshots"], _REPORT["timings"]
    tr = terminalreporter
    if _REPORT.get("skipped"):
        tr.section("browser test")
        tr.write_line(_skipped_line(tr), yellow=True, bold=True)
    if not shots and not timings:
        return
    if not _REPORT.get("skipped"):
        tr.section("browser test")
    total = 0.0
    for name, seconds in timings:
        total += sum(seconds.values())
        phases = ", ".join(f"{phase} {s:.1f}" for phase, s in seconds.items())
        tr.write_line(f"  {name}: {sum(seconds.values()):.1f} s ({phases})")
    if timings:
        tr.write_line(f"{len(timings)} notebooks in {total:.0f} s")
    if shots:
        tr.write_line(f"{len(shots)} screenshots in {shots[0].parent}/")
    if _REPORT["server_log"]:
        tr.write_line(f"JupyterLab log: {_REPORT['server_log']}")


def _skipped_line(tr) -> str:
    """One line a learner cannot miss: how many browser tests did not run, why, and the command that
    makes them run (the one .ci/run uses), instead of a reason buried in the skip list."""
    here = Path(__file__).resolve().parent
    skipped = [r for r in tr.stats.get("skipped", [])
               if (tr.config.rootpath / r.location[0]).resolve().is_relative_to(here)]
    n = len(skipped)
    what = f"{n} browser test{'s' if n != 1 else ''} skipped"
    if not Path(lab_driver.CHROMIUM).exists():
        sudo = "" if os.geteuid() == 0 else "sudo "
        return (f"{what}: no Chromium at {lab_driver.CHROMIUM}. Run them with: "
                f"{sudo}apt-get install chromium && make test (or set FLASHKIT_CHROMIUM to a Chromium)")
    return f"{what}: {_REPORT['skipped']}"
