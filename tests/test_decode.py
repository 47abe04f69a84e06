"""Split-K decoding (flashkit.decode): equal to unsplit attention for any number of splits, including
splits that are empty or fully masked; ragged lengths; causal few-query steps; clear errors.
GPU tests (cupy-splitk) skip cleanly without CuPy or a GPU."""

import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashkit
from flashkit import online_softmax, validate
from flashkit.decode import attention_decode, check, chunk_bounds, split_states
from flashkit.decode import numba_available
from conftest import assert_matches, oracle

CPU_SPLITK = ["numpy-splitk"] + (["numba-splitk"] if numba_available() else [])


def make(rng, B, Hq, Hkv, Nq, Nmax, d, dtype=np.float32):
    q = rng.standard_normal((B, Hq, Nq, d)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Nmax, d)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Nmax, d)).astype(dtype)
    return q, k, v


def expected(q, k, v, length, causal, scale=None):
    """(O, lse) in float64 from the materialised reference, with the visible keys as an explicit mask."""
    P = check(q, k, v, length=length, causal=causal, scale=scale)
    B, Hq, Nq, d = P.Q.shape
    n = P.n_keys
    if n == 0:
        return np.zeros((B, Hq, Nq, d)), np.full((B, Hq, Nq), -np.inf)
    j = np.arange(n)
    mask = (j >= P.lo[:, None, :, None]) & (j < P.hi[:, None, :, None])  # (B, 1, Nq, n)
    return oracle(P.Q, np.ascontiguousarray(P.K[:, :, :n]), np.ascontiguousarray(P.V[:, :, :n]),
                  mask=mask, scale=P.scale)


@st.composite
def steps(draw):
    Hkv = draw(st.sampled_from([1, 2, 3]))
    B = draw(st.integers(1, 3))
    Nmax = draw(st.integers(1, 300))
    ragged = draw(st.booleans())
    if ragged:
        length = np.array([draw(st.integers(0, Nmax)) for _ in range(B)])
    else:
        length = draw(st.one_of(st.none(), st.integers(0, Nmax)))
    return dict(B=B, Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2, 4, 5])), Nq=draw(st.integers(1, 4)),
                Nmax=Nmax, d=draw(st.sampled_from([1, 3, 16, 64, 128])), length=length,
                causal=draw(st.booleans()), splits=draw(st.one_of(st.just("auto"), st.integers(1, 400))),
                seed=draw(st.integers(0, 2**32 - 1)))


@pytest.mark.parametrize("backend", CPU_SPLITK)
def test_splitk_equals_unsplit_for_any_splits(backend):
    @settings(max_examples=40 if backend == "numba-splitk" else 25, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(steps())
    def check_case(case):
        rng = np.random.default_rng(case["seed"])
        q, k, v = make(rng, case["B"], case["Hq"], case["Hkv"], case["Nq"], case["Nmax"], case["d"])
        before = [x.copy() for x in (q, k, v)]
        o, lse = attention_decode(q, k, v, length=case["length"], causal=case["causal"], splits=case["splits"],
                                  backend=backend, return_lse=True)
        for x, y in zip((q, k, v), before):
            np.testing.assert_array_equal(x, y, err_msg="an input was modified")
        assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == q.shape[:-1]
        ref_o, ref_lse = expected(q, k, v, case["length"], case["causal"])
        assert_matches(o, lse, ref_o, ref_lse, rtol=1e-5, what=f"{backend} {case}")

    check_case()


@pytest.mark.parametrize("backend", CPU_SPLITK)
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 16, 50])
def test_empty_and_fully_masked_splits(backend, splits):
    """Batch 0 has 5 keys (every split after the first sees nothing), batch 1 none at all, batch 2
    all 40; causal with 3 queries, so row 0 of batch 0 sees only 3 keys."""
    rng = np.random.default_rng(splits)
    q, k, v = make(rng, 3, 4, 2, 3, 40, 16)
    length = np.array([5, 0, 40])
    o, lse = attention_decode(q, k, v, length=length, causal=True, splits=splits, backend=backend, return_lse=True)
    ref_o, ref_lse = expected(q, k, v, length, True)
    assert_matches(o, lse, ref_o, ref_lse, rtol=1e-5, what=f"{backend} splits={splits}")
    assert np.isneginf(lse[1]).all() and (o[1] == 0).all()


