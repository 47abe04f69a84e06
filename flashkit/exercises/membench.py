"""A working-set sweep: read bandwidth of one core as the data grows from 16 KiB to 256 MiB.

While the working set fits a cache level, re-reading it runs at that level's speed; once it
outgrows the level the bandwidth drops to the next one. The steps of the curve are L1, L2, L3 and
DRAM: the fast memory FlashAttention's tiles must fit in (its "SRAM") is where the curve is high.

The kernel is a plain sum over a float64 array, compiled by Numba with fastmath so LLVM may use
several vector accumulators (otherwise one add chain, not memory, would be the limit). One thread:
a tile is worked on by one core, and the L1/L2 are per core. Each point re-reads its working set
until about `target_bytes` have been read, and keeps the best of `repeats` runs (the least disturbed).
"""
from __future__ import annotations

import glob
import os
import time

import numpy as np
from numba import njit

KIB, MIB = 1024, 1024 * 1024


@njit(cache=True, fastmath=True)
def read_sum(a, n, reps):
    """Sum the first n elements of a, reps times: reads 8 * n * reps bytes."""
    total = 0.0
    for _ in range(reps):
        acc = 0.0
        for i in range(n):
            acc += a[i]
        total += acc
    return total


def working_sets(min_bytes=16 * KIB, max_bytes=256 * MIB, per_octave=2):
    """Sizes in bytes, `per_octave` points per doubling, multiples of 64 bytes (a cache line)."""
    octaves = np.log2(max_bytes / min_bytes)
    sizes = min_bytes * 2.0 ** (np.arange(int(round(octaves * per_octave)) + 1) / per_octave)
    return sorted({int(s) // 64 * 64 for s in sizes})


def sweep(min_bytes=16 * KIB, max_bytes=256 * MIB, per_octave=2, target_bytes=48 * MIB, repeats=3):
    """Measure read bandwidth at each working set. Returns a dict of lists: bytes, GBps (1e9 B/s)."""
    if not (0 < min_bytes <= max_bytes):
        raise ValueError(f"need 0 < min_bytes <= max_bytes; got {min_bytes}, {max_bytes}")
    a = np.ones(max_bytes // 8)  # written once: every page is touched before timing
    read_sum(a, 8, 1)  # compile (or load from the cache) outside the timed runs
    sizes, gbps = [], []
    for ws in working_sets(min_bytes, max_bytes, per_octave):
        n = ws // 8
        reps = max(1, target_bytes // ws)
        read_sum(a, n, 1)  # bring the working set into the caches it fits
        best = np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            s = read_sum(a, n, reps)
            best = min(best, time.perf_counter() - t0)
        if s != n * reps:  # every element is 1.0: a wrong sum means the loop was not what we timed
            raise RuntimeError(f"read kernel returned {s}, expected {n * reps}")
        sizes.append(ws)
        gbps.append(8.0 * n * reps / best / 1e9)
    return {"bytes": sizes, "GBps": gbps, "target_bytes": target_bytes, "repeats": repeats}


def os_cache_sizes():
    """{'L1d': bytes, 'L2': bytes, 'L3': bytes} of cpu0 as the OS reports them (Linux sysfs; {} elsewhere)."""
    out = {}
    for idx in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(os.path.join(idx, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(idx, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(idx, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        unit = {"K": KIB, "M": MIB, "G": 1024 * MIB}.get(text[-1:], 1)
        size = int(text.rstrip("KMG")) * unit
        out["L1d" if level == "1" else f"L{level}"] = size
    return out


def level_bandwidths(result, caches=None):
    """Median bandwidth inside each level: working sets of at most half a level and more than twice the
    level below (DRAM: more than 4x the last cache). Returns {level: GB/s}; levels without points are left out."""
    caches = os_cache_sizes() if caches is None else caches
    sizes, gbps = np.asarray(result["bytes"]), np.asarray(result["GBps"])
    out, below = {}, 0
    for name in ("L1d", "L2", "L3"):
        if name not in caches:
            continue
        inside = (sizes <= caches[name] / 2) & (sizes > 2 * below)
        if inside.any():
            out[name] = float(np.median(gbps[inside]))
        below = caches[name]
    dram = sizes > 4 * below if below else np.zeros(len(sizes), bool)
    if dram.any():
        out["DRAM"] = float(np.median(gbps[dram]))
    return out


def tile_bytes(Br, Bc, d, itemsize=4):
    """Bytes of FlashAttention's four tiles for one step: Q_i and O_i (Br x d), K_j and V_j (Bc x d)."""
    return itemsize * d * (2 * Br + 2 * Bc)


def figure(result, caches=None, marks=None):
    """plotly figure: bandwidth against working set (log x), with the OS cache sizes and `marks`
    {label: bytes} drawn as vertical lines (traces, so they sit at data coordinates and show in the legend)."""
    import plotly.graph_objects as go

    caches = os_cache_sizes() if caches is None else caches
    top = 1.1 * max(result["GBps"])
    fig = go.Figure(go.Scatter(x=np.asarray(result["bytes"]) / KIB, y=result["GBps"], mode="lines+markers",
                               name="read bandwidth, 1 core"))
    for name, size in caches.items():
        fig.add_trace(go.Scatter(x=[size / KIB] * 2, y=[0, top], mode="lines", line=dict(dash="dot", width=1.5),
                                 name=f"{name} size {size // KIB} KiB (OS)"))
    for label, size in (marks or {}).items():
        fig.add_trace(go.Scatter(x=[size / KIB] * 2, y=[0, top], mode="lines", line=dict(dash="dash", width=2),
                                 name=f"{label}: {size / KIB:.0f} KiB"))
    fig.update_layout(title="Read bandwidth against working set: the memory hierarchy of this machine",
                      xaxis_title="working set (KiB, log scale)", yaxis_title="read bandwidth (GB/s)",
                      xaxis_type="log", legend=dict(font=dict(size=11)))
    return fig


__all__ = ["read_sum", "sweep", "working_sets", "os_cache_sizes", "level_bandwidths", "tile_bytes", "figure"]
