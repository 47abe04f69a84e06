"""GPU backward rungs against a float64 reference backward, and the checker itself.

The GPU tests (skipped without CuPy and a CUDA device) call flashkit/gpu/check_backward.py one case at a
time, so a failure names the rung, dtype, shape and seed. The checker tests run anywhere (NumPy): the
reference against torch's autograd, the tile ranges the kernels use emulated in NumPy, and the classic
backward mistakes, each of which the checker must fail.
"""
import numpy as np
import pytest

from flashkit.gpu import _probe
from flashkit.gpu import check_backward as cb

REASON = _probe()
needs_gpu = pytest.mark.skipif(REASON is not None, reason=str(REASON))


# ---- the checker, without a GPU ---------------------------------------------------------------------------
def _fake(mistake=None):
    """A backward 'rung' computed by the float32 reference, with one classic mistake planted."""
    def backward(rung, Q, K, V, O, dO, lse, *, scale, window, element, block_size, dq_out, dk_out, dv_out):
        def f(x):
            return cb.as_float64(x, element, np)
        Q, K, V, O, dO = (f(x) for x in (Q, K, V, O, dO))
        B, Hq, Nq, d = Q.shape
        Hkv, g = K.shape[1], Q.shape[1] // K.shape[1]
        _, _, dQ, dK, dV = cb.reference_backward(Q, K, V, dO, scale, window, np, element="f32", O_given=O)
        if mistake == "no_D":  # dS = P * dP
            _, _, dQ, dK, dV = cb.reference_backward(Q, K, V, dO, scale, window, np, element="f32",
                                                     O_given=np.zeros_like(O))
        elif mistake == "dk_unscaled":
            dK = dK / scale
        elif mistake == "gqa_not_summed":  # dK, dV from the first query head of each group only
            Qg = Q.reshape(B, Hkv, g, Nq, d)[:, :, :1]
            dOg = dO.reshape(B, Hkv, g, Nq, d)[:, :, :1]
            Og = O.reshape(B, Hkv, g, Nq, d)[:, :, :1]
            _, _, _, dK, dV = cb.reference_backward(Qg[:, :, 0], K, V, dOg[:, :, 0], scale, window, np, element="f32",
                                                    O_given=Og[:, :, 0])
        elif mistake == "no_mask":
            _, _, dQ, dK, dV = cb.reference_backward(Q, K, V, dO, scale, (-1, -1), np, element="f32", O_given=O)
        elif mistake == "dq_row_left_poisoned":  # one element never written
            dQ = dQ.copy()
            dQ[0, 0, -1, 0] = np.nan
        for out, x in zip((dq_out, dk_out, dv_out), (dQ, dK, dV)):
            out[...] = cb.to_device_dtype(x.astype(np.float32), element, np)
        return dq_out, dk_out, dv_out

    return backward


SMALL = (1, 4, 2, 37, 50, 32, True, None)  # GQA 4/2, causal, Nq != Nk


@pytest.mark.parametrize("element", ["f32", "f16", "bf16"])
def test_checker_passes_an_honest_backward(element):
    row = cb.check_rung("fake", SMALL, element, seed=cb.seed_of("honest", element), xp=np, backward=_fake())
    assert row["ok"], row


@pytest.mark.parametrize("mistake", ["no_D", "dk_unscaled", "gqa_not_summed", "no_mask", "dq_row_left_poisoned"])
@pytest.mark.parametrize("element", ["f32", "f16"])
def test_checker_fails_classic_mistakes(mistake, element):
    row = cb.check_rung("fake", SMALL, element, seed=cb.seed_of(mistake, element), xp=np, backward=_fake(mistake))
    assert not row["ok"], f"{mistake} passed: {row}"


def test_reference_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    from flashkit.masks import dense_mask

    for case in (SMALL, (1, 2, 1, 20, 30, 16, True, None), (2, 3, 3, 25, 40, 8, False, (5, 3))):
        B, Hq, Hkv, Nq, Nk, d, causal, window = case
        win = cb.window_of(case)
        rng = np.random.default_rng(cb.seed_of(case))
        Q, dO = rng.standard_normal((2, B, Hq, Nq, d))
        K, V = rng.standard_normal((2, B, Hkv, Nk, d))
        _, _, dQ, dK, dV = cb.reference_backward(Q, K, V, dO, d ** -0.5, win, np)
        q, k, v = (torch.tensor(x, requires_grad=True) for x in (Q, K, V))
        g = Hq // Hkv
        S = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * d ** -0.5
        S = S.masked_fill(~torch.tensor(dense_mask(Nq, Nk, win)), float("-inf"))
        o = torch.softmax(S, -1).nan_to_num(0.0) @ v.repeat_interleave(g, 1)
        o.backward(torch.tensor(dO))
        for ours, theirs in ((dQ, q.grad), (dK, k.grad), (dV, v.grad)):
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-10, atol=1e-12)


