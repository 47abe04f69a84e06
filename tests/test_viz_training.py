"""flashkit.viz.training: the loss figure of a (growing) History and the before/after attention maps."""
import numpy as np

from flashkit.layers import TinyDecoder
from flashkit.train import History, make_batch
from flashkit.viz import training as viz


def test_loss_figure_grows_with_the_history():
    h = History(task="reverse", backend="numpy-standard")
    assert "not started" in viz.loss_figure(h).layout.title.text
    h.loss += [2.7, 2.5]
    h.seconds += [0.1, 0.2]
    h.eval_step += [0, 2]
    h.eval_loss += [2.8, 2.4]
    h.accuracy += [0.05, 0.2]
    fig = viz.loss_figure(h)
    assert "step 2, 0.2 s" in fig.layout.title.text and "20.0%" in fig.layout.title.text
    assert list(fig.data[0].y) == [2.7, 2.5] and list(fig.data[1].x) == [0, 2]
    assert fig.layout.yaxis.type == "log" and "nats" in fig.layout.yaxis.title.text


def test_attention_figure_before_and_after():
    model = TinyDecoder(vocab=16, d_model=16, n_heads=2, n_kv_heads=1, n_layers=2, seed=0)
    tokens, _ = make_batch("reverse", np.random.default_rng(0), 2, 4, 16)
    maps = model.attention_maps(tokens)
    assert [m.shape for m in maps] == [(2, 2, 8, 8)] * 2
    fig = viz.attention_figure(maps, maps, tokens[0], layer=1)
    assert len(fig.data) == 4  # 2 rows (untrained, trained) x 2 heads
    np.testing.assert_array_equal(fig.data[0].z, maps[1][0, 0])
    assert "Layer 2" in fig.layout.title.text
