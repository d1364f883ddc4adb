"""A model built from SparseLinear layers runs under torch.compile(fullgraph=True) and CUDA-graph capture,
with the same outputs as eager (the custom ops in sparserun/ops.py make the kernels opaque to both)."""
import pytest
import torch

from sparserun.runtime.linear import SparseLinear

from ._data import random_24, random_bsr


def _model(dtype, dev):
    gen = torch.Generator().manual_seed(0)
    p24 = random_24(128, 64, dtype, dev, gen)
    pb = random_bsr(64, 128, 32, 0.5, dtype, dev, gen)
    bias = torch.randn(128, generator=gen).to(dtype).to(dev)
    return torch.nn.Sequential(SparseLinear.from_packed(p24, bias), torch.nn.GELU(),
                               SparseLinear.from_packed(pb, None))


def test_compile_fullgraph_matches_eager_cpu(monkeypatch):
    monkeypatch.setenv("SPARSERUN_BACKEND", "triton")  # kernels through the interpreter on CPU tensors
    model = _model(torch.float32, "cpu")
    x = torch.randn(3, 64)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(x), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_compile_and_cuda_graph_on_gpu(dtype):
    model = _model(dtype, "cuda")
    x = torch.randn(4, 64, device="cuda", dtype=dtype)
    eager = model(x)  # also tunes the kernels, outside capture
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=2e-2, atol=2e-2)
    static_x = x.clone()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model(static_x)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        static_y = model(static_x)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    g.replay()
    torch.testing.assert_close(static_y, model(new_x), rtol=2e-2, atol=2e-2)
