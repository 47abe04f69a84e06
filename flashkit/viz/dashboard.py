"""Benchmark charts, the self-contained HTML report of `flashkit bench`, and the live dashboard.

    from flashkit.viz.dashboard import BenchmarkDashboard, sweep_figure
    dash = BenchmarkDashboard()      # widgets: backends, N range, d, heads, causal, dtype, threads
    dash                             # shown in a notebook; press Run, or call dash.run()
    sweep_figure(dash.rows)          # the results as a plain plotly figure

The dashboard measures with flashkit.measure.sweep.sweep, which yields one result at a time, so the
chart and the progress bar move as each point finishes. Each point is the fastest of its timed samples
(flashkit.measure.timing.time_robust); its error bar reaches the 75th percentile, and a point whose
spread is large (timing.NOISY_SPREAD) is ringed and named in the title: its time is not to be trusted.
When torch is installed, its CPU attention is timed beside flashkit's backends as a labelled peer. The chart is a plotly go.Figure redrawn in an
ipywidgets Output (plotly's FigureWidget needs the anywidget package, which flashkit does not require).
Callback errors are printed in the dashboard's log area, never swallowed.
"""
from __future__ import annotations

import html
import os
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flashkit.measure.export import metadata, write_csv, write_json
from flashkit.measure.sweep import (DTYPES, PEERS, Sweep, check_dtype, default_backends, default_peers,
                                    peer_unavailable_reason, sweep)
from flashkit.measure.threads import check_threads, current_threads, max_threads
from flashkit.viz import spread
from flashkit.validate import positive_int

METRICS = {
    "ms": ("time per call (ms, fastest sample; bar to the 75th percentile)", "log"),
    "gflops": ("throughput (GFLOP/s at the fastest sample; bar to the 75th percentile)", "linear"),
}
# The whole default sweep's timing budget (warm-ups and compiles not counted): on a busy or
# oversubscribed machine the remaining points are skipped rather than letting Run take minutes.
DASHBOARD_BUDGET_S = 20.0
# Point fields that may vary across a sweep; those that do name the chart's lines beside the backend.
SERIES_FIELDS = ("causal", "d", "H", "dtype", "threads")


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def varying(rows: Sequence[dict]) -> tuple:
    """The SERIES_FIELDS that take more than one value in rows."""
    return tuple(f for f in SERIES_FIELDS if len({r[f] for r in rows}) > 1)


def series_label(row: dict, fields: Sequence[str]) -> str:
    """A line's name: the backend, then each varying field (e.g. "numba, causal, d=128")."""
    parts = [f"{row['backend']} (peer, not flashkit)" if row["backend"] in PEERS else row["backend"]]
    for f in fields:
        if f == "causal":
            parts.append("causal" if row["causal"] else "non-causal")
        elif f == "threads":
            parts.append(f"{row['threads']} threads")
        elif f == "dtype":
            parts.append(row["dtype"])
        else:
            parts.append(f"{f}={row[f]}")
    return ", ".join(parts)


def _add_traces(fig, rows, metric, fields, **where):
    series = {}
    for r in rows:
        if r["ms"] is not None:  # skipped points have no time
            series.setdefault(series_label(r, fields), []).append(r)
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda r: r["N"])
        # The bar runs from the fastest sample to the 75th percentile: up in time, down in GFLOP/s.
        slow = [r["ms_p75"] if r.get("ms_p75") is not None else r["ms"] for r in pts]
        if metric == "ms":
            error = spread.bar_up([r["ms"] for r in pts], slow)
        else:
            error = spread.bar_down([r["gflops"] for r in pts], [r["flops"] / (s * 1e-3) / 1e9 for s, r in zip(slow, pts)])
        fig.add_trace(go.Scatter(
            x=[r["N"] for r in pts], y=[r[metric] for r in pts], name=name, mode="lines+markers",
            legendgroup=name, showlegend=where.get("col", 1) == 1,
            marker=dict(color=_colour(i)), line=dict(color=_colour(i)), error_y=dict(error, color=_colour(i)),
            customdata=[[r["ms"], s, r["gflops"]] for s, r in zip(slow, pts)],
            hovertemplate=("N=%{x}<br>%{customdata[0]:.3f} ms fastest, %{customdata[1]:.3f} ms p75"
                           "<br>%{customdata[2]:.2f} GFLOP/s<extra>" + name + "</extra>"),
        ), **where)
    noisy = [r for pts in series.values() for r in pts if r.get("noisy")]
    return spread.ring_noisy(fig, [r["N"] for r in noisy], [r[metric] for r in noisy],
                             showlegend=where.get("col", 1) == 1, **where)


