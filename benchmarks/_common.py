"""Helpers the benchmark scripts share: where results go, peak memory, and writing a results file
atomically. How a call is timed comes from flashkit.measure.timing (median_time), where the numbers
were measured (machine, versions, commit, load, BLAS) from flashkit.measure.provenance."""
from __future__ import annotations

from pathlib import Path

from flashkit.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


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