def _emulate_tiles(rung, Q, K, V, O, dO, lse, *, scale, window, element, block_size, dq_out, dk_out, dv_out):
    """The kernels' loops in NumPy: blocks of Bc keys, the query steps [i_begin, i_end) they visit, FULL tiles
    without a mask, P from lse with -inf -> P = 0, dQ summed over key blocks. Same formulas as b*_*.cu."""
    Br, Bc = block_size
    left, right = window
    def f(x):
        return cb.as_float64(x, element, np)
    Q, K, V, O, dO = (f(x) for x in (Q, K, V, O, dO))
    B, Hq, Nq, d = Q.shape
    _, Hkv, Nk, _ = K.shape
    group, offset = Hq // Hkv, Nk - Nq
    def row_lo(i):
        return 0 if left < 0 else max(0, i + offset - left)
    def row_hi(i):
        return Nk if right < 0 else min(Nk, i + offset + right + 1)
    Dv = (dO * O).sum(-1)
    dQ, dK, dV = np.zeros(Q.shape), np.zeros(K.shape), np.zeros(K.shape)
    for b in range(B):
        for hk in range(Hkv):
            for j0 in range(0, Nk, Bc):
                j_end = min(j0 + Bc, Nk)
                i_begin = 0 if right < 0 else max(0, j0 - offset - right)
                i_end = Nq if left < 0 else min(Nq, j_end - offset + left)
                for h in range(hk * group, (hk + 1) * group):
                    for i0 in range((i_begin // Br) * Br, i_end, Br):
                        ie = min(i0 + Br, Nq)
                        S = Q[b, h, i0:ie] @ K[b, hk, j0:j_end].T * scale
                        if not (j0 >= row_lo(ie - 1) and j0 + Bc <= row_hi(i0)):  # not FULL: mask
                            i, j = np.arange(i0, ie)[:, None], np.arange(j0, j_end)[None, :]
                            lo, hi = np.vectorize(row_lo)(i), np.vectorize(row_hi)(i)
                            S = np.where((j >= lo) & (j < hi), S, -np.inf)
                        l = lse[b, h, i0:ie].astype(np.float64)
                        P = np.exp(S - np.where(np.isneginf(l), np.inf, l)[:, None])
                        dP = dO[b, h, i0:ie] @ V[b, hk, j0:j_end].T
                        dS = P * (dP - Dv[b, h, i0:ie, None])
                        dV[b, hk, j0:j_end] += P.T @ dO[b, h, i0:ie]
                        dK[b, hk, j0:j_end] += scale * dS.T @ Q[b, h, i0:ie]
                        dQ[b, h, i0:ie] += scale * dS @ K[b, hk, j0:j_end]
    for out, x in zip((dq_out, dk_out, dv_out), (dQ, dK, dV)):
        out[...] = cb.to_device_dtype(x.astype(np.float32), element, np)
    return dq_out, dk_out, dv_out


@pytest.mark.parametrize("case", [c for c in cb.CASES if c[3] * c[4] <= 300 * 300])
@pytest.mark.parametrize("block_size", [(16, 32), (64, 128)])
def test_tile_ranges_emulated(case, block_size):
    """Skipping hidden tiles and masking only partial ones, as the kernels do, loses no visible element."""
    row = cb.check_rung("emulated", case, "f32", seed=cb.seed_of("emu", case), xp=np, backward=_emulate_tiles,
                        block_size=block_size)
    assert row["ok"], row


# ---- the rungs, on the GPU --------------------------------------------------------------------------------
def _explain(row):
    parts = [f"{row['rung']} {row['element']} {tuple(row['case'])} block {row['block_size']} seed {row['seed']}:"]
    for g in cb.GRADS:
        r = row[g]
        parts.append(f"{g} err {r['err']:.3g} (tol {r['tol']:.3g}, nan={r['nan']}) {r.get('first_mismatches', '')}")
    parts.append(f"empty rows zero={row['empty_rows_zero']}")
    return " ".join(parts)


KERNEL_PARAMS = [(name, element, case) for name, elements in cb.RUNG_ELEMENTS.items() for element in elements
                 for case in cb.CASES]


@needs_gpu
@pytest.mark.parametrize("rung,element,case", KERNEL_PARAMS)
def test_backward_matches_float64(rung, element, case):
    if not cb.serves(rung, case):
        pytest.skip(f"{rung} does not run d={case[5]} on this GPU (cupy-bwd-wgmma: a Hopper, d in 64, 128)")
    row = cb.check_rung(rung, case, element, seed=cb.seed_of(rung, element, case))
    assert row["ok"], _explain(row)


def _block_params():
    from flashkit.gpu.backward import RUNGS

    return [(name, bs, case) for name, spec in RUNGS.items() for case in (cb.CASES[2], cb.CASES[5])
            for bs in spec.allowed(case[5])]


@needs_gpu
@pytest.mark.parametrize("rung,element", [(n, e) for n, es in cb.RUNG_ELEMENTS.items() for e in es])
@pytest.mark.parametrize("case", [cb.CASES[2], cb.CASES[4], cb.CASES[6]], ids=["gqa-causal", "empty-rows", "left-window"])
def test_in_kernel_lse_check(rung, element, case):
    """The kernels' own lse check: silent on the right lse, a report for log2 units and for -inf on rows
    that see keys (kernels/bwd_check.cuh)."""
    if not cb.serves(rung, case):
        pytest.skip(f"{rung} does not run d={case[5]} on this GPU")
    row = cb.check_lse_detection(rung, case, element, seed=cb.seed_of("lse", rung, element, case))
    assert row["ok"], row


@needs_gpu
@pytest.mark.parametrize("rung,block,case", _block_params())
def test_every_allowed_block_size(rung, block, case):
    if not cb.serves(rung, case):
        pytest.skip(f"{rung} does not run on this GPU")
    row = cb.check_rung(rung, case, cb.RUNG_ELEMENTS[rung][0], seed=cb.seed_of(rung, block, case), block_size=block)
    assert row["ok"], _explain(row)


def _inputs(dtype, shape=(1, 2, 40, 64)):
    import cupy

    rng = cupy.random.default_rng(cb.seed_of("inputs", shape))
    x = rng.standard_normal(shape, dtype=cupy.float32).astype(dtype)
    lse = cupy.zeros(shape[:3], cupy.float32)
    return x, lse


@needs_gpu
@pytest.mark.parametrize("rung", list(cb.RUNG_ELEMENTS))
def test_unsupported_head_size_block_and_dtype_raise(rung):
    import cupy

    from flashkit.gpu.backward import backward

    dtype = cupy.float32 if cb.RUNG_ELEMENTS[rung][0] == "f32" else cupy.float16
    x, lse = _inputs(dtype, (1, 1, 8, 96))
    with pytest.raises(ValueError, match="d in"):
        backward(rung, x, x, x, x, x, lse, scale=0.1)
    y, lse = _inputs(dtype)
    with pytest.raises(ValueError, match="block_size"):
        backward(rung, y, y, y, y, y, lse, scale=0.1, block_size=(48, 48))
    with pytest.raises(ValueError, match="lse"):
        backward(rung, y, y, y, y, y, lse.astype(cupy.float64), scale=0.1)
    wrong, lse = _inputs(cupy.float64)
    with pytest.raises(TypeError):
        backward(rung, wrong, wrong, wrong, wrong, wrong, lse, scale=0.1)


@needs_gpu
def test_two_kernel_rung_is_deterministic_and_atomics_rung_agrees():
    """No atomics: the two-kernel rung gives bit-identical gradients run after run."""
    case = (1, 4, 2, 300, 300, 64, True, None)
    (Q, K, V, O, dO, lse), _ = cb.make_inputs(case, "f16", cb.seed_of("determinism"), __import__("cupy"))
    from flashkit.gpu.backward import backward

    runs = [backward("cupy-bwd-mma-2kernel", Q, K, V, O, dO, lse, scale=64 ** -0.5, window=(-1, 0)) for _ in range(3)]
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert bool((a == b).all())
    other = backward("cupy-bwd-mma", Q, K, V, O, dO, lse, scale=64 ** -0.5, window=(-1, 0))
    for a, b in zip(runs[0], other):
        a32, b32 = a.astype("float32"), b.astype("float32")
        assert float(abs(a32 - b32).max()) <= 2e-2 * float(abs(b32).max())


@needs_gpu
def test_non_contiguous_input_is_copied_and_inputs_untouched():
    import cupy

    from flashkit.gpu.backward import backward

    case = (1, 2, 2, 64, 64, 32, False, None)
    (Q, K, V, O, dO, lse), _ = cb.make_inputs(case, "f32", cb.seed_of("contig"), cupy)
    wide = cupy.zeros(Q.shape[:-1] + (40,), Q.dtype)
    wide[..., :32] = Q
    q = wide[..., :32]
    assert not q.flags.c_contiguous
    before = [x.copy() for x in (q, K, V, O, dO, lse)]
    g1 = backward("cupy-bwd-fp32", q, K, V, O, dO, lse, scale=32 ** -0.5)
    g2 = backward("cupy-bwd-fp32", cupy.ascontiguousarray(q), K, V, O, dO, lse, scale=32 ** -0.5)
    for a, b in zip(g1, g2):
        assert float(abs(a - b).max()) <= 1e-5 * float(abs(b).max())
    for x, y in zip(before, (q, K, V, O, dO, lse)):
        assert bool((x == y).all())


STANDARD_CASES = [  # B, Hq, Hkv, Nq, Nk, d, causal, masked: awkward sizes, GQA / MQA, a bool mask with a row it hides
    (2, 4, 2, 37, 53, 16, False, False), (1, 8, 1, 130, 77, 32, True, False), (1, 2, 1, 20, 6, 8, True, False),
    (1, 4, 2, 33, 41, 64, False, True), (2, 2, 2, 65, 65, 128, True, True), (1, 2, 2, 1, 1, 1, False, False)]


@needs_gpu
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("case", STANDARD_CASES)
def test_standard_backward_matches_float64(case, dtype):
    """cupy-standard's backward (P and dP materialised, the GPU backward that takes mask= and float64) against
    numpy-standard's in float64 on the host, the gradients poisoned first; "auto" sends mask= to it."""
    import cupy

    import flashkit
    from flashkit import problem as problem_module

    B, Hq, Hkv, Nq, Nk, d, causal, masked = case
    rng = np.random.default_rng(cb.seed_of("standard backward", case, dtype))
    q, do = (rng.standard_normal((B, Hq, Nq, d)) for _ in range(2))
    k, v = (rng.standard_normal((B, Hkv, Nk, d)) for _ in range(2))
    mask = None
    if masked:
        mask = rng.random((B, Hq, Nq, Nk)) < 0.6
        mask[0, 1, 3] = False  # a row that sees no key: lse = -inf, gradients 0
    host = [x.astype(dtype) for x in (q, k, v, do)]
    o, lse = flashkit.attention(*host[:3], causal=causal, mask=mask, backend="numpy-standard", return_lse=True)
    want = flashkit.attention_backward(*(x.astype(np.float64) for x in (host[3], *host[:3], o)), lse.astype(np.float64),
                                       causal=causal, mask=mask, backend="numpy-standard")
    dev = [cupy.asarray(x) for x in (host[3], *host[:3], o)] + [cupy.asarray(lse)]
    before = [x.copy() for x in dev]
    old, problem_module.POISON = problem_module.POISON, True
    try:
        for backend in ("cupy-standard",) + (("auto",) if masked or dtype == "float64" else ()):
            got = flashkit.attention_backward(*dev, causal=causal, mask=None if mask is None else cupy.asarray(mask),
                                              backend=backend)
            tol = {"float64": 1e-10, "float32": 1e-5, "float16": 2e-2}[dtype]
            for name, a, b in zip("qkv", got, want):
                a = cupy.asnumpy(a).astype(np.float64)
                assert a.dtype == np.float64 and np.isfinite(a).all(), f"{backend} d{name} {case} {dtype}: not finite"
                err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
                assert err < tol, f"{backend} d{name} {case} {dtype}: relative error {err:.2e}"
            if masked:
                assert bool((got[0][0, 1, 3] == 0).all())
    finally:
        problem_module.POISON = old
    for x, y in zip(before, dev):
        assert bool((x == y).all())
    wrong = dev[5] / np.log(2)  # lse in log2 units
    if bool((cupy.abs(dev[5]) > 1e-2).any()):
        with pytest.raises(ValueError, match="lse does not belong"):
            flashkit.attention_backward(*dev[:5], wrong, causal=causal, backend="cupy-standard",
                                        mask=None if mask is None else cupy.asarray(mask))
