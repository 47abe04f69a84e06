"""GPU decode check: the register kernel and the BULK kernel against float64 NumPy on awkward shapes (odd
cache lengths, L = 0 and 1, d 64 / 128 / 256, GQA groups, several row groups, fp32), outputs poisoned first.

    python tools/gpu_decode_check.py            # all cases, all variants; exit 1 on a mismatch
    python tools/gpu_decode_check.py --small    # two cases (for compute-sanitizer)
"""
import sys

import numpy as np

CASES = [
    # B, Hq, Hkv, Nq, Nmax, d, dtype, length, causal, splits
    (1, 32, 8, 1, 4096, 128, "float16", None, False, "auto"),
    (2, 32, 8, 1, 1000, 128, "float16", [1000, 333], False, 7),
    (3, 8, 1, 2, 513, 128, "float16", [0, 5, 513], True, 1000),
    (1, 16, 1, 1, 300, 64, "float16", 300, False, 3),
    (2, 6, 2, 3, 257, 256, "float16", [257, 100], True, 4),
    (1, 4, 4, 1, 2000, 128, "float32", 1999, False, 16),
    (2, 12, 3, 2, 700, 64, "float32", [650, 1], True, "auto"),
    (1, 2, 1, 1, 50, 128, "float32", 0, False, 5),
    (2, 32, 8, 1, 4097, 128, "float16", [1, 4097], False, "auto"),
    (1, 8, 2, 1, 33, 256, "float16", 33, False, 2),
]
VARIANTS = [None, (3, 16384), (4, 8192)]


def main():
    import cupy as cp

    from flashkit.decode import attention_decode, check
    from flashkit.gpu import decode as gpu_decode

    small = "--small" in sys.argv
    cases = CASES[1:3] + CASES[5:6] if small else CASES
    variants = [None, (3, 16384)] if small else VARIANTS
    bad = 0
    for ci, (B, Hq, Hkv, Nq, Nmax, d, dtype, length, causal, splits) in enumerate(cases):
        rng = np.random.default_rng(ci)
        q = rng.standard_normal((B, Hq, Nq, d)).astype(dtype)
        k = rng.standard_normal((B, Hkv, Nmax, d)).astype(dtype)
        v = rng.standard_normal((B, Hkv, Nmax, d)).astype(dtype)
        la = np.array(length) if isinstance(length, list) else length
        ref_o, ref_lse = attention_decode(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), length=la,
                                          causal=causal, backend="numpy-splitk", return_lse=True)
        P = check(cp.asarray(q), cp.asarray(k), cp.asarray(v), length=la, causal=causal)
        for bulk in variants:
            n = gpu_decode.auto_splits(P, bulk=bulk) if splits == "auto" else splits
            step = gpu_decode.prepare(P, n, bulk=bulk)
            o, lse = step()  # then poison the outputs and run again
            o[...] = np.nan
            lse[...] = np.nan
            o, lse = step()
            o64, l64 = cp.asnumpy(o).astype(np.float64), cp.asnumpy(lse).astype(np.float64)
            rtol = 3e-3 if dtype == "float16" else 1e-5
            tol = 2e-3 if dtype == "float16" else 1e-5
            seen = np.isfinite(ref_lse)
            err_o = float(np.abs(o64 - ref_o).max()) if o64.size else 0.0
            ok = (np.isfinite(o64).all() and np.allclose(o64, ref_o, rtol=rtol, atol=tol)
                  and np.array_equal(np.isfinite(l64), seen) and np.allclose(l64[seen], ref_lse[seen], rtol=1e-4, atol=1e-4))
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} case {ci} B={B} Hq/Hkv={Hq}/{Hkv} Nq={Nq} L={length if length is not None else Nmax} "
                  f"d={d} {dtype} causal={causal} splits={n} bulk={bulk}: max |o - ref| {err_o:.2e}", flush=True)
    print(f"{'FAILED' if bad else 'passed'}: {bad} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