def test_merge_of_kernel_states_is_exact():
    """The Numba kernel's per-split (m, l, O) equal the readable twin's, and merging them gives unsplit."""
    pytest.importorskip("numba")
    from flashkit.cpu import decode as cpu_decode

    rng = np.random.default_rng(1)
    q, k, v = make(rng, 2, 8, 2, 1, 100, 32, np.float64)
    P = check(q, k, v, length=np.array([100, 37]))
    splits = 6
    M, L, O = cpu_decode.partials(P.Q, P.K, P.V, P.lo, P.hi, P.scale, splits, P.n_keys)
    twin = split_states(P, splits)
    for s, st_ in enumerate(twin):
        seen = np.isfinite(st_.m)
        np.testing.assert_array_equal(np.isfinite(M[s]), seen, err_msg=f"split {s}: which rows saw keys")
        np.testing.assert_allclose(M[s][seen], st_.m[seen], rtol=1e-12)
        np.testing.assert_allclose(L[s], st_.l, rtol=1e-12)
        np.testing.assert_allclose(O[s], st_.O, rtol=1e-12, atol=1e-12)
    # batch 1 has 37 keys: with chunks of 17, split 3 onwards see nothing (m = -inf)
    assert chunk_bounds(100, splits)[3] == (51, 68) and np.isneginf(M[3:, 1]).all()
    o, lse = online_softmax.finalize(online_softmax.merge([online_softmax.State(M[s], L[s], O[s]) for s in range(splits)]))
    ref_o, ref_lse = expected(q, k, v, np.array([100, 37]), False)
    assert_matches(o, lse, ref_o, ref_lse, rtol=1e-12)


@pytest.mark.parametrize("Hq, Hkv, Nq, d, dtype", [(32, 8, 1, 128, np.float32), (8, 1, 1, 64, np.float32),
                                                  (10, 2, 3, 64, np.float32), (3, 3, 2, 32, np.float64)])
def test_vector_task_serial_and_parallel_agree_with_the_loops(Hq, Hkv, Nq, d, dtype):
    """split_task_vec (query rows in blocks of 4, padded: groups of 4, 1, 15 and 2 rows here) equals
    split_task, the loops, state for state; on the calling thread or on the pool, the same bits."""
    pytest.importorskip("numba")
    from flashkit.cpu import decode as cpu_decode

    rng = np.random.default_rng(Hq * d)
    q, k, v = make(rng, 2, Hq, Hkv, Nq, 203, d, dtype)
    P = check(q, k, v, length=np.array([203, 70]), causal=True)
    assert cpu_decode.vector_path(d, dtype)
    args = (P.Q, P.K, P.V, P.lo, P.hi, P.scale, 3, P.n_keys)
    loops = cpu_decode.partials(*args, vector=False)
    serial = cpu_decode.partials(*args, vector=True, serial=True)
    pool = cpu_decode.partials(*args, vector=True, serial=False)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for name, a, b, c in zip("MLO", loops, serial, pool):
        np.testing.assert_array_equal(b, c, err_msg=f"{name}: serial and parallel differ")
        seen = np.isfinite(a)
        np.testing.assert_array_equal(np.isfinite(b), seen, err_msg=f"{name}: which rows saw keys")
        np.testing.assert_allclose(b[seen], a[seen], rtol=tol, atol=tol, err_msg=name)


AVX2_CHILD = """
import re, sys
import numpy as np
from flashkit import online_softmax
from flashkit.decode import attention_decode, check
from flashkit.cpu import decode as cpu_decode
rng = np.random.default_rng(7)
worst = 0.0
for B, Hq, Hkv, Nq, L, d in [(1, 32, 8, 1, 1037, 128), (2, 8, 1, 1, 203, 64), (1, 10, 2, 3, 77, 64), (1, 4, 4, 1, 1, 128)]:
    q = rng.standard_normal((B, Hq, Nq, d), dtype=np.float32)
    k, v = rng.standard_normal((2, B, Hkv, L, d), dtype=np.float32)
    P = check(q, k, v, causal=Nq > 1)
    # the register task can serve d, but a call that does not ask takes the loops (decode.VECTOR_PREFERRED)
    assert cpu_decode.vector_path(d, np.float32) and not cpu_decode.use_vector(d, np.float32)
    outs = [attention_decode(q, k, v, causal=Nq > 1, backend="numba-splitk", splits=3)]
    for serial in (True, False):
        M, Lsum, O = cpu_decode.partials(P.Q, P.K, P.V, P.lo, P.hi, P.scale, 3, P.n_keys, vector=True, serial=serial)
        merged = online_softmax.merge([online_softmax.State(M[s], Lsum[s], O[s]) for s in range(3)])
        outs.append(online_softmax.finalize(merged)[0].reshape(q.shape))
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("bhqd,bhkd->bhqk", q64, np.repeat(k64, Hq // Hkv, axis=1)) / np.sqrt(d)
    if Nq > 1:
        s = np.where(np.arange(L)[None, :] <= np.arange(Nq)[:, None] + L - Nq, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), np.repeat(v64, Hq // Hkv, axis=1))
    worst = max([worst] + [float(np.abs(o - ref).max() / np.abs(ref).max()) for o in outs])
asm = "".join(cpu_decode.split_task_vec.inspect_asm().values())
print(f"worst {worst:.3e} zmm {len(re.findall('%zmm', asm))} ymm {len(re.findall('%ymm', asm))}")
"""


