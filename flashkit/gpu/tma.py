"""TMA tensor maps for rung 7 (kernels/7_wgmma.cu), built on the host with the CUDA driver's
cuTensorMapEncodeTiled and handed to the kernel in device memory.

A tensor map tells the copy engine (TMA) how a tensor lies in global memory and which box one copy moves.
Q, K and V (B, H, N, d) are seen as 3-D tensors of 16-bit elements (d columns, N rows, B*H heads); a box is
64 columns (128 bytes: one swizzle row) x `rows` rows x 1 head, written into shared memory with the 128-byte
swizzle (flashkit.gpu.hopper_layout.swizzle128); rows past N read as zeros, so a tile never mixes two heads.

The maps live in one small device array per (device, pointers, shapes, blocks), cached: a map holds addresses and
sizes only, never data, so an entry stays valid for any array at the same address with the same shape.
"""
from __future__ import annotations

import ctypes
import functools

MAP_BYTES = 128  # sizeof(CUtensorMap)
BOX_COLS = 64    # 64 x 16 bits = 128 bytes, the widest box the 128-byte swizzle allows

# cuda.h enums (CUDA 12+): CUtensorMapDataType, ...Interleave, ...Swizzle, ...L2promotion, ...FloatOOBfill
_UINT16, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZEROS = 1, 0, 3, 3, 0


@functools.cache
def _encode_tiled():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuTensorMapEncodeTiled
    except (OSError, AttributeError) as exc:
        raise RuntimeError(f"the CUDA driver has no cuTensorMapEncodeTiled (needs CUDA 12+): {exc}") from exc
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def encode(ptr: int, heads: int, rows: int, d: int, box_rows: int) -> bytes:
    """The 128 bytes of one tensor map over a C-contiguous (heads, rows, d) array of 16-bit elements at `ptr`."""
    if ptr % 16:
        raise ValueError(f"TMA needs 16-byte aligned data; got address {ptr:#x}")
    out = (ctypes.c_uint8 * MAP_BYTES)()
    dims = (ctypes.c_uint64 * 3)(d, rows, heads)
    strides = (ctypes.c_uint64 * 2)(2 * d, 2 * d * rows)  # bytes, of dims 1 and 2 (dim 0 is contiguous)
    box = (ctypes.c_uint32 * 3)(BOX_COLS, box_rows, 1)
    step = (ctypes.c_uint32 * 3)(1, 1, 1)
    err = _encode_tiled()(ctypes.addressof(out), _UINT16, 3, ctypes.c_void_p(ptr), dims, strides, box, step,
                          _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZEROS)
    if err:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {err} "
                           f"(heads={heads}, rows={rows}, d={d}, box_rows={box_rows})")
    return bytes(out)


@functools.lru_cache(maxsize=64)
def _maps(device, q, k, v, B, Hq, Hkv, Nq, Nk, d, Br, Bc):
    import cupy
    import numpy

    blob = encode(q, B * Hq, Nq, d, Br) + encode(k, B * Hkv, Nk, d, Bc) + encode(v, B * Hkv, Nk, d, Bc)
    return cupy.asarray(numpy.frombuffer(blob, numpy.uint8))  # CuPy allocations are 512-byte aligned


def tensor_maps(Q, K, V, Br: int, Bc: int):
    """A device array holding the maps of Q (box Br rows), K and V (box Bc rows), in the kernel's TensorMaps order."""
    B, Hq, Nq, d = Q.shape
    _, Hkv, Nk, _ = K.shape
    return _maps(Q.device.id, Q.data.ptr, K.data.ptr, V.data.ptr, B, Hq, Hkv, Nq, Nk, d, Br, Bc)
