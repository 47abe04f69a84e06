"""The validated attention problem that every backend receives.

`flashkit.validate.check()` turns what the user passed into a `Problem`: 4-D contiguous arrays, a
number for the scale, the causal flag folded into the sliding window, the mask in a fixed 4-D form.
Backends read a Problem and never look at user input again, so no kernel repeats a check.
`flashkit.validate.check_backward()` returns the same Problem with the backward's inputs set: the
gradient of the output dO, the forward's output O and its logsumexp lse. A decoding step against a KV
cache is a `DecodeProblem` (`flashkit.validate.check_decode()`): the cache buffers read in place and
the range of keys each query row sees.

The FLOP count of attention is written here once (`flops`, `backward_flops`); timing, benchmarks and
notebooks call it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Tuple

# Tests set this to True: outputs then start as NaN, so an element a kernel forgets to write fails
# the comparison with the reference instead of passing by luck with whatever memory held.
POISON = False

# FlashAttention's papers count a backward pass as 2.5 forwards: it recomputes S = Q K^T and adds four
# products (dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q) to the forward's two.
BACKWARD_FACTOR = 2.5


def flops(B: int, Hq: int, Nq: int, Nk: int, d: int, window=(-1, -1)) -> float:
    """Forward FLOPs as FlashAttention counts them: 4·B·Hq·Nq·Nk·d, times the visible fraction of S.

    Two products, S = Q K^T and O = P V, of 2·Nq·Nk·d FLOPs each per head (a multiply-add is 2); the
    softmax's exp, max and sums are not counted. `window` is (left, right) with causal folded in
    (masks.effective_window), so a causal square problem counts (N + 1) / 2N of the full one.
    """
    from flashkit.masks import visible_fraction

    return 4.0 * B * Hq * Nq * Nk * d * visible_fraction(Nq, Nk, tuple(window))


def backward_flops(B: int, Hq: int, Nq: int, Nk: int, d: int, window=(-1, -1)) -> float:
    """Backward FLOPs by FlashAttention's convention: BACKWARD_FACTOR (2.5) times the forward's."""
    return BACKWARD_FACTOR * flops(B, Hq, Nq, Nk, d, window)


@dataclass(frozen=True)
class Problem:
    Q: Any  # (B, Hq, Nq, d)   contiguous, float; numpy or cupy
    K: Any  # (B, Hkv, Nk, d)  Hq % Hkv == 0 (GQA / MQA)
    V: Any  # (B, Hkv, Nk, d)
    scale: float  # multiplies Q K^T; default 1/sqrt(d)
    causal: bool  # as the user asked; already folded into `window`
    window: Tuple[int, int]  # (left, right) around the bottom-right diagonal, -1 = unbounded
    mask: Optional[Any]  # None or bool (Bm, Hm, Nq, Nk), Bm in {1, B}, Hm in {1, Hq}; True = may attend
    block_size: Optional[Tuple[int, int]]  # (Br, Bc) forced by the user, or None = backend's choice
    xp: Any  # the array module: numpy or cupy
    # The backward's inputs (None for a forward problem), set by validate.check_backward:
    dO: Optional[Any] = None  # (B, Hq, Nq, d)  gradient of the loss with respect to O, Q's dtype
    O: Optional[Any] = None  # (B, Hq, Nq, d)   the forward's output, Q's dtype
    lse: Optional[Any] = None  # (B, Hq, Nq)    the forward's logsumexp (natural log), float32 or float64
    # "bf16" when Q, K, V (and dO, O) hold bfloat16 as uint16 bits (CuPy has no bfloat16 dtype), else None
    element: Optional[str] = None
    # FlexAttention's hooks (flashkit/mods.py, flashkit/blockmask.py), checked by validate.check_mods:
    score_mod: Optional[Callable] = None  # score_mod(score, b, h, q_idx, kv_idx) -> score, on every visible score
    mask_mod: Optional[Callable] = None  # mask_mod(b, h, q_idx, kv_idx) -> bool, True = may attend (and'ed)
    block_mask: Optional[Any] = None  # a BlockMask of mask_mod for these shapes; block_size is then its tiles
    # Checks still running on the GPU, each with an `error()` that waits for it: the finiteness scan of
    # validate.check(finite="async") (flashkit.finite.Deferred until validate.begin starts it or a kernel that tests
    # its own inputs claims it), and what a backend appends (the CUDA backward's lse check). The caller calls
    # validate.begin, launches its kernels, then validate.finish(problem) waits and raises if one flagged.
    pending: Optional[list] = None

    # Shapes, named as in the papers.
    @property
    def B(self) -> int:
        return self.Q.shape[0]

    @property
    def Hq(self) -> int:
        return self.Q.shape[1]

    @property
    def Hkv(self) -> int:
        return self.K.shape[1]

    @property
    def group(self) -> int:
        """Query heads that share one K/V head (1 = plain multi-head, Hq = MQA)."""
        return self.Hq // self.Hkv

    @property
    def Nq(self) -> int:
        return self.Q.shape[2]

    @property
    def Nk(self) -> int:
        return self.K.shape[2]

    @property
    def d(self) -> int:
        return self.Q.shape[3]

    @property
    def dtype(self):
        return self.Q.dtype

    @property
    def dtype_name(self) -> str:
        """The element type's name: "bfloat16" for bf16 bits held as uint16, else dtype.name."""
        return "bfloat16" if self.element == "bf16" else self.Q.dtype.name

    @property
    def has_mods(self) -> bool:
        """True when a score_mod or a mask_mod (possibly through a block_mask) changes the scores."""
        return self.score_mod is not None or self.mask_mod is not None

    @property
    def has_window(self) -> bool:
        """True when causal or a sliding window limits which keys a row sees."""
        return self.window != (-1, -1)

    def flops(self) -> float:
        """Forward FLOPs of this problem (the module's `flops`: 4·B·H·Nq·Nk·d times the visible fraction)."""
        return flops(self.B, self.Hq, self.Nq, self.Nk, self.d, self.window)

    def backward_flops(self) -> float:
        """Backward FLOPs of this problem: 2.5x the forward's, as FlashAttention counts them."""
        return backward_flops(self.B, self.Hq, self.Nq, self.Nk, self.d, self.window)

    def new_outputs(self, o_dtype=None, lse_dtype=None):
        """Fresh (O, lse) arrays for a backend to fill: (B, Hq, Nq, d) and (B, Hq, Nq).

        Every kernel that writes its outputs element by element allocates them here (the NumPy tiled
        loops, the Numba rungs, the CUDA rungs), so the tests' poisoning reaches all of them. Backends
        whose outputs are whole-array results (numpy-standard, cupy-standard, the split-K merges) do not
        need it: no element of such an array is left unwritten.
        """
        xp = self.xp
        shape_o, shape_l = (self.B, self.Hq, self.Nq, self.d), (self.B, self.Hq, self.Nq)
        o_dtype, lse_dtype = o_dtype or self.dtype, lse_dtype or self.dtype
        if POISON:
            return xp.full(shape_o, xp.nan, o_dtype), xp.full(shape_l, xp.nan, lse_dtype)
        return xp.empty(shape_o, o_dtype), xp.empty(shape_l, lse_dtype)

    def new_grads(self):
        """Fresh (dQ, dK, dV) for a backward to fill, shaped and typed like Q, K and V (NaN when poisoned)."""
        xp = self.xp
        make = (lambda x: xp.full(x.shape, xp.nan, x.dtype)) if POISON else (lambda x: xp.empty(x.shape, x.dtype))
        return make(self.Q), make(self.K), make(self.V)

    def astype(self, dtype) -> Problem:
        """The same problem with its arrays converted (float16 input computed in float32; the float64
        oracle). lse is converted only to float64: float32 is already its dtype for 16-bit input."""
        def conv(x, to):
            return None if x is None else x.astype(to)

        lse_to = dtype if self.xp.dtype(dtype) == self.xp.float64 else None
        return replace(
            self,
            Q=self.Q.astype(dtype),
            K=self.K.astype(dtype),
            V=self.V.astype(dtype),
            dO=conv(self.dO, dtype),
            O=conv(self.O, dtype),
            lse=self.lse if lse_to is None or self.lse is None else self.lse.astype(lse_to),
        )


