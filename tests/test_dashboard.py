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
                             causal=[False, True], repeats=3, warmup=0, seconds_per_point=0.01))


def tiny_dashboard(tmp_path):
    dash = BenchmarkDashboard(backends=["numpy-standard"], peers=[], N=(64, 128), d=16, heads=1, repeats=3,
                              seconds_per_point=0.01, folder=tmp_path)
    return dash


def test_sweep_figure_one_line_per_series(rows):
    fig = sweep_figure(rows, "gflops")
    assert varying(rows) == ("causal",)
    lines = [t for t in fig.data if t.legendgroup != "noisy"]  # (a loaded machine may add the noisy rings)
    assert sorted(t.name for t in lines) == sorted(
        f"{b}, {c}" for b in ("numpy-standard", "numpy-tiled") for c in ("causal", "non-causal"))
    assert all(list(t.x) == [16, 40] for t in lines)
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
    assert spec.peers == tuple(sweeps.default_peers())  # torch's CPU attention beside them when installed
    assert spec.budget_s is not None and spec.budget_s <= 30 and spec.seconds_per_point <= 0.5


def _row(N, ms, p75, backend="numpy-standard", noisy=None):
    flops = 4.0 * N * N * 64
    return dict(backend=backend, device="cpu", B=1, H=1, N=N, d=64, causal=False, dtype="float32", threads=1,
                ms=ms, ms_p75=p75, ms_median=ms, noisy=(p75 > 1.5 * ms) if noisy is None else noisy,
                gflops=flops / (ms * 1e-3) / 1e9, flops=flops, repeats=5, calls=1, warmup_ms=0.0, skipped="",
                machine="test")


def test_error_bars_run_from_the_fastest_sample_to_the_75th_percentile():
    rows = [_row(128, 1.0, 1.2), _row(256, 2.0, 2.1)]
    fig = sweep_figure(rows, "ms")
    (line,) = fig.data
    assert list(line.y) == [1.0, 2.0]
    assert list(line.error_y.array) == pytest.approx([0.2, 0.1]) and list(line.error_y.arrayminus) == [0, 0]
    fig = sweep_figure(rows, "gflops")
    (line,) = fig.data
    assert list(line.error_y.array) == [0, 0]  # throughput: the bar points down, to the p75's GFLOP/s
    assert line.error_y.arrayminus[0] == pytest.approx(rows[0]["gflops"] * (1 - 1 / 1.2))
    assert "noisy" not in fig.layout.title.text


def test_noisy_points_are_ringed_and_named_in_the_title():
    rows = [_row(128, 1.0, 4.0), _row(256, 2.0, 2.1)]
    fig = sweep_figure(rows, "ms")
    rings = [t for t in fig.data if t.legendgroup == "noisy"]
    assert len(rings) == 1 and list(rings[0].x) == [128] and "noisy" in rings[0].name
    assert "1 noisy point" in fig.layout.title.text


def test_a_peer_is_labelled_as_not_flashkit():
    rows = [_row(128, 1.0, 1.1, backend="torch-sdpa-cpu"), _row(128, 1.0, 1.1)]
    names = sorted(t.name for t in sweep_figure(rows, "ms").data)
    assert names == ["numpy-standard", "torch-sdpa-cpu (peer, not flashkit)"]


def test_dashboard_run_fills_rows_progress_and_chart(tmp_path):
    dash = tiny_dashboard(tmp_path)
    dash.causal.value = "both"
    rows = dash.run()
    assert len(rows) == 4 and rows is dash.rows
    assert dash.progress.value == dash.progress.max == 4 and dash.progress.bar_style == "success"
    assert dash.status.value.startswith("done: 4 points")
    assert not dash.run_button.disabled
    assert sorted(t.name for t in dash.figure().data if t.legendgroup != "noisy") == [
        "numpy-standard, causal", "numpy-standard, non-causal"]
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
    # reported, not raised (in a kernel the Output would swallow it; the traceback goes to the log area)
    assert dash._guarded(dash.run) is False
    assert dash.status.value.startswith("failed: ValueError: backends must not be empty")


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
