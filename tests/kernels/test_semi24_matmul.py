"""2:4 Triton kernel against a float64 reference (CPU interpreter in CI, the same tests on a GPU)."""
import pytest
import torch

import sparserun.kernels._common as kcommon
from sparserun import formats
from sparserun.kernels.semi24_matmul import (candidate_configs, semi24_matmul, semi24_matmul_ref,
                                             semi24_unpack_ref)

from ._data import TOL, device, dtypes, random_24, rel_err

M_VALUES = [1, 2, 3, 7, 16, 33, 64, 129]
SHAPES = [(48, 80), (33, 130), (160, 256)]  # N, K: odd N, K not a multiple of the tile (130: padded)


@pytest.fixture(autouse=True)
def poison_workspace(monkeypatch):
    monkeypatch.setattr(kcommon, "POISON_WORKSPACE", True)


def _check(m, n, k, dtype, bias, gen, lead=()):
    dev = device()
    p = random_24(n, k, dtype, dev, gen)
    vals, meta = p.tensors["values"], p.tensors["meta"]
    x = torch.randn(*lead, m, k, generator=gen).to(dtype).to(dev)
    b = torch.randn(n, generator=gen).to(dtype).to(dev) if bias else None
    out = torch.full((x.numel() // k, n), float("nan"), dtype=dtype, device=dev)
    y = semi24_matmul(x, vals, meta, k, b, out=out)
    ref = x.double() @ formats.unpack(p).double().T + (b.double() if bias else 0)
    assert y.shape == (*lead, m, n)
    assert rel_err(y, ref) < TOL[dtype], (m, n, k, dtype, bias)


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", M_VALUES)
def test_matches_float64_reference(m, n, k, dtype):
    gen = torch.Generator().manual_seed(1000 * m + n + k)
    _check(m, n, k, dtype, bias=(m % 2 == 1), gen=gen)


@pytest.mark.parametrize("bias", [False, True])
def test_bias_on_off_and_3d_input(bias):
    _check(5, 40, 64, torch.float32, bias, torch.Generator().manual_seed(7), lead=(2,))


def test_non_contiguous_input():
    gen = torch.Generator().manual_seed(3)
    dev = device()
    p = random_24(24, 64, torch.float32, dev, gen)
    xt = torch.randn(64, 9, generator=gen).to(dev)
    x = xt.T  # [9, 64], column-major: strides (1, 9)
    assert not x.is_contiguous()
    y = semi24_matmul(x, p.tensors["values"], p.tensors["meta"], 64)
    assert rel_err(y, x.double() @ formats.unpack(p).double().T) < TOL[torch.float32]


def test_reference_matches_format_unpack():
    gen = torch.Generator().manual_seed(5)
    p = random_24(17, 70, torch.float16, "cpu", gen)
    assert torch.equal(semi24_unpack_ref(p.tensors["values"], p.tensors["meta"], 70), formats.unpack(p))
    x = torch.randn(3, 70, generator=gen).half()
    assert rel_err(semi24_matmul_ref(x, p.tensors["values"], p.tensors["meta"], 70),
                   x.double() @ formats.unpack(p).double().T) < 1e-12


def test_bad_inputs_raise_clear_errors():
    p = random_24(8, 16, torch.float32, device(), torch.Generator().manual_seed(0))
    v, meta = p.tensors["values"], p.tensors["meta"]
    x = torch.randn(2, 16, device=device())
    with pytest.raises(ValueError, match="in_features 20"):
        semi24_matmul(torch.randn(2, 20, device=device()), v, meta, 20)
    with pytest.raises(ValueError, match="last dim 12"):
        semi24_matmul(torch.randn(2, 12, device=device()), v, meta, 16)
    with pytest.raises(TypeError, match="dtype"):
        semi24_matmul(x.half(), v, meta, 16)
    with pytest.raises(ValueError, match="bias shape"):
        semi24_matmul(x, v, meta, 16, torch.randn(5, device=device()))
    with pytest.raises(ValueError, match="meta must be uint8"):
        semi24_matmul(x, v, meta.to(torch.int32), 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 16, 64, 129, 2048])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (4096, 14336), (4099, 1030)])
def test_every_candidate_config_on_gpu(m, n, k, dtype):
    gen = torch.Generator().manual_seed(m + n)
    p = random_24(n, k, dtype, "cuda", gen)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda()
    ref = semi24_matmul_ref(x, p.tensors["values"], p.tensors["meta"], k, b)
    for cfg in candidate_configs(max(m, 1), n, k, torch.cuda.get_device_properties(0).multi_processor_count):
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        y = semi24_matmul(x, p.tensors["values"], p.tensors["meta"], k, b, config=cfg, out=out)
        assert rel_err(y, ref) < TOL[dtype], cfg
    # and the tuned path
    assert rel_err(semi24_matmul(x, p.tensors["values"], p.tensors["meta"], k, b), ref) < TOL[dtype]
