"""Who checks q, k, v for NaN/Inf on the GPU: the separate scan or the kernel (flashkit.finite.Deferred).

No GPU needed: the arrays are stand-ins with a dtype, an address and a size, and the scan and the fused check
are replaced by recorders. What the kernel does with a claimed check is tested on a Hopper GPU
(tests/test_gpu_input_check.py).
"""
from types import SimpleNamespace

import numpy as np
import pytest

from flashkit import finite, validate


def fake(nbytes, dtype="float16", ptr=1 << 20):
    return SimpleNamespace(dtype=np.dtype(dtype), nbytes=nbytes, data=SimpleNamespace(ptr=ptr))


@pytest.fixture
def recorded(monkeypatch):
    log = []
    monkeypatch.setattr(finite, "start", lambda xp, arrays, dtype_names, **kw: log.append(("scan", len(arrays))) or "scan")

    class Fused:
        def __init__(self, arrays, shares, names, columns):
            log.append(("fused", shares))

    monkeypatch.setattr(finite, "Fused", Fused)
    return log


def test_shares_cover_the_bytes_in_quarter_megabytes_within_the_grid():
    mb = 1 << 20
    assert finite.fused_shares([fake(mb)] * 3, grid_blocks=1000) == 12
    assert finite.fused_shares([fake(mb)] * 3, grid_blocks=5) == 5  # 0.6 MB a block
    assert finite.fused_shares([fake(16)], grid_blocks=1000) == 1
    assert finite.fused_shares([fake(3 * mb)], grid_blocks=2) == 0  # 1.5 MB a block: the separate scan
    assert finite.fused_shares([fake(mb, ptr=(1 << 20) + 8)], grid_blocks=100) == 0  # not 16-byte aligned
    assert finite.fused_shares([fake(mb + 2)], grid_blocks=100) == 0  # not whole 16-byte units
    assert finite.fused_shares([fake(mb, "float32")], grid_blocks=100) == 0  # the kernel tests 16-bit floats


def test_the_kernel_claims_the_check_of_the_arrays_it_reads(recorded):
    arrays = [fake(1 << 20) for _ in range(3)]
    check = finite.Deferred(np, arrays, ("float16",) * 3, ("q", "k", "v"))
    assert check.claim(arrays, grid_blocks=1000) is not None
    assert recorded == [("fused", 12)]
    assert check.claim(arrays, grid_blocks=1000) is None  # claimed once; no scan after it either
    assert recorded == [("fused", 12)]


@pytest.mark.parametrize("why", ["other arrays", "too much per block", "no block takes it", "switched off"])
def test_otherwise_the_scan_starts_before_the_kernel(recorded, why):
    arrays = [fake(1 << 20) for _ in range(3)]
    check = finite.Deferred(np, arrays, ("float16",) * 3, ("q", "k", "v"))
    if why == "other arrays":
        got = check.claim([fake(1 << 20) for _ in range(3)], grid_blocks=1000)
    elif why == "too much per block":
        got = check.claim(arrays, grid_blocks=1)
    elif why == "no block takes it":  # flash.check_columns found too little work to hide it
        got = check.claim(arrays, grid_blocks=0, columns=0)
    else:
        with finite.separate_scan():
            got = check.claim(arrays, grid_blocks=1000)
    assert got is None and recorded == [("scan", 3)]
    check.start()
    assert recorded == [("scan", 3)]  # started once


def test_a_check_nobody_started_starts_when_waited_for(recorded):
    check = finite.Deferred(np, [fake(64)] * 3, ("float16",) * 3, ("q", "k", "v"))
    with pytest.raises(AttributeError):  # the recorder's "scan" has no error(): what matters is that it ran
        check.error()
    assert recorded == [("scan", 3)]


@pytest.mark.parametrize("checks_inputs", [False, True])
def test_begin_leaves_the_check_to_a_kernel_that_checks_its_inputs(recorded, checks_inputs):
    arrays = [fake(64)] * 3
    problem = SimpleNamespace(pending=[finite.Deferred(np, arrays, ("float16",) * 3, ("q", "k", "v"))])
    validate.begin(problem, SimpleNamespace(checks_inputs=checks_inputs))
    assert recorded == ([] if checks_inputs else [("scan", 3)])


def test_the_kernel_checks_where_its_blocks_have_work_to_hide_it():
    from flashkit.gpu.flash import check_columns

    causal, full = (-1, 0), (-1, -1)
    assert check_columns(4096, 4096, 128, 128, full) == 32  # every query tile: 32 key tiles each
    assert check_columns(8192, 8192, 128, 128, causal) == 32  # the heavy half of 64: 48 key tiles on average
    assert check_columns(8192, 8192, 192, 128, causal) == 22
    assert check_columns(2048, 2048, 128, 128, full) == 0  # 16 key tiles: the separate scan
    assert check_columns(4096, 4096, 128, 128, causal) == 0  # 24 on average
    assert check_columns(1, 8192, 128, 128, full) == 1  # one query tile over 64 key tiles
    assert check_columns(4096, 4096, 128, 128, (512, 0)) == 0  # a window of 4-5 tiles


def test_rung_7_reserves_the_shared_memory_its_check_uses():
    import re
    from pathlib import Path

    from flashkit.gpu import rungs

    source = (Path(rungs.__file__).parent / "kernels" / "input_check.cuh").read_text()
    chunk, stages = (int(re.search(rf"#define {name} (\d+)", source).group(1)) for name in ("SCAN_CHUNK", "SCAN_STAGES"))
    assert chunk * stages == rungs.INPUT_CHECK_SMEM
