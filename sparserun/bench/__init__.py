"""Benchmark harness shared by benchmarks/*.py and `sparserun bench`."""
