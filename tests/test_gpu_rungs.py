"""The GPU ladder's table (flashkit/gpu/rungs.py) is consistent, and everything that lists rungs derives
from it. No GPU needed: nothing here compiles or launches a kernel."""
import pytest

from flashkit import registry
from flashkit.gpu import BACKENDS, flash, rungs
from flashkit.gpu.rungs import RUNGS, Rung

MAX_THREADS = 1024
MAX_SMEM = 227 * 1024  # dynamic shared memory a block may opt in to on sm_80 .. sm_90


def test_names_and_numbers_are_unique_and_in_ladder_order():
    names = [r.name for r in RUNGS]
    assert len(set(names)) == len(names)
    for direction in rungs.DIRECTIONS:
        numbers = [r.number for r in RUNGS if r.direction == direction]
        assert numbers == sorted(set(numbers)), f"{direction} rungs out of ladder order: {numbers}"


def test_registry_lists_every_rung_as_its_backend():
    from flashkit.gpu import backward

    forward = [r for r in RUNGS if r.direction == "forward"]
    rows = forward + list(backward.RUNGS.values())
    assert [b.name for b in BACKENDS] == [r.name for r in rows]
    for r, b in zip(rows, BACKENDS):
        assert (b.rung, b.dtypes, b.mask, b.priority, b.summary) == (r.number, r.dtypes, False if r in
                                                                     backward.RUNGS.values() else r.mask,
                                                                     r.priority, r.summary)
        assert b.has_forward == (r.direction == "forward") and b.has_backward == (r.direction == "backward")
        assert registry.get(r.name) == b


@pytest.mark.parametrize("spec", rungs.kernels("forward"), ids=lambda r: r.name)
def test_kernel_rows_are_complete(spec):
    assert (flash.KERNEL_DIR / spec.source).is_file()
    assert spec.source.startswith(f"{spec.number}_"), "kernel files are numbered by rung"
    assert set(spec.default_blocks) == set(spec.head_dims)
    assert set(spec.default_blocks.values()) <= set(spec.allowed_blocks)
    for Br, Bc in spec.allowed_blocks:
        threads = spec.threads(Br, Bc)
        assert threads % 32 == 0 and threads <= MAX_THREADS, (Br, Bc, threads)
        for d in spec.head_dims:
            assert 0 < spec.smem(d, Br, Bc) <= MAX_SMEM, (d, Br, Bc)
    assert spec.peer in ("flash", "efficient", "cudnn", "math")


@pytest.mark.parametrize("spec", rungs.kernels("forward"), ids=lambda r: r.name)
def test_forward_kernel_runner_is_the_generic_run_for_that_rung(spec):
    runner = registry._resolve(registry.get(spec.name).runner)
    assert runner.func is flash.run and runner.args == (spec.number,)


def test_a_backward_row_names_its_runner():
    row = dict(number=7, name="cupy-bwd", summary="backward", dtypes=("float16",), peer="flash", priority=0,
               source="7_bwd.cu")
    assert Rung(direction="backward", runner="somewhere:backward", **row).direction == "backward"
    with pytest.raises(ValueError, match="runner"):
        Rung(direction="backward", **row)
    with pytest.raises(ValueError, match="direction"):
        Rung(direction="sideways", runner="somewhere:backward", **row)


def test_unknown_rung_number_says_which_exist():
    with pytest.raises(ValueError, match="1, 2, 3"):
        rungs.rung(99)
