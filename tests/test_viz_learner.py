"""What notebooks 04, 05 and 07 added for the learner: the mma fragment layout and its emulation, the IO
explorer's second panel and the measured block sweep, the memory explorer, glossary links that resolve."""
import re
from pathlib import Path

import numpy as np
import pytest

from flashkit.measure import gpu_results
from flashkit.viz import io as vizio
from flashkit.viz import memory as vizmem
from flashkit.viz import mma

ROOT = Path(__file__).resolve().parents[1]


def assert_titled(fig):
    layout = fig.to_plotly_json()["layout"]
    assert layout.get("title", {}).get("text"), "figure has no title"
    for name in (k for k in layout if k.startswith(("xaxis", "yaxis"))):
        assert layout[name].get("title", {}).get("text"), f"{name} has no title"


# ------------------------------------------------------------------ mma.sync.m16n8k16
@pytest.mark.parametrize("matrix", ["A", "B", "C"])
def test_every_element_has_exactly_one_owner(matrix):
    seen = {}
    for lane in range(32):
        for i in range(mma.PER_LANE[matrix]):
            seen.setdefault(mma.position(matrix, lane, i), []).append((lane, i))
    rows, cols = mma.SHAPES[matrix]
    assert sorted(seen) == [(r, c) for r in range(rows) for c in range(cols)]
    assert all(len(v) == 1 for v in seen.values())


def test_layout_is_the_one_the_kernels_write():
    """4_mma.cu: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..] (registers of two
    halves); b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]."""
    for lane in range(32):
        g, t = lane // 4, lane % 4
        regs_a = [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]
        for r, (row, col) in enumerate(regs_a):
            assert mma.position("A", lane, 2 * r) == (row, col)
            assert mma.position("A", lane, 2 * r + 1) == (row, col + 1)
        for r, row in enumerate((2 * t, 2 * t + 8)):
            assert [mma.position("B", lane, 2 * r + h) for h in (0, 1)] == [(row, g), (row + 1, g)]
        assert [mma.position("C", lane, i) for i in range(4)] == [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t),
                                                                   (g + 8, 2 * t + 1)]


def test_warp_mma_matches_a_matmul_and_assembly_steps_fill_in():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((16, 16)).astype(np.float16)
    B = rng.standard_normal((16, 8)).astype(np.float16)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    d = mma.warp_mma(mma.load_fragments(A, "A"), mma.load_fragments(B, "B"), mma.load_fragments(C, "C"))
    assert d.shape == (32, 4) and d.dtype == np.float32
    want = A.astype(np.float32) @ B.astype(np.float32) + C
    np.testing.assert_allclose(mma.assemble(d, "C"), want, rtol=1e-6, atol=1e-6)
    a = mma.load_fragments(A, "A")
    assert [int(np.isfinite(mma.assemble(a, "A", range(k))).sum()) for k in (0, 1, 4, 32)] == [0, 8, 32, 256]
    with pytest.raises(ValueError, match="lane"):
        mma.position("A", 32, 0)
    with pytest.raises(ValueError, match="must be"):
        mma.load_fragments(np.zeros((8, 8)), "A")


def test_layout_figure_highlights_one_lane():
    fig = mma.layout_figure(5)
    assert_titled(fig)
    assert "lane 5" in fig.layout.title.text
    for trace, n in zip(fig.data, (8, 4, 4)):
        assert int(np.asarray(trace.z).sum()) == n  # the lane's own cells


# ------------------------------------------------------------------ notebook 05
def test_io_explorer_figure_marks_the_chosen_N():
    for N in (512, 8192):
        fig = vizio.explorer_figure(N, 64, 2 ** 14)
        assert_titled(fig)
        markers = [t for t in fig.data if t.type == "scatter" and t.mode == "markers"]
        assert len(markers) == 3 and all(list(t.x) == [N] for t in markers)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len({(t.marker.color, t.marker.pattern.shape or "") for t in bars}) == len(bars)  # each series distinct


def test_block_sweep_times_and_counts(monkeypatch):
    pytest.importorskip("numba")
    rows = vizio.block_sweep(N=64, d=8, blocks=(8, 16, 32), repeats=1)
    assert [r["B"] for r in rows] == [8, 16, 32]
    assert all(r["ms_min"] > 0 and r["ms"] >= r["ms_min"] for r in rows)
    assert [r["bytes"] for r in rows] == sorted((r["bytes"] for r in rows), reverse=True)  # bigger tiles, fewer passes
    assert rows[0]["working_set"] == vizio.working_set_bytes(8, 8, 8) == (4 * 8 * 8 + 64) * 4
    assert_titled(vizio.block_sweep_figure(rows, {"L1d": 48 * 1024}, "a sweep"))


# ------------------------------------------------------------------ notebook 04
def test_memory_explorer_measures_and_counts():
    values = vizmem.measured_and_counted(128)
    std, tiled = values["numpy-standard"], values["numpy-tiled"]
    assert std["counted"] == 2 * 4 * 128 * 128 and std["method"] == "tracemalloc"
    assert 0 < std["measured"] < 2 * std["counted"] and 0 < tiled["measured"] < 2 * tiled["counted"]
    fig = vizmem.explorer_figure(128, 64, values, {128: values})
    assert_titled(fig)


# ------------------------------------------------------------------ notebook 07's ceilings table
def test_committed_results_files_say_whether_they_record_ceilings():
    rows = [gpu_results.card_and_ceilings(p) for p in gpu_results.committed_files()]
    assert rows and all(r["kind"] in ("forward",) + tuple(gpu_results.KINDS.values()) for r in rows)
    assert not any("-history" in r["file"] for r in rows)
    forward = [r for r in rows if r["kind"] == "forward"]
    assert forward and all(r["gemm_tflops"] and r["bandwidth_tbps"] for r in forward)


# ------------------------------------------------------------------ glossary links
def test_the_glossary_entries_have_anchors():
    """Entries carry their own anchors (`glossary.md#lse`); tests/test_notebook_links.py checks that every
    link into the glossary names an anchor or a section heading that exists."""
    glossary = (ROOT / "notebooks" / "glossary.md").read_text()
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', glossary))
    assert {"lse", "tile", "mma", "lane", "gqa", "kv-cache"} <= anchors
