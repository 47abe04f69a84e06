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
    assert [b.name for b in BACKENDS] == [r.name for r in RUNGS]
    for r, b in zip(RUNGS, BACKENDS):
        assert (b.rung, b.dtypes, b.mask, b.priority, b.summary) == (r.number, r.dtypes, r.mask, r.priority, r.summary)
        assert b.has_forward == (r.direction == "forward")
        assert b.has_backward == (r.direction == "backward" or r.backward_runner is not None)
        assert registry.get(r.name) == b


def test_backward_launcher_reads_the_table():
    from flashkit.gpu import backward

    assert list(backward.RUNGS) == [r.name for r in rungs.kernels("backward")]
    for r in rungs.kernels("backward"):
        runner = registry._resolve(registry.get(r.name).backward)
        assert runner.func is backward.run_problem and runner.args == (r.name,)
        assert r.kernels[0].role == "preprocess"
        roles = {k.role for k in r.kernels}
        assert "main" in roles or {"dq", "dkdv"} <= roles, roles


@pytest.mark.parametrize("spec", rungs.kernels("forward") + rungs.kernels("backward"), ids=lambda r: r.name)
def test_kernel_rows_are_complete(spec):
    source = (flash.KERNEL_DIR / spec.source).read_text()
    assert spec.source.startswith(spec.file_prefix), "kernel files are numbered by rung (bN_ for backward ones)"
    assert set(spec.default_blocks) == set(spec.head_dims)
    for d in spec.head_dims:
        assert spec.default_blocks[d] in spec.allowed(d)
        for Br, Bc in spec.allowed(d):
            threads = spec.threads(Br, Bc)
            assert threads % 32 == 0 and threads <= MAX_THREADS, (Br, Bc, threads)
            for k in spec.kernels:
                if k.smem is not None:
                    assert 0 < k.smem(d, Br, Bc) <= MAX_SMEM, (k.name, d, Br, Bc)
    for k in spec.kernels:  # every kernel the table launches is defined in the source (or a header it includes)
        headers = "".join(p.read_text() for p in flash.KERNEL_DIR.glob("*.cuh"))
        assert f" {k.name}(" in source + headers, k.name
    assert spec.peer in ("flash", "efficient", "cudnn", "math")


@pytest.mark.parametrize("spec", rungs.kernels("forward"), ids=lambda r: r.name)
def test_forward_kernel_runner_is_the_generic_run_for_that_rung(spec):
    runner = registry._resolve(registry.get(spec.name).runner)
    assert runner.func is flash.run and runner.args == (spec.number,)


def test_a_row_without_a_kernel_names_its_runner():
    row = dict(number=7, name="cupy-bwd", summary="backward", dtypes=("float16",), peer="flash", priority=0)
    assert Rung(direction="backward", runner="somewhere:backward", **row).direction == "backward"
    assert Rung(direction="backward", source="b7_bwd.cu", **row).backend().backward == "flashkit.gpu.backward:cupy-bwd"
    with pytest.raises(ValueError, match="runner"):
        Rung(direction="backward", **row)
    with pytest.raises(ValueError, match="direction"):
        Rung(direction="sideways", runner="somewhere:backward", **row)


def test_unknown_rung_number_says_which_exist():
    with pytest.raises(ValueError, match="1, 2, 3"):
        rungs.rung(99)
