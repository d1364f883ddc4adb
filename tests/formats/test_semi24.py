"""2:4 format: exact round trip from an explicit mask, byte layout, sizes, and every refusal."""
import pytest
import torch

from sparserun import formats
from sparserun.formats import PatternViolation, semi24

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_24_mask(n, k, gen, drop=0.2):
    """2 of every 4 kept, then ~drop of the kept entries dropped (groups with 0 or 1 kept occur too)."""
    kp = (k + 3) // 4 * 4
    score = torch.rand(n, kp // 4, 4, generator=gen)
    m = torch.zeros(n, kp // 4, 4, dtype=torch.bool).scatter_(-1, score.argsort(-1)[..., :2], True)
    m &= torch.rand(n, kp // 4, 4, generator=gen) >= drop
    return m.view(n, kp)[:, :k].contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(1, 4), (3, 5), (17, 13), (8, 6), (64, 132), (5, 1)])
def test_round_trip_exact(n, k, dtype, gen):
    w = (torch.randn(n, k, generator=gen) + 0.1).to(dtype)
    mask = random_24_mask(n, k, gen)
    p = semi24.pack(w, mask)
    assert p.format == "semi24" and p.shape == (n, k)
    kp = (k + 3) // 4 * 4
    assert p.tensors["values"].shape == (n, kp // 2) and p.tensors["values"].dtype == dtype
    assert p.tensors["meta"].shape == (n, (kp // 4 + 1) // 2) and p.tensors["meta"].dtype == torch.uint8
    semi24.validate(p)
    out = semi24.unpack(p)
    assert out.dtype == dtype and out.shape == (n, k)
    assert torch.equal(out, torch.where(mask, w, torch.zeros((), dtype=dtype)))
    got = semi24.mask(p)
    assert bool((got | ~mask).all()), "packed mask must contain the original mask"
    # the stored mask is always a full 2:4 mask (filler positions included) on whole groups
    full = got[:, : k // 4 * 4].reshape(n, -1, 4).sum(-1)
    assert bool((full == 2).all())


def test_kept_zero_and_negative_zero_are_kept(gen):
    w = torch.randn(2, 8, generator=gen)
    w[0, 1], w[1, 6] = 0.0, -0.0
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [1, 3, 4, 5]] = True
    mask[1, [0, 2, 6, 7]] = True
    p = semi24.pack(w, mask)
    out = semi24.unpack(p)
    assert torch.equal(semi24.mask(p), mask)  # the zeros are positions of the mask, not inferred
    assert out[0, 1] == 0 and not torch.signbit(out[0, 1])
    assert out[1, 6] == 0 and torch.signbit(out[1, 6]), "-0.0 must survive the round trip bit-exactly"
    assert torch.equal(out.view(torch.int32), torch.where(mask, w, torch.zeros(())).view(torch.int32))


def test_byte_layout_documented_in_format_md():
    # row 0: group 0 keeps positions (0, 2), group 1 keeps (1, 3), group 2 keeps (2, 3): G = 3 is odd
    w = torch.arange(1, 13, dtype=torch.float16).view(1, 12)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1, 1]], dtype=torch.bool)
    p = semi24.pack(w, mask)
    assert p.tensors["values"].tolist() == [[1.0, 3.0, 6.0, 8.0, 11.0, 12.0]]
    nib = [0 | 2 << 2, 1 | 3 << 2, 2 | 3 << 2]
    pad = 0 | 1 << 2  # the high nibble of the last byte when G is odd
    assert p.tensors["meta"].tolist() == [[nib[0] | nib[1] << 4, nib[2] | pad << 4]]


def test_filler_positions_for_groups_keeping_fewer_than_two():
    w = torch.tensor([[5.0, 6.0, 7.0, 8.0, 1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    p = semi24.pack(w, mask)
    # group 0 keeps position 2 -> stored pair (0, 2) with +0.0 at 0; group 1 keeps nothing -> (0, 1), zeros
    assert p.tensors["values"].tolist() == [[0.0, 7.0, 0.0, 0.0]]
    assert semi24.positions(p).tolist() == [[[0, 2], [0, 1]]]
    assert torch.equal(semi24.unpack(p), torch.where(mask, w, torch.zeros(())))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_nbytes_ratio(dtype, gen):
    n, k = 64, 256
    p = semi24.pack(torch.randn(n, k, generator=gen).to(dtype), random_24_mask(n, k, gen, drop=0))
    esize = torch.empty((), dtype=dtype).element_size()
    assert p.nbytes() == n * k // 2 * esize + n * k // 8 == semi24.nbytes(p)
    assert p.dense_nbytes() == n * k * esize
    if esize == 2:
        assert p.nbytes() == 0.5625 * p.dense_nbytes()


def test_violation_names_layer_row_and_columns(gen):
    w = torch.randn(4, 12, generator=gen)
    mask = random_24_mask(4, 12, gen, drop=0)
    mask[2, 4:8] = torch.tensor([True, True, True, False])
    with pytest.raises(PatternViolation, match=r"layers\.3\.mlp\.up_proj: 2:4 pattern violated at row 2, columns 4\.\.7"):
        formats.pack(w, mask, "2:4", name="layers.3.mlp.up_proj")


def test_violation_in_padded_last_group(gen):
    w = torch.randn(2, 7, generator=gen)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:7] = True  # 3 kept in the last (padded) group
    with pytest.raises(PatternViolation, match="row 1, columns 4..7"):
        semi24.pack(w, mask, "q")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8])
def test_unsupported_dtype(dtype):
    w = (torch.arange(32).view(4, 8) % 5 + 1).to(dtype)
    with pytest.raises(TypeError, match=f"lin: unsupported dtype {dtype}"):
        semi24.pack(w, torch.ones(4, 8, dtype=torch.bool), "lin")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight(bad, gen):
    w = torch.randn(4, 8, generator=gen)
    w[3, 5] = bad
    mask = random_24_mask(4, 8, gen, drop=0)
    with pytest.raises(ValueError, match=r"fc: non-finite value .* at row 3, column 5"):
        formats.pack(w, mask, "2:4", name="fc")


def test_mask_must_be_bool_and_same_shape(gen):
    w = torch.randn(4, 8, generator=gen)
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        semi24.pack(w, (w.abs() > 0.5).float())
    with pytest.raises(ValueError, match="mask shape"):
        semi24.pack(w, torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        semi24.pack(w[0], torch.ones(8, dtype=torch.bool))


def test_validate_rejects_bad_packings(gen):
    w = torch.randn(4, 10, generator=gen)
    p = semi24.pack(w, random_24_mask(4, 10, gen))
    bad = formats.Packed("semi24", p.shape, dict(p.tensors))
    bad.tensors["meta"] = p.tensors["meta"].clone()
    bad.tensors["meta"][1, 0] = (bad.tensors["meta"][1, 0] & 0xF0) | (3 | 1 << 2)  # positions (3, 1)
    with pytest.raises(ValueError, match="row 1, group 0 has positions"):
        semi24.validate(bad, "x")
    short = formats.Packed("semi24", p.shape, {"values": p.tensors["values"][:, :-2], "meta": p.tensors["meta"]})
    with pytest.raises(ValueError, match="values shape"):
        semi24.validate(short)
    with pytest.raises(ValueError, match="needs tensors"):
        semi24.validate(formats.Packed("semi24", p.shape, {"values": p.tensors["values"]}))
    # a nonzero value stored in a padding column (K = 10 -> columns 10, 11 are padding)
    pad = formats.Packed("semi24", p.shape, {"values": p.tensors["values"].clone(),
                                             "meta": p.tensors["meta"].clone()})
    pad.tensors["meta"][0, 1] = (pad.tensors["meta"][0, 1] & 0xF0) | (2 | 3 << 2)  # group 2: cols 10, 11
    pad.tensors["values"][0, 4:6] = 1.5
    with pytest.raises(ValueError, match="padding past column 10"):
        semi24.validate(pad)
    nan = formats.Packed("semi24", p.shape, {"values": p.tensors["values"].clone(), "meta": p.tensors["meta"]})
    nan.tensors["values"][2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        semi24.validate(nan)


def test_packs_on_device_of_input(gen):
    # pure torch: whatever device the weight is on (CPU here; the same code runs on CUDA)
    w = torch.randn(8, 16, generator=gen, dtype=torch.float16)
    p = formats.pack(w, random_24_mask(8, 16, gen), "2:4")
    assert p.tensors["values"].device == w.device and p.meta["pattern"] == "2:4"
    assert torch.equal(formats.unpack(p.to("cpu")), formats.unpack(p))
