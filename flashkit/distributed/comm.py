"""The small interface the ring needs from a transport, and the agreement step every call starts with.

A communicator knows its `rank` and `size` and does one thing: `isendrecv(send, dest, recv, source)`
starts sending a list of arrays to `dest` and receiving a list of arrays of known shapes into `recv`
from `source`, and returns at once; the returned Request's `wait()` blocks until both are done, but
never longer than the communicator's `timeout` (seconds): it raises RingTimeout then, and RingPeerError
as soon as a peer has reported a failure with `abort()`. So no rank can hang on a peer that failed,
stopped or called with other arguments. Three transports implement it, all from well-kept engines:
MPI (mpi4py, CPU ranks: flashkit/distributed/mpi.py), NCCL (CuPy's cupy.cuda.nccl, GPU ranks:
flashkit/distributed/nccl.py) and an in-process ring of threads (flashkit/distributed/sim.py).

`agree(comm, meta)` runs before any block moves: every rank's description of its call (shapes, dtype,
layout, options, and the error of its local checks, if any) travels once around the ring, so every
rank holds the same table and raises the same clear error when the ranks disagree.
"""
from __future__ import annotations

import json
import time

import numpy as np

# Each rank's description of its call travels in a buffer of this many bytes (JSON, zero-padded).
META_BYTES = 4096
DEFAULT_TIMEOUT = 60.0


class RingError(RuntimeError):
    """Something went wrong on the ring; the message says which rank and what."""


class RingTimeout(RingError):
    """A receive did not complete within the communicator's timeout: a peer stopped, died or hangs."""


class RingPeerError(RingError):
    """Another rank failed and said so (Communicator.abort): this rank stops too."""


class RingMismatch(RingError, ValueError):
    """The ranks were called with arguments that do not fit together (shapes, dtype, layout, options)."""


class Request:
    """An exchange in flight. Subclasses implement test(); wait() polls it under the timeout."""

    def __init__(self, comm, what: str):
        self.comm, self.what = comm, what
        self.wait_s = 0.0  # seconds this rank spent blocked in wait()

    def test(self) -> bool:  # pragma: no cover - every transport overrides it
        raise NotImplementedError

    def progress(self) -> None:
        """Let the transport move data while the caller computes (MPI progresses only inside its calls)."""
        self.test()

    def cancel(self) -> None:
        """Give up on the exchange (after an error); best effort."""

    def wait(self) -> None:
        t0 = time.perf_counter()
        deadline = t0 + self.comm.timeout
        pause = 1e-5
        while not self.test():
            self.comm.check_peers()
            now = time.perf_counter()
            if now > deadline:
                self.cancel()
                raise RingTimeout(f"rank {self.comm.rank} of {self.comm.size}: {self.what} did not complete within "
                                  f"{self.comm.timeout:g} s; a peer rank failed, stopped or was called differently")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)  # spin briefly first: most waits are short
        self.wait_s = time.perf_counter() - t0


class Communicator:
    """rank, size, timeout and the non-blocking exchange; see the module docstring."""

    rank: int
    size: int
    timeout: float
    name: str = "communicator"
    # The ring computes each block pair in this many pieces of query rows while a transfer is in
    # flight, calling Request.progress() between them: transports that move data only inside their
    # own calls (MPI without a progress thread) need the calls; the others need no extra launches.
    progress_pieces: int = 1

    def isendrecv(self, send, dest: int, recv, source: int, what: str = "exchange") -> Request:
        raise NotImplementedError

    def abort(self, message: str) -> None:
        """Tell every other rank that this one failed (best effort, never blocks)."""

    def check_peers(self) -> None:
        """Raise RingPeerError if another rank has reported a failure."""

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.size

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.size


def check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 or timeout != timeout:
        raise ValueError(f"timeout must be a number of seconds > 0; got {timeout!r}")
    return float(timeout)


def allgather_json(comm: Communicator, obj) -> list:
    """Every rank's `obj` (JSON-able), in rank order, on every rank: size - 1 steps around the ring."""
    blob = json.dumps(obj, sort_keys=True).encode()
    if len(blob) > META_BYTES:
        raise ValueError(f"the call's description is {len(blob)} bytes; at most {META_BYTES} travel")
    xp = comm.array_module if hasattr(comm, "array_module") else np
    table = [None] * comm.size
    table[comm.rank] = obj
    out = np.zeros(META_BYTES, np.uint8)
    out[:len(blob)] = np.frombuffer(blob, np.uint8)
    held = xp.asarray(out)
    for step in range(1, comm.size):
        incoming = xp.zeros(META_BYTES, xp.uint8)
        comm.isendrecv([held], comm.next, [incoming], comm.prev, what=f"the agreement step ({step} of {comm.size - 1})").wait()
        raw = incoming.get() if xp is not np else incoming
        table[(comm.rank - step) % comm.size] = json.loads(bytes(raw).rstrip(b"\0").decode())
        held = incoming
    return table


def agree(comm: Communicator, meta: dict, local_error: str | None = None) -> list:
    """Exchange every rank's `meta` (and local error) and raise the same error on every rank if any.

    Returns the table of every rank's meta. Raises RingMismatch naming the ranks and fields that differ,
    or the first rank's local error (RingPeerError on the others, the original on that rank).
    """
    table = allgather_json(comm, {"meta": meta, "error": local_error})
    failed = [(r, row["error"]) for r, row in enumerate(table) if row["error"]]
    if failed:
        lines = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise RingPeerError(f"rank {comm.rank} of {comm.size}: the call was rejected before the ring started ({lines})")
    metas = [row["meta"] for row in table]
    shared = [k for k in metas[0] if k not in ("nq", "nk")]
    differ = [k for k in shared if any(m.get(k) != metas[0][k] for m in metas)]
    if differ:
        rows = "; ".join(f"rank {r}: " + ", ".join(f"{k}={m.get(k)!r}" for k in differ) for r, m in enumerate(metas))
        raise RingMismatch(f"rank {comm.rank} of {comm.size}: the ranks disagree on {', '.join(differ)} ({rows})")
    return metas
