"""What every rung of the Numba ladder shares: block sizes, the tile map, the launch, the masks.

A kernel of every rung has the same signature

    kernel(Q, K, V, scale, left, right, mask, has_mask, bmap, Br, Bc, O, lse, tiles)

    Q (B, Hq, Nq, d), K and V (B, Hkv, Nk, d)   C-contiguous, float32 or float64, read only
    scale                                      a float (cast to Q's dtype inside)
    left, right                                the sliding window, -1 = unbounded (causal = (-1, 0))
    mask, has_mask                             bool (Bm, Hm, Nq, Nk); a (1, 1, 1, 1) dummy when has_mask=False
    bmap (Bm, Hm, Tr, Tc) int8                 SKIP / PARTIAL / FULL for every tile (flashkit.masks)
    Br, Bc                                     query rows and keys per tile (any sizes >= 1)
    O (B, Hq, Nq, d), lse (B, Hq, Nq)          outputs, same dtype as Q
    tiles (B * Hq * Tr,) int64                 tiles computed by each task (tests check skips happen)

and one compilation per dtype (float32, float64): the dummy mask keeps a single signature whether or
not a mask is given. The tile map is computed here in NumPy once per call, so a kernel spends no time
on tiles that a causal or window pattern hides, and needs no per-element test on FULL tiles.
"""
from __future__ import annotations

import os
import re

import numpy as np
from numba import njit

from flashkit.cpu import threads
from flashkit.masks import FULL, PARTIAL, SKIP, block_map  # noqa: F401  (the kernels use SKIP/PARTIAL)
from flashkit.cpu.simd import FASTMATH  # noqa: F401

_NO_MASK = np.ones((1, 1, 1, 1), dtype=np.bool_)
NEG = -1e30  # a masked score: finite, so exp(NEG - NEG) = 1 never turns into NaN under fastmath


# ---------------------------------------------------------------------------------------------
# Block sizes from the cache
# ---------------------------------------------------------------------------------------------
def cache_bytes(level: int):
    """Bytes of the level-`level` data (or unified) cache of core 0, as /sys reports it; None if it does
    not (another OS, a container hiding /sys). L1 and L2 are per core on current x86 and Arm CPUs."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            path = os.path.join(base, index)
            with open(os.path.join(path, "level")) as f:
                found = f.read().strip()
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            if found == str(level) and kind in ("Unified", "Data"):
                with open(os.path.join(path, "size")) as f:
                    return _parse_size(f.read())
    except (OSError, ValueError):
        pass
    return None


def l2_bytes() -> int:
    """Bytes of L2 cache per core: /sys first, then lscpu's total / cores, else 512 KiB."""
    found = cache_bytes(2)
    if found is not None:
        return found
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        m = re.search(r"L2 cache:\s*([\d.]+\s*[KMG]i?B?)(?:\s*\((\d+) instances?\))?", out)
        if m:
            total = _parse_size(m.group(1))
            return total // int(m.group(2) or 1)
    except Exception:
        pass
    return 512 * 1024


def _parse_size(text: str) -> int:
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)", text)
    if not m:
        raise ValueError(text)
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])


_L2 = []


def default_block_size(d: int, itemsize: int, Br: int, Bc: int) -> tuple:
    """(Br, Bc) no larger than asked whose working set fits half the L2 of one core.

    Working set of one task: Q_i and O_i (Br x d), K_j and V_j (Bc x d), S/P (Br x Bc). Half the L2,
    because the other half holds the next K_j, V_j streaming in and whatever BLAS packs."""
    if not _L2:
        _L2.append(l2_bytes())
    budget = _L2[0] // 2
    while (2 * Br * d + 2 * Bc * d + Br * Bc) * itemsize > budget and (Br > 16 or Bc > 16):
        if Bc >= Br and Bc > 16:
            Bc //= 2
        else:
            Br //= 2
    return Br, Bc


# ---------------------------------------------------------------------------------------------
# Per-element visibility inside a PARTIAL tile
# ---------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def row_window(i, Nq, Nk, left, right):
    """Keys [lo, hi) that query row i may see under the window (before any custom mask)."""
    offset = Nk - Nq
    lo = 0 if left < 0 else max(0, i + offset - left)
    hi = Nk if right < 0 else min(Nk, i + offset + right + 1)
    return lo, hi


@njit(cache=True, inline="always")
def task_index(t, Hq, Tr):
    """Task t -> (b, h, i). Query blocks are visited from both ends (0, Tr-1, 1, Tr-2, ...) so that the
    two halves of the static prange split get the same causal work even when B * Hq is odd."""
    bh, k = t // Tr, t % Tr
    i = k // 2 if k % 2 == 0 else Tr - 1 - k // 2
    return bh // Hq, bh % Hq, i


# ---------------------------------------------------------------------------------------------
# The launch
# ---------------------------------------------------------------------------------------------
def tile_map(problem, Br: int, Bc: int) -> np.ndarray:
    """(Bm, Hm, Tr, Tc) int8 tile states; (1, 1, Tr, Tc) without a custom mask."""
    Nq, Nk, window = problem.Nq, problem.Nk, problem.window
    if problem.mask is None:
        return block_map(Nq, Nk, Br, Bc, window)[None, None]
    Bm, Hm = problem.mask.shape[:2]
    maps = [block_map(Nq, Nk, Br, Bc, window, problem.mask[x, y]) for x in range(Bm) for y in range(Hm)]
    return np.stack(maps).reshape(Bm, Hm, *maps[0].shape)


def launch(kernel, problem, default_blocks):
    """Run `kernel` on `problem`: returns (O, lse, tiles) with tiles the per-task count of computed tiles.

    `default_blocks` is the rung's preferred (Br, Bc) before the cache rule; problem.block_size wins."""
    Q, K, V = (np.ascontiguousarray(x) for x in (problem.Q, problem.K, problem.V))
    d, itemsize = Q.shape[3], Q.dtype.itemsize
    if problem.block_size is not None:
        Br, Bc = (int(x) for x in problem.block_size)
    else:
        Br, Bc = default_block_size(d, itemsize, *default_blocks)
    # A tile larger than the problem is the same single tile; clamping only saves buffer space.
    Br, Bc = max(1, min(Br, problem.Nq)), max(1, min(Bc, problem.Nk))
    bmap = tile_map(problem, Br, Bc)
    has_mask = problem.mask is not None
    mask = np.ascontiguousarray(problem.mask, dtype=np.bool_) if has_mask else _NO_MASK
    left, right = (int(w) for w in problem.window)
    O, lse = problem.new_outputs()
    tiles = np.zeros(problem.B * problem.Hq * bmap.shape[2], np.int64)
    with threads.for_work(problem.flops()):
        kernel(Q, K, V, float(problem.scale), left, right, mask, has_mask, bmap, Br, Bc, O, lse, tiles)
    return O, lse, tiles
