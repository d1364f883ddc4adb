"""SparseGPT with OBS reconstruction, for unstructured, N:M and NxN blocks."""
import pytest
import torch

from sparserun import formats
from sparserun.formats import UnsupportedShape
from sparserun.prune import masks, scores
from sparserun.prune.sparsegpt import HessianError, sparsegpt

from ._models import one_cpu_thread  # noqa: F401 (autouse fixture)


def correlated_inputs(t=2048, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g) / k ** 0.5 + 0.3 * torch.eye(k)
    return (torch.randn(t, k, generator=g) @ a) * (0.2 + 3 * torch.rand(k, generator=g))


def rel_err(x, w, wp):
    return float((x @ (w - wp).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None), ("4:8", None),
                                              ("32x32", 0.5), ("16x16", 0.75)])
def test_sparsegpt_beats_wanda_and_magnitude_and_packs(pattern, sparsity):
    x = correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    wn, m = sparsegpt(w, x.T @ x, pattern, sparsity)
    assert wn.dtype == w.dtype and not wn.isnan().any()
    assert (wn[~m] == 0).all()
    formats.validate(formats.pack(wn, m, pattern))
    s = masks.resolve_sparsity(pattern, sparsity)
    assert abs(1 - m.float().mean().item() - s) < 1e-6
    e = rel_err(x, w, wn)
    for method, stat in (("wanda", (x ** 2).sum(0)), ("magnitude", None)):
        mm = masks.select(scores.score(method, w, stat), pattern, sparsity)
        assert e < 0.95 * rel_err(x, w, w * mm), method


def test_balance_rows_blocks():
    x = correlated_inputs()
    w = torch.randn(128, 128)
    wn, m = sparsegpt(w, x.T @ x, "32x32", 0.5, balance_rows=True)
    assert (m[::32, ::32].sum(1) == 2).all()
    formats.pack(wn, m, "32x32")


def test_diagonal_hessian_means_no_update_and_magnitude_mask():
    # inputs uncorrelated with equal power: OBS has nothing to compensate with, so SparseGPT must reduce
    # to magnitude pruning (cost w²·h, so blocks pool squared magnitudes) with the kept weights unchanged
    w = torch.randn(32, 64)
    h = 7.0 * torch.eye(64)
    for pattern, s in (("2:4", None), ("16x16", 0.5)):
        wn, m = sparsegpt(w, h, pattern, s)
        assert torch.equal(m, masks.select(w.square(), pattern, s))
        torch.testing.assert_close(wn, w * m, rtol=0, atol=1e-6)


def test_dead_inputs_pruned_first_and_kept_ones_keep_their_value():
    x = correlated_inputs(k=16)
    x[:, [1, 2, 3]] = 0  # three dead inputs in the first 2:4 group
    w = torch.randn(8, 16)
    wn, m = sparsegpt(w, x.T @ x, "2:4", None)
    assert m[:, 0].all()  # the only live input in group 0 is kept ...
    kept_dead = m[:, 1:4]
    assert (kept_dead.sum(1) == 1).all()  # ... plus one dead one the pattern lets us keep
    assert torch.equal(wn[:, 1:4][kept_dead], w[:, 1:4][kept_dead])


def test_fp16_weight_and_ragged_k():
    x = correlated_inputs(k=100)
    w = torch.randn(24, 100).half()
    wn, m = sparsegpt(w, x.T @ x, "4:8", None)
    assert wn.dtype == torch.float16
    formats.check_nm(m, 4, 8)


def test_errors():
    w = torch.randn(40, 64)
    with pytest.raises(UnsupportedShape, match="40x64.*32x32"):
        sparsegpt(w, torch.eye(64), "32x32", 0.5)
    with pytest.raises(ValueError, match="Hessian has shape"):
        sparsegpt(w, torch.eye(63), "2:4")
    h = torch.eye(64)
    h[3, 3] = float("nan")
    with pytest.raises(HessianError, match="l0: calibration Hessian"):
        sparsegpt(w, h, "2:4", name="l0")


def test_an_update_past_fp16_range_is_named_not_cast_to_inf():
    """Large fp16 weights and correlated (rank-4) inputs: the OBS update passes 65504. It was returned as inf,
    and convert then blamed the source model for a non-finite value it never held."""
    from sparserun.prune.sparsegpt import UpdateOverflow, check_representable

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(32, 64, generator=g) * 3e4).clamp(-6e4, 6e4).half()
    x = torch.randn(1000, 4, generator=g) @ torch.randn(4, 64, generator=g)
    assert torch.isfinite(w).all()
    with pytest.raises(UpdateOverflow, match=r"q: SparseGPT's weight update reaches .* beyond what float16 holds"):
        sparsegpt(w, x.T @ x, "2:4", name="q")
    q, _ = sparsegpt(w.float(), x.T @ x, "2:4")  # fp32 holds it
    assert torch.isfinite(q).all() and q.abs().max() > 65504
    check_representable(q, torch.bfloat16, "q")  # and so does bf16
