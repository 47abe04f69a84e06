"""Ring attention: exact attention over a sequence split across ranks, K/V blocks passed around a ring.

Each of the P ranks holds a chunk of the queries and the same chunk of the keys and values
(flashkit/distributed/split.py: contiguous, or zigzag for causal balance). At step t rank r holds the
K/V block of rank (r - t) mod P; it starts sending that block to rank r + 1 and receiving the next one
from rank r - 1, computes the partial (O_t, lse_t) of its queries against the block it holds with
flashkit.attention, and merges it into its running answer with online_softmax.merge_outputs:

    lse = log(exp(lse_a) + exp(lse_b)),   O = exp(lse_a - lse) O_a + exp(lse_b - lse) O_b

exact in any order, the same merge as split-K decoding. After P steps every rank has the answer for
its queries over the whole sequence, and no rank ever held more than two K/V blocks (the one it
computes on and the one arriving).

Masking is positional and global: causal is bottom-right across the WHOLE sequence and a window may
span rank boundaries. split.pair_box turns the global rule into a window on the box of each block pair
that holds its visible scores; pairs with none are skipped (their blocks still travel on).

The backward (ring_attention_backward) runs the same ring: dQ stays with its queries, dK and dV travel
with their K/V blocks and arrive home after the last step. Each block pair's gradients come from
flashkit.attention_backward with the pair's own logsumexp lse_b (recomputed by a forward of the pair:
flashkit's backward checks that the lse it gets belongs to its q and k) and dO scaled by
w = exp(lse_b - lse): then P_b w = exp(S - lse) is the global softmax and the pair's D is w D, so
dS_b = P_b (w dP - w D) = P (dP - D), the exact global gradient. The recomputation costs one block
forward per pair (+40% FLOPs over a backward that took the global lse directly).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from flashkit import api, validate
from flashkit.distributed import split as splitting
from flashkit.distributed.comm import Communicator, RingError, RingMismatch, RingPeerError, agree
from flashkit.online_softmax import merge_outputs

LAYOUTS = ("bhnd", "bnhd")  # flashkit's (B, H, N, d), and flash_attn's / Megatron's (B, N, H, d)
# A piece of a block pair (Communicator.progress_pieces) keeps at least this many query rows: every
# flashkit.attention call costs its checks and dispatch, which smaller calls would not amortise
# (measured in notebook 14: 16 calls a step at N = 1024 on 2 ranks cost more than the balance saved).
PIECE_MIN_ROWS = 256


@dataclass
class RingStats:
    """What one ring call did, per step: filled in when passed as `stats=`.

    compute_s and wait_s are host clocks: on the GPU the compute is asynchronous, so compute_s is the
    time to launch it unless the caller synchronises.
    """

    steps: list = field(default_factory=list)  # one dict a step: source, pairs, scores, compute_s, wait_s, bytes

    @property
    def compute_s(self) -> float:
        return sum(s["compute_s"] for s in self.steps)

    @property
    def wait_s(self) -> float:
        return sum(s["wait_s"] for s in self.steps)

    @property
    def bytes_sent(self) -> int:
        return sum(s["bytes_sent"] for s in self.steps)

    @property
    def visible_scores(self) -> int:
        return sum(s["visible_scores"] for s in self.steps)

    def hidden_fraction(self, comm_alone_s: float) -> float:
        """Fraction of communication hidden behind compute: 1 - (time blocked waiting) / (time the same
        transfers take with nothing to overlap, measured separately: benchmarks/cpu_ring.py)."""
        if comm_alone_s <= 0:
            return 1.0
        return float(min(1.0, max(0.0, 1.0 - self.wait_s / comm_alone_s)))


def ring_attention(q, k, v, *, comm: Communicator, causal=False, window=None, scale=None, layout="bhnd",
                   split="contiguous", return_lse=False, backend="auto", stats=None):
    """This rank's rows of attention(Q, K, V) over the whole sequence split across `comm`'s ranks.

    Parameters
    ----------
    q, k, v : this rank's chunks (NumPy on CPU ranks, CuPy on GPU ranks) in `layout`: "bhnd" as
        flashkit.attention ((B, H, N, d), (H, N, d) or (N, d)), or "bnhd" ((B, N, H, d) or (N, H, d)).
        The chunk is the rank's part of the global sequence as `split` cuts it
        (flashkit.distributed.split_sequence); GQA (fewer K/V heads) as in attention.
    comm : a Communicator: MPIComm (mpi4py), NcclComm (CuPy NCCL) or a SimComm (flashkit.distributed.simulate).
    causal, window, scale : as in flashkit.attention, over the GLOBAL sequence: bottom-right causal
        (query i sees keys j <= i + Nk - Nq), windows across rank boundaries.
    split : "contiguous" or "zigzag" (every rank one early and one late chunk: causal work balanced).
    return_lse : also return this rank's logsumexp rows, (B, H, N_local).
    backend : the flashkit backend for each block pair ("auto": the fastest that serves it).
    stats : a RingStats to fill with what each step did (pairs skipped, scores, compute and wait times).

    Every rank must call it with the same options and matching chunks: an agreement step first checks
    that on every rank, and any mismatch, or a rank that fails, raises on every rank instead of hanging.
    After a failure the communicator is spent (a peer may have stopped mid-exchange): make a new one.
    """
    return _run(_forward, comm, "forward", (q, k, v), dict(causal=causal, window=window, scale=scale, layout=layout,
                split=split, return_lse=return_lse, backend=backend, stats=stats))


def ring_attention_backward(do, q, k, v, o, lse, *, comm: Communicator, causal=False, window=None, scale=None,
                            layout="bhnd", split="contiguous", backend="auto", stats=None):
    """This rank's (dq, dk, dv) of the ring forward, given its rows of do, o and lse.

    The arguments are ring_attention's, plus do (the gradient of the loss with respect to this rank's
    o), o and lse (what ring_attention returned on this rank with return_lse=True). dq stays on the
    rank; dk and dv travel with their blocks and are summed over every rank whose queries see them.
    Exact against flashkit.attention_backward on the whole sequence.
    """
    return _run(_backward, comm, "backward", (do, q, k, v, o, lse), dict(causal=causal, window=window, scale=scale,
                layout=layout, split=split, backend=backend, stats=stats))


# --- the shared frame: local checks, agreement, errors reported to every rank ------------------------

def _run(body, comm, kind, arrays, opts):
    if not isinstance(comm, Communicator):
        raise TypeError(f"comm must be a flashkit.distributed Communicator (MPIComm, NcclComm, SimComm); got {type(comm).__name__}")
    try:
        local = _check_local(kind, arrays, opts)
    except Exception as exc:
        # Say so to every rank (they would otherwise wait for this one), then raise the original here.
        try:
            agree(comm, {}, local_error=f"{type(exc).__name__}: {exc}")
        except RingError:
            pass
        raise
    try:
        metas = agree(comm, local["meta"])
        layout = _global_layout(comm, metas, opts["split"])
        return body(comm, local, layout, opts)
    except (RingMismatch, RingPeerError):
        raise  # every rank knows already: a mismatch is found alike everywhere, a peer's failure came from it
    except Exception as exc:
        comm.abort(f"{type(exc).__name__}: {exc}")  # the others would wait for this rank: tell them
        raise


def _check_local(kind, arrays, opts):
    layout = opts["layout"]
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    splitting.check_split(opts["split"])
    if not isinstance(opts["backend"], str):
        raise TypeError(f"backend must be a string ('auto' or a name from flashkit.backends()); got {opts['backend']!r}")
    if opts["stats"] is not None and not isinstance(opts["stats"], RingStats):
        raise TypeError(f"stats must be None or a RingStats; got {type(opts['stats']).__name__}")
    if kind == "forward":
        q, k, v = arrays
        q4, k4, v4 = (_to_bhnd(name, x, layout) for name, x in (("q", q), ("k", k), ("v", v)))
        problem = validate.check(q4, k4, v4, causal=opts["causal"], scale=opts["scale"], window=opts["window"])
        if not isinstance(opts["return_lse"], bool):
            raise TypeError(f"return_lse must be True or False; got {opts['return_lse']!r}")
        extra = {}
    else:
        do, q, k, v, o, lse = arrays
        q4, k4, v4, do4, o4 = (_to_bhnd(name, x, layout) for name, x in (("q", q), ("k", k), ("v", v), ("do", do), ("o", o)))
        lse3 = _lse_to_bh(lse, q4)
        problem = validate.check_backward(do4, q4, k4, v4, o4, lse3, causal=opts["causal"], scale=opts["scale"],
                                          window=opts["window"])
        extra = {"dO": problem.dO, "O": problem.O, "lse": problem.lse}
    P = problem
    meta = {"kind": kind, "xp": P.xp.__name__, "layout": layout, "split": opts["split"], "B": P.B, "Hq": P.Hq,
            "Hkv": P.Hkv, "d": P.d, "dtype": str(q.dtype), "causal": bool(opts["causal"]), "window": list(P.window),
            "scale": P.scale, "backend": opts["backend"], "nq": P.Nq, "nk": P.Nk}
    return {"problem": P, "meta": meta, "q_shape": tuple(q.shape), "k_shape": tuple(k.shape), "dtype": q.dtype, **extra}


def _global_layout(comm, metas, split):
    """Global lengths and every rank's (nq, nk), checked against the split on every rank alike."""
    nq = [m["nq"] for m in metas]
    nk = [m["nk"] for m in metas]
    Nq, Nk, size = sum(nq), sum(nk), comm.size
    if size > min(Nq, Nk):
        raise RingMismatch(f"rank {comm.rank} of {size}: {size} ranks need at least one query and one key each; "
                           f"the whole sequence has Nq={Nq}, Nk={Nk}")
    expect_q = [splitting.local_length(Nq, size, r, split) for r in range(size)]
    expect_k = [splitting.local_length(Nk, size, r, split) for r in range(size)]
    if nq != expect_q or nk != expect_k:
        raise RingMismatch(
            f"rank {comm.rank} of {size}: the chunks do not form a {split} split: the ranks hold "
            f"{nq} queries and {nk} keys, a {split} split of Nq={Nq}, Nk={Nk} gives {expect_q} and {expect_k} "
            "(cut the sequence with flashkit.distributed.split_sequence)")
    return {"Nq": Nq, "Nk": Nk, "nq": nq, "nk": nk}


