"""sparsify_: which layers are swapped, with which mask, and what stays dense (and why)."""
import pytest
import torch
import torch.nn as nn

import sparserun
from sparserun.formats import PatternViolation
from sparserun.runtime.linear import SparseLinear
from sparserun.runtime.sparsify import magnitude_mask


class Toy(nn.Module):
    def __init__(self, gen, dtype=torch.float32):
        super().__init__()
        self.embed_proj = nn.Linear(12, 32)
        self.blocks = nn.ModuleList([nn.Linear(32, 64), nn.Linear(64, 32, bias=False), nn.Linear(32, 37)])
        self.odd = nn.Linear(37, 30)  # K = 37: 2:4 pads, blocks cannot hold it
        self.lm_head = nn.Linear(30, 11)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.to(dtype)

    def forward(self, x):
        x = self.embed_proj(x)
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.lm_head(self.odd(x))


def brute_nm_mask(w, n, m):
    rows, k = w.shape
    mask = torch.zeros_like(w, dtype=torch.bool)
    for r in range(rows):
        for g in range(0, k, m):
            grp = w[r, g:g + m].abs()
            for i in grp.argsort(descending=True)[:n]:
                mask[r, g + int(i)] = True
    return mask


@pytest.mark.parametrize("n, m, k", [(2, 4, 16), (2, 4, 13), (4, 8, 21), (1, 4, 9)])
def test_magnitude_nm_mask_matches_brute_force(n, m, k, gen):
    w = torch.randn(7, k, generator=gen)
    mask = magnitude_mask(w, f"{n}:{m}")
    assert torch.equal(mask, brute_nm_mask(w, n, m))


def test_magnitude_block_and_unstructured_masks(gen):
    """sparsify_'s masks are prune(method="magnitude")'s: blocks were ranked by L2 there and by L1 here, and
    picked different blocks of the same layer."""
    w = torch.randn(64, 96, generator=gen)
    mask = magnitude_mask(w, "32x32", sparsity=0.5)
    blocks = mask.view(2, 32, 3, 32)[:, 0, :, 0]
    assert int(blocks.sum()) == 3
    sums = w.abs().view(2, 32, 3, 32).sum(dim=(1, 3))  # the block score prune(method="magnitude") uses too
    assert sums[blocks].min() > sums[~blocks].max()
    assert torch.equal(mask, blocks.repeat_interleave(32, 0).repeat_interleave(32, 1))
    u = magnitude_mask(w, "unstructured", sparsity=0.75)
    assert int(u.sum()) == 64 * 96 // 4 and w.abs()[u].min() > w.abs()[~u].max()
    with pytest.raises(ValueError, match="needs a target sparsity"):
        magnitude_mask(w, "32x32")
    with pytest.raises(ValueError, match="so its sparsity is 0.5; got sparsity=0.7"):
        magnitude_mask(w, "2:4", sparsity=0.7)
    for bad in (1.5, 1.0, 0.0):  # 1.0 packed an all-zero layer and reported it "sparsified"
        with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
            magnitude_mask(w, "unstructured", sparsity=bad)


@pytest.mark.parametrize("pattern, sparsity, fmt", [("2:4", None, "semi24"), ("4:8", None, "bitmask"),
                                                    ("unstructured", 0.6, "bitmask"), ("32x32", 0.5, "bsr")])
def test_sparsify_matches_masked_dense(pattern, sparsity, fmt, gen):
    model = Toy(gen)
    ref = Toy(torch.Generator().manual_seed(0))
    ref.load_state_dict(model.state_dict())
    report = sparserun.sparsify_(model, pattern=pattern, sparsity=sparsity)
    by = {a.name: a for a in report}
    assert by["lm_head"].action == "skipped" and by["embed_proj"].action == "skipped"
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_proj, nn.Linear)
    expect_dense = {"blocks.2", "odd"} if fmt == "bsr" else set()  # 37 is not a multiple of 32
    assert {a.name for a in report.dense} == expect_dense
    for name in expect_dense:
        assert "not divisible by the 32x32 block size" in by[name].reason
        assert isinstance(model.get_submodule(name), nn.Linear)
    assert {a.name for a in report.sparsified} == {"blocks.0", "blocks.1", "blocks.2", "odd"} - expect_dense
    with torch.no_grad():
        for a in report.sparsified:
            lin = ref.get_submodule(a.name)
            lin.weight.mul_(magnitude_mask(lin.weight, pattern, sparsity))
            sl = model.get_submodule(a.name)
            assert isinstance(sl, SparseLinear) and sl.format == fmt and a.format == fmt
        x = torch.randn(5, 12, generator=gen)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    assert model.blocks[1].bias is None
    assert "sparsified" in report.summary()


