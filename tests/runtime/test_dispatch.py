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


def _bsr_layer(mask):
    lin = torch.nn.Linear(mask.shape[1], mask.shape[0])
    return SparseLinear.from_linear(lin, mask, "32x32")


@pytest.mark.parametrize("backend", ["triton", "reference", "dense"])
@pytest.mark.parametrize("fmt", ["2:4", "32x32"])
def test_input_of_another_width_is_refused(monkeypatch, backend, fmt):
    """The block-sparse kernel takes K from x: a [3, 32] input to a 64-wide layer returned a [3, 64] result
    read past x's rows. Every backend now refuses it, as nn.Linear does."""
    monkeypatch.setenv("SPARSERUN_BACKEND", backend)
    lin = torch.nn.Linear(64, 64)
    layer = SparseLinear.from_linear(lin, magnitude_mask(lin.weight, fmt, None if fmt == "2:4" else 0.5), fmt)
    for bad in (torch.randn(3, 32), torch.randn(3, 96), torch.tensor(1.0)):
        with pytest.raises(RuntimeError, match=r"SparseLinear\(64x64, .*\): input of shape .* does not end in "
                                               r"in_features=64"):
            layer(bad)


def test_block_count_follows_a_mask_copied_in_place(monkeypatch):
    """max_row_blocks was cached on the index storage only: load_state_dict copies a new mask into the same
    storage, and the kernel, sized for one block per row, dropped three of the four blocks of the new one."""
    monkeypatch.setenv("SPARSERUN_BACKEND", "triton")
    spread = torch.zeros(128, 128, dtype=torch.bool)
    spread[:, :32] = True  # one block in each block-row
    piled = torch.zeros(128, 128, dtype=torch.bool)
    piled[:32, :] = True  # the same four blocks, all in the first block-row
    layer, other = _bsr_layer(spread), _bsr_layer(piled)
    x = torch.randn(3, 128)
    layer(x)
    assert layer.max_row_blocks == 1
    layer.load_state_dict(other.state_dict())  # copies into the existing buffers
    assert layer.max_row_blocks == 4
    ref = x.double() @ other.dense_weight().double().T + other.bias.detach().double()
    assert ((layer(x).double() - ref).norm() / ref.norm()) < 1e-5


def test_block_count_follows_a_mask_loaded_under_inference_mode(monkeypatch):
    """Tensors made under torch.inference_mode have no write counter, so the cache key above cannot see a new
    mask loaded into them; load_state_dict itself now drops the layer's caches."""
    monkeypatch.setenv("SPARSERUN_BACKEND", "triton")
    spread = torch.zeros(128, 128, dtype=torch.bool)
    spread[:, :32] = True
    piled = torch.zeros(128, 128, dtype=torch.bool)
    piled[:32, :] = True
    x = torch.randn(3, 128)
    with torch.inference_mode():
        layer = _bsr_layer(spread)
        other = _bsr_layer(piled)
        layer(x)
        assert layer.max_row_blocks == 1
        layer.load_state_dict(other.state_dict())
        assert layer.max_row_blocks == 4
        ref = x.double() @ other.dense_weight().double().T + other.bias.double()
        assert ((layer(x).double() - ref).norm() / ref.norm()) < 1e-5
