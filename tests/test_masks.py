"""Bottom-right causal alignment, windows and tile states agree with a brute-force picture."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashkit import masks


def brute(Nq, Nk, window):
    left, right = window
    i = np.arange(Nq)[:, None] + (Nk - Nq)
    j = np.arange(Nk)[None, :]
    ok = np.ones((Nq, Nk), bool)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def test_causal_picture_bottom_right():
    pic = masks.dense_mask(3, 5, masks.effective_window(True, None))
    assert pic.astype(int).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_causal_with_window_keeps_the_tighter_right_bound():
    assert masks.effective_window(True, (4, 3)) == (4, 0)
    assert masks.effective_window(True, (-1, -1)) == (-1, 0)
    assert masks.effective_window(False, None) == (-1, -1)


@settings(max_examples=80, deadline=None)
@given(Nq=st.integers(1, 40), Nk=st.integers(1, 40), left=st.integers(-1, 12), right=st.integers(-1, 12),
       Br=st.integers(1, 9), Bc=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_tile_states_match_brute_force(Nq, Nk, left, right, Br, Bc, seed):
    window = (left, right)
    pic = brute(Nq, Nk, window)
    np.testing.assert_array_equal(masks.dense_mask(Nq, Nk, window), pic)
    custom = np.random.default_rng(seed).random((Nq, Nk)) < 0.9
    for mask in (None, custom):
        vis = pic if mask is None else pic & mask
        states = masks.block_map(Nq, Nk, Br, Bc, window, mask)
        for r in range(states.shape[0]):
            for c in range(states.shape[1]):
                tile = vis[r * Br:(r + 1) * Br, c * Bc:(c + 1) * Bc]
                if not tile.any():
                    assert states[r, c] == masks.SKIP or mask is not None and states[r, c] != masks.FULL
                    if mask is None:
                        assert states[r, c] == masks.SKIP
                elif tile.all():
                    assert states[r, c] in (masks.FULL, masks.PARTIAL)
                    if mask is None:
                        assert states[r, c] == masks.FULL
                else:
                    assert states[r, c] == masks.PARTIAL, (r, c, tile)
    frac = masks.visible_fraction(Nq, Nk, window)
    assert abs(frac - pic.mean()) < 1e-12


@pytest.mark.parametrize("Nq,Nk", [(5, 9), (9, 5), (7, 7), (1, 30)])
def test_gpu_standard_visibility_is_the_masks_rule(Nq, Nk):
    """cupy-standard builds its window picture from masks.row_bounds; with NumPy standing in for CuPy
    it equals masks.dense_mask for causal and sliding windows, Nq != Nk included."""
    from flashkit import validate
    from flashkit.gpu.standard import visibility

    q, k = np.zeros((1, 1, Nq, 4), np.float32), np.zeros((1, 1, Nk, 4), np.float32)
    for causal in (False, True):
        for window in (None, (2, 1), (-1, 3), (0, 0), (3, -1)):
            p = validate.check(q, k, k, causal=causal, window=window)
            vis = visibility(p, np)
            if not p.has_window:
                assert vis is None
                continue
            np.testing.assert_array_equal(vis, masks.dense_mask(Nq, Nk, p.window), err_msg=f"causal={causal} window={window}")
