"""Packed weight formats, one module per format: pack(weight, mask) / unpack / mask / validate / nbytes.

Pure torch, any device. The mask is always explicit: kept weights may be 0.0 or -0.0.
"""
from __future__ import annotations

import torch

from . import bitmask, bsr, semi24
from .common import Packed, PatternViolation, UnsupportedShape
from ..patterns import Pattern, parse

FORMATS = {"semi24": semi24, "bsr": bsr, "bitmask": bitmask}

__all__ = ["Packed", "PatternViolation", "UnsupportedShape", "FORMATS", "pack", "unpack", "mask",
           "validate", "check_indices", "module"]


def module(fmt: str):
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown packed format {fmt!r}; known: {', '.join(FORMATS)}") from None


def pack(weight: torch.Tensor, mask: torch.Tensor, pattern: "str | Pattern", name: str = "weight") -> Packed:
    """Pack a masked weight in the format its pattern calls for; checks the mask fits the pattern."""
    pat = parse(pattern)
    if pat.kind == "nm" and pat.format != "semi24":
        from .common import check_mask
        check_mask(weight, mask, name)
        check_nm(mask, pat.n, pat.m, name)
    if pat.format == "bsr":
        p = bsr.pack(weight, mask, pat.block, name)
    else:
        p = FORMATS[pat.format].pack(weight, mask, name)
    p.meta["pattern"] = str(pat)
    return p


def check_nm(mask: torch.Tensor, n: int, m: int, name: str = "weight") -> None:
    """Raise PatternViolation if some group of m along K keeps more than n (K padded with unkept)."""
    rows, k = mask.shape
    kp = (k + m - 1) // m * m
    padded = torch.zeros(rows, kp, dtype=torch.int32, device=mask.device)
    padded[:, :k] = mask.to(torch.int32)
    over = padded.view(rows, kp // m, m).sum(-1) > n
    if over.any():
        r, g = (int(i) for i in over.nonzero()[0])
        raise PatternViolation(f"{name}: {n}:{m} pattern violated at row {r}, columns {g * m}..{g * m + m - 1}")


def unpack(p: Packed) -> torch.Tensor:
    return module(p.format).unpack(p)


def mask(p: Packed) -> torch.Tensor:
    return module(p.format).mask(p)


def validate(p: Packed, name: str = "weight") -> None:
    """The format's full check: every index and position well formed, every value finite."""
    check_indices(p, name)
    module(p.format).check_values(p, name)


def check_indices(p: Packed, name: str = "weight") -> None:
    """Everything but the value scan: shapes, dtypes, and every index, position and bit count that a kernel
    or unpack addresses memory with (an out-of-range block column is a write outside the buffer), plus an N:M
    pattern stored as a bitmask. What loading a checkpoint runs: its sha256 sits in the same manifest."""
    module(p.format).check_indices(p, name)
    pattern = p.meta.get("pattern")
    if p.format == "bitmask" and pattern:
        pat = parse(pattern)
        if pat.kind == "nm":
            check_nm(mask(p), pat.n, pat.m, name)