def test_explicit_masks_keep_zero_weights_and_choose_layers(gen):
    model = Toy(gen)
    w = model.blocks[0].weight
    with torch.no_grad():
        w[0, :4] = torch.tensor([0.0, -0.0, 3.0, 4.0])
    mask = magnitude_mask(torch.randn(w.shape, generator=gen), "2:4")
    mask[0, :4] = torch.tensor([True, True, False, False])  # keep the two zeros, drop the big ones
    report = sparserun.sparsify_(model, "2:4", masks={"blocks.0": mask})
    assert [a.name for a in report.sparsified] == ["blocks.0"]
    assert all(a.action == "skipped" for a in report if a.name != "blocks.0")
    assert torch.equal(model.blocks[0].weight_mask(), mask)  # from the mask, never from weight != 0
    assert torch.signbit(model.blocks[0].dense_weight()[0, 1])


def test_mask_violation_names_layer_row_col(gen):
    model = Toy(gen)
    mask = torch.ones(64, 32, dtype=torch.bool)
    with pytest.raises(PatternViolation, match=r"blocks\.0: 2:4 pattern violated at row 0, columns 0\.\.3"):
        sparserun.sparsify_(model, "2:4", masks={"blocks.0": mask})
    with pytest.raises(ValueError, match=r"not nn.Linear \(or Conv1D\) modules of the model: blocks.9"):
        sparserun.sparsify_(model, "2:4", masks={"blocks.9": mask})


