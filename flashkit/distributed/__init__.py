"""Beyond one device: ring attention (context parallelism) over MPI, NCCL or a simulated ring.

    from flashkit.distributed import MPIComm, ring_attention, split_sequence
    comm = MPIComm()                                            # under `mpiexec -n 4 python script.py`
    q_r, k_r, v_r = (split_sequence(x, comm.size, "zigzag")[comm.rank] for x in (q, k, v))
    o_r, lse_r = ring_attention(q_r, k_r, v_r, comm=comm, causal=True, split="zigzag", return_lse=True)

- ring.py: ring_attention / ring_attention_backward, the schedule and the exact merge
- split.py: contiguous and zigzag splits, split_sequence / unsplit_sequence, which block pairs are skipped
- comm.py: the Communicator interface (non-blocking exchange, timeouts), the agreement step, the errors
- mpi.py (mpi4py), nccl.py (cupy.cuda.nccl), sim.py (virtual ranks on threads: simulate(fn, size))

Nothing here imports mpi4py or CuPy until a communicator that needs it is made.
"""
from flashkit.distributed.comm import (Communicator, RingError, RingMismatch, RingPeerError, RingTimeout,
                                       allgather_json, agree)
from flashkit.distributed.mpi import MPIComm
from flashkit.distributed.nccl import NcclComm
from flashkit.distributed.ring import LAYOUTS, RingStats, ring_attention, ring_attention_backward
from flashkit.distributed.sim import SimComm, simulate, virtual_ranks
from flashkit.distributed.split import SPLITS, chunk_bounds, pair_box, segments, split_sequence, unsplit_sequence, work_per_rank

__all__ = ["ring_attention", "ring_attention_backward", "RingStats", "LAYOUTS", "SPLITS", "Communicator", "MPIComm",
           "NcclComm", "SimComm", "virtual_ranks", "simulate", "split_sequence", "unsplit_sequence", "segments", "chunk_bounds",
           "pair_box", "work_per_rank", "allgather_json", "agree", "RingError", "RingMismatch", "RingPeerError",
           "RingTimeout"]
