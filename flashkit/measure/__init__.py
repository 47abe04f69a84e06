"""Measurement: memory (tracemalloc, CuPy pools, analytic), the HBM-traffic model, timing."""
