"""flashkit.viz.dashboard: the benchmark figures, the HTML report and the widget app (without a browser)."""
import json
import re

import pytest

from flashkit.measure import export, threads
from flashkit.measure import sweep as sweeps
from flashkit.viz.dashboard import BenchmarkDashboard, report_html, sweep_figure, varying


@pytest.fixture(scope="module")
def rows():
    return list(sweeps.sweep(backends=["numpy-standard", "numpy-tiled"], N=[16, 40], d=[8], heads=[1],
                             causal=[False, True], repeats=1, warmup=0))


def tiny_dashboard(tmp_path):
    dash = BenchmarkDashboard(backends=["numpy-standard"], N=(64, 128), d=16, heads=1, repeats=1, folder=tmp_path)
    return dash


def test_sweep_figure_one_line_per_series(rows):
    fig = sweep_figure(rows, "gflops")
    assert varying(rows) == ("causal",)
    assert sorted(t.name for t in fig.data) == sorted(
        f"{b}, {c}" for b in ("numpy-standard", "numpy-tiled") for c in ("causal", "non-causal"))
    assert all(list(t.x) == [16, 40] for t in fig.data)
    assert fig.layout.title.text and "N" in fig.layout.xaxis.title.text
    assert "GFLOP/s" in fig.layout.yaxis.title.text
    assert "ms" in sweep_figure(rows, "ms").layout.yaxis.title.text
    with pytest.raises(ValueError, match="metric"):
        sweep_figure(rows, "speed")


def test_report_html_is_self_contained(rows):
    page = report_html(rows, export.metadata())
    assert "Plotly.newPlot" in page and not re.search(r"<script[^>]*\bsrc=", page)
    assert page.count("<tr>") == 1 + len(rows)


def test_dashboard_defaults_are_small():
    dash = BenchmarkDashboard()
    spec = dash.spec()
    assert spec.backends == tuple(sweeps.default_backends())
    assert spec.N == (128, 256, 512) and spec.d == (64,) and spec.heads == (4,) and spec.causal == (False,)
    assert spec.threads == (threads.current_threads(),)


def test_dashboard_run_fills_rows_progress_and_chart(tmp_path):
    dash = tiny_dashboard(tmp_path)
    dash.causal.value = "both"
    rows = dash.run()
    assert len(rows) == 4 and rows is dash.rows
    assert dash.progress.value == dash.progress.max == 4 and dash.progress.bar_style == "success"
    assert dash.status.value == "done: 4 points"
    assert not dash.run_button.disabled
    assert sorted(t.name for t in dash.figure().data) == ["numpy-standard, causal", "numpy-standard, non-causal"]
    dash.metric.value = "gflops"
    assert "GFLOP/s" in dash.figure().layout.yaxis.title.text


def test_dashboard_export(tmp_path):
    dash = tiny_dashboard(tmp_path)
    with pytest.raises(RuntimeError, match="press Run"):
        dash.export("csv")
    dash.run()
    path = dash.export("json")
    assert path == tmp_path / "flashkit-bench.json"
    data = json.loads(path.read_text())
    assert data["results"] == dash.rows and data["meta"]["sweep"]["d"] == [16]
    dash.json_button.click()  # the button does the same
    assert dash.export("csv").read_text().count("\n") == 1 + len(dash.rows)
    dash.filename.value = "../elsewhere"
    with pytest.raises(ValueError, match="file name"):
        dash.export("csv")


def test_a_failing_callback_reports_the_error(tmp_path):
    dash = tiny_dashboard(tmp_path)
    dash.backends.value = ()
    dash.run_button.click()  # in a notebook the traceback prints in the log area; here ipywidgets logs it
    assert dash.status.value.startswith("failed: ValueError: backends must not be empty")
    assert not dash.run_button.disabled
    with pytest.raises(ValueError, match="backends must not be empty"):
        dash._guarded(dash.run)  # the wrapper re-raises (into the Output, which shows it)


@pytest.mark.parametrize("kw, message", [
    ({"backends": ["no-such"]}, "backends must be available"),
    ({"N": (512, 128)}, "N must be"),
    ({"causal": "yes"}, "causal must be"),
    ({"d": 48}, "d must be one of"),
    ({"heads": 3}, "heads must be one of"),
    ({"metric": "speed"}, "metric must be"),
    ({"threads": 10_000}, "threads must be between"),
])
def test_dashboard_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        BenchmarkDashboard(**kw)
