"""The README's generated sections are current and its API example runs as printed."""
import re
from pathlib import Path

from benchmarks import report

README = Path(__file__).resolve().parents[1] / "README.md"


def test_generated_sections_are_current():
    text = README.read_text()
    assert report.render(text) == text, "README.md is out of date: run `python -m benchmarks.report`"


def test_api_example_runs(capsys):
    block = re.search(r"## The API in ten lines\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    err = float(capsys.readouterr().out.split()[0])
    assert err < 1e-5
