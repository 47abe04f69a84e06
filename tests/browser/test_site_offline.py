"""The static site (`make html`) of the real notebooks, opened in Chromium with the network off:
every plotly figure is drawn and interactive (its mode bar is there), with no JavaScript error."""
from __future__ import annotations

import importlib.util

import pytest

from . import lab_driver
from .lab_driver import NOTEBOOKS_ROOT, REPO, record_screenshot

NOTEBOOKS = [NOTEBOOKS_ROOT / rel for rel in lab_driver.notebook_paths(NOTEBOOKS_ROOT)]


def _build_site_module():
    spec = importlib.util.spec_from_file_location("build_site", REPO / "tools" / "build_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not NOTEBOOKS, reason=f"no notebooks under {NOTEBOOKS_ROOT}")
def test_site_figures_draw_offline(browser_ready, browser, tmp_path, artifacts):
    site = tmp_path / "site"
    built = _build_site_module().build_site(NOTEBOOKS, site, NOTEBOOKS_ROOT, log=lambda *_: None)
    context = browser.new_context(viewport=lab_driver.VIEWPORT, offline=True)
    problems = []
    try:
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(built["index"].as_uri())
        links = page.locator("ul.series a").count()
        if links != len(NOTEBOOKS):
            problems.append(f"the index links {links} pages for {len(NOTEBOOKS)} notebooks")
        for html in built["pages"]:
            errors.clear()
            page.goto(html.as_uri())
            expected = page.locator(".flashkit-plotly").count()
            drawn = 0
            for _ in range(50):  # up to 10 s for plotly to draw the page's figures
                drawn = page.locator(".flashkit-plotly .main-svg").count() and page.evaluate(
                    "() => Array.from(document.querySelectorAll('.flashkit-plotly'))"
                    ".filter(e => e.querySelector('.main-svg') && e.querySelector('.modebar')).length")
                if drawn == expected:
                    break
                page.wait_for_timeout(200)
            name = html.relative_to(site).as_posix()
            if drawn != expected:
                problems.append(f"{name}: {drawn} of {expected} figures drawn offline")
            problems += [f"{name}: JavaScript error {e}" for e in errors]
        if built["pages"]:
            shot = artifacts / "site-first-page.png"
            page.goto(built["pages"][0].as_uri())
            page.wait_for_timeout(500)
            page.screenshot(path=str(shot), full_page=True)
            record_screenshot(shot)
    finally:
        context.close()
    assert not problems, "\n".join(problems)
