"""2:4 Triton kernel against a float64 reference (CPU interpreter in CI, the same tests on a GPU)."""
import pytest
import torch

import sparserun.kernels._common as kcommon
from sparserun import formats
from sparserun.kernels.semi24_matmul import (candidate_configs, semi24_matmul, semi24_matmul_ref,
                                             semi24_unpack_ref, units_ok)

from ._data import TOL, device, dtypes, random_24, rel_err, rows_past_2_31

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
    # a pointer from another device is not an error Triton reports: a launch would read garbage or fault
    with pytest.raises(RuntimeError, match=f"semi24_matmul: values is on meta, the input on {device()}"):
        semi24_matmul(x, v.to("meta"), meta, 16)
    with pytest.raises(RuntimeError, match="bias is on meta"):
        semi24_matmul(x, v, meta, 16, torch.randn(8, device="meta"))


# ---- the unit GEMV (16-bit, K % 8 == 0, M <= 4): no tl.dot, so bf16 runs under the interpreter too ----------
def _unit_cfg(m, bu, split, bn=16):
    return dict(BLOCK_M=min(4, 1 << (m - 1).bit_length()), BLOCK_N=bn, BLOCK_U=bu, SPLIT_K=split, UNITS=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k,bu", [(48, 80, 4), (33, 256, 8), (16, 64, 8)])  # uneven K steps; odd N; even both
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_unit_gemv_matches_float64_reference(m, n, k, bu, dtype):
    gen = torch.Generator().manual_seed(31 * m + n + k)
    dev = device()
    p = random_24(n, k, dtype, dev, gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(dev)
    b = torch.randn(n, generator=gen).to(dtype).to(dev)
    ref = x.double() @ formats.unpack(p).double().T
    for split, bias in ((1, True), (3, False), (2, True)):
        out = torch.full((m, n), float("nan"), dtype=dtype, device=dev)
        y = semi24_matmul(x, p.tensors["values"], p.tensors["meta"], k, b if bias else None,
                          config=_unit_cfg(m, bu, split), out=out)
        assert rel_err(y, ref + (b.double() if bias else 0)) < TOL[dtype], (m, n, k, split, bias)


@pytest.mark.parametrize("layout", ["offset", "transposed", "row_stride"])
def test_unit_gemv_inputs_not_made_of_whole_words(layout):
    """x whose rows are not aligned 64-bit words (a column slice, a transpose, a row stride not a multiple of
    4) is copied, not misread."""
    gen = torch.Generator().manual_seed(11)
    dev = device()
    n, k, m = 24, 64, 3
    p = random_24(n, k, torch.float16, dev, gen)
    if layout == "offset":
        x = torch.randn(m, k + 1, generator=gen).half().to(dev)[:, 1:]
    elif layout == "transposed":
        x = torch.randn(k, m, generator=gen).half().to(dev).T
    else:
        x = torch.randn(m, k + 2, generator=gen).half().to(dev)[:, :k]
    y = semi24_matmul(x, p.tensors["values"], p.tensors["meta"], k, config=_unit_cfg(m, 4, 2))
    assert rel_err(y, x.double() @ formats.unpack(p).double().T) < TOL[torch.float16]


def test_unit_gemv_refuses_what_it_cannot_read():
    p = random_24(8, 20, torch.float16, device(), torch.Generator().manual_seed(2))  # K = 20: not 8 | K
    x = torch.randn(1, 20, device=device()).half()
    with pytest.raises(ValueError, match="in_features % 8 == 0"):
        semi24_matmul(x, p.tensors["values"], p.tensors["meta"], 20, config=_unit_cfg(1, 4, 1))
    assert not units_ok(20, torch.float16) and not units_ok(64, torch.float32) and units_ok(64, torch.bfloat16)
    assert not any(c.get("UNITS") for c in candidate_configs(1, 64, 20, 132, torch.float16))
    assert any(c.get("UNITS") for c in candidate_configs(1, 64, 64, 132, torch.bfloat16))
    assert not any(c.get("UNITS") for c in candidate_configs(16, 64, 64, 132, torch.bfloat16))


# ---- dot tiles with the weight built as 32-bit words (16-bit weights, a few to 64 tokens) --------------------
@pytest.mark.parametrize("n,k", [(48, 80), (33, 130), (64, 256)])  # uneven K steps, padded K, odd N; even
@pytest.mark.parametrize("m", [1, 5, 16, 33])
def test_word_built_dot_tiles_match_float64_reference(m, n, k):
    gen = torch.Generator().manual_seed(7 * m + n + k)
    dev = device()
    p = random_24(n, k, torch.float16, dev, gen)  # fp16: tl.dot in bf16 is wrong under the interpreter
    x = torch.randn(m, k, generator=gen).half().to(dev)
    b = torch.randn(n, generator=gen).half().to(dev)
    ref = x.double() @ formats.unpack(p).double().T
    for cfg in (dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=16, BLOCK_K=64, SPLIT_K=2, WORDS=True),
                dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, WORDS=True)):
        for bias in (True, False):
            out = torch.full((m, n), float("nan"), dtype=torch.float16, device=dev)
            y = semi24_matmul(x, p.tensors["values"], p.tensors["meta"], k, b if bias else None, config=cfg,
                              out=out)
            assert rel_err(y, ref + (b.double() if bias else 0)) < TOL[torch.float16], (m, n, k, cfg, bias)