def _to_bhnd(name, x, layout):
    """A 4-D (B, H, N, d) view or copy of x in `layout` (arrays only; validate.check does the rest)."""
    if validate.array_module(x) is None:
        raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray; got {type(x).__name__}")
    if layout == "bhnd":
        if x.ndim not in (2, 3, 4):
            raise ValueError(f"{name} must have shape (B, H, N, d), (H, N, d) or (N, d) in layout 'bhnd'; got {tuple(x.shape)}")
        return x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
    if x.ndim not in (3, 4):
        raise ValueError(f"{name} must have shape (B, N, H, d) or (N, H, d) in layout 'bnhd'; got {tuple(x.shape)}")
    x4 = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
    return x4.transpose(0, 2, 1, 3)  # (B, N, H, d) -> (B, H, N, d); validate.check makes it contiguous


def _from_bhnd(X, shape, layout):
    if layout == "bnhd":
        X = X.transpose(0, 2, 1, 3)  # (B, H, N, d) -> (B, N, H, d)
    return X.reshape(shape)


def _lse_shape(q_shape, layout):
    """lse's shape as flashkit.attention returns it: q's without d ("bhnd"); (B, H, N) or (H, N) ("bnhd")."""
    if layout == "bhnd":
        return tuple(q_shape[:-1])
    *lead, N, H, _ = q_shape
    return tuple(lead) + (H, N)


