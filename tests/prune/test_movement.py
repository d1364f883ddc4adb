"""Movement pruning: the cubic schedule, the score rule, masks that pack, the Trainer callback."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparserun
from sparserun import formats
from sparserun.prune.movement import CubicSchedule, MovementError, MovementPruner, MovementPruningCallback
from sparserun.runtime.sparsify import magnitude_mask

from ._models import make_llama, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _lm_step(model, ids):
    return F.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size),
                           ids[:, 1:].reshape(-1))


# ---- schedule -----------------------------------------------------------------------------------------

def test_cubic_schedule_values():
    s = CubicSchedule(0.8, total_steps=110, initial_sparsity=0.1, warmup_steps=10, cooldown_steps=20,
                      update_interval=10)
    ramp = 110 - 10 - 20
    f = lambda t: 0.8 + (0.1 - 0.8) * (1 - t / ramp) ** 3  # noqa: E731  Zhu & Gupta, t since warm-up
    assert s(0) == s(9) == 0.1  # warm-up
    assert s(10) == pytest.approx(0.1) and s(19) == pytest.approx(0.1)  # first ramp interval: t = 0
    assert s(20) == pytest.approx(f(10)) and s(29) == pytest.approx(f(10))  # held for update_interval
    assert s(55) == pytest.approx(f(40)) == pytest.approx(0.8 - 0.7 * 0.5 ** 3)
    assert s(89) == pytest.approx(f(70))
    assert s(90) == s(109) == s(500) == 0.8  # cool-down and beyond
    vals = [s(t) for t in range(120)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))  # never un-prunes
    assert len(set(vals)) == 1 + ramp // 10  # initial, 7 more ramp values, final
    # no ramp at all: straight to the final sparsity after warm-up
    assert CubicSchedule(0.5, total_steps=4, warmup_steps=2, cooldown_steps=2)(2) == 0.5


@pytest.mark.parametrize("kw, msg", [
    (dict(final_sparsity=0.5, total_steps=10, initial_sparsity=0.6), "above final_sparsity"),
    (dict(final_sparsity=0.5, total_steps=10, warmup_steps=6, cooldown_steps=5), "exceed total_steps"),
    (dict(final_sparsity=0.5, total_steps=10, update_interval=0), "update_interval"),
    (dict(final_sparsity=1.0, total_steps=10), "final_sparsity"),
    (dict(final_sparsity=0.5, total_steps=0), "total_steps"),
])
def test_schedule_rejects(kw, msg):
    with pytest.raises(MovementError, match=msg):
        CubicSchedule(**kw)


def test_nm_schedule_passes_through_3_of_4(tok):
    """2:4 with a schedule: sparsity rounds to whole weights per group, so masks go 4:4 -> 3:4 -> 2:4."""
    model = make_llama(tok, layers=1)
    pr = MovementPruner(model, "2:4", total_steps=8, warmup_steps=2, cooldown_steps=2)
    ids = torch.randint(3, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    for _ in range(8):
        _lm_step(model, ids).backward()
        pr.step()
        model.zero_grad()
        per_group = {int(c) for m in pr.masks().values() for c in m.view(m.shape[0], -1, 4).sum(-1).unique()}
        seen.append(per_group)
    assert {4} in seen and {3} in seen and seen[-1] == {2}
    masks = pr.finalize()
    for name, m in masks.items():
        formats.pack(model.get_submodule(name).weight.detach(), m, "2:4", name=name)


# ---- the score rule -----------------------------------------------------------------------------------

class _One(nn.Module):
    def __init__(self, n=32, k=64):
        super().__init__()
        self.lin = nn.Linear(k, n)


@pytest.mark.parametrize("pattern", ["unstructured", "16x16"])
def test_hard_scores_accumulate_minus_w_times_grad(pattern):
    """S = −Σ_t W_t ⊙ ∂L/∂W'_t (per block: summed over the block), with ∂L/∂W' the gradient of the masked
    weight; checked against the gradient of an unpruned copy taken by hand."""
    torch.manual_seed(0)
    m = _One()
    ref = copy.deepcopy(m)
    pr = MovementPruner(m, pattern, 0.5, layers=["lin"], total_steps=10, warmup_steps=5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    expect = torch.zeros(32, 64)
    for _ in range(3):  # warm-up: mask all ones, so W' = W and the reference gradient is ∂L/∂W'
        x, c = torch.randn(5, 64), torch.randn(5, 32)
        (m.lin(x) * c).sum().backward()
        (ref.lin(x) * c).sum().backward()
        expect -= ref.lin.weight.detach() * ref.lin.weight.grad
        assert torch.allclose(m.lin.weight.grad, ref.lin.weight.grad)
        pr.step()
        opt.step(), opt_ref.step(), opt.zero_grad(), opt_ref.zero_grad()
    scores = pr.layers["lin"].scores.detach()
    if pattern == "16x16":
        expect = expect.view(2, 16, 4, 16).sum(dim=(1, 3))
    torch.testing.assert_close(scores, expect, rtol=1e-5, atol=1e-5)


def test_pruned_weights_get_no_gradient_but_scores_do():
    torch.manual_seed(0)
    m = _One()
    pr = MovementPruner(m, "unstructured", 0.5, layers=["lin"], total_steps=2)  # ramp starts at step 0
    pr.step()  # advance to step 1 (sparsity > 0)
    mask = pr.masks()["lin"]
    assert 0 < mask.float().mean() < 1
    (m.lin(torch.randn(4, 64)) * torch.randn(4, 32)).sum().backward()
    g = m.lin.weight.grad
    assert (g[~mask] == 0).all() and (g[mask] != 0).any()
    sg = pr.layers["lin"].scores.grad
    assert (sg[~mask] != 0).any()  # the straight-through estimator scores pruned weights too: they can return


@pytest.mark.parametrize("method", ["hard", "soft"])
def test_movement_finds_the_blocks_that_matter(method):
    """A teacher whose weight lives in 2 of 8 blocks; the student starts with the *other* blocks large.
    Magnitude would keep the wrong blocks; movement keeps the blocks moving away from zero."""
    torch.manual_seed(0)
    teacher = torch.zeros(32, 64)
    signal = [(0, 1), (1, 2)]  # (block-row, block-col) of 16x16 blocks
    for r, c in signal:
        teacher[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = torch.randn(16, 16)
    m = _One()
    with torch.no_grad():
        m.lin.weight.copy_(torch.where(teacher != 0, 0.01 * torch.randn(32, 64), 0.3 * torch.randn(32, 64)))
        m.lin.bias.zero_()
    start = m.lin.weight.detach().clone()
    pr = MovementPruner(m, "16x16", 0.75, method=method, layers=["lin"], total_steps=60, warmup_steps=20,
                        cooldown_steps=20, score_lr=0.05, regularization=1e-3 if method == "soft" else 0.0)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(60):
        x = torch.randn(64, 64)
        F.mse_loss(m.lin(x), x @ teacher.t()).backward()
        pr.step()
        opt.step()
        opt.zero_grad()
    masks = pr.finalize()
    kept = masks["lin"][::16, ::16]
    expected = torch.zeros(2, 4, dtype=torch.bool)
    for r, c in signal:
        expected[r, c] = True
    assert torch.equal(kept, expected), kept
    magnitude = magnitude_mask(start, "16x16", 0.75)[::16, ::16]
    assert not torch.equal(magnitude, expected)  # the test separates movement from magnitude
    assert (m.lin.weight[~masks["lin"]] == 0).all()


# ---- masks that pack ----------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, sparsity, method, kw", [
    ("unstructured", 0.6, "hard", {}),
    ("unstructured", 0.6, "soft", {"per_row": True, "regularization": 0.1}),
    ("2:4", None, "soft", {}),
    ("4:8", None, "hard", {}),
    ("16x16", 0.5, "soft", {"balance_rows": True}),
    ("32x32", 0.5, "hard", {}),
])
def test_final_masks_pack_and_save(tmp_path, tok, pattern, sparsity, method, kw):
    model = make_llama(tok, layers=2)
    pr = MovementPruner(model, pattern, sparsity, method=method, total_steps=6, warmup_steps=1,
                        cooldown_steps=1, update_interval=2, **kw)
    assert len(pr.layers) == 14 and not pr.skipped  # 2 layers x 7 projections, lm_head excluded
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        _lm_step(model, torch.randint(3, len(tok), (2, 24), generator=gen)).backward()
        pr.step()
        opt.step()
        opt.zero_grad()
    masks = pr.finalize()
    target = 1 - (int(pattern[0]) / int(pattern[2])) if ":" in pattern else sparsity
    for name, mask in masks.items():
        lin = model.get_submodule(name)
        assert "forward" not in lin.__dict__  # the Linear's own forward is back
        w = lin.weight.detach()
        assert (w[~mask] == 0).all()
        p = formats.pack(w, mask, pattern, name=name)
        formats.validate(p, name)
        # exact counts: round(s·numel) per layer, or round(s·K) per row
        tol = 0.5 / (mask.shape[1] if kw.get("per_row") else mask.numel())
        assert 1 - mask.float().mean().item() == pytest.approx(target, abs=tol)
        if kw.get("balance_rows"):
            b = int(pattern.split("x")[0])
            per_row = mask[::b, ::b].sum(1)
            assert (per_row == per_row[0]).all()
    if pattern in ("32x32", "2:4"):  # hand-off: sparsify_ + save + load give the masked model's outputs
        ids = torch.randint(3, len(tok), (1, 12), generator=gen)
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        rep = sparserun.sparsify_(model, pattern, masks=masks, progress=False)
        assert len(rep.sparsified) == 14
        sparserun.save(model, tmp_path / "ck")
        loaded = sparserun.load(tmp_path / "ck")
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_layers_that_cannot_hold_blocks_are_skipped(tok):
    model = make_llama(tok, layers=1, intermediate=80)  # MLP 80x64 / 64x80: not multiples of 32
    pr = MovementPruner(model, "32x32", 0.5, total_steps=4)
    assert sorted(n.rsplit(".", 1)[1] for n in pr.skipped) == ["down_proj", "gate_proj", "up_proj"]
    assert all("not divisible by the 32x32 block size" in r for r in pr.skipped.values())
    assert len(pr.layers) == 4  # q, k, v, o
    pr.remove()
    with pytest.raises(MovementError, match="none of the 7 layers can hold pattern 128x128"):
        MovementPruner(model, "128x128", 0.5, total_steps=4)


def test_errors(tok):
    model = make_llama(tok, layers=1)
    with pytest.raises(MovementError, match="final sparsity is 0.5"):
        MovementPruner(model, "2:4", 0.7, total_steps=4)
    with pytest.raises(MovementError, match="total_steps"):
        MovementPruner(model, "32x32", 0.5)
    with pytest.raises(MovementError, match="needs a final sparsity"):
        MovementPruner(model, "32x32", total_steps=4)
    with pytest.raises(MovementError, match="unknown movement method"):
        MovementPruner(model, "32x32", 0.5, method="magnitude", total_steps=4)
    with pytest.raises(MovementError, match="not an nn.Linear"):
        MovementPruner(model, "32x32", 0.5, layers=["model.norm"], total_steps=4)
    with pytest.raises(MovementError, match="does not exist"):
        MovementPruner(model, "32x32", 0.5, layers=["nope"], total_steps=4)
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
        MovementPruner(model, "3x3", 0.5, total_steps=4)
    with pytest.raises(MovementError, match="layers= takes a list of layer names, got the string"):
        MovementPruner(model, "32x32", 0.5, layers="model.layers.0.mlp.up_proj", total_steps=4)
    for bad in (dict(score_lr=float("nan")), dict(regularization=float("nan"))):
        with pytest.raises(MovementError, match="need score_lr > 0 and regularization >= 0"):
            MovementPruner(model, "32x32", 0.5, method="soft", total_steps=4, **bad)
    with pytest.raises(MovementError, match="per_row applies to unstructured sparsity, not 2:4"):
        MovementPruner(model, "2:4", total_steps=4, per_row=True)  # was silently ignored
    with pytest.raises(MovementError, match="balance_rows applies to block patterns such as 32x32, not unstructured"):
        MovementPruner(model, "unstructured", 0.5, total_steps=4, balance_rows=True)
    pr = MovementPruner(model, "32x32", 0.5, total_steps=4)
    with pytest.warns(UserWarning, match="before the schedule reached"):
        pr.finalize()
    with pytest.raises(MovementError, match="finalized"):
        pr.step()


def test_state_dict_resume(tok):
    model = make_llama(tok, layers=1)
    pr = MovementPruner(model, "unstructured", 0.5, method="soft", total_steps=6)
    ids = torch.randint(3, len(tok), (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        _lm_step(model, ids).backward()
        pr.step()
        model.zero_grad()
    state = pr.state_dict()
    pr.remove()
    pr2 = MovementPruner(model, "unstructured", 0.5, method="soft", total_steps=6)
    fresh = {n: st.scores.clone() for n, st in pr2.layers.items()}
    name = next(iter(state["masks"]))
    bad = {**state, "masks": {**state["masks"], name: state["masks"][name][:1]}}
    for broken, match in ((bad, "saved mask has shape"), ({}, "not a movement pruning state")):
        with pytest.raises(MovementError, match=match):
            pr2.load_state_dict(broken)  # refused before anything is copied
        assert pr2.step_count == 0 and all(torch.equal(st.scores, fresh[n]) for n, st in pr2.layers.items())
    pr2.load_state_dict(state)
    assert pr2.step_count == 3
    for n in pr.layers:
        assert torch.equal(pr2.masks()[n], pr.masks()[n])


# ---- transformers.Trainer -----------------------------------------------------------------------------

def test_trainer_callback_driven_like_the_trainer(tok):
    """The Trainer's event order (transformers/trainer.py): on_train_begin; per optimizer step: backward,
    optimizer.step, on_optimizer_step, model.zero_grad, global_step += 1, on_step_end; on_train_end."""
    from transformers import TrainerControl, TrainerState
    from transformers.trainer_callback import CallbackHandler

    model = make_llama(tok, layers=1)
    pr = MovementPruner(model, "32x32", 0.5, total_steps=5, warmup_steps=1, cooldown_steps=1)
    cb = MovementPruningCallback(pr)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handler = CallbackHandler([cb], model, None, opt, None)
    state, control, args = TrainerState(), TrainerControl(), None
    state.max_steps = 5
    handler.on_train_begin(args, state, control)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        _lm_step(model, torch.randint(3, len(tok), (2, 16), generator=gen)).backward()
        opt.step()
        handler.on_optimizer_step(args, state, control)
        model.zero_grad()
        state.global_step += 1
        handler.on_step_end(args, state, control)
        assert pr.step_count == state.global_step
    handler.on_train_end(args, state, control)
    assert cb.masks is not None and len(cb.masks) == 7
    for name, mask in cb.masks.items():
        w = model.get_submodule(name).weight.detach()
        formats.pack(w, mask, "32x32", name=name)
        assert (w[~mask] == 0).all()
        assert 1 - mask.float().mean().item() == pytest.approx(0.5)


def test_real_trainer(tmp_path, tok):
    """With accelerate installed (transformers' Trainer needs it), a real Trainer run."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = make_llama(tok, layers=1)
    pr = MovementPruner(model, "16x16", 0.5, total_steps=4, warmup_steps=1)
    cb = MovementPruningCallback(pr)
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, len(tok), (16,), generator=gen)} for _ in range(8)]
    for r in rows:
        r["labels"] = r["input_ids"].clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3, logging_steps=100)
    before = model.lm_head.weight.detach().clone()
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb]).train()
    assert pr.step_count == 4 and cb.masks is not None
    for name, mask in cb.masks.items():
        formats.pack(model.get_submodule(name).weight.detach(), mask, "16x16", name=name)
        assert 1 - mask.float().mean().item() == pytest.approx(0.5)
    assert not torch.equal(model.lm_head.weight.detach(), before)  # the Trainer did train


