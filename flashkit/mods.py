"""Attention variants as small functions of scalars: FlexAttention's score_mod and mask_mod.

A variant of attention changes the scores or hides some of them. PyTorch's FlexAttention (He, Guessous,
Liang, Ye, Zhang and Horace He, 2024) lets a user write either as a plain Python function of one score
and its position, and compiles it into the kernel; flashkit takes the same two signatures:

    score_mod(score, b, h, q_idx, kv_idx) -> score   the score q_i . k_j * scale, modified (-inf hides it)
    mask_mod(b, h, q_idx, kv_idx) -> bool            True where query q_idx may attend to key kv_idx

b is the batch index, h the query head, q_idx and kv_idx raw positions (0..Nq-1 and 0..Nk-1). Pass them
to `flashkit.attention(q, k, v, score_mod=..., mask_mod=...)`; `flashkit.block_mask(mask_mod, ...)`
classifies the tiles once so that empty ones are skipped.

Every function here is a factory: it captures its parameters (a slope per head, a document id per
position) by closure and returns the mod, as FlexAttention users write them. They are written so that
three evaluators agree on them:

- Numba compiles them into the kernel (backend "numba"): numbers, NumPy arrays captured by closure,
  and NumPy functions of scalars (np.tanh, np.where, np.minimum ...);
- NumPy evaluates them on whole index grids at once (the reference and "numpy-tiled"): so `&` and `|`
  instead of `and` and `or`, `mods.where(cond, x, y)` instead of `if` (np.where works too, but Numba
  compiles it into 0-d array code, seconds slower to compile);
- and plain Python calls them one score at a time (the fallback for functions written with `if`);
- for the GPU, flashkit.gpu.modlang translates their source to CUDA (a subset of Python: arithmetic,
  comparisons, & | and or not, where, exp/log/tanh, lookups of captured arrays, captured numbers).

Positions are raw; the positional masks below align the last query with the last key when Nq != Nk,
bottom-right as the rest of flashkit (`causal=True`, FlashAttention >= 2.1): query i sits at key
position i + (Nk - Nq). Your own mods see raw positions and align as you write them.

    causal(Nq, Nk)                         mask   Vaswani et al. 2017, aligned as FlashAttention >= 2.1
    causal_top_left()                      mask   torch is_causal's alignment, for comparison
    sliding_window(Nq, Nk, left, right)    mask   Longformer (Beltagy et al. 2020), Mistral 7B (2023)
    document_mask(seq_lens)                mask   packed sequences (Krell et al. 2021; Llama 3)
    prefix_lm(prefix_len, Nq, Nk)          mask   T5 (Raffel et al. 2020), UniLM (Dong et al. 2019)
    dilated(Nq, Nk, left, right, dilation) mask   Longformer's dilated sliding window
    strided(Nq, Nk, stride)                mask   Sparse Transformer (Child et al. 2019)
    global_window(Nq, Nk, n_global, ...)   mask   Longformer, BigBird (Zaheer et al. 2020)
    softcap(cap)                           score  Gemma 2 (2024), Grok-1: cap * tanh(score / cap)
    alibi(slopes)                          score  ALiBi (Press, Smith and Lewis 2022)
    relative_position_bias(table, ...)     score  T5's bucketed relative position bias (Raffel et al. 2020)
    identity                               score  the score unchanged (measures what a mod costs)
    and_masks(*masks), or_masks(*masks)    combine masks (FlexAttention has the same two)
    where(cond, x, y)                      a select for your own mods: np.where on arrays, x if cond
                                           else y when Numba compiles it
    cannot_fail(fn)                        marks a score_mod that cannot fail (finite for every finite
                                           score, no lookup or division that can go wrong): the GPU
                                           forward then skips its error check's host sync (softcap and
                                           identity carry the mark)
"""
from __future__ import annotations

import math

import numpy as np

from flashkit.blockmask import python_function


def _named(fn, name: str):
    """Give a generated mod a readable name: errors and block masks print it."""
    fn.__name__ = name.split("(")[0]
    fn.__qualname__ = name
    return fn


def _check_size(name, value, allow_unbounded=False):
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < (-1 if allow_unbounded else 0):
        lowest = "an integer >= 0, or -1 for unbounded" if allow_unbounded else "an integer >= 0"
        raise ValueError(f"{name} must be {lowest}; got {value!r}")
    return int(value)


