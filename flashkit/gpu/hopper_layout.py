"""A NumPy model of the data layouts rung 7 (kernels/7_wgmma.cu) relies on: where TMA puts each element of
a tile in shared memory, where wgmma's descriptors make the tensor cores look for it, and which thread holds
which element of the accumulators. The kernel is only correct if these agree; tests/test_hopper_layout.py
checks that they do, element by element, for the kernel's own tile shapes (no GPU needed).

Sources: the PTX ISA, "Asynchronous Warpgroup Level Matrix Shared Memory Layout" (canonical layouts, matrix
descriptor format) and "Register Fragments" for wgmma .m64nNk16; the CUDA driver API for the TMA swizzle.
Addresses are byte offsets in shared memory; every tile starts on a 1024-byte boundary.

Plain NumPy: importing this module needs neither CuPy nor a GPU.
"""
from __future__ import annotations

import numpy as np

ROW_BYTES = 128  # one swizzle row: 64 16-bit elements
ATOM_BYTES = 1024  # 8 rows of 128 bytes: the repeating unit of the 128-byte swizzle
ELEM = 2  # bytes per fp16 / bf16 element


def swizzle128(addr):
    """The 128-byte swizzle on a byte address: the 16-byte chunk index (bits 4-6) is XORed with the row index
    inside the 1024-byte atom (bits 7-9). TMA applies it when it writes, the tensor cores when they read."""
    addr = np.asarray(addr)
    return addr ^ (((addr >> 7) & 7) << 4)


def tma_offset(row, col, rows):
    """Where TMA's box copies (64 columns x `rows` rows, one box per 64-column half, halves one after the
    other, as 7_wgmma.cu issues them) put element (row, col) of a [rows][d] tile of 16-bit elements."""
    row, col = np.asarray(row), np.asarray(col)
    half, c = col // 64, col % 64
    return swizzle128(half * rows * ROW_BYTES + row * ROW_BYTES + c * ELEM)


def descriptor(start, lbo, sbo):
    """The 64-bit wgmma matrix descriptor, 128-byte swizzle, base offset 0 (as 7_wgmma.cu's `descriptor`)."""
    return ((start & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (1 << 62)


def decode(desc):
    """(start, lbo, sbo) in bytes from a descriptor made by `descriptor`."""
    assert desc >> 62 == 1, "128-byte swizzle expected"
    return (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4


def kmajor_address(desc, m, k):
    """The byte address wgmma reads for element (m, k) of a K-major operand (A: m < 64, or B: m < N; k < 16).
    Canonical layout with the 128-byte swizzle, in 16-bit elements: ((8, M/8), (8, 2)) : ((64, SBO), (1, 8)),
    i.e. row m%8 of an atom 128 bytes after row m%8 - 1, atoms SBO apart, k contiguous; then swizzled."""
    start, _, sbo = decode(desc)
    m, k = np.asarray(m), np.asarray(k)
    return swizzle128(start + (m // 8) * sbo + (m % 8) * ROW_BYTES + k * ELEM)


def mnmajor_address(desc, k, n):
    """The byte address wgmma reads for element (k, n) of an N-major B operand (k < 16, n < N), imm-trans-b = 1.
    Canonical layout, 128-byte swizzle, in 16-bit elements: ((64, N/64), (8, 2)) : ((1, LBO), (64, SBO)):
    64 contiguous n per 128-byte row, 64-column blocks LBO apart, k rows 128 bytes apart, 8-row groups SBO apart."""
    start, lbo, sbo = decode(desc)
    k, n = np.asarray(k), np.asarray(n)
    return swizzle128(start + (n // 64) * lbo + (n % 64) * ELEM + (k // 8) * sbo + (k % 8) * ROW_BYTES)


def accumulator_owner(row, col):
    """(thread of the warpgroup, register index) holding element (row, col) of a 64 x N fp32 wgmma accumulator:
    warp row // 16, lane 4 g + t with g = row % 8, t = (col % 8) // 2; register 4 (col // 8) + 2 (row % 16 // 8) + col % 2."""
    row, col = np.asarray(row), np.asarray(col)
    thread = 32 * (row // 16) + 4 * (row % 8) + (col % 8) // 2
    reg = 4 * (col // 8) + 2 * ((row % 16) // 8) + col % 2
    return thread, reg


def a_fragment_owner(row, k):
    """(thread, 32-bit register 0..3, half 0/1) holding element (row, k) of a 64 x 16 A operand in registers
    (wgmma .m64nNk16): per warp of 16 rows, the mma.sync m16n8k16 A fragment."""
    row, k = np.asarray(row), np.asarray(k)
    thread = 32 * (row // 16) + 4 * (row % 8) + (k % 8) // 2
    reg = (row % 16) // 8 + 2 * (k // 8)
    return thread, reg, k % 2


def p_fragment_from_s(kk, reg, half):
    """The S accumulator register that 7_wgmma.cu packs into A register `reg` (half `half`) of k-block kk of
    P (P[kk][reg] = pack2(S[8 kk + 2 reg], S[8 kk + 2 reg + 1]))."""
    return 8 * kk + 2 * reg + half
