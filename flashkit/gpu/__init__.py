"""GPU kernels in CuPy (filled in by the GPU ladder)."""
BACKENDS = ()
