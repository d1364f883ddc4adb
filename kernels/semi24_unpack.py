"""Dense W [N, K] from the 2:4 packed layout (docs/format.md), for the dense fallback at large M.

Why a kernel: without a resident dense copy (runtime/dispatch.py `keeps_dense`), prefill runs cuBLAS on a
weight decompressed per call. In torch that was 1.34 ms for a 14336x4096 layer on the H100 (int64 positions
and a scatter), 4x the GEMM it feeds. This reads values + meta once and writes W once: ~61 µs of bytes there.

Per program, a [BLOCK_N, BLOCK_G] tile of groups of 4:
    v0, v1  = values[n, 2g], values[n, 2g + 1]        (the two kept values)
    i0, i1  = nibble(meta[n, g // 2])                  (their positions in the group)
    W[n, 4g + j] = v0 if j == i0, v1 if j == i1, else 0      for j in 0..3
The four position tiles are interleaved in registers (join + reshape) so the store is one contiguous row run.
16-bit weights with K % 4 == 0 (every LLM shape) take `_semi24_unpack_words_kernel`, which builds each group
as two 32-bit words instead of four 16-bit selects.
Bit-exact with formats.semi24.unpack: values are moved, never converted (a kept -0.0 stays -0.0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, on_device


@triton.jit
def _semi24_unpack_kernel(vals_ptr, meta_ptr, out_ptr, N, K, NG, stride_vn, stride_mn, stride_on,
                          BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """values [N, 2*NG], meta [N, ceil(NG/2)] uint8, out [N, K] (K <= 4*NG: padding columns are not written)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    mask = (offs_n < N)[:, None] & (g < NG)[None, :]
    vp = vals_ptr + offs_n[:, None] * stride_vn + 2 * g[None, :]
    v0 = tl.load(vp, mask=mask, other=0.0)
    v1 = tl.load(vp + 1, mask=mask, other=0.0)
    mb = tl.load(meta_ptr + offs_n[:, None] * stride_mn + (g // 2)[None, :], mask=mask, other=0)
    nib = (mb.to(tl.int32) >> ((g & 1) * 4)[None, :]) & 0xF
    i0 = nib & 3
    i1 = nib >> 2
    zero = tl.zeros_like(v0)
    w0 = tl.where(i0 == 0, v0, zero)  # i1 is never 0
    w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    w3 = tl.where(i1 == 3, v1, zero)  # i0 is never 3
    # join(join(w0, w2), join(w1, w3)) is [..., 2, 2] with [..., i, j] = w_(2i + j): flattening puts them in order
    tile = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_N, 4 * BLOCK_G))
    cols = tl.program_id(1) * (4 * BLOCK_G) + tl.arange(0, 4 * BLOCK_G)
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + cols[None, :], tile,  # N * K may pass 2**31
             mask=(offs_n < N)[:, None] & (cols < K)[None, :])


@triton.jit
def group_words(p, nib):
    """A group of 16-bit weights as two 32-bit words of dense columns, (0, 1) and (2, 3), from the word `p`
    holding its stored pair (v0 low, v1 high) and its nibble (i0 | i1 << 2, i0 < i1). Every case is p itself,
    one half of p moved, or zero:
        a = p (0,1) | v0 = p & 0xFFFF (0,2),(0,3) | v0 << 16 = p << 16 (1,2),(1,3) | 0 (2,3)
        b = p (2,3) | v1 high = p & 0xFFFF0000 (0,3),(1,3) | v1 low = p >> 16 (0,2),(1,2) | 0 (0,1)
    Shared by the unpack and the dot kernels (semi24_matmul.py)."""
    i0 = nib & 3
    i1 = nib >> 2
    a = tl.where(i0 == 0, tl.where(i1 == 1, p, p & 0xFFFF), tl.where(i0 == 1, p << 16, 0))
    b = tl.where(i1 == 3, tl.where(i0 == 2, p, p & -65536), tl.where(i1 == 2, (p >> 16) & 0xFFFF, 0))
    return a, b


@triton.jit
def _semi24_unpack_words_kernel(vals_ptr, meta_ptr, out_ptr, N, NG, stride_vn, stride_mn, stride_on,
                                BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """16-bit weights with K % 4 == 0: values int32 [N, NG] (a group's pair in one word), out int32 [N, 2*NG].
    Each group becomes two 32-bit words (group_words), interleaved with one join and stored as whole words."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    mask = (offs_n < N)[:, None] & (g < NG)[None, :]
    p = tl.load(vals_ptr + offs_n[:, None] * stride_vn + g[None, :], mask=mask, other=0)
    mb = tl.load(meta_ptr + offs_n[:, None] * stride_mn + (g // 2)[None, :], mask=mask, other=0)
    a, b = group_words(p, (mb.to(tl.int32) >> ((g & 1) * 4)[None, :]) & 0xF)
    tile = tl.reshape(tl.join(a, b), (BLOCK_N, 2 * BLOCK_G))
    words = tl.program_id(1) * (2 * BLOCK_G) + tl.arange(0, 2 * BLOCK_G)
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + words[None, :], tile,
             mask=(offs_n < N)[:, None] & (words < 2 * NG)[None, :])


def semi24_unpack(values: torch.Tensor, meta: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense [N, k] weight from values [N, Kp/2] and meta [N, ceil(Kp/8)] uint8 (Kp = k rounded up to 4)."""
    n, kp2 = values.shape
    ng = kp2 // 2
    if kp2 % 2 or kp2 * 2 != (k + 3) // 4 * 4:
        raise ValueError(f"semi24_unpack: values has {kp2} columns, expected {((k + 3) // 4 * 4) // 2} "
                         f"for in_features {k}")
    if meta.dtype != torch.uint8 or meta.shape != (n, (ng + 1) // 2):
        raise ValueError(f"semi24_unpack: meta must be uint8 {(n, (ng + 1) // 2)}, got {meta.dtype} "
                         f"{tuple(meta.shape)}")
    device = on_device("semi24_unpack", values, meta=meta, out=out)
    values, meta = values.contiguous(), meta.contiguous()
    if out is None:
        out = torch.empty((n, k), dtype=values.dtype, device=values.device)
    elif out.shape != (n, k) or out.dtype != values.dtype or out.stride(1) != 1:
        raise ValueError(f"semi24_unpack: out must be {values.dtype} [{n}, {k}] with unit column stride, got "
                         f"{out.dtype} {list(out.shape)} strides {out.stride()}")
    if n == 0 or k == 0:
        return out
    bn, bg = (8, 16) if interpreting() else (16, 128)  # 16 rows x 512 columns per program on a GPU
    grid = (cdiv(n, bn), cdiv(ng, bg))
    with device:
        if values.element_size() == 2 and k % 4 == 0 and out.stride(0) % 2 == 0 and out.storage_offset() % 2 == 0:
            # whole words: about half the instructions per group of the 16-bit path below (sm_90 SASS)
            ow = out.view(torch.int32)
            _semi24_unpack_words_kernel[grid](values.view(torch.int32), meta, ow, n, ng, kp2 // 2, meta.stride(0),
                                              ow.stride(0), BLOCK_N=bn, BLOCK_G=bg, num_warps=4)
        else:
            _semi24_unpack_kernel[grid](values, meta, out, n, k, ng, values.stride(0), meta.stride(0),
                                        out.stride(0), BLOCK_N=bn, BLOCK_G=bg, num_warps=4)
    return out
