"""Bitmask format for any mask (unstructured, N:M other than 2:4): kept values plus one bit per weight.

Tensors (see docs/format.md):
    values   [nnz]             weight dtype; kept weights in row-major order
    bitmask  [N, ceil(K/8)]    uint8; bit j (LSB first) of byte c in row r is column 8c + j
This format buys disk and host-memory savings only: the runtime decompresses it to dense once at load,
because no fast kernel exists for arbitrary masks at 16 bits. 50% sparse fp16: 0.5 + 1/16 = 0.5625.
"""
from __future__ import annotations

import torch

from .common import Packed, check_mask, check_weight

FORMAT = "bitmask"
_BITS = 2 ** torch.arange(8, dtype=torch.int32)


def pack(weight: torch.Tensor, mask: torch.Tensor, name: str = "weight") -> Packed:
    check_weight(weight, name)
    check_mask(weight, mask, name)
    n, k = weight.shape
    kp = (k + 7) // 8 * 8
    m = torch.zeros(n, kp, dtype=torch.int32, device=weight.device)
    m[:, :k] = mask.to(torch.int32)
    bits = (m.view(n, kp // 8, 8) * _BITS.to(weight.device)).sum(-1).to(torch.uint8)
    return Packed(FORMAT, (n, k), {"values": weight[mask].contiguous(), "bitmask": bits.contiguous()})


def mask(p: Packed) -> torch.Tensor:
    n, k = p.shape
    bits = p.tensors["bitmask"].to(torch.int32)
    m = (bits[..., None] & _BITS.to(bits.device)) != 0
    return m.reshape(n, -1)[:, :k]


def unpack(p: Packed) -> torch.Tensor:
    vals = p.tensors["values"]
    out = torch.zeros(p.shape, dtype=vals.dtype, device=vals.device)
    out[mask(p)] = vals
    return out


def check_indices(p: Packed, name: str = "weight") -> None:
    n, k = p.shape
    vals, bits = p.tensors.get("values"), p.tensors.get("bitmask")
    if vals is None or bits is None:
        raise ValueError(f"{name}: bitmask needs tensors 'values' and 'bitmask', got {sorted(p.tensors)}")
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (n, (k + 7) // 8):
        raise ValueError(f"{name}: bitmask must be uint8 {(n, (k + 7) // 8)}, got {bits.dtype} "
                         f"{tuple(bits.shape)}")
    m = mask(p)
    if k % 8 and bool((bits[:, -1].to(torch.int32) >> (k % 8)).any()):
        raise ValueError(f"{name}: bitmask sets bits past column {k}")
    if vals.dim() != 1 or vals.numel() != int(m.sum()):
        raise ValueError(f"{name}: bitmask has {int(m.sum())} set bits but {vals.numel()} values")


def check_values(p: Packed, name: str = "weight") -> None:
    check_weight(p.tensors["values"].view(1, -1), name)


def nbytes(p: Packed) -> int:
    return p.nbytes()


def validate(p: Packed, name: str = "weight") -> None:
    """The full check: check_indices, then check_values."""
    check_indices(p, name)
    check_values(p, name)
