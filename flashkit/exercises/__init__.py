"""Workshop exercises: one checker a task, each naming the mistake when the learner's function is wrong.

    from flashkit.exercises import check_online_update
    check_online_update(my_update)   # prints "✓ ..." or raises ExerciseError("✗ ...: <the mistake>")

Every checker takes the learner's function and an optional `seed` (inputs are fresh random ones on every
call; a failure message gives the seed that reproduces it). The inputs are awkward on purpose: N not a
multiple of the block, Nq != Nk, rows that see no key, scores near +-1000. The references are
flashkit's own pieces (online_softmax, masks, tiled, reference).

Tasks and the signature each checker expects (exercise numbers follow the notebooks they come after):
    check_standard_attention(standard_attention)  standard_attention(Q, K, V, scale) -> O        (exercise 1)
    check_standard_memory(standard_memory_bytes)  standard_memory_bytes(B, H, Nq, Nk, itemsize) -> int
    check_safe_softmax(softmax)          softmax(x) -> (rows, n)
    check_online_update(online_update)   online_update(m, l, O, S, V) -> (m, l, O)
    check_merge(merge)                   merge((m_a, l_a, O_a), (m_b, l_b, O_b)) -> (m, l, O)
    check_fa2_tile(fa2_tile)             fa2_tile(Q_i, K, V, Bc, scale) -> (O_i, lse_i)
    check_skip_tile(skip_tile)           skip_tile(i0, i1, j0, j1, Nq, Nk, window) -> bool
    check_block_sizes(block_sizes)       block_sizes(M, d) -> (Br, Bc)
    check_hbm_traffic(hbm_bytes_standard) hbm_bytes_standard(B, H, Nq, Nk, d, itemsize) -> int
    check_softmax_backward(softmax_backward)  softmax_backward(P, dP) -> dS
    check_vectorised(weighted_sum)       weighted_sum(p, v) -> float, a numba.njit loop  (exercise 6)
    check_kv_head(kv_head)               kv_head(h, H, H_kv) -> int                       (exercise 7)
    check_decode_step(decode_step)       decode_step(q, k_new, v_new, K_cache, V_cache, length, scale) -> O
    check_attention_backward(attention_backward)  attention_backward(Q, K, V, O, dO, lse, scale) -> (dQ, dK, dV)
    check_mask_mod(make_mask_mod)        make_mask_mod(seq_lens, Nq, Nk, left, right) -> mask_mod  (exercise 9)
The memory-hierarchy sweep lives in flashkit.exercises.membench, and the vectorisation checker imports
Numba only when it runs (the package imports no Numba).
"""
from flashkit.exercises.backward import check_attention_backward, check_softmax_backward
from flashkit.exercises.checking import ExerciseError
from flashkit.exercises.decoding import check_decode_step, check_kv_head
from flashkit.exercises.masking import check_mask_mod
from flashkit.exercises.softmax import check_merge, check_online_update, check_safe_softmax
from flashkit.exercises.standard import check_standard_attention, check_standard_memory
from flashkit.exercises.tiles import check_block_sizes, check_fa2_tile, check_skip_tile
from flashkit.exercises.traffic import check_hbm_traffic
from flashkit.exercises.vectorise import check_vectorised

__all__ = ["ExerciseError", "check_standard_attention", "check_standard_memory", "check_safe_softmax", "check_online_update", "check_merge", "check_fa2_tile",
           "check_skip_tile", "check_block_sizes", "check_hbm_traffic", "check_vectorised",
           "check_kv_head", "check_decode_step", "check_softmax_backward", "check_attention_backward", "check_mask_mod"]
