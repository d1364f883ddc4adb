"""BSR format: identical to torch.Tensor.to_sparse_bsr((B, B)) on the masked matrix, plus the refusals."""
import pytest
import torch

from sparserun import formats
from sparserun.formats import PatternViolation, UnsupportedShape, bsr


def block_mask(n, k, b, keep):
    return keep.repeat_interleave(b, 0).repeat_interleave(b, 1)


def random_weight(n, k, dtype, gen):
    # never zero: so the masked matrix's nonzero blocks are exactly the kept blocks, as torch sees them
    w = torch.rand(n, k, generator=gen) + 0.5
    return (w * torch.where(torch.rand(n, k, generator=gen) < 0.5, -1.0, 1.0)).to(dtype)


def assert_same_as_torch(w, mask, b):
    p = bsr.pack(w, mask, b, "lin")
    ref = torch.where(mask, w, torch.zeros((), dtype=w.dtype)).to_sparse_bsr((b, b))
    assert p.tensors["crow_indices"].dtype == torch.int32 and p.tensors["col_indices"].dtype == torch.int32
    assert torch.equal(p.tensors["crow_indices"].long(), ref.crow_indices())
    assert torch.equal(p.tensors["col_indices"].long(), ref.col_indices())
    assert torch.equal(p.tensors["values"], ref.values())
    assert torch.equal(bsr.unpack(p), ref.to_dense())
    assert torch.equal(bsr.mask(p), mask)
    bsr.validate(p, "lin")
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b, n, k, density", [(16, 48, 80, 0.4), (32, 96, 64, 0.5), (64, 128, 192, 0.3),
                                              (128, 128, 256, 0.5), (16, 16, 16, 1.0)])
def test_matches_torch_to_sparse_bsr(b, n, k, density, dtype, gen):
    keep = torch.rand(n // b, k // b, generator=gen) < density
    assert_same_as_torch(random_weight(n, k, dtype, gen), block_mask(n, k, b, keep), b)


def test_empty_block_rows_match_torch(gen):
    b, n, k = 16, 80, 48
    keep = torch.rand(n // b, k // b, generator=gen) < 0.7
    keep[0] = False
    keep[2] = False
    keep[-1] = False  # trailing empty rows: crow must repeat nnz at the end
    keep[1] = True
    p = assert_same_as_torch(random_weight(n, k, torch.float32, gen), block_mask(n, k, b, keep), b)
    crow = p.tensors["crow_indices"].tolist()
    assert crow[0] == 0 and crow[1] == 0 and crow[-1] == crow[-2] == p.tensors["col_indices"].numel()


def test_fully_dense_and_fully_empty_match_torch(gen):
    b, n, k = 32, 64, 96
    w = random_weight(n, k, torch.float32, gen)
    full = assert_same_as_torch(w, torch.ones(n, k, dtype=torch.bool), b)
    assert full.tensors["values"].shape == (6, b, b)
    empty = assert_same_as_torch(w, torch.zeros(n, k, dtype=torch.bool), b)
    assert empty.tensors["values"].shape == (0, b, b)
    assert empty.tensors["crow_indices"].tolist() == [0, 0, 0]
    assert bsr.nbytes(empty) == 4 * 3


def test_kept_block_of_zeros_is_kept(gen):
    # torch drops an all-zero block; we keep it because the mask (not the values) decides
    b, n, k = 16, 32, 32
    w = random_weight(n, k, torch.float32, gen)
    w[:16, 16:] = 0.0
    w[0, 16] = -0.0
    mask = torch.ones(n, k, dtype=torch.bool)
    p = bsr.pack(w, mask, b)
    assert p.tensors["values"].shape[0] == 4
    assert torch.equal(bsr.mask(p), mask)
    out = bsr.unpack(p)
    assert torch.equal(out, w) and torch.signbit(out[0, 16])


@pytest.mark.parametrize("n, k", [(48, 40), (40, 48), (17, 32)])
def test_shape_not_divisible_is_unsupported(n, k, gen):
    w = random_weight(n, k, torch.float32, gen)
    with pytest.raises(UnsupportedShape, match=rf"layer\.fc: shape {n}x{k} is not divisible by the 16x16"):
        formats.pack(w, torch.ones(n, k, dtype=torch.bool), "16x16", name="layer.fc")


def test_partial_block_names_rows_and_columns(gen):
    b, n, k = 16, 32, 64
    keep = torch.zeros(n // b, k // b, dtype=torch.bool)
    keep[1, 2] = True
    mask = block_mask(n, k, b, keep)
    mask[20, 33] = False
    with pytest.raises(PatternViolation, match=r"enc\.q: 16x16 pattern violated: block at rows 16\.\.31, "
                                               r"columns 32\.\.47 is partly kept \(255 of 256"):
        formats.pack(random_weight(n, k, torch.float32, gen), mask, "16x16", name="enc.q")


def test_nbytes_tracks_density(gen):
    b, n, k = 32, 256, 512
    keep = torch.rand(n // b, k // b, generator=gen) < 0.5
    p = formats.pack(random_weight(n, k, torch.float16, gen), block_mask(n, k, b, keep), "32x32")
    nnz = int(keep.sum())
    assert p.nbytes() == nnz * b * b * 2 + 4 * (nnz + n // b + 1)
    density = nnz / keep.numel()
    assert p.nbytes() / p.dense_nbytes() == pytest.approx(density, abs=0.01)
    assert p.meta == {"block": 32, "pattern": "32x32"}


def test_unsupported_dtype_and_non_finite(gen):
    w = random_weight(32, 32, torch.float32, gen)
    mask = torch.ones(32, 32, dtype=torch.bool)
    with pytest.raises(TypeError, match="unsupported dtype torch.float64"):
        bsr.pack(w.double(), mask, 16)
    w[5, 30] = float("inf")
    with pytest.raises(ValueError, match="non-finite value inf at row 5, column 30"):
        bsr.pack(w, mask, 16)


def test_validate_rejects_bad_packings(gen):
    b, n, k = 16, 48, 64
    keep = torch.rand(n // b, k // b, generator=gen) < 0.6
    keep[0, :2] = True
    p = bsr.pack(random_weight(n, k, torch.float32, gen), block_mask(n, k, b, keep), b)

    def variant(**t):
        return formats.Packed("bsr", p.shape, {**p.tensors, **t}, dict(p.meta))

    with pytest.raises(ValueError, match="indices must be int32"):
        bsr.validate(variant(col_indices=p.tensors["col_indices"].long()))
    with pytest.raises(ValueError, match="crow_indices shape"):
        bsr.validate(variant(crow_indices=p.tensors["crow_indices"][:-1]))
    col = p.tensors["col_indices"].clone()
    col[0], col[1] = col[1].item(), col[0].item()  # block-row 0 starts with two kept blocks: now decreasing
    with pytest.raises(ValueError, match="not strictly increasing"):
        bsr.validate(variant(col_indices=col))
    col = p.tensors["col_indices"].clone()
    col[-1] = k // b
    with pytest.raises(ValueError, match="out of range"):
        bsr.validate(variant(col_indices=col))
    crow = p.tensors["crow_indices"].clone()
    crow[-1] += 1
    with pytest.raises(ValueError, match="rise from 0 to nnz"):
        bsr.validate(variant(crow_indices=crow))
    with pytest.raises(ValueError, match="block size"):
        bsr.validate(formats.Packed("bsr", p.shape, p.tensors, {"block": 8}))
