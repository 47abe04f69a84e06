"""Drive a real JupyterLab in headless Chromium: start a private server, open a notebook, Run All,
check what the learner would see, move one control, take a screenshot.

Used by the tests in this folder; no pytest here, so a failing step can be replayed by hand
(with tests/browser on sys.path):

    from lab_driver import LabServer, launch_chromium, open_notebook, run_all, check_outputs
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
JUPYTER_SETTINGS = REPO / "jupyter"  # the settings `make lab` uses (JUPYTER_CONFIG_PATH)
ARTIFACTS = REPO / "test-artifacts" / "browser"
# Another notebooks folder to try the driver on (a scratch copy), and the seconds one Run All may take.
NOTEBOOKS_ROOT = Path(os.environ.get("FLASHKIT_BROWSER_NOTEBOOKS", NOTEBOOKS)).resolve()
RUN_ALL_TIMEOUT = float(os.environ.get("FLASHKIT_BROWSER_TIMEOUT", "180"))
# What this run produced, for the terminal summary (conftest.py).
REPORT = {"screenshots": [], "timings": [], "server_log": None}

CHROMIUM = os.environ.get("FLASHKIT_CHROMIUM", "/usr/bin/chromium")
# No network here: without the background-networking flags Chromium keeps trying Google's hosts.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
VIEWPORT = {"width": 1280, "height": 900}

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"

# Settings for the test's own user-settings folder (the repo's defaults stay in force underneath):
# never write the notebooks back while we run them, and attach every cell to the DOM so that every
# figure and widget is really drawn, not only the ones in view.
TEST_USER_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def record_screenshot(path: Path):
    REPORT["screenshots"].append(Path(path))


def record_timing(name: str, seconds: dict):
    """`seconds`: {"open": s, "run all": s, ...}, the phases of one notebook's test in order."""
    REPORT["timings"].append((name, dict(seconds)))


def notebook_paths(root: Path = NOTEBOOKS) -> list:
    """Notebooks under `root` (exercises/ included) in series order, relative, as posix strings."""
    paths = [p for p in root.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts]
    return sorted(p.relative_to(root).as_posix() for p in paths)


