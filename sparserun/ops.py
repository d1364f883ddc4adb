"""torch.library custom ops around every kernel, so models using SparseLinear work under
torch.compile(fullgraph=True) and CUDA-graph capture: the compiler sees one opaque op with a fake
(shape-only) implementation instead of tracing into Triton launch code.

Each op takes only tensors and ints. Kernel configs are chosen inside the op (tuned once per shape and M
bucket, see kernels/_tuning.py); nothing here syncs with the device.
Gradients flow to the input x (frozen sparse weights, e.g. LoRA recovery): grad_x = grad_y · W.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels.bsr_matmul import bsr_matmul
from .kernels.bsr_unpack import bsr_unpack
from .kernels.semi24_matmul import semi24_matmul
from .kernels.semi24_unpack import semi24_unpack


# ---- 2:4 ------------------------------------------------------------------------------------------
@torch.library.custom_op("sparserun::semi24_linear", mutates_args=())
def semi24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor], k: int) -> Tensor:
    return semi24_matmul(x, values, meta, k, bias)


@semi24_linear.register_fake
def _(x, values, meta, bias, k):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _semi24_setup(ctx, inputs, output):
    x, values, meta, bias, k = inputs
    ctx.save_for_backward(values, meta)
    ctx.k = k
    ctx.has_bias = bias is not None


def _semi24_backward(ctx, grad):
    values, meta = ctx.saved_tensors
    # through the unpack op: one opaque node that traces under dynamic shapes too (the ops run where the
    # Triton kernels run: CUDA, or the interpreter)
    w = semi24_unpack_op(values, meta, ctx.k)
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad @ w.to(grad.dtype), None, None, gb, None


semi24_linear.register_autograd(_semi24_backward, setup_context=_semi24_setup)


# ---- NxN blocks -----------------------------------------------------------------------------------
@torch.library.custom_op("sparserun::bsr_linear", mutates_args=())
def bsr_linear(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Optional[Tensor],
               max_row_blocks: int) -> Tensor:
    return bsr_matmul(x, crow, col, values, max_row_blocks, bias)


@bsr_linear.register_fake
def _(x, crow, col, values, bias, max_row_blocks):
    return x.new_empty((*x.shape[:-1], (crow.shape[0] - 1) * values.shape[-1]))


def _bsr_setup(ctx, inputs, output):
    x, crow, col, values, bias, _ = inputs
    ctx.save_for_backward(crow, col, values)
    ctx.k = x.shape[-1]
    ctx.has_bias = bias is not None


def _bsr_backward(ctx, grad):
    crow, col, values = ctx.saved_tensors
    # not torch's sparse BSR type (bsr_dense_ref): it cannot trace symbolic sizes (torch.compile(dynamic=True)
    # failed), and its invariant check syncs with the host on every backward
    w = bsr_unpack_op(crow, col, values, ctx.k)
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad @ w.to(grad.dtype), None, None, None, gb, None


bsr_linear.register_autograd(_bsr_backward, setup_context=_bsr_setup)


# ---- SparseLinear entry point ---------------------------------------------------------------------
def _needs_op(layer, x: Tensor) -> bool:
    """The custom op is for torch.compile (an opaque node) and autograd (its backward). Outside both, the
    kernel is called directly, without the op's Python dispatch: eager decode spent ~0.4 ms of host time
    per sparse Linear on the H100 (against a few µs of GPU work), and that dispatch is part of it."""
    if torch.compiler.is_compiling():
        return True
    bias = layer.bias
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def sparse_linear_triton(layer, x: Tensor) -> Tensor:
    """SparseLinear forward through the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    op = _needs_op(layer, x)
    if layer.format == "semi24":
        if not op:
            return semi24_matmul(x, layer.values, layer.meta, layer.in_features, layer.bias)
        return semi24_linear(x, layer.values, layer.meta, layer.bias, layer.in_features)
    if layer.format == "bsr":
        if not op:
            return bsr_matmul(x, layer.crow_indices, layer.col_indices, layer.values, layer.max_row_blocks,
                              layer.bias)
        return bsr_linear(x, layer.crow_indices, layer.col_indices, layer.values, layer.bias,
                          layer.max_row_blocks)
    raise ValueError(f"no Triton kernel for format {layer.format!r}")


# ---- decompression for the dense fallback -----------------------------------------------------------
@torch.library.custom_op("sparserun::semi24_unpack", mutates_args=())
def semi24_unpack_op(values: Tensor, meta: Tensor, k: int) -> Tensor:
    return semi24_unpack(values, meta, k)


@semi24_unpack_op.register_fake
def _(values, meta, k):
    return values.new_empty((values.shape[0], k))


@torch.library.custom_op("sparserun::bsr_unpack", mutates_args=())
def bsr_unpack_op(crow: Tensor, col: Tensor, values: Tensor, k: int) -> Tensor:
    return bsr_unpack(crow, col, values, k)


@bsr_unpack_op.register_fake
def _(crow, col, values, k):
    return values.new_empty(((crow.shape[0] - 1) * values.shape[-1], k))


def unpack_triton(layer) -> Tensor:
    """The layer's dense weight through the Triton unpack kernels (bit-exact with formats.unpack): one read
    of the packed tensors and one write of W. Through the custom op only while torch.compile traces."""
    op = torch.compiler.is_compiling()
    if layer.format == "semi24":
        f = semi24_unpack_op if op else semi24_unpack
        return f(layer.values, layer.meta, layer.in_features)
    if layer.format == "bsr":
        f = bsr_unpack_op if op else bsr_unpack
        return f(layer.crow_indices, layer.col_indices, layer.values, layer.in_features)
    raise ValueError(f"no Triton unpack kernel for format {layer.format!r}")


# ---- CUDA 2:4 (csrc/) -----------------------------------------------------------------------------
def semi24_gemm_cuda(x: Tensor, vf: Tensor, ef: Tensor, bias: Optional[Tensor], n: int) -> Tensor:
    """The mma.sp kernel's op, `sparserun::semi24_gemm_cuda`. It is registered in runtime/cuda_ext.py next
    to the just-in-time build it needs; this is its entry here so every kernel op is reachable from one
    module. vf, ef: the operands of `cuda_ext.repack(values, meta, n, k)`."""
    from .runtime.cuda_ext import semi24_gemm_cuda as op

    return op(x, vf, ef, bias, n)