def test_vector_task_compiled_for_avx2(tmp_path):
    """split_task_vec's 16 accumulators and 4 rows of Q fill more than AVX2's 16 ymm registers: LLVM spills
    some (about 100 stores to the stack in its code, against 8 for AVX-512's 32 zmm), and the answer
    must not change. Compiled for Haswell in a child process (flashkit.sysinfo.AVX2_ENV, its own Numba
    cache) and checked against float64 attention on GQA groups of 4, 8 and 15 rows, beside the public
    call, which takes the loops there (slower than the spilled registers: decode.VECTOR_PREFERRED)."""
    pytest.importorskip("numba")
    import subprocess
    import sys

    from flashkit import sysinfo

    if "avx2" not in sysinfo.simd()["features"]:
        pytest.skip("this CPU does not run AVX2 code")
    env = dict(os.environ, **sysinfo.AVX2_ENV, NUMBA_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", AVX2_CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    worst, zmm, ymm = (float(x) for x in re.search(r"worst (\S+) zmm (\d+) ymm (\d+)", run.stdout).groups())
    assert zmm == 0 and ymm > 100, f"not AVX2 code: {zmm:.0f} zmm and {ymm:.0f} ymm operands"
    assert worst < 2e-5, f"AVX2 decode differs from float64 attention by {worst:.2e}"


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_ranks_float16_and_unsplit_backends(rank):
    rng = np.random.default_rng(rank)
    q, k, v = make(rng, 1, 4, 2, 1, 64, 16)
    if rank == 3:
        q, k, v = q[0], k[0], v[0]
    if rank == 2:
        q, k, v = make(rng, 1, 1, 1, 2, 64, 16)
        q, k, v = q[0, 0], k[0, 0], v[0, 0]
    ref_o, ref_lse = expected(q, k, v, 50, True)
    for backend in CPU_SPLITK + [b["name"] for b in flashkit.backends() if b["device"] == "cpu" and b["available"]]:
        o, lse = attention_decode(q, k, v, length=50, causal=True, backend=backend, return_lse=True)
        assert o.shape == q.shape
        assert_matches(o, lse, ref_o, ref_lse, rtol=1e-5, what=backend)
    o16 = attention_decode(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), length=50, causal=True)
    assert o16.dtype == np.float16
    assert np.abs(o16.astype(np.float64) - ref_o.reshape(o16.shape)).max() < 1e-2


def test_numba_splitk_as_an_attention_backend():
    """flashkit.cpu.decode.run serves a flashkit Problem (causal, windows; not a custom mask)."""
    pytest.importorskip("numba")
    from flashkit.cpu import decode as cpu_decode

    rng = np.random.default_rng(3)
    q, k, v = make(rng, 2, 6, 3, 5, 77, 16)
    for kw in (dict(), dict(causal=True), dict(window=(10, 2)), dict(causal=True, window=(3, -1))):
        O, lse = cpu_decode.run(validate.check(q, k, v, **kw))
        ref_o, ref_lse = oracle(q, k, v, **kw)
        assert_matches(O, lse, ref_o, ref_lse, rtol=1e-5, what=str(kw))
    with pytest.raises(ValueError, match="custom mask"):
        cpu_decode.run(validate.check(q, k, v, mask=np.ones((5, 77), bool)))


