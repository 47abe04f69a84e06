"""Rung 7's layouts agree on paper (flashkit/gpu/hopper_layout.py): every element wgmma reads through the
kernel's descriptors is the element TMA put there, and P's A fragment is S's accumulator, register by register.
The start addresses below are the ones kernels/7_wgmma.cu computes. No GPU needed."""
import numpy as np
import pytest

from flashkit.gpu import hopper_layout as hl
from flashkit.gpu.rungs import rung

BLOCKS = [(d, Br, Bc) for d in (64, 128) for Br, Bc in rung(7).allowed_blocks]


def test_swizzle_is_a_permutation_of_each_atom():
    addr = np.arange(0, hl.ATOM_BYTES, 16)
    assert sorted(hl.swizzle128(addr)) == list(addr)
    assert hl.swizzle128(3 * hl.ATOM_BYTES + 16) == 3 * hl.ATOM_BYTES + 16  # row 0 is not moved
    assert hl.swizzle128(hl.ROW_BYTES) == hl.ROW_BYTES + 16  # row 1: chunk 0 goes to chunk 1


@pytest.mark.parametrize("d,rows", [(64, 64), (128, 128), (128, 192)])
def test_tma_tile_fills_its_bytes_once(d, rows):
    r, c = np.meshgrid(np.arange(rows), np.arange(d), indexing="ij")
    off = hl.tma_offset(r, c, rows)
    assert sorted(off.ravel()) == list(range(0, rows * d * hl.ELEM, hl.ELEM))


def test_descriptor_round_trip():
    desc = hl.descriptor(8192 + 96, 16384, 1024)
    assert hl.decode(desc) == (8192 + 96, 16384, 1024)


@pytest.mark.parametrize("d,Br,Bc", BLOCKS)
def test_s_operands_q_and_k_are_read_where_tma_wrote_them(d, Br, Bc):
    m, k = np.meshgrid(np.arange(64), np.arange(16), indexing="ij")
    for kk in range(d // 16):
        for cw in range(Br // 64):  # A = Q_i rows of consumer warpgroup cw
            start = (kk // 4) * Br * 128 + cw * 64 * 128 + (kk % 4) * 32
            got = hl.kmajor_address(hl.descriptor(start, 16, 1024), m, k)
            assert (got == hl.tma_offset(64 * cw + m, 16 * kk + k, Br)).all(), (kk, cw)
        n, kb = np.meshgrid(np.arange(Bc), np.arange(16), indexing="ij")  # B = K_j, N = Bc keys
        start = (kk // 4) * Bc * 128 + (kk % 4) * 32
        got = hl.kmajor_address(hl.descriptor(start, 16, 1024), n, kb)
        assert (got == hl.tma_offset(n, 16 * kk + kb, Bc)).all(), kk


@pytest.mark.parametrize("d,Br,Bc", BLOCKS)
def test_pv_operand_v_is_read_transposed_where_tma_wrote_it(d, Br, Bc):
    k, n = np.meshgrid(np.arange(16), np.arange(d), indexing="ij")
    for kk in range(Bc // 16):
        got = hl.mnmajor_address(hl.descriptor(kk * 16 * 128, Bc * 128, 1024), k, n)
        assert (got == hl.tma_offset(16 * kk + k, n, Bc)).all(), kk


@pytest.mark.parametrize("N", [64, 128])
def test_accumulator_fragment_covers_the_tile_once(N):
    r, c = np.meshgrid(np.arange(64), np.arange(N), indexing="ij")
    thread, reg = hl.accumulator_owner(r, c)
    assert thread.max() == 127 and reg.max() == N // 2 - 1
    assert len(set(zip(thread.ravel(), reg.ravel()))) == 64 * N


def test_p_a_fragment_is_s_accumulator_in_the_same_thread():
    r, k = np.meshgrid(np.arange(64), np.arange(16), indexing="ij")
    for kk in range(128 // 16):
        thread, reg, half = hl.a_fragment_owner(r, k)
        s_thread, s_reg = hl.accumulator_owner(r, 16 * kk + k)
        assert (thread == s_thread).all()
        assert (hl.p_fragment_from_s(kk, reg, half) == s_reg).all()
