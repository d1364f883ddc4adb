"""Block-sparse rows (BSR) with square B x B blocks, B in 16, 32, 64, 128.

Tensors (see docs/format.md):
    crow_indices  [N/B + 1] int32   block-row r's blocks are entries crow[r] .. crow[r+1]-1
    col_indices   [nnz]     int32   block-column of each kept block, increasing within a block-row
    values        [nnz, B, B]       weight dtype; values[i] = W[r*B:(r+1)*B, c*B:(c+1)*B]
The same indices and values as `torch.Tensor.to_sparse_bsr((B, B))` on the masked matrix (torch uses int64
indices; int32 halves their bytes and is what the kernels read). A kept block is kept even if its values
are all zero: the mask decides, never the values.
"""
from __future__ import annotations

import torch

from .common import Packed, PatternViolation, UnsupportedShape, check_mask, check_weight

FORMAT = "bsr"


def block_mask(mask: torch.Tensor, b: int, name: str = "weight") -> torch.Tensor:
    """[N/B, K/B] bool of kept blocks; a block that is partly kept violates the pattern."""
    n, k = mask.shape
    if n % b or k % b:
        raise UnsupportedShape(f"{name}: shape {n}x{k} is not divisible by the {b}x{b} block size")
    blocks = mask.view(n // b, b, k // b, b).sum(dim=(1, 3))
    partial = (blocks != 0) & (blocks != b * b)
    if partial.any():
        r, c = (int(i) for i in partial.nonzero()[0])
        raise PatternViolation(
            f"{name}: {b}x{b} pattern violated: block at rows {r * b}..{r * b + b - 1}, columns "
            f"{c * b}..{c * b + b - 1} is partly kept ({int(blocks[r, c])} of {b * b} entries)")
    return blocks != 0


def pack(weight: torch.Tensor, mask: torch.Tensor, block: int, name: str = "weight") -> Packed:
    check_weight(weight, name)
    check_mask(weight, mask, name)
    n, k = weight.shape
    kept = block_mask(mask, block, name)  # [R, C]
    r_idx, c_idx = kept.nonzero(as_tuple=True)  # row-major: rows ascending, columns ascending within
    counts = kept.sum(dim=1)
    crow = torch.zeros(n // block + 1, dtype=torch.int32, device=weight.device)
    crow[1:] = counts.cumsum(0).to(torch.int32)
    tiles = weight.view(n // block, block, k // block, block).permute(0, 2, 1, 3)  # [R, C, B, B]
    values = tiles[r_idx, c_idx].contiguous()
    return Packed(FORMAT, (n, k), {"crow_indices": crow, "col_indices": c_idx.to(torch.int32).contiguous(),
                                   "values": values}, {"block": block})


def unpack(p: Packed) -> torch.Tensor:
    n, k = p.shape
    b = p.meta["block"]
    crow, col, values = (p.tensors[t] for t in ("crow_indices", "col_indices", "values"))
    # output_size: without it repeat_interleave reads the total back from the device, a sync that is illegal
    # inside CUDA-graph capture (the dense fallback can run there, and the tuner times it in a graph)
    rows = torch.repeat_interleave(torch.arange(n // b, device=values.device), (crow[1:] - crow[:-1]).long(),
                                   output_size=values.shape[0])
    out = torch.zeros(n // b, k // b, b, b, dtype=values.dtype, device=values.device)
    out[rows, col.long()] = values
    return out.permute(0, 2, 1, 3).reshape(n, k).contiguous()


def mask(p: Packed) -> torch.Tensor:
    n, k = p.shape
    b = p.meta["block"]
    crow, col = p.tensors["crow_indices"], p.tensors["col_indices"]
    rows = torch.repeat_interleave(torch.arange(n // b, device=col.device), (crow[1:] - crow[:-1]).long())
    kept = torch.zeros(n // b, k // b, dtype=torch.bool, device=col.device)
    kept[rows, col.long()] = True
    return kept.repeat_interleave(b, 0).repeat_interleave(b, 1)


def check_indices(p: Packed, name: str = "weight") -> None:
    """Shapes, dtypes and the block structure: the kernels and unpack index memory with crow and col."""
    n, k = p.shape
    b = p.meta.get("block")
    if b not in (16, 32, 64, 128):
        raise ValueError(f"{name}: bsr block size {b!r} is not one of 16, 32, 64, 128")
    if n % b or k % b:
        raise ValueError(f"{name}: bsr shape {n}x{k} is not divisible by block {b}")
    try:
        crow, col, values = (p.tensors[t] for t in ("crow_indices", "col_indices", "values"))
    except KeyError as e:
        raise ValueError(f"{name}: bsr needs tensors crow_indices, col_indices, values; missing {e}") from None
    nb_r, nb_c = n // b, k // b
    if crow.dtype != torch.int32 or col.dtype != torch.int32:
        raise ValueError(f"{name}: bsr indices must be int32, got {crow.dtype}, {col.dtype}")
    if tuple(crow.shape) != (nb_r + 1,):
        raise ValueError(f"{name}: bsr crow_indices shape {tuple(crow.shape)}, expected {(nb_r + 1,)}")
    nnz = col.numel()
    if tuple(values.shape) != (nnz, b, b):
        raise ValueError(f"{name}: bsr values shape {tuple(values.shape)}, expected {(nnz, b, b)}")
    counts = crow[1:] - crow[:-1]
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((counts < 0).any()):
        raise ValueError(f"{name}: bsr crow_indices must rise from 0 to nnz={nnz}")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= nb_c):
        raise ValueError(f"{name}: bsr col_indices out of range [0, {nb_c})")
    if nnz > 1:
        # strictly increasing within each block-row (no duplicates); a new row may restart lower
        step = col[1:] - col[:-1]
        row_start = torch.zeros(nnz, dtype=torch.bool, device=col.device)
        row_start[crow[1:-1][crow[1:-1] < nnz].long()] = True
        bad = (step <= 0) & ~row_start[1:]
        if bad.any():
            i = int(bad.nonzero()[0]) + 1
            raise ValueError(f"{name}: bsr col_indices not strictly increasing within a block-row at entry {i}")


def check_values(p: Packed, name: str = "weight") -> None:
    b = p.meta["block"]
    check_weight(p.tensors["values"].reshape(-1, b), name)


def nbytes(p: Packed) -> int:
    return p.nbytes()


def validate(p: Packed, name: str = "weight") -> None:
    """The full check: check_indices, then check_values."""
    check_indices(p, name)
    check_values(p, name)
