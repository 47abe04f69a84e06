"""Every plotly figure committed in a notebook's outputs can be read: a title, a title on every axis that
shows (with a unit in parentheses where the axis is a quantity), no more series in the legend than
distinct styles (colour, dash, marker), and no plot area too small to read.

The figures are read from the executed notebooks as committed (their outputs, and the outputs that
their widgets showed, kept in the notebook's widget state), so this checks what a learner sees."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# plotly's default colorway (plotly.colors.qualitative.Plotly): what traces without a colour of their own get
DEFAULT_COLORWAY = ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880",
                    "#FF97FF", "#FECB52"]
# Plotly's default size where a figure sets none: the width of a notebook's output area (a laptop's
# JupyterLab shows about 900 px) and plotly's 450 px height.
ASSUMED_WIDTH, DEFAULT_HEIGHT = 900, 450
MIN_PLOT_PX = 120  # the smallest plot area (one subplot), in either direction, that still reads
MIN_FIGURE_PX = 250  # the smallest width or height a figure may set
# Traces whose coordinates are categories or positions on a drawn diagram, not quantities.
SHAPE_TRACES = {"heatmap", "image", "table", "sankey", "parcoords", "pie", "sunburst", "treemap", "indicator"}


def _figures(nb: dict):
    """(where, figure) for every plotly figure in a notebook: cell outputs and widget Output states."""
    for i, cell in enumerate(nb.get("cells", [])):
        for out in cell.get("outputs", []) or []:
            fig = (out.get("data") or {}).get(PLOTLY_MIME)
            if fig:
                yield f"cell {i}", fig
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for model_id, model in state.items():
        for out in model.get("state", {}).get("outputs", []) or []:
            fig = (out.get("data") or {}).get(PLOTLY_MIME)
            if fig:
                yield f"widget {model_id[:8]}", fig


def _text(title) -> str:
    if isinstance(title, str):
        return title
    return (title or {}).get("text") or ""


def _axis_names(trace: dict) -> tuple:
    def name(ref, letter):
        ref = ref or letter
        return f"{letter}axis{ref[1:]}"
    return name(trace.get("xaxis"), "x"), name(trace.get("yaxis"), "y")


def _numeric(values) -> bool:
    if isinstance(values, dict):  # plotly's typed arrays ({"dtype": ..., "bdata": ...}) are numbers
        return "bdata" in values
    vals = [v for v in (values or []) if v is not None]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def problems_of(fig: dict) -> list:
    """What makes one figure hard to read (an empty list when nothing does)."""
    layout, data = fig.get("layout", {}), fig.get("data", [])
    found = []
    if not _text(layout.get("title")).strip():
        found.append("no title")
    # Axes that show: referenced by a trace, not hidden.
    used, quantity = set(), set()
    for tr in data:
        if tr.get("type", "scatter") in ("pie", "table", "sankey", "indicator", "parcoords", "sunburst", "treemap"):
            continue
        xa, ya = _axis_names(tr)
        used |= {xa, ya}
        if tr.get("type", "scatter") not in SHAPE_TRACES:
            horizontal = tr.get("orientation") == "h"
            for axis, key in ((xa, "x"), (ya, "y")):
                # a bar's category axis is not a quantity: bars are vertical unless orientation == "h"
                if tr.get("type") == "bar" and (key == "x") != horizontal:
                    continue
                if _numeric(tr.get(key)) or (tr.get("type") == "histogram" and key == "y"):
                    quantity.add(axis)
    for axis in sorted(used):
        spec = layout.get(axis, {})
        if spec.get("visible") is False or spec.get("showticklabels") is False and not _text(spec.get("title")):
            continue
        title = _text(spec.get("title")).strip()
        if not title:
            found.append(f"{axis} has no title")
        elif axis in quantity and spec.get("type") != "category" and "(" not in title:
            found.append(f"{axis} title {title!r} gives no unit in parentheses")
    # Legend entries against distinct styles: a colour, with its dash and marker symbol (a fitted line
    # dashed in its data's colour reads apart from the data; two solid lines of one colour do not).
    colorway = (layout.get("template", {}).get("layout", {}).get("colorway") or layout.get("colorway")
                or DEFAULT_COLORWAY)
    entries, styles = {}, set()
    for i, tr in enumerate(data):
        shown = tr.get("showlegend", tr.get("type", "scatter") not in SHAPE_TRACES and len(data) > 1)
        if not shown or not tr.get("name") or tr["name"] in entries:
            continue
        marker, line = tr.get("marker") or {}, tr.get("line") or {}
        colour = marker.get("color") or line.get("color") or (tr.get("fillcolor") if tr.get("fill") else None) \
            or colorway[i % len(colorway)]
        colour = tuple(map(str, colour)) if isinstance(colour, list) else str(colour).lower().replace(" ", "")
        style = tuple(tuple(map(str, v)) if isinstance(v, list) else v for v in (
            colour, line.get("dash") or "solid", marker.get("symbol") or "circle",
            (marker.get("pattern") or {}).get("shape") or ""))
        entries[tr["name"]] = style
        styles.add(style)
    if len(entries) > len(styles):
        found.append(f"{len(entries)} legend entries in {len(styles)} distinct styles (colour, dash, symbol)")
    # Size: the figure, and each plot area (subplot) in pixels.
    width, height = layout.get("width"), layout.get("height")
    for name, px in (("width", width), ("height", height)):
        if px is not None and px < MIN_FIGURE_PX:
            found.append(f"figure {name} {px} px < {MIN_FIGURE_PX}")
    margin = layout.get("margin", {})
    plot_w = (width or ASSUMED_WIDTH) - margin.get("l", 80) - margin.get("r", 80)
    plot_h = (height or DEFAULT_HEIGHT) - margin.get("t", 100) - margin.get("b", 80)
    for axis in sorted(used):
        lo, hi = layout.get(axis, {}).get("domain", [0, 1])
        px = (hi - lo) * (plot_w if axis.startswith("x") else plot_h)
        if px < MIN_PLOT_PX:
            found.append(f"{axis} is {px:.0f} px long (< {MIN_PLOT_PX})")
    return found


# Figures of notebooks that other work is fixing: each known failure is listed, strict, so that this list
# shrinks as they are fixed (an entry that starts to pass fails the run until it is removed).
KNOWN = {}  # notebook file -> why its figures fail today (a strict xfail): none


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.relative_to(ROOT / "notebooks").as_posix() for p in NOTEBOOKS])
def test_committed_figures_are_legible(path, request):
    rel = path.relative_to(ROOT / "notebooks").as_posix()
    if rel in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN[rel], strict=True))
    nb = json.loads(path.read_text())
    bad = [f"{where}: {p}" for where, fig in _figures(nb) for p in problems_of(fig)]
    assert not bad, f"{rel}:\n  " + "\n  ".join(bad)


def test_the_checks_catch_what_they_claim():
    good = {"data": [{"type": "scatter", "x": [1, 2], "y": [3, 4], "name": "a"}],
            "layout": {"title": {"text": "t"}, "xaxis": {"title": {"text": "N (tokens)"}},
                       "yaxis": {"title": {"text": "time (ms)"}}}}
    assert problems_of(good) == []
    no_unit = json.loads(json.dumps(good))
    no_unit["layout"]["yaxis"]["title"]["text"] = "time"
    assert problems_of(no_unit) == ["yaxis title 'time' gives no unit in parentheses"]
    untitled = json.loads(json.dumps(good))
    del untitled["layout"]["title"], untitled["layout"]["xaxis"]
    assert problems_of(untitled) == ["no title", "xaxis has no title"]
    same = {"data": [{"x": [1], "y": [1], "name": n, "marker": {"color": "red"}} for n in "abc"],
            "layout": good["layout"]}
    assert problems_of(same) == ["3 legend entries in 1 distinct styles (colour, dash, symbol)"]
    same["data"][0]["line"] = {"dash": "dot"}  # a dashed twin in the same colour reads apart
    assert problems_of(same) == ["3 legend entries in 2 distinct styles (colour, dash, symbol)"]
    tiny = json.loads(json.dumps(good))
    tiny["layout"].update(width=150, xaxis={"title": {"text": "N (tokens)"}, "domain": [0, 0.1]})
    assert "figure width 150 px < 250" in problems_of(tiny) and any("xaxis is" in p for p in problems_of(tiny))
