"""What every checker shares: the verdict (pass message or ExerciseError), calling the learner's
function safely, and comparisons that NaN cannot fool.

A checker runs the learner's function on fresh random inputs, compares with flashkit's reference and,
when the answer is wrong, compares it with known-wrong variants (the classic mistakes) so the message
can name the mistake instead of saying "wrong". Comparisons never use max() or nanmax() over an error
array: `max(err, tol)` and `np.nanmax` silently drop NaN, and `not err > tol` is True for NaN. Here a
NaN only ever matches a NaN at the same place in a known-wrong variant.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np

ATOL, RTOL = 1e-9, 1e-7  # float64 inputs; a correct solution differs only by summation order


class ExerciseError(AssertionError):
    """A checker's verdict that the learner's function is wrong, with the mistake named when known.

    In a notebook the verdict is all a learner needs to read, so IPython shows only the message
    (`_render_traceback_`), not the frames inside flashkit that raised it. When the learner's own
    function crashed, the frames of the learner's code come first, as Python would show them, minus
    the checker's. Outside IPython (a script, pytest) the full traceback stays, as usual.
    """

    def _render_traceback_(self):
        lines = []
        cause = self.__cause__
        if cause is not None:
            frames = [f for f in traceback.extract_tb(cause.__traceback__) if not _in_flashkit(f.filename)]
            if frames:
                lines += ["Traceback of your function (most recent call last):"]
                lines += "".join(traceback.format_list(frames)).rstrip("\n").split("\n")
                lines += [""]  # the exception itself is named in the verdict below
        return lines + [f"{type(self).__name__}: {self}"]


_FLASHKIT_DIR = str(Path(__file__).resolve().parents[1])


def _in_flashkit(filename: str) -> bool:
    try:
        return str(Path(filename).resolve()).startswith(_FLASHKIT_DIR)
    except (OSError, ValueError):
        return False


def new_rng(seed):
    """(rng, seed): fresh inputs on every call unless a seed is given; the seed goes in the message."""
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
    return np.random.default_rng(seed), seed


def passed(task: str, detail: str) -> None:
    """Print the friendly pass line. (Nothing is returned, so a notebook cell shows only that line.)"""
    print(f"✓ {task}: {detail}")


def fail(task: str, message: str, seed=None):
    """Raise the verdict. The seed lets the learner rerun the same inputs: check_x(fn, seed=...)."""
    where = f"\n  (inputs from seed={seed}: rerun the checker with seed={seed} to see the same case)" if seed is not None else ""
    raise ExerciseError(f"✗ {task}: {message}{where}")


def call(task: str, fn, *args):
    """fn(*args), turning a stub, a crash or an input modified in place into an ExerciseError."""
    if not callable(fn):
        raise ExerciseError(f"✗ {task}: pass your function itself, as in check(my_function), not what it returns "
                            f"(got a {type(fn).__name__})")
    name = getattr(fn, "__name__", "your function")
    before = [_snapshot(a) for a in args]
    try:
        out = fn(*args)
    except NotImplementedError as e:
        raise ExerciseError(
            f"✗ {task}: `{name}` is still a stub (NotImplementedError: {e}). Write its body in place of "
            "the `raise NotImplementedError` line, run that cell, then run this check again."
        ) from None
    except Exception as e:  # the learner's own bug: show it, with the traceback chained below
        shapes = ", ".join(str(np.shape(a)) if isinstance(a, np.ndarray) else repr(a) for a in args)
        raise ExerciseError(f"✗ {task}: `{name}` raised {type(e).__name__}: {e}\n  (called with {shapes})") from e
    for i, (a, b) in enumerate(zip(args, before)):
        where = _modified(a, b)
        if where is not None:
            raise ExerciseError(
                f"✗ {task}: `{name}` modified its argument #{i + 1} in place"
                f"{f' (element {where} of that tuple)' if where else ''}. Work on new arrays "
                "(e.g. x - m, not x -= m; m = np.maximum(m_a, m_b), not m_a[...] = ...): the caller still "
                "needs its inputs."
            )
    return out


def _snapshot(a):
    """A copy of every array in `a`, looking inside tuples and lists (a state (m, l, O) is a tuple)."""
    if isinstance(a, np.ndarray):
        return np.array(a, copy=True)
    if isinstance(a, (tuple, list)):
        return type(a)(_snapshot(x) for x in a)
    return None


def _modified(a, before, path=""):
    """None when `a` still equals its snapshot, else where it changed (" (item 2 of it)", ...)."""
    if isinstance(before, np.ndarray):
        return None if np.array_equal(a, before, equal_nan=True) else path
    if isinstance(before, (tuple, list)):
        if not isinstance(a, (tuple, list)) or len(a) != len(before):
            return path  # a list emptied or extended in place
        for k, (x, b) in enumerate(zip(a, before)):
            where = _modified(x, b, f"{path}[{k}]")
            if where is not None:
                return where
    return None


def as_arrays(task: str, out, names):
    """The learner's result as a tuple of float64 arrays named `names` (one name: a single array)."""
    if len(names) == 1:
        out = (out,)
    elif not isinstance(out, (tuple, list)) or len(out) != len(names):
        got = f"a {type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
        raise ExerciseError(f"✗ {task}: return the tuple ({', '.join(names)}); got {got}")
    arrays = []
    for n, x in zip(names, out):
        dtype = getattr(x, "dtype", None)
        if dtype is not None and dtype.kind == "f" and dtype.itemsize < 8:
            raise ExerciseError(f"✗ {task}: `{n}` is {dtype}; the inputs are float64, keep them so (a cast to "
                                f"{dtype} loses the precision this check compares at)")
        try:
            arrays.append(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise ExerciseError(f"✗ {task}: `{n}` must be an array of numbers; got {type(x).__name__} ({e})") from None
    return tuple(arrays)


def close(got, want, atol=ATOL, rtol=RTOL, equal_nan=False) -> bool:
    """True when every element matches: same shape, same infinities, NaN only where want is NaN
    and equal_nan is set. Never fooled by NaN (np.isclose is False for NaN)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return False
    return bool(np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=equal_nan).all())


def all_close(gots, wants, **kw) -> bool:
    """close() on every pair of two equally long tuples of arrays."""
    return len(gots) == len(wants) and all(close(g, w, **kw) for g, w in zip(gots, wants))


def check_shapes(task, gots, wants, names):
    for g, w, n in zip(gots, wants, names):
        if np.shape(g) != np.shape(w):
            raise ExerciseError(f"✗ {task}: `{n}` has shape {np.shape(g)}, expected {np.shape(w)}")


def first_mismatches(got, want, atol=ATOL, rtol=RTOL, limit=3) -> str:
    """'at [r, c]: expected x, got y; ...' for the first few elements that differ (NaN included)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bad = np.argwhere(~np.isclose(got, want, rtol=rtol, atol=atol))
    parts = [f"at {list(map(int, idx))}: expected {_pair(want[tuple(idx)], got[tuple(idx)])}" for idx in bad[:limit]]
    more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
    return "; ".join(parts) + more + float32_hint(got, want)


def _pair(want, got) -> str:
    """'x, got y' with enough digits that x and y do not print the same."""
    for digits in (6, 10, 17):
        a, b = f"{want:.{digits}g}", f"{got:.{digits}g}"
        if a != b:
            break
    return f"{a}, got {b}"


def float32_hint(got, want) -> str:
    """A sentence when `got` looks computed in float32 and cast back to float64, else "".

    The tell: every value is exactly a float32 number (a float64 result almost never is), and the
    error is about float32's precision (2**-24, 6e-8, relative), not a wrong formula."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return ""
    values = got[np.isfinite(got) & (got != 0) & np.isfinite(want)]
    if values.size < 3 or not (values.astype(np.float32).astype(np.float64) == values).all():
        return ""
    with np.errstate(all="ignore"):
        rel = np.abs(got - want)[np.isfinite(got) & np.isfinite(want)] / np.maximum(np.abs(want[np.isfinite(got) & np.isfinite(want)]), 1e-300)
    if rel.size == 0 or rel.max() > 1e-3:
        return ""
    return (f". These differ only in the 7th or 8th significant digit (relative error up to {rel.max():.1g}) and every "
            "value of yours is a float32 number: your maths ran in float32 (an np.float32 array, a dtype=np.float32, "
            "a float32 input kept) and was cast back to float64 at the end. Compute in the inputs' float64")


def diagnose(got, variants, **kw):
    """The message of the first known-wrong variant that `got` matches (NaN matching NaN), or None.

    `variants` is a sequence of (message, value) where value is an array or a tuple of arrays, or a
    callable returning one (computed only when needed).
    """
    gots = got if isinstance(got, tuple) else (got,)
    for message, value in variants:
        value = value() if callable(value) else value
        values = value if isinstance(value, tuple) else (value,)
        if all_close(gots, values, equal_nan=True, **kw):
            return message
    return None


def exp_diff(a, b):
    """exp(a - b), with exp(-inf - anything) = 0: the guard every online-softmax step needs."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.exp(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return np.where(np.isneginf(a), 0.0, out)
