"""Benchmarks registered with :mod:`needle_steering.bench` (one module per layer)."""
