"""MoE experts held as 3-D parameters: unrolled into per-expert Linear layers, pruned, packed, saved, loaded.

The unrolled forward must compute what the family's own experts forward computes (the contract transformers'
use_experts_implementation states), for every family layout; fuse must give back the exact 3-D parameters.
"""
import copy
import io

import pytest
import torch
import torch.nn as nn

import sparserun
from sparserun.runtime import experts as X
from sparserun.runtime.linear import PackedSaveError, SparseLinear

from ..prune._models import MOE_FAMILIES, make_moe, make_tokenizer, one_cpu_thread  # noqa: F401 (autouse)

V = 101


def _ids(seed=0, shape=(2, 13)):
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_unrolled_forward_equals_the_familys_own_and_fuse_restores_it(family):
    model = make_moe(family, V)
    fused = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    assert fused and all(p.dim() == 3 or n.endswith("_bias") for n, p in fused.items())
    ids = _ids()
    want = _logits(model, ids)
    names = X.unroll_all(model)
    assert names and X.experts_modules(model) == []
    mod = model.get_submodule(names[0])
    lin = mod._modules["0"].down_proj
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (64, lin.in_features)
    calls = []
    hooks = [model.get_submodule(f"{n}.{e}.down_proj").register_forward_hook(lambda *a: calls.append(1))
             for n in names for e in range(X.num_experts(model.get_submodule(n)))]
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)
    assert len(calls) >= 2 * len(names), "the per-expert Linear layers must be what runs"
    for h in hooks:
        h.remove()
    with torch.no_grad():  # and what they hold is what the output depends on
        for e in range(X.num_experts(mod)):
            mod._modules[str(e)].down_proj.weight.mul_(1.5)
    assert not torch.allclose(_logits(model, ids), want)
    with torch.no_grad():
        for e in range(X.num_experts(mod)):
            mod._modules[str(e)].down_proj.weight.div_(1.5)
    assert X.fuse_all(model) == names
    after = {n: p.detach() for n, p in model.named_parameters() if ".experts." in n}
    assert after.keys() == fused.keys()
    for n in fused:
        torch.testing.assert_close(after[n], fused[n], rtol=1e-6, atol=0)
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)


def test_unrolled_model_survives_deepcopy_and_torch_save():
    model = make_moe("qwen3_moe", V)
    X.unroll_all(model)
    ids = _ids()
    want = _logits(model, ids)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    for m in (twin, back):
        torch.testing.assert_close(_logits(m, ids), want, rtol=0, atol=0)
        exp = m.model.layers[0].mlp.experts
        assert exp.forward.args[0] is exp, "the copy's forward must route through the copy's own experts"