def _check_lengths(Nq, Nk):
    for name, n in (("Nq", Nq), ("Nk", Nk)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive integer (the number of queries / keys); got {n!r}")
    return int(Nq), int(Nk)


def where(condition, x, y):
    """x where condition holds, else y, for your own mods: `np.where` on the NumPy evaluators' index
    grids; compiled by Numba (flashkit.cpu.mods_jit registers it) a scalar select, `x if condition else
    y`, where np.where of scalars would build 0-d arrays (and compile seconds slower)."""
    return np.where(condition, x, y)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------
def causal(Nq: int, Nk: int):
    """Causal attention (Vaswani et al. 2017, "Attention Is All You Need": the decoder's mask), aligned
    bottom-right as FlashAttention >= 2.1 and `flashkit.attention(causal=True)`: query i sees key j
    when j <= i + (Nk - Nq), so the last query sees every key. Nq = 3, Nk = 5:

            k0 k1 k2 k3 k4
        q0   x  x  x  .  .         query 0 is token 2 of 5: the first 2 keys are the KV cache
        q1   x  x  x  x  .
        q2   x  x  x  x  x

    torch's `is_causal` and FlexAttention's own `causal_mask` example align top-left instead
    (`causal_top_left`); the two agree when Nq == Nk.
    """
    Nq, Nk = _check_lengths(Nq, Nk)
    offset = Nk - Nq

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return _named(mask_mod, f"causal(Nq={Nq}, Nk={Nk})")


def causal_top_left():
    """Causal aligned top-left, q_idx >= kv_idx: torch's `is_causal` and flash_attn < 2.1. With Nq < Nk
    it hides the newest keys from the newest queries, which is wrong for decoding with a KV cache
    (notebook 09 draws both); flashkit's `causal(Nq, Nk)` aligns bottom-right."""

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return _named(mask_mod, "causal_top_left()")


def sliding_window(Nq: int, Nk: int, left: int, right: int = 0):
    """Local attention: query i sees keys j with p - left <= j <= p + right, p = i + (Nk - Nq) its
    position among the keys (bottom-right, as `flashkit.attention(window=(left, right))`; -1 leaves a
    side unbounded). Longformer's sliding window (Beltagy, Peters and Cohan 2020) is symmetric,
    (w/2, w/2); Mistral 7B (Jiang et al. 2023) and Gemma 2's local layers are causal, (w, 0).
    Nq = Nk = 5, left = 2, right = 0:

            k0 k1 k2 k3 k4
        q0   x  .  .  .  .
        q1   x  x  .  .  .
        q2   x  x  x  .  .
        q3   .  x  x  x  .
        q4   .  .  x  x  x
    """
    Nq, Nk = _check_lengths(Nq, Nk)
    left = _check_size("left", left, allow_unbounded=True)
    right = _check_size("right", right, allow_unbounded=True)
    offset = Nk - Nq
    lo = -(1 << 62) if left < 0 else -left  # bounds on kv_idx - p; "unbounded" as a bound no index reaches
    hi = 1 << 62 if right < 0 else right

    def mask_mod(b, h, q_idx, kv_idx):
        rel = kv_idx - (q_idx + offset)  # where the key sits relative to the query's own position
        return (rel >= lo) & (rel <= hi)

    return _named(mask_mod, f"sliding_window(Nq={Nq}, Nk={Nk}, left={left}, right={right})")


def document_ids(seq_lens) -> np.ndarray:
    """The document index of every position of sequences packed back to back: [2, 3] -> [0, 0, 1, 1, 1]."""
    lens = np.asarray(seq_lens)
    if lens.ndim != 1 or lens.size == 0 or lens.dtype.kind not in "iu" or (lens < 1).any():
        raise ValueError(f"seq_lens must be a non-empty 1-D sequence of positive integers; got {seq_lens!r}")
    return np.repeat(np.arange(lens.size, dtype=np.int64), lens)


def document_mask(seq_lens, kv_seq_lens=None):
    """Packed sequences: several documents concatenated into one row, each attending to itself only
    (a block-diagonal mask). Sequence packing wastes no compute on padding (Krell et al. 2021,
    "Efficient Sequence Packing without Cross-contamination"); Llama 3 (Dubey et al. 2024) trains with
    "an attention mask that prevents self-attention between different documents within the same
    sequence". Combine with `causal` for language modelling: `and_masks(document_mask(lens), causal(N, N))`.

    seq_lens: the documents' lengths, summing to Nq; kv_seq_lens: the keys' if they differ (default the
    same). The ids are captured as NumPy arrays: a position beyond them is an error, not a guess.
    """
    q_doc = document_ids(seq_lens)
    kv_doc = q_doc if kv_seq_lens is None else document_ids(kv_seq_lens)
    lens = ", ".join(str(int(n)) for n in np.asarray(seq_lens))

    def mask_mod(b, h, q_idx, kv_idx):
        return q_doc[q_idx] == kv_doc[kv_idx]

    return _named(mask_mod, f"document_mask([{lens}])")


def prefix_lm(prefix_len, Nq: int, Nk: int):
    """Prefix language model: every query sees the whole prefix (bidirectional), and the rest causally.
    T5's "prefix LM" objective (Raffel et al. 2020, section 3.2.1) and UniLM's seq-to-seq mask (Dong et
    al. 2019); PaliGemma (2024) attends this way over image and prompt tokens. Causal part bottom-right.

    prefix_len: one int for every sequence, or a 1-D array of B ints (one per batch element, read as
    prefix_len[b]). Nq = Nk = 5, prefix 3:

            k0 k1 k2 k3 k4
        q0   x  x  x  .  .
        q1   x  x  x  .  .
        q2   x  x  x  .  .
        q3   x  x  x  x  .
        q4   x  x  x  x  x
    """
    Nq, Nk = _check_lengths(Nq, Nk)
    offset = Nk - Nq
    lens = np.asarray(prefix_len)
    if lens.dtype.kind not in "iu" or lens.ndim > 1 or (lens < 0).any():
        raise ValueError(f"prefix_len must be an integer >= 0 or a 1-D array of them (one per batch); got {prefix_len!r}")
    if lens.ndim == 0:
        p = int(lens)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < p) | (kv_idx <= q_idx + offset)

        return _named(mask_mod, f"prefix_lm({p}, Nq={Nq}, Nk={Nk})")
    per_batch = lens.astype(np.int64)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < per_batch[b]) | (kv_idx <= q_idx + offset)

    return _named(mask_mod, f"prefix_lm(per batch {per_batch.tolist()}, Nq={Nq}, Nk={Nk})")