def test_the_first_mask_is_by_magnitude_not_position(tok):
    """initial_sparsity > 0: with all scores still zero the warm-up mask tie-broke by position (2:4 kept
    columns 2 and 3 of every group; unstructured pruned the first columns of each row)."""
    model = make_llama(tok, layers=1)
    for pattern, kw in (("2:4", {}), ("unstructured", dict(schedule=0.5)), ("16x16", dict(schedule=0.5))):
        pr = MovementPruner(model, pattern, total_steps=20, initial_sparsity=0.25, warmup_steps=5, **kw)
        for name, st in pr.layers.items():
            w = model.get_submodule(name).weight.detach()
            if pattern == "2:4":
                assert torch.equal(st.mask, magnitude_mask(w, "3:4"))  # 25 %: one of every 4 pruned
            elif pattern == "16x16":
                assert torch.equal(st.mask, magnitude_mask(w, "16x16", 0.25))
            else:
                assert w.abs()[st.mask].min() >= w.abs()[~st.mask].max()
        pr.remove()


def test_a_deepcopy_computes_with_its_own_weights(tok):
    """An EMA / best-model snapshot taken with the pruner attached kept calling the original layers."""
    model = make_llama(tok, layers=1)
    pr = MovementPruner(model, "2:4", total_steps=4)
    ids = torch.randint(3, len(tok), (1, 8), generator=torch.Generator().manual_seed(0))
    snap = copy.deepcopy(model)
    with torch.no_grad():
        before = snap(ids).logits
        for name in pr.layers:
            model.get_submodule(name).weight.mul_(3.0)  # only the original changes
        assert torch.equal(snap(ids).logits, before)
    pr.remove()


