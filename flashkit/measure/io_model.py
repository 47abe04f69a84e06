"""How many elements standard and tiled attention move between slow memory (HBM) and a fast memory of
M elements (SRAM), counted read by read and write by write along the algorithms' loops.

This is the model of FlashAttention's Theorem 2 (Dao et al. 2022): with d <= M <= N·d,
    standard attention   Θ(N·d + N^2)       HBM accesses
    FlashAttention       Θ(N^2·d^2 / M)
Counts are in elements (multiply by the itemsize for bytes). Like the paper, the model reads each
operand of a matrix product once per loop step that loads it; the re-reads a blocked matmul would do
inside steps 1 and 3 of standard attention are not counted (they only add to its side).

Block sizes follow the paper: Bc = ceil(M / 4d), Br = min(Bc, d) (`flashkit.tiled.block_sizes`), so
that Q_i, K_j, V_j and O_i fit in M at once. Rows that do not fill a whole block are counted as they
are (N need not be a multiple of Br or Bc).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from flashkit.masks import SKIP, block_map
from flashkit.tiled import block_sizes

ORDERS = ("fa1", "fa2")


@dataclass(frozen=True)
class IOCount:
    """Elements read from and written to HBM, by array name."""

    algorithm: str
    reads: dict = field(default_factory=dict)
    writes: dict = field(default_factory=dict)
    Br: Optional[int] = None  # block sizes used (None for standard attention)
    Bc: Optional[int] = None

    @property
    def total_reads(self) -> int:
        return int(sum(self.reads.values()))

    @property
    def total_writes(self) -> int:
        return int(sum(self.writes.values()))

    @property
    def total(self) -> int:
        """Every HBM access, reads plus writes, in elements."""
        return self.total_reads + self.total_writes

    def bytes(self, itemsize: int = 4) -> int:
        return self.total * itemsize


def _check(N, d, M=None):
    for name, value in (("N", N), ("d", d)) + ((("M", M),) if M is not None else ()):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")


def standard_io(Nq: int, d: int, Nk: Optional[int] = None) -> IOCount:
    """Standard attention (the paper's Algorithm 0), S and P going through HBM."""
    Nk = Nq if Nk is None else Nk
    _check(Nq, d)
    _check(Nk, d)
    reads = {"Q": 0, "K": 0, "S": 0, "P": 0, "V": 0}
    writes = {"S": 0, "P": 0, "O": 0}
    # 1: load Q, K by blocks from HBM, compute S = Q K^T, write S to HBM
    reads["Q"] += Nq * d
    reads["K"] += Nk * d
    writes["S"] += Nq * Nk
    # 2: read S from HBM, compute P = softmax(S), write P to HBM
    reads["S"] += Nq * Nk
    writes["P"] += Nq * Nk
    # 3: load P and V by blocks from HBM, compute O = P V, write O to HBM
    reads["P"] += Nq * Nk
    reads["V"] += Nk * d
    writes["O"] += Nq * d
    return IOCount("standard", reads, writes)


def _blocks(N: int, B: int) -> np.ndarray:
    """Rows in each of the ceil(N / B) blocks: B, B, ..., and what is left for the last one."""
    T = -(-N // B)
    return np.minimum(B, N - B * np.arange(T))


def tiled_io(Nq: int, d: int, M: int, Nk: Optional[int] = None, order: str = "fa2",
             causal: bool = False, Br: Optional[int] = None, Bc: Optional[int] = None) -> IOCount:
    """FlashAttention with a fast memory of M elements, in FA1 or FA2 loop order.

    Br and Bc default to the paper's choice for M. With causal=True the tiles hidden by the causal
    mask (aligned bottom-right) are skipped: never loaded, never written.
    """
    Nk = Nq if Nk is None else Nk
    _check(Nq, d, M)
    _check(Nk, d)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    auto_Br, auto_Bc = block_sizes(M, d)  # line 1: Bc = ceil(M / 4d), Br = min(Bc, d)
    Br, Bc = Br or auto_Br, Bc or auto_Bc
    rows, cols = _blocks(Nq, Br), _blocks(Nk, Bc)  # lines 3-4: Tr blocks of Q/O, Tc blocks of K/V
    # Per query block i, the K/V rows it loads; per K/V block j, the query rows that load it.
    if causal:
        visible = block_map(Nq, Nk, Br, Bc, (-1, 0)) != SKIP  # (Tr, Tc): tiles not skipped
        kv_rows_seen = (visible * cols[None, :]).sum(axis=1)  # (Tr,)
        q_rows_seeing = (visible * rows[:, None]).sum(axis=0)  # (Tc,)
    else:  # every tile is visited
        kv_rows_seen = np.full(rows.size, Nk)
        q_rows_seeing = np.full(cols.size, Nq)

    if order == "fa2":
        reads = {"Q": 0, "K": 0, "V": 0}
        writes = {"O": 0, "lse": 0}
        for i in range(rows.size):  # for each query block i (outer loop)
            reads["Q"] += int(rows[i]) * d  # load Q_i once; O_i, l_i, m_i start on chip
            seen = int(kv_rows_seen[i])  # for each K/V block j this block needs:
            reads["K"] += seen * d  # load K_j
            reads["V"] += seen * d  # load V_j
            writes["O"] += int(rows[i]) * d  # write O_i = O_i / l_i once
            writes["lse"] += int(rows[i])  # write L_i = m_i + log(l_i) once
        return IOCount("tiled-fa2", reads, writes, Br, Bc)

    reads = {"K": 0, "V": 0, "Q": 0, "O": 0, "l": 0, "m": 0}
    writes = {"O": 0, "l": 0, "m": 0}
    # line 2: initialise O = 0, l = 0, m = -inf in HBM
    writes["O"] += Nq * d
    writes["l"] += Nq
    writes["m"] += Nq
    for j in range(cols.size):  # line 5: for each K/V block j (outer loop)
        reads["K"] += int(cols[j]) * d  # line 6: load K_j, V_j
        reads["V"] += int(cols[j]) * d
        r = int(q_rows_seeing[j])  # line 7: every query block i that sees block j
        reads["Q"] += r * d  # line 8: load Q_i, O_i, l_i, m_i
        reads["O"] += r * d
        reads["l"] += r
        reads["m"] += r
        writes["O"] += r * d  # line 12: write O_i
        writes["l"] += r  # line 13: write l_i, m_i
        writes["m"] += r
    return IOCount("tiled-fa1", reads, writes, Br, Bc)


def theta_standard(N: int, d: int) -> float:
    """The paper's order of standard attention's HBM accesses: N·d + N^2."""
    return float(N) * d + float(N) * N


def theta_tiled(N: int, d: int, M: int) -> float:
    """The paper's order of FlashAttention's HBM accesses: N^2·d^2 / M."""
    return float(N) * N * d * d / M


def crossover_M(N: int, d: int, Ms: Sequence[int], order: str = "fa2") -> Optional[int]:
    """The smallest M in `Ms` at which tiled attention moves no more elements than standard
    attention (below it tiling re-reads K and V so often that it moves more), or None."""
    standard = standard_io(N, d).total
    Ms = sorted(set(int(m) for m in Ms))
    pays = lambda M: tiled_io(N, d, M, order=order).total <= standard  # noqa: E731
    if not Ms or not pays(Ms[-1]):
        return None
    # Bisection: a larger M never gives smaller blocks (Br, Bc only grow), so traffic only falls.
    lo, hi = -1, len(Ms) - 1  # pays(Ms[hi]) is True; pays(Ms[lo]) is False (or lo = -1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pays(Ms[mid]):
            hi = mid
        else:
            lo = mid
    return Ms[hi]
