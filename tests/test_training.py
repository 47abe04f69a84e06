"""Training the tiny decoder: every layer's hand-written backward against float64 finite differences,
RoPE's backward as the inverse rotation, P never stored, Adam as torch computes it, the loss falling on
the reverse task, the same losses with numpy-standard, and (with torch) the same model in torch, on
flashkit.torch.attention and on scaled_dot_product_attention, following the same loss curve."""
import numpy as np
import pytest

from flashkit.layers import MLP, DecoderBlock, MultiHeadAttention, RMSNorm, TinyDecoder, cross_entropy
from flashkit.rope import apply_rope, rope_angles
from flashkit.train import Adam, evaluate, make_batch, train

EPS = 1e-6  # central differences in float64: truncation ~EPS^2, rounding ~1e-16 / EPS


def numeric_grad(f, a, indices):
    """Central differences of the scalar f() with respect to the entries `indices` of array a (changed in place
    and restored)."""
    out = []
    for i in indices:
        old = a[i]
        a[i] = old + EPS
        plus = f()
        a[i] = old - EPS
        minus = f()
        a[i] = old
        out.append((plus - minus) / (2 * EPS))
    return np.array(out)


def assert_grads(f, arrays, grads, rng, most=None, rtol=1e-6):
    """Every array's analytic gradient against finite differences, on all entries or `most` random ones."""
    assert set(arrays) == set(grads), (sorted(arrays), sorted(grads))
    for name, a in arrays.items():
        g = grads[name]
        assert g.shape == a.shape, f"{name}: gradient shape {g.shape} != {a.shape}"
        every = list(np.ndindex(a.shape))
        pick = every if most is None or len(every) <= most else [every[i] for i in rng.choice(len(every), most, replace=False)]
        num = numeric_grad(f, a, pick)
        ana = np.array([g[i] for i in pick])
        scale = max(np.abs(num).max(), 1e-8)
        err = np.abs(num - ana).max() / scale
        assert err < rtol, f"{name}: max |analytic - numeric| / max |numeric| = {err:.2e}"


def projected(layer_out, R):
    """A scalar loss sum(y * R) with a fixed random R, so that dL/dy = R reaches every output element."""
    return float((layer_out * R).sum())


# ---------------------------------------------------------------- one layer at a time
def test_rmsnorm_backward():
    rng = np.random.default_rng(0)
    norm = RMSNorm(7, dtype=np.float64)
    norm.weight[:] = rng.standard_normal(7)
    x, R = rng.standard_normal((2, 5, 7)), rng.standard_normal((2, 5, 7))
    y, saved = norm.forward_train(x)
    np.testing.assert_array_equal(y, norm(x))  # the training forward is the inference forward
    dx, grads = norm.backward(R, saved)
    assert_grads(lambda: projected(norm.forward_train(x)[0], R), {"x": x, **norm.parameters()}, {"x": dx, **grads}, rng)


def test_mlp_backward():
    rng = np.random.default_rng(1)
    mlp = MLP(6, 10, seed=2, dtype=np.float64)
    x, R = rng.standard_normal((3, 4, 6)) * 2, rng.standard_normal((3, 4, 6))
    y, saved = mlp.forward_train(x)
    np.testing.assert_allclose(y, mlp(x), rtol=1e-14, atol=1e-14)
    dx, grads = mlp.backward(R, saved)
    assert_grads(lambda: projected(mlp.forward_train(x)[0], R), {"x": x, **mlp.parameters()}, {"x": dx, **grads}, rng)


LAYER_OPTIONS = {
    "gqa-rope-fused": dict(n_heads=4, n_kv_heads=2),  # GQA, RoPE on every feature, fused Wqkv
    "mqa-partial-rope-unfused": dict(n_heads=4, n_kv_heads=1, fused_qkv=False, partial_rotary=0.5),  # three projections
    "mha-no-rope-d3": dict(n_heads=2, n_kv_heads=2, rope=False, head_dim=3),  # plain multi-head, odd head size
}


@pytest.mark.parametrize("name, backend, most", [(name, "numpy-standard", None) for name in LAYER_OPTIONS] + [
    ("gqa-rope-fused", "numpy-tiled", 10), ("gqa-rope-fused", "auto", 10)])  # the other backwards, sampled
