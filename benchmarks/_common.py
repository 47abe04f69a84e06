"""Helpers the benchmark scripts share: medians of timed runs, peak memory, and writing a results file
atomically. Where the numbers were measured (machine, versions, commit, load, BLAS) comes from
flashkit.measure.provenance."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from flashkit.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def median_time(fn, *, repeats=5, budget_s=20.0, warmup=1) -> dict:
    """Warm up, then time `fn()` up to `repeats` times (fewer if over budget): median, min, all runs (s).

    Also the median CPU time of this process per run (all its threads): on an idle machine with n
    threads busy, wall ~ cpu / n; a wall time well above that means other processes took the cores."""
    for _ in range(warmup):
        fn()
    runs, cpu = [], []
    start = time.perf_counter()
    while len(runs) < repeats and (len(runs) < 3 or time.perf_counter() - start < budget_s):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(runs), "min_s": min(runs), "runs_s": runs,
            "cpu_median_s": statistics.median(cpu)}


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes(field: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_json_atomic(path: Path, data) -> None:
    """Write JSON through a temporary file and a rename (flashkit.atomic): never half-written."""
    write_json(path, data)