def test_the_cool_down_trains_fixed_masks_and_finalize_keeps_them(tok):
    model = make_llama(tok, layers=1)
    pr = MovementPruner(model, "16x16", 0.5, total_steps=10, warmup_steps=2, cooldown_steps=4, update_interval=1)
    ids = torch.randint(3, len(tok), (2, 16), generator=torch.Generator().manual_seed(1))
    seen = []
    for t in range(10):
        _lm_step(model, ids).backward()
        pr.step()
        model.zero_grad()
        if pr.step_count >= 6:  # the cool-down
            seen.append({n: m.clone() for n, m in pr.masks().items()})
    assert all(all(torch.equal(a[n], seen[0][n]) for n in a) for a in seen)
    final = pr.finalize()
    assert all(torch.equal(final[n], seen[-1][n].cpu()) for n in final)


def test_resume_between_update_steps_is_exact(tok):
    def run(stop_at=None, state=None):
        torch.manual_seed(0)
        model = make_llama(tok, layers=1)
        pr = MovementPruner(model, "unstructured", 0.5, total_steps=12, update_interval=4)
        ids = torch.randint(3, len(tok), (2, 16), generator=torch.Generator().manual_seed(1))
        if state is not None:
            model.load_state_dict(state["model"])
            pr.load_state_dict(state["pruner"])
        while pr.step_count < (stop_at or 12):
            _lm_step(model, ids).backward()
            pr.step()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 1e-3 * p.grad
            model.zero_grad()
        return model, pr

    full_model, full = run()
    part_model, part = run(stop_at=5)  # 5: not an update step (4, 8, 12 are)
    state = {"model": copy.deepcopy(part_model.state_dict()), "pruner": part.state_dict()}
    resumed_model, resumed = run(state=state)
    for n in full.layers:
        assert torch.equal(resumed.masks()[n], full.masks()[n])