def test_attention_layer_backward(name, backend, most):
    rng = np.random.default_rng(3)
    layer = MultiHeadAttention(8, seed=4, dtype=np.float64, backend=backend, **LAYER_OPTIONS[name])
    x, R = rng.standard_normal((2, 7, 8)), rng.standard_normal((2, 7, 8))  # 7 tokens: not a power of two
    y, saved = layer.forward_train(x)
    np.testing.assert_allclose(y, layer(x), rtol=1e-13, atol=1e-13)
    dx, grads = layer.backward(R, saved)
    assert_grads(lambda: projected(layer.forward_train(x)[0], R), {"x": x, **layer.parameters()}, {"x": dx, **grads},
                 rng, most=most)


def test_attention_layer_keeps_lse_not_p():
    """What the attention layer saves for its backward grows as n, never n^2: O and lse, not P."""
    layer = MultiHeadAttention(16, n_heads=4, n_kv_heads=2, dtype=np.float64)
    n = 50
    _, saved = layer.forward_train(np.random.default_rng(5).standard_normal((1, n, 16)))
    assert saved["lse"].shape == (1, 4, n)
    sizes = {k: v.size for k, v in saved.items() if isinstance(v, np.ndarray)}
    assert max(sizes.values()) < n * n, sizes  # no (n x n) array: P is recomputed from lse
    P = layer.attention_map(saved)
    np.testing.assert_allclose(P.sum(axis=-1), 1.0, rtol=1e-12)
    assert (np.triu(P[0, 0], k=1) == 0).all()  # causal: no weight on a later token


def test_rope_backward_is_the_inverse_rotation():
    """<R x, y> = <x, R^T y>, and R^T is the rotation by -theta; rotating back gives x again."""
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((2, 3, 9, 10)), rng.standard_normal((2, 3, 9, 10))
    pos = np.arange(4, 13)
    for r in (10, 6, 0):
        lhs = (apply_rope(x, pos, rotary_dim=r) * y).sum()
        rhs = (x * apply_rope(y, pos, rotary_dim=r, inverse=True)).sum()
        assert abs(lhs - rhs) < 1e-11
        np.testing.assert_allclose(apply_rope(apply_rope(x, pos, rotary_dim=r), pos, rotary_dim=r, inverse=True), x,
                                   atol=1e-13)
    cos, sin = rope_angles(pos, 10)
    assert np.abs(sin).max() > 0.5  # the angles are not trivially small: the test above means something


def test_cross_entropy_backward_and_ignored_positions():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((3, 5, 6)) * 3
    targets = rng.integers(-1, 6, (3, 5))
    targets[0, 0] = 2  # at least one scored position
    loss, dlogits = cross_entropy(logits, targets)
    scored = targets >= 0
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    direct = -np.log(p[scored, targets[scored]]).mean()
    assert abs(loss - direct) < 1e-12
    assert (dlogits[~scored] == 0).all()
    assert_grads(lambda: cross_entropy(logits, targets)[0], {"logits": logits}, {"logits": dlogits}, rng)
    with pytest.raises(ValueError, match="score no position"):
        cross_entropy(logits, np.full((3, 5), -1))
    with pytest.raises(ValueError, match="targets must be integers of shape"):
        cross_entropy(logits, targets[:, :4])


def test_block_backward():
    rng = np.random.default_rng(8)
    block = DecoderBlock(8, 4, 2, mlp_hidden=12, seed=9, dtype=np.float64, partial_rotary=0.5, backend="numpy-standard")
    x, R = rng.standard_normal((2, 6, 8)), rng.standard_normal((2, 6, 8))
    y, saved = block.forward_train(x)
    np.testing.assert_allclose(y, block(x), rtol=1e-13, atol=1e-13)
    dx, grads = block.backward(R, saved)
    assert_grads(lambda: projected(block.forward_train(x)[0], R), {"x": x, **block.parameters()}, {"x": dx, **grads},
                 rng, most=12)


