"""Training the tiny decoder in NumPy: tasks that need attention, the Adam optimiser and the loop.

    from flashkit.layers import TinyDecoder
    from flashkit.train import train
    model = TinyDecoder(vocab=16, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, seed=0)
    history = train(model, task="reverse", steps=300)      # loss from ln(15) = 2.7 towards 0
    print(history.loss[0], history.loss[-1], history.accuracy[-1])

Every gradient is hand-written (flashkit.layers: each layer's `backward`) except attention's, which is
`flashkit.attention_backward`: FlashAttention-2's backward, P recomputed from the forward's logsumexp.

The tasks cannot be solved without attention: the model reads L random symbols, a separator, and must
then write them again, copied, reversed or sorted. Only the second half is scored, so a model that
ignores its context scores ln(vocab - 1) (chance) there; getting below that needs each output position
to look back at the right input position (copy: L + 1 tokens back; reverse: the mirror image), or at
all of them (sort). The attention maps of a trained model show that pattern.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from flashkit.measure.timing import threads_limit

SEP = 0  # the separator token; symbols are 1 .. vocab - 1
TASKS = ("copy", "reverse", "sort")


# ---------------------------------------------------------------- tasks
def make_batch(task: str, rng, batch: int, length: int, vocab: int):
    """(tokens, targets), each (batch, 2 length) int64, for next-token prediction on

        a_1 .. a_L  SEP  b_1 .. b_L      b = a (copy), a reversed (reverse), a sorted (sort)

    tokens is that sequence without its last token and targets without its first (the next token at
    every position); targets is -1 (not scored) on the first half, which is random and unpredictable.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    for name, v in (("batch", batch), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    if isinstance(vocab, bool) or not isinstance(vocab, numbers.Integral) or vocab < 3:
        raise ValueError(f"vocab must be an integer >= 3 (the separator and at least 2 symbols); got {vocab!r}")
    a = rng.integers(1, vocab, size=(batch, length))  # (B, L) symbols
    b = {"copy": a, "reverse": a[:, ::-1], "sort": np.sort(a, axis=1)}[task]
    full = np.concatenate([a, np.full((batch, 1), SEP), b], axis=1)  # (B, 2L + 1)
    tokens, targets = full[:, :-1].copy(), full[:, 1:].copy()  # (B, 2L) each
    targets[:, :length] = -1  # predicting a_2 .. a_L and SEP is guessing or trivial: not scored
    return tokens.astype(np.int64), targets.astype(np.int64)


def evaluate(model, tokens, targets, *, backend=None):
    """(loss, accuracy) on a batch: mean cross-entropy and the fraction of scored positions whose
    most likely next token is the target."""
    from flashkit.layers import cross_entropy

    logits = model.forward(tokens, backend=backend)
    loss, _ = cross_entropy(logits, targets)
    scored = targets >= 0
    return loss, float((logits.argmax(axis=-1) == targets)[scored].mean())


# ---------------------------------------------------------------- the optimiser
class Adam:
    """Adam (Kingma & Ba 2015), step for step as torch.optim.Adam computes it, so a torch twin of a model
    follows the same trajectory. Updates the arrays of `params` (name -> array) in place.

        m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2
        p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, params: dict, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        if not isinstance(lr, numbers.Real) or not lr > 0:
            raise ValueError(f"lr must be a number > 0; got {lr!r}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {betas!r}")
        self.params = params
        self.lr, (self.b1, self.b2), self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.m = {name: np.zeros_like(p) for name, p in params.items()}  # first moment (mean of g)
        self.v = {name: np.zeros_like(p) for name, p in params.items()}  # second moment (mean of g^2)
        self.t = 0

    def step(self, grads: dict) -> None:
        if set(grads) != set(self.params):
            raise ValueError(f"grads must have the keys of params; missing {sorted(set(self.params) - set(grads))}, "
                             f"extra {sorted(set(grads) - set(self.params))}")
        self.t += 1
        bias1, bias2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t  # early steps: m and v start at 0
        for name, p in self.params.items():
            g = grads[name].astype(p.dtype, copy=False)
            m, v = self.m[name], self.v[name]
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            p -= (self.lr / bias1) * m / (np.sqrt(v) / np.sqrt(bias2) + self.eps)


# ---------------------------------------------------------------- the loop
@dataclass
class History:
    """What a training run measured: one loss per step, and an evaluation every `eval_every` steps."""

    task: str
    backend: str
    loss: list = field(default_factory=list)  # training loss of each step's batch (nats per scored token)
    seconds: list = field(default_factory=list)  # wall time since the start, after each step
    eval_step: list = field(default_factory=list)  # steps after which the held-out batch was evaluated (0: before)
    eval_loss: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)  # held-out: fraction of scored tokens predicted right

    @property
    def steps(self) -> int:
        return len(self.loss)


def train(model, *, task: str = "reverse", steps: int = 300, batch: int = 32, length: int = 8, lr: float = 3e-3,
          betas=(0.9, 0.99), lr_decay: bool = True, seed: int = 0, backend: Optional[str] = None, eval_every: int = 25,
          time_limit: Optional[float] = None, callback: Optional[Callable] = None, threads: Optional[int] = 1
          ) -> History:
    """Train `model` (a flashkit.layers.TinyDecoder) on `task` with Adam; returns its History.

    Each step draws a fresh batch from a generator seeded by `seed` (the same batches for every backend,
    so runs can be compared loss for loss). `backend` is passed to attention and its backward (None: each
    layer's own, "auto" by default). Before the first step, every `eval_every` steps and after the last,
    the model is evaluated on one held-out batch of 256 sequences and `callback(history)` is called (a
    live plot). `time_limit` (seconds) stops early, after the step that crosses it. With `lr_decay` the
    learning rate falls linearly from lr to lr / 10 over the steps: near zero loss, Adam's full-size
    steps kick the model out of its minimum now and then (seen here as loss spikes late in a run).

    threads: Numba's kernels and NumPy's BLAS get this many threads during the run (None: as they are).
    The problems here (16 tokens, matrices of a few hundred rows) are too small to share out, and on a
    busy 2-core machine extra threads cost more than they give: measured, about 200 ms a step with
    BLAS's default pool against 19 ms with one thread; with Numba on 2 threads 80-86 ms against 34-51 ms
    on one while other work was running.
    """
    for name, v in (("steps", steps), ("eval_every", eval_every)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    rng = np.random.default_rng(seed)
    held_out = make_batch(task, np.random.default_rng([seed, 1]), 256, length, model.vocab)
    optimiser = Adam(model.parameters(), lr=lr, betas=betas)
    history = History(task=task, backend=backend or model.blocks[0].attn.backend)

    def checkpoint(step):
        loss, acc = evaluate(model, *held_out, backend=backend)
        history.eval_step.append(step)
        history.eval_loss.append(loss)
        history.accuracy.append(acc)
        if callback is not None:
            callback(history)

    t0 = time.perf_counter()
    with threads_limit(threads):  # None changes nothing
        checkpoint(0)  # the untrained model: about ln(vocab - 1), chance on the scored half
        for step in range(1, steps + 1):
            if lr_decay:
                optimiser.lr = lr * (1 - 0.9 * (step - 1) / max(1, steps - 1))
            tokens, targets = make_batch(task, rng, batch, length, model.vocab)
            loss, grads = model.loss_and_grads(tokens, targets, backend=backend)
            optimiser.step(grads)
            history.loss.append(loss)
            history.seconds.append(time.perf_counter() - t0)
            out_of_time = time_limit is not None and history.seconds[-1] >= time_limit
            if step % eval_every == 0 or step == steps or out_of_time:
                checkpoint(step)
            if out_of_time:
                break
    return history


def main(argv=None) -> int:
    """python -m flashkit.train [--task reverse] [--seconds 60] [--backend auto]: train the tiny model, print
    the held-out loss and accuracy as it goes, and how long it took."""
    import argparse

    from flashkit.layers import TinyDecoder

    parser = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    parser.add_argument("--task", choices=TASKS, default="reverse")
    parser.add_argument("--steps", type=int, default=1500, help="steps (the learning rate decays over them)")
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this much training time, steps or not")
    parser.add_argument("--backend", default=None, help="attention backend for forward and backward (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = TinyDecoder(vocab=16, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, seed=args.seed)

    def show(h):
        step = h.eval_step[-1]
        t = h.seconds[step - 1] if step else 0.0
        print(f"step {step:5d}  {t:6.1f} s  held-out loss {h.eval_loss[-1]:.4f} nats  accuracy {h.accuracy[-1]:.3f}",
              flush=True)

    h = train(model, task=args.task, steps=args.steps, backend=args.backend, seed=args.seed, eval_every=100,
              time_limit=args.seconds, callback=show)
    print(f"{h.steps} steps of batch 32 in {h.seconds[-1]:.1f} s ({1e3 * h.seconds[-1] / h.steps:.1f} ms a step, "
          f"evaluations included), backend {h.backend}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
