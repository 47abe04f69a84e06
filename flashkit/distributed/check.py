"""Check the ring on real MPI ranks: `mpiexec -n 4 python -m flashkit.distributed.check`.

Every rank builds the same global problems from one seed, runs ring_attention (and the backward) on
its chunk, and compares its rows with flashkit.attention (and attention_backward) on the whole
sequence: float64 to 1e-12 and float32 to 2e-5 (relative error of the rank's rows), for contiguous and
zigzag splits, causal and not, windows across rank boundaries, GQA, Nq != Nk and lengths that are no
multiple of the rank count. Each rank prints one line; rank 0 ends with `RING-CHECK OK ...` or the
failures, and the exit status is 0 only if every case passed on every rank.

`--fault` makes one rank (rank 1, or the last when there are two) misbehave to show that every rank
stops with a clear error instead of hanging: `raise` (an exception in the middle of the ring), `shape`
(a chunk one token too long), `dtype` (float32 among float64), `exit` (the process dies mid-ring: mpiexec ends the job),
`stall` (it never calls: the others time out, say so and abort the job). tests/test_distributed.py runs these.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import flashkit
from flashkit.distributed.comm import RingError, RingTimeout, allgather_json
from flashkit.distributed.mpi import MPIComm
from flashkit.distributed.ring import ring_attention, ring_attention_backward
from flashkit.distributed.split import segments, split_sequence

FAULTS = ("none", "raise", "shape", "dtype", "exit", "stall")
TOLERANCE = {"float64": 1e-12, "float32": 2e-5}


def cases():
    """(name, B, Hq, Hkv, Nq, Nk, d, dtype, causal, window, split) of every case, shared by all ranks."""
    out = []
    for dtype in ("float64", "float32"):
        for split in ("contiguous", "zigzag"):
            for causal, window in ((False, None), (True, None), (False, (6, 2)), (True, (9, -1))):
                out.append((dtype, 1, 4, 2, 23, 23, 8, dtype, causal, window, split))
            out.append((dtype, 2, 2, 1, 19, 26, 5, dtype, True, None, split))  # Nq != Nk, MQA
    return out


def _rows(x, N, size, rank, split):
    return np.concatenate([x[..., a:b, :] for a, b in segments(N, size, rank, split)], axis=-2)


def _positions(N, size, rank, split):
    return np.concatenate([np.arange(a, b) for a, b in segments(N, size, rank, split)])


def _lse_err(lse, ref):
    """Largest |lse - ref|; inf if a row that sees no key (-inf) differs from one that does."""
    if not np.array_equal(np.isneginf(lse), np.isneginf(ref)):
        return float("inf")
    return float(np.max(np.abs(np.where(np.isneginf(ref), 0.0, ref - np.where(np.isneginf(lse), 0.0, lse))), initial=0.0))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (den if den > 0 else 1.0))


def _say(line):
    sys.stdout.write(line + "\n")  # one write: mpiexec interleaves the ranks' output by writes
    sys.stdout.flush()


class _Faulty(MPIComm):
    """An MPIComm that raises (fault 'raise') or kills its process ('exit') at its third exchange."""

    def __init__(self, fault, **kw):
        super().__init__(**kw)
        self.fault, self.calls = fault, 0

    def isendrecv(self, *args, **kw):
        self.calls += 1
        if self.calls == 3:
            if self.fault == "exit":
                os._exit(3)
            raise RuntimeError("injected failure (flashkit.distributed.check --fault raise)")
        return super().isendrecv(*args, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fault", choices=FAULTS, default="none")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds a receive may wait (default 30)")
    args = ap.parse_args(argv)
    comm = MPIComm(timeout=args.timeout)
    size, rank = comm.size, comm.rank
    bad = min(1, size - 1)  # the rank that misbehaves under --fault
    if args.fault in ("raise", "exit") and rank == bad:
        comm = _Faulty(args.fault, timeout=args.timeout)
    if args.fault == "stall" and rank == bad:
        time.sleep(3600)  # never calls: the others must time out
    t0 = time.perf_counter()
    worst, failures = {}, []
    try:
        for n, (label, B, Hq, Hkv, Nq, Nk, d, dtype, causal, window, split) in enumerate(cases()):
            rng = np.random.default_rng(1000 + n)
            q = rng.standard_normal((B, Hq, Nq, d)).astype(dtype)
            k = rng.standard_normal((B, Hkv, Nk, d)).astype(dtype)
            v = rng.standard_normal((B, Hkv, Nk, d)).astype(dtype)
            do = rng.standard_normal(q.shape).astype(dtype)
            o_ref, lse_ref = flashkit.attention(q, k, v, causal=causal, window=window, return_lse=True)
            grads_ref = flashkit.attention_backward(do, q, k, v, o_ref, lse_ref, causal=causal, window=window)
            q_r, do_r = (split_sequence(x, size, split)[rank] for x in (q, do))
            k_r, v_r = (split_sequence(x, size, split)[rank] for x in (k, v))
            if args.fault == "shape" and rank == bad:
                q_r = np.concatenate([q_r, q_r[..., :1, :]], axis=-2)
            if args.fault == "dtype" and rank == bad:
                q_r, k_r, v_r = (x.astype(np.float32 if dtype == "float64" else np.float64) for x in (q_r, k_r, v_r))
            o, lse = ring_attention(q_r, k_r, v_r, comm=comm, causal=causal, window=window, split=split, return_lse=True)
            dq, dk, dv = ring_attention_backward(do_r, q_r, k_r, v_r, o, lse, comm=comm, causal=causal, window=window,
                                                 split=split)
            errs = {"o": _rel(o, _rows(o_ref, Nq, size, rank, split)),
                    "lse": _lse_err(lse, lse_ref[..., _positions(Nq, size, rank, split)]),
                    "dq": _rel(dq, _rows(grads_ref[0], Nq, size, rank, split)),
                    "dk": _rel(dk, _rows(grads_ref[1], Nk, size, rank, split)),
                    "dv": _rel(dv, _rows(grads_ref[2], Nk, size, rank, split))}
            e = max(errs.values())
            worst[label] = max(worst.get(label, 0.0), e)
            if not e <= TOLERANCE[label]:
                failures.append(f"case {n} ({dtype} causal={causal} window={window} {split} Nq={Nq} Nk={Nk}): " +
                                ", ".join(f"{k_}={v_:.1e}" for k_, v_ in errs.items()))
    except RingTimeout as exc:  # a peer stopped: say so, then end the whole job (the stalled rank with it)
        _say(f"rank {rank}: {type(exc).__name__}: {exc}")
        time.sleep(1.0)  # let the other ranks that timed out print theirs first
        comm.comm.Abort(2)
    except RingError as exc:  # a peer failed or disagreed: say so, clearly, on this rank
        _say(f"rank {rank}: {type(exc).__name__}: {exc}")
        return 2
    except Exception as exc:  # noqa: BLE001 - this rank's own failure (the ring has told the others)
        _say(f"rank {rank}: {type(exc).__name__}: {exc}")
        return 1
    table = allgather_json(comm, {"worst": worst, "failures": failures})
    print(f"rank {rank} of {size}: {len(cases())} cases, worst relative error "
          + ", ".join(f"{k_} {v_:.1e}" for k_, v_ in worst.items()) + f", {time.perf_counter() - t0:.1f} s", flush=True)
    all_failures = [f"rank {r}: {f}" for r, row in enumerate(table) for f in row["failures"]]
    if rank == 0:
        overall = {lab: max(row["worst"].get(lab, 0.0) for row in table) for lab in TOLERANCE}
        if all_failures:
            print("RING-CHECK FAILED\n" + "\n".join(all_failures), flush=True)
        else:
            print(f"RING-CHECK OK ranks={size} cases={len(cases())} "
                  + " ".join(f"{k_}={v_:.1e}" for k_, v_ in overall.items()), flush=True)
    return 1 if all_failures else 0


if __name__ == "__main__":
    sys.exit(main())