def test_traced_partials_records_every_task():
    pytest.importorskip("numba")
    from flashkit.cpu import decode as cpu_decode

    rng = np.random.default_rng(4)
    q, k, v = make(rng, 1, 4, 1, 1, 1000, 32)
    P = check(q, k, v)
    (M, L, O), events = cpu_decode.traced_partials(P.Q, P.K, P.V, P.lo, P.hi, P.scale, 5, P.n_keys, 2)
    assert [e["split"] for e in events] == [0, 1, 2, 3, 4]
    assert all(0 <= e["start_s"] <= e["end_s"] for e in events)
    assert {e["thread"] for e in events} <= {0, 1}
    o, _ = online_softmax.finalize(online_softmax.merge([online_softmax.State(M[s], L[s], O[s]) for s in range(5)]))
    np.testing.assert_allclose(o, attention_decode(q, k, v, backend="numpy-standard"), rtol=1e-5, atol=1e-6)


def test_splitk_backends_are_in_the_registry():
    """The split-K kernels are registry backends: listed, with a decode runner, chosen by registry.choose."""
    from flashkit import registry

    listed = {b["name"] for b in flashkit.backends()}
    assert {"numpy-splitk", "numba-splitk", "cupy-splitk"} <= listed
    decoders = [b.name for b in registry.all_backends() if b.has_decode]
    assert decoders == ["numpy-splitk", "numba-splitk", "cupy-splitk"]
    q, k, v = make(np.random.default_rng(5), 1, 4, 2, 1, 64, 16)
    P = check(q, k, v, length=40)
    assert registry.choose(P, "auto", direction="decode").name == CPU_SPLITK[-1]
    # a prefill never goes to a split-K kernel by itself, though each can compute one
    assert not registry.choose(validate.check(q, k, v), "auto").has_decode
    # a named backend without a decode runner serves the step unsplit
    assert registry.choose(P, "numpy-standard", direction="decode").name == "numpy-standard"


def test_auto_without_a_fitting_decode_backend_says_why(monkeypatch):
    """When every decode backend that could run here refuses the request, "auto" names what each lacks."""
    from flashkit import registry
    from flashkit.registry import Backend

    only128 = Backend(name="test-splitk-d128", device="cpu", summary="test", runner=None,
                      decode="flashkit.decode:numpy_splitk", head_dims=(128,))
    monkeypatch.setattr(registry, "all_backends", lambda: (only128,))
    with pytest.raises(ValueError, match="no available backend supports this decode request.*d=8"):
        attention_decode(Q0, K0, V0, backend="auto")


Q0, K0, V0 = make(np.random.default_rng(0), 2, 4, 2, 1, 10, 8)
BAD = [
    ("length too long", dict(length=11), ValueError, ["length", "10"]),
    ("negative length", dict(length=-1), ValueError, ["length", "-1"]),
    ("length per batch wrong size", dict(length=np.array([1, 2, 3])), ValueError, ["length", "B=2"]),
    ("length float", dict(length=2.5), TypeError, ["length", "integer"]),
    ("splits zero", dict(splits=0), ValueError, ["splits", "0"]),
    ("splits word", dict(splits="many"), ValueError, ["splits", "many"]),
    ("heads not divisible", dict(q=Q0[:, :3]), ValueError, ["heads", "3", "2"]),
    ("d mismatch", dict(q=Q0[..., :4]), ValueError, ["head size", "8", "4"]),
    ("batch mismatch", dict(q=Q0[:1]), ValueError, ["batch", "1", "2"]),
    ("dtype mix", dict(q=Q0.astype(np.float64)), TypeError, ["dtype"]),
    ("int dtype", dict(q=Q0.astype(np.int32), k=K0.astype(np.int32), v=V0.astype(np.int32)), TypeError, ["dtype", "int32"]),
    ("not an array", dict(q=Q0.tolist()), TypeError, ["q", "numpy.ndarray"]),
    ("v shape", dict(v=V0[:, :, :5]), ValueError, ["v_cache", "same shape"]),
    ("NaN query", dict(q=np.where(np.arange(8) == 3, np.nan, Q0).astype(np.float32)), ValueError, ["q", "NaN"]),
    ("gpu backend for numpy", dict(backend="cupy-splitk"), ValueError, ["cupy-splitk", "CuPy"]),
    ("unknown backend", dict(backend="fast"), ValueError, ["backend", "fast"]),
    ("bad scale", dict(scale=-1.0), ValueError, ["scale"]),
]


