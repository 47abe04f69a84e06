"""flashkit.attention's precision argument: "exact" (the default) or "tf32" (the GPU's TF32 rung, opt-in only)."""
import numpy as np
import pytest

import flashkit
from flashkit.gpu.rungs import RUNGS


def _qkv(dtype=np.float32):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, 2, 5, 8)).astype(dtype) for _ in range(3)]


@pytest.mark.parametrize("bad", ["TF32", "fp16", "", None, 32])
def test_unknown_precision_names_the_choices(bad):
    with pytest.raises(ValueError, match="precision must be one of 'exact', 'tf32'"):
        flashkit.attention(*_qkv(), precision=bad)


def test_tf32_needs_gpu_arrays():
    with pytest.raises(TypeError, match="precision='tf32' runs on the GPU"):
        flashkit.attention(*_qkv(), precision="tf32")


def test_tf32_rung_is_never_run_unless_asked_for():
    (name,) = [r.name for r in RUNGS if r.precision == "tf32"]
    with pytest.raises(ValueError, match="ask for it with precision='tf32'"):
        flashkit.attention(*_qkv(), backend=name)
    # "auto" ranks it below every other float32 backend of the GPU (cupy-standard serves any float32 call)
    lowest = min(r.priority for r in RUNGS if r.direction == "forward" and "float32" in r.dtypes and r.precision == "exact")
    assert next(r for r in RUNGS if r.name == name).priority < lowest


def test_exact_is_the_default_and_unchanged():
    q, k, v = _qkv()
    assert np.array_equal(flashkit.attention(q, k, v), flashkit.attention(q, k, v, precision="exact"))
