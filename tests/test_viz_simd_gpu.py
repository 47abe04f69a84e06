"""Fast tests of the helpers of notebooks 6 and 7: flashkit/viz/{simd,gpu}.py, flashkit/measure/gpu_results.py."""
import json
import re

import numpy as np

import pytest

from flashkit.measure import gpu_results
from flashkit.viz import gpu as vgpu
from flashkit.viz import simd as vsimd


def assert_titled_with_units(fig):
    """A title, and a title with a unit in parentheses on every x and y axis of the layout."""
    layout = fig.to_plotly_json()["layout"]
    assert layout.get("title", {}).get("text"), "figure has no title"
    axes = [k for k in layout if k.startswith(("xaxis", "yaxis"))]
    assert axes, "figure has no axes"
    for name in axes:
        text = layout[name].get("title", {}).get("text")
        assert text and "(" in text and ")" in text, f"{name} has no title with units: {text!r}"


# ---------------------------------------------------------------- the results file

@pytest.fixture(scope="module")
def recorded():
    if not gpu_results.DEFAULT_PATH.is_file():
        pytest.skip("no committed GPU results file in this checkout")
    return gpu_results.load()


def test_loader_returns_rows_labelled_with_card_date_commit(recorded):
    raw = json.loads(gpu_results.DEFAULT_PATH.read_text())
    assert (recorded.card, recorded.date, recorded.commit) == (raw["card"], raw["date"], raw["commit"])
    assert len(recorded.rows) == len(raw["results"]) and recorded.rows
    for row, original in zip(recorded.rows, raw["results"]):
        assert (row["card"], row["date"], row["commit"]) == (raw["card"], raw["date"], raw["commit"])
        assert {k: row[k] for k in original} == original  # labels added, nothing changed
    assert all(r["card"] == raw["card"] for r in recorded.memory + recorded.block_sweep)
    assert raw["card"] in recorded.label and raw["commit"] in recorded.label


def test_loader_does_not_share_rows_with_the_file_dicts(recorded):
    again = gpu_results.load()
    again.rows[0]["ms"] = -1.0
    assert recorded.rows[0]["ms"] != -1.0


def test_select_and_ok(recorded):
    rows = gpu_results.select(recorded.rows, N=4096, d=64, causal=False, dtype="float16")
    assert rows and all((r["N"], r["d"], r["causal"], r["dtype"]) == (4096, 64, False, "float16") for r in rows)
    assert {r["impl"] for r in rows} >= {"torch-flash", "cupy-mma-async"}
    assert gpu_results.ok([{"status": "out of memory", "ms": None}, {"status": "ok", "ms": 1.0}]) == [{"status": "ok", "ms": 1.0}]


