"""Makes the CUDA sources ship inside the wheel as `sparserun.csrc` (package data; nothing to import)."""
