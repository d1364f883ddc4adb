"""Benchmark layer shapes; the single source lives in the package so `sparserun bench` can use it."""
from sparserun.bench.shapes import ALL_SHAPES, LLAMA_8B, LLAMA_70B, M_VALUES  # noqa: F401
