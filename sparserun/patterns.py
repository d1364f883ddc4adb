"""Sparsity patterns: parse, validate and describe the strings users pass around.

    "unstructured"      any mask, a per-layer (or per-row) target sparsity
    "N:M"               keep at most N of every M consecutive weights along the input dim (0 < N < M <= 32)
    "BxB"               whole B-by-B blocks kept or dropped, B in 16, 32, 64, 128

A pattern decides which packed format a layer gets (see sparserun/formats): 2:4 has a dedicated format and
kernels, blocks have BSR and kernels, everything else is stored as a bitmask (smaller on disk, dense math).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

BLOCK_SIZES = (16, 32, 64, 128)
VALID_FORMS = ('"unstructured"', '"N:M" with 0 < N < M <= 32 (e.g. "2:4", "4:8")',
               f'"BxB" blocks with B in {", ".join(map(str, BLOCK_SIZES))} (e.g. "32x32")')


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" | "nm" | "block"
    n: int = 0  # N of N:M
    m: int = 0  # M of N:M
    block: int = 0  # B of BxB

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"{self.block}x{self.block}"
        return "unstructured"

    @property
    def format(self) -> str:
        """Packed format name a layer with this pattern is stored in."""
        if self.kind == "nm" and (self.n, self.m) == (2, 4):
            return "semi24"
        if self.kind == "block":
            return "bsr"
        return "bitmask"

    @property
    def fixed_sparsity(self) -> float | None:
        """Sparsity implied by the pattern itself (N:M), or None when a target must be given."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None


def parse(pattern: "str | Pattern") -> Pattern:
    """Parse a pattern string; raise ValueError listing the valid forms for anything else."""
    if isinstance(pattern, Pattern):
        # built by hand, it is checked like its string: Pattern("nm", n=4, m=2) or Pattern("block", block=7)
        # are not patterns, and Pattern("foo") would have been pruned as unstructured
        try:
            same = pattern.kind in ("unstructured", "nm", "block") and parse(str(pattern)) == pattern
        except ValueError:
            same = False
        if not same:
            raise ValueError(f"unknown sparsity pattern {pattern!r}; valid forms: {'; '.join(VALID_FORMS)}")
        return pattern
    s = str(pattern).strip().lower()
    if s == "unstructured":
        return Pattern("unstructured")
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if 0 < n < mm <= 32:
            return Pattern("nm", n=n, m=mm)
    m = re.fullmatch(r"(\d+)x(\d+)", s)
    if m and m.group(1) == m.group(2) and int(m.group(1)) in BLOCK_SIZES:
        return Pattern("block", block=int(m.group(1)))
    raise ValueError(f"unknown sparsity pattern {pattern!r}; valid forms: {'; '.join(VALID_FORMS)}")