def test_unrolled_experts_compile_with_graph_breaks_not_as_one_graph():
    """The routing loop syncs with the host (the experts hit), so `generate --compile` must not ask for a full
    graph on a packed MoE model (it did, and failed on a GPU); with graph breaks it computes the same logits."""
    from sparserun.generate import fullgraph_ok

    model = make_moe("qwen3_moe", V).eval()
    assert fullgraph_ok(model), "fused experts: one graph, as transformers compiles them"
    X.unroll_all(model)
    assert not fullgraph_ok(model)
    ids = _ids()
    want = _logits(model, ids)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(model, backend="eager", fullgraph=False)(ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch._dynamo.reset()
            with pytest.raises(Exception, match="(?i)data.dependent|tolist|graph break|unsupported"):
                torch.compile(model, backend="eager", fullgraph=True)(ids)
    finally:
        torch._dynamo.reset()


def test_unroll_refuses_a_module_outside_the_experts_contract():
    with pytest.raises(ValueError, match="not a fused experts module"):
        X.unroll(nn.Linear(4, 4))
    model = make_moe("mixtral", V)
    exp = model.model.layers[0].mlp.experts
    X.unroll(exp)
    with pytest.raises(ValueError, match="not a fused experts module"):
        X.unroll(exp)  # already unrolled


def test_set_fused_splits_a_3d_tensor_into_the_experts():
    model = make_moe("gpt_oss", V)  # stored transposed, with biases
    exp = model.model.layers[0].mlp.experts
    w3, b2 = exp.gate_up_proj.detach().clone(), exp.gate_up_proj_bias.detach().clone()
    X.unroll(exp)
    new_w, new_b = torch.randn_like(w3), torch.randn_like(b2)
    assert X.set_fused(exp, "gate_up_proj", new_w) and X.set_fused(exp, "gate_up_proj_bias", new_b)
    assert torch.equal(exp._modules["2"].gate_up_proj.weight, new_w[2].t())
    assert torch.equal(exp._modules["2"].gate_up_proj.bias, new_b[2])
    assert not X.set_fused(exp, "router", new_w)
    assert not X.set_fused(model.model.layers[0].mlp, "gate_up_proj", new_w), "not an unrolled experts module"


@pytest.mark.parametrize("family,pattern,sparsity", [("mixtral", "2:4", None), ("gpt_oss", "16x16", 0.5)])
def test_sparsify_packs_every_expert_and_the_checkpoint_round_trips(tmp_path, family, pattern, sparsity):
    model = make_moe(family, V)
    report = sparserun.sparsify_(model, pattern, sparsity=sparsity)
    names = [a.name for a in report.sparsified if ".experts." in a.name]
    n_exp = sum(X.num_experts(m) for _, m in X.experts_modules(model, unrolled=True))
    assert len(names) == 2 * n_exp, report.summary()
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in names)
    ids = _ids(1)
    want = _logits(model, ids)
    with pytest.raises(PackedSaveError):
        model.save_pretrained(tmp_path / "hf")
    sparserun.save(model, tmp_path / "packed")
    back = sparserun.load(tmp_path / "packed")
    assert isinstance(back.get_submodule(names[0]), SparseLinear)
    torch.testing.assert_close(_logits(back, ids), want, rtol=0, atol=0)


def test_sparsify_with_masks_leaves_experts_it_does_not_pack_fused():
    model = make_moe("qwen3_moe", V)
    masks = {"model.layers.0.self_attn.q_proj": torch.ones(64, 64, dtype=torch.bool)}
    masks["model.layers.0.self_attn.q_proj"][:, 1::2] = False
    sparserun.sparsify_(model, "2:4", masks=masks)
    assert X.experts_modules(model, unrolled=True) == []
    assert model.model.layers[0].mlp.experts.gate_up_proj.dim() == 3


def test_prune_keeps_the_3d_layout_so_transformers_round_trips_the_pruned_model(tmp_path):
    import transformers as T

    tok = make_tokenizer()
    model = make_moe("qwen3_moe", len(tok))
    rep = sparserun.prune(model, "wanda", "2:4", tokenizer=tok, nsamples=4, seqlen=32, progress=False)
    exp_rows = [r for r in rep.pruned if ".mlp.experts." in r["name"]]
    assert len(exp_rows) == 2 * 2 * 8  # 2 layers x 8 experts x (gate_up, down)
    exp = model.model.layers[1].mlp.experts
    assert exp.gate_up_proj.dim() == 3 and not X.is_unrolled(exp)
    mask = rep.masks["model.layers.1.mlp.experts.5.gate_up_proj"]
    w = exp.gate_up_proj[5].detach()
    assert torch.equal(w != 0, mask) and mask.view(-1, 4).sum(1).eq(2).all()
    model.save_pretrained(tmp_path / "hf")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(2, (1, 9))
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), rtol=0, atol=0)


