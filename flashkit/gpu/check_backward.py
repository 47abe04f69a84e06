"""Correctness of every GPU backward rung against a float64 reference backward.

    python -m flashkit.gpu.check_backward              all rungs x dtypes x awkward shapes, a table, exit 1 on failure
    python -m flashkit.gpu.check_backward --sanitize   one small launch per rung/dtype, for compute-sanitizer

The reference (`reference_backward`) is standard attention's backward written out, in float64:

    S = Q K^T * scale,  P = softmax(S) (masked),  O = P V
    dV = P^T dO,  dP = dO V^T,  D = rowsum(dO * O),  dS = P * (dP - D),  dQ = scale dS K,  dK = scale dS^T Q

with query heads grouped onto their K/V head (GQA), so dK and dV sum over the group. Each rung gets O (in
the input dtype) and lse (float32) from that reference's forward, and a random dO; its dQ, dK, dV arrays are
poisoned with NaN first.

Criteria (FlashAttention's tests), for each of dQ, dK, dV, err = max |g - g_64|:
  float16/bfloat16  err <= 2 * max |g_lp - g_64| + atol, where g_lp is the same backward computed in the
                    input dtype (S, P, dP, dS and the products rounded to it, as torch's math backward in
                    that dtype does) and atol = 2 max |(g_64 + 0.3) - 0.3 - g_64| in that dtype (its
                    rounding step at the gradient's magnitude, as flash_attn's tests add);
  float32           err <= max(2 * max |g_32 - g_64|, 1e-5 * max |g_64|) + 1e-6 (g_32: the reference in float32).
Any NaN fails; rows that see no key (lse = -inf) must get dQ = 0 exactly.
The arithmetic is written with an array module `xp`: CuPy on the device; NumPy works too (tests use it here).
"""
from __future__ import annotations

import argparse
import sys
import zlib
from typing import List, Optional

from flashkit.atomic import write_json
from flashkit.gpu.rungs import kernels

# (B, Hq, Hkv, Nq, Nk, d, causal, window): none a multiple of every block size, on purpose
CASES = (
    (1, 1, 1, 1, 1, 64, False, None),          # N = 1
    (1, 2, 2, 1, 77, 64, True, None),          # one query row against 77 keys (decode), causal bottom-right
    (2, 8, 2, 100, 100, 64, True, None),       # GQA 8/2, N not a multiple of the block
    (1, 8, 1, 65, 130, 32, False, None),       # MQA 8/1, Nq < Nk
    (1, 2, 1, 130, 65, 128, True, None),       # Nq > Nk causal: the first 65 rows see no key (dQ = 0)
    (1, 2, 2, 257, 300, 128, False, (32, 16)), # sliding window: keys 0-10 seen by no row (dK = dV = 0)
    (1, 4, 2, 190, 300, 64, False, (50, -1)),  # left-only window
    (2, 2, 1, 333, 333, 64, True, None),
    (1, 4, 4, 513, 513, 32, True, None),
    (1, 2, 2, 1000, 1000, 128, False, None),
)
SANITIZE_CASES = (
    (1, 4, 2, 70, 90, 64, True, None),
    (1, 2, 2, 40, 40, 32, False, None),
    (1, 1, 1, 33, 47, 128, False, (8, 4)),
)
# The backward CUDA rungs and the element types each computes, in ladder order (from flashkit/gpu/rungs.py).
RUNG_ELEMENTS = {r.name: r.elements for r in kernels("backward")}
RUNG_DIMS = {r.name: r.head_dims for r in kernels("backward")}
TABLE = frozenset(RUNG_ELEMENTS)  # rungs with a public backend (a driver may add pseudo-rungs to the dicts above)
GRADS = ("dq", "dk", "dv")
EPS = {"f16": 2.0 ** -10, "bf16": 2.0 ** -7, "f32": 2.0 ** -23}  # a unit in the last place at 1.0


def seed_of(*key) -> int:
    """A stable seed from any key (zlib.crc32 of its repr; hash() changes between processes)."""
    return zlib.crc32(repr(key).encode())


# ---- element types: float32 values rounded to f16 / bf16 and back ------------------------------------------
def to_bf16_bits(x, xp):
    """float32 array -> uint16 bfloat16 bits, rounded to nearest even."""
    u = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    u = u + (xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1)))
    return (u >> 16).astype(xp.uint16)