@pytest.mark.parametrize("what,kw,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clearly(what, kw, exc, words):
    args = dict(q=Q0, k=K0, v=V0)
    for name in ("q", "k", "v"):
        if name in kw:
            args[name] = kw.pop(name)
    with pytest.raises(exc) as info:
        attention_decode(args["q"], args["k"], args["v"], **kw)
    for w in words:
        assert w in str(info.value), f"{what}: {w!r} not in {info.value}"


# --------------------------------------------------------------------------------------------------
# GPU: cupy-splitk (skips without CuPy or a GPU)
# --------------------------------------------------------------------------------------------------
def _gpu():
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        cupy.zeros(1).sum()
        return cupy
    except Exception:
        return None


cp = _gpu()
gpu = pytest.mark.skipif(cp is None, reason="needs CuPy and a GPU")

GPU_CASES = [
    # B, Hq, Hkv, Nq, Nmax, d, dtype, length, causal, splits
    (1, 32, 8, 1, 4096, 128, "float16", None, False, "auto"),
    (2, 32, 8, 1, 1000, 128, "float16", [1000, 333], False, 7),
    (3, 8, 1, 2, 513, 128, "float16", [0, 5, 513], True, 1000),  # empty and fully masked splits
    (1, 16, 1, 1, 300, 64, "float16", 300, False, 3),  # 16 rows: two row groups of 8
    (2, 6, 2, 3, 257, 256, "float16", [257, 100], True, 4),  # 9 rows: groups of 8 and 1
    (1, 4, 4, 1, 2000, 128, "float32", 1999, False, 16),
    (2, 12, 3, 2, 700, 64, "float32", [650, 1], True, "auto"),
    (1, 2, 1, 1, 50, 128, "float32", 0, False, 5),  # nothing cached
]


@gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"gpu{i}" for i in range(len(GPU_CASES))])
def test_gpu_splitk_matches_reference(case):
    B, Hq, Hkv, Nq, Nmax, d, dtype, length, causal, splits = case
    rng = np.random.default_rng(GPU_CASES.index(case))
    q, k, v = make(rng, B, Hq, Hkv, Nq, Nmax, d, np.dtype(dtype))
    length_arg = np.array(length) if isinstance(length, list) else length
    o, lse = attention_decode(cp.asarray(q), cp.asarray(k), cp.asarray(v), length=length_arg, causal=causal,
                              splits=splits, backend="auto", return_lse=True)
    assert isinstance(o, cp.ndarray) and o.dtype == np.dtype(dtype) and o.shape == q.shape
    ref_o, ref_lse = expected(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), length_arg, causal)
    rtol = 3e-3 if dtype == "float16" else 1e-5
    assert_matches(cp.asnumpy(o).astype(np.float64), cp.asnumpy(lse), ref_o, ref_lse, rtol=rtol, what=str(case))