def why_no_browser() -> str | None:
    """None when the browser test can run here, else the reason to skip it."""
    if not Path(CHROMIUM).exists():
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set FLASHKIT_CHROMIUM)"
    for module, hint in (("playwright.sync_api", "pip install playwright (in the test extra)"),
                         ("jupyterlab", "pip install jupyterlab (in the notebooks extra)")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not importable: {hint}"
    return None


def launch_chromium(playwright):
    """Debian's Chromium (never a downloaded one: `playwright install` cannot work offline)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """A JupyterLab on 127.0.0.1 with a random token, serving `root_dir` with the repo's settings
    (the same JUPYTER_CONFIG_PATH as `make lab`), isolated from the user's own Jupyter folders."""

    def __init__(self, root_dir: Path, work_dir: Path, log_path: Path, settings_dir: Path = JUPYTER_SETTINGS):
        self.root_dir, self.work_dir, self.log_path = Path(root_dir), Path(work_dir), Path(log_path)
        self.settings_dir = Path(settings_dir)
        self.token = secrets.token_hex(24)
        self.port = None
        self.proc = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/", **query) -> str:
        """A browser URL with the token (and any query flags, e.g. reset=None for `?reset`)."""
        parts = [k if v is None else f"{k}={v}" for k, v in query.items()] + [f"token={self.token}"]
        return f"{self.base}{urllib.parse.quote(path)}?{'&'.join(parts)}"

    def api(self, path: str, method: str = "GET"):
        """A REST call with the token in the header; the JSON answer (None when empty)."""
        req = urllib.request.Request(self.base + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with _NO_PROXY.open(req, timeout=30) as r:  # never send localhost traffic to a proxy
            body = r.read()
        return json.loads(body) if body else None

    def start(self, timeout: float = 90.0):
        user_settings = self.work_dir / "user-settings"
        for rel, values in TEST_USER_SETTINGS.items():
            f = user_settings / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(values))
        env = dict(os.environ)
        env.pop("PLOTLY_RENDERER", None)  # the notebooks must use plotly's default (mimetype) renderer
        env.update(
            JUPYTER_CONFIG_PATH=str(self.settings_dir),
            JUPYTER_CONFIG_DIR=str(self.work_dir / "config"),
            JUPYTER_DATA_DIR=str(self.work_dir / "data"),
            JUPYTER_RUNTIME_DIR=str(self.work_dir / "runtime"),
            IPYTHONDIR=str(self.work_dir / "ipython"),
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        last_error = None
        for _attempt in range(3):  # the free port may be taken between picking and binding it
            self.port = _free_port()
            cmd = [
                sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
                "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.root_dir}",
                f"--LabApp.user_settings_dir={user_settings}",
                f"--LabApp.workspaces_dir={self.work_dir / 'workspaces'}",
                # JupyterLab checkpoints every notebook it opens; keep those out of the repo.
                f"--FileCheckpoints.checkpoint_dir={self.work_dir / 'checkpoints'}",
            ]
            with open(self.log_path, "ab") as log:
                # Its own process group, so stop() also reaches the kernels it started.
                self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                self._wait_ready(timeout)
                return self
            except RuntimeError as e:
                last_error = e
                self.stop()
        raise last_error

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.proc.returncode}; log {self.log_path}:\n"
                                   + self.log_tail())
            try:
                self.api("/api/status")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise RuntimeError(f"JupyterLab did not answer within {timeout:.0f} s; log {self.log_path}:\n" + self.log_tail())

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def shutdown_kernels(self):
        """End every kernel of this server (between notebooks: only one kernel runs at a time)."""
        try:
            for s in self.api("/api/sessions"):
                self.api(f"/api/sessions/{s['id']}", method="DELETE")
            for k in self.api("/api/kernels"):
                self.api(f"/api/kernels/{k['id']}", method="DELETE")
        except (urllib.error.URLError, OSError):
            pass  # the server is going away anyway; stop() ends the process group

    def stop(self):
        """SIGTERM to the server's process group (server and the kernels it started), SIGKILL to
        the group after 15 s. Also when the server already exited: its kernels may not have."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return  # nothing of the group is left
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever ignored SIGTERM
        except ProcessLookupError:
            pass
        self.proc.wait(10)


# ---------------------------------------------------------------------------------------------
# Kernel messages, read off the page's websocket: which cells were sent, which replied, errors.


def _decode_frame(payload):
    """One kernel websocket frame as (channel, msg dict), for both wire protocols JupyterLab speaks:
    v1.kernel.websocket.jupyter.org (binary: offsets, then channel, header, parent, metadata,
    content, buffers) and the legacy JSON text frames."""
    if isinstance(payload, str):
        msg = json.loads(payload)
        return msg.get("channel"), msg
    n = struct.unpack_from("<Q", payload, 0)[0]
    offsets = struct.unpack_from(f"<{n}Q", payload, 8)
    parts = [payload[offsets[i]:(offsets[i + 1] if i + 1 < n else len(payload))] for i in range(n)]
    channel = parts[0].decode()
    header, parent, _metadata, content = (json.loads(p) for p in parts[1:5])
    return channel, {"header": header, "parent_header": parent, "content": content, "msg_type": header["msg_type"]}


@dataclass
class KernelTraffic:
    """What the page sent to and heard from its kernels (listens from attach() on)."""

    requests: dict = field(default_factory=dict)  # msg_id -> code of each execute_request
    replies: dict = field(default_factory=dict)  # msg_id -> status of its execute_reply
    errors: list = field(default_factory=list)  # "ename: evalue (in: first line of the cell)"
    last_message: float = 0.0
    kernel_ready: bool = False  # a kernel_info_reply came back: the kernel is connected and answering

    def attach(self, page):
        page.on("websocket", self._on_websocket)
        return self

    def _on_websocket(self, ws):
        if "/api/kernels/" in ws.url and "/channels" in ws.url:
            ws.on("framesent", self._on_sent)
            ws.on("framereceived", self._on_received)

    def _on_sent(self, payload):
        try:
            channel, msg = _decode_frame(payload)
        except (ValueError, KeyError, struct.error):
            return
        if msg["msg_type"] == "execute_request":
            self.requests[msg["header"]["msg_id"]] = msg["content"].get("code", "")
        self.last_message = time.monotonic()

    def _on_received(self, payload):
        try:
            channel, msg = _decode_frame(payload)
        except (ValueError, KeyError, struct.error):
            return
        self.last_message = time.monotonic()
        parent = (msg.get("parent_header") or {}).get("msg_id")
        if msg["msg_type"] == "kernel_info_reply":
            self.kernel_ready = True
        elif msg["msg_type"] == "execute_reply":
            self.replies[parent] = msg["content"].get("status")
        elif msg["msg_type"] == "error":
            c = msg["content"]
            code = self.requests.get(parent)
            where = f" (in: {code.strip().splitlines()[0][:80]!r})" if code and code.strip() else " (in a widget callback)"
            self.errors.append(f"{c.get('ename')}: {c.get('evalue')}{where}")

    @property
    def pending(self) -> int:
        return len(set(self.requests) - set(self.replies))


# ---------------------------------------------------------------------------------------------
# The notebook in the page.


def expected_outputs(path: Path) -> dict:
    """From the committed (executed) notebook: non-empty code cells, and the plotly figures and
    widgets its cells display at top level, which a Run All in the browser must draw again."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    outs = [o for c in code for o in c.get("outputs", [])]
    return {
        "code_cells": len(code),
        "figures": sum(PLOTLY_MIME in o.get("data", {}) for o in outs),
        "widgets": sum(WIDGET_VIEW_MIME in o.get("data", {}) for o in outs),
    }