def from_bf16_bits(b, xp):
    return (b.astype(xp.uint32) << 16).view(xp.float32)


def round_to(x, element, xp):
    """Round to the element type and back to float32 (what storing in that dtype does)."""
    x = x.astype(xp.float32)
    if element == "f16":
        return x.astype(xp.float16).astype(xp.float32)
    if element == "bf16":
        return from_bf16_bits(to_bf16_bits(x, xp), xp)
    return x


def to_device_dtype(x32, element, xp):
    """float32 values -> the array the kernel reads (float32, float16, or bf16 as uint16 bits)."""
    if element == "f32":
        return x32.astype(xp.float32)
    if element == "f16":
        return x32.astype(xp.float16)
    return to_bf16_bits(x32, xp)


def as_float64(x, element, xp):
    return (from_bf16_bits(x, xp) if element == "bf16" else x).astype(xp.float64)


def visibility(Nq, Nk, window, xp):
    """(Nq, Nk) bool, True where query i may see key j (bottom-right aligned window), or None for all."""
    if tuple(window) == (-1, -1):
        return None
    from flashkit.masks import dense_mask

    return xp.asarray(dense_mask(Nq, Nk, tuple(window)))


# ---- the reference backward ------------------------------------------------------------------------------
def reference_backward(Q, K, V, dO, scale, window, xp, element=None, O_given=None):
    """(O, lse, dQ, dK, dV) of standard attention.

    element=None: every step in the arrays' precision (float64 in, float64 out). element in {"f32", "f16",
    "bf16"}: computed in float32 with S, P, dP, dS and each product rounded to the element type, D from
    O_given (the O the kernel was handed, already rounded), as a framework computes in that dtype.
    """
    rnd = (lambda x: x) if element is None else (lambda x: round_to(x, element, xp))
    ct = xp.float64 if element is None else xp.float32
    B, Hq, Nq, d = Q.shape
    _, Hkv, Nk, _ = K.shape
    g = Hq // Hkv
    # The group's query heads become extra rows of one K/V head: row gi * Nq + i is query head hk * g + gi.
    Qg = Q.astype(ct).reshape(B, Hkv, g * Nq, d)  # (B, Hkv, g*Nq, d)
    dOg = dO.astype(ct).reshape(B, Hkv, g * Nq, d)  # (B, Hkv, g*Nq, d)
    K, V = K.astype(ct), V.astype(ct)  # (B, Hkv, Nk, d)
    Kt = xp.swapaxes(K, -1, -2)  # (B, Hkv, d, Nk)
    Vt = xp.swapaxes(V, -1, -2)

    # S = Q K^T * scale, masked;  P = softmax(S);  lse = log(rowsum(exp(S)))
    if element is None:
        S = xp.matmul(Qg, Kt) * scale
    else:
        S = rnd(xp.matmul(rnd(Qg * ct(scale)), Kt))
    S = S.reshape(B, Hkv, g, Nq, Nk)  # (B, Hkv, g, Nq, Nk)
    vis = visibility(Nq, Nk, window, xp)
    if vis is not None:
        S = xp.where(vis, S, -xp.inf)
    m = S.max(axis=-1, keepdims=True)
    m = xp.where(xp.isneginf(m), 0, m)
    E = xp.exp(S - m)
    l = E.sum(axis=-1, keepdims=True)
    P = rnd(E / xp.where(l > 0, l, 1)).reshape(B, Hkv, g * Nq, Nk)  # (B, Hkv, g*Nq, Nk)
    seen = l[..., 0] > 0
    lse = xp.where(seen, m[..., 0] + xp.log(xp.where(seen, l[..., 0], 1)), -xp.inf).reshape(B, Hq, Nq)
    O = rnd(xp.matmul(P, V))  # (B, Hkv, g*Nq, d)
    if O_given is not None:
        O = O_given.astype(ct).reshape(B, Hkv, g * Nq, d)

    # dV = P^T dO (sums the group's rows);  dP = dO V^T;  D = rowsum(dO * O);  dS = P * (dP - D)
    dV = rnd(xp.matmul(xp.swapaxes(P, -1, -2), dOg))  # (B, Hkv, Nk, d)
    dP = rnd(xp.matmul(dOg, Vt))  # (B, Hkv, g*Nq, Nk)
    D = (dOg * O).sum(axis=-1, keepdims=True)  # (B, Hkv, g*Nq, 1)
    dS = rnd(P * (dP - D))
    # dQ = scale dS K;  dK = scale dS^T Q
    dQ = rnd(rnd(xp.matmul(dS, K)) * ct(scale)).reshape(B, Hq, Nq, d)
    dK = rnd(rnd(xp.matmul(xp.swapaxes(dS, -1, -2), Qg)) * ct(scale))  # (B, Hkv, Nk, d)
    return O.reshape(B, Hq, Nq, d), lse, dQ, dK, dV


