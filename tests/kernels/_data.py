"""Random packed weights for kernel tests: random values (never zeros), awkward masks."""
from __future__ import annotations

import pytest
import torch

from sparserun import formats

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def dtypes() -> list:
    # tl.dot on bfloat16 is wrong under the CPU interpreter: bf16 is tested on a GPU only
    return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "output has NaN: an element was not written"
    den = ref.norm().item()
    return (got.double() - ref).norm().item() / (den if den > 0 else 1.0)


def random_24(n: int, k: int, dtype, dev, gen: torch.Generator):
    """A 2:4 packing where ~1/8 of groups keep fewer than two (the filler path) and some kept weights
    are exactly zero (the mask, not the values, decides)."""
    w = torch.randn(n, k, generator=gen).to(dtype)
    kp = (k + 3) // 4 * 4
    score = torch.rand(n, kp // 4, 4, generator=gen)
    keep = torch.zeros(n, kp // 4, 4, dtype=torch.bool).scatter_(-1, score.argsort(-1)[..., :2], True)
    drop = torch.rand(n, kp // 4, 1, generator=gen) < 0.125
    keep &= ~(drop & (score == score.max(-1, keepdim=True).values))
    mask = keep.view(n, kp)[:, :k]
    w[0, mask[0].nonzero()[:1, 0]] = 0.0
    return formats.pack(w.to(dev), mask.to(dev), "2:4")


def random_bsr(n: int, k: int, b: int, density: float, dtype, dev, gen: torch.Generator):
    """Blocks kept at random with the given density, one block-row always empty and, when there are
    enough rows, one row fully kept (uneven rows: the work split must balance them)."""
    w = torch.randn(n, k, generator=gen).to(dtype)
    keep = torch.rand(n // b, k // b, generator=gen) < density
    if n // b > 1 and 0 < density < 1:
        keep[0] = False
        keep[-1] = True
    mask = keep.repeat_interleave(b, 0).repeat_interleave(b, 1)
    return formats.pack(w.to(dev), mask.to(dev), f"{b}x{b}")


def rows_past_2_31(m: int, k: int, dtype, dev):
    """[m, k] view whose last row starts past element 2**31 of its storage (mostly untouched virtual memory):
    the row offsets a long prefill reaches (M * K or M * N >= 2**31) at a size the interpreter can run."""
    stride = (2 ** 31) // (m - 1) + 64
    try:
        big = torch.empty(m, stride, dtype=dtype, device=dev)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve the large virtual buffer here")
    return big[:, :k]

