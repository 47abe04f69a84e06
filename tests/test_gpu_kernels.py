"""GPU rungs against a float64 oracle on the device (skipped without CuPy and a CUDA device).

The checks themselves live in flashkit/gpu/check.py (also run by `python -m benchmarks.gpu_session`);
these tests call them one case at a time so that a failure names the rung, dtype and shape.
"""
import pytest
from conftest import stable_seed

import flashkit
from flashkit.gpu import BACKENDS, _probe

cupy = pytest.importorskip("cupy")
reason = _probe()
if reason is not None:
    pytest.skip(reason, allow_module_level=True)

from flashkit.gpu import check  # noqa: E402
from flashkit.gpu.flash import forward  # noqa: E402
from flashkit.gpu.rungs import kernels  # noqa: E402

KERNEL_PARAMS = [(rung, element, case) for rung, elements in check.ELEMENT_OF.items()
                 for element in elements for case in check.CASES if check.runs(rung, case)]
KERNELS = [r.number for r in kernels("forward") if r.backend().available]


def _explain(row, seed):
    return (f"rung {row['rung']} {row['element']} {row['case']} seed={seed}: err {row['err']:.3g} (tol {row['tol']:.3g}), "
            f"lse err {row['lse_err']:.3g} (tol {row['lse_tol']:.3g}), nan={row['nan']}, "
            f"-inf rows ok={row['inf_pattern_ok']}, empty rows zero={row['empty_rows_zero']} "
            f"{row.get('first_mismatches', '')}")


@pytest.mark.parametrize("rung,element,case", KERNEL_PARAMS)
def test_kernel_matches_float64(rung, element, case):
    seed = stable_seed(rung, element, case)
    row = check.check_rung(rung, case, element, seed=seed)
    assert row["ok"], _explain(row, seed)


@pytest.mark.parametrize("case", check.CASES)
@pytest.mark.parametrize("element", ["f32", "f16"])
def test_standard_matches_float64(case, element):
    row = check.check_standard(case, element, seed=3)
    assert row["ok"], _explain(row, 3)


@pytest.mark.parametrize("rung,block", [(r.number, b) for r in kernels("forward") for b in r.allowed_blocks
                                        if r.backend().available])
def test_every_allowed_block_size(rung, block):
    row = check.check_rung(rung, check.CASES[2], check.ELEMENT_OF[rung][0], seed=11, block_size=block)
    assert row["ok"], _explain(row, 11)


@pytest.mark.parametrize("rung", KERNELS)
def test_unsupported_head_size_and_block_raise(rung):
    element = check.ELEMENT_OF[rung][0]
    dtype = cupy.float32 if element == "f32" else cupy.float16
    x = cupy.ones((1, 1, 8, 96), dtype)
    with pytest.raises(ValueError, match="d in"):
        forward(rung, x, x, x, scale=0.1)
    y = cupy.ones((1, 1, 8, 64), dtype)
    with pytest.raises(ValueError, match="block_size"):
        forward(rung, y, y, y, scale=0.1, block_size=(48, 48))
    wrong = cupy.ones((1, 1, 8, 64), cupy.float64)
    with pytest.raises(TypeError):
        forward(rung, wrong, wrong, wrong, scale=0.1)


def test_non_contiguous_input_is_copied():
    rng = cupy.random.default_rng(5)
    base = rng.standard_normal((1, 2, 64, 40), dtype=cupy.float32)
    q = base[:, :, :, :32]  # (1, 2, 64, 32), rows 40 apart: not contiguous
    assert not q.flags.c_contiguous
    O1, lse1 = forward(3, q, q, q, scale=32 ** -0.5)
    O2, lse2 = forward(3, cupy.ascontiguousarray(q), cupy.ascontiguousarray(q), cupy.ascontiguousarray(q), scale=32 ** -0.5)
    assert bool((O1 == O2).all()) and bool((lse1 == lse2).all())


def test_backends_are_registered_with_rungs():
    names = {b.name: b for b in BACKENDS}
    assert [names[n].rung for n in ("cupy-standard", "cupy-fp32-row", "cupy-fp32-tile", "cupy-mma", "cupy-mma-async",
                                    "cupy-mma-2tile", "cupy-wgmma")] == [1, 2, 3, 4, 5, 6, 7]
    assert max(BACKENDS, key=lambda b: b.priority).name == "cupy-wgmma"


def test_through_flashkit_attention():
    """The public entry point: causal GQA in fp16 through a named GPU rung."""
    rng = cupy.random.default_rng(9)
    q = rng.standard_normal((1, 4, 150, 64), dtype=cupy.float32).astype(cupy.float16)
    k = rng.standard_normal((1, 2, 170, 64), dtype=cupy.float32).astype(cupy.float16)
    v = rng.standard_normal((1, 2, 170, 64), dtype=cupy.float32).astype(cupy.float16)
    O = flashkit.attention(q, k, v, causal=True, backend="cupy-mma-async")
    exact = [x.astype(cupy.float64) for x in (q, k, v)]
    case = (1, 4, 2, 150, 170, 64, True, None)
    O64, _ = check.reference64(exact, case)
    O_lp, _ = check.reference_lowp(exact, case, "f16")
    err = float(cupy.abs(O.astype(cupy.float64) - O64).max())
    assert O.dtype == cupy.float16 and err <= 2 * float(cupy.abs(O_lp - O64).max()) + 1e-6