def dilated(Nq: int, Nk: int, left: int, right: int, dilation: int):
    """Longformer's dilated sliding window (Beltagy, Peters and Cohan 2020, section 3.1): a window with
    gaps, every `dilation`-th key, `left` of them before the query's position and `right` after (the
    receptive field grows to (left + right) * dilation without more scores). Bottom-right aligned.
    Nq = Nk = 7, left = 3, right = 0, dilation = 2:

            k0 k1 k2 k3 k4 k5 k6
        q6   x  .  x  .  x  .  x
    """
    Nq, Nk = _check_lengths(Nq, Nk)
    left, right = _check_size("left", left), _check_size("right", right)
    dilation = _check_size("dilation", dilation)
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1; got {dilation}")
    offset = Nk - Nq
    lo, hi = -left * dilation, right * dilation

    def mask_mod(b, h, q_idx, kv_idx):
        rel = kv_idx - (q_idx + offset)
        return (rel >= lo) & (rel <= hi) & (rel % dilation == 0)

    return _named(mask_mod, f"dilated(Nq={Nq}, Nk={Nk}, left={left}, right={right}, dilation={dilation})")


def strided(Nq: int, Nk: int, stride: int):
    """The Sparse Transformer's strided pattern (Child, Gray, Radford and Sutskever 2019, section 4.2),
    causal: the previous `stride` positions (A(1), local) and every stride-th one before them (A(2)),
    the union of its two heads' patterns in one mask. Bottom-right aligned. Nq = Nk = 8, stride 3:

            k0 k1 k2 k3 k4 k5 k6 k7
        q7   .  x  .  .  x  x  x  x
    """
    Nq, Nk = _check_lengths(Nq, Nk)
    stride = _check_size("stride", stride)
    if stride < 1:
        raise ValueError(f"stride must be >= 1; got {stride}")
    offset = Nk - Nq

    def mask_mod(b, h, q_idx, kv_idx):
        back = q_idx + offset - kv_idx  # how far back the key is; < 0 is the future
        return (back >= 0) & ((back < stride) | (back % stride == 0))

    return _named(mask_mod, f"strided(Nq={Nq}, Nk={Nk}, stride={stride})")