def test_an_expert_no_calibration_token_reaches_is_pruned_by_magnitude_and_reported():
    tok = make_tokenizer()
    model = make_moe("qwen3_moe", len(tok))
    never = 7

    def reroute(module, args):  # the router never chooses expert 7 (its choices go to expert 0)
        hidden, idx, wts = args
        return hidden, torch.where(idx == never, torch.zeros_like(idx), idx), wts

    for layer in model.model.layers:
        layer.mlp.experts.register_forward_pre_hook(reroute)
    rep = sparserun.prune(model, "sparsegpt", "2:4", tokenizer=tok, nsamples=4, seqlen=32, progress=False)
    name = f"model.layers.0.mlp.experts.{never}.down_proj"
    row = next(r for r in rep.rows if r["name"] == name)
    assert row["status"] == "pruned" and row["reason"].startswith("no calibration token reached it")
    assert row["rel_error"] is None, "no token, no error to measure (a 0 would lower the mean)"
    others = [r for r in rep.pruned if f".experts.{never}." not in r["name"]]
    assert not any(r["reason"] for r in others)
    w_dense = make_moe("qwen3_moe", len(tok)).model.layers[0].mlp.experts.down_proj[never].detach()
    assert torch.equal(rep.masks[name], sparserun.runtime.sparsify.magnitude_mask(w_dense, "2:4"))
    assert any("saw no calibration token" in w for w in rep.warnings())
    assert "no calibration token reached it" in rep.table()


@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("16x16", 0.5)])
def test_packed_experts_run_through_the_triton_kernels(tmp_path, monkeypatch, pattern, sparsity):
    """SPARSERUN_BACKEND=triton (the interpreter on a CPU, the kernels on a GPU): every routed expert is a
    kernel call, with as many rows as tokens the router sent it (odd M), and the logits are the reference
    backend's."""
    from sparserun import ops

    model = make_moe("qwen3_moe", V)
    sparserun.sparsify_(model, pattern, sparsity=sparsity)
    sparserun.save(model, tmp_path / "p")
    model = sparserun.load(tmp_path / "p")
    ids = _ids(3, (1, 7))
    want = _logits(model, ids)
    rows = []
    orig = ops.sparse_linear_triton

    def counted(layer, x):
        if x.shape[0] and layer.out_features == 64 and layer.in_features == 32:  # an expert's down_proj
            rows.append(x.shape[0])
        return orig(layer, x)

    monkeypatch.setattr(ops, "sparse_linear_triton", counted)
    monkeypatch.setenv("SPARSERUN_BACKEND", "triton")
    got = _logits(model, ids)
    assert len(rows) >= 2 and sum(rows) == 2 * 2 * 7, rows  # 2 layers x top-2 x 7 tokens
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_convert_memory_estimate_counts_the_block_with_the_experts(tmp_path):
    """DeepSeek-V3's first block is a dense MLP and the next one holds a Linear pair per expert: sparsegpt's
    Hessians are estimated for the larger block, not the first."""
    from sparserun import convert as cv

    tok = make_tokenizer()
    src = tmp_path / "src"
    make_moe("deepseek_v3", len(tok)).save_pretrained(src)
    tok.save_pretrained(src)
    rep = cv.convert(src, tmp_path / "out", "sparsegpt", "2:4", nsamples=2, seqlen=16, progress=False)
    model = sparserun.load(tmp_path / "out")
    per_block = []
    for block in model.model.layers:
        ks = [m.in_features for m in block.modules() if isinstance(m, (nn.Linear, SparseLinear))]
        per_block.append(sum(k * k * 4 for k in ks) + 3 * max(ks) ** 2 * 4)
    assert per_block[1] > per_block[0]
    assert rep.info["memory_estimate"]["statistics"] == per_block[1]


def test_a_refused_sparsify_leaves_the_experts_fused():
    model = make_moe("qwen3_moe", V)
    ids = _ids(4)
    want = _logits(model, ids)
    with pytest.raises(ValueError, match="needs a target sparsity"):
        sparserun.sparsify_(model, "16x16")  # blocks without a sparsity: refused at the first layer
    assert X.experts_modules(model, unrolled=True) == [] and model.model.layers[0].mlp.experts.down_proj.dim() == 3
    torch.testing.assert_close(_logits(model, ids), want, rtol=0, atol=0)


