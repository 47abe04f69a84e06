"""An in-process ring: N virtual ranks, one thread each, following exactly the schedule of the real ones.

`simulate(fn, size)` runs fn(comm) on `size` threads, each with a SimComm whose isendrecv puts a copy of
the arrays on the receiver's queue (a send completes at once, as an eager MPI send does) and whose
receive takes them off under the same timeout as every transport. The ring code cannot tell it from
MPI or NCCL, so the tests and the notebook run the real schedule, its error handling included, in one
process: a virtual rank that raises reports it through abort() and the others stop with RingPeerError.
flashkit's kernel launches are serialised (flashkit.cpu.threads), so the ranks compute one at a time.
"""
from __future__ import annotations

import queue
import threading

from flashkit.distributed.comm import DEFAULT_TIMEOUT, Communicator, Request, RingMismatch, RingPeerError, check_timeout


class _World:
    def __init__(self, size):
        self.size = size
        self.queues = {(s, d): queue.Queue() for s in range(size) for d in range(size)}
        self.failures = {}  # rank -> message
        self.lock = threading.Lock()


class _SimRequest(Request):
    """Receive number `index` from `source`: messages match receives in the order both were posted,
    as MPI's non-overtaking rule and NCCL's stream order guarantee."""

    def __init__(self, comm, recv, source, index, what):
        super().__init__(comm, what)
        self.recv, self.source, self.index, self.done = recv, source, index, not recv

    def test(self) -> bool:
        if self.done:
            return True
        arrived = self.comm.arrived[self.source]
        channel = self.comm.world.queues[(self.source, self.comm.rank)]
        while True:  # move what has arrived into this rank's inbox, in order
            try:
                arrived.append(channel.get_nowait())
            except queue.Empty:
                break
        if len(arrived) <= self.index:
            return False
        arrays, arrived[self.index] = arrived[self.index], None
        if len(arrays) != len(self.recv) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(arrays, self.recv)):
            raise RingPeerError(f"rank {self.comm.rank}: {self.what}: rank {self.source} sent "
                                f"{[(a.shape, str(a.dtype)) for a in arrays]}, expected {[(b.shape, str(b.dtype)) for b in self.recv]}")
        for buf, a in zip(self.recv, arrays):
            buf[...] = a
        self.done = True
        return True


class SimComm(Communicator):
    """One virtual rank of a simulated ring (made by `simulate`, or `virtual_ranks(size)` for hand-driven use)."""

    name = "simulated"

    def __init__(self, world: _World, rank: int, timeout: float = DEFAULT_TIMEOUT):
        self.world, self.rank, self.size = world, rank, world.size
        self.timeout = check_timeout(timeout)
        self.arrived = {r: [] for r in range(self.size)}  # messages taken off each channel, by arrival
        self.posted = {r: 0 for r in range(self.size)}  # receives posted on each channel so far

    def isendrecv(self, send, dest, recv, source, what="exchange"):
        if send:
            self.world.queues[(self.rank, dest)].put([a.copy() for a in send])  # a copy, as on a wire
        index = self.posted[source]
        if recv:
            self.posted[source] += 1
        return _SimRequest(self, list(recv), source, index, what)

    def abort(self, message):
        with self.world.lock:
            self.world.failures.setdefault(self.rank, message)

    def check_peers(self):
        with self.world.lock:
            others = {r: m for r, m in self.world.failures.items() if r != self.rank}
        if others:
            r, m = min(others.items())
            raise RingPeerError(f"rank {self.rank} of {self.size} stops: rank {r} failed: {m}")


def virtual_ranks(size: int, timeout: float = DEFAULT_TIMEOUT) -> list:
    """`size` SimComms sharing one world, for code that drives the virtual ranks itself."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an integer >= 1; got {size!r}")
    world = _World(size)
    return [SimComm(world, r, timeout) for r in range(size)]


def simulate(fn, size: int, timeout: float = DEFAULT_TIMEOUT) -> list:
    """[fn(comm) for each virtual rank], run concurrently on `size` threads; re-raises the first error.

    If ranks fail, the exception of the lowest failing rank that failed on its own (not a RingPeerError
    caused by another) is raised, with every rank's outcome in its notes.
    """
    comms = virtual_ranks(size, timeout)
    results, errors = [None] * size, [None] * size

    def run(r):
        try:
            results[r] = fn(comms[r])
        except BaseException as exc:  # noqa: BLE001 - reported below, for every rank
            errors[r] = exc
            if not isinstance(exc, (RingMismatch, RingPeerError)):  # those every rank knows already
                comms[r].abort(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(r,), name=f"ring-rank-{r}", daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(e is not None for e in errors):
        own = [e for e in errors if e is not None and not isinstance(e, RingPeerError)]
        first = own[0] if own else next(e for e in errors if e is not None)
        if hasattr(first, "add_note"):  # Python >= 3.11
            for r, e in enumerate(errors):
                first.add_note(f"rank {r}: " + ("ok" if e is None else f"{type(e).__name__}: {e}"))
        raise first
    return results
