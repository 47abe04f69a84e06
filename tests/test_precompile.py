"""Background compilation (flashkit.precompile): "auto" serves from NumPy while its Numba pick compiles,
then uses the pick; a named backend is never swapped; failures reach the caller; warmup() waits.
The compile itself is replaced by a function the test releases, so every step is deterministic."""
import threading

import numpy as np
import pytest

import flashkit
from flashkit import precompile, registry, validate
from conftest import assert_matches, oracle

numba_here = pytest.mark.skipif(not registry.get("numba").available, reason="numba is not installed")


@pytest.fixture
def fresh(monkeypatch):
    """Empty compile state, the switch on, and compile_now replaced by a gate the test opens."""
    monkeypatch.setattr(registry, "_COMPILED", set())
    for name, value in (("_QUEUE", precompile.collections.deque()), ("_DONE", {}), ("_FAILED", {}), ("_WORKER", [])):
        monkeypatch.setattr(precompile, name, value)
    monkeypatch.delenv("FLASHKIT_BACKGROUND_COMPILE", raising=False)
    gate = dict(open=threading.Event(), calls=[], error=None)

    def fake_compile(name, direction, dtype):
        gate["calls"].append((name, direction, dtype))
        assert gate["open"].wait(30), "the test never opened the gate"
        if gate["error"]:
            raise gate["error"]
        registry._COMPILED.add((name, direction, dtype))

    monkeypatch.setattr(precompile, "compile_now", fake_compile)
    yield gate
    gate["open"].set()  # never leave the worker waiting
    for event in list(precompile._DONE.values()):
        event.wait(30)


def big_call(seed=0, dtype=np.float32):
    """Above numpy-standard's small-call limit, so "auto" picks the numba backend."""
    q, k, v = (np.random.default_rng(seed + i).standard_normal((1, 2, 1024, 32)).astype(dtype) for i in range(3))
    return q, k, v


@numba_here
def test_auto_serves_numpy_while_compiling_then_the_kernel(fresh):
    q, k, v = big_call()
    problem = validate.check(q, k, v)
    numba = registry.choose(problem, "auto")
    assert numba.name == "numba" and numba.jit  # what auto settles on does not change
    served = precompile.serve(problem, numba, "forward", "auto")
    assert served.name == "numpy-standard"
    assert precompile.state("numba") == "compiling"
    assert {r["name"]: r["compiled"] for r in flashkit.backends()}["numba"] == "compiling"
    assert {r["name"]: r["compiled"] for r in flashkit.backends()}["numpy-standard"] == ""
    o, lse = flashkit.attention(q, k, v, return_lse=True)  # served by NumPy, exact all the same
    assert_matches(o, lse, *oracle(q, k, v), what="auto while compiling")
    assert precompile.serve(problem, numba, "forward", "numba") is numba  # a named backend: never swapped
    fresh["open"].set()
    precompile._DONE[("numba", "forward", "float32")].wait(30)
    assert precompile.serve(problem, numba, "forward", "auto") is numba
    assert precompile.state("numba") == "yes"
    assert fresh["calls"] == [("numba", "forward", "float32")]  # compiled once, whatever the calls


@numba_here
def test_many_threads_asking_at_once_queue_one_compile(fresh):
    q, k, v = big_call(1)
    problem = validate.check(q, k, v)
    numba = registry.choose(problem, "auto")
    served = []
    threads = [threading.Thread(target=lambda: served.append(precompile.serve(problem, numba, "forward", "auto").name))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert served == ["numpy-standard"] * 8
    fresh["open"].set()
    precompile._DONE[("numba", "forward", "float32")].wait(30)
    assert fresh["calls"] == [("numba", "forward", "float32")]


@numba_here
def test_a_failed_background_compile_reaches_the_caller(fresh):
    q, k, v = big_call(2)
    problem = validate.check(q, k, v)
    numba = registry.choose(problem, "auto")
    fresh["error"] = RuntimeError("LLVM said no")
    assert precompile.serve(problem, numba, "forward", "auto").name == "numpy-standard"
    fresh["open"].set()
    precompile._DONE[("numba", "forward", "float32")].wait(30)
    assert precompile.state("numba") == "failed: RuntimeError: LLVM said no"
    assert precompile.serve(problem, numba, "forward", "auto") is numba  # its own call raises the real error


@numba_here
def test_switched_off_auto_compiles_on_the_calling_thread(fresh, monkeypatch):
    monkeypatch.setenv("FLASHKIT_BACKGROUND_COMPILE", "0")
    problem = validate.check(*big_call(3))
    numba = registry.choose(problem, "auto")
    assert precompile.serve(problem, numba, "forward", "auto") is numba
    assert fresh["calls"] == [] and precompile.state("numba") == "no"


@numba_here
def test_what_serves_meanwhile_depends_on_size_and_direction(fresh):
    x = np.zeros((1, 1, 4100, 1), np.float32)  # S has 4100^2 > 2^24 scores: numpy-tiled, O(N) memory
    assert precompile._fallback(validate.check(x, x, x), "forward").name == "numpy-tiled"
    y = np.zeros((1, 1, 100, 8), np.float32)
    assert precompile._fallback(validate.check(y, y, y), "forward").name == "numpy-standard"
    assert precompile._fallback(validate.check_decode(y[:, :, :1], y, y), "decode").name == "numpy-splitk"
    P = validate.check_decode(np.ones((1, 4, 1, 64), np.float32), np.ones((1, 1, 2048, 64), np.float32),
                              np.ones((1, 1, 2048, 64), np.float32))
    splitk = registry.choose(P, "auto", direction="decode")
    assert splitk.name == "numba-splitk" and precompile.serve(P, splitk, "decode", "auto").name == "numpy-splitk"


def test_warmup_checks_its_arguments():
    with pytest.raises(ValueError, match="directions"):
        flashkit.warmup(directions="sideways")
    with pytest.raises(ValueError, match="dtypes"):
        flashkit.warmup(dtypes="int8")


@numba_here
def test_warmup_compiles_for_real_and_auto_then_uses_the_kernel():
    """The real compile (or a load from Numba's cache) of the decoding kernels, waited for."""
    result = flashkit.warmup(directions="decode")
    assert result == {("numba-splitk", "decode", "float32"): "yes"}
    assert registry.is_compiled("numba-splitk", "decode", "float32")
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s, dtype=np.float32) for s in ((1, 4, 1, 64), (1, 1, 3000, 64), (1, 1, 3000, 64)))
    P = validate.check_decode(q, k, v)
    assert precompile.serve(P, registry.choose(P, "auto", direction="decode"), "decode", "auto").name == "numba-splitk"


@numba_here
def test_the_compile_starts_when_the_call_that_asked_returns(fresh):
    problem = validate.check(*big_call(4))
    numba = registry.choose(problem, "auto")
    with precompile.serving(problem, numba, "forward", "auto") as served:
        assert served.name == "numpy-standard"
        assert precompile.state("numba") == "no" and fresh["calls"] == []  # nothing competes with this call
    assert precompile.state("numba") == "compiling"
    with precompile.serving(problem, numba, "forward", "numba") as served:
        assert served is numba
