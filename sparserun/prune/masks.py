"""Pattern-aware mask selection: turn an importance score into a mask that fits a pattern.

`select(score, pattern, sparsity)` returns a bool mask (True = kept) of the score's shape that always packs
with `sparserun.formats.pack(weight, mask, pattern)`:

    unstructured   drop the round(s·numel) lowest scores of the layer (or, per_row=True, round(s·K) per row)
    N:M            keep the N highest scores of every M consecutive inputs (K is padded with never-kept
                   columns when it is not a multiple of M, as the packed format does)
    BxB            pool the scores of each B x B block (sum), drop the round(s·#blocks) lowest blocks of the
                   layer, or with balance_rows=True the same round(s·K/B) blocks in every block-row, so a
                   kernel gets the same work in every block-row; N or K not a multiple of B raises
                   formats.UnsupportedShape (the caller keeps that layer dense and says why)

Counts are exact (top-k, not a threshold), so ties never make a layer sparser than asked.
"""
from __future__ import annotations

import math

import torch

from ..formats import UnsupportedShape
from ..patterns import Pattern, parse


def resolve_sparsity(pattern: "str | Pattern", sparsity: float | None) -> float:
    """The sparsity a pattern prunes to: N:M implies 1 - N/M (a different explicit value is an error);
    unstructured and blocks need an explicit target in (0, 1)."""
    pat = parse(pattern)
    fixed = pat.fixed_sparsity
    if sparsity is not None:
        try:
            s = float(sparsity)
        except (TypeError, ValueError):
            raise ValueError(f"sparsity must be a number in (0, 1), got {sparsity!r}") from None
        if not (0.0 < s < 1.0) or math.isnan(s):
            raise ValueError(f"sparsity must be in (0, 1) (the fraction of weights removed), got {sparsity!r}")
        if fixed is not None and not math.isclose(s, fixed, abs_tol=1e-9):
            raise ValueError(f"pattern {pat} keeps {pat.n} of every {pat.m} weights, so its sparsity is "
                             f"{fixed:g}; got sparsity={s:g} (leave it out or pass {fixed:g})")
        return s
    if fixed is None:
        raise ValueError(f"pattern {pat} needs a target sparsity in (0, 1), e.g. sparsity=0.5 (--sparsity 0.5)")
    return fixed


def select(score: torch.Tensor, pattern: "str | Pattern", sparsity: float | None = None, *,
           per_row: bool = False, balance_rows: bool = False, name: str = "weight") -> torch.Tensor:
    """Bool mask (True = kept) of `score`'s shape fitting `pattern` at `sparsity` (see module doc)."""
    pat = parse(pattern)
    s = resolve_sparsity(pat, sparsity)
    if score.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D score [out_features, in_features], got {tuple(score.shape)}")
    score = score.detach().float()
    if torch.isnan(score).any():
        raise ValueError(f"{name}: importance score has NaN entries (non-finite weights or statistics)")
    if pat.kind == "unstructured":
        return unstructured(score, s, per_row=per_row)
    if pat.kind == "nm":
        return nm(score, pat.n, pat.m)
    return blocks(score, pat.block, s, balance_rows=balance_rows, name=name)


def _keep_top(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Mask of the `keep` highest entries along the last dim."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(-1, score.topk(keep, dim=-1, sorted=False).indices, True)
    return mask


def unstructured(score: torch.Tensor, sparsity: float, *, per_row: bool = False) -> torch.Tensor:
    n, k = score.shape
    if per_row:
        return _keep_top(score, k - round(sparsity * k))
    return _keep_top(score.reshape(-1), score.numel() - round(sparsity * score.numel())).view(n, k)


def nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, k = score.shape
    kp = (k + m - 1) // m * m
    padded = score.new_full((rows, kp), -math.inf)  # padding columns are never kept
    padded[:, :k] = score
    # a group whose real columns are all -inf would still keep a padding column; cut it off below
    mask = _keep_top(padded.view(rows, kp // m, m), n).view(rows, kp)[:, :k]
    return mask.contiguous()


def block_scores(score: torch.Tensor, b: int, name: str = "weight") -> torch.Tensor:
    """[N/B, K/B] sums of the score over each B x B block."""
    n, k = score.shape
    if n % b or k % b:
        raise UnsupportedShape(f"{name}: shape {n}x{k} is not divisible by the {b}x{b} block size")
    return score.view(n // b, b, k // b, b).sum(dim=(1, 3))


def expand_blocks(kept: torch.Tensor, b: int) -> torch.Tensor:
    return kept.repeat_interleave(b, 0).repeat_interleave(b, 1)


def blocks(score: torch.Tensor, b: int, sparsity: float, *, balance_rows: bool = False,
           name: str = "weight") -> torch.Tensor:
    pooled = block_scores(score, b, name)
    r, c = pooled.shape
    if balance_rows:
        kept = _keep_top(pooled, c - round(sparsity * c))
    else:
        kept = _keep_top(pooled.reshape(-1), r * c - round(sparsity * r * c)).view(r, c)
    return expand_blocks(kept, b)
