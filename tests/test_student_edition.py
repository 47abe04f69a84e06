"""tools/make_student.py and the student edition it builds: stubs in place of solutions, check cells
kept, and every stub failing its check with a helpful message while nothing else breaks."""
import importlib.util
import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ROOT / "notebooks" / "exercises"


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_student", ROOT / "tools" / "make_student.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_student = _load_tool()


def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def test_stub_replaces_the_region_with_the_function_name_and_indentation():
    src = ("def f(x):\n    \"\"\"Doc.\"\"\"\n    ### BEGIN SOLUTION\n    y = x + 1\n    return y\n    ### END SOLUTION\n"
           "\n# NBVAL_CHECK_OUTPUT\nprint(f(1))")
    out = make_student.stub_source(src)
    assert out == ('def f(x):\n    """Doc."""\n    # YOUR CODE HERE\n'
                   '    raise NotImplementedError("write the body of `f`, then run the check below")\n\nprint(f(1))')
    assert make_student.stub_source("A\n### BEGIN SOLUTION\nsecret\n### END SOLUTION", "markdown") == "A\nYOUR ANSWER HERE"
    assert make_student.stub_source("no markers\n# NBVAL_CHECK_OUTPUT", "markdown") == "no markers\n# NBVAL_CHECK_OUTPUT"


@pytest.mark.parametrize("src, message", [
    ("### BEGIN SOLUTION\nx", "without an ### END SOLUTION"),
    ("x\n### END SOLUTION", "without a ### BEGIN SOLUTION"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another"),
])
def test_unbalanced_markers_are_refused(src, message):
    with pytest.raises(ValueError, match=message):
        make_student.stub_source(src, where="nb, cell 3")


def test_the_solution_notebooks_are_marked_and_pass_their_checks():
    notebooks = sorted(EXERCISES.glob("*.ipynb"))
    assert len(notebooks) >= 4
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        solutions = [c for c in nb.cells if "solution" in tags(c)]
        checkers = [c for c in nb.cells if "checker" in tags(c)]
        assert solutions and checkers, path.name
        assert all("### BEGIN SOLUTION" in c.source and "### END SOLUTION" in c.source for c in solutions), path.name
        for c in checkers:  # executed with the solutions: every check printed its pass line
            text = "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")
            assert text.startswith("✓"), f"{path.name}: check cell output {text!r}"


def test_student_edition_builds_and_its_stubs_fail_their_checks(tmp_path):
    from nbclient import NotebookClient

    written = make_student.build(EXERCISES, tmp_path)
    assert [p.name for p in written] == sorted(p.name for p in EXERCISES.glob("*.ipynb"))
    for path in written:
        solution = nbformat.read(EXERCISES / path.name, as_version=4)
        nb = nbformat.read(path, as_version=4)
        assert len(nb.cells) == len(solution.cells), path.name
        for sc, c in zip(solution.cells, nb.cells):
            assert "### BEGIN SOLUTION" not in c.source and "### END SOLUTION" not in c.source
            assert "NBVAL_" not in c.source
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None
            if "solution" in tags(sc):  # the solution's own lines are gone, the stub is there
                body = sc.source.split("### BEGIN SOLUTION")[1].split("### END SOLUTION")[0]
                hidden = [line.strip() for line in body.splitlines() if line.strip() and line.strip() not in c.source]
                assert hidden, f"{path.name}: the solution body leaked into the student edition"
                assert "raise NotImplementedError(" in c.source
            else:
                assert tags(c) == tags(sc)

        # Run the student notebook as a learner would, errors allowed, and look at every cell.
        NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
        for k, c in enumerate(nb.cells):
            if c.cell_type != "code":
                continue
            errors = [o for o in c.outputs if o.output_type == "error"]
            if "checker" in tags(c):
                assert len(errors) == 1, f"{path.name} cell {k}: a check of a stub must fail"
                assert errors[0].ename == "ExerciseError", f"{path.name} cell {k}: {errors[0].ename}: {errors[0].evalue}"
                assert "is still a stub" in errors[0].evalue and "NotImplementedError" in errors[0].evalue, errors[0].evalue
            else:
                assert not errors, f"{path.name} cell {k} broke in the student edition: " + \
                    "; ".join(f"{e.ename}: {e.evalue}" for e in errors)


def test_time_notebooks_records_times_errors_and_the_missing_series(tmp_path):
    spec = importlib.util.spec_from_file_location("time_notebooks", ROOT / "tools" / "time_notebooks.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name, source in (("00_ok.ipynb", "x = 1 + 1"), ("03_broken.ipynb", "1 / 0")):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
        nbformat.write(nb, folder / name)
    workshop = tmp_path / "WORKSHOP.md"
    workshop.write_text(f"intro\n{tool.AGENDA_BEGIN}\n| time | block | notebooks | run |\n|---|---|---|---|\n"
                        f"| 0:00 | start | `00_ok`, `01_gone` | old |\n| 0:10 | break | | |\n{tool.AGENDA_END}\n"
                        f"{tool.BEGIN}\nold table\n{tool.END}\nafter\n")
    out = tmp_path / "times.json"
    rc = tool.main(["--notebooks", str(folder), "--out", str(out), "--timeout", "60", "--workshop", str(workshop)])
    assert rc == 1  # one notebook failed
    import json

    results = json.loads(out.read_text())
    by_name = {Path(r["path"]).name: r for r in results["notebooks"]}
    ok = by_name["00_ok.ipynb"]
    assert ok["status"] == "ok" and ok["seconds"] > 0 and ok["cells_seconds"] >= 0
    assert abs(ok["seconds"] - ok["kernel_start_seconds"] - ok["cells_seconds"]) < 0.02
    assert ok["wall_seconds"] >= ok["cells_seconds"]
    assert by_name["03_broken.ipynb"]["status"] == "errors" and "ZeroDivisionError" in by_name["03_broken.ipynb"]["errors"][0]
    assert results["missing_series"] == ["01", "02", "04", "05", "06", "07", "08", "09", "10", "11", "12", "13", "14"]
    text = workshop.read_text()
    assert "old table" not in text and "`notebooks/00_ok.ipynb`" in text and text.endswith("after\n")
    ok_seconds = by_name["00_ok.ipynb"]["seconds"]
    assert f"| 0:00 | start | `00_ok`, `01_gone` | {ok_seconds:.0f} s, not measured: 01_gone |" in text
    assert "| 0:10 | break | |  |" in text and "Run time of every notebook in the agenda" in text
    tool.update_workshop(workshop, "table again", results)  # filling twice keeps one summary line
    assert workshop.read_text().count("Run time of every notebook in the agenda") == 1
    assert tool.main(["--workshop", str(workshop), "--from-results", str(out)]) == 0  # no re-run
    assert workshop.read_text() == text
    assert nbformat.read(folder / "00_ok.ipynb", as_version=4).cells[0].outputs == []  # files not modified


def test_the_editions_links_resolve_inside_it(tmp_path):
    """`make lab-student` serves only the edition's folder: every relative link of its notebooks names a
    file there (the glossary is copied beside them; links to the series become their repository paths)."""
    out = tmp_path / "student"
    make_student.build(ROOT / "notebooks" / "exercises", out)
    assert (out / "glossary.md").is_file()
    bad = []
    for path in sorted(out.glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "markdown":
                continue
            for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", "".join(cell["source"])):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue
                if not (out / target.partition("#")[0]).is_file():
                    bad.append(f"{path.name}: {target}")
    assert not bad, bad
