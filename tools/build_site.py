"""Build a static site of the executed notebooks: one HTML page each and an index in series order.

    python tools/build_site.py                       # notebooks/ -> site/
    python tools/build_site.py --out /tmp/site notebooks/01_standard_attention.ipynb

Nothing is re-executed: the notebooks are committed executed, so the pages show exactly what the
learner sees after "Run All". Two kinds of outputs need help to read well in a static page:

- Plotly figures are stored as `application/vnd.plotly.v1+json` (the plotly_mimetype renderer), which
  nbconvert drops. Each becomes a small `Plotly.newPlot` call on one shared `plotly.min.js` copied next
  to the pages from the installed plotly package, so the figures stay interactive with no network
  (no CDN): 4.8 MB once for the site instead of once per page.
- ipywidgets need a live kernel. A widget output becomes a note naming its controls, followed by what
  its Output widgets showed when the notebook was executed (kept in the notebook's widget state),
  so the figure a slider drives is still on the page. No widget JavaScript is loaded from a CDN.

- Formulas ($...$ in markdown) are typeset by MathJax 2, whose files come from the installed
  jupyter-server-mathjax package (a dependency of the notebooks extra) and are copied into the site's
  mathjax/ folder once: pages load it by a relative path, so formulas render with no network. MathJax
  draws with its STIX web fonts where the browser loads them and with the system's fonts otherwise.
- Links between notebooks (`03_tiling.ipynb`) and to the glossary (`glossary.md`, rendered as a page
  of the site) are rewritten to the pages (`03_tiling.html`, `glossary.html`), anchors kept.

The site is built in a temporary folder next to --out and swapped in at the end, so a failed build
never leaves half a site.
"""
from __future__ import annotations

import argparse
import copy
import html
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from flashkit.atomic import write_text

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE_KEY = "application/vnd.jupyter.widget-state+json"
PLOTLY_JS = "plotly.min.js"
MATHJAX_DIR = "mathjax"  # the site's copy of MathJax 2 (from jupyter-server-mathjax)
GLOSSARY = "glossary.md"  # in the notebooks folder; rendered as glossary.html

# The page template: nbconvert's lab template with plotly.min.js (local) in place of require.js,
# no widget manager from a CDN, and a navigation bar (index, previous, next).
PAGE_TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}
<script src="{{ resources.flashkit.plotly_js }}"></script>
{%- endblock html_head_js_requirejs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}
{%- if resources.flashkit.math -%}{{ resources.flashkit.mathjax_html }}{%- endif -%}
{%- endblock html_head_js_mathjax -%}
{% block extra_css %}
<style type="text/css">
.flashkit-nav { display: flex; gap: 1.5em; padding: 0.6em 1em; border-bottom: 1px solid var(--jp-border-color1);
  font-family: var(--jp-ui-font-family); font-size: var(--jp-ui-font-size1); }
.flashkit-nav a { color: var(--jp-content-link-color); text-decoration: none; }
.flashkit-widget-note { border-left: 3px solid var(--jp-brand-color1); padding: 0.3em 0.8em; margin: 0.3em 0;
  font-family: var(--jp-ui-font-family); color: var(--jp-content-font-color2); }
</style>
{% endblock extra_css %}
{%- block body_header -%}
{{ super() }}
<nav class="flashkit-nav">
  <a href="{{ resources.flashkit.index }}">&#8962; all notebooks</a>
  {% if resources.flashkit.prev %}<a href="{{ resources.flashkit.prev[0] }}">&larr; {{ resources.flashkit.prev[1] | e }}</a>{% endif %}
  {% if resources.flashkit.next %}<a href="{{ resources.flashkit.next[0] }}">{{ resources.flashkit.next[1] | e }} &rarr;</a>{% endif %}
