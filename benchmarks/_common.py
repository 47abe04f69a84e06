"""Helpers the benchmark scripts share: where the numbers were measured (machine, versions, commit,
BLAS), medians of timed runs, peak memory, and writing a results file atomically."""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

from flashkit.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def versions(*dists) -> dict:
    out = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def commit() -> dict:
    """The git commit the numbers belong to, and whether the working tree differed from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        sha = head.stdout.strip() if head.returncode == 0 else "no commit yet"
        return {"commit": sha, "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def cpu_info() -> dict:
    """CPU model, cores, caches and what LLVM (hence Numba) targets on it."""
    from flashkit.sysinfo import cpu_model, simd

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
            "system": f"{platform.system()} {platform.release()}"}
    info.update({f"llvm_{k}" if k == "features" else k: v for k, v in simd().items()})
    try:
        from flashkit.cpu.common import l2_bytes

        info["l2_bytes_per_core"] = l2_bytes()
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["ram_bytes"] = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    return info


def machine_slug(info: dict) -> str:
    """A file-name-safe name for the machine: CPU model, LLVM CPU name, cores (e.g. amd-epyc-znver3-2c)."""
    parts = [info.get("cpu", "cpu"), info.get("llvm_cpu", ""), f"{info.get('cores', 0)}c"]
    s = "-".join(p for p in parts if p).lower()
    s = re.sub(r"\(r\)|\(tm\)|processor|cpu @.*?ghz", "", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return re.sub(r"-+", "-", s)


def blas_info() -> list:
    """The BLAS libraries loaded (NumPy's, and SciPy's, which Numba's np.dot calls) per threadpoolctl."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (load SciPy's OpenBLAS so it is listed)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"error": "threadpoolctl not installed"}]
    keys = ("user_api", "internal_api", "architecture", "version", "num_threads", "threading_layer", "prefix")
    return [dict({k: lib.get(k) for k in keys}, file=os.path.basename(lib.get("filepath", "")))
            for lib in threadpool_info()]


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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


def load_average() -> list:
    """The 1, 5 and 15 minute load averages (other work sharing the cores shows here)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return []


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
