"""Scores and pattern-aware mask selection (sparserun/prune/scores.py, masks.py)."""
import math

import pytest
import torch

from sparserun import formats
from sparserun.formats import UnsupportedShape
from sparserun.patterns import parse
from sparserun.prune import masks, scores

from ._models import one_cpu_thread  # noqa: F401 (autouse fixture)

PATTERNS = [("unstructured", 0.5), ("unstructured", 0.73), ("2:4", None), ("4:8", None), ("1:3", None),
            ("16x16", 0.5), ("32x32", 0.75)]


@pytest.mark.parametrize("pattern,sparsity", PATTERNS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "taylor", "obd"])
def test_every_score_with_every_pattern_packs(method, pattern, sparsity):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    stat = {"magnitude": None, "wanda": torch.rand(128, generator=g),
            "taylor": torch.rand(64, 128, generator=g), "obd": torch.rand(64, 128, generator=g)}[method]
    sc = scores.score(method, w, stat)
    m = masks.select(sc, pattern, sparsity)
    assert m.dtype == torch.bool and m.shape == w.shape
    p = formats.pack(w * m, m, pattern)
    formats.validate(p)
    pat = parse(pattern)
    if pat.kind == "nm":  # K padded to a multiple of M: a short last group keeps up to N
        assert (m.sum(1) == 128 // pat.m * pat.n + min(128 % pat.m, pat.n)).all()
    else:
        assert abs((1 - m.float().mean().item()) - masks.resolve_sparsity(pattern, sparsity)) < 1e-3


def test_unstructured_keeps_the_highest_scores_exact_count():
    sc = torch.randn(33, 47).abs()
    m = masks.select(sc, "unstructured", 0.37)
    assert int((~m).sum()) == round(0.37 * 33 * 47)
    assert sc[m].min() > sc[~m].max()


def test_unstructured_per_row_same_count_every_row():
    sc = torch.rand(10, 50)
    sc[0] *= 100  # a layer-wide choice would keep all of row 0
    m = masks.select(sc, "unstructured", 0.6, per_row=True)
    assert (m.sum(1) == 20).all()
    for r in range(10):
        assert sc[r][m[r]].min() > sc[r][~m[r]].max()


def test_nm_top_n_of_every_m_with_ragged_k():
    sc = torch.rand(7, 10)  # K = 10: groups 0-3, 4-7 and a short group 8-9
    m = masks.select(sc, "2:4", None)
    for r in range(7):
        for g0 in (0, 4):
            grp = sc[r, g0:g0 + 4]
            assert set(m[r, g0:g0 + 4].nonzero().flatten().tolist()) == set(grp.topk(2).indices.tolist())
        assert m[r, 8:].all()  # a 2-long last group keeps both (K is padded with never-kept columns)
    formats.pack(torch.randn(7, 10) * m, m, "2:4")
    m = masks.select(torch.rand(5, 11), "4:8", None)
    formats.check_nm(m, 4, 8)
    assert int(m[:, 8:].sum(1).max()) == 3


def test_blocks_pool_scores_and_balance_rows():
    b = 16
    sc = torch.rand(64, 128)
    sc[:16] += 10  # block-row 0 is all important: a layer-wide choice keeps all of it
    m = masks.select(sc, "16x16", 0.5)
    kept = m[::b, ::b]
    assert kept[0].all() and int(kept.sum()) == 16
    pooled = sc.view(4, b, 8, b).sum((1, 3))
    assert pooled[kept].min() > pooled[~kept].max()
    mb = masks.select(sc, "16x16", 0.5, balance_rows=True)
    assert (mb[::b, ::b].sum(1) == 4).all()
    formats.pack(torch.randn(64, 128) * mb, mb, "16x16")


def test_blocks_unsupported_shape_raises():
    with pytest.raises(UnsupportedShape, match=r"layers\.0\.q.*100x128.*32x32"):
        masks.select(torch.rand(100, 128), "32x32", 0.5, name="layers.0.q")


@pytest.mark.parametrize("pattern,sparsity,msg", [
    ("2:4", 0.6, r"2:4 keeps 2 of every 4.*0\.5.*0\.6"),
    ("unstructured", None, "needs a target sparsity"),
    ("32x32", None, "needs a target sparsity"),
    ("unstructured", 0.0, r"in \(0, 1\)"),
    ("unstructured", 1.0, r"in \(0, 1\)"),
    ("unstructured", -0.2, r"in \(0, 1\)"),
    ("unstructured", 1.5, r"in \(0, 1\)"),
    ("unstructured", math.nan, r"in \(0, 1\)"),
    ("unstructured", "lots", r"in \(0, 1\)"),
])
def test_bad_sparsity(pattern, sparsity, msg):
    with pytest.raises(ValueError, match=msg):
        masks.resolve_sparsity(pattern, sparsity)


def test_nm_accepts_its_own_sparsity():
    assert masks.resolve_sparsity("2:4", 0.5) == 0.5
    assert masks.resolve_sparsity("1:4", None) == 0.75


def test_unknown_pattern_and_method():
    with pytest.raises(ValueError, match="unknown sparsity pattern '3x5'"):
        masks.select(torch.rand(4, 4), "3x5", 0.5)
    with pytest.raises(ValueError, match="unknown pruning method 'random'.*magnitude, wanda, sparsegpt"):
        scores.check_method("random")


def test_score_formulas():
    w = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    torch.testing.assert_close(scores.wanda(w, torch.tensor([4.0, 9.0])), torch.tensor([[2.0, 6.0], [6.0, 1.5]]))
    g = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    torch.testing.assert_close(scores.taylor(w, g), torch.tensor([[2.0, 2.0], [3.0, 2.0]]))
    torch.testing.assert_close(scores.obd(w, g), torch.tensor([[1.0, 2.0], [4.5, 0.5]]))
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        scores.obd(w, torch.rand(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        masks.select(torch.tensor([[float("nan"), 1.0]]), "unstructured", 0.5)
