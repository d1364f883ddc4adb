"""Bitmask format (unstructured, N:M other than 2:4): exact round trip, bit layout, sizes, refusals."""
import pytest
import torch

from sparserun import formats
from sparserun.formats import PatternViolation, bitmask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, keep", [(1, 1, 1.0), (3, 13, 0.5), (17, 64, 0.1), (8, 9, 0.0), (5, 24, 0.9)])
def test_round_trip_exact(n, k, keep, dtype, gen):
    w = (torch.randn(n, k, generator=gen) + 0.05).to(dtype)
    mask = torch.rand(n, k, generator=gen) < keep
    p = bitmask.pack(w, mask, "lin")
    assert p.tensors["bitmask"].shape == (n, (k + 7) // 8) and p.tensors["bitmask"].dtype == torch.uint8
    assert torch.equal(p.tensors["values"], w[mask])  # row-major order of the kept weights
    assert torch.equal(bitmask.mask(p), mask)
    assert torch.equal(bitmask.unpack(p), torch.where(mask, w, torch.zeros((), dtype=dtype)))
    bitmask.validate(p, "lin")


def test_bit_layout_lsb_first():
    w = torch.arange(1, 11, dtype=torch.float32).view(1, 10)
    mask = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    p = bitmask.pack(w, mask)
    assert p.tensors["bitmask"].tolist() == [[0b10001001, 0b10]]  # columns 0, 3, 7 | 9; bits past K are 0
    assert p.tensors["values"].tolist() == [1.0, 4.0, 8.0, 10.0]


def test_negative_zero_kept(gen):
    w = torch.randn(2, 8, generator=gen)
    w[1, 3] = -0.0
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, 3] = mask[0, 0] = True
    out = bitmask.unpack(bitmask.pack(w, mask))
    assert torch.signbit(out[1, 3]) and bitmask.mask(bitmask.pack(w, mask))[1, 3]


def test_nbytes_half_sparse_fp16(gen):
    n, k = 32, 128
    idx = torch.rand(n, k, generator=gen).argsort(dim=1)[:, : k // 2]
    mask = torch.zeros(n, k, dtype=torch.bool).scatter_(1, idx, True)  # exactly half per row
    p = bitmask.pack(torch.randn(n, k, generator=gen, dtype=torch.float16), mask)
    assert int(mask.sum()) == n * k // 2
    assert p.nbytes() == 0.5625 * p.dense_nbytes() == bitmask.nbytes(p)


def test_nm_patterns_use_bitmask_and_check_groups(gen):
    w = torch.randn(6, 20, generator=gen)
    idx = torch.rand(6, 5, 4, generator=gen).argsort(-1)[..., :1]  # 1:4
    mask = torch.zeros(6, 5, 4, dtype=torch.bool).scatter_(-1, idx, True).view(6, 20)
    p = formats.pack(w, mask, "1:4")
    assert p.format == "bitmask" and p.meta["pattern"] == "1:4"
    assert torch.equal(formats.unpack(p), torch.where(mask, w, torch.zeros(())))
    mask[4, 12:14] = True
    with pytest.raises(PatternViolation, match=r"mlp\.fc1: 1:4 pattern violated at row 4, columns 12\.\.15"):
        formats.pack(w, mask, "1:4", name="mlp.fc1")
    # 4:8 with K = 20 (last group padded)
    m8 = torch.zeros(6, 20, dtype=torch.bool)
    m8[:, 16:20] = True
    formats.pack(w, m8, "4:8")
    m8[0, 8:13] = True  # 5 kept in the group of columns 8..15
    with pytest.raises(PatternViolation, match=r"4:8 pattern violated at row 0, columns 8\.\.15"):
        formats.pack(w, m8, "4:8")


def test_unknown_pattern_and_bad_inputs(gen):
    w = torch.randn(4, 8, generator=gen)
    with pytest.raises(ValueError, match="unknown sparsity pattern '3x3'"):
        formats.pack(w, torch.ones(4, 8, dtype=torch.bool), "3x3")
    with pytest.raises(TypeError, match="unsupported dtype torch.int64"):
        bitmask.pack(torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.bool))
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite value nan at row 1, column 1"):
        formats.pack(w, torch.ones(4, 8, dtype=torch.bool), "unstructured", name="x")


def test_validate_rejects_bad_packings(gen):
    w = torch.randn(3, 11, generator=gen)
    mask = torch.rand(3, 11, generator=gen) < 0.5
    mask[0, 0] = True
    p = bitmask.pack(w, mask)
    with pytest.raises(ValueError, match="set bits but"):
        bitmask.validate(formats.Packed("bitmask", p.shape, {**p.tensors, "values": p.tensors["values"][1:]}))
    bits = p.tensors["bitmask"].clone()
    bits[2, 1] |= 0b10000000  # column 15 > K = 11
    with pytest.raises(ValueError, match="bits past column 11"):
        bitmask.validate(formats.Packed("bitmask", p.shape, {**p.tensors, "bitmask": bits}))
    with pytest.raises(ValueError, match="must be uint8"):
        bitmask.validate(formats.Packed("bitmask", p.shape, {**p.tensors, "bitmask": bits.int()}))
    with pytest.raises(ValueError, match="unknown packed format 'csr'"):
        formats.validate(formats.Packed("csr", p.shape, p.tensors))
