"""flashkit: learn, see and measure FlashAttention.

    import numpy as np, flashkit
    q = k = v = np.random.default_rng(0).standard_normal((1, 8, 512, 64), dtype=np.float32)
    o, lse = flashkit.attention(q, k, v, causal=True, return_lse=True)

Public names: attention, attention_backward, backends, block_mask, BlockMask, mods (the library of
score_mod / mask_mod variants), info, Backend, warmup. Nothing heavy is imported here: Numba compiles on
the first call of a Numba backend (for "auto" in a background thread, NumPy serving the calls
meanwhile: flashkit.precompile; `flashkit.warmup()` compiles and waits), CuPy loads only for CuPy arrays.
"""
from flashkit import mods
from flashkit.api import attention, attention_backward, backends
from flashkit.blockmask import BlockMask, block_mask
from flashkit.precompile import warmup
from flashkit.registry import Backend
from flashkit.sysinfo import info

__all__ = ["attention", "attention_backward", "backends", "block_mask", "BlockMask", "mods", "info", "Backend", "warmup",
           "__version__"]
__version__ = "0.1.0"
