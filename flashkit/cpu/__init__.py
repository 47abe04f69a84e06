"""CPU kernels in Numba (filled in by the CPU ladder)."""
BACKENDS = ()
