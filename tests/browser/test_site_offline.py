"""The static site (`make html`) of the real notebooks, opened in Chromium with the network off:
every plotly figure is drawn and interactive (its mode bar is there), every formula is typeset by the
site's own MathJax (its output elements are there and no TeX source such as `$\\Theta(N)$` is left in the text),
with no JavaScript error."""
from __future__ import annotations

import importlib.util

import pytest

from . import lab_driver
from .lab_driver import NOTEBOOKS_ROOT, REPO, record_screenshot

NOTEBOOKS = [NOTEBOOKS_ROOT / rel for rel in lab_driver.notebook_paths(NOTEBOOKS_ROOT)]
# TeX source still in the rendered markdown's visible text: a $ followed by a \command before the next $
RAW_TEX = r"""() => Array.from(document.querySelectorAll('.jp-RenderedMarkdown')).map(e => e.innerText)
    .join('\n').match(/\$[^$\n]*\\[A-Za-z]+/g)"""


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
        links = page.locator("ul.series > li > a").count()
        if links != len(NOTEBOOKS):
            problems.append(f"the index links {links} pages for {len(NOTEBOOKS)} notebooks")
        if not (site / "mathjax" / "MathJax.js").is_file():
            problems.append("the site has no mathjax/MathJax.js of its own")
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
            if "MathJax.js" in html.read_text():  # a page whose markdown has formulas
                typeset, raw = 0, None
                for _ in range(75):  # up to 15 s for MathJax to typeset the page
                    typeset = page.locator(".MathJax, .MathJax_Display").count()
                    raw = page.evaluate(RAW_TEX)
                    if typeset and not raw:
                        break
                    page.wait_for_timeout(200)
                if not typeset:
                    problems.append(f"{name}: no formula typeset offline (no MathJax output element)")
                if raw:
                    problems.append(f"{name}: TeX source left in the text offline: {raw[:3]}")
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
