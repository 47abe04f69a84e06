"""Measurement: memory (tracemalloc, CuPy pools, analytic), the HBM-traffic model, timing (the one clock),
threads, sweeps and their export, provenance, and the GPU results files."""
