"""flashkit.finite on the GPU: both scan shapes find one bad element wherever it sits. Skips without a GPU.

The thin scan splits every array's 16-byte words into one share per SM and tests the trailing elements past
the last whole word apart: a bad value is planted at the first and last element, at share boundaries and in
the tail, for each element size, with -inf allowed or not.
"""
import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
except Exception as exc:  # CuPy installed without a driver
    pytest.skip(f"no CUDA device ({exc})", allow_module_level=True)

from flashkit import finite  # noqa: E402

SIZES = (1, 7, 8, 9, 4096 * 33 + 5, 1_000_003)


def _places(n, sms):
    per16 = 8  # 16-bit words per 16-byte word: the finest share boundary that matters
    n16 = n // per16
    cuts = {n16 * b // sms * per16 for b in range(sms + 1)}
    return sorted({0, n - 1, *(c for c in cuts if c < n), *(max(0, c - 1) for c in cuts if 0 < c <= n)})


@pytest.mark.parametrize("shape", ["thin", "wide"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_one_bad_element_is_found_anywhere(shape, dtype):
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    for n in SIZES:
        x = cupy.ones(n, dtype)
        assert finite.start(cupy, (x, x), (dtype, dtype), shape=shape).wait() is None
        places = _places(n, sms)
        if len(places) > 12:  # every boundary of the small sizes, a spread of them for the large ones
            places = places[:: max(1, len(places) // 12)] + [n - 1]
        for i in places:
            for bad in (np.nan, np.inf, -np.inf):
                y = x.copy()
                y[i] = bad
                got = finite.start(cupy, (x, y), (dtype, dtype), shape=shape).wait()
                assert got == 1, f"{shape} {dtype} n={n}: {bad} at {i} not found (got {got})"


@pytest.mark.parametrize("shape", ["thin", "wide"])
def test_neg_inf_allowed_where_asked(shape):
    x = cupy.zeros(12345, cupy.float32)
    x[12340] = -cupy.inf
    assert finite.start(cupy, (x,), ("float32",), allow_neg_inf=(0,), shape=shape).wait() is None
    x[17] = cupy.inf
    assert finite.start(cupy, (x,), ("float32",), allow_neg_inf=(0,), shape=shape).wait() == 0


def test_unaligned_view_takes_the_wide_scan():
    x = cupy.ones(1001, cupy.float16)[1:]  # contiguous but 2 bytes past a 16-byte boundary
    x[999] = cupy.nan
    assert finite.start(cupy, (x,), ("float16",), shape="thin").wait() == 0