</nav>
{%- endblock body_header -%}
"""


# MathJax 2 from the site's own folder: the configuration (TeX in $...$ and $$...$$ as in JupyterLab,
# HTML-CSS output with the STIX web fonts the package ships) comes before MathJax.js, which reads it.
MATHJAX_HTML = """<script type="text/x-mathjax-config">
MathJax.Hub.Config({{
  tex2jax: {{inlineMath: [["$", "$"], ["\\\\(", "\\\\)"]], displayMath: [["$$", "$$"], ["\\\\[", "\\\\]"]],
            processEscapes: true, processEnvironments: true}},
  "HTML-CSS": {{availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null,
               linebreaks: {{automatic: true}}}},
  messageStyle: "none"
}});
</script>
<script type="text/javascript" src="{src}/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"></script>"""


def mathjax_source() -> Path:
    """The MathJax 2 files of the installed jupyter-server-mathjax package."""
    try:
        import jupyter_server_mathjax
    except ImportError as exc:
        raise RuntimeError("the site's formulas need jupyter-server-mathjax (MathJax's files, in flashkit's "
                           "notebooks extra: pip install -e '.[notebooks]')") from exc
    return Path(jupyter_server_mathjax.__file__).parent / "static"


def copy_mathjax(dest: Path) -> None:
    """Copy MathJax into dest, leaving out the translations of its menus but English."""
    src = mathjax_source()
    shutil.copytree(src, dest, ignore=lambda folder, names: [
        n for n in names if Path(folder) == src / "localization" and n != "en"])


# href="X.ipynb" or "X.md" (a relative path, optionally with #anchor) in a page: the site's page for it
_LOCAL_LINK = re.compile(r'href="(?![a-z]+:|#|/)([^"#]*?)\.(ipynb|md)(#[^"]*)?"')


def rewrite_links(body: str, pages: set, page: str) -> str:
    """Links to notebooks and to the glossary that are pages of this site lead to those pages."""
    def swap(m):
        target = (Path(page).parent / f"{m.group(1)}.html").as_posix()
        target = os.path.normpath(target)
        if target not in pages:
            return m.group(0)
        return f'href="{m.group(1)}.html{m.group(3) or ""}"'
    return _LOCAL_LINK.sub(swap, body)


def render_markdown_page(markdown: str, title: str, index_href: str) -> str:
    """A markdown file as a plain page (the glossary), its headings with JupyterLab's ids."""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{html.escape(title)}</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 52em; margin: 2em auto; padding: 0 1em; line-height: 1.5; }}