def test_loader_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        gpu_results.load(tmp_path / "nope.json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"card": "x"}))
    with pytest.raises(ValueError, match="missing"):
        gpu_results.load(other)


def test_ceilings_are_read_from_the_results_json(tmp_path):
    """The ceilings come from the results file they were measured with, never from a script or notes."""
    raw = {"card": "Test GPU", "date": "2026-01-01", "commit": "abc", "results": [],
           "ceilings": {"gemm_tflops": {"float16": 123.5, "float32": 7.0}, "bandwidth_tbps": 1.25,
                        "source": "measured in this run"}}
    path = tmp_path / "gpu-test.json"
    path.write_text(json.dumps(raw))
    c = gpu_results.ceilings(gpu_results.load(path))
    assert c["gemm_tflops"] == {"float16": 123.5, "float32": 7.0} and c["bandwidth_tbps"] == 1.25
    assert c["sources"]["gemm_tflops"] == "gpu-test.json: measured in this run" == c["sources"]["bandwidth_tbps"]
    del raw["ceilings"]
    path.write_text(json.dumps(raw))
    none = gpu_results.ceilings(gpu_results.load(path))
    assert none == {"gemm_tflops": {}, "bandwidth_tbps": None, "sources": {"gemm_tflops": None, "bandwidth_tbps": None}}


def test_real_ceilings_name_their_source(recorded):
    c = gpu_results.ceilings()
    raw = json.loads(gpu_results.DEFAULT_PATH.read_text())["ceilings"]
    assert c["gemm_tflops"] == raw["gemm_tflops"] and all(v > 0 for v in c["gemm_tflops"].values())
    assert c["bandwidth_tbps"] == raw["bandwidth_tbps"] > 0
    assert raw["source"] and raw["source"] in c["sources"]["gemm_tflops"]
    assert gpu_results.DEFAULT_PATH.name in c["sources"]["bandwidth_tbps"]


def test_the_package_reads_only_json_for_gpu_results(recorded, monkeypatch):
    """Loading the results and their ceilings opens the results JSON and nothing else."""
    import builtins
    from pathlib import Path

    opened = []
    real_open, real_read_text = builtins.open, Path.read_text

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_read_text(self, *args, **kwargs):
        opened.append(str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(Path, "read_text", spy_read_text)
    gpu_results.ceilings(gpu_results.load())
    assert opened and all(f.endswith(".json") for f in opened), opened


def test_traffic_model_and_intensity():
    flash = dict(impl="cupy-mma-async", B=2, H=3, N=256, d=64, dtype="float16", flops=4.0 * 2 * 3 * 256 ** 2 * 64)
    assert gpu_results.traffic_bytes(flash) == 4 * 2 * 3 * 256 * 64 * 2
    assert gpu_results.intensity(flash) == pytest.approx(256 / 2)  # N/2 FLOP per byte in fp16
    std = dict(flash, impl="cupy-standard")  # S in float32 even for fp16 input
    assert gpu_results.traffic_bytes(std) == 4 * 2 * 3 * 256 * 64 * 2 + 2 * 2 * 3 * 256 ** 2 * 4
    math = dict(flash, impl="torch-math")  # S in the input's dtype
    assert gpu_results.traffic_bytes(math) == 4 * 2 * 3 * 256 * 64 * 2 + 2 * 2 * 3 * 256 ** 2 * 2
    assert gpu_results.intensity(std) < gpu_results.intensity(flash)


def test_time_rungs_checks_its_arguments_without_a_gpu():
    with pytest.raises(ValueError, match="N must be"):
        gpu_results.time_rungs(N=0)
    with pytest.raises(ValueError, match="multiple"):
        gpu_results.time_rungs(N=1000, tokens=16384)


# ---------------------------------------------------------------- rung sources

def test_rung_sources_are_read_from_the_files():
    files = vgpu.rung_files()
    assert sorted(files) == list(range(1, len(files) + 1)) and len(files) >= 2
    for r in files:
        src = vgpu.rung_source(r)
        lines = src.path.read_text().splitlines()
        assert src.header and f"Rung {r}" in src.header.splitlines()[0]
        assert src.key_lines, f"rung {r}: no key line found"
        for n, text in src.key_lines:
            assert lines[n - 1].rstrip() == text  # the number is the file's line number
        assert src.name in src.text()


def test_rung_key_lines_carry_each_rungs_idea():
    files = vgpu.rung_files()
    text = {r: "\n".join(t for _, t in vgpu.rung_source(r).key_lines) for r in files}
    if 4 in text:  # mma.sync, through kernels/mma.cuh's mma16816
        assert "mma16816" in text[4]
    if 5 in text:  # ldmatrix (ldmatrix_x4, A_rows / B_rows ...) and cp.async (async_tile, cp_async_*)
        assert re.search(r"ldmatrix_x4|\b[AB]_(rows|cols)\(", text[5]) and "cp_async" in text[5]
    assert "S_ij" in text.get(2, "S_ij")


def test_rung_source_rejects_unknown_rung():
    with pytest.raises(ValueError, match="rung must be"):
        vgpu.rung_source(99)


# ---------------------------------------------------------------- GPU figures

ROWS = [
    dict(impl="cupy-standard", rung=1, B=1, H=2, N=512, d=64, causal=False, dtype="float32", flops=1.3e8, ms=1.0, tflops=0.13),
    dict(impl="cupy-mma-async", rung=5, B=1, H=2, N=512, d=64, causal=False, dtype="float16", flops=1.3e8, ms=0.1, tflops=1.3),
    dict(impl="torch-flash", rung=None, B=1, H=2, N=512, d=64, causal=False, dtype="float16", flops=1.3e8, ms=0.08, tflops=1.6),
    dict(impl="torch-flash", rung=None, B=1, H=2, N=1024, d=64, causal=False, dtype="float16", flops=5.2e8, ms=0.2, tflops=2.6),
]


def test_gpu_figures_are_titled_with_units():
    assert_titled_with_units(vgpu.ladder_figure(ROWS, "ladder"))
    assert_titled_with_units(vgpu.roofline_figure(ROWS, {"gemm_tflops": {"float16": 100.0}, "bandwidth_tbps": 2.0,
                                                         "sources": {"gemm_tflops": "a.py", "bandwidth_tbps": "b.md"}}, "roof"))
    assert_titled_with_units(vgpu.sdpa_figure(ROWS, {"float16": "cupy-mma-async"}, "sdpa"))


def test_roofline_draws_only_the_ceilings_it_is_given():
    with_roof = vgpu.roofline_figure(ROWS, {"gemm_tflops": {"float16": 100.0, "float32": 10.0}, "bandwidth_tbps": 2.0,
                                            "sources": {"gemm_tflops": "a.py", "bandwidth_tbps": "b.md"}}, "roof")
    names = [t.name for t in with_roof.data]
    assert sum("roof" in n for n in names) == 2 and any("a.py" in n and "b.md" in n for n in names)
    roof = [t for t in with_roof.data if t.name.startswith("roof float32")][0]
    assert max(roof.y) == pytest.approx(10.0) and min(roof.y) < 10.0  # min(peak, bandwidth x intensity)
    bare = vgpu.roofline_figure(ROWS, {"gemm_tflops": {}, "bandwidth_tbps": None, "sources": {}}, "roof")
    assert all("roof" not in t.name and "bandwidth" not in t.name for t in bare.data)


def test_ladder_figure_orders_rungs_then_peers_and_skips_failed_rows():
    rows = ROWS + [dict(ROWS[0], impl="cupy-fp32-row", rung=2, status="out of memory", ms=None, tflops=None)]
    fig = vgpu.ladder_figure(rows, "ladder")
    labels = [y for t in fig.data for y in t.y]
    assert "2 cupy-fp32-row" not in labels and "5 cupy-mma-async" in labels


def test_table_is_plain_text():
    out = vgpu.table(ROWS, ["impl", "N", "ms"], {"ms": ".3f"})
    assert out.splitlines()[0].split() == ["impl", "N", "ms"] and "0.100" in out


# ---------------------------------------------------------------- SIMD: asm readers and figures

X86 = """
.LBB0_4:                                # loop
	vfmadd231ps	(%rdx,%r9,4), %ymm4, %ymm0
	vmulps	%zmm1, %zmm2, %zmm3
	vmovups	%ymm0, (%rax)
	vaddss	%xmm1, %xmm0, %xmm0
	vfmadd231ss	(%rdx,%rsi,4), %xmm1, %xmm0
	callq	expf@PLT
	.p2align	4
"""
ARM = """
	fmla	v0.4s, v1.4s, v2.4s
	fadd	v3.4s, v3.4s, v4.4s
	fadd	s0, s0, s1
	bl	expf
"""


def test_asm_counts_x86():
    c = vsimd.asm_counts(X86)
    assert c == dict(lines=6, ymm=2, zmm=1, vector_fma=1, packed_arith=2, scalar_fp=2, neon=0, calls=1)
    assert vsimd.asm_excerpt(X86) == ["vfmadd231ps (%rdx,%r9,4), %ymm4, %ymm0", "vmulps %zmm1, %zmm2, %zmm3"]
    assert vsimd.scalar_excerpt(X86, 1) == ["vaddss %xmm1, %xmm0, %xmm0"]


def test_asm_counts_arm_neon():
    c = vsimd.asm_counts(ARM)
    assert (c["neon"], c["vector_fma"], c["packed_arith"], c["ymm"], c["zmm"], c["calls"]) == (2, 1, 2, 0, 0, 1)
    assert vsimd.asm_excerpt(ARM)[0].startswith("fmla")


def test_asm_counts_agree_with_simd_on_real_code():
    simd = pytest.importorskip("flashkit.cpu.simd_lab")
    x = np.ones(32, np.float32)
    for fn in (simd.dot, simd.dot_scalar):
        text = simd.asm(fn, x, x)
        assert (vsimd.asm_counts(text)["vector_fma"] > 0) == simd.has_vector_fma(text)
    assert vsimd.asm_counts(simd.asm(simd.dot_scalar, x, x))["packed_arith"] == 0


def test_simd_figures_are_titled_with_units():
    micro = [dict(kernel="dot", scalar_gflops=1.0, vector_gflops=8.0), dict(kernel="axpby", scalar_gflops=1.0, vector_gflops=9.0)]
    fig = vsimd.micro_figure(micro, "micro")
    assert_titled_with_units(fig)
    assert [t.name for t in fig.data] == ["scalar twin", "vectorised"]
    assert_titled_with_units(vsimd.speed_figure(["a", "b"], [1.0, 2.0], "speed", "backend (name)"))
