"""dispatch: a forced backend that cannot run here says why in one line."""
import pytest
import torch

from sparserun.runtime.linear import SparseLinear
from sparserun.runtime.sparsify import magnitude_mask


def _layer(dtype):
    lin = torch.nn.Linear(64, 32).to(dtype)
    return SparseLinear.from_linear(lin, magnitude_mask(lin.weight, "2:4"), "2:4")


@pytest.mark.parametrize("interpret, dtype, msg", [
    ("0", torch.float32, r"backend 'triton' needs a CUDA tensor, got one on cpu \(CPU tensors run the kernels only "
                         r"under TRITON_INTERPRET=1"),
    ("1", torch.bfloat16, r"the Triton interpreter computes bfloat16 wrongly"),
])
def test_forced_triton_on_cpu_tensors(monkeypatch, interpret, dtype, msg):
    monkeypatch.setenv("SPARSERUN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    layer = _layer(dtype)
    with pytest.raises(RuntimeError, match=rf"SparseLinear\(32x64, semi24\): {msg}"):
        layer(torch.randn(3, 64, dtype=dtype))