def make_inputs(case, element, seed, xp):
    """Kernel inputs (Q, K, V, O, dO in the element type, lse float32) and exact float64 copies of Q, K, V, dO, O."""
    B, Hq, Hkv, Nq, Nk, d, causal, window = case
    rng = xp.random.default_rng(seed)
    shapes = ((B, Hq, Nq, d), (B, Hkv, Nk, d), (B, Hkv, Nk, d), (B, Hq, Nq, d))
    dev = [to_device_dtype(rng.standard_normal(s, dtype=xp.float32), element, xp) for s in shapes]
    Q, K, V, dO = dev
    exact = [as_float64(x, element, xp) for x in dev]
    win = window_of(case)
    O64, lse64, *_ = reference_backward(exact[0], exact[1], exact[2], exact[3], 1.0 / d ** 0.5, win, xp)
    O = to_device_dtype(O64.astype(xp.float32), element, xp)
    lse = lse64.astype(xp.float32)
    return (Q, K, V, O, dO, lse), exact + [as_float64(O, element, xp)]


def window_of(case):
    from flashkit.masks import effective_window

    *_, causal, window = case
    return effective_window(causal, window)


def poisoned_grads(Q, K, element, xp):
    """dQ, dK, dV buffers full of NaN (bf16 NaN is 0x7FC0 when held as uint16 bits)."""
    if element == "bf16":
        return tuple(xp.full(s, 0x7FC0, xp.uint16) for s in (Q.shape, K.shape, K.shape))
    return tuple(xp.full(s, xp.nan, Q.dtype) for s in (Q.shape, K.shape, K.shape))


def _max_abs(x, xp):
    return float(xp.abs(x).max()) if x.size else 0.0


def _first_mismatches(got, want, tol, xp, k=3):
    bad = xp.argwhere(~(xp.abs(got - want) <= tol))[:k]
    bad = bad.get() if hasattr(bad, "get") else bad
    return "; ".join(f"{tuple(int(v) for v in idx)}: got {float(got[tuple(idx)]):.6g}, want {float(want[tuple(idx)]):.6g}"
                     for idx in bad)


def compare(grads, inputs, exact, case, element, xp) -> dict:
    """Errors of (dQ, dK, dV) against the float64 reference and whether they meet the criteria."""
    *_, d, causal, window = case
    scale, win = 1.0 / d ** 0.5, window_of(case)
    Q64, K64, V64, dO64, Ogiven = exact
    _, lse64, *ref = reference_backward(Q64, K64, V64, dO64, scale, win, xp)
    *_, lse32 = inputs
    # the same backward in the input dtype (float32 for the fp32 rung), from the O the kernel was handed
    _, _, *lowp = reference_backward(Q64, K64, V64, dO64, scale, win, xp, element=element, O_given=Ogiven)
    row = dict(ok=True, criterion="2x lowp" if element != "f32" else "max(2x fp32 ref, rel 1e-5)")
    for name, got, want, lp in zip(GRADS, grads, ref, lowp):
        got = as_float64(got, element, xp)
        lp = lp.astype(xp.float64)
        nan = bool(xp.isnan(got).any())
        err = _max_abs(xp.where(xp.isfinite(got), got - want, 0), xp)
        lp_err = _max_abs(lp - want, xp)
        if element == "f32":
            tol = max(2 * lp_err, 1e-5 * _max_abs(want, xp)) + 1e-6
        else:  # FlashAttention's atol: twice the rounding step of the dtype at the gradient's magnitude + 0.3
            w = round_to(want, element, xp)
            tol = 2 * lp_err + 2 * _max_abs(round_to(w + 0.3, element, xp) - 0.3 - w, xp)
        finite = bool(xp.isfinite(got).all())
        ok = (not nan) and finite and err <= tol
        row[name] = dict(err=err, tol=tol, ref_lowp_err=lp_err, nan=nan, ok=ok)
        if not ok and not nan:
            row[name]["first_mismatches"] = _first_mismatches(got, want, tol, xp)
        row["ok"] = row["ok"] and ok
    # rows that saw no key: dQ exactly 0 (and the pattern of -inf in the lse the rung was given is the oracle's)
    empty = xp.isneginf(lse64)
    dq = as_float64(grads[0], element, xp)
    row["empty_rows"] = int(empty.sum())
    row["empty_rows_zero"] = bool((xp.where(empty[..., None], dq, 0) == 0).all()) and bool(
        (xp.isneginf(lse32) == empty).all())
    row["ok"] = row["ok"] and row["empty_rows_zero"]
    return row


