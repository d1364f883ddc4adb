"""2:4 semi-structured format: two kept values of every four along K, plus 2-bit positions.

Tensors (see docs/format.md for the byte layout):
    values  [N, Kp/2]        weight dtype; group g's kept values at columns 2g, 2g+1, in column order
    meta    [N, ceil(Kp/8)]  uint8; one 4-bit nibble per group, group 2j in the low nibble of byte j;
                             nibble = i0 | i1 << 2 with 0 <= i0 < i1 <= 3 the in-group positions of the values
Kp = K rounded up to a multiple of 4 (pad columns are never kept). A group with fewer than two kept weights
stores the lowest unused positions with value +0.0, so every group has two distinct ordered positions, the
form the sparse tensor-core metadata needs. 16-bit: (Kp/2*2 + Kp/8) / (2K) = 0.5625 of the dense bytes.
"""
from __future__ import annotations

import torch

from .common import Packed, PatternViolation, check_mask, check_weight

FORMAT = "semi24"
GROUP = 4


def _padded_k(k: int) -> int:
    return (k + GROUP - 1) // GROUP * GROUP


def pack(weight: torch.Tensor, mask: torch.Tensor, name: str = "weight") -> Packed:
    """Pack `weight` keeping exactly the entries where `mask` is True (at most 2 per group of 4)."""
    check_weight(weight, name)
    check_mask(weight, mask, name)
    n, k = weight.shape
    kp = _padded_k(k)
    w = torch.zeros(n, kp, dtype=weight.dtype, device=weight.device)
    m = torch.zeros(n, kp, dtype=torch.bool, device=weight.device)
    w[:, :k] = weight
    m[:, :k] = mask
    g = kp // GROUP
    m4 = m.view(n, g, GROUP)
    over = m4.sum(-1) > 2
    if over.any():
        r, gi = (int(i) for i in over.nonzero()[0])
        raise PatternViolation(
            f"{name}: 2:4 pattern violated at row {r}, columns {gi * 4}..{gi * 4 + 3}: "
            f"{int(m4[r, gi].sum())} kept entries (at most 2); {int(over.sum())} such groups in all")
    # Kept positions first (in column order), then the unused ones: the first two are the stored pair.
    ar = torch.arange(GROUP, device=w.device)
    order = ((~m4).to(torch.int64) * GROUP + ar).argsort(dim=-1)[..., :2].sort(dim=-1).values
    kept = m4.gather(-1, order)
    vals = torch.where(kept, w.view(n, g, GROUP).gather(-1, order), torch.zeros((), dtype=w.dtype,
                                                                                 device=w.device))
    nib = (order[..., 0] | (order[..., 1] << 2)).to(torch.uint8)  # [n, g]
    if g % 2:
        pad = torch.full((n, 1), 0 | (1 << 2), dtype=torch.uint8, device=w.device)
        nib = torch.cat([nib, pad], dim=1)
    meta = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return Packed(FORMAT, (n, k), {"values": vals.reshape(n, g * 2).contiguous(),
                                   "meta": meta.contiguous()})


def positions(p: Packed) -> torch.Tensor:
    """[N, G, 2] int64 in-group positions (i0, i1) of the stored values."""
    n, k = p.shape
    g = _padded_k(k) // GROUP
    meta = p.tensors["meta"].to(torch.int64)
    nib = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(n, -1)[:, :g]
    return torch.stack([nib & 3, nib >> 2], dim=-1)


def unpack(p: Packed) -> torch.Tensor:
    """The dense [N, K] weight, bit-exact (kept -0.0 stays -0.0)."""
    n, k = p.shape
    kp = _padded_k(k)
    g = kp // GROUP
    vals = p.tensors["values"].view(n, g, 2)
    # Selects in uint8 instead of scatter_ with int64 positions: the runtime's dense fallback runs this per
    # call, and the int64 index tensor (4x the weight's size in bf16) made it 1.3 ms for a 14336x4096 layer
    # on an H100. torch.where keeps the stored values bit-exact (-0.0 stays -0.0); dropped entries are +0.0.
    meta = p.tensors["meta"]
    nib = torch.stack([meta & 0xF, meta >> 4], dim=-1).view(n, -1)[:, :g, None]  # [n, g, 1] uint8
    j = torch.arange(GROUP, dtype=torch.uint8, device=meta.device)
    zero = torch.zeros((), dtype=vals.dtype, device=vals.device)
    out = torch.where((nib & 3) == j, vals[..., :1], torch.where((nib >> 2) == j, vals[..., 1:], zero))
    return out.view(n, kp)[:, :k].contiguous()


def mask(p: Packed) -> torch.Tensor:
    """The stored positions as a bool [N, K] mask: the original mask, plus the filler positions of groups
    that kept fewer than two (always a valid 2:4 mask, so fine-tuning can never break the pattern)."""
    n, k = p.shape
    kp = _padded_k(k)
    out = torch.zeros(n, kp // GROUP, GROUP, dtype=torch.bool, device=p.tensors["meta"].device)
    out.scatter_(-1, positions(p), True)
    return out.view(n, kp)[:, :k].contiguous()


def check_indices(p: Packed, name: str = "weight") -> None:
    """Raise ValueError naming the layer unless `p`'s tensors and positions are a well-formed 2:4 packing of
    shape p.shape (its values are not scanned: check_values)."""
    n, k = p.shape
    kp = _padded_k(k)
    vals, meta = p.tensors.get("values"), p.tensors.get("meta")
    if vals is None or meta is None:
        raise ValueError(f"{name}: semi24 needs tensors 'values' and 'meta', got {sorted(p.tensors)}")
    if tuple(vals.shape) != (n, kp // 2):
        raise ValueError(f"{name}: semi24 values shape {tuple(vals.shape)}, expected {(n, kp // 2)}")
    exp_meta = (n, (kp // GROUP + 1) // 2)
    if meta.dtype != torch.uint8 or tuple(meta.shape) != exp_meta:
        raise ValueError(f"{name}: semi24 meta must be uint8 {exp_meta}, got {meta.dtype} "
                         f"{tuple(meta.shape)}")
    # in uint8, nibble by nibble: positions() would build an int64 tensor 4x the weight's size (at load time)
    g = kp // GROUP
    for half, shift in ((0, 0), (1, 4)):
        i0, i1 = (meta >> shift) & 3, (meta >> (shift + 2)) & 3
        bad = i0 >= i1
        if half and g % 2:
            bad[:, -1] = False  # the last byte's high nibble is padding, no group
        if bad.any():
            r, j = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name}: semi24 meta at row {r}, group {2 * j + half} has positions "
                             f"{(int(i0[r, j]), int(i1[r, j]))}; they must be distinct and increasing")
    if kp != k:
        pos = positions(p)
        # a value stored in a pad column would be silently dropped by unpack and read by kernels
        cols = torch.arange(kp // GROUP, device=pos.device)[:, None] * GROUP + pos
        stray = (cols >= k) & (vals.view(n, kp // GROUP, 2) != 0)
        if stray.any():
            r = int(stray.nonzero()[0][0])
            raise ValueError(f"{name}: semi24 row {r} stores a nonzero value in the padding past column {k}")


def check_values(p: Packed, name: str = "weight") -> None:
    check_weight(p.tensors["values"], name)


def nbytes(p: Packed) -> int:
    return p.nbytes()


def validate(p: Packed, name: str = "weight") -> None:
    """The full check: check_indices, then check_values."""
    check_indices(p, name)
    check_values(p, name)