def test_prune_gives_back_the_same_parameter_objects_and_an_unrolled_model_refuses_save_pretrained(tmp_path):
    """An optimizer built before prune keeps training the experts (fuse re-registers the 3-D Parameters the
    pruned views write into); a model the user unrolled stays unrolled, and transformers' save_pretrained
    refuses it until fuse_all, because it would save per-expert names that from_pretrained does not load."""
    tok = make_tokenizer()
    model = make_moe("qwen3_moe", len(tok))
    before = model.model.layers[1].mlp.experts.gate_up_proj
    sparserun.prune(model, "wanda", "2:4", tokenizer=tok, nsamples=2, seqlen=16, progress=False)
    assert model.model.layers[1].mlp.experts.gate_up_proj is before
    assert (before[3] == 0).float().mean() == 0.5

    X.unroll_all(model)
    sparserun.prune(model, "magnitude", "2:4", tokenizer=tok, nsamples=2, seqlen=16, progress=False)
    assert len(X.experts_modules(model, unrolled=True)) == 2, "the user's unrolled modules stay unrolled"
    with pytest.raises(PackedSaveError, match=r"unrolled .*fuse_all\(model\) first"):
        model.save_pretrained(tmp_path / "hf")
    X.fuse_all(model)
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize("family,name,reason", [
    ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate", "routes tokens to MoE experts"),
    ("phimoe", "model.layers.0.mlp.router", "routes tokens to MoE experts"),  # and returns a tuple
])
def test_routers_stay_dense(tmp_path, family, name, reason):
    """A router decides which experts run (and is too narrow to pack usefully); PhiMoE's returns a tuple,
    which a SparseLinear cannot stand in for. prune reports them skipped or dense; sparsify_ leaves them."""
    tok = make_tokenizer()
    model = make_moe(family, len(tok))
    rep = sparserun.prune(model, "wanda", "2:4", tokenizer=tok, nsamples=2, seqlen=16, progress=False)
    row = next(r for r in rep.rows if r["name"] == name)
    assert row["status"] in ("skipped", "dense") and row["reason"].startswith(reason), row
    assert name not in rep.masks and rep.pruned
    fresh = make_moe(family, len(tok))
    report = sparserun.sparsify_(fresh, "2:4")
    assert type(fresh.get_submodule(name)) is type(model.get_submodule(name))
    assert not any(a.name == name for a in report.sparsified)
    ids = _ids(5)
    assert _logits(fresh, ids).isfinite().all()
    with pytest.raises(ValueError, match="own forward"):
        sparserun.sparsify_(make_moe("phimoe", V), "2:4", masks={"model.layers.0.mlp.router":
                                                                  torch.ones(4, 64, dtype=torch.bool)})


def test_experts_outside_the_contract_are_reported_not_silently_left_dense():
    tok = make_tokenizer()
    model = make_moe("jetmoe", len(tok))
    rep = sparserun.prune(model, "magnitude", "2:4", tokenizer=tok, nsamples=2, seqlen=16, progress=False)
    assert rep.info["unpruned_3d_fraction"] > 0.5
    assert any("3-D tensors that no Linear layer holds" in w for w in rep.warnings())


def test_own_forward_tells_a_different_computation_from_a_restated_matmul():
    from sparserun.runtime.linear import own_forward

    class Restated(nn.Linear):  # Falcon's FalconLinear: the same y = x Wᵀ + b, written out
        def forward(self, x):
            return x @ self.weight.T + self.bias

    class Router(nn.Linear):  # PhiMoE / Llama 4: scores and indices
        def forward(self, x):
            y = super().forward(x)
            return y, y.argmax(-1)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert not own_forward(nn.Linear(8, 4)) and not own_forward(Restated(8, 4))
    assert own_forward(Router(8, 4)) and own_forward(Scaled(8, 4))
    assert own_forward(Router(8, 4, device="meta")) and not own_forward(Scaled(8, 4, device="meta"))


