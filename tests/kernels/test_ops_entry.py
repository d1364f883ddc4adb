"""ops.sparse_linear_triton: the kernels directly in plain inference, the custom op (with its backward) when
autograd needs it. Both must give the same numbers. Runs under the Triton interpreter on the CPU."""
import pytest
import torch

from sparserun import ops
from sparserun.formats import bsr, semi24
from sparserun.runtime.linear import SparseLinear


def _layers():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 64, generator=g)
    keep = torch.rand(48, 16, 4, generator=g).argsort(-1)[..., :2]
    m24 = torch.zeros(48, 16, 4, dtype=torch.bool).scatter_(-1, keep, True).view(48, 64)
    mb = (torch.rand(3, 4, generator=g) < 0.5).repeat_interleave(16, 0).repeat_interleave(16, 1)
    b = torch.randn(48, generator=g)
    return [SparseLinear.from_packed(semi24.pack(w, m24), b), SparseLinear.from_packed(bsr.pack(w, mb, 16), b)]


@pytest.mark.parametrize("i", [0, 1], ids=["semi24", "bsr"])
def test_direct_kernel_without_grad_op_with_grad(i, monkeypatch):
    layer = _layers()[i]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.functional.linear(x.double(), layer.dense_weight().double(), layer.bias.double())
    called = []
    for name in ("semi24_linear", "bsr_linear"):
        orig = getattr(ops, name)
        monkeypatch.setattr(ops, name, (lambda o: lambda *a: (called.append(1), o(*a))[1])(orig))
    with torch.no_grad():
        y = ops.sparse_linear_triton(layer, x)
    assert called == []  # plain inference: no custom-op dispatch
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    xg = x.clone().requires_grad_(True)
    y2 = ops.sparse_linear_triton(layer, xg)
    assert called == [1]  # autograd needs the op's backward
    y2.sum().backward()
    gref = layer.dense_weight().sum(0).expand_as(x)
    assert torch.allclose(xg.grad, gref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, y2.detach())


@pytest.mark.parametrize("i", [0, 1], ids=["semi24", "bsr"])
def test_ops_pass_torch_opcheck_and_compile_with_dynamic_shapes_and_a_backward(i):
    """The fake implementations and autograd registrations must agree with the real op (torch's opcheck:
    schema, fake tensor, autograd, AOT dispatch static and dynamic). The block-sparse backward went through
    torch's sparse BSR type, which fails on symbolic sizes: torch.compile(dynamic=True) with a backward broke."""
    layer = _layers()[i]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, generator=g, requires_grad=True)
    if layer.format == "semi24":
        op, args = ops.semi24_linear, (x, layer.values, layer.meta, layer.bias, 64)
        unpack, unpack_args = ops.semi24_unpack_op, (layer.values, layer.meta, 64)
    else:
        op, args = ops.bsr_linear, (x, layer.crow_indices, layer.col_indices, layer.values, layer.bias,
                                    layer.max_row_blocks)
        unpack, unpack_args = ops.bsr_unpack_op, (layer.crow_indices, layer.col_indices, layer.values, 64)
    torch.library.opcheck(op, args)
    torch.library.opcheck(unpack, unpack_args)

    torch._dynamo.reset()
    try:
        f = torch.compile(lambda t: op(t, *args[1:]), dynamic=True, fullgraph=True, backend="aot_eager")
        for rows in (5, 9):  # a second size: the graph is traced with a symbolic row count
            xs = torch.randn(rows, 64, generator=g, requires_grad=True)
            f(xs).sum().backward()
            torch.testing.assert_close(xs.grad, layer.dense_weight().sum(0).expand_as(xs), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
