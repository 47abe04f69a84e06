"""MPI ranks on the CPU through mpi4py: `mpiexec -n 4 python script.py`.

Install with `pip install "flashkit[distributed]"` (mpi4py and the `mpich` wheel, which brings its own
`mpiexec`). The exchange is MPI_Isend/MPI_Irecv on NumPy buffers (mpi4py's buffer interface: no
pickling); a failure notice is a small pickled message on its own tag, looked for while a rank waits.
MPI moves a large message only inside MPI calls unless the library runs a progress thread (MPICH:
MPIR_CVAR_ASYNC_PROGRESS=1), which is why the ring calls Request.progress() between its block
computations: the overlap that results is measured, not assumed (benchmarks/cpu_ring.py).
"""
from __future__ import annotations

import numpy as np

from flashkit.distributed.comm import DEFAULT_TIMEOUT, Communicator, Request, RingPeerError, check_timeout

DATA_TAG, ABORT_TAG = 17, 18


def available() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError("MPI ranks need mpi4py and an MPI library: pip install 'flashkit[distributed]' "
                           "(mpi4py and the mpich wheel)") from exc
    return MPI


class _MPIRequest(Request):
    def __init__(self, comm, reqs, what):
        super().__init__(comm, what)
        self.reqs = reqs

    def test(self) -> bool:
        return bool(self.comm.MPI.Request.Testall(self.reqs))

    def cancel(self):
        for r in self.reqs:
            try:
                r.Cancel()
            except Exception:  # noqa: BLE001 - a completed request cannot be cancelled; nothing to do
                pass


class MPIComm(Communicator):
    """A rank of an MPI communicator (default COMM_WORLD)."""

    name = "mpi"
    # MPICH moves a large (rendezvous) message when the receiver polls: a few polls during each block's
    # compute let it; measured by benchmarks/cpu_ring.py (hidden fraction, with and without).
    progress_pieces = 4

    def __init__(self, comm=None, timeout: float = DEFAULT_TIMEOUT, progress_pieces: int | None = None):
        self.MPI = _mpi()
        if progress_pieces is not None:
            self.progress_pieces = int(progress_pieces)
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = check_timeout(timeout)
        self._notices = []  # abort sends in flight (kept alive until they complete)

    def isendrecv(self, send, dest, recv, source, what="exchange"):
        reqs = [self.comm.Irecv(b, source=source, tag=DATA_TAG) for b in recv]  # the ring's own contiguous buffers
        reqs += [self.comm.Isend(np.ascontiguousarray(a), dest=dest, tag=DATA_TAG) for a in send]
        return _MPIRequest(self, reqs, what)

    def abort(self, message):
        for r in range(self.size):
            if r != self.rank:
                self._notices.append(self.comm.isend(message[:2000], dest=r, tag=ABORT_TAG))

    def check_peers(self):
        status = self.MPI.Status()
        if self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=ABORT_TAG, status=status):
            src = status.Get_source()
            message = self.comm.recv(source=src, tag=ABORT_TAG)
            raise RingPeerError(f"rank {self.rank} of {self.size} stops: rank {src} failed: {message}")


def mpiexec(n: int) -> list:
    """The command line that starts n ranks: the mpiexec beside this Python (the mpich wheel puts it in
    the environment's bin/), else the first on PATH; Open MPI's refuses root without a flag."""
    import os
    import shutil
    import subprocess
    import sys

    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if exe is None:
        raise RuntimeError("no mpiexec found: pip install 'flashkit[distributed]' brings MPICH's")
    cmd = [exe, "-n", str(int(n))]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
        if "Open MPI" in version or "OpenRTE" in version:
            cmd.append("--allow-run-as-root")
    return cmd