def test_convert_refuses_experts_of_another_size_than_config_says(tmp_path):
    """gpt-oss stores its experts as 3-D tensors, split as they are read: a config.json that disagrees with
    them stops the conversion with the expert and both shapes, and writes nothing."""
    import json

    from sparserun import convert as cv

    tok = make_tokenizer()
    src = tmp_path / "src"
    make_moe("gpt_oss", len(tok)).save_pretrained(src)
    tok.save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(cv.ConvertError, match=r"experts\.gate_up_proj: expert 0 gets a \(64, 64\) weight, its "
                                              r"Linear layer holds \(96, 64\)"):
        cv.convert(src, tmp_path / "out", "magnitude", "2:4", nsamples=2, seqlen=16, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("16x16", 0.5)])
def test_gpu_packed_experts_agree_with_the_cpu_reference(tmp_path, monkeypatch, backend, pattern, sparsity):
    """The packed MoE model on the GPU (fp32, so that routing sees the same scores: a bf16 near-tie would
    send a token to another expert and measure the router, not the kernels) gives the CPU reference's logits."""
    model = make_moe("qwen3_moe", V)
    sparserun.sparsify_(model, pattern, sparsity=sparsity)
    sparserun.save(model, tmp_path / "p")
    ids = _ids(6, (2, 11))
    want = _logits(sparserun.load(tmp_path / "p"), ids)
    monkeypatch.setenv("SPARSERUN_BACKEND", backend)
    got = _logits(sparserun.load(tmp_path / "p", device="cuda"), ids.cuda()).cpu()
    assert float((got - want).norm() / want.norm()) < 1e-2


def test_tables_give_one_line_per_experts_projection_and_json_keeps_every_expert(tmp_path, capsys):
    """A 128-expert, 48-layer model would print 12,288 expert lines: the report table and `inspect` print one
    per experts module and projection (the rows, report.json and `inspect --json` keep every expert)."""
    from sparserun.cli import main

    tok = make_tokenizer()
    model = make_moe("qwen3_moe", len(tok))
    rep = sparserun.prune(model, "wanda", "2:4", tokenizer=tok, nsamples=2, seqlen=16, progress=False)
    table = rep.table()
    assert "model.layers.1.mlp.experts.*.down_proj (x8)" in table and ".experts.3." not in table
    assert sum(".experts." in r["name"] for r in rep.rows) == 32
    sparserun.sparsify_(model, "2:4", masks=rep.masks)
    sparserun.save(model, tmp_path / "p")
    assert main(["inspect", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.experts.*.gate_up_proj (x8)  semi24  2:4      64x64" in out and ".experts.5." not in out
    assert main(["inspect", "--json", str(tmp_path / "p")]) == 0
    assert capsys.readouterr().out.count(".experts.") == 32


def test_movement_pruner_refuses_fused_experts_and_trains_unrolled_ones():
    from sparserun.prune.movement import MovementError, MovementPruner

    model = make_moe("mixtral", V)
    with pytest.raises(MovementError, match=r"experts as 3-D parameters \(2 such modules\).*unroll_all"):
        MovementPruner(model, "16x16", 0.5, total_steps=2)
    MovementPruner(model, "16x16", 0.5, total_steps=2, layers=["model.layers.0.self_attn.q_proj"]).remove()
    X.unroll_all(model)  # the documented order: unroll, then the optimizer and the pruner
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    pr = MovementPruner(model, "16x16", 0.5, total_steps=2)
    assert any(".experts.0.down_proj" in n for n in pr.layers)
    w = model.model.layers[0].mlp.experts._modules["0"].down_proj.weight
    before = w.detach().clone()
    for _ in range(2):
        model(_ids(), labels=_ids()).loss.backward()
        pr.step()
        opt.step()
        opt.zero_grad()
    masks = pr.finalize()
    assert not torch.equal(w.detach(), before), "the optimizer must train the weights the unrolled experts use"
    sparserun.sparsify_(model, "16x16", masks=masks, progress=False)
    assert isinstance(model.model.layers[0].mlp.experts._modules["0"].down_proj, SparseLinear)
