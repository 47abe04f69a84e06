"""Fit the rational tanh of flashkit/cpu/mods_jit.py (tanh32) and measure its float32 error.

    python tools/fit_tanh32.py            # P of degree 5, Q of degree 4 in t = x^2, on [0, 9]
    python tools/fit_tanh32.py 4 4 9.0

tanh(x) = x P(t) / Q(t), t = x^2, Q(0) = 1, for |x| <= clamp (tanh(9) rounds to 1.0 in float32, so the
kernel clamps x there). The fit minimises the largest relative error on a dense grid of [0, clamp]: the
linearised problem min |P(t) - f(t) Q(t)| / (f(t) Q_prev(t)), f = tanh(x) / x, solved by least squares
with Lawson's weights (each pass multiplies a point's weight by its error, which drives the least-
squares solution towards the minimax one). Then the coefficients are rounded to float32 and the
function evaluated as the kernel does (Horner, one rounding per FMA) against float64 np.tanh.
"""
from __future__ import annotations

import sys

import numpy as np
from numpy.polynomial import polynomial as poly


def fit(deg_p: int, deg_q: int, clamp: float, passes: int = 60):
    """(P, Q) coefficients in t, lowest first, and the design's largest relative error."""
    x = np.concatenate([np.linspace(0, clamp, 20000)[1:], np.geomspace(1e-6, 1, 2000)])
    f = np.tanh(x) / x
    u = x * x / (clamp * clamp)  # the fit in u = t / clamp^2 in [0, 1]: a well-conditioned basis
    weight, q_prev = np.ones_like(u), np.ones_like(u)
    for _ in range(passes):
        A = np.hstack([np.vander(u, deg_p + 1, increasing=True),
                       -f[:, None] * np.vander(u, deg_q + 1, increasing=True)[:, 1:]])
        w = np.sqrt(weight) / (f * q_prev)
        sol = np.linalg.lstsq(A * w[:, None], f * w, rcond=None)[0]
        a, b = sol[:deg_p + 1], np.concatenate([[1.0], sol[deg_p + 1:]])
        q_prev = poly.polyval(u, b)
        err = poly.polyval(u, a) / (q_prev * f) - 1
        weight = weight * np.abs(err)
        weight /= weight.mean()
    to_t = (clamp * clamp) ** -np.arange(max(deg_p, deg_q) + 1)  # coefficient k of u^k -> of t^k
    return a * to_t[:deg_p + 1], b * to_t[:deg_q + 1], float(np.abs(err).max())


def float32_error(P, Q, clamp: float):
    """Largest error in units in the last place and relative, of the float32 evaluation with FMAs."""
    f32 = np.float32
    x = np.concatenate([np.linspace(-12, 12, 400000), np.geomspace(1e-7, 12, 100000)]).astype(f32)
    xc = np.clip(x, f32(-clamp), f32(clamp))
    t = xc * xc
    P32, Q32 = np.asarray(P, f32), np.asarray(Q, f32)
    p = np.full_like(t, P32[-1])
    for c in P32[-2::-1]:
        p = (p.astype(np.float64) * t + c).astype(f32)  # an FMA: one rounding
    q = np.full_like(t, Q32[-1])
    for c in Q32[-2::-1]:
        q = (q.astype(np.float64) * t + c).astype(f32)
    y = (xc * p) / q
    ref = np.tanh(x.astype(np.float64))
    ulp = np.abs(y - ref) / np.spacing(np.abs(ref).astype(f32)).astype(np.float64)
    return float(ulp.max()), float((np.abs(y - ref) / np.abs(ref)).max())


def main(argv):
    deg_p, deg_q = (int(argv[0]), int(argv[1])) if len(argv) >= 2 else (5, 4)
    clamp = float(argv[2]) if len(argv) >= 3 else 9.0
    P, Q, design = fit(deg_p, deg_q, clamp)
    ulp, rel = float32_error(P, Q, clamp)
    print(f"P (degree {deg_p} in x^2) = {tuple(P.tolist())}")
    print(f"Q (degree {deg_q} in x^2) = {tuple(Q.tolist())}")
    print(f"design error {design:.2e} relative; float32 with FMAs: {ulp:.2f} ulp, {rel:.2e} relative at most")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