def check_rung(rung, case, element, seed=0, block_size=None, xp=None, backward=None) -> dict:
    """Run one backward rung once on fresh random input with poisoned gradients and compare.

    `backward` defaults to flashkit.gpu.backward.backward and `xp` to CuPy; tests pass others to check this
    checker without a GPU.
    """
    if xp is None:
        import cupy as xp
    if backward is None:
        from flashkit.gpu.backward import backward
    inputs, exact = make_inputs(case, element, seed, xp)
    Q, K, V, O, dO, lse = inputs
    dq, dk, dv = poisoned_grads(Q, K, element, xp)
    *_, d, causal, window = case
    grads = backward(rung, Q, K, V, O, dO, lse, scale=1.0 / d ** 0.5, window=window_of(case), element=element,
                     block_size=block_size, dq_out=dq, dk_out=dk, dv_out=dv)
    for given, got in zip((dq, dk, dv), grads):
        assert got is given, "the rung must write into the arrays it was given"
    row = compare(grads, inputs, exact, case, element, xp)
    row.update(rung=rung, element=element, case=list(case), block_size=None if block_size is None else list(block_size),
               seed=seed)
    return row


def rungs():
    return [(name, e) for name in RUNG_ELEMENTS for e in RUNG_ELEMENTS[name]]


def serves(rung, case) -> bool:
    """Whether `rung` is checked on `case`: it is available on this GPU (cupy-bwd-wgmma needs a Hopper) and takes its
    head size (cupy-bwd-wgmma: d in {64, 128})."""
    from flashkit.gpu.backward import RUNGS

    return case[5] in RUNG_DIMS[rung] and RUNGS[rung].backend().available


def check_lse_detection(rung, case, element, seed=0, xp=None) -> dict:
    """The in-kernel lse check (kernels/bwd_check.cuh) on one case: silent for the right lse, and a report
    for lse in log2 units, for another call's lse (rows shuffled) and for -inf on rows that see keys."""
    if xp is None:
        import cupy as xp
    from flashkit.gpu.backward import LseCheck, backward

    inputs, _ = make_inputs(case, element, seed, xp)
    Q, K, V, O, dO, lse = inputs
    *_, d, causal, window = case
    finite = xp.isfinite(lse)
    wrong = {
        "right": lse,
        "log2 units": xp.where(finite, lse * xp.float32(1.4426950408889634), lse),
        "other rows": xp.ascontiguousarray(lse[..., ::-1]) if lse.shape[-1] > 1 else lse + 1,
        "-inf": xp.where(finite, -xp.inf, lse).astype(xp.float32),
    }
    seen = {}
    for what, given in wrong.items():
        check = LseCheck(Q.shape[:3])
        backward(rung, Q, K, V, O, dO, xp.ascontiguousarray(given, dtype=xp.float32), scale=1.0 / d ** 0.5,
                 window=window_of(case), element=element, check=check)
        seen[what] = check.error()
    # a lse shifted by a constant is off on every row that sees a key; rows with lse = -inf stay right
    any_finite = bool(finite.any())
    ok = seen["right"] is None and (not any_finite or all(seen[w] is not None for w in ("log2 units", "-inf")))
    row = dict(rung=rung, element=element, case=list(case), seed=seed, lse_check=True, ok=ok,
               errors={k: v for k, v in seen.items()})
    return row


