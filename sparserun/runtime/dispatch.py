"""Backend choice for SparseLinear.forward.

Backends: "triton" (sparserun.kernels, CUDA, or CPU tensors under TRITON_INTERPRET=1), "dense" (the weight
decompressed once and cached, cuBLAS / CPU BLAS), "reference" (pure torch, decompress per call: the
oracle). `SPARSERUN_BACKEND` forces one; otherwise CUDA tensors use the kernels where a format has them and
CPU tensors use the reference path.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "cuda", "cusparselt", "dense", "reference")
KERNEL_FORMATS = ("semi24", "bsr")


def forced_backend() -> str:
    b = os.environ.get("SPARSERUN_BACKEND", "auto").strip().lower() or "auto"
    if b not in BACKENDS:
        raise ValueError(f"SPARSERUN_BACKEND={b!r} is not one of {', '.join(BACKENDS)}")
    return b


def choose_backend(layer, x: torch.Tensor) -> str:
    b = forced_backend()
    if b == "auto":
        if x.is_cuda and layer.format in KERNEL_FORMATS:
            return "triton"
        return "dense" if layer.format == "bitmask" else "reference"
    if b in ("triton", "cuda", "cusparselt") and layer.format not in KERNEL_FORMATS:
        return "dense"  # no kernel exists for this format: same math, decompressed once
    return b


def dense_cached(layer) -> torch.Tensor:
    """Decompress once per (device, dtype, data version); the cache is not part of the state_dict."""
    v = layer.values
    key = (v.device, v.dtype, v.data_ptr(), v._version)
    if layer._dense_cache is None or layer._dense_cache[0] != key:
        layer._dense_cache = (key, layer.dense_weight())
    return layer._dense_cache[1]


def sparse_linear(layer, x: torch.Tensor) -> torch.Tensor:
    backend = choose_backend(layer, x)
    if x.dtype != layer.values.dtype:
        raise TypeError(f"SparseLinear({layer.out_features}x{layer.in_features}, {layer.format}): input dtype "
                        f"{x.dtype} does not match the weight dtype {layer.values.dtype}")
    if backend == "reference":
        return F.linear(x, layer.dense_weight(), layer.bias)
    if backend == "dense":
        return F.linear(x, dense_cached(layer), layer.bias)
    if backend == "triton":
        from .. import ops

        return ops.sparse_linear_triton(layer, x)
    raise NotImplementedError(f"backend {backend!r} is not available yet")