def noisy_warning(rows: Sequence[dict]) -> str:
    """'' when every timed point is steady, else a sentence naming how many are not and what to do."""
    return spread.warning(sum(1 for r in rows if r["ms"] is not None and r.get("noisy")))


def _colour(i: int) -> str:
    import plotly.colors

    palette = plotly.colors.qualitative.Plotly  # mid-tone colours that read on light and dark themes
    return palette[i % len(palette)]


def sweep_figure(rows: Sequence[dict], metric: str = "ms", fields: Optional[Sequence[str]] = None,
                 title: Optional[str] = None) -> go.Figure:
    """One line per backend (and per varying setting): time or GFLOP/s against N, log-scaled N.

    metric is "ms" (median time, log axis) or "gflops" (GFLOP/s); fields are the SERIES_FIELDS that
    name lines (default: those that vary in rows).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    rows = list(rows)
    fields = varying(rows) if fields is None else tuple(fields)
    label, axis_type = METRICS[metric]
    fig = go.Figure()
    _add_traces(fig, rows, metric, fields)
    title = title or f"Attention forward: {label.split(' (')[0]} against sequence length"
    fig.update_layout(
        title=spread.title(title, sum(1 for r in rows if r["ms"] is not None and r.get("noisy"))),
        xaxis=dict(title="sequence length N (tokens, log scale)", type="log",
                   tickvals=sorted({r["N"] for r in rows}) or None),
        yaxis=dict(title=label, type=axis_type),
        legend=dict(title="backend"), height=420, margin=dict(t=60),
    )
    if not fig.data:
        fig.add_annotation(text="no results yet: press Run", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.5, font=dict(size=16))
    return fig


def report_figure(rows: Sequence[dict], title: str = "flashkit bench") -> go.Figure:
    """Time and GFLOP/s side by side against N: the figure of the HTML report."""
    rows = list(rows)
    fields = varying(rows)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("time per call (lower is better)",
                                                        "throughput (higher is better)"))
    _add_traces(fig, rows, "ms", fields, row=1, col=1)
    _add_traces(fig, rows, "gflops", fields, row=1, col=2)
    ticks = sorted({r["N"] for r in rows}) or None
    for col in (1, 2):
        fig.update_xaxes(title_text="sequence length N (tokens, log scale)", type="log", tickvals=ticks, row=1, col=col)
    fig.update_yaxes(title_text="time per call (ms, fastest; bar to p75)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="throughput (GFLOP/s; bar to p75)", row=1, col=2)
    warning = noisy_warning(rows)
    fig.update_layout(title=title + (f"<br><sup>{warning}</sup>" if warning else ""), height=460,
                      legend=dict(title="backend"))
    return fig


def report_html(rows: Sequence[dict], meta: dict) -> str:
    """A self-contained HTML page: the figure (plotly.js inlined, no CDN, works offline), the results
    table and where they came from (machine, versions, commit)."""
    import plotly.io as pio
    from flashkit.sysinfo import format_info

    rows = list(rows)
    machine = meta["info"]["cpu"]
    figure = pio.to_html(report_figure(rows, title=f"flashkit bench on {machine}"),
                         include_plotlyjs=True, full_html=False)
    esc = html.escape
    head = ("backend", "B", "H", "N", "d", "causal", "dtype", "threads", "ms (min)", "ms (p75)", "GFLOP/s", "note")
    body = "\n".join(
        "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in (
            r["backend"], r["B"], r["H"], r["N"], r["d"], "yes" if r["causal"] else "no", r["dtype"], "-" if r["threads"] is None else r["threads"],
            "" if r["ms"] is None else f"{r['ms']:.3f}", "" if r["ms_p75"] is None else f"{r['ms_p75']:.3f}",
            "" if r["gflops"] is None else f"{r['gflops']:.2f}",
            r["skipped"] or ("noisy: p75 far above the fastest" if r["noisy"] else ""))) + "</tr>"
        for r in rows)
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>flashkit bench</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; }}
td, th {{ padding: 0.2em 0.7em; border-bottom: 1px solid #8884; text-align: right; }}
td:first-child, th:first-child, td:last-child {{ text-align: left; }}</style></head>
<body>
<h1>flashkit bench</h1>
<p>The fastest of the timed samples after warm-up (at least {esc(str(meta.get('sweep', {}).get('repeats', '?')))} a point), the 75th percentile beside it; FLOPs = 4&middot;B&middot;H&middot;N&sup2;&middot;d
times the visible fraction (about half when causal). Created {esc(meta['created'])}, commit {esc(str(meta.get('commit')))}.</p>
{figure}
<h2>Results</h2>
<table><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead>
<tbody>
{body}
</tbody></table>
<h2>Machine</h2>
<pre>{esc(format_info(meta['info']))}</pre>
</body></html>
"""


