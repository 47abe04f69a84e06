"""The first minutes in JupyterLab, with the settings `make lab` uses (jupyter/ on JUPYTER_CONFIG_PATH):
it opens on the start-here notebook, no news pop-up, and widget state is saved with the notebook."""
from __future__ import annotations

from . import lab_driver
from .lab_driver import NOTEBOOKS_ROOT, record_screenshot

START_HERE = "00_start_here.ipynb"


def _plugin_defaults(lab, plugin: str) -> dict:
    """The plugin's settings defaults as the server sends them (overrides applied)."""
    schema = lab.api(f"/lab/api/settings/{plugin}")["schema"]
    return {k: v.get("default") for k, v in schema["properties"].items()}


def test_settings_overrides_are_served(lab):
    notes = _plugin_defaults(lab, "@jupyterlab/apputils-extension:notification")
    assert notes["fetchNews"] == "false" and notes["checkForUpdates"] is False, notes
    assert _plugin_defaults(lab, "@jupyter-widgets/jupyterlab-manager:plugin")["saveState"] is True
    assert _plugin_defaults(lab, "@jupyterlab/notebook-extension:tracker")["autoStartDefaultKernel"] is True


def test_opens_on_start_here_without_pop_ups(lab, page, artifacts):
    assert (NOTEBOOKS_ROOT / START_HERE).exists(), (
        f"notebooks/{START_HERE} is missing, and jupyter/jupyter_server_config.json opens JupyterLab on it")
    page.goto(lab.url("/"))  # what the learner's browser opens: the server's default URL
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)").wait_for(timeout=90_000)
    assert page.url.split("?")[0].endswith(f"/lab/tree/{START_HERE}"), page.url
    tab = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current").inner_text()
    assert START_HERE in tab, f"the open tab is {tab!r}"
    # Without the overrides the news question shows as a toast about 2 s after start-up (seen here).
    page.wait_for_timeout(3000)
    toasts = page.locator(".Toastify__toast").all_inner_texts()
    shot = artifacts / "first-start.png"
    page.screenshot(path=str(shot))
    record_screenshot(shot)
    assert not toasts, f"pop-ups on start: {toasts} (screenshot {shot})"
    assert not lab_driver.dialogs(page), f"a dialog is open on start: {lab_driver.dialogs(page)}"


def test_widget_state_is_saved_with_the_notebook(browser, tmp_path, artifacts):
    """Save a notebook after moving a slider: the file keeps the widget state (saveState), so the
    saved notebook shows the widget instead of "VBox(...)" text. A scratch server on a scratch
    folder, since the test must write the notebook."""
    import nbformat

    root = tmp_path / "notebooks"
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('import ipywidgets\nipywidgets.IntSlider(value=0, max=5, description="x")')]
    nbformat.write(nb, root / "scratch.ipynb")

    server = lab_driver.LabServer(root, tmp_path / "jupyter", artifacts / "jupyterlab-save-state.log")
    context = None
    try:
        server.start()
        context = browser.new_context(viewport=lab_driver.VIEWPORT)
        page = context.new_page()
        traffic = lab_driver.KernelTraffic().attach(page)
        lab_driver.open_notebook(page, server, "scratch.ipynb", traffic)
        lab_driver.run_all(page, traffic, 1, 60)
        slider = lab_driver.find_control(page, "slider", "x")
        lab_driver.move_control(page, slider, "slider")
        lab_driver.click_menu(page, "File", "Save Notebook")
        for _ in range(50):  # the save is asynchronous: poll the file for up to 10 s
            page.wait_for_timeout(200)
            saved = nbformat.read(root / "scratch.ipynb", as_version=4)
            state = saved.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
            values = [m["state"].get("value") for m in state.values() if m.get("model_name") == "IntSliderModel"]
            if values:
                break
        assert values == [1], f"widget state saved in the notebook: slider values {values} (expected [1])"
    finally:
        if context is not None:
            context.close()
        server.stop()
