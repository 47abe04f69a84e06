"""GPU ranks through NCCL, as CuPy exposes it (cupy.cuda.nccl): one process per GPU.

Each rank makes its communicator from a unique id created once and shared (by the parent process of a
multiprocessing spawn, or any other channel): `NcclComm(rank, size, uid)`. An exchange is one NCCL
group {send to dest, receive from source} enqueued on a stream of its own, after the arrays it sends
are ready on the caller's stream; the request records an event behind it, and wait() polls that event
under the timeout, then makes the caller's stream wait for the received blocks. NCCL has no notion of
a timeout or of a failed peer, so a timeout aborts the communicator (ncclCommAbort) before it raises,
and an optional multiprocessing Event (`abort_event`) lets a failing rank stop the others at once.
One limit NCCL sets: the first exchange between two ranks builds their connection inside
ncclGroupEnd, on the host, with no timeout; if a peer never reaches that first exchange (the agreement
step), its neighbours block there, and only the launcher's own deadline (benchmarks/gpu_ring_check.py
kills its ranks after 45 s) ends them. Every later exchange is polled under the timeout.
"""
from __future__ import annotations

from flashkit.distributed.comm import DEFAULT_TIMEOUT, Communicator, Request, RingPeerError, check_timeout


def available() -> tuple:
    """(True, "") when CuPy, a CUDA device and NCCL are there, else (False, why not)."""
    try:
        import cupy
        from cupy.cuda import nccl
    except Exception as exc:  # noqa: BLE001 - ImportError, or CUDA failing to load
        return False, f"CuPy with NCCL is not importable ({type(exc).__name__}: {exc})"
    if not getattr(nccl, "available", True):
        return False, "CuPy was built without NCCL (cupy.cuda.nccl.available is False)"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        return False, f"no CUDA device ({type(exc).__name__}: {exc})"
    if n < 1:
        return False, "no CUDA device"
    return True, ""


def unique_id():
    """A new NCCL unique id (a tuple of ints, picklable) to hand to every rank."""
    from cupy.cuda import nccl

    return nccl.get_unique_id()


class _NcclRequest(Request):
    def __init__(self, comm, event, what):
        super().__init__(comm, what)
        self.event = event

    def test(self) -> bool:
        return self.event.done

    def wait(self):
        try:
            super().wait()
        except Exception:
            self.comm.abort_nccl()
            raise
        import cupy

        cupy.cuda.get_current_stream().wait_event(self.event)  # compute on the received blocks after them


class NcclComm(Communicator):
    """Rank `rank` of `size` GPU ranks on device `device` (default: the current one)."""

    name = "nccl"

    def __init__(self, rank: int, size: int, uid, device=None, timeout: float = DEFAULT_TIMEOUT, abort_event=None):
        import cupy
        from cupy.cuda import nccl

        ok, why = available()
        if not ok:
            raise RuntimeError(f"NCCL ranks need a GPU: {why}")
        self.cupy, self.nccl = cupy, nccl
        self.array_module = cupy
        self.rank, self.size = int(rank), int(size)
        self.timeout = check_timeout(timeout)
        self.abort_event = abort_event
        if device is not None:
            cupy.cuda.Device(device).use()
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._aborted = False

    def isendrecv(self, send, dest, recv, source, what="exchange"):
        cupy, nccl = self.cupy, self.nccl
        self.stream.wait_event(cupy.cuda.get_current_stream().record())  # what we send is computed
        nccl.groupStart()
        for a in send:
            self.comm.send(a.data.ptr, a.nbytes, nccl.NCCL_UINT8, dest, self.stream.ptr)
        for b in recv:
            self.comm.recv(b.data.ptr, b.nbytes, nccl.NCCL_UINT8, source, self.stream.ptr)
        nccl.groupEnd()
        return _NcclRequest(self, self.stream.record(), what)

    def abort(self, message):
        if self.abort_event is not None:
            self.abort_event.set()

    def abort_nccl(self):
        if not self._aborted:
            self._aborted = True
            try:
                self.comm.abort()
            except Exception:  # noqa: BLE001 - the communicator may already be gone
                pass

    def check_peers(self):
        if self.abort_event is not None and self.abort_event.is_set():
            self.abort_nccl()
            raise RingPeerError(f"rank {self.rank} of {self.size} stops: another rank failed (abort event set)")