def test_model_loss_gradient_down_to_the_embedding():
    rng = np.random.default_rng(10)
    model = TinyDecoder(vocab=9, d_model=8, n_heads=4, n_kv_heads=2, n_layers=2, seed=11, dtype=np.float64)
    tokens, targets = make_batch("reverse", rng, 3, 4, 9)
    tokens[0, :2] = 5  # one token twice in a row: its embedding row collects two gradients
    loss, grads = model.loss_and_grads(tokens, targets, backend="numpy-standard")
    np.testing.assert_allclose(model.forward(tokens), model.forward_train(tokens)[0], rtol=1e-13, atol=1e-13)
    assert abs(loss - np.log(8)) < 1.5  # about chance at the start
    params = model.parameters()
    assert_grads(lambda: model.loss_and_grads(tokens, targets, backend="numpy-standard")[0], params, grads, rng, most=8)
    unused = sorted(set(range(9)) - set(tokens.ravel().tolist()))
    assert (grads["embed"][unused] == 0).all()


# ---------------------------------------------------------------- the optimiser and the task
def test_make_batch_tasks():
    rng = np.random.default_rng(12)
    for task in ("copy", "reverse", "sort"):
        tokens, targets = make_batch(task, rng, 4, 5, 10)
        assert tokens.shape == targets.shape == (4, 10)
        assert (targets[:, :5] == -1).all() and (tokens[:, 5] == 0).all()  # the separator, then the answer
        a, answer = tokens[:, :5], targets[:, 5:]
        want = {"copy": a, "reverse": a[:, ::-1], "sort": np.sort(a, axis=1)}[task]
        np.testing.assert_array_equal(answer, want)
        np.testing.assert_array_equal(tokens[:, 6:], answer[:, :-1])  # next-token prediction: shifted by one
    with pytest.raises(ValueError, match="task must be one of"):
        make_batch("add", rng, 4, 5, 10)
    with pytest.raises(ValueError, match="vocab must be an integer >= 3"):
        make_batch("copy", rng, 4, 5, 2)


