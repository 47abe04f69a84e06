"""flashkit.finite on the GPU: the scan finds one bad element wherever it sits. Skips without a GPU.

Each thread keeps four 16-byte words in flight, then finishes its share one word at a time; arrays that are
not a whole number of 16-byte words (or not 16-byte aligned) are read one element at a time: a bad value is
planted at the first and last element and around the boundaries of those loops, for each element size,
with -inf allowed or not.
"""
import numpy as np
import pytest

from conftest import cupy_or_skip

cupy = cupy_or_skip()

from flashkit import finite  # noqa: E402

SIZES = (1, 7, 8, 9, 4096 * 33 + 5, 1_000_003)


def _places(n, itemsize):
    per = 16 // itemsize  # elements per 16-byte word
    threads = 128 * max(1, min(-(-n // (128 * 8 * 4)), 132 * 4))  # as flashkit.finite.start launches
    n16 = n // per
    marks = {0, n - 1, n // 2, n16 * per, 4 * threads * per, 3 * threads * per,
             (n16 - 3 * threads) * per, (n16 - 4 * threads) * per}  # where the 4-load loop hands over
    return sorted({m + e for m in marks for e in (-1, 0, 1) if 0 <= m + e < n})


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_one_bad_element_is_found_anywhere(dtype):
    for n in SIZES:
        x = cupy.ones(n, dtype)
        assert finite.start(cupy, (x, x), (dtype, dtype)).wait() is None
        for i in _places(n, x.itemsize):
            for bad in (np.nan, np.inf, -np.inf):
                y = x.copy()
                y[i] = bad
                got = finite.start(cupy, (x, y), (dtype, dtype)).wait()
                assert got == 1, f"{dtype} n={n}: {bad} at {i} not found (got {got})"


def test_neg_inf_allowed_where_asked():
    x = cupy.zeros(12345, cupy.float32)
    x[12340] = -cupy.inf
    assert finite.start(cupy, (x,), ("float32",), allow_neg_inf=(0,)).wait() is None
    x[17] = cupy.inf
    assert finite.start(cupy, (x,), ("float32",), allow_neg_inf=(0,)).wait() == 0


def test_unaligned_view_is_read_element_by_element():
    x = cupy.ones(1001, cupy.float16)[1:]  # contiguous but 2 bytes past a 16-byte boundary
    x[999] = cupy.nan
    assert finite.start(cupy, (x,), ("float16",)).wait() == 0
