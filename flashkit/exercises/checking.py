"""What every checker shares: the verdict (pass message or ExerciseError), calling the learner's
function safely, and comparisons that NaN cannot fool.

A checker runs the learner's function on fresh random inputs, compares with flashkit's reference and,
when the answer is wrong, compares it with known-wrong variants (the classic mistakes) so the message
can name the mistake instead of saying "wrong". Comparisons never use max() or nanmax() over an error
array: `max(err, tol)` and `np.nanmax` silently drop NaN, and `not err > tol` is True for NaN. Here a
NaN only ever matches a NaN at the same place in a known-wrong variant.
"""
from __future__ import annotations

import numpy as np

ATOL, RTOL = 1e-9, 1e-7  # float64 inputs; a correct solution differs only by summation order


class ExerciseError(AssertionError):
    """A checker's verdict that the learner's function is wrong, with the mistake named when known."""


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
    before = [np.array(a, copy=True) if isinstance(a, np.ndarray) else None for a in args]
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
        if b is not None and not np.array_equal(a, b, equal_nan=True):
            raise ExerciseError(
                f"✗ {task}: `{name}` modified its argument #{i + 1} in place. Work on new arrays "
                "(e.g. x - m, not x -= m): the caller still needs its inputs."
            )
    return out


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
    parts = [f"at {list(map(int, idx))}: expected {want[tuple(idx)]:.6g}, got {got[tuple(idx)]:.6g}" for idx in bad[:limit]]
    more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
    return "; ".join(parts) + more


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