def test_a_refused_later_layer_leaves_every_layer_as_it_was(gen):
    """sparsify_ swapped layer after layer: a mask refused at blocks.2 left blocks.0 and blocks.1 packed."""
    model = Toy(gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {f"blocks.{i}": magnitude_mask(b.weight, "2:4") for i, b in enumerate(model.blocks)}
    for bad, err, match in ((masks["blocks.2"].float(), TypeError, "blocks.2: mask must be torch.bool"),
                            (masks["blocks.2"].tolist(), TypeError, "blocks.2: mask must be a torch.bool tensor, "
                                                                    "got list"),
                            (torch.ones(37, 32, dtype=torch.bool), PatternViolation, "blocks.2: 2:4 pattern")):
        with pytest.raises(err, match=match):
            sparserun.sparsify_(model, "2:4", masks={**masks, "blocks.2": bad})
        assert not any(isinstance(m, SparseLinear) for m in model.modules())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_from_packed_refuses_a_bias_or_pattern_that_does_not_fit(gen):
    lin = nn.Linear(64, 32)
    p = sparserun.formats.pack(lin.weight.detach(), magnitude_mask(lin.weight, "2:4"), "2:4")
    for bias in (torch.zeros(1), torch.zeros(5), torch.zeros(32, dtype=torch.int64), torch.zeros(32, device="meta")):
        with pytest.raises(ValueError, match=r"bias must be a floating tensor of shape \(32,\)"):
            SparseLinear.from_packed(p, bias)  # a [1] bias was broadcast over every output
    with pytest.raises(ValueError, match="pattern '4:8' is not stored as semi24"):
        SparseLinear.from_packed(sparserun.formats.Packed(p.format, p.shape, p.tensors, {"pattern": "4:8"}))
    s = SparseLinear.from_linear(lin, magnitude_mask(lin.weight, "2:4"), "2:4")
    with torch.no_grad():
        s.bias.add_(1.0)
    assert not torch.equal(s.bias, lin.bias)  # the source Linear's bias is not shared


def test_sparsifying_an_already_packed_model_again_says_nothing_changed(gen):
    model = Toy(gen)
    sparserun.sparsify_(model, "2:4")
    with pytest.warns(sparserun.SparserunWarning, match="already holds SparseLinear layers .* model is unchanged"):
        report = sparserun.sparsify_(model, "32x32", sparsity=0.5)
    assert not report.sparsified


def test_masks_and_a_sparsity_target_together_are_refused(gen):
    model = Toy(gen)
    mask = magnitude_mask(model.blocks[0].weight, "32x32", 0.5)
    with pytest.raises(ValueError, match=r"give masks or sparsity, not both \(sparsity=0.9 with 1 mask\(s\)\)"):
        sparserun.sparsify_(model, "32x32", masks={"blocks.0": mask}, sparsity=0.9)  # 0.9 was ignored


@pytest.mark.parametrize("args, kw, match", [((64, 32, "foo"), {}, "unknown format 'foo'"),
                                             ((64, 32, "bsr"), {}, "a bsr layer needs block in 16, 32, 64, 128"),
                                             ((-1, 32, "semi24"), {}, "must be positive integers, got -1, 32")])
def test_sparse_linear_constructor_arguments(args, kw, match):
    with pytest.raises(ValueError, match=match):
        SparseLinear(*args, device="meta", **kw)


def test_bad_inputs(gen):
    with pytest.raises(ValueError, match="unknown sparsity pattern '3:2'"):
        sparserun.sparsify_(Toy(gen), "3:2")
    model = Toy(gen)
    with torch.no_grad():
        model.blocks[1].weight[7, 9] = float("nan")
    with pytest.raises(ValueError, match="blocks.1: non-finite value nan at row 7, column 9"):
        sparserun.sparsify_(model, "2:4")
    with pytest.raises(TypeError, match="blocks.0: unsupported dtype torch.float64"):
        sparserun.sparsify_(Toy(gen, torch.float64), "2:4")


def test_tied_and_shared_modules(gen):
    model = Toy(gen)
    model.head2 = nn.Linear(32, 37, bias=False)
    model.head2.weight = model.blocks[2].weight  # tied weight, two modules
    model.alias = model.blocks[0]  # one module reachable by two paths
    report = sparserun.sparsify_(model, "2:4")
    by = {a.name: a for a in report}
    assert by["blocks.2"].action == "dense" and "tied to head2.weight" in by["blocks.2"].reason
    assert by["head2"].action == "dense" and "tied to blocks.2.weight" in by["head2"].reason
    assert isinstance(model.blocks[2], nn.Linear) and model.head2.weight is model.blocks[2].weight
    assert isinstance(model.blocks[0], SparseLinear) and model.alias is model.blocks[0]
    with pytest.warns(sparserun.SparserunWarning, match="model is unchanged"):
        again = sparserun.sparsify_(model, "2:4")  # idempotent: SparseLinear layers are not nn.Linear
    assert not again.sparsified


def test_a_target_that_rounds_to_zero_blocks_leaves_the_layer_dense(gen):
    """32x32 at 20 %: the 64x32 and 32x64 layers have 2 blocks each, round(0.4) = 0 pruned; packed, they would
    only gain an index. The 37x32 one does not fit. Nothing is packed, and each layer says why."""
    model = Toy(gen)
    rep = sparserun.sparsify_(model, "32x32", sparsity=0.2, filter_fn=lambda m, n: n.startswith("blocks"))
    acts = {a.name: a for a in rep}
    for name in ("blocks.0", "blocks.1"):
        assert acts[name].action == "dense" and acts[name].reason == (
            f"{name}: the target sparsity rounds to zero 32x32 blocks at this shape")
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    sparserun.sparsify_(model, "32x32", sparsity=0.5, filter_fn=lambda m, n: n == "blocks.0")
    assert isinstance(model.blocks[0], SparseLinear)



def test_magnitude_ranks_blocks_by_the_sum_of_abs_w():
    """One block holds a single large weight (squares 16, sum 4), the other many small ones (squares 10.2,
    sum 51.2): the block sum keeps the second, as prune(method="magnitude") does (an L2 ranking kept the
    first)."""
    w = torch.zeros(16, 32)
    w[0, 0] = 4.0  # block (0, 0)
    w[:, 16:] = 0.2  # block (0, 1): 256 weights of 0.2
    mask = magnitude_mask(w, "16x16", sparsity=0.5)
    assert mask[:, 16:].all() and not mask[:, :16].any()