def _lse_to_bh(lse, q4):
    if validate.array_module(lse) is None:
        raise TypeError(f"lse must be a numpy.ndarray or cupy.ndarray; got {type(lse).__name__}")
    want = q4.shape[:3]
    if lse.size != int(np.prod(want)) or lse.ndim not in (1, 2, 3):
        raise ValueError(f"lse must have shape (B, H, N_local) = {tuple(want)} (ring_attention's return_lse=True output); "
                         f"got {tuple(lse.shape)}")
    return lse.reshape(want)


def _segments_with_offsets(N, size, rank, split):
    """[(global (start, stop), local offset)] of the segments a rank holds."""
    out, at = [], 0
    for a, b in splitting.segments(N, size, rank, split):
        out.append(((a, b), at))
        at += b - a
    return out


def _pairs(layout, rank, src, size, split, window, pieces=1):
    """(box, q offset, k offset) of every block pair of this rank's queries and src's keys, and #skipped.

    pieces > 1 cuts each query segment into up to that many runs of at least PIECE_MIN_ROWS rows (rows
    are independent, so the answer is the same) so that the caller can let the transport progress
    between them."""
    pairs, skipped = [], 0
    for (qs, qe), qoff in _segments_with_offsets(layout["Nq"], size, rank, split):
        for kseg, koff in _segments_with_offsets(layout["Nk"], size, src, split):
            boxes = []
            for a, b in splitting.chunk_bounds(qe - qs, max(1, min(pieces, (qe - qs) // PIECE_MIN_ROWS))):
                box = splitting.pair_box((qs + a, qs + b), kseg, layout["Nq"], layout["Nk"], window)
                if box is not None:
                    boxes.append((box, qoff + a, koff))
            skipped += not boxes
            pairs += boxes
    return pairs, skipped


def _acc_dtype(xp, dtype):
    return xp.float64 if np.dtype(dtype) == np.float64 else xp.float32


# --- the forward ring -------------------------------------------------------------------------------

def _pass_on(comm, xp, layout, K, V, src, t, ring):
    """Step t's exchange, started: send the K/V block we hold (rank `src`'s) to the next rank and receive
    the previous rank's, rank (src - 1)'s, into fresh buffers, while this step computes on the one held.
    (request, K_in, V_in, that rank); (None, None, None, None) on the last step, which passes nothing on."""
    if t == comm.size - 1:
        return None, None, None, None
    nxt = (src - 1) % comm.size
    K_in = xp.empty(K.shape[:2] + (layout["nk"][nxt], K.shape[3]), K.dtype)
    V_in = xp.empty_like(K_in)
    req = comm.isendrecv([K, V], comm.next, [K_in, V_in], comm.prev,
                         what=f"{ring} step {t + 1}: the K/V block of rank {nxt}")
    return req, K_in, V_in, nxt


def _forward(comm, local, layout, opts):
    P = local["problem"]
    xp, (B, Hq, nq, d) = P.xp, P.Q.shape
    size, rank, split = comm.size, comm.rank, opts["split"]
    acc = _acc_dtype(xp, P.Q.dtype)
    O_acc = xp.zeros((B, Hq, nq, d), acc)  # the running answer of this rank's queries
    lse_acc = xp.full((B, Hq, nq), -np.inf, acc)
    K, V, src = P.K, P.V, rank
    for t in range(size):
        step_t0 = time.perf_counter()
        req, K_in, V_in, nxt = _pass_on(comm, xp, layout, K, V, src, t, "ring")
        pairs, skipped = _pairs(layout, rank, src, size, split, P.window, comm.progress_pieces if req else 1)
        scores = 0
        for box, qoff, koff in pairs:
            rows, cols = slice(qoff + box.r0, qoff + box.r1), slice(koff + box.c0, koff + box.c1)
            # (O_t, lse_t) = attention(Q_rows, K_cols, V_cols) on the pair's box, its window in box coordinates
            O_t, lse_t = api.attention(P.Q[:, :, rows], K[:, :, cols], V[:, :, cols], window=box.window,
                                       scale=P.scale, backend=opts["backend"], return_lse=True)
            # merge: lse = log(e^lse_acc + e^lse_t), O = e^(lse_acc - lse) O_acc + e^(lse_t - lse) O_t
            O_acc[:, :, rows], lse_acc[:, :, rows] = merge_outputs(
                [O_acc[:, :, rows], O_t.astype(acc, copy=False)], [lse_acc[:, :, rows], lse_t.astype(acc, copy=False)])
            scores += box.visible
            if req is not None:
                req.progress()
        compute_s = time.perf_counter() - step_t0
        sent = 0
        if req is not None:
            req.wait()
            sent = K.nbytes + V.nbytes
            K, V, src = K_in, V_in, nxt
        if opts["stats"] is not None:
            opts["stats"].steps.append({"step": t, "source": (rank - t) % size, "pairs": len(pairs), "skipped": skipped,
                                        "visible_scores": scores * B * Hq, "compute_s": compute_s,
                                        "wait_s": 0.0 if req is None else req.wait_s, "bytes_sent": sent})
    o = _from_bhnd(O_acc.astype(local["dtype"], copy=False), local["q_shape"], opts["layout"])
    if not opts["return_lse"]:
        return o
    lse_dtype = xp.float64 if np.dtype(local["dtype"]) == np.float64 else xp.float32
    return o, lse_acc.astype(lse_dtype, copy=False).reshape(_lse_shape(local["q_shape"], opts["layout"]))


# --- the backward ring ------------------------------------------------------------------------------

def _backward(comm, local, layout, opts):
    P = local["problem"]
    xp, (B, Hq, nq, d), Hkv = P.xp, P.Q.shape, P.Hkv
    size, rank, split = comm.size, comm.rank, opts["split"]
    acc = _acc_dtype(xp, P.Q.dtype)
    dQ = xp.zeros((B, Hq, nq, d), acc)  # stays here
    K, V, src = P.K, P.V, rank
    dK = dV = None  # the gradients travelling with the block held; None until they arrive
    pending_grad = None  # the exchange bringing dK, dV of the block held (from the previous rank)
    grad_in = None  # its receive buffers (dK, dV)
    for t in range(size):
        step_t0 = time.perf_counter()
        req_kv, K_in, V_in, nxt = _pass_on(comm, xp, layout, K, V, src, t, "backward ring")
        # This step's contributions to the held block's dK, dV, summed before the travelling ones arrive.
        dK_t = xp.zeros(K.shape, acc)
        dV_t = xp.zeros(V.shape, acc)
        pairs, skipped = _pairs(layout, rank, src, size, split, P.window, comm.progress_pieces if size > 1 else 1)
        scores = 0
        for box, qoff, koff in pairs:
            rows, cols = slice(qoff + box.r0, qoff + box.r1), slice(koff + box.c0, koff + box.c1)
            Q_i, K_j, V_j = P.Q[:, :, rows], K[:, :, cols], V[:, :, cols]
            lse_i = local["lse"][:, :, rows]
            # lse_b: the pair's own logsumexp (the backward checks that its lse belongs to its q and k)
            _, lse_b = api.attention(Q_i, K_j, V_j, window=box.window, scale=P.scale, backend=opts["backend"],
                                     return_lse=True)
            # w = exp(lse_b - lse): P_b * w is the global softmax; dO scaled by w makes dS_b the global dS
            w = xp.exp(lse_b.astype(acc) - lse_i.astype(acc))
            dO_w = (local["dO"][:, :, rows].astype(acc) * w[..., None]).astype(P.Q.dtype)
            dq, dk, dv = api.attention_backward(dO_w, Q_i, K_j, V_j, local["O"][:, :, rows], lse_b.astype(lse_i.dtype),
                                                window=box.window, scale=P.scale, backend=opts["backend"])
            dQ[:, :, rows] += dq
            dK_t[:, :, cols] += dk
            dV_t[:, :, cols] += dv
            scores += box.visible
            for r in (req_kv, pending_grad):
                if r is not None:
                    r.progress()
        compute_s = time.perf_counter() - step_t0
        wait_s = 0.0
        if pending_grad is not None:
            pending_grad.wait()
            wait_s += pending_grad.wait_s
            dK, dV = grad_in
            dK += dK_t
            dV += dV_t
        else:
            dK, dV = dK_t, dV_t
        sent = 0
        if size > 1:
            # dK, dV move on with their block; after the last step this hop takes them home.
            home = (src - 1) % size
            grad_in = (xp.empty((B, Hkv, layout["nk"][home], d), acc), xp.empty((B, Hkv, layout["nk"][home], d), acc))
            pending_grad = comm.isendrecv([dK, dV], comm.next, list(grad_in), comm.prev,
                                          what=f"backward ring step {t + 1}: dK, dV of rank {home}'s block")
            sent += 2 * dK.nbytes
        if req_kv is not None:
            req_kv.wait()
            wait_s += req_kv.wait_s
            sent += K.nbytes + V.nbytes
            K, V, src = K_in, V_in, nxt
        if opts["stats"] is not None:
            opts["stats"].steps.append({"step": t, "source": (rank - t) % size, "pairs": len(pairs), "skipped": skipped,
                                        "visible_scores": scores * B * Hq, "compute_s": compute_s, "wait_s": wait_s,
                                        "bytes_sent": sent})
    if pending_grad is not None:  # our own block's gradients, home from the last rank that held them
        pending_grad.wait()
        dK, dV = grad_in
    dtype = local["dtype"]
    dq = _from_bhnd(dQ.astype(dtype, copy=False), local["q_shape"], opts["layout"])
    dk = _from_bhnd(dK.astype(dtype, copy=False), local["k_shape"], opts["layout"])
    dv = _from_bhnd(dV.astype(dtype, copy=False), local["k_shape"], opts["layout"])
    return dq, dk, dv


__all__ = ["ring_attention", "ring_attention_backward", "RingStats", "LAYOUTS"]
