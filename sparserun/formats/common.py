"""What every packed format shares: the Packed record, input checks and error types."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class PatternViolation(ValueError):
    """The mask does not fit the pattern (names the layer, row and column)."""


class UnsupportedShape(ValueError):
    """The layer's shape cannot be stored in this format; callers keep such a layer dense."""


@dataclass
class Packed:
    """One layer's packed weight.

    format:  the format name ("semi24", "bsr", "bitmask", "dense")
    shape:   the true dense shape (N = out_features, K = in_features), before any padding
    tensors: role -> tensor; the roles of each format are listed in its module docstring
    meta:    small JSON-able facts (block size, ...), stored in the manifest
    """

    format: str
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors["values"].dtype if "values" in self.tensors else self.tensors["weight"].dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Packed":
        """On `device`, with the floating tensors (the values) cast to `dtype`; index tensors keep theirs."""
        return Packed(self.format, self.shape,
                      {k: v.to(device, dtype if dtype is not None and v.is_floating_point() else v.dtype)
                       for k, v in self.tensors.items()}, dict(self.meta))


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """Refuse what no format may silently store: wrong rank, unsupported dtype, NaN or Inf."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight [out_features, in_features], got shape "
                         f"{tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: unsupported dtype {weight.dtype}; supported: float16, bfloat16, float32")
    check_weight_finite(weight, name)


def check_weight_finite(weight: torch.Tensor, name: str = "weight") -> None:
    bad = ~torch.isfinite(weight)
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: non-finite value {weight[r, c].item()} at row {r}, column {c} "
                         f"({int(bad.sum())} non-finite in all)")


def check_mask(weight: torch.Tensor, mask: torch.Tensor, name: str = "weight") -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: mask must be torch.bool (kept weights can be 0.0, so a mask is never "
                        f"inferred from values), got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
