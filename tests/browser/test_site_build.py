"""`make html` (tools/build_site.py): a page per notebook and an index in series order, plotly figures
drawn from one local plotly.min.js (no CDN), widgets replaced by a note and what their outputs showed.
Fast, and no browser needed: small synthetic notebooks, no execution. test_site_offline.py opens the
real notebooks' pages in Chromium."""
import importlib.util
import re
from pathlib import Path

import nbformat
import plotly.graph_objects as go
import plotly.io as pio
import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("build_site", ROOT / "tools" / "build_site.py")
build_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_site)


def plotly_output(fig):
    """The output the default (plotly_mimetype) renderer stores in a notebook."""
    bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig)
    return nbformat.v4.new_output("display_data", data=bundle)


def widget_notebook():
    """A notebook whose one output is a VBox(IntSlider, Output) with what the Output showed."""
    state = {
        "box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_slider", "IPY_MODEL_out"]}},
        "slider": {"model_name": "IntSliderModel", "state": {"description": "block", "value": 2}},
        "out": {"model_name": "OutputModel", "state": {"outputs": [
            {"output_type": "stream", "name": "stdout", "text": "block 3 of 4: m = 1.5\n"}]}},
    }
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state, "version_major": 2, "version_minor": 0}}
    view = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "box", "version_major": 2, "version_minor": 0},
        "text/plain": "VBox(children=(IntSlider(value=2, description='block'), Output()))"})
    nb.cells = [nbformat.v4.new_markdown_cell("# Stepper\n\nA slider walks the blocks."),
                nbformat.v4.new_code_cell("stepper()", execution_count=1, outputs=[view])]
    return nb


@pytest.fixture
def notebooks(tmp_path):
    root = tmp_path / "notebooks"
    (root / "exercises").mkdir(parents=True)
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[1, 4, 9]))
    fig.update_layout(title="S grows as N² </script>", xaxis_title="N (tokens)", yaxis_title="bytes")
    first = nbformat.v4.new_notebook()
    first.cells = [nbformat.v4.new_markdown_cell("# Standard attention\n\nWe measure the N×N matrix.\n\nMore."),
                   nbformat.v4.new_code_cell("fig", execution_count=1, outputs=[plotly_output(fig)])]
    exercise = nbformat.v4.new_notebook()
    exercise.cells = [nbformat.v4.new_markdown_cell("# Exercise: a tile\n\nWrite one FA2 tile.")]
    paths = {"01_standard.ipynb": first, "02_stepper.ipynb": widget_notebook(), "exercises/01_tile.ipynb": exercise}
    for rel, nb in paths.items():
        nbformat.write(nb, root / rel)
    return root


def test_site_pages_index_and_offline_plotly(notebooks, tmp_path):
    before = {p: p.read_bytes() for p in notebooks.rglob("*.ipynb")}
    found = build_site.find_notebooks(notebooks)
    assert [p.relative_to(notebooks).as_posix() for p in found] == [
        "01_standard.ipynb", "02_stepper.ipynb", "exercises/01_tile.ipynb"]
    out = tmp_path / "site"
    result = build_site.build_site(found, out, notebooks, log=lambda *_: None)
    assert (result["plots"], result["widgets"]) == (1, 1)
    assert all(p.read_bytes() == b for p, b in before.items()), "the notebooks must not be modified"

    index = (out / "index.html").read_text()
    titles = re.findall(r'<a href="([^"]+)">([^<]+)</a>', index)
    assert titles == [("01_standard.html", "Standard attention"), ("02_stepper.html", "Stepper"),
                      ("exercises/01_tile.html", "Exercise: a tile")]
    assert "We measure the N×N matrix." in index and "More." not in index  # the promise paragraph only

    page = (out / "01_standard.html").read_text()
    assert '<script src="plotly.min.js"></script>' in page
    assert "Plotly.newPlot" in page and "S grows as N\\u00b2 <\\/script>" in page  # "</" escaped inside <script>
    assert not re.search(r"<script[^>]+src=[\"']https?:", page), "a page needs a script from the network"
    assert "cdn.plot.ly" not in page and "require.min.js" not in page
    assert (out / "plotly.min.js").stat().st_size > 1_000_000  # the real library, not a stub

    exercise = (out / "exercises" / "01_tile.html").read_text()
    assert '<script src="../plotly.min.js"></script>' in exercise and 'href="../index.html"' in exercise

    stepper = (out / "02_stepper.html").read_text()
    assert "block = 2 (IntSlider)" in stepper and "block 3 of 4: m = 1.5" in stepper
    assert "widget-state+json" not in stepper and "jsdelivr" not in stepper  # no widget manager from a CDN


def test_rebuild_replaces_the_site_and_bad_input_is_named(notebooks, tmp_path):
    out = tmp_path / "site"
    build_site.build_site(build_site.find_notebooks(notebooks), out, notebooks, log=lambda *_: None)
    (out / "stale.html").write_text("old")
    build_site.build_site([notebooks / "01_standard.ipynb"], out, notebooks, log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == ["01_standard.html", "index.html", "plotly.min.js"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".site.")], "temporary folders left behind"
    with pytest.raises(ValueError, match="notebooks"):
        build_site.build_site([], out, notebooks)
    with pytest.raises(SystemExit):
        build_site.main(["--root", str(notebooks), "--out", str(out), str(tmp_path / "nope.ipynb")])


def test_math_pages_only_load_mathjax(notebooks, tmp_path):
    nb = nbformat.read(notebooks / "01_standard.ipynb", as_version=4)
    nb.cells[0].source += "\n\nThe cost is $O(N^2)$."
    nbformat.write(nb, notebooks / "01_standard.ipynb")
    out = tmp_path / "site"
    build_site.build_site(build_site.find_notebooks(notebooks), out, notebooks, log=lambda *_: None)
    assert "mathjax" in (out / "01_standard.html").read_text().lower()
    assert "mathjax" not in (out / "02_stepper.html").read_text().lower()
