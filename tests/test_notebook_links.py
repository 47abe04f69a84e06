"""Links in the notebooks' markdown lead somewhere: every relative link names a file of the repository,
and every link into the glossary names one of its sections (JupyterLab gives a heading the id of its
text with spaces as hyphens, e.g. `glossary.md#Tiles`)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
GLOSSARY = ROOT / "notebooks" / "glossary.md"


def heading_ids(markdown: str) -> set:
    """The headings' ids and the entries' own anchors (`<a id="lse"></a>`)."""
    headings = {line.lstrip("#").strip().replace(" ", "-") for line in markdown.splitlines() if line.startswith("#")}
    return headings | set(re.findall(r'<a id="([^"]+)"></a>', markdown))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.relative_to(ROOT / "notebooks").as_posix() for p in NOTEBOOKS])
def test_relative_links_resolve(path):
    sections = heading_ids(GLOSSARY.read_text())
    bad = []
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        for target in LINK.findall("".join(cell["source"])):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same notebook
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve()
            if not resolved.exists():
                bad.append(f"cell {i}: {target} (no such file)")
            elif anchor and resolved == GLOSSARY.resolve() and anchor not in sections:
                bad.append(f"cell {i}: {target} (the glossary has no section {anchor!r}; it has {sorted(sections)})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", ["00_start_here", "01_standard_attention", "02_online_softmax", "03_tiling",
                                  "06_simd_numba", "08_live_benchmarks", "09_masks_and_gqa",
                                  "10_attention_in_a_model", "11_backward", "12_training", "13_variants"])
def test_terms_link_to_the_glossary_where_first_used(name):
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert re.search(r"\]\(glossary\.md#[\w-]+\)", text), f"{name} links no term to a glossary section"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.relative_to(ROOT / "notebooks").as_posix() for p in NOTEBOOKS])
def test_titles_are_numbered_as_their_files(path):
    """Every title carries its file's number: '# 4. Memory' in 04_memory, '# Exercise 2: ...' in
    exercises/02_..., so the index, the tabs and the series agree."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]
    title = "".join(cells[0]["source"]).splitlines()[0]
    number = int(path.name.split("_")[0])
    expected = f"# Exercise {number}: " if path.parent.name == "exercises" else f"# {number}. "
    assert title.startswith(expected), f"{path.name}: title {title!r} should start with {expected!r}"
