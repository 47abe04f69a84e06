"""Every notebook in a real JupyterLab: Run All, no error output, every plotly figure drawn, every
widget rendered, one control moved per widget notebook (interactions.py), a screenshot of each.

All notebooks run one after another in one server and one browser (each with a fresh page and a
fresh kernel), so the whole series costs its run time plus a few seconds a notebook.
"""
from __future__ import annotations

import time

import pytest

from . import lab_driver
from .lab_driver import NOTEBOOKS_ROOT, RUN_ALL_TIMEOUT, record_screenshot, record_timing
from .interactions import INTERACTIONS, moves

NOTEBOOKS = lab_driver.notebook_paths(NOTEBOOKS_ROOT)


def _screenshot_name(rel: str) -> str:
    return rel.replace("/", "__").removesuffix(".ipynb") + ".png"


@pytest.mark.skipif(not NOTEBOOKS, reason=f"no notebooks under {NOTEBOOKS_ROOT}")
@pytest.mark.parametrize("rel", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab(rel, page, lab, artifacts):
    expected = lab_driver.expected_outputs(NOTEBOOKS_ROOT / rel)
    problems, seconds = [], {}
    t = time.monotonic()

    def lap(name):
        nonlocal t
        now = time.monotonic()
        seconds[name] = now - t
        t = now

    try:
        lab_driver.open_notebook(page, lab, rel, page.traffic)
        lap("open")
        lab_driver.run_all(page, page.traffic, expected["code_cells"], RUN_ALL_TIMEOUT)
        lap("run all")
        problems += lab_driver.check_outputs(page, expected, page.traffic)
        lap("checks")

        row = INTERACTIONS.get(rel)
        if expected["widgets"] and row is None:
            problems.append(
                f"shows {expected['widgets']} widgets but has no row in tests/browser/interactions.py "
                "(add a Move to try, or a NoMove saying why there is nothing to move)")
        elif row is not None:
            for move in moves(row):
                if problems:
                    problems.append(f"did not try {move.describe()}: the notebook already failed")
                    break
                try:
                    lab_driver.interact(page, page.traffic, move)
                except AssertionError as e:
                    problems.append(str(e))
            lap("controls")
        problems += [f"JavaScript error in the page: {e}" for e in page.page_errors]
    finally:
        shot = artifacts / _screenshot_name(rel)
        try:
            lab_driver.screenshot(page, shot)
            record_screenshot(shot)
        except Exception as e:  # a screenshot must never hide the real failure
            problems.append(f"(screenshot failed: {e})")
        lap("screenshot")
        record_timing(rel, seconds)
    assert not problems, f"{rel} in JupyterLab (screenshot {shot}):\n  " + "\n  ".join(problems)


def test_every_interaction_row_names_a_notebook():
    """A renamed or removed notebook leaves a row behind: fail rather than silently test nothing."""
    if NOTEBOOKS_ROOT != lab_driver.NOTEBOOKS:
        pytest.skip(f"the table is for notebooks/, not {NOTEBOOKS_ROOT}")
    missing = sorted(set(INTERACTIONS) - set(NOTEBOOKS))
    assert not missing, f"tests/browser/interactions.py has rows for notebooks that do not exist: {missing}"
    for row in INTERACTIONS.values():
        moves(row)  # raises TypeError on a malformed row