.anchor-link {{ display: none; }}
@media (prefers-color-scheme: dark) {{ body {{ background: #111; color: #ddd; }} a {{ color: #8ab4f8; }} }}</style>
</head>
<body>
<p><a href="{html.escape(index_href)}">&#8962; all notebooks</a></p>
{markdown2html_mistune(markdown)}
</body>
</html>
"""


def find_notebooks(root: Path) -> list:
    """Every .ipynb under `root` in series order: by path, so 00_... 10_... come first and
    exercises/ (a folder, sorted after the digits) after them; checkpoints are skipped."""
    paths = [p for p in root.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts]
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def title_and_promise(nb) -> tuple:
    """The first markdown heading (the notebook's title) and the paragraph after it (its promise)."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.strip().splitlines()
        if not lines or not lines[0].startswith("#"):
            continue
        title = lines[0].lstrip("#").strip()
        rest = "\n".join(lines[1:]).strip()
        promise = rest.split("\n\n")[0].strip() if rest else ""
        return title, promise
    return None, ""


def plotly_html(figure: dict, div_id: str) -> str:
    """A div and the script that draws `figure` (a plotly JSON dict) into it with the page's Plotly."""
    # "</" inside a <script> would end it early; "<\/" is the same string to JavaScript.
    fig_json = json.dumps(figure, separators=(",", ":")).replace("</", "<\\/")
    return (
        f'<div id="{div_id}" class="flashkit-plotly"></div>\n'
        '<script type="text/javascript">\n'
        "(function () {\n"
        f"  var fig = {fig_json};\n"
        f'  var el = document.getElementById("{div_id}");\n'
        "  var config = Object.assign({responsive: true}, fig.config || {});\n"
        "  Plotly.newPlot(el, fig.data || [], fig.layout || {}, config).then(function () {\n"
        "    if (fig.frames) { return Plotly.addFrames(el, fig.frames); }\n"
        "  });\n"
        "})();\n"
        "</script>"
    )


def _widget_models(state: dict, model_id: str, seen=None):
    """The model `model_id` and every model under it through `children` (Box, VBox, HBox, Tab...)."""
    seen = set() if seen is None else seen
    if model_id in seen or model_id not in state:
        return
    seen.add(model_id)
    model = state[model_id]
    yield model
    for child in model.get("state", {}).get("children", []) or []:
        if isinstance(child, str) and child.startswith("IPY_MODEL_"):
            yield from _widget_models(state, child[len("IPY_MODEL_"):], seen)


def _control_summary(model: dict) -> str | None:
    """'block = 0 (IntSlider)' for a control with a description, None for layout boxes and outputs."""
    s = model.get("state", {})
    name = model.get("model_name", "").removesuffix("Model")
    if name in ("VBox", "HBox", "Box", "GridBox", "Output", "Layout", "Link", "DirectionalLink") or name.endswith("Style"):
        return None
    label = s.get("description") or s.get("tooltip") or ""
    if "value" in s:
        return f"{label} = {s['value']!r} ({name})" if label else f"{name} = {s['value']!r}"
    return f"{label} ({name})" if label else name


class _PageBuilder:
    """Rewrites one notebook's outputs for a static page (see the module docstring)."""

    def __init__(self, nb):
        self.nb = nb
        self.widget_state = nb.metadata.get("widgets", {}).get(WIDGET_STATE_KEY, {}).get("state", {})
        self.n_plots = 0
        self.n_widgets = 0

    def rewrite(self):
        for cell in self.nb.cells:
            if cell.cell_type == "code":
                cell.outputs = self._outputs(cell.get("outputs", []))
        # The widget state would make the template load the widget manager from a CDN.
        self.nb.metadata.pop("widgets", None)
        return self.nb

    def _outputs(self, outputs) -> list:
        new = []
        for out in outputs:
            data = out.get("data", {})
            if PLOTLY_MIME in data:
                self.n_plots += 1
                out = copy.deepcopy(out)
                out["data"] = {"text/html": plotly_html(data[PLOTLY_MIME], f"flashkit-plot-{self.n_plots}")}
                new.append(out)
            elif WIDGET_VIEW_MIME in data:
                new.extend(self._widget(out, data[WIDGET_VIEW_MIME].get("model_id", "")))
            else:
                new.append(out)
        return new

    def _widget(self, out, model_id) -> list:
        """A note naming the controls, then what the widget's Output areas showed when executed."""
        self.n_widgets += 1
        models = list(_widget_models(self.widget_state, model_id))
        controls = [c for c in map(_control_summary, models) if c]
        what = "; ".join(controls) if controls else "interactive widget"
        note = (
            '<div class="flashkit-widget-note">Interactive controls in the notebook: '
            f"<b>{html.escape(what)}</b>. Open the notebook in JupyterLab (<code>make lab</code>) "
            "to use them; below is what they showed when the notebook was executed.</div>"
        )
        shown = [{"output_type": "display_data", "metadata": {}, "data": {"text/html": note}}]
        for model in models:
            if model.get("model_name") == "OutputModel":
                shown.extend(self._outputs(model.get("state", {}).get("outputs", [])))
        return [_as_output(o) for o in shown]


def _as_output(out):
    import nbformat

    return out if isinstance(out, nbformat.NotebookNode) else nbformat.from_dict(out)


# LaTeX delimiters in markdown: $...$, $$...$$, \(...\), \[...\], \begin{...}.
_MATH = re.compile(r"\$|\\\(|\\\[|\\begin\{")


def _has_math(nb) -> bool:
    return any(cell.cell_type == "markdown" and _MATH.search(cell.source) for cell in nb.cells)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, text: str) -> None:
    write_text(path, text, make_parents=True)


def _relative(target: str, page: str) -> str:
    """The URL of `target` (a path under the site root) as seen from `page` (another one)."""
    return Path(os.path.relpath(target, Path(page).parent)).as_posix()


def render_index(entries: list, glossary: bool = False) -> str:
    """The index page: the notebooks in series order with their titles and promises (and a link to the
    glossary page when the site has one)."""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    items = []
    for e in entries:
        promise = markdown2html_mistune(e["promise"]) if e["promise"] else ""
        items.append(
            f'<li><a href="{html.escape(e["href"])}">{html.escape(e["title"])}</a>'
            f'<span class="file">{html.escape(e["source"])}</span>{promise}</li>'
        )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>flashkit notebooks</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 52em; margin: 2em auto; padding: 0 1em; line-height: 1.5; }}
ul.series {{ list-style: none; padding-left: 0; }} li {{ margin-bottom: 1.2em; }}
li > a {{ font-size: 1.15em; font-weight: 600; }}
.file {{ margin-left: 0.8em; color: #888; font-family: monospace; font-size: 0.9em; }}
li p {{ margin: 0.3em 0 0 0; }}
@media (prefers-color-scheme: dark) {{ body {{ background: #111; color: #ddd; }} a {{ color: #8ab4f8; }} }}
</style>
</head>
<body>
<h1>flashkit notebooks</h1>
<p>Exact attention computed tile by tile with an online softmax (FlashAttention), every claim measured.
These pages show the notebooks as executed; figures are interactive (zoom, hover) with no network.
To run them and use the sliders: <code>make lab</code>.{' The names they share are in the <a href="glossary.html">glossary</a>.' if glossary else ''}</p>
<ul class="series">
{chr(10).join(items)}
</ul>
</body>
</html>
"""


def build_site(notebooks: list, out: Path, root: Path, log=print) -> dict:
    """Write one page per notebook (in the given order) and index.html into `out`, replacing it.
    `root` is the folder the notebooks' relative paths (and so the pages' paths) are taken from.
    Returns {"index": path, "pages": [paths], "plots": n, "widgets": n}."""
    import jinja2
    import nbformat
    import plotly.offline
    from nbconvert import HTMLExporter

    if not notebooks:
        raise ValueError("notebooks: no notebook to build a site from")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        loaded = []
        for path in notebooks:
            path = Path(path).resolve()
            rel = path.relative_to(Path(root).resolve()).with_suffix(".html").as_posix()
            nb = nbformat.read(path, as_version=4)
            title, promise = title_and_promise(nb)
            loaded.append(dict(path=path, nb=nb, href=rel, title=title or path.stem, promise=promise,
                               source=path.relative_to(Path(root).resolve()).as_posix()))

        exporter = HTMLExporter(
            template_name="lab",
            template_file="flashkit_page.html.j2",
            extra_loaders=[jinja2.DictLoader({"flashkit_page.html.j2": PAGE_TEMPLATE})],
        )
        totals = {"plots": 0, "widgets": 0}
        pages = []
        glossary = Path(root) / GLOSSARY
        site_pages = {e["href"] for e in loaded} | ({"glossary.html"} if glossary.is_file() else set())
        for i, entry in enumerate(loaded):
            builder = _PageBuilder(copy.deepcopy(entry["nb"]))
            nb = builder.rewrite()
            nb.metadata["title"] = entry["title"]
            page = entry["href"]
            links = {
                "plotly_js": _relative(PLOTLY_JS, page),
                "math": _has_math(entry["nb"]),
                "mathjax_html": MATHJAX_HTML.format(src=_relative(MATHJAX_DIR, page)),
                "index": _relative("index.html", page),
                "prev": (_relative(loaded[i - 1]["href"], page), loaded[i - 1]["title"]) if i > 0 else None,
                "next": (_relative(loaded[i + 1]["href"], page), loaded[i + 1]["title"]) if i + 1 < len(loaded) else None,
            }
            body, _ = exporter.from_notebook_node(nb, resources={"flashkit": links})
            _atomic_write(staging / page, rewrite_links(body, site_pages, page))
            totals["plots"] += builder.n_plots
            totals["widgets"] += builder.n_widgets
            pages.append(out / page)
            log(f"  {entry['source']}: {builder.n_plots} figures, {builder.n_widgets} widgets -> {out / page}")

        _atomic_write(staging / PLOTLY_JS, plotly.offline.get_plotlyjs())
        _atomic_write(staging / "index.html", rewrite_links(render_index(loaded, glossary.is_file()), site_pages, "index.html"))
        if any(_has_math(e["nb"]) for e in loaded):
            copy_mathjax(staging / MATHJAX_DIR)
        if glossary.is_file():
            _atomic_write(staging / "glossary.html", rewrite_links(
                render_markdown_page(glossary.read_text(), "Glossary", "index.html"), site_pages, "glossary.html"))

        # Swap the finished site in: the old one (if any) is moved aside first, then removed.
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "site")
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"index": out / "index.html", "pages": pages, **totals}


def main(argv=None) -> int:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to include (default: every notebook under --root, in series order)")
    parser.add_argument("--root", type=Path, default=repo / "notebooks",
                        help="the notebooks folder; page paths mirror paths under it (default: notebooks/)")
    parser.add_argument("--out", type=Path, default=repo / "site", help="output folder (default: site/)")
    args = parser.parse_args(argv)

    root = args.root.resolve()
    if not root.is_dir():
        parser.error(f"--root: {root} is not a folder")
    notebooks = [p.resolve() for p in args.notebooks] or find_notebooks(root)
    if not notebooks:
        parser.error(f"no notebooks found under {root}")
    for p in notebooks:
        if not p.is_file():
            parser.error(f"notebooks: {p} is not a file")
        if root not in p.parents:
            parser.error(f"notebooks: {p} is not under --root {root}")
    print(f"Building the site of {len(notebooks)} notebooks into {args.out}/")
    result = build_site(notebooks, args.out, root)
    print(f"{result['plots']} figures, {result['widgets']} widgets; open {result['index']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
