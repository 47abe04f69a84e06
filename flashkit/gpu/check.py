"""Correctness of every GPU rung against a float64 oracle computed on the device.

    python -m flashkit.gpu.check              all rungs x dtypes x awkward shapes, a table, exit 1 on failure
    python -m flashkit.gpu.check --sanitize   one small launch per rung/dtype, for compute-sanitizer

Criteria (as FlashAttention's tests state them):
  float32 rungs    max|O - O_64| / max|O_64| <= 1e-5, and the same for lse (finite entries);
  float16/bfloat16 max|O - O_64| <= 2 * max|O_lp - O_64| + 1e-6, where O_lp is standard attention with
                   S, P and O rounded to the input dtype (what torch computes in that dtype); lse likewise.
  TF32 rung (8)    the same with O_lp computed from Q, K, V and P rounded to TF32 (what the kernel rounds).
Outputs are poisoned with NaN before every launch; any NaN left fails. Rows that see no key must give
O = 0 and lse = -inf, and the -inf pattern of lse must match the oracle's exactly.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from flashkit.atomic import write_json
from flashkit.gpu.rungs import kernels

# (B, Hq, Hkv, Nq, Nk, d, causal, window): none a multiple of every block size, on purpose
CASES = (
    (1, 1, 1, 1, 1, 64, False, None),          # N = 1
    (1, 2, 2, 1, 77, 64, True, None),          # one query row against 77 keys (decode), causal bottom-right
    (2, 4, 2, 100, 100, 64, True, None),       # GQA 4/2, N not a multiple of the block
    (1, 3, 1, 65, 130, 32, False, None),       # MQA, Nq < Nk
    (1, 2, 1, 130, 65, 128, True, None),       # Nq > Nk causal: the first 65 rows see no key (O = 0, lse = -inf)
    (1, 2, 2, 257, 300, 128, False, (32, 16)), # sliding window
    (2, 2, 1, 333, 333, 64, True, None),
    (1, 4, 4, 513, 513, 32, True, None),
    (1, 2, 2, 1000, 1000, 128, False, None),
)
# The forward CUDA rungs and the element types each computes, in ladder order (from flashkit/gpu/rungs.py).
ELEMENT_OF = {r.number: r.elements for r in kernels("forward")}
HEAD_DIMS_OF = {r.number: r.head_dims for r in kernels("forward")}
CHECKS_INPUTS = {r.number for r in kernels("forward") if r.checks_inputs}  # rung 7: its kernel tests q, k, v too


def _precision(rung) -> str:
    from flashkit.gpu.rungs import rung as row

    return row(rung).precision


def runs(rung, case) -> bool:
    """Whether `rung` is checked on `case`: it is available on this GPU (rung 7 needs a Hopper) and takes its d."""
    from flashkit.gpu.rungs import rung as row

    return case[5] in HEAD_DIMS_OF[rung] and row(rung).backend().available


# ---- bfloat16 as uint16 bits (CuPy may not hold a bfloat16 dtype) -------------------------------------
def to_bf16_bits(x32):
    """float32 array -> uint16 bfloat16 bits, rounded to nearest even."""
    import cupy

    u = x32.astype(cupy.float32).view(cupy.uint32)
    u = u + (cupy.uint32(0x7FFF) + ((u >> 16) & 1))
    return (u >> 16).astype(cupy.uint16)


def from_bf16_bits(b16):
    import cupy

    return (b16.astype(cupy.uint32) << 16).view(cupy.float32)


def round_to(x32, element):
    """Round float32 values to the element type and back (what storing in that dtype does)."""
    import cupy

    if element == "f16":
        return x32.astype(cupy.float16).astype(cupy.float32)
    if element == "bf16":
        return from_bf16_bits(to_bf16_bits(x32))
    if element == "tf32":  # 10 mantissa bits, rounded to nearest (ties away, as cvt.rna.tf32.f32)
        u = x32.astype(cupy.float32).view(cupy.uint32)
        return ((u + cupy.uint32(0x1000)) & cupy.uint32(0xFFFFE000)).view(cupy.float32)
    return x32


def make_inputs(case, element, seed):
    """Q, K, V for the kernel (device arrays of the element type) and their exact float64 values."""
    import cupy

    B, Hq, Hkv, Nq, Nk, d, causal, window = case
    rng = cupy.random.default_rng(seed)
    xs32 = [rng.standard_normal((B, H, N, d), dtype=cupy.float32) for H, N in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk))]
    if element == "f32":
        dev = xs32
    elif element == "f16":
        dev = [x.astype(cupy.float16) for x in xs32]
    else:
        dev = [to_bf16_bits(x) for x in xs32]
    exact = [as_float32(x, element).astype(cupy.float64) for x in dev]
    return dev, exact


def as_float32(x, element):
    import cupy

    return from_bf16_bits(x) if element == "bf16" else x.astype(cupy.float32)


def problem_of(Q, K, V, case):
    import cupy

    from flashkit.masks import effective_window
    from flashkit.problem import Problem

    *_, d, causal, window = case
    return Problem(Q=Q, K=K, V=V, scale=1.0 / d ** 0.5, causal=causal, window=effective_window(causal, window),
                   mask=None, block_size=None, xp=cupy)


def reference64(exact, case):
    from flashkit.gpu.standard import attention_arrays
    import cupy

    return attention_arrays(problem_of(*exact, case), cupy.float64)


def reference_lowp(exact, case, element):
    """Standard attention with S, P and O rounded to the element type (FlashAttention's 'same dtype' reference)."""
    import cupy

    from flashkit.gpu.standard import visibility

    pb = problem_of(*exact, case)
    B, Hkv, g, Nq, Nk, d = pb.B, pb.Hkv, pb.group, pb.Nq, pb.Nk, pb.d
    if element == "tf32":  # the TF32 rung rounds its operands Q, K, V and P; S and O are fp32 sums
        Q = (round_to(exact[0].astype(cupy.float32), element) * cupy.float32(pb.scale)).reshape(B, Hkv, g * Nq, d)
        K, V = (round_to(x.astype(cupy.float32), element) for x in exact[1:])
    else:
        Q = round_to((exact[0] * pb.scale).astype(cupy.float32), element).reshape(B, Hkv, g * Nq, d)
        K, V = (x.astype(cupy.float32) for x in exact[1:])
    S = cupy.matmul(Q, K.transpose(0, 1, 3, 2))
    S = (S if element == "tf32" else round_to(S, element)).reshape(B, Hkv, g, Nq, Nk)
    vis = visibility(pb, cupy)
    if vis is not None:
        S = cupy.where(vis, S, -cupy.inf)
    m = S.max(axis=-1, keepdims=True)
    m = cupy.where(cupy.isneginf(m), 0, m)
    E = cupy.exp(S - m)
    l = E.sum(axis=-1, keepdims=True)
    P = round_to(E / cupy.where(l > 0, l, 1), element)
    O = cupy.matmul(P.reshape(B, Hkv, g * Nq, Nk), V)
    O = O if element == "tf32" else round_to(O, element)
    seen = l[..., 0] > 0
    lse = cupy.where(seen, m[..., 0] + cupy.log(cupy.where(seen, l[..., 0], 1)), -cupy.inf)
    return O.reshape(B, Hkv * g, Nq, d).astype(cupy.float64), lse.reshape(B, Hkv * g, Nq).astype(cupy.float64)


def _max_abs_diff(a, b):
    """max |a - b| over entries where both are finite, as a Python float (0 if there are none)."""
    import cupy

    both = cupy.isfinite(a) & cupy.isfinite(b)
    if not bool(both.any()):
        return 0.0
    return float(cupy.abs(cupy.where(both, a, 0) - cupy.where(both, b, 0)).max())


def _first_mismatches(O, ref, tol, k=3):
    import cupy

    bad = cupy.argwhere(~(cupy.abs(O - ref) <= tol))[:k].get()
    return "; ".join(f"{tuple(int(v) for v in idx)}: got {float(O[tuple(idx)]):.6g}, want {float(ref[tuple(idx)]):.6g}"
                     for idx in bad)


def compare(O, lse, exact, case, element, lowp=None, precision="exact") -> dict:
    """Errors of (O, lse) against the float64 oracle and whether they meet the criteria (`precision`: the
    rung's, "tf32" holds float32 output to the TF32 reference)."""
    import cupy

    O64, lse64 = reference64(exact, case)
    O = as_float32(O, element).astype(cupy.float64)
    lse = lse.astype(cupy.float64)
    nan = bool(cupy.isnan(O).any()) or bool(cupy.isnan(lse).any())
    inf_ok = bool((cupy.isneginf(lse) == cupy.isneginf(lse64)).all()) and bool(cupy.isfinite(O).all())
    empty_rows_zero = bool((cupy.where(cupy.isneginf(lse64)[..., None], O, 0) == 0).all())
    err = _max_abs_diff(O, O64)
    lse_err = _max_abs_diff(lse, lse64)
    if element == "f32" and precision != "tf32":
        scale_o = max(float(cupy.abs(O64).max()), 1e-30)
        fin = lse64[cupy.isfinite(lse64)]
        scale_l = max(1.0, float(cupy.abs(fin).max()) if fin.size else 1.0)
        tol, lse_tol = 1e-5 * scale_o, 1e-5 * scale_l
        crit = "rel 1e-5"
    else:
        O_lp, lse_lp = lowp if lowp is not None else reference_lowp(exact, case, "tf32" if precision == "tf32" else element)
        tol = 2 * _max_abs_diff(O_lp, O64) + 1e-6
        lse_tol = 2 * _max_abs_diff(lse_lp, lse64) + 1e-6
        crit = "2x tf32" if precision == "tf32" else "2x lowp"
    ok = (not nan) and inf_ok and empty_rows_zero and err <= tol and lse_err <= lse_tol
    row = dict(err=err, tol=tol, lse_err=lse_err, lse_tol=lse_tol, nan=nan, inf_pattern_ok=inf_ok,
               empty_rows_zero=empty_rows_zero, criterion=crit, ok=ok)
    if not ok and not nan:
        row["first_mismatches"] = _first_mismatches(O, O64, tol)
    return row


def poisoned_outputs(Q, element):
    """O and lse buffers full of NaN (bf16 NaN is 0x7FC0 when held as uint16 bits)."""
    import cupy

    B, Hq, Nq, d = Q.shape
    if element == "bf16":
        O = cupy.full(Q.shape, 0x7FC0, cupy.uint16)
    else:
        O = cupy.full(Q.shape, cupy.nan, Q.dtype)
    return O, cupy.full((B, Hq, Nq), cupy.nan, cupy.float32)


def check_rung(rung, case, element, seed=0, block_size=None) -> dict:
    """Run one kernel rung once on fresh random input with poisoned outputs and compare."""
    from flashkit.gpu.flash import forward
    from flashkit.masks import effective_window

    (Q, K, V), exact = make_inputs(case, element, seed)
    *_, d, causal, window = case
    O, lse = poisoned_outputs(Q, element)
    forward(rung, Q, K, V, scale=1.0 / d ** 0.5, window=effective_window(causal, window), element=element,
            block_size=block_size, out=O, lse_out=lse)
    row = compare(O, lse, exact, case, element, precision=_precision(rung))
    row.update(rung=rung, element=element, case=case, block_size=block_size)
    return row


def check_standard(case, element, seed=0) -> dict:
    """Rung 1 (cupy-standard) through its Backend runner (float32; float16 upcast inside)."""
    import cupy

    from flashkit.gpu.standard import standard_attention

    (Q, K, V), exact = make_inputs(case, element, seed)
    O, lse = standard_attention(problem_of(Q, K, V, case))
    row = compare(O, lse.astype(cupy.float32), exact, case, element)
    row.update(rung=1, element=element, case=case, block_size=None)
    return row


def run_all(verbose=True, seed=0, only=None) -> List[dict]:
    """Every check; `only` (a set of forward rung numbers) limits them to those rungs (rung 1: the standard path)."""
    rows = []
    picked = {r: e for r, e in ELEMENT_OF.items() if only is None or r in only}
    for ci, case in enumerate(CASES):
        for element in ("f32", "f16") if only is None or 1 in only else ():
            rows.append(check_standard(case, element, seed + ci))
        for rung, elements in picked.items():
            for element in elements if runs(rung, case) else ():
                rows.append(check_rung(rung, case, element, seed + ci))
    # every block size a user (or the benchmark's sweep) may force, on two awkward cases
    for spec in (s for s in kernels("forward") if s.number in picked):
        for case in (c for c in (CASES[2], CASES[5]) if runs(spec.number, c)):
            for bs in spec.allowed(case[5]):
                rows.append(check_rung(spec.number, case, spec.elements[0], seed + 100, block_size=bs))
    # large scores (|S| up to ~30): the running max must keep every exp() finite
    big = (1, 2, 1, 200, 180, 64, True, None)
    for rung, elements in picked.items():
        for element in elements if runs(rung, big) else ():
            rows.append(_check_scaled(rung, big, element, 4.0, seed + 7))
    # the public call on each rung: the same output as the rung, and NaN/Inf in any input caught by default
    for spec in (s for s in kernels("forward") if s.number in picked and runs(s.number, CASES[2])):
        element = next(e for e in spec.elements if e != "bf16")  # bf16 reaches the public call from torch only
        try:
            rows.append(check_public(spec.number, CASES[2], element, seed + 11))
        except Exception as exc:  # a failure of one rung's public path is a FAIL row, not the end of the check
            rows.append(dict(rung=spec.number, element=element, case=CASES[2] + ("public",), block_size=None, ok=False,
                             err=float("nan"), tol=0.0, lse_err=float("nan"), lse_tol=0.0, nan=False,
                             inf_pattern_ok=False, empty_rows_zero=False, first_mismatches=f"{type(exc).__name__}: {exc}"))
    if verbose:
        print_table(rows)
    return rows


def check_public(rung, case, element, seed=0) -> dict:
    """flashkit.attention(..., backend=<rung>) against the rung called directly (the same bits), then with a
    NaN in each of q, k and v in turn: each must raise ValueError naming that argument."""
    import cupy

    import flashkit
    from flashkit.gpu.flash import forward
    from flashkit.gpu.rungs import rung as rung_row
    from flashkit.masks import effective_window

    name = rung_row(rung).name
    (Q, K, V), exact = make_inputs(case, element, seed)
    *_, d, causal, window = case
    precision = _precision(rung)
    O, lse = flashkit.attention(Q, K, V, causal=causal, window=window, backend=name, return_lse=True, precision=precision)
    O_r, lse_r = forward(rung, Q, K, V, scale=1.0 / d ** 0.5, window=effective_window(causal, window), element=element)
    row = compare(O, lse, exact, case, element, precision=precision)
    same = bool((O == O_r).all()) and bool((lse == lse_r).all())
    caught = {}
    for i, arg in enumerate("qkv"):
        args = [Q, K, V]
        bad = args[i].copy()
        bad.reshape(-1)[bad.size // 2] = cupy.nan
        args[i] = bad
        try:
            flashkit.attention(*args, causal=causal, window=window, backend=name, precision=precision)
            caught[arg] = False
        except ValueError as exc:
            caught[arg] = f"{arg} contains NaN" in str(exc)
    row.update(rung=rung, element=element, case=case + ("public",), block_size=None, same_as_rung=same,
               nan_caught=caught, ok=row["ok"] and same and all(caught.values()))
    return row


def _check_scaled(rung, case, element, factor, seed):
    """Like check_rung with Q multiplied by `factor` (peaky softmax)."""
    import cupy

    from flashkit.gpu.flash import forward
    from flashkit.masks import effective_window

    (Q, K, V), exact = make_inputs(case, element, seed)
    if element == "f32":
        Q = Q * cupy.float32(factor)
    elif element == "f16":
        Q = (Q.astype(cupy.float32) * factor).astype(cupy.float16)
    else:
        Q = to_bf16_bits(from_bf16_bits(Q) * factor)
    exact = [as_float32(Q, element).astype(cupy.float64)] + exact[1:]
    *_, d, causal, window = case
    O, lse = poisoned_outputs(Q, element)
    forward(rung, Q, K, V, scale=1.0 / d ** 0.5, window=effective_window(causal, window), element=element,
            out=O, lse_out=lse)
    row = compare(O, lse, exact, case, element, precision=_precision(rung))
    row.update(rung=rung, element=element, case=case + (f"Q*{factor}",), block_size=None)
    return row


def print_table(rows):
    print(f"{'rung':>4} {'dtype':>5} {'block':>10} {'case (B,Hq,Hkv,Nq,Nk,d,causal,window)':<44} "
          f"{'err':>9} {'tol':>9} {'lse_err':>9} {'lse_tol':>9}  ok")
    for r in rows:
        bs = "default" if r["block_size"] is None else str(tuple(r["block_size"]))
        print(f"{r['rung']:>4} {r['element']:>5} {bs:>10} {str(r['case']):<44} {r['err']:9.2e} {r['tol']:9.2e} "
              f"{r['lse_err']:9.2e} {r['lse_tol']:9.2e}  {'PASS' if r['ok'] else 'FAIL'}")
        if not r["ok"]:
            print(f"       nan={r['nan']} inf_pattern_ok={r['inf_pattern_ok']} empty_rows_zero={r['empty_rows_zero']} "
                  f"{r.get('first_mismatches', '')}")
    n_bad = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - n_bad}/{len(rows)} checks pass")


def sanitize_run(only=None):
    """One small launch of every rung and element type; run under compute-sanitizer.

    CuPy's memory pool hands out pieces of large blocks, so an out-of-bounds access inside the pool
    would go unseen by memcheck: the pool is switched off and every array is its own cudaMalloc. A rung
    whose kernel checks its inputs for NaN/Inf (CHECKS_INPUTS) also runs check_public, whose calls take
    that path, clean and with a NaN in each of q, k and v.
    """
    import cupy

    cupy.cuda.set_allocator(None)
    rows = []
    cases = ((1, 2, 1, 70, 90, 64, True, None), (1, 2, 2, 128, 128, 32, False, None), (1, 1, 1, 33, 47, 128, False, (8, 4)))
    for case in cases:
        for rung, elements in ELEMENT_OF.items():
            for element in elements if runs(rung, case) and (only is None or rung in only) else ():
                rows.append(check_rung(rung, case, element, 3))
                if rung in CHECKS_INPUTS and element != "bf16":  # its NaN/Inf check, through the public call
                    rows.append(check_public(rung, case, element, seed=3))
    cupy.cuda.Device().synchronize()
    print_table(rows)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sanitize", action="store_true", help="small launches only (for compute-sanitizer)")
    ap.add_argument("--json", help="write the rows (and NVRTC compile times) to this file")
    ap.add_argument("--rungs", help="comma-separated forward rung numbers to check (default: all)")
    args = ap.parse_args(argv)
    only = {int(x) for x in args.rungs.split(",")} if args.rungs else None
    rows = sanitize_run(only) if args.sanitize else run_all(only=only)
    if args.json:
        from flashkit.gpu.flash import COMPILE_SECONDS

        clean = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows]
        compile_s = [dict(rung=k[0], d=k[1], element=k[2], Br=k[3], Bc=k[4], seconds=v) for k, v in COMPILE_SECONDS.items()]
        write_json(args.json, dict(rows=clean, passed=sum(r["ok"] for r in rows), total=len(rows), compile_seconds=compile_s))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