def dialogs(page) -> list:
    """Texts of the modal dialogs open in JupyterLab (a kernel chooser, an error...)."""
    return page.eval_on_selector_all(".jp-Dialog", "els => els.map(e => e.innerText.replace(/\\s+/g, ' ').trim())")


def open_notebook(page, server: LabServer, rel: str, traffic: KernelTraffic, timeout_s: float = 90.0):
    """Open notebooks/`rel` alone (`?reset` drops any saved workspace) and wait until its kernel has
    answered over the websocket and is idle (the toolbar may say idle before a kernel is there)."""
    page.goto(server.url(f"/lab/tree/{rel}", reset=None))
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.wait_for(timeout=timeout_s * 1000)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if dialogs(page):
            raise AssertionError(f"{rel}: a dialog blocks the notebook on opening: {dialogs(page)}")
        idle = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator[data-status='idle']")
        if traffic.kernel_ready and idle.count():
            return panel
        page.wait_for_timeout(250)
    raise AssertionError(f"{rel}: the kernel was not idle {timeout_s:.0f} s after opening")


def click_menu(page, menu: str, item: str):
    """Menu bar `menu`, then the item labelled exactly `item` (Run has two "Run All Cells" lookalikes)."""
    page.locator(".lm-MenuBar-item", has=page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{re.escape(menu)}$"))).click()
    page.locator(".lm-Menu-item:not(.lm-mod-hidden)",
                 has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$"))).click()


def run_all(page, traffic: KernelTraffic, n_code_cells: int, timeout_s: float):
    """Run > Run All Cells, then wait until every code cell was sent and answered (or a cell failed,
    which stops Run All) and the kernel is idle; returns the seconds it took. Waits with
    page.wait_for_timeout, never time.sleep: the websocket listeners run in between."""
    sent_before, replied_before = len(traffic.requests), len(traffic.replies)
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook").click(position={"x": 5, "y": 5})
    page.keyboard.press("Escape")  # command mode: keys go to the notebook, not a cell editor
    click_menu(page, "Run", "Run All Cells")
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    idle = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator[data-status='idle']"
    while time.monotonic() < deadline:
        page.wait_for_timeout(200)
        if dialogs(page):
            raise AssertionError(f"a dialog appeared during Run All: {dialogs(page)}")
        sent = len(traffic.requests) - sent_before
        failed = [st for st in list(traffic.replies.values())[replied_before:] if st != "ok"]
        finished = sent >= n_code_cells or (failed and time.monotonic() - traffic.last_message > 1.0)
        if finished and traffic.pending == 0 and page.locator(idle).count():
            return time.monotonic() - t0
    raise AssertionError(f"Run All did not finish within {timeout_s:.0f} s: {len(traffic.requests) - sent_before} of "
                         f"{n_code_cells} code cells sent, {traffic.pending} of them still running or queued")


_CHECK_JS = r"""
() => {
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
  const top = Array.from(nb.querySelectorAll('.jp-Cell-outputArea > .jp-OutputArea-child > .jp-OutputArea-output'));
  const box = e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const plots = Array.from(nb.querySelectorAll('.jp-RenderedPlotly'));
  // A widget output is a panel holding a widget view, or the manager's placeholder text.
  const widgetOutputs = top.filter(e => e.querySelector(':scope > .jupyter-widgets, :scope > .widget-container, :scope > .widget-box')
      || /^(Loading widget|Error displaying widget)/.test(e.textContent.trim()));
  const bad = [];
  for (const e of nb.querySelectorAll('.jp-OutputArea-output')) {
    const t = e.textContent.trim();
    for (const marker of ['Error displaying widget', 'Loading widget...', 'No renderer could be found', 'Javascript Error']) {
      if (t.startsWith(marker)) bad.push(t.slice(0, 160));
    }
  }
  return {
    plots: plots.length,
    plotsDrawn: plots.filter(p => p.querySelector('.js-plotly-plot .main-svg, .main-svg') && box(p)).length,
    widgets: widgetOutputs.length,
    widgetsDrawn: widgetOutputs.filter(e => { const v = e.querySelector('.jupyter-widgets'); return v && box(v); }).length,
    bad: bad,
    widgetText: top.filter(e => /^(VBox|HBox|Box|interactive|IntSlider|FloatSlider|Dropdown|Output|Tab)\(/.test(e.textContent.trim()))
                   .map(e => e.textContent.trim().slice(0, 80)),
  };
}
"""


def check_outputs(page, expected: dict, traffic: KernelTraffic, settle_s: float = 20.0) -> list:
    """Problems a learner would see after Run All (empty list: all good). Waits up to `settle_s`
    for figures and widgets to finish drawing before reporting them as missing."""
    problems = []
    if traffic.errors:
        problems += [f"error output: {e}" for e in traffic.errors]
    not_ok = {mid: st for mid, st in traffic.replies.items() if st != "ok"}
    if not_ok and not traffic.errors:
        problems.append(f"{len(not_ok)} cells replied {sorted(set(not_ok.values()))}")
    if len(traffic.requests) != expected["code_cells"]:
        problems.append(f"Run All executed {len(traffic.requests)} cells, the notebook has {expected['code_cells']} code cells")
    deadline = time.monotonic() + settle_s
    while True:
        state = page.evaluate(_CHECK_JS)
        drawn = (state["plotsDrawn"] == state["plots"] >= expected["figures"]
                 and state["widgetsDrawn"] == state["widgets"] >= expected["widgets"] and not state["bad"])
        if drawn or time.monotonic() > deadline:
            break
        page.wait_for_timeout(300)
    if state["plots"] < expected["figures"]:
        problems.append(f"{state['plots']} plotly figures in the page, the executed notebook shows {expected['figures']}")
    if state["plotsDrawn"] < state["plots"]:
        problems.append(f"{state['plots'] - state['plotsDrawn']} of {state['plots']} plotly figures not drawn (no .main-svg)")
    if state["widgets"] < expected["widgets"]:
        problems.append(f"{state['widgets']} widgets in the page, the executed notebook shows {expected['widgets']}"
                        + (f"; shown as text instead: {state['widgetText']}" if state["widgetText"] else ""))
    if state["widgetsDrawn"] < state["widgets"]:
        problems.append(f"{state['widgets'] - state['widgetsDrawn']} of {state['widgets']} widgets not rendered")
    problems += [f"output shows: {t!r}" for t in state["bad"]]
    return problems


def screenshot(page, path: Path, max_height: int = 12000):
    """The whole notebook, not only what is in view: the file browser is folded away and the
    viewport made as tall as the notebook's cells (up to `max_height` pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size or VIEWPORT
    try:
        side = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
        if side.count():
            side.first.click()  # clicking the open side panel's tab folds it
        extra = page.evaluate("""() => {
            const outer = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer');
            const cells = outer ? outer.querySelectorAll('.jp-Cell') : [];
            if (!cells.length) return 0;
            outer.scrollTop = 0;
            return Math.ceil(cells[cells.length - 1].getBoundingClientRect().bottom - outer.getBoundingClientRect().bottom + 40);
        }""")
        if extra > 0:
            page.set_viewport_size({"width": size["width"], "height": min(size["height"] + extra, max_height)})
            page.wait_for_timeout(500)  # let plotly's responsive figures settle
        page.screenshot(path=str(path))
    finally:
        page.set_viewport_size(size)


# ---------------------------------------------------------------------------------------------
# Moving one control and watching its cell change (the table is in interactions.py).

# What "the figure changed" and "the text changed" mean: a hash of the drawn plotly SVGs, and of the
# text outputs (stdout, HTML, markdown, HTML widgets) under `root`, the top-level output area of the
# cell that shows the control (or the whole notebook).
_FINGERPRINT_JS = r"""
(root) => {
  const hash = s => { let h = 2166136261; for (let i = 0; i < s.length; i++) { h ^= s.charCodeAt(i); h = Math.imul(h, 16777619); } return (h >>> 0).toString(16); };
  const svgs = Array.from(root.querySelectorAll('.js-plotly-plot .main-svg')).map(e => e.outerHTML);
  const texts = Array.from(root.querySelectorAll('.jp-RenderedText, .jp-RenderedHTMLCommon, .jp-RenderedMarkdown, .jp-RenderedLatex, .widget-html-content'))
      .filter(e => !e.closest('.widget-label, .widget-readout')).map(e => e.innerText);
  return {figure: hash(svgs.join('\n')), figures: svgs.length, text: hash(texts.join('\n')), sample: texts.join(' | ').slice(0, 200)};
}
"""

_CONTROL_CSS = {
    "slider": ".widget-slider",
    "dropdown": ".widget-dropdown",
    "toggle": ".widget-toggle-buttons",
    "checkbox": ".widget-checkbox",
    "text": ".widget-text",
    "button": "button.jupyter-button",
}


def find_control(page, control: str, label: str):
    """The visible control of kind `control` labelled exactly `label` (its description; a button's
    text), in the open notebook's outputs. Raises AssertionError naming what is there instead."""
    if control not in _CONTROL_CSS:
        raise ValueError(f"control must be one of {sorted(_CONTROL_CSS)}; got {control!r}")
    scope = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell-outputArea")
    exact = re.compile(f"^\\s*{re.escape(label)}\\s*$")
    candidates = scope.locator(_CONTROL_CSS[control])
    if control == "button":
        found = candidates.filter(has_text=exact)
    else:
        found = candidates.filter(has=page.locator(".widget-label, .widget-label-basic span", has_text=exact))
    if found.count() == 0:
        there = candidates.evaluate_all(
            "els => els.map(e => (e.querySelector('.widget-label, .widget-label-basic span') || e).textContent.trim())")
        raise AssertionError(f"no {control} labelled {label!r} in the outputs; the {control}s there are labelled {there}")
    return found.first


def _slider_value(control) -> str:
    readout = control.locator(".widget-readout")
    if readout.count():
        return readout.first.inner_text()
    return control.locator(".noUi-handle").first.get_attribute("aria-valuenow") or ""


def move_control(page, control_loc, control: str, value=None) -> str:
    """Change the control as a learner would; returns what was done (for messages)."""
    if control == "slider":
        before = _slider_value(control_loc)
        handle = control_loc.locator(".noUi-handle").first
        for key in ("ArrowRight", "ArrowLeft"):  # ArrowLeft when the slider starts at its maximum
            handle.focus()
            handle.press(key)
            page.wait_for_timeout(300)
            after = _slider_value(control_loc)
            if after != before:
                return f"slider moved from {before} to {after} ({key})"
        raise AssertionError(f"the slider did not move with the arrow keys (value {before})")
    if control == "dropdown":
        select = control_loc.locator("select")
        options = select.locator("option").all_inner_texts()
        current = select.evaluate("s => s.selectedIndex")
        if len(options) < 2:
            raise AssertionError(f"the dropdown has only {options}")
        new = (current + 1) % len(options)
        select.select_option(index=new)
        return f"dropdown changed from {options[current]!r} to {options[new]!r}"
    if control == "toggle":
        buttons = control_loc.locator("button:not(.mod-active)")
        if buttons.count() == 0:
            raise AssertionError("the toggle buttons have no other option to pick")
        text = buttons.first.inner_text()
        buttons.first.click()
        return f"toggled to {text!r}"
    if control == "checkbox":
        box = control_loc.locator("input[type=checkbox]")
        box.click()
        return f"checkbox set to {box.is_checked()}"
    if control == "text":
        box = control_loc.locator("input")
        box.fill(str(value))
        box.press("Enter")
        return f"typed {value!r}"
    if control == "button":
        control_loc.click()
        return "clicked"
    raise ValueError(f"unknown control {control!r}")


def _wait_until_quiet(page, traffic: KernelTraffic, deadline: float):
    """Until the kernel is idle and no message came for a second (or the deadline passes)."""
    idle = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator[data-status='idle']")
    while time.monotonic() < deadline:
        if idle.count() and time.monotonic() - traffic.last_message > 1.0:
            return
        page.wait_for_timeout(200)


def interact(page, traffic: KernelTraffic, move, timeout_s: float = 60.0) -> str:
    """Do the table's `move` (interactions.Move) and wait until the figure or the text it names
    changes. Returns a one-line account; raises AssertionError when it does not change."""
    control_loc = find_control(page, move.control, move.label)
    control_loc.scroll_into_view_if_needed()
    if move.scope == "cell":
        root = control_loc.locator("xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' jp-Cell-outputArea ')][1]")
    else:
        root = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook")
    before = root.evaluate(_FINGERPRINT_JS)
    if move.changes == "figure" and before["figures"] == 0:
        raise AssertionError(f"{move.describe()}: no drawn plotly figure in the {move.scope} to watch")
    errors_before = len(traffic.errors)
    done = move_control(page, control_loc, move.control, move.value)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page.wait_for_timeout(300)
        now = root.evaluate(_FINGERPRINT_JS)
        if len(traffic.errors) > errors_before:
            raise AssertionError(f"{move.describe()}: {done}, and the callback failed: {traffic.errors[errors_before:]}")
        if now[move.changes] != before[move.changes] and (move.changes != "figure" or now["figures"] > 0):
            _wait_until_quiet(page, traffic, deadline)  # let the callback finish: a later step may fail
            if len(traffic.errors) > errors_before:
                raise AssertionError(f"{move.describe()}: {done}, and the callback failed: {traffic.errors[errors_before:]}")
            return f"{move.describe()}: {done}; the {move.changes} changed"
    raise AssertionError(f"{move.describe()}: {done}, but the {move.changes} in the {move.scope} did not change "
                         f"within {timeout_s:.0f} s (text: {now['sample']!r})")