def test_word_built_dot_tiles_take_non_contiguous_x_and_refuse_fp32():
    gen = torch.Generator().manual_seed(9)
    dev = device()
    p = random_24(24, 64, torch.float16, dev, gen)
    x = torch.randn(64, 6, generator=gen).half().to(dev).T  # strides (1, 6)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1, WORDS=True)
    y = semi24_matmul(x, p.tensors["values"], p.tensors["meta"], 64, config=cfg)
    assert rel_err(y, x.double() @ formats.unpack(p).double().T) < TOL[torch.float16]
    p32 = random_24(24, 64, torch.float32, dev, gen)
    with pytest.raises(ValueError, match="word-built dot tiles need float16/bfloat16"):
        semi24_matmul(torch.randn(2, 64, device=dev), p32.tensors["values"], p32.tensors["meta"], 64, config=cfg)
    assert any(c.get("WORDS") for c in candidate_configs(16, 64, 64, 132, torch.float16))
    assert not any(c.get("WORDS") for c in candidate_configs(16, 64, 64, 132, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 4, 16, 64, 129, 2048])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (4096, 14336), (4099, 1030), (4099, 1032)])
def test_every_candidate_config_on_gpu(m, n, k, dtype):
    gen = torch.Generator().manual_seed(m + n)
    p = random_24(n, k, dtype, "cuda", gen)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda()
    ref = semi24_matmul_ref(x, p.tensors["values"], p.tensors["meta"], k, b)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for cfg in candidate_configs(max(m, 1), n, k, sms, dtype):
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        y = semi24_matmul(x, p.tensors["values"], p.tensors["meta"], k, b, config=cfg, out=out)
        assert rel_err(y, ref) < TOL[dtype], cfg
    # and the tuned path
    assert rel_err(semi24_matmul(x, p.tensors["values"], p.tensors["meta"], k, b), ref) < TOL[dtype]


@pytest.mark.parametrize("where", ["x", "out"])
def test_row_offsets_past_2_31(where):
    """offs_m * stride was an int32 product: past 2**31 elements it wrapped (a segfault on the CPU, a wild
    address on a GPU). The tiled paths now form row offsets in int64."""
    dev, dt, m, n, k = device(), torch.float16, 129, 48, 80
    p = random_24(n, k, dt, dev, torch.Generator().manual_seed(0))
    bias = torch.randn(n, dtype=dt, device=dev)
    xs = torch.randn(m, k, dtype=dt, device=dev)
    if where == "x":
        x = rows_past_2_31(m, k, dt, dev)
        x.copy_(xs)
        y = semi24_matmul(x, p.tensors["values"], p.tensors["meta"], k, bias)
    else:
        y = rows_past_2_31(m, n, dt, dev)
        y.fill_(float("nan"))
        semi24_matmul(xs, p.tensors["values"], p.tensors["meta"], k, bias, out=y)
    ref = semi24_matmul_ref(xs, p.tensors["values"], p.tensors["meta"], k, bias)
    assert rel_err(y[-1:], ref[-1:]) < TOL[dt] and rel_err(y, ref) < TOL[dt]
