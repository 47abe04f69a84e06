"""Time ring attention on real MPI ranks: `run(ranks, N=...)` starts `mpiexec -n ranks python -m
flashkit.measure.ring` and returns what every rank measured.

Each rank builds its chunk of one global problem (the same seed everywhere), warms up (Numba compiles
on every rank), then, with a barrier before each call so the ranks start together:

- time: the ring call, min and median of `repeats` (the slowest rank decides a step, so the job's
  time is the max over ranks of each rank's time);
- work: the visible scores this rank computed and its compute time (host clock), from RingStats;
- communication: the time blocked waiting for blocks during the ring (RingStats.wait_s), and the time
  the same P - 1 block exchanges take alone, with nothing to overlap; hidden fraction = 1 - wait/alone;
- memory: the extra memory of one call on this rank (tracemalloc: NumPy's buffers, the blocks in flight);
- on one rank, flashkit.attention on the whole sequence beside the ring, the single-device peer.

Threads: Numba and BLAS get cores // ranks threads each (at least one), so 4 ranks on 2 cores are
oversubscribed twice and say so (`threads_per_rank`, `cores`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

PREFIX = "RING-TIMES "


def _worker(args) -> None:
    from flashkit import attention
    from flashkit.distributed import MPIComm, RingStats, ring_attention, split_sequence
    from flashkit.distributed.split import local_length
    from flashkit.measure import memory, timing

    comm = MPIComm(timeout=args.timeout, progress_pieces=args.pieces)
    MPI, world = comm.MPI, comm.comm
    rng = np.random.default_rng(args.seed)
    dtype = np.dtype(args.dtype)
    q = rng.standard_normal((1, args.H, args.N, args.d)).astype(dtype)
    k = rng.standard_normal((1, args.Hkv, args.N, args.d)).astype(dtype)
    v = rng.standard_normal((1, args.Hkv, args.N, args.d)).astype(dtype)
    q_r, k_r, v_r = (split_sequence(x, comm.size, args.split)[comm.rank] for x in (q, k, v))
    opts = dict(comm=comm, causal=args.causal, split=args.split)

    def call(stats=None):
        world.Barrier()
        return ring_attention(q_r, k_r, v_r, stats=stats, **opts)

    t = timing.median_time(call, repeats=args.repeats, budget_s=args.budget, warmup=1)
    stats = RingStats()
    call(stats)
    _, mem = memory.measure(lambda: ring_attention(q_r, k_r, v_r, **opts), method="tracemalloc")

    # The same exchanges with nothing to overlap: P - 1 steps of (K, V) to the next rank.
    def exchanges():
        world.Barrier()
        K, V, src = k_r, v_r, comm.rank
        for _ in range(comm.size - 1):
            nxt = (src - 1) % comm.size
            K_in = np.empty(k_r.shape[:2] + (local_length(args.N, comm.size, nxt, args.split), args.d), dtype)
            V_in = np.empty_like(K_in)
            comm.isendrecv([K, V], comm.next, [K_in, V_in], comm.prev).wait()
            K, V, src = K_in, V_in, nxt

    alone = timing.median_time(exchanges, repeats=max(3, args.repeats), budget_s=args.budget, warmup=1)
    row = {"rank": comm.rank, "time_min_s": t["min_s"], "time_median_s": t["median_s"], "runs_s": t["runs_s"],
           "compute_s": stats.compute_s, "wait_s": stats.wait_s, "comm_alone_s": alone["min_s"],
           "hidden_fraction": stats.hidden_fraction(alone["min_s"]), "visible_scores": stats.visible_scores,
           "bytes_sent": stats.bytes_sent, "extra_mib": mem.extra_mib, "local_tokens": int(q_r.shape[-2]),
           "steps": stats.steps}
    if comm.size == 1:
        single = timing.median_time(lambda: attention(q, k, v, causal=args.causal), repeats=args.repeats,
                                    budget_s=args.budget, warmup=1)
        row["single_device_min_s"] = single["min_s"]
    rows = world.gather(row, root=0)
    if comm.rank == 0:
        print(PREFIX + json.dumps({"ranks": comm.size, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
                                   "per_rank": rows}), flush=True)


def run(ranks: int, *, N: int, H: int = 4, Hkv: int | None = None, d: int = 64, dtype: str = "float32",
        causal: bool = True, split: str = "zigzag", repeats: int = 5, budget_s: float = 10.0, timeout: float = 60.0,
        threads_per_rank: int | None = None, seed: int = 0, pieces: int | None = None,
        wall_timeout: float = 300.0) -> dict:
    """Launch the worker on `ranks` MPI processes and return its results (see the module docstring)."""
    from flashkit.distributed.mpi import mpiexec

    cores = os.cpu_count() or 1
    threads = threads_per_rank or max(1, cores // ranks)
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = mpiexec(ranks) + [sys.executable, "-m", "flashkit.measure.ring", "--N", str(N), "--H", str(H),
                            "--Hkv", str(Hkv or H), "--d", str(d), "--dtype", dtype, "--split", split,
                            "--repeats", str(repeats), "--budget", str(budget_s), "--timeout", str(timeout),
                            "--seed", str(seed)] + (["--causal"] if causal else []) + (
                                ["--pieces", str(pieces)] if pieces else [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=wall_timeout, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith(PREFIX)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    result = json.loads(lines[-1][len(PREFIX):])
    result.update({"pieces": pieces, "N": N, "H": H, "Hkv": Hkv or H, "d": d, "dtype": dtype, "causal": causal, "split": split,
                   "threads_per_rank": threads, "cores": cores, "launch_wall_s": time.perf_counter() - t0})
    result["time_min_s"] = max(r["time_min_s"] for r in result["per_rank"])  # the slowest rank ends the call
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="the MPI worker of flashkit.measure.ring.run (start it with mpiexec)")
    ap.add_argument("--N", type=int, required=True)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--Hkv", type=int, default=4)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--split", default="zigzag")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pieces", type=int, default=None, help="MPIComm.progress_pieces (default: its own)")
    _worker(ap.parse_args(argv))


if __name__ == "__main__":
    main()