def run_all(verbose=True, seed=0, only=None) -> List[dict]:
    from flashkit.gpu.backward import RUNGS

    rows = []
    for ci, case in enumerate(CASES):
        for name, element in rungs():
            if (only and name not in only) or not serves(name, case):
                continue
            rows.append(check_rung(name, case, element, seed_of(seed, name, element, ci)))
            if verbose:
                print_row(rows[-1])
    # every block size a user (or the benchmark's sweep) may force, on two awkward cases
    for name, spec in RUNGS.items():
        if only and name not in only:
            continue
        element = RUNG_ELEMENTS[name][0]
        for case in (CASES[2], CASES[5]):
            if not serves(name, case):
                continue
            for bs in spec.allowed(case[5]):
                if tuple(bs) == spec.default_blocks[case[5]]:
                    continue
                rows.append(check_rung(name, case, element, seed_of(seed, name, bs, case), block_size=bs))
                if verbose:
                    print_row(rows[-1])
    # the in-kernel lse check: silent on the right lse, loud on wrong ones (every rung, dtype, three cases)
    for case in (CASES[2], CASES[4], CASES[6]):
        for name, element in rungs():
            if (only and name not in only) or not serves(name, case):
                continue
            rows.append(check_lse_detection(name, case, element, seed_of(seed, "lse", name, element, case)))
            if verbose:
                print_row(rows[-1])
    # the public call on each rung: the rung's bits, bad input named, a wrong lse refused
    for name, elements in RUNG_ELEMENTS.items():
        if (only and name not in only) or name not in TABLE or not serves(name, CASES[2]):
            continue
        element = next(e for e in elements if e != "bf16")  # bf16 reaches the public call from torch only
        try:
            rows.append(check_public(name, CASES[2], element, seed_of(seed, "public", name)))
        except Exception as exc:  # a failure of one rung's public path is a FAIL row, not the end of the check
            rows.append(dict(rung=name, element=element, case=list(CASES[2]) + ["public"], seed=0, lse_check=True,
                             ok=False, errors={"exception": f"{type(exc).__name__}: {exc}"}))
        if verbose:
            print_row(rows[-1])
    if verbose:
        summary(rows)
    return rows


