"""The workshop exercises (notebooks/exercises/) in a real JupyterLab: the same check as every lesson
notebook gets (test_notebooks_in_browser.run_in_jupyterlab), in a file of its own so that pytest-xdist
can run it on the other worker."""
from __future__ import annotations

import pytest

from .test_notebooks_in_browser import NOTEBOOKS, NOTEBOOKS_ROOT, run_in_jupyterlab

EXERCISES = [rel for rel in NOTEBOOKS if rel.startswith("exercises/")]


@pytest.mark.skipif(not EXERCISES, reason=f"no exercise notebooks under {NOTEBOOKS_ROOT}")
@pytest.mark.parametrize("rel", EXERCISES)
def test_exercise_runs_in_jupyterlab(rel, page, lab, artifacts):
    run_in_jupyterlab(rel, page, lab, artifacts)


def test_every_notebook_is_run_by_one_of_the_two_files():
    from .test_notebooks_in_browser import LESSONS

    assert sorted(LESSONS + EXERCISES) == sorted(NOTEBOOKS) and not set(LESSONS) & set(EXERCISES)
