"""Triton kernels, shipped as `sparserun.kernels`: one file per op (configs, @jit kernel, launcher, *_ref)."""