def check_public(rung, case, element, seed=0) -> dict:
    """flashkit.attention_backward(..., backend=<rung>) against the rung called directly (the same bits, but for
    the order of atomic sums); then
    NaN in each of q, k, v, do, o (and +inf in lse) must raise naming it, and lse in log2 units must raise."""
    import cupy

    import flashkit
    from flashkit.gpu.backward import backward

    (Q, K, V, O, dO, lse), _ = make_inputs(case, element, seed, cupy)
    *_, d, causal, window = case
    kw = dict(causal=causal, window=window, backend=rung)
    got = flashkit.attention_backward(dO, Q, K, V, O, lse, **kw)
    want = backward(rung, Q, K, V, O, dO, lse, scale=1.0 / d ** 0.5, window=window_of(case), element=element)
    # The same bits, except where the kernel adds with atomics (dQ; dK and dV of a GQA group): their order
    # varies from run to run, so a sum may differ in its last bits. Up to 4 units in the last place of the
    # largest gradient, then: a public call that ran something else (another scale, another rung's blocking of
    # the sums in float16) is off by far more, and the error against float64 is checked by the other rows.
    exact = [(as_float64(a, element, cupy), as_float64(b, element, cupy)) for a, b in zip(got, want)]
    diffs = [float(abs(a - b).max()) / max(float(abs(b).max()), 1e-30) for a, b in exact]
    same = all(x <= 4 * EPS[element] for x in diffs)
    said = {}
    args = dict(do=dO, q=Q, k=K, v=V, o=O, lse=lse)
    for arg in args:
        bad = dict(args)
        x = args[arg].copy()
        x.reshape(-1)[x.size // 2] = cupy.inf if arg == "lse" else cupy.nan
        bad[arg] = x
        try:
            flashkit.attention_backward(bad["do"], bad["q"], bad["k"], bad["v"], bad["o"], bad["lse"], **kw)
            said[arg] = "silent"
        except ValueError as exc:
            said[arg] = "raised" if str(exc).startswith(f"{arg} contains NaN") else f"raised: {exc}"[:120]
    try:
        flashkit.attention_backward(dO, Q, K, V, O, cupy.where(cupy.isfinite(lse), lse * 1.4426950408889634, lse)
                                    .astype(cupy.float32), **kw)
        said["lse in log2 units"] = "silent"
    except ValueError as exc:
        said["lse in log2 units"] = "raised" if "lse does not belong" in str(exc) else f"raised: {exc}"[:120]
    ok = same and all(v == "raised" for v in said.values())
    return dict(rung=rung, element=element, case=list(case) + ["public"], seed=seed, lse_check=True, ok=ok,
                same_as_rung=same, rel_diff_to_rung=dict(zip(GRADS, diffs)), errors={k: (None if v == "silent" else v) for k, v in said.items()})


def print_header():
    print(f"{'rung':<21} {'dtype':>5} {'block':>10} {'case (B,Hq,Hkv,Nq,Nk,d,causal,window)':<42} "
          f"{'dq err/tol':>19} {'dk err/tol':>19} {'dv err/tol':>19}  ok", flush=True)


def print_row(r):
    if r.get("lse_check"):
        said = "; ".join(f"{k}: {'raised' if v else 'silent'}" for k, v in r["errors"].items())
        print(f"{r['rung']:<21} {r['element']:>5} {'lse check':>10} {str(tuple(r['case'])):<42} {said}  "
              f"{'PASS' if r['ok'] else 'FAIL'}", flush=True)
        if not r["ok"] and r["errors"].get("right"):
            print(f"       the right lse raised: {r['errors']['right']}", flush=True)
        return
    bs = "default" if r["block_size"] is None else str(tuple(r["block_size"]))
    errs = " ".join(f"{r[g]['err']:9.2e}/{r[g]['tol']:9.2e}" for g in GRADS)
    print(f"{r['rung']:<21} {r['element']:>5} {bs:>10} {str(tuple(r['case'])):<42} {errs}  "
          f"{'PASS' if r['ok'] else 'FAIL'}", flush=True)
    if not r["ok"]:
        for g in GRADS:
            if not r[g]["ok"]:
                print(f"       {g}: nan={r[g]['nan']} (lowp ref err {r[g]['ref_lowp_err']:.2e}) "
                      f"{r[g].get('first_mismatches', '')}", flush=True)
        if not r["empty_rows_zero"]:
            print(f"       rows that see no key ({r['empty_rows']}) did not get dQ = 0", flush=True)
        print(f"       seed={r['seed']}", flush=True)


def summary(rows):
    n_bad = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - n_bad}/{len(rows)} checks pass", flush=True)


def sanitize_run(only=None):
    """One small launch of every rung and element type; run under compute-sanitizer.

    CuPy's memory pool hands out pieces of large blocks, so an out-of-bounds access inside the pool would
    go unseen by memcheck: the pool is switched off and every array is its own cudaMalloc.
    """
    import cupy

    cupy.cuda.set_allocator(None)
    rows = []
    print_header()
    for case in SANITIZE_CASES:
        for name, element in rungs():
            if (only and name not in only) or not serves(name, case):
                continue
            rows.append(check_rung(name, case, element, seed_of("sanitize", name, element, case)))
            print_row(rows[-1])
            if case is SANITIZE_CASES[0]:  # the lse check's report path too (bwd_lse_check, the dQ kernel's test)
                rows.append(check_lse_detection(name, case, element, seed_of("sanitize-lse", name, element, case)))
                print_row(rows[-1])
    cupy.cuda.Device().synchronize()
    summary(rows)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sanitize", action="store_true", help="small launches only (for compute-sanitizer)")
    ap.add_argument("--rung", action="append", help="only this rung (repeatable)")
    ap.add_argument("--json", help="write the rows (and NVRTC compile times) to this file")
    args = ap.parse_args(argv)
    if args.sanitize:
        rows = sanitize_run(args.rung)
    else:
        print_header()
        rows = run_all(only=args.rung)
    if args.json:
        from flashkit.gpu.backward import COMPILE_SECONDS

        compile_s = [dict(rung=k[0], d=k[1], element=k[2], Br=k[3], Bc=k[4], seconds=v) for k, v in COMPILE_SECONDS.items()]
        write_json(args.json, dict(rows=rows, passed=sum(r["ok"] for r in rows), total=len(rows), compile_seconds=compile_s))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