def global_window(Nq: int, Nk: int, n_global: int, left: int, right: int | None = None):
    """A sliding window plus global tokens: the first `n_global` positions see everything and are seen
    by every query (Longformer's global attention on [CLS] and question tokens, Beltagy et al. 2020;
    BigBird's global tokens, Zaheer et al. 2020). The window is (left, right) around the query's
    bottom-right position, right = left by default (an encoder's symmetric window).
    Nq = Nk = 6, n_global = 1, left = right = 1:

            k0 k1 k2 k3 k4 k5
        q0   x  x  x  x  x  x
        q1   x  x  x  .  .  .
        q2   x  x  x  x  .  .
        q3   x  .  x  x  x  .
        q4   x  .  .  x  x  x
        q5   x  .  .  .  x  x
    """
    Nq, Nk = _check_lengths(Nq, Nk)
    n_global = _check_size("n_global", n_global)
    left = _check_size("left", left)
    right = left if right is None else _check_size("right", right)
    offset = Nk - Nq

    def mask_mod(b, h, q_idx, kv_idx):
        p = q_idx + offset
        rel = kv_idx - p
        return ((rel >= -left) & (rel <= right)) | (kv_idx < n_global) | (p < n_global)

    return _named(mask_mod, f"global_window(Nq={Nq}, Nk={Nk}, n_global={n_global}, left={left}, right={right})")


def and_masks(*mask_mods):
    """A mask_mod that lets a score through only where every one of `mask_mods` does (FlexAttention's
    `and_masks`), e.g. `and_masks(document_mask(lens), causal(N, N))`."""
    return _combine(mask_mods, "and")


def or_masks(*mask_mods):
    """A mask_mod that lets a score through where any of `mask_mods` does (FlexAttention's `or_masks`)."""
    return _combine(mask_mods, "or")


def _combine(parts, how):
    if not parts or not all(callable(m) for m in parts):
        raise TypeError(f"{how}_masks takes one or more mask_mod functions; got {parts!r}")
    if len(parts) == 1:
        return parts[0]
    # Pairwise, so every combined function calls two named functions: Numba compiles (and inlines)
    # each; a loop over a tuple of functions it could not.
    first = _combine(parts[:-1], how)
    last = parts[-1]
    if how == "and":
        def mask_mod(b, h, q_idx, kv_idx):
            return first(b, h, q_idx, kv_idx) & last(b, h, q_idx, kv_idx)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return first(b, h, q_idx, kv_idx) | last(b, h, q_idx, kv_idx)
    mask_mod.__flashkit_parts__ = (first, last)  # flashkit.blockmask.reads_batch_head looks inside
    return _named(mask_mod, f"{how}_masks({first.__qualname__}, {last.__qualname__})")


# ---------------------------------------------------------------------------------------------
# Score modifications
# ---------------------------------------------------------------------------------------------
def cannot_fail(fn):
    """Mark a score_mod as one that returns a finite score (and has a finite derivative) for every finite
    score and position, and never divides by zero or reads out of bounds: the GPU forward then does not
    wait for the kernel's error word after the call (flashkit.gpu.flash_mods; one host sync fewer, so the
    next call's host work overlaps this call's kernel). For the library's own mods, whose arguments are
    checked when they are made; a wrong mark turns a clear error into NaN in the output. Returns fn."""
    python_function(fn).__flashkit_cannot_fail__ = True
    return fn


def declared_cannot_fail(fn) -> bool:
    """Whether `fn` carries cannot_fail's mark."""
    return bool(getattr(python_function(fn), "__flashkit_cannot_fail__", False))


def softcap_cap(fn) -> float:
    """The cap of a score_mod made by `softcap`, else 0.0: the kernels that run it on whole registers
    (flashkit.cpu.mods_jit) or with the cap folded into their scales (flashkit.gpu.flash_mods) ask this."""
    return float(getattr(python_function(fn), "__flashkit_softcap__", 0.0))


@cannot_fail
def identity(score, b, h, q_idx, kv_idx):
    """The score unchanged: a score_mod that costs only the hook itself (the benchmark's baseline)."""
    return score


def softcap(cap: float):
    """Soft-capping of the logits, cap * tanh(score / cap): smooth, monotone, bounded by +-cap, so no
    score can grow without bound. Gemma 2 (Gemma Team 2024) caps attention logits at 50.0 (and the final
    logits at 30.0); Grok-1 at 30.0. Near 0 it is the identity (tanh(x) ~ x)."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float, np.floating, np.integer)) \
            or not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"cap must be a finite number > 0 (Gemma 2 uses 50.0); got {cap!r}")
    cap = float(cap)

    def score_mod(score, b, h, q_idx, kv_idx):
        return soft_cap(score, cap)

    score_mod.__flashkit_softcap__ = cap  # softcap_cap: the CPU's whole registers, the GPU's folded scales
    # |cap tanh(s / cap)| <= cap for every finite s, and cap > 0 is checked above: no error can happen
    return cannot_fail(_named(score_mod, f"softcap({cap:g})"))


def soft_cap(score, cap):
    """cap * tanh(score / cap). In NumPy exactly that; compiled by Numba for float32 scores a tanh that
    LLVM vectorises (flashkit.cpu.mods_jit.tanh32: a rational function, 4.5 ulp at most), where np.tanh
    would be one libm call per score (no SVML here): 18 ns a score, measured, 3x a tile's work."""
    return cap * np.tanh(score / cap)


