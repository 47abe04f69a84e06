"""Workshop exercises: one checker a task, each naming the mistake when the learner's function is wrong.

    from flashkit.exercises import check_online_update
    check_online_update(my_update)   # prints "✓ ..." or raises ExerciseError("✗ ...: <the mistake>")

Every checker takes the learner's function and an optional `seed` (inputs are fresh random ones on every
call; a failure message gives the seed that reproduces it). The inputs are awkward on purpose: N not a
multiple of the block, Nq != Nk, rows that see no key, scores near +-1000. The references are
flashkit's own pieces (online_softmax, masks, tiled, reference).

Tasks and the signature each checker expects:
    check_safe_softmax(softmax)          softmax(x) -> (rows, n)
    check_online_update(online_update)   online_update(m, l, O, S, V) -> (m, l, O)
    check_merge(merge)                   merge((m_a, l_a, O_a), (m_b, l_b, O_b)) -> (m, l, O)
    check_fa2_tile(fa2_tile)             fa2_tile(Q_i, K, V, Bc, scale) -> (O_i, lse_i)
    check_skip_tile(skip_tile)           skip_tile(i0, i1, j0, j1, Nq, Nk, window) -> bool
    check_block_sizes(block_sizes)       block_sizes(M, d) -> (Br, Bc)
    check_hbm_traffic(hbm_bytes_standard) hbm_bytes_standard(B, H, Nq, Nk, d, itemsize) -> int
    check_softmax_backward(softmax_backward)  softmax_backward(P, dP) -> dS
    check_attention_backward(attention_backward)  attention_backward(Q, K, V, O, dO, lse, scale) -> (dQ, dK, dV)
The memory-hierarchy sweep lives in flashkit.exercises.membench (imported on use: it compiles Numba code).
"""
from flashkit.exercises.backward import check_attention_backward, check_softmax_backward
from flashkit.exercises.checking import ExerciseError
from flashkit.exercises.softmax import check_merge, check_online_update, check_safe_softmax
from flashkit.exercises.tiles import check_block_sizes, check_fa2_tile, check_skip_tile
from flashkit.exercises.traffic import check_hbm_traffic

__all__ = ["ExerciseError", "check_safe_softmax", "check_online_update", "check_merge", "check_fa2_tile",
           "check_skip_tile", "check_block_sizes", "check_hbm_traffic", "check_softmax_backward",
           "check_attention_backward"]
