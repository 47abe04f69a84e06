"""flashkit.viz.masks: the mask pictures, block masks and GQA figures show what the kernels do (fast)."""
import numpy as np
import pytest

from flashkit import masks
from flashkit.viz import masks as vizmask


def _titled(fig):
    assert fig.layout.title.text
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_top_left_against_bottom_right():
    tl = vizmask.top_left_causal(3, 5)
    br = masks.dense_mask(3, 5, (-1, 0))
    # The picture in flashkit/masks.py: top-left q0 sees k0 only; bottom-right q0 sees k0..k2.
    assert tl.tolist()[0] == [True, False, False, False, False]
    assert br.tolist()[0] == [True, True, True, False, False]
    assert br[-1].all() and not tl[-1].all()  # only bottom-right lets the last query see every key


def test_causal_alignment_figure_shows_both_masks():
    fig = vizmask.causal_alignment_figure(6, 10)
    _titled(fig)
    assert len(fig.data) == 2
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), masks.dense_mask(6, 10, (-1, 0)).astype(np.int8))
    np.testing.assert_array_equal(np.asarray(fig.data[1].z), np.tril(np.ones((6, 10), np.int8)))
    assert "bottom-right" in fig.layout.annotations[0].text and "top-left" in fig.layout.annotations[1].text


def test_block_mask_figure_marks_skipped_tiles():
    N, B = 64, 8
    fig = vizmask.block_mask_figure(N, N, B, B, window=(-1, 0))
    _titled(fig)
    z = np.asarray(fig.data[0].z)
    tiles = masks.block_map(N, N, B, B, (-1, 0))
    assert (tiles == masks.SKIP).sum() == 8 * 7 // 2  # strictly above the diagonal: T(T-1)/2 tiles
    for r in range(8):
        for c in range(8):
            block = z[r * B:(r + 1) * B, c * B:(c + 1) * B]
            if tiles[r, c] == masks.SKIP:
                assert (block == 0).all()
            else:
                assert (block != 0).all()
    np.testing.assert_array_equal(z == 2, masks.dense_mask(N, N, (-1, 0)))
    assert "28 of 64 tiles skipped" in fig.layout.title.text


def test_block_mask_with_a_custom_mask_and_ragged_tiles():
    N = 30  # not a multiple of the tile size on purpose
    doc = np.repeat(np.arange(2), [13, 17])
    packed = doc[:, None] == doc[None, :]
    fig = vizmask.block_mask_figure(N, N, 8, 8, mask=packed)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (N, N)
    np.testing.assert_array_equal(z == 2, packed)
    counts = vizmask.tile_counts(N, N, 8, 8, mask=packed)
    assert counts["skip"] + counts["partial"] + counts["full"] == counts["total"] == 16
    assert counts["skip"] == 4  # tiles (0,2), (0,3), (2,0), (3,0): keys of the other document only
    random_mask = np.random.default_rng(0).random((N, N)) < 0.7
    assert vizmask.tile_counts(N, N, 8, 8, mask=random_mask)["skip"] == 0


def test_masks_figure_one_panel_per_mask():
    fig = vizmask.masks_figure([("a", masks.dense_mask(8, 8, (2, 0))), ("b", masks.dense_mask(8, 8, (1, 1)))], "windows")
    _titled(fig)
    assert len(fig.data) == 2 and fig.layout.xaxis2.title.text


def test_gqa_figures():
    fig = vizmask.gqa_sharing_figure(8, 2)
    _titled(fig)
    uses = np.asarray(fig.data[0].z)
    assert uses.shape == (8, 2) and (uses.sum(axis=1) == 1).all()
    assert uses[:4, 0].all() and uses[4:, 1].all()  # query head h reads K/V head h // 4
    with pytest.raises(ValueError, match="Hq"):
        vizmask.gqa_sharing_figure(6, 4)
    bars = vizmask.kv_memory_figure(32, [32, 8], [128 * 2 ** 20, 32 * 2 ** 20], 8192, 128, "float16")
    _titled(bars)
    assert list(bars.data[0].y) == [128.0, 32.0] and "MiB" in bars.layout.yaxis.title.text


def test_block_mask_figure_is_big_enough_and_its_three_states_differ():
    fig = vizmask.block_mask_figure(64, 64, 8, 8, window=(-1, 0))
    assert fig.layout.width >= 500 and fig.layout.height >= 500
    scale = fig.data[0].colorscale
    colours = {scale[0][1], scale[2][1], scale[4][1]}  # skipped, masked in a computed tile, visible
    assert len(colours) == 3 and vizmask.MASKED_IN_TILE in colours and vizmask.SKIPPED in colours
    assert {t.name for t in fig.data[1:]} >= {"visible score", "skipped tile (never computed)"}
