"""Where a measurement was made: the machine, the versions, the commit, the load, the BLAS in use.

Every results file carries these beside its numbers (benchmarks/*.py, `flashkit bench`, tools/), so a
number can be traced to the code and the machine that produced it, and a noisy run (a load average above
the core count) recognised. This module is the one place they are gathered; benchmarks import it, the
package never imports a benchmark.

    commit()        {"commit": sha, "dirty": bool}, from git or, outside a checkout, $FLASHKIT_COMMIT
    commit_label()  the same as one string, "<sha>" or "<sha>-dirty"
    versions(...)   Python and the installed versions of the named distributions
    cpu_info()      CPU model, cores, caches, what LLVM (hence Numba) targets, RAM
    gpu_info()      card, driver, CUDA runtime and NVRTC, CuPy, SMs (needs CuPy and a CUDA device)
    load_average()  1, 5, 15 minute load averages
    blas_info()     the BLAS libraries loaded, their kernel (architecture) and threads
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parents[1]


def now_utc() -> str:
    """The time now, UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def commit() -> dict:
    """The git commit of the flashkit checkout and whether tracked files differed from it.

    Outside a git checkout (a copy of the working tree on a GPU machine, an installed package) git cannot
    say: then $FLASHKIT_COMMIT, if whoever copied the tree set it, else "unknown"; `dirty` is None then.
    $FLASHKIT_COMMIT also wins when set inside a checkout: a copied tree may sit inside another checkout
    (the device tool's .gpu_sync/<name> folder inside the main one), whose HEAD git would report instead.
    """
    if os.environ.get("FLASHKIT_COMMIT"):
        return {"commit": os.environ["FLASHKIT_COMMIT"], "dirty": None}

    def git(*args):
        return subprocess.run(["git", *args], cwd=PACKAGE, capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode == 0 and head.stdout.strip():
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return {"commit": head.stdout.strip(),
                    "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": os.environ.get("FLASHKIT_COMMIT", "unknown"), "dirty": None}


def commit_label() -> Optional[str]:
    """commit() as one string for a table cell: "<sha>" or "<sha>-dirty", None when unknown."""
    c = commit()
    if c["commit"] == "unknown":
        return None
    return c["commit"] + ("-dirty" if c["dirty"] else "")


def versions(*dists) -> dict:
    """{"python": version, dist: version or None (not installed)} for the named distributions."""
    out = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def cpu_info() -> dict:
    """CPU model, cores, caches and what LLVM (hence Numba) targets on it."""
    from flashkit.sysinfo import cpu_model, simd

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
            "system": f"{platform.system()} {platform.release()}"}
    info.update({f"llvm_{k}" if k == "features" else k: v for k, v in simd().items()})
    try:
        from flashkit.cpu.common import l2_bytes

        info["l2_bytes_per_core"] = l2_bytes()
    except Exception:  # no Numba, or no cache size the OS will tell
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


def gpu_info(device: int = 0) -> dict:
    """The card CuPy sees as `device`, its driver, the CUDA runtime and NVRTC versions, CuPy's, and SMs."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    try:  # the driver's own version string (the CUDA driver API gives only its CUDA level)
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return dict(card=name, driver=driver, cuda_driver_api=cupy.cuda.runtime.driverGetVersion(),
                cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                nvrtc=".".join(map(str, cupy.cuda.nvrtc.getVersion())), cupy=cupy.__version__,
                sm_count=props["multiProcessorCount"])


def load_average() -> Optional[list]:
    """The 1, 5 and 15 minute load averages (None where the OS has none): a load above the core count
    means other work shared the cores while we measured."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def blas_info() -> list:
    """The BLAS libraries loaded now (threadpoolctl): NumPy's, and SciPy's, which Numba's np.dot calls,
    with the kernel each picked for this CPU (architecture) and its threads."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (load SciPy's BLAS so that it is listed)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("user_api", "internal_api", "architecture", "version", "num_threads", "threading_layer", "prefix")
    return [dict({k: lib.get(k) for k in keys}, file=os.path.basename(lib.get("filepath", "")))
            for lib in threadpool_info() if lib.get("user_api") == "blas"]
