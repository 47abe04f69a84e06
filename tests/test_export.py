"""flashkit.measure.export: JSON and CSV with their provenance, written atomically; the text table."""
import csv
import io
import json
import os

import pytest

import flashkit
from flashkit.measure import export
from flashkit.measure import sweep as sweeps


# --- exports --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rows():
    return list(sweeps.sweep(backends=["numpy-standard"], N=[16], d=[8], heads=[1], causal=[False, True],
                             repeats=3, warmup=0, seconds_per_point=0.01))


def test_write_json_structure(tmp_path, rows):
    path = export.write_json(rows, tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "results"}
    assert data["results"] == rows
    meta = data["meta"]
    assert {"created", "commit", "info", "load_average", "blas"} <= set(meta)
    assert meta["info"]["flashkit"] == flashkit.info()["flashkit"] and "numpy" in meta["info"]["versions"]
    assert meta["commit"] is None or len(meta["commit"].split("-")[0]) == 40


def test_write_csv_is_one_plain_table(tmp_path, rows):
    path = export.write_csv(rows, tmp_path / "r.csv")
    table = list(csv.DictReader(io.StringIO(path.read_text())))
    assert len(table) == len(rows)
    assert list(table[0])[: len(sweeps.COLUMNS)] == list(sweeps.COLUMNS)
    assert {"flashkit", "numpy", "commit"} <= set(table[0])
    assert float(table[0]["ms"]) == pytest.approx(rows[0]["ms"])
    assert table[1]["causal"] == "True"


def test_metadata_records_the_sweep():
    spec = sweeps.Sweep(backends=["numpy-standard"], N=[16], d=[8])
    meta = export.metadata(spec)
    assert meta["sweep"]["N"] == (16,) and meta["sweep"]["backends"] == ("numpy-standard",)
    json.dumps(meta, default=list)


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    export.write_atomic(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        export.write_atomic(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_atomic_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export.write_atomic(tmp_path / "nope" / "x.json", "{}")


def test_format_table_lists_every_row(rows):
    text = export.format_table(rows).splitlines()
    assert len(text) == 2 + len(rows)
    assert text[0].split()[:2] == ["backend", "B"]
    assert all("numpy-standard" in line for line in text[2:])