# ---------------------------------------------------------------------------------------------
# The dashboard
# ---------------------------------------------------------------------------------------------
N_CHOICES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
D_CHOICES = (16, 32, 64, 80, 128, 256)
HEAD_CHOICES = (1, 2, 4, 8, 16, 32)


class BenchmarkDashboard:
    """Widgets that set up a sweep, a Run button, a progress bar, a live chart and CSV/JSON export.

    The defaults (the CPU baselines, torch's CPU attention as a peer when torch is installed, N =
    128..512, d = 64, 4 heads, at least 3 samples and about `seconds_per_point` of timing a point) finish
    in seconds on a laptop; `budget_s` bounds the timing of a whole Run (points past it are skipped and
    say so). `run()` does what the button does and returns the rows, so a notebook can run it from code.
    """

    def __init__(self, *, backends: Optional[Sequence[str]] = None, peers: Optional[Sequence[str]] = None,
                 N=(128, 512), d: int = 64, heads: int = 4, causal: str = "off", dtype: str = "float32",
                 threads: Optional[int] = None, repeats: int = 3, seconds_per_point: float = 0.2,
                 budget_s: Optional[float] = DASHBOARD_BUDGET_S, metric: str = "ms", folder="."):
        import ipywidgets as W
        import flashkit

        available = [b["name"] for b in flashkit.backends() if b["available"]]
        chosen = list(default_backends() if backends is None else backends)
        unknown = [b for b in chosen if b not in available]
        if unknown:
            raise ValueError(f"backends must be available backends ({', '.join(available)}); got {unknown}")
        peers = default_peers() if peers is None else list(peers)
        for p in peers:
            reason = peer_unavailable_reason(p)
            if reason is not None:
                raise ValueError(f"peers must be peers that run here ({', '.join(default_peers()) or 'none'}); "
                                 f"got {p!r}: {reason}")
        self.seconds_per_point, self.budget_s = seconds_per_point, budget_s
        if tuple(N) != tuple(sorted(N)) or len(N) != 2 or any(n not in N_CHOICES for n in N):
            raise ValueError(f"N must be a (low, high) pair from {N_CHOICES}; got {N!r}")
        if d not in D_CHOICES:
            raise ValueError(f"d must be one of {D_CHOICES}; got {d!r}")
        if heads not in HEAD_CHOICES:
            raise ValueError(f"heads must be one of {HEAD_CHOICES}; got {heads!r}")
        if causal not in ("off", "on", "both"):
            raise ValueError(f"causal must be 'off', 'on' or 'both'; got {causal!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
        top = max_threads()
        threads = current_threads() if threads is None else check_threads(threads)
        self.folder = Path(folder)
        self.rows: list = []
        self.meta: Optional[dict] = None
        self._fields: tuple = ()  # the settings that vary in the sweep: they name the chart's lines

        style = {"description_width": "90px"}
        wide = W.Layout(width="420px")
        self.backends = W.SelectMultiple(options=available, value=chosen, rows=min(6, len(available)),
                                         description="backends", style=style, layout=wide)
        self.N = W.SelectionRangeSlider(options=list(N_CHOICES), index=(N_CHOICES.index(N[0]), N_CHOICES.index(N[1])),
                                        description="N range", style=style, layout=wide)
        self.d = W.Dropdown(options=list(D_CHOICES), value=d, description="head size d", style=style)
        self.heads = W.Dropdown(options=list(HEAD_CHOICES), value=heads,
                                description="heads H", style=style)
        self.causal = W.ToggleButtons(options=["off", "on", "both"], value=causal, description="causal", style=style)
        self.dtype = W.Dropdown(options=list(DTYPES), value=check_dtype(dtype), description="dtype", style=style)
        self.threads = W.IntSlider(value=threads, min=1, max=top, description="threads", style=style)
        self.repeats = W.IntSlider(value=positive_int("repeats", repeats), min=1, max=20,
                                   description="min samples", style=style)
        self.peers = W.Checkbox(value="torch-sdpa-cpu" in peers, indent=False,
                                description="torch SDPA on the CPU (a peer, not flashkit)",
                                disabled=peer_unavailable_reason("torch-sdpa-cpu") is not None)
        self.metric = W.ToggleButtons(options=[("time (ms)", "ms"), ("GFLOP/s", "gflops")], value=metric,
                                      description="plot", style=style)
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="progress", style=style)
        self.status = W.Label(value="press Run")
        self.filename = W.Text(value="flashkit-bench", description="file name", style=style)
        self.csv_button = W.Button(description="Save CSV", icon="download")
        self.json_button = W.Button(description="Save JSON", icon="download")
        self.chart = W.Output()
        self.log = W.Output()

        self.run_button.on_click(lambda _: self._guarded(self.run))
        self.csv_button.on_click(lambda _: self._guarded(self.export, "csv"))
        self.json_button.on_click(lambda _: self._guarded(self.export, "json"))
        self.metric.observe(lambda _: self._guarded(self._redraw), names="value")

        self.widget = W.VBox([
            W.HBox([W.VBox([self.backends, self.N, self.d, self.heads]),
                    W.VBox([self.causal, self.dtype, self.threads, self.repeats, self.peers])]),
            W.HBox([self.run_button, self.progress, self.status]),
            self.metric, self.chart,
            W.HBox([self.filename, self.csv_button, self.json_button]),
            self.log,
        ])
        self._redraw()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def spec(self) -> Sweep:
        """The sweep the widgets describe: powers of two over the N range, the chosen settings."""
        lo, hi = self.N.value
        causal = {"off": (False,), "on": (True,), "both": (False, True)}[self.causal.value]
        return Sweep(backends=list(self.backends.value), peers=["torch-sdpa-cpu"] if self.peers.value else [],
                     N=[n for n in N_CHOICES if lo <= n <= hi], d=[self.d.value], heads=[self.heads.value],
                     causal=causal, dtype=[self.dtype.value], threads=[self.threads.value],
                     repeats=self.repeats.value, seconds_per_point=self.seconds_per_point, budget_s=self.budget_s)

    def run(self) -> list:
        """Run the sweep the widgets describe, redrawing the chart after every point; returns the rows."""
        self.run_button.disabled = True
        self.progress.bar_style = ""
        try:
            spec = self.spec()  # a bad setting raises here, before the last results are cleared
            points = len(spec)
            self.rows, self.meta = [], metadata(spec)
            self._fields = tuple(f for f, values in (("causal", spec.causal), ("d", spec.d), ("H", spec.heads),
                                                     ("dtype", spec.dtype), ("threads", spec.threads)) if len(values) > 1)
            self.progress.max, self.progress.value = points, 0
            for row in sweep(spec):
                self.rows.append(row)
                self.progress.value += 1
                done = (f"{row['ms']:.2f} ms" + (" (noisy)" if row["noisy"] else "") if row["ms"] is not None
                        else "skipped: " + row["skipped"])
                self.status.value = f"{self.progress.value}/{points}: {row['backend']} N={row['N']} {done}"
                self._redraw()
        except Exception as exc:
            self.progress.bar_style = "danger"
            self.status.value = f"failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self.run_button.disabled = False
        self.progress.bar_style = "success"
        over = sum("time budget" in r["skipped"] for r in self.rows)
        self.status.value = (f"done: {len(self.rows)} points" + (f", {over} past the time budget" if over else "")
                             + (f"; {noisy_warning(self.rows)}" if noisy_warning(self.rows) else ""))
        return self.rows

    def figure(self) -> go.Figure:
        """The chart of the current rows, as a plain figure."""
        return sweep_figure(self.rows, self.metric.value, fields=self._fields)

    def export(self, kind: str) -> Path:
        """Write the rows as <file name>.csv or .json in `folder` (atomically); returns the path."""
        if kind not in ("csv", "json"):
            raise ValueError(f"kind must be 'csv' or 'json'; got {kind!r}")
        if not self.rows:
            raise RuntimeError("nothing to export yet: press Run first")
        name = self.filename.value.strip()
        if not name or os.sep in name or (os.altsep and os.altsep in name):
            raise ValueError(f"file name must be a plain name without folders; got {name!r}")
        path = self.folder / f"{name}.{kind}"
        write = write_csv if kind == "csv" else write_json
        write(self.rows, path, self.meta)
        self.status.value = f"wrote {path} ({len(self.rows)} rows)"
        return path

    def _redraw(self):
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is None:  # plain Python (tests): no front end to draw in
            return
        with self.chart:
            self.chart.clear_output(wait=True)
            display(self.figure())

    def _guarded(self, fn, *args) -> bool:
        """Run a callback with its output and any error shown in the log area; True if it succeeded.

        The error is reported here (status line, traceback in the log) and not raised: in a kernel the
        Output widget would swallow it anyway, and outside one (a test) the result must not depend on
        whether some IPython shell happens to exist in the process."""
        with self.log:
            self.log.clear_output()
            try:
                fn(*args)
            except Exception as exc:
                self.status.value = f"failed: {type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stdout)  # into the log area
                return False
        return True
