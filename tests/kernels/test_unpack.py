"""Triton unpack kernels (the dense fallback's per-call decompression) against formats.unpack: bit-exact,
odd sizes, every dtype, empty and full block patterns, kept -0.0."""
import pytest
import torch

from sparserun import formats
from sparserun.kernels.bsr_unpack import bsr_unpack
from sparserun.kernels.semi24_unpack import semi24_unpack
from sparserun.runtime import dispatch
from sparserun.runtime.linear import SparseLinear

from ._data import device, random_24, random_bsr, rows_past_2_31

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no tl.dot: bf16 is exact under the interpreter too


def _bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(33, 130), (48, 80), (5, 4), (7, 3), (16, 520)])
def test_semi24_unpack_bit_exact(n, k, dtype):
    gen = torch.Generator().manual_seed(n * k)
    p = random_24(n, k, dtype, device(), gen)
    p.tensors["values"][0, 1] = -0.0  # a kept negative zero must stay negative
    out = torch.full((n, k), float("nan"), dtype=dtype, device=device())  # every element must be written
    got = semi24_unpack(p.tensors["values"], p.tensors["meta"], k, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(_bits(got), _bits(formats.unpack(p)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", [16, 32])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_bsr_unpack_bit_exact(b, density, dtype):
    gen = torch.Generator().manual_seed(b + int(10 * density))
    p = random_bsr(5 * b, 3 * b, b, density, dtype, device(), gen)  # row 0 empty, last row full
    t = p.tensors
    got = bsr_unpack(t["crow_indices"], t["col_indices"], t["values"], 3 * b)
    assert torch.equal(_bits(got), _bits(formats.unpack(p)))


def test_bad_inputs_raise_clear_errors():
    p = random_24(8, 16, torch.float16, device(), torch.Generator().manual_seed(0))
    v, meta = p.tensors["values"], p.tensors["meta"]
    with pytest.raises(ValueError, match="in_features 20"):
        semi24_unpack(v, meta, 20)
    with pytest.raises(ValueError, match="meta must be uint8"):
        semi24_unpack(v, meta.to(torch.int32), 16)
    with pytest.raises(ValueError, match="out must be"):
        semi24_unpack(v, meta, 16, out=torch.empty(8, 16, dtype=torch.float32, device=device()))
    q = random_bsr(64, 64, 32, 0.5, torch.float16, device(), torch.Generator().manual_seed(1)).tensors
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        bsr_unpack(q["crow_indices"], q["col_indices"], q["values"], 48)
    with pytest.raises(TypeError, match="int32"):
        bsr_unpack(q["crow_indices"].long(), q["col_indices"], q["values"], 64)
    with pytest.raises(RuntimeError, match="semi24_unpack: meta is on meta"):
        semi24_unpack(v, meta.to("meta"), 16)
    with pytest.raises(RuntimeError, match="bsr_unpack: crow is on meta"):
        bsr_unpack(q["crow_indices"].to("meta"), q["col_indices"], q["values"], 64)


@pytest.mark.parametrize("fmt", ["semi24", "bsr"])
def test_dense_backend_decompresses_through_the_kernels(fmt, monkeypatch):
    """The dense fallback's per-call decompression is the Triton kernel (CUDA; here forced on CPU tensors),
    and its output equals the reference backend's."""
    gen = torch.Generator().manual_seed(4)
    p = random_24(40, 64, torch.float16, "cpu", gen) if fmt == "semi24" else \
        random_bsr(64, 96, 32, 0.5, torch.float16, "cpu", gen)
    layer = SparseLinear.from_packed(p, torch.randn(p.shape[0], generator=gen).half())
    x = torch.randn(3, p.shape[1], generator=gen).half()
    from sparserun import ops

    calls = []
    real = ops.unpack_triton
    monkeypatch.setattr(ops, "unpack_triton", lambda lay: calls.append(lay) or real(lay))
    monkeypatch.setattr(dispatch, "UNPACK_WITH_TRITON_ON_CPU", True)
    got = dispatch.run_backend("dense", layer, x)
    assert calls == [layer]
    assert torch.equal(got, dispatch.run_backend("reference", layer, x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_unpack_on_gpu_large_and_captured(dtype):
    gen = torch.Generator().manual_seed(0)
    p24 = random_24(4096, 1032, dtype, "cuda", gen)
    pb = random_bsr(4096, 1024, 64, 0.3, dtype, "cuda", gen)
    layers = [SparseLinear.from_packed(p24), SparseLinear.from_packed(pb)]
    for lay, p in zip(layers, (p24, pb)):
        assert torch.equal(_bits(dispatch.decompress(lay)), _bits(formats.unpack(p)))
        # capture-safe (no host sync) and traceable (custom op with a fake)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            dispatch.decompress(lay)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            w = dispatch.decompress(lay)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(_bits(w), _bits(formats.unpack(p)))
        compiled = torch.compile(lambda: dispatch.decompress(lay), fullgraph=True)
        assert torch.equal(_bits(compiled()), _bits(formats.unpack(p)))


def test_semi24_unpack_rows_past_2_31():
    """A weight of N * K >= 2**31 elements (a 256000-word head at K >= 8389): the row offset wrapped in int32.
    (16-bit weights are written as 32-bit words, half the offset: they wrap only at 2**32 elements.)"""
    dev, n, k, dtype = device(), 129, 64, torch.float32
    p = random_24(n, k, dtype, dev, torch.Generator().manual_seed(0))
    out = rows_past_2_31(n, k, dtype, dev)
    semi24_unpack(p.tensors["values"], p.tensors["meta"], k, out=out)
    assert torch.equal(out, formats.unpack(p))
