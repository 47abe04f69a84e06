"""flashkit.measure.provenance: what every results file records about where it was measured."""
import re

import pytest

from flashkit.measure import provenance


def test_commit_in_this_checkout(monkeypatch):
    monkeypatch.delenv("FLASHKIT_COMMIT", raising=False)
    c = provenance.commit()
    assert re.fullmatch(r"[0-9a-f]{40}", c["commit"]) and c["dirty"] in (True, False)
    assert provenance.commit_label().split("-")[0] == c["commit"]


@pytest.mark.parametrize("env,expected", [(None, "unknown"), ("0123abc", "0123abc")])
def test_commit_outside_a_checkout_reads_the_environment(tmp_path, monkeypatch, env, expected):
    monkeypatch.setattr(provenance, "PACKAGE", tmp_path)  # no git repository at or above tmp_path's copy
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    if env is None:
        monkeypatch.delenv("FLASHKIT_COMMIT", raising=False)
    else:
        monkeypatch.setenv("FLASHKIT_COMMIT", env)
    assert provenance.commit() == {"commit": expected, "dirty": None}
    assert provenance.commit_label() == (None if env is None else env)


def test_the_environment_wins_inside_another_checkout(monkeypatch):
    """A tree copied into another checkout (the device tool's .gpu_sync/<name>) names its own commit."""
    monkeypatch.setenv("FLASHKIT_COMMIT", "feedbeef")
    assert provenance.commit() == {"commit": "feedbeef", "dirty": None}


def test_machine_versions_load_and_blas():
    info = provenance.cpu_info()
    assert info["cores"] >= 1 and info["cpu"]
    slug = provenance.machine_slug(info)
    assert re.fullmatch(r"[a-z0-9-]+", slug) and slug.endswith(f"{info['cores']}c")
    v = provenance.versions("numpy", "no-such-distribution")
    assert v["numpy"] and v["no-such-distribution"] is None and v["python"].count(".") == 2
    load = provenance.load_average()
    assert load is None or (len(load) == 3 and all(x >= 0 for x in load))
    blas = provenance.blas_info()
    assert blas and all(b["user_api"] == "blas" and "architecture" in b and b["file"] for b in blas)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", provenance.now_utc())