@dataclass(frozen=True)
class DecodeProblem:
    """A validated decoding step (flashkit.decode): 4-D arrays and the keys each query row sees.

    The cache buffers K and V are read in place: only their first `lengths[b]` rows are filled, and
    nothing past them is ever read. Row i of batch b sees keys lo[b, i] <= j < hi[b, i]; that is how
    ragged lengths, causal steps and sliding windows reach a split-K kernel, so it never takes a
    custom mask.
    """

    Q: Any  # (B, Hq, Nq, d) contiguous
    K: Any  # (B, Hkv, Nmax, d) the cache buffers, contiguous, read in place
    V: Any
    lengths: Any  # (B,) int64 on the host: keys [0, lengths[b]) are filled
    lo: Any  # (B, Nq) int64 on the host: row i of batch b sees keys lo <= j < hi
    hi: Any
    scale: float
    causal: bool
    xp: Any

    @property
    def n_keys(self) -> int:
        """The longest filled length: no split needs to look past it."""
        return int(self.lengths.max()) if self.lengths.size else 0

    # What the registry asks of any problem (Backend.cannot_serve, choose), named as on Problem.
    @property
    def dtype(self):
        return self.Q.dtype

    @property
    def dtype_name(self) -> str:
        return self.Q.dtype.name

    def flops(self) -> float:
        """4 B Hq d times the keys each row sees, summed over the rows: the forward formula for ragged rows."""
        B, Hq, _, d = self.Q.shape
        return 4.0 * Hq * d * float((self.hi - self.lo).clip(min=0).sum()) * (1 if self.lo.shape[0] == B else B)

    @property
    def d(self) -> int:
        return self.Q.shape[3]

    @property
    def mask(self):
        """Always None: the visible keys are the ranges [lo, hi), never a custom mask."""
        return None

    @classmethod
    def from_problem(cls, problem: Problem) -> DecodeProblem:
        """The decoding step that computes the same attention as `problem` (the whole of K and V filled,
        its window as per-row key ranges): how a split-K kernel serves flashkit.attention. Raises
        ValueError for a custom mask, which a split-K kernel does not take."""
        import numpy as np

        from flashkit.masks import row_bounds

        if problem.mask is not None:
            raise ValueError("the split-K kernels do not support a custom mask (causal and window are supported)")
        lo, hi = row_bounds(problem.Nq, problem.Nk, problem.window)  # (Nq,) each, the same for every batch
        shape = (problem.B, problem.Nq)
        return cls(Q=problem.Q, K=problem.K, V=problem.V, lengths=np.full(problem.B, problem.Nk, np.int64),
                   lo=np.ascontiguousarray(np.broadcast_to(lo, shape)), hi=np.ascontiguousarray(np.broadcast_to(hi, shape)),
                   scale=problem.scale, causal=problem.causal, xp=problem.xp)
