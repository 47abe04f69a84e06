"""flashkit.info(): what this machine offers flashkit, without importing anything heavy unless asked."""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

SIMD_FLAGS = ("sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512bf16", "avx512fp16",
              "amx-tile", "neon", "sve", "sve2")

# AVX2 code on an AVX-512 machine, every library limited alike: what benchmarks/cpu_forward.py --isa avx2
# and tests/test_decode.py set in a child process to build and measure what an AVX2 laptop runs. Numba
# compiles for Haswell's features (NUMBA_CPU_NAME alone would still let LLVM pick the host's AVX-512),
# torch's kernels, oneDNN and MKL stop at AVX2, and OpenBLAS runs its Haswell kernels.
HASWELL_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+invpcid,+lzcnt,+mmx,"
                    "+movbe,+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt")
AVX2_ENV = dict(NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=HASWELL_FEATURES, ATEN_CPU_CAPABILITY="avx2",
                ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2", OPENBLAS_CORETYPE="Haswell")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def simd() -> dict:
    """The CPU name LLVM targets and the vector instruction sets it will use for Numba kernels."""
    try:
        import llvmlite.binding as llvm
    except ImportError as exc:  # numba (and llvmlite) missing
        return {"llvm_cpu": "unknown", "features": [], "error": str(exc)}
    features = llvm.get_host_cpu_features()
    on = [f for f in SIMD_FLAGS if features.get(f, False)]
    return {"llvm_cpu": llvm.get_host_cpu_name(), "features": on}


def threads() -> dict:
    out = {"cores": os.cpu_count()}
    try:
        import numba

        out["numba_threads"] = numba.get_num_threads()
        out["numba_max_threads"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        pass
    return out


def gpus() -> list:
    """GPUs CuPy can see, as dicts; an empty list without CuPy or a GPU."""
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return []
    found = []
    for i in range(n):
        props = cupy.cuda.runtime.getDeviceProperties(i)
        name = props["name"]
        found.append({
            "index": i, "name": name.decode() if isinstance(name, bytes) else name,
            "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "compute_capability": f"{props['major']}.{props['minor']}",
        })
    return found


def info() -> dict:
    """Versions, CPU model, the SIMD sets Numba/LLVM targets here, threads and GPUs, as a dict."""
    return {
        "flashkit": _version("flashkit"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in ("numpy", "numba", "llvmlite", "scipy", "plotly", "ipywidgets", "cupy-cuda12x", "cupy-cuda13x", "torch")},
        "cpu": cpu_model(),
        "simd": simd(),
        "threads": threads(),
        "gpus": gpus(),
    }


def format_info(d: dict) -> str:
    """info() as aligned text lines, for the command line and notebooks."""
    v = {k: x for k, x in d["versions"].items() if x != "not installed"}
    lines = [
        f"flashkit   {d['flashkit']}   (Python {d['python']}, {d['platform']})",
        f"CPU        {d['cpu']}",
        f"SIMD       LLVM target {d['simd']['llvm_cpu']}: {', '.join(d['simd']['features']) or 'none found'}",
        f"threads    {', '.join(f'{k}={x}' for k, x in d['threads'].items())}",
        f"GPUs       {'; '.join(g['name'] + ' (' + str(g['memory_gib']) + ' GiB, sm ' + g['compute_capability'] + ')' for g in d['gpus']) or 'none (CuPy not installed or no CUDA device)'}",
        "versions   " + ", ".join(f"{k} {x}" for k, x in v.items()),
    ]
    return "\n".join(lines)