@gpu
def test_gpu_partials_equal_cpu_split_states():
    from flashkit.gpu import decode as gpu_decode

    rng = np.random.default_rng(7)
    q, k, v = make(rng, 2, 8, 2, 1, 600, 128, np.float32)
    length = np.array([600, 90])
    P = check(cp.asarray(q), cp.asarray(k), cp.asarray(v), length=length)
    step = gpu_decode.prepare(P, 5)
    step()
    Mp, Lp, Op = (cp.asnumpy(x) for x in step.partials)
    twin = split_states(check(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), length=length), 5)
    for s, st_ in enumerate(twin):
        m_ref = st_.m.reshape(-1)
        np.testing.assert_array_equal(np.isfinite(Mp[s]), np.isfinite(m_ref), err_msg=f"split {s}")
        seen = np.isfinite(m_ref)
        np.testing.assert_allclose(Mp[s][seen], m_ref[seen], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(Lp[s], st_.l.reshape(-1), rtol=1e-4)
        np.testing.assert_allclose(Op[s], st_.O.reshape(-1, 128), rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("dtype,rows", [("float16", 4), ("float16", 8), ("float32", 4)])
def test_gpu_kernel_without_prefetch(dtype, rows):
    """The kernel variants that load one step at a time (PREFETCH=false) or with the L2 prefetch hint
    (DECODE_L2_256B) compute the same thing."""
    from flashkit.gpu import decode as gpu_decode

    rng = np.random.default_rng(rows)
    q, k, v = make(rng, 2, 2 * rows, 2, 1, 999, 128, np.dtype(dtype))
    length = np.array([999, 400])
    P = check(cp.asarray(q), cp.asarray(k), cp.asarray(v), length=length)
    for prefetch, l2_hint in ((False, False), (True, False), (True, True), (False, True)):
        o, lse = gpu_decode.prepare(P, 9, prefetch=prefetch, l2_hint=l2_hint)()
        ref_o, ref_lse = expected(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), length, False)
        rtol = 3e-3 if dtype == "float16" else 1e-5
        assert_matches(cp.asnumpy(o).astype(np.float64), cp.asnumpy(lse), ref_o, ref_lse, rtol=rtol,
                       what=f"{dtype} rows={rows} prefetch={prefetch} l2_hint={l2_hint}")


@gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"gpu{i}" for i in range(len(GPU_CASES))])
@pytest.mark.parametrize("bulk", [(2, 8192), (3, 16384)])
def test_gpu_bulk_kernel_matches_reference(case, bulk):
    """The BULK kernel (cp.async.bulk into shared memory) on the awkward shapes: short last tiles, empty splits."""
    from flashkit.gpu import decode as gpu_decode

    B, Hq, Hkv, Nq, Nmax, d, dtype, length, causal, splits = case
    rng = np.random.default_rng(GPU_CASES.index(case))
    q, k, v = make(rng, B, Hq, Hkv, Nq, Nmax, d, np.dtype(dtype))
    length_arg = np.array(length) if isinstance(length, list) else length
    P = check(cp.asarray(q), cp.asarray(k), cp.asarray(v), length=length_arg, causal=causal)
    n = gpu_decode.auto_splits(P, bulk=bulk) if splits == "auto" else splits
    o, lse = gpu_decode.prepare(P, n, bulk=bulk)()
    ref_o, ref_lse = expected(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), length_arg, causal)
    rtol = 3e-3 if dtype == "float16" else 1e-5
    assert_matches(cp.asnumpy(o).astype(np.float64), cp.asnumpy(lse), ref_o, ref_lse, rtol=rtol, what=f"{case} {bulk}")


@gpu
def test_gpu_bad_input():
    q, k, v = (cp.asarray(x) for x in make(np.random.default_rng(0), 1, 2, 1, 1, 10, 48))
    with pytest.raises(ValueError, match="head size"):
        attention_decode(q, k, v)
    with pytest.raises(ValueError, match="numba-splitk"):
        attention_decode(q, k, v, backend="numba-splitk")


@gpu
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,d,dtype", [(2, 8, 2, 5, 300, 128, "float16"), (1, 4, 4, 64, 64, 64, "float32"),
                                                    (1, 6, 3, 129, 257, 64, "float16"), (2, 4, 1, 1, 1000, 256, "float16")])
def test_gpu_splitk_as_an_attention_backend(B, Hq, Hkv, Nq, Nk, d, dtype):
    """cupy-splitk serves flashkit.attention (the registry's runner): causal and windows, Nq != Nk, GQA,
    against cupy-standard in float64; a custom mask is refused, not ignored."""
    rng = np.random.default_rng(B * 1000 + Nq)
    q, k, v = (cp.asarray(x) for x in make(rng, B, Hq, Hkv, Nq, Nk, d, np.dtype(dtype)))
    rtol = 3e-3 if dtype == "float16" else 1e-5
    for kw in (dict(), dict(causal=True), dict(window=(20, 3)), dict(causal=True, window=(7, -1))):
        o, lse = flashkit.attention(q, k, v, backend="cupy-splitk", return_lse=True, **kw)
        ref_o, ref_lse = flashkit.attention(q.astype("float64"), k.astype("float64"), v.astype("float64"),
                                            backend="cupy-standard", return_lse=True, **kw)
        assert_matches(cp.asnumpy(o).astype(np.float64), cp.asnumpy(lse), cp.asnumpy(ref_o), cp.asnumpy(ref_lse),
                       rtol=rtol, what=f"{dtype} {kw}")
    with pytest.raises(ValueError, match="custom mask"):
        flashkit.attention(q, k, v, backend="cupy-splitk", mask=cp.ones((Nq, Nk), bool))


@gpu
def test_gpu_decode_auto_refuses_what_no_split_k_kernel_has():
    """float32 at d = 256 (the kernel has it in float16 only) and d = 48: the reason names the head size."""
    rng = np.random.default_rng(9)
    for d in (256, 48):
        q, k, v = (cp.asarray(x) for x in make(rng, 1, 2, 1, 1, 50, d, np.float32))
        with pytest.raises(ValueError, match="head size"):
            attention_decode(q, k, v)
