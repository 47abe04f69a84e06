"""Ring attention on MPI ranks of this CPU: time, per-rank memory, hidden communication, causal balance.

    python -m benchmarks.cpu_ring            # N = 8192, 1, 2 and 4 ranks, contiguous and zigzag causal
    python -m benchmarks.cpu_ring --quick    # N = 2048

What it measures, for the same total sequence (B = 1, H = 4, d = 64, float32) on 1, 2 and 4 MPI ranks
(flashkit.measure.ring starts them with mpiexec; Numba gets cores // ranks threads a rank):

- time of one ring call (min over repeats of the slowest rank), beside flashkit.attention on the whole
  sequence in one process (the single-device peer): ratio = ring time / single-device time;
- per-rank extra memory of one call (tracemalloc), which falls as 1/ranks for the blocks held;
- communication hidden behind compute: 1 - (time blocked waiting for blocks) / (the same exchanges alone);
- causal work per rank, contiguous against zigzag: visible scores and compute seconds of each rank,
  and the imbalance max / mean (1.0 is perfect balance).

On a machine with fewer cores than ranks the ranks share cores: 4 ranks on 2 cores cannot be faster
than 2, and the results file records the cores, the threads a rank and the load average.
Writes benchmarks/results/cpu-ring-<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import sys

RANKS = (1, 2, 4)
N_FULL, N_QUICK = 8192, 2048
SHAPE = dict(H=4, d=64, dtype="float32")


def measure(N, repeats, budget_s):
    from flashkit.measure import ring

    runs = []
    configs = [(causal, split, P, None) for causal, split in ((False, "contiguous"), (True, "contiguous"), (True, "zigzag"))
               for P in RANKS]
    configs += [(False, "contiguous", P, 1) for P in RANKS[1:]]  # one piece: MPI polled only between blocks
    for causal, split, P, pieces in configs:
        r = ring.run(P, N=N, causal=causal, split=split, repeats=repeats, budget_s=budget_s, pieces=pieces, **SHAPE)
        per = r["per_rank"]
        compute = [x["compute_s"] for x in per]
        scores = [x["visible_scores"] for x in per]
        row = {"ranks": P, "causal": causal, "split": split, "N": N, "time_min_s": r["time_min_s"],
               "progress_pieces": pieces or "default (MPIComm.progress_pieces)",
               "threads_per_rank": r["threads_per_rank"], "cores": r["cores"], "mpi": r["mpi"],
               "extra_mib_per_rank": [x["extra_mib"] for x in per],
               "hidden_fraction_per_rank": [x["hidden_fraction"] for x in per],
               "wait_s_per_rank": [x["wait_s"] for x in per], "comm_alone_s_per_rank": [x["comm_alone_s"] for x in per],
               "compute_s_per_rank": compute, "visible_scores_per_rank": scores,
               "work_imbalance": max(scores) / (sum(scores) / P), "compute_imbalance": max(compute) / (sum(compute) / P),
               "bytes_sent_per_rank": [x["bytes_sent"] for x in per]}
        if P == 1:
            row["single_device_min_s"] = per[0]["single_device_min_s"]
        runs.append(row)
        print(_line(row), flush=True)
    for row in runs:  # the peer: flashkit.attention on the whole sequence, one process, all cores
        single = next(x for x in runs if x["ranks"] == 1 and x["causal"] == row["causal"] and x["split"] == row["split"]
                      and "single_device_min_s" in x)
        row["vs_single_device"] = row["time_min_s"] / single["single_device_min_s"]
    return runs


def _line(r):
    return (f"{r['ranks']} rank(s) causal={str(r['causal']):5s} {r['split']:10s} pieces={r['progress_pieces']} N={r['N']}: "
            f"{r['time_min_s'] * 1e3:8.1f} ms, "
            f"memory/rank {max(r['extra_mib_per_rank']):6.1f} MiB, hidden {min(r['hidden_fraction_per_rank']):.2f}, "
            f"work imbalance {r['work_imbalance']:.2f}, compute imbalance {r['compute_imbalance']:.2f}")


def show(path) -> int:
    from flashkit.distributed.mpi import MPIComm

    MPI_PIECES = MPIComm.progress_pieces
    with open(path) as f:
        res = json.load(f)
    m = res["machine"]
    print(f"{m['cpu']}, {m['cores']} cores; {res['date']}; commit {res.get('commit', '?')[:10]}; "
          f"load average {res['load_average_at_start']} -> {res['load_average_at_end']}; {res['runs'][0]['mpi']}")
    print("| ranks | causal | split | MPI polls a block | ms | / single device | MiB a rank | hidden | work max/mean | compute max/mean |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["runs"]:
        polls = r["progress_pieces"] if isinstance(r["progress_pieces"], int) else MPI_PIECES
        print(f"| {r['ranks']} | {'yes' if r['causal'] else 'no'} | {r['split']} | {polls} | {r['time_min_s'] * 1e3:.1f} | "
              f"{r['vs_single_device']:.2f} | {max(r['extra_mib_per_rank']):.1f} | {min(r['hidden_fraction_per_rank']):.2f} | "
              f"{r['work_imbalance']:.2f} | {r['compute_imbalance']:.2f} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"N = {N_QUICK}, 3 runs each")
    ap.add_argument("--N", type=int, help=f"total sequence length (default {N_FULL})")
    ap.add_argument("--out", help="results file (default benchmarks/results/cpu-ring-<machine>.json)")
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    args = ap.parse_args(argv)
    if args.table:
        return show(args.table)
    from benchmarks._common import RESULTS, write_json_atomic
    from flashkit.distributed import mpi as ring_mpi
    from flashkit.measure import provenance

    if not ring_mpi.available():
        print("cpu_ring: mpi4py is not installed: pip install 'flashkit[distributed]'", file=sys.stderr)
        return 2
    env = dict(machine=provenance.cpu_info(), load_average_at_start=provenance.load_average(),
               versions=provenance.versions("numpy", "numba", "mpi4py", "mpich"), date=provenance.now_utc())
    env.update(provenance.commit())
    N = args.N or (N_QUICK if args.quick else N_FULL)
    runs = measure(N, repeats=3, budget_s=10.0 if args.quick else 20.0)
    result = dict(env, benchmark="benchmarks/cpu_ring.py", shape=dict(B=1, **SHAPE), runs=runs,
                  load_average_at_end=provenance.load_average(),
                  notes="time_min_s: min over repeats of the slowest rank; memory: tracemalloc extra bytes of one call "
                        "per rank; hidden: 1 - wait / (same exchanges alone), the lowest rank shown in the table")
    out = args.out or RESULTS / f"cpu-ring-{provenance.machine_slug(env['machine'])}.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")
    show(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
