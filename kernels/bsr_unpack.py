"""Dense W [N, K] from B x B block-sparse rows (docs/format.md), for the dense fallback at large M.

Why a kernel: formats.bsr.unpack builds a [rows, cols, B, B] tensor and permutes it into [N, K] (a second full
copy of the dense weight); this writes each kept block straight to its place in [N, K] after one memset.

One program per kept block: its block-row comes from a binary search of crow (no per-block row index is
stored, and building one on the device would cost a launch), then B rows of B contiguous values are copied.
Bit-exact with formats.bsr.unpack.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import on_device


@triton.jit
def _bsr_unpack_kernel(crow_ptr, col_ptr, vals_ptr, out_ptr, ROWS, stride_on,
                       B: tl.constexpr, LOG_ROWS: tl.constexpr):
    """crow [ROWS+1], col [nnz] int32, values [nnz, B, B], out [ROWS*B, K] already zero."""
    blk = tl.program_id(0)
    # the block-row r with crow[r] <= blk < crow[r + 1]: the largest r with crow[r] <= blk
    lo = 0
    hi = ROWS  # invariant: crow[lo] <= blk < crow[hi]
    for _ in tl.static_range(LOG_ROWS):
        active = hi - lo > 1  # once the range is one row, later steps change nothing
        mid = (lo + hi) // 2
        go_right = tl.load(crow_ptr + mid) <= blk
        lo, hi = tl.where(active & go_right, mid, lo), tl.where(active & ~go_right, mid, hi)
    c = tl.load(col_ptr + blk)
    r_in = tl.arange(0, B)
    c_in = tl.arange(0, B)
    w = tl.load(vals_ptr + blk.to(tl.int64) * (B * B) + r_in[:, None] * B + c_in[None, :])
    dst = out_ptr + (lo * B + r_in).to(tl.int64)[:, None] * stride_on + (c * B + c_in)[None, :]
    tl.store(dst, w)


def bsr_unpack(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """Dense [N, k] weight (N = (len(crow) - 1) * B) from crow, col (int32) and values [nnz, B, B]."""
    b = values.shape[-1]
    if values.dim() != 3 or values.shape[1] != b or b not in (16, 32, 64, 128):
        raise ValueError(f"bsr_unpack: values must be [nnz, B, B] with B in 16, 32, 64, 128, got "
                         f"{tuple(values.shape)}")
    if crow.dtype != torch.int32 or col.dtype != torch.int32:
        raise TypeError(f"bsr_unpack: indices must be int32, got {crow.dtype}, {col.dtype}")
    if k % b:
        raise ValueError(f"bsr_unpack: in_features {k} is not a multiple of the block size {b}")
    device = on_device("bsr_unpack", values, crow=crow, col=col)
    rows = crow.numel() - 1
    out = torch.zeros((rows * b, k), dtype=values.dtype, device=values.device)
    nnz = values.shape[0]
    if nnz == 0:
        return out
    crow, col, values = crow.contiguous(), col.contiguous(), values.contiguous()
    # enough halvings to shrink [0, rows] to one row, plus one: the loop is unrolled, so it is a constexpr
    log_rows = max(1, rows.bit_length() + 1)
    with device:
        _bsr_unpack_kernel[(nnz,)](crow, col, values, out, rows, out.stride(0), B=b, LOG_ROWS=log_rows,
                                   num_warps=4 if b <= 64 else 8)
    return out