def test_adam_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    theirs = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    ours = Adam(params, lr=0.01, betas=(0.9, 0.99))
    opt = torch.optim.Adam(theirs.values(), lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(5):
        grads = {k: rng.standard_normal(v.shape) * rng.choice([1e-6, 1.0, 1e3]) for k, v in params.items()}
        ours.step(grads)
        for k, t in theirs.items():
            t.grad = torch.tensor(grads[k])
        opt.step()
    for k in params:
        np.testing.assert_allclose(params[k], theirs[k].detach().numpy(), rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="grads must have the keys"):
        ours.step({"a": grads["a"]})


def test_the_loss_falls_on_the_reverse_task():
    """The model must attend to reverse a sequence; 150 steps take a few seconds on 2 cores."""
    model = TinyDecoder(vocab=16, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, seed=0)
    history = train(model, task="reverse", steps=150, eval_every=50)
    assert history.eval_step == [0, 50, 100, 150]
    assert history.eval_loss[0] > 2.3  # chance: ln(15) = 2.71 nats on the scored half
    assert history.eval_loss[-1] < 0.7 and history.accuracy[-1] > 0.75, (history.eval_loss, history.accuracy)
    assert np.isfinite(history.loss).all() and len(history.seconds) == 150
    loss, acc = evaluate(model, *make_batch("reverse", np.random.default_rng(99), 64, 8, 16))
    assert acc > 0.7  # on sequences it has never seen


def test_the_same_losses_with_numpy_standard():
    """auto (Numba forward) and numpy-standard (forward and backward) give the same run to 1e-5."""
    runs = []
    for backend in ("auto", "numpy-standard"):
        model = TinyDecoder(vocab=16, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, seed=1)
        runs.append(train(model, task="reverse", steps=8, batch=16, backend=backend, eval_every=4))
    np.testing.assert_allclose(runs[0].loss, runs[1].loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runs[0].eval_loss, runs[1].eval_loss, rtol=1e-5, atol=1e-5)
    assert runs[0].loss[-1] < runs[0].loss[0] - 0.05  # and it did move


# ---------------------------------------------------------------- the same model in torch
def torch_twin(model, attention):
    """The same TinyDecoder written with torch ops, its weights copied: (params, loss(tokens, targets)).

    `attention(q, k, v)` is the causal attention to use: flashkit.torch.attention or torch's SDPA."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    params = {name: torch.tensor(w.copy(), requires_grad=True) for name, w in model.parameters().items()}
    a0 = model.blocks[0].attn
    H, Hkv, d, r = a0.n_heads, a0.n_kv_heads, a0.head_dim, a0.rotary_dim

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + model.norm.eps) * w

    def rope(x):  # half-split pairs (x_i, x_{i + r/2}) turned by pos * theta_i, as flashkit.rope
        cos, sin = (torch.tensor(c, dtype=x.dtype) for c in rope_angles(np.arange(x.shape[2]), r, a0.rope_base))
        x1, x2, rest = x[..., :r // 2], x[..., r // 2:r], x[..., r:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)

    def loss(tokens, targets):
        tokens, targets = torch.tensor(tokens), torch.tensor(targets)
        B, n = tokens.shape
        x = params["embed"][tokens]
        for i in range(len(model.blocks)):
            def p(key):
                return params[f"blocks.{i}.{key}"]
            qkv = rms(x, p("norm1.weight")) @ p("attn.Wqkv")
            q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
            q = rope(q.reshape(B, n, H, d).transpose(1, 2))  # (B, H, n, d)
            k = rope(k.reshape(B, n, Hkv, d).transpose(1, 2))
            v = v.reshape(B, n, Hkv, d).transpose(1, 2)
            o = attention(q, k, v).transpose(1, 2).reshape(B, n, H * d)
            x = x + o @ p("attn.Wo")
            h = rms(x, p("norm2.weight"))
            x = x + (F.silu(h @ p("mlp.W_gate")) * (h @ p("mlp.W_up"))) @ p("mlp.W_down")
        logits = rms(x, params["norm.weight"]) @ params["lm_head"]
        return F.cross_entropy(logits.reshape(B * n, -1), targets.reshape(-1), ignore_index=-1)

    return params, loss


def torch_run(model, attention, steps, seed, lr, betas):
    torch = pytest.importorskip("torch")
    params, loss_fn = torch_twin(model, attention)
    opt = torch.optim.Adam(params.values(), lr=lr, betas=betas, eps=1e-8)
    rng, losses = np.random.default_rng(seed), []
    for _ in range(steps):  # the batches train() draws: the same generator, the same calls
        loss = loss_fn(*make_batch("reverse", rng, 16, 8, model.vocab))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def sdpa_causal(q, k, v):
    import torch

    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # Nq == Nk


def flashkit_causal(q, k, v):
    import flashkit.torch

    return flashkit.torch.attention(q, k, v, causal=True, backend="numpy-standard")


@pytest.mark.parametrize("attention", [sdpa_causal, flashkit_causal], ids=["sdpa", "flashkit.torch"])
def test_torch_twin_follows_the_numpy_loss_curve(attention):
    """float64: the hand-written NumPy backward and torch's autograd take the same steps, to rounding."""
    pytest.importorskip("torch")
    def make():
        return TinyDecoder(vocab=12, d_model=16, n_heads=4, n_kv_heads=2, n_layers=2, seed=2, dtype=np.float64)
    ours = train(make(), task="reverse", steps=6, batch=16, lr=3e-3, betas=(0.9, 0.99), lr_decay=False, seed=3,
                 eval_every=6, backend="numpy-standard")
    theirs = torch_run(make(), attention, 6, seed=3, lr=3e-3, betas=(0.9, 0.99))
    np.testing.assert_allclose(ours.loss, theirs, rtol=1e-10)
    assert theirs[-1] < theirs[0]


def test_torch_model_trains_the_same_on_flashkit_and_sdpa_in_float32():
    """The attention swapped inside one torch model, float32, the default backend: the same loss curve."""
    torch = pytest.importorskip("torch")
    import flashkit.torch

    model = TinyDecoder(vocab=16, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, seed=4)
    curves = [torch_run(model, fn, 12, seed=5, lr=3e-3, betas=(0.9, 0.99)) for fn in (
        lambda q, k, v: flashkit.torch.attention(q, k, v, causal=True),
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))]
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-4, atol=1e-4)
    assert curves[0][-1] < curves[0][0] - 0.2