def alibi_slopes(H: int) -> np.ndarray:
    """ALiBi's head-specific slopes (Press, Smith and Lewis 2022, section 3): the geometric sequence
    2^(-8/H), 2^(-16/H), ..., 2^(-8) for H a power of two; otherwise the slopes of the next lower power
    of two followed by every other slope of the next higher one, as the authors' code does."""
    if isinstance(H, bool) or not isinstance(H, (int, np.integer)) or H < 1:
        raise ValueError(f"H must be a positive integer (the number of query heads); got {H!r}")

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if H & (H - 1) == 0:
        return np.array(power_of_two(H))
    lower = 1 << (H.bit_length() - 1)
    return np.array(power_of_two(lower) + power_of_two(2 * lower)[0::2][: H - lower])


def alibi(slopes, offset: int = 0):
    """Attention with Linear Biases (Press, Smith and Lewis 2022, "Train Short, Test Long"): no position
    embeddings, instead a penalty proportional to the distance, score + m_h * (kv_idx - p), with a slope
    m_h per head (`alibi_slopes(H)`). With causal masking every bias is <= 0: older keys count less.

    slopes: 1-D array, one per query head (read as slopes[h]; captured, so Numba freezes it).
    offset: the position of query 0 among the keys, p = q_idx + offset; Nk - Nq aligns the last query
    with the last key, as flashkit's causal does (0, the default, when Nq == Nk).
    """
    m = np.asarray(slopes, dtype=np.float64)
    if m.ndim != 1 or m.size == 0 or not np.isfinite(m).all():
        raise ValueError(f"slopes must be a non-empty 1-D array of finite numbers, one per query head; got {slopes!r}")
    offset = int(offset)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + m[h] * (kv_idx - (q_idx + offset))

    return _named(score_mod, f"alibi({m.size} slopes, offset={offset})")


def t5_bucket(relative_position, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128):
    """T5's relative position buckets (Raffel et al. 2020, section 2.1; the function of the T5 code):
    exact buckets for short distances, logarithmically wider ones up to max_distance, one bucket for
    everything beyond. relative_position = key position - query position, an int or an array of them.
    Bidirectional: half the buckets for keys after the query."""
    n = np.asarray(relative_position, dtype=np.int64)
    bucket = np.zeros(n.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        bucket += (n > 0) * num_buckets  # keys after the query get the upper half
        n = np.abs(n)
    else:
        n = -np.minimum(n, 0)  # only the past: the future shares bucket 0
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log(0) never happens: n >= max_exact >= 1 wherever the large branch is used
    large = max_exact + (np.log(np.maximum(n, 1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return bucket + np.where(is_small, n, large)


def relative_position_bias(table, bidirectional: bool = True, max_distance: int = 128, offset: int = 0):
    """T5's relative position bias (Raffel et al. 2020): a learned scalar per head and bucket of the
    distance kv_idx - p, added to the score, score + table[h, bucket(kv_idx - p)], p = q_idx + offset
    (see `alibi` for offset). table: (H, num_buckets) floats, T5 uses 32 buckets and max_distance 128.

    The buckets saturate beyond max_distance, so they are computed once here for every distance up to
    it (`t5_bucket`, in NumPy) and the mod only looks them up: one clip and two array reads a score.
    """
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or table.size == 0 or not np.isfinite(table).all():
        raise ValueError(f"table must be a (H, num_buckets) array of finite numbers; got shape {np.shape(table)}")
    num_buckets = table.shape[1]
    if num_buckets < 2 or (bidirectional and num_buckets < 4):
        raise ValueError(f"table needs at least {4 if bidirectional else 2} buckets (columns); got {num_buckets}")
    M = _check_size("max_distance", max_distance)
    if M <= num_buckets // (4 if bidirectional else 2):
        raise ValueError(f"max_distance must exceed the exact buckets ({num_buckets // (4 if bidirectional else 2)}); got {M}")
    buckets = t5_bucket(np.arange(-M, M + 1), bidirectional, num_buckets, M)  # bucket of distance r at [r + M]
    offset = int(offset)

    def score_mod(score, b, h, q_idx, kv_idx):
        rel = np.minimum(np.maximum(kv_idx - (q_idx + offset), -M), M)  # beyond +-M the bucket is the same
        return score + table[h, buckets[rel + M]]

    return _named(score_mod, f"relative_position_bias({table.shape[0]}x{num_buckets}, max_distance={M}, offset={offset})")
