"""Block-sparse Triton kernel against a float64 reference (CPU interpreter in CI, same tests on a GPU)."""
import pytest
import torch

import sparserun.kernels._common as kcommon
from sparserun import formats
from sparserun.kernels.bsr_matmul import bsr_dense_ref, bsr_matmul, bsr_matmul_ref, candidate_configs

from ._data import TOL, device, dtypes, random_bsr, rel_err, rows_past_2_31

M_VALUES = [1, 2, 3, 7, 16, 33, 64, 129]
DENSITIES = [0.0, 0.1, 0.5, 1.0]


@pytest.fixture(autouse=True)
def poison_workspace(monkeypatch):
    monkeypatch.setattr(kcommon, "POISON_WORKSPACE", True)


def _max_row(p):
    crow = p.tensors["crow_indices"]
    return int((crow[1:] - crow[:-1]).max())


def _run(p, x, b=None, config=None):
    t = p.tensors
    out = torch.full((x.numel() // x.shape[-1], p.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    return bsr_matmul(x, t["crow_indices"], t["col_indices"], t["values"], _max_row(p), b, config=config,
                      out=out)


def _check(m, n, k, blk, density, dtype, bias, gen, lead=()):
    dev = device()
    p = random_bsr(n, k, blk, density, dtype, dev, gen)
    x = torch.randn(*lead, m, k, generator=gen).to(dtype).to(dev)
    b = torch.randn(n, generator=gen).to(dtype).to(dev) if bias else None
    y = _run(p, x, b)
    ref = x.double() @ formats.unpack(p).double().T + (b.double() if bias else 0)
    assert y.shape == (*lead, m, n)
    assert rel_err(y, ref) < TOL[dtype], (m, n, k, blk, density, dtype, bias)


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("m", M_VALUES)
def test_m_sweep(m, dtype):
    _check(m, 96, 160, 16, 0.5, dtype, bias=(m % 2 == 0), gen=torch.Generator().manual_seed(m))


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("blk", [16, 32, 64, 128])
def test_block_sizes_and_densities(blk, density):
    n, k = (2 * blk, 3 * blk) if blk < 128 else (128, 256)
    _check(3, n, k, blk, density, torch.float16, bias=True, gen=torch.Generator().manual_seed(blk))
    _check(33, n, k, blk, density, torch.float32, bias=False, gen=torch.Generator().manual_seed(blk + 1))


@pytest.mark.parametrize("m", [1, 3])
def test_whole_rows_config_needs_no_segment_reduce(m):
    """WHOLE_ROWS: one program per block-row (one launch, direct store); uneven rows and an empty one."""
    gen = torch.Generator().manual_seed(21 + m)
    p = random_bsr(96, 160, 16, 0.5, torch.float16, device(), gen)
    x = torch.randn(m, 160, generator=gen).half().to(device())
    b = torch.randn(96, generator=gen).half().to(device())
    cfg = dict(BLOCK_M=1 if m == 1 else 4, UNROLL=2, USE_DOT=False, WHOLE_ROWS=True)
    ref = x.double() @ formats.unpack(p).double().T + b.double()
    assert rel_err(_run(p, x, b, config=cfg), ref) < TOL[torch.float16]
    assert any(c.get("WHOLE_ROWS") for c in candidate_configs(1, 64))


def test_3d_and_non_contiguous_input():
    gen = torch.Generator().manual_seed(11)
    dev = device()
    p = random_bsr(64, 96, 32, 0.5, torch.float32, dev, gen)
    x3 = torch.randn(2, 5, 96, generator=gen).to(dev)
    ref = x3.double() @ formats.unpack(p).double().T
    assert rel_err(_run(p, x3), ref) < TOL[torch.float32]
    xt = torch.randn(96, 7, generator=gen).to(dev).T
    assert not xt.is_contiguous()
    assert rel_err(_run(p, xt), xt.double() @ formats.unpack(p).double().T) < TOL[torch.float32]


def test_reference_uses_torch_bsr():
    gen = torch.Generator().manual_seed(2)
    p = random_bsr(64, 64, 16, 0.5, torch.float32, "cpu", gen)
    t = p.tensors
    assert torch.equal(bsr_dense_ref(t["crow_indices"], t["col_indices"], t["values"], 64), formats.unpack(p))
    x = torch.randn(4, 64, generator=gen)
    assert rel_err(bsr_matmul_ref(x, t["crow_indices"], t["col_indices"], t["values"]),
                   x.double() @ formats.unpack(p).double().T) < 1e-12


def test_bad_inputs_raise_clear_errors():
    p = random_bsr(32, 32, 16, 1.0, torch.float32, device(), torch.Generator().manual_seed(0))
    t = p.tensors
    x = torch.randn(2, 32, device=device())
    with pytest.raises(TypeError, match="int32"):
        bsr_matmul(x, t["crow_indices"].long(), t["col_indices"], t["values"], 2)
    with pytest.raises(TypeError, match="dtype"):
        bsr_matmul(x.half(), t["crow_indices"], t["col_indices"], t["values"], 2)
    with pytest.raises(ValueError, match="multiple of the block size"):
        bsr_matmul(torch.randn(2, 40, device=device()), t["crow_indices"], t["col_indices"], t["values"], 2)
    with pytest.raises(RuntimeError, match=f"bsr_matmul: col is on meta, the input on {device()}"):
        bsr_matmul(x, t["crow_indices"], t["col_indices"].to("meta"), t["values"], 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 16, 64, 129, 2048])
@pytest.mark.parametrize("blk", [16, 32, 64, 128])
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_every_candidate_config_on_gpu(m, blk, density, dtype):
    n, k = 4096, 2048
    gen = torch.Generator().manual_seed(m + blk)
    p = random_bsr(n, k, blk, density, dtype, "cuda", gen)
    t = p.tensors
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda()
    ref = bsr_matmul_ref(x, t["crow_indices"], t["col_indices"], t["values"], b)
    for cfg in candidate_configs(m, blk):
        assert rel_err(_run(p, x, b, config=cfg), ref) < TOL[dtype], cfg
    assert rel_err(_run(p, x, b), ref) < TOL[dtype]


@pytest.mark.parametrize("where", ["x", "out"])
def test_row_offsets_past_2_31(where):
    """As for 2:4: row offsets past 2**31 elements (a long prefill) wrapped in int32."""
    dev, dt, m, n, k = device(), torch.float16, 129, 64, 96
    p = random_bsr(n, k, 32, 0.5, dt, dev, torch.Generator().manual_seed(0))
    bias = torch.randn(n, dtype=dt, device=dev)
    xs = torch.randn(m, k, dtype=dt, device=dev)
    t = p.tensors
    if where == "x":
        x = rows_past_2_31(m, k, dt, dev)
        x.copy_(xs)
        y = bsr_matmul(x, t["crow_indices"], t["col_indices"], t["values"], _max_row(p), bias)
    else:
        y = rows_past_2_31(m, n, dt, dev)
        y.fill_(float("nan"))
        bsr_matmul(xs, t["crow_indices"], t["col_indices"], t["values"], _max_row(p), bias, out=y)
    ref = bsr_matmul_ref(xs, t["crow_indices"], t["col_indices"], t["values"], bias)
    assert rel_err(y[-1:], ref[-1:]) < TOL[dt] and rel_err(y, ref) < TOL[dt]
