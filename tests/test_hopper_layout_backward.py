"""Backward rung 4's layouts agree on paper (flashkit/gpu/hopper_layout.py): every element the five wgmma products
of kernels/b4_wgmma.cu read through their descriptors is the element TMA (or the kernel's own swizzled dS^T stores)
put there. The start addresses are the ones the kernel computes, relative to each tile's 1024-aligned start.
No GPU needed."""
import numpy as np
import pytest

from flashkit.gpu import hopper_layout as hl
from flashkit.gpu.rungs import rung

SPEC = rung("cupy-bwd-wgmma")
BLOCKS = [(d, Br, Bc) for d in SPEC.head_dims for Br, Bc in SPEC.allowed(d)]


@pytest.mark.parametrize("d,Br,Bc", BLOCKS)
def test_s_and_dp_operands_are_read_where_tma_wrote_them(d, Br, Bc):
    """S^T = K_j Q_i^T, dP^T = V_j dO_i^T: A = 64 key rows of consumer c (K-major), B = the Br query rows (K-major)."""
    m, k = np.meshgrid(np.arange(64), np.arange(16), indexing="ij")
    n, kb = np.meshgrid(np.arange(Br), np.arange(16), indexing="ij")
    for kk in range(d // 16):
        for c in range(Bc // 64):
            start = (kk // 4) * Bc * 128 + c * 64 * 128 + (kk % 4) * 32
            got = hl.kmajor_address(hl.descriptor(start, 16, 1024), m, k)
            assert (got == hl.tma_offset(64 * c + m, 16 * kk + k, Bc)).all(), (kk, c)
        start = (kk // 4) * Br * 128 + (kk % 4) * 32
        got = hl.kmajor_address(hl.descriptor(start, 16, 1024), n, kb)
        assert (got == hl.tma_offset(n, 16 * kk + kb, Br)).all(), kk


@pytest.mark.parametrize("d,Br,Bc", BLOCKS)
def test_dv_and_dk_read_do_and_q_n_major(d, Br, Bc):
    """dV_j += P^T dO_i (dK_j += dS^T Q_i): B = dO_i with k = query, n = d, N-major, descriptor(kk * 2048, Br * 128, 1024)."""
    k, n = np.meshgrid(np.arange(16), np.arange(d), indexing="ij")
    for kk in range(Br // 16):
        got = hl.mnmajor_address(hl.descriptor(kk * 16 * 128, Br * 128, 1024), k, n)
        assert (got == hl.tma_offset(16 * kk + k, n, Br)).all(), kk


def ds_store(key, q, Bc):
    """Where b4_wgmma.cu's consumers store dS^T[key][query] (before the dQ product): [Br/64][Bc][64], swizzled."""
    return hl.swizzle128((q // 64) * (Bc * 128) + key * 128 + (q % 64) * hl.ELEM)


@pytest.mark.parametrize("d,Br,Bc", BLOCKS)
def test_dq_reads_ds_transposed_and_k_n_major(d, Br, Bc):
    """dQ_i += dS K_j, consumer c: A = dS (m = query, k = key) M-major from dS^T_s block dq_qhalf, B = K_j (k = key,
    n = d) N-major from half dq_chalf; every query and every column of dQ_i is computed by exactly one consumer."""
    m, k = np.meshgrid(np.arange(64), np.arange(16), indexing="ij")
    kb, n = np.meshgrid(np.arange(16), np.arange(64), indexing="ij")
    covered = np.zeros((Br, d), int)
    for c in range(Bc // 64):
        qhalf, chalf = (c, 0) if Br == 128 else (0, c)
        covered[64 * qhalf:64 * qhalf + 64, 64 * chalf:64 * chalf + 64] += 1
        for kk in range(Bc // 16):
            a = hl.descriptor(qhalf * Bc * 128 + kk * 16 * 128, Bc * 128, 1024)
            assert (hl.mnmajor_address(a, k, m) == ds_store(16 * kk + k, 64 * qhalf + m, Bc)).all(), (c, kk)
            b = hl.descriptor(chalf * Bc * 128 + kk * 16 * 128, Bc * 128, 1024)
            assert (hl.mnmajor_address(b, kb, n) == hl.tma_offset(16 * kk + kb, 64 * chalf + n, Bc)).all(), (c, kk)
    assert (covered == 1).all()


@pytest.mark.parametrize("d,Br,Bc", BLOCKS)
def test_ds_stores_fill_the_tile_once_and_pairs_stay_in_one_word(d, Br, Bc):
    key, q = np.meshgrid(np.arange(Bc), np.arange(Br), indexing="ij")
    off = ds_store(key, q, Bc)
    assert sorted(off.ravel()) == list(range(0, Br * Bc * hl.ELEM, hl.ELEM))
    even = ds_store(key[:, ::2], q[:, ::2], Bc)  # the kernel stores queries 2t, 2t + 1 as one 32-bit word
    assert ((even % 4) == 0).all() and (ds_store(key[:, 1::2], q[:, 1::2], Bc) == even + hl.ELEM).all()


def test_shared_memory_fits_and_counts_every_buffer():
    for d in SPEC.head_dims:
        Br, Bc = SPEC.default_blocks[d]
        nbytes = SPEC.kernel("main").smem(d, Br, Bc)
        tiles = 2 * Bc * d * 2 + 4 * Br * d * 2 + 2 * Br * Bc * 2  # K, V; Q, dO x 2 stages; dS^T x 2
        assert nbytes == 1024 + tiles + 4 * (4 * Br + 2 * 8 * Br) + 8 * 5
        assert nbytes <= 227 * 1024  # the H100/H200 per-block limit
