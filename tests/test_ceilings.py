"""flashkit.measure.ceilings: the GEMM and copy ceilings of the GPU in use. The formulas are checked
everywhere; the measurement itself needs CuPy and a CUDA device and skips without them."""
import pytest

from flashkit.measure import ceilings


def test_time_gemm_counts_two_flops_per_multiply_add(monkeypatch):
    seen = {}

    def fake_median_time(fn, **kw):
        seen.update(kw)
        fn()
        return {"median_s": 2.0}

    monkeypatch.setattr(ceilings, "median_time", fake_median_time)
    calls = []
    assert ceilings.time_gemm(lambda: calls.append(1), 1000) == pytest.approx(2 * 1000**3 / 2.0 / 1e12)
    assert calls and seen["cuda"] is True and seen["warmup"] >= 1


def _gpu():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() == 0:
            return None
        cupy.zeros(1).sum()
        return cupy
    except Exception:
        return None


@pytest.mark.skipif(_gpu() is None, reason="needs CuPy and a CUDA device")
def test_measure_gives_plausible_ceilings_of_this_card():
    """Tensor-core fp16 GEMM beats fp32 GEMM by several times on every card since Volta; a copy is
    faster than PCIe (64 GB/s) and slower than any HBM (under 20 TB/s)."""
    roof = ceilings.measure(n=4096, nbytes=2**28)
    gemm, bw = roof["gemm_tflops"], roof["bandwidth_tbps"]
    assert set(gemm) == {"float16", "float32"}
    assert 0 < gemm["float32"] < gemm["float16"] < 5000, gemm
    assert gemm["float16"] > 3 * gemm["float32"], gemm
    assert 0.064 < bw < 20, bw
    assert "measured live on" in roof["sources"]["gemm_tflops"]
