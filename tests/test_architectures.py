"""Model families beyond Llama and BERT through convert -> load -> run.

Each family breaks one assumption the Llama path does not test: GPT-2 stores its Linear weights transposed
(Conv1D), Falcon's layers return tuples, GPT-NeoX is saved under older tensor names that transformers renames
at load time, T5 and BART are encoder-decoders (two stacks, the decoder calibrated on the pruned encoder's
output), T5's blocks return position biases and its code reads `wo.weight`, and MoE families hold their
experts as 3-D tensors that transformers merges from per-expert ones at load time (Mixtral, Qwen3-MoE) or
stores fused and transposed (gpt-oss).
"""
import warnings

import pytest
import torch

import sparserun
from sparserun import convert as cv
from sparserun.prune import calibrate

from .prune._models import make_tokenizer, one_cpu_thread  # noqa: F401 (autouse fixture)

H, I = 64, 128


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def save_dir(path, model, tok):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def causal(tok, family: str):
    import transformers as T

    v = dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    cfg = {
        "gpt2": lambda: T.GPT2Config(n_embd=H, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2, **v),
        "falcon": lambda: T.FalconConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                         tie_word_embeddings=False, initializer_range=0.2, **v),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=128,
                                            initializer_range=0.2, **v),
    }[family]()
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family,method,pattern,sparsity,lm_head", [
    ("gpt2", "wanda", "2:4", None, False),          # Conv1D layers, packed as [out, in]
    ("falcon", "taylor", "32x32", 0.5, False),      # tuple-returning layers: gradients through the stubs
    ("falcon", "wanda", "2:4", None, True),         # ... and the LM head pruned behind the stubs
    ("gpt_neox", "sparsegpt", "2:4", None, False),  # embed_out on disk, lm_head in the model
])
def test_causal_family_convert_load_same_tokens(tmp_path, tok, family, method, pattern, sparsity, lm_head):
    import transformers as T

    src = save_dir(tmp_path / "src", causal(tok, family), tok)
    out = tmp_path / "out"
    rep = cv.convert(src, out, method, pattern, sparsity, nsamples=4, seqlen=32, progress=False,
                     include_lm_head=lm_head)
    assert rep.totals()["pruned"] == 8 + lm_head, rep.table()  # 2 layers x 4 projections (+ the head)
    assert rep.info["dense_outside"] == []
    model = sparserun.load(out)
    ref = T.AutoModelForCausalLM.from_pretrained(src).eval()
    ref_rep = sparserun.prune(ref, method, pattern, sparsity, tokenizer=tok, nsamples=4, seqlen=32,
                              include_lm_head=lm_head, progress=False)
    assert sorted(ref_rep.masks) == sorted(r["name"] for r in rep.pruned)
    for name in ref_rep.masks:
        layer = model.get_submodule(name)
        assert isinstance(layer, sparserun.SparseLinear), name
        want = ref.get_submodule(name).weight.detach()
        want = want if isinstance(ref.get_submodule(name), torch.nn.Linear) else want.t()  # Conv1D: [in, out]
        assert torch.equal(layer.dense_weight(), want), name
    ids = tok("The keeper wrote in the ledger", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        want = ref.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_gpt2_sparsify_save_load_is_exact(tmp_path, tok):
    """sparsify_ swaps Conv1D too (y = x W + b with W stored [in, out] is y = x Wpᵀ + b with Wp = Wᵀ)."""
    import copy

    model = causal(tok, "gpt2")
    ref = copy.deepcopy(model)
    report = sparserun.sparsify_(model, "32x32", sparsity=0.5)
    assert len(report.sparsified) == 8 and report.sparsified[0].shape == (3 * H, H)  # c_attn: out 192, in 64
    with torch.no_grad():
        for a in report.sparsified:
            ref.get_submodule(a.name).weight.copy_(model.get_submodule(a.name).dense_weight().t())
    sparserun.save(model, tmp_path / "packed")
    back = sparserun.load(tmp_path / "packed")
    ids = torch.randint(3, len(tok), (2, 11))
    with torch.no_grad():
        want = ref(ids).logits
        assert torch.equal(model(ids).logits, want)
        assert torch.equal(back(ids).logits, want)


def seq2seq(tok, family: str):
    import transformers as T

    v = dict(vocab_size=len(tok), pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    cfg = {
        "t5": lambda: T.T5Config(d_model=H, d_ff=I, d_kv=16, num_layers=2, num_heads=4, **v),
        # more encoder than decoder layers: the encoder is the larger stack, and must still come first
        "bart": lambda: T.BartConfig(d_model=H, encoder_ffn_dim=I, decoder_ffn_dim=I, encoder_layers=3,
                                     decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                     max_position_embeddings=128, bos_token_id=1, **v),
        # sinusoidal position tables that transformers never saves (it computes them when it builds the model)
        "marian": lambda: T.MarianConfig(d_model=H, encoder_ffn_dim=I, decoder_ffn_dim=I, encoder_layers=2,
                                         decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                         max_position_embeddings=128, **v),
    }[family]()
    torch.manual_seed(0)
    return T.AutoModelForSeq2SeqLM.from_config(cfg).eval()


@pytest.mark.parametrize("family,method,pattern,sparsity,stacks,pruned", [
    ("t5", "wanda", "2:4", None, ["encoder.block", "decoder.block"], 2 * 6 + 2 * 10),
    ("t5", "taylor", "32x32", 0.5, ["encoder.block", "decoder.block"], 2 * 6 + 2 * 10),
    ("bart", "sparsegpt", "2:4", None, ["model.encoder.layers", "model.decoder.layers"], 3 * 6 + 2 * 10),
    ("marian", "wanda", "2:4", None, ["model.encoder.layers", "model.decoder.layers"], 2 * 6 + 2 * 10),
])
def test_encoder_decoder_both_stacks_convert_equals_prune(tmp_path, tok, family, method, pattern, sparsity,
                                                          stacks, pruned):
    """An encoder-decoder has its encoder and its decoder pruned, in that order: streaming convert (which
    never holds the encoder's layers during the decoder pass) chooses the same masks as in-memory pruning,
    and the packed model generates the masked dense model's tokens."""
    import transformers as T

    src = save_dir(tmp_path / "src", seq2seq(tok, family), tok)
    out = tmp_path / "out"
    rep = cv.convert(src, out, method, pattern, sparsity, nsamples=2, seqlen=32, progress=False)
    assert rep.info["stacks"] == stacks and rep.totals()["pruned"] == pruned, rep.table()
    assert rep.info["dense_outside"] == []
    ref = T.AutoModelForSeq2SeqLM.from_pretrained(src).eval()
    ref_rep = sparserun.prune(ref, method, pattern, sparsity, tokenizer=tok, nsamples=2, seqlen=32,
                              progress=False)
    assert sorted(ref_rep.masks) == sorted(r["name"] for r in rep.pruned)
    model = sparserun.load(out)
    for name in ref_rep.masks:
        layer = model.get_submodule(name)
        assert isinstance(layer, sparserun.SparseLinear), name
        assert torch.equal(layer.dense_weight(), ref.get_submodule(name).weight.detach()), name
    ids = tok("The keeper wrote in the ledger", return_tensors="pt")["input_ids"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # T5 reads wo.weight (decompressed, with a warning)
        got = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        want = ref.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_eval_compares_seq2seq_hidden_states_not_vocabulary_scores(tok):
    from sparserun.eval import last_hidden

    ids = torch.randint(3, len(tok), (1, 9))
    with torch.no_grad():
        for family in ("t5", "bart"):
            assert last_hidden(seq2seq(tok, family), ids).shape == (1, 9, H), family


def test_decoder_pass_sees_the_pruned_encoders_output(tok, monkeypatch):
    """The decoder of an encoder-decoder is calibrated on what the *pruned* encoder outputs (through its
    final norm), computed once from the encoder stack's last hidden states."""
    model = seq2seq(tok, "t5")
    seen = {}
    orig = calibrate._encoder_outputs

    def spy(*args, **kw):
        seen["fn"] = orig(*args, **kw)
        return seen["fn"]

    monkeypatch.setattr(calibrate, "_encoder_outputs", spy)
    ids = torch.randint(3, len(tok), (3, 24), generator=torch.Generator().manual_seed(2))
    sparserun.prune(model, "magnitude", "2:4", calib=ids, progress=False)
    assert (model.encoder.block[0].layer[0].SelfAttention.q.weight == 0).float().mean() == 0.5
    with torch.no_grad():
        for s in range(3):
            want = model.get_encoder()(input_ids=ids[s:s + 1]).last_hidden_state
            torch.testing.assert_close(seen["fn"](s)["encoder_outputs"].last_hidden_state, want)


def test_audio_encoder_decoder_is_a_one_line_calibration_error(tmp_path, tok):
    """Whisper's encoder reads audio features: calibration on text cannot run it, and says so before any layer
    is pruned (nothing is written)."""
    import transformers as T

    cfg = T.WhisperConfig(d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=I, decoder_ffn_dim=I, vocab_size=len(tok),
                          num_mel_bins=16, max_source_positions=32, max_target_positions=64, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    src = save_dir(tmp_path / "src", T.WhisperForConditionalGeneration(cfg).eval(), tok)
    with pytest.raises(calibrate.CalibrationError, match=r"WhisperEncoder takes no input_ids.*sparsify_"):
        cv.convert(src, tmp_path / "out", "wanda", "2:4", nsamples=2, seqlen=16, progress=False)
    assert not (tmp_path / "out").exists()


def test_t5_weight_reads_decompress_once_per_forward_with_one_warning(tmp_path, tok, monkeypatch):
    """T5's feed-forward reads wo.weight.dtype three times, then calls wo: a SparseLinear's weight decompresses
    on read, warns once per process, and is kept only until that layer runs, so each forward decompresses it
    once. A weight written to, or a layer whose packed tensors changed, is decompressed again."""
    from sparserun.runtime import dispatch

    src = save_dir(tmp_path / "src", seq2seq(tok, "t5"), tok)
    cv.convert(src, tmp_path / "out", "magnitude", "2:4", nsamples=2, seqlen=32, progress=False)
    model = sparserun.load(tmp_path / "out")
    wo = model.decoder.block[0].layer[2].DenseReluDense.wo
    assert isinstance(wo, sparserun.SparseLinear)
    sparserun.SparseLinear._weight_warned = False
    with pytest.warns(UserWarning, match="decompresses the dense weight"):
        w = wo.weight
    assert torch.equal(w, wo.dense_weight()) and wo.weight is w
    n = {"calls": 0}
    orig = dispatch.decompress

    def counted(layer):
        n["calls"] += layer is wo
        return orig(layer)

    monkeypatch.setattr(dispatch, "decompress", counted)
    ids = tok("The keeper wrote", return_tensors="pt")["input_ids"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        model(input_ids=ids, decoder_input_ids=ids[:, :3])
        assert n["calls"] == 1, "three reads of wo.weight in one forward: one decompression"
        assert sparserun.SparseLinear._last_read is None, "released once wo ran"
        w = wo.weight
        w.add_(1.0)  # the caller's copy: the layer is unchanged, and the written tensor is not handed out again
        assert not torch.equal(wo.weight, w) and torch.equal(wo.weight, wo.dense_weight())
        before = wo.weight
        wo.values.mul_(2.0)  # the packed tensors changed: decompress again
        assert torch.equal(wo.weight, 2 * before)
    n["calls"] = 0
    with torch.inference_mode():  # inference tensors have no write counter (`sparserun generate` runs here)
        model(input_ids=ids, decoder_input_ids=ids[:, :3])
        assert n["calls"] == 1


def test_a_model_loaded_under_inference_mode_runs_there(tmp_path, tok):
    """Tensors made under torch.inference_mode have no version counter: the caches keyed on it (dense
    fallback, repacked operands, the weight read, sibling groups) must not ask them for one."""
    from sparserun.runtime import dispatch

    src = save_dir(tmp_path / "src", seq2seq(tok, "t5"), tok)
    cv.convert(src, tmp_path / "out", "magnitude", "2:4", nsamples=2, seqlen=32, progress=False)
    ids = tok("The keeper wrote", return_tensors="pt")["input_ids"]
    want = sparserun.load(tmp_path / "out")(input_ids=ids, decoder_input_ids=ids[:, :3]).logits.detach()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparserun.load(tmp_path / "out", group_siblings=True)
        wo = model.decoder.block[0].layer[2].DenseReluDense.wo
        assert wo.values.is_inference() and dispatch._data_key(wo)[3] is None
        got = model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,method,pattern,sparsity", [
    ("mixtral", "wanda", "2:4", None),         # per-expert w1/w3/w2 on disk, under block_sparse_moe
    ("qwen3_moe", "sparsegpt", "2:4", None),   # per-expert gate/up/down on disk
    ("gpt_oss", "wanda", "16x16", 0.5),        # fused 3-D tensors on disk, transposed, with biases
    ("deepseek_v3", "taylor", "16x16", 0.5),   # a dense first layer; gradients through the routed experts
    ("jamba", "wanda", "2:4", None),           # a hybrid stack of two layer classes (Mamba, attention + experts)
])
def test_moe_experts_convert_per_expert_and_equal_in_memory_prune(tmp_path, tok, family, method, pattern, sparsity):
    """Streaming convert reads each expert's weights as stored (per expert, or split from the 3-D tensor),
    prunes and packs them one expert at a time, and gives what in-memory prune gives; the packed model
    generates the pruned model's tokens."""
    import transformers as T

    from sparserun.runtime import experts

    from .prune._models import make_moe

    src = save_dir(tmp_path / "src", make_moe(family, len(tok)), tok)
    out = tmp_path / "out"
    rep = cv.convert(src, out, method, pattern, sparsity, nsamples=4, seqlen=32, progress=False)
    ref = T.AutoModelForCausalLM.from_pretrained(src).eval()
    ref_rep = sparserun.prune(ref, method, pattern, sparsity, tokenizer=tok, nsamples=4, seqlen=32, progress=False)
    assert sorted(ref_rep.masks) == sorted(r["name"] for r in rep.pruned)
    n_exp = sum(2 * experts.num_experts(m) for _, m in experts.experts_modules(ref))
    assert sum(".experts." in r["name"] for r in rep.pruned) == n_exp > 0
    assert rep.info["pruned_param_fraction"] > 0.5, "the experts are most of the weights"
    model = sparserun.load(out)
    experts.unroll_all(ref)
    for name in ref_rep.masks:
        assert torch.equal(model.get_submodule(name).dense_weight(), ref.get_submodule(name).weight.detach()), name
    ids = tok("The keeper wrote in the ledger", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        want = ref.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    packed = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert packed < 0.8 * sum(f.stat().st_size for f in src.glob("*.safetensors"))


def test_moe_source_missing_one_experts_tensor_is_a_one_line_error(tmp_path, tok):
    """An expert whose tensor is missing from the source leaves its module's 3-D weight unmatched: convert
    names it and the in-memory route, before reading any weight, and writes nothing."""
    from safetensors.torch import load_file, save_file

    from .prune._models import make_moe

    src = save_dir(tmp_path / "src", make_moe("mixtral", len(tok)), tok)
    tensors = load_file(src / "model.safetensors")
    gone = [k for k in tensors if k.endswith("experts.1.w3.weight")][0]
    del tensors[gone]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(cv.ConvertError, match=r"experts\.gate_up_proj.*sparserun.prune \+ sparserun.save"):
        cv.convert(src, tmp_path / "out", "magnitude", "2:4", nsamples=2, seqlen=32, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pattern,schedule", [("2:4", None), ("32x32", 0.5)])
def test_gpt2_movement_pruning_masks_conv1d_as_out_in(tok, pattern, schedule):
    """Movement pruning finds GPT-2's Conv1D layers; its masked forward is the Conv1D's x W + b with W's
    pruned entries zeroed, and finalize() zeroes them in the [in, out] storage."""
    import copy

    from sparserun.prune.movement import MovementPruner

    model = causal(tok, "gpt2")
    kw = {"schedule": schedule} if schedule else {}
    mp = MovementPruner(model, pattern, total_steps=4, warmup_steps=0, update_interval=1, cooldown_steps=1, **kw)
    assert len(mp.layers) == 8 and "transformer.h.0.attn.c_attn" in mp.layers
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids = torch.randint(3, len(tok), (2, 16))
    for _ in range(4):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        mp.step()
    masks = mp.masks()
    assert masks["transformer.h.0.attn.c_attn"].shape == (3 * H, H)
    ref = copy.deepcopy(model)
    for name, mask in masks.items():
        ref.get_submodule(name).__dict__.pop("forward", None)
        with torch.no_grad():
            ref.get_submodule(name).weight.t()[~mask] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    final = mp.finalize()
    c_fc = model.transformer.h[1].mlp.c_fc
    assert (c_fc.weight.t()[~final["transformer.h.1.mlp.c_fc"]] == 0).all()
    assert len(sparserun.sparsify_(model, pattern, masks=final).sparsified) == 8


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_gpt2_packed_finetune_keeps_patterns(tmp_path, tok, lora_rank):
    """Fine-tuning a packed GPT-2 unpacks each SparseLinear (standing where a Conv1D was) to an nn.Linear,
    trains under the masks and packs it again: same masks, changed kept weights."""
    from sparserun.finetune import finetune_checkpoint
    from sparserun.prune.calibrate import DEFAULT_CALIB

    src = save_dir(tmp_path / "src", causal(tok, "gpt2"), tok)
    cv.convert(src, tmp_path / "packed", "wanda", "32x32", 0.5, nsamples=2, seqlen=32, progress=False)
    finetune_checkpoint(tmp_path / "packed", tmp_path / "tuned", DEFAULT_CALIB, steps=3, lora_rank=lora_rank,
                        batch_size=2, seqlen=32, lr=1e-2, progress=False)
    before, after = sparserun.load(tmp_path / "packed"), sparserun.load(tmp_path / "tuned")
    a, b = before.transformer.h[0].mlp.c_fc, after.transformer.h[0].mlp.c_fc
    assert isinstance(b, sparserun.SparseLinear) and b.shape == a.shape == (4 * H, H)
    assert torch.equal(a.weight_mask(), b.weight_mask())
    assert not torch.equal(a.dense_weight(), b.dense_weight())


def test_a_linear_the_forward_never_calls_stays_dense(tmp_path, tok):
    """Mamba's mixer reads dt_proj.weight itself instead of calling dt_proj: calibration never sees it run.
    Packed, every forward would decompress it (and nothing measured its pruning), so it stays dense, and the
    report says why; the layers that did run are pruned as usual."""
    import transformers as T

    cfg = T.MambaConfig(hidden_size=H, num_hidden_layers=2, vocab_size=len(tok), state_size=8, time_step_rank=8,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    src = save_dir(tmp_path / "src", T.MambaForCausalLM(cfg).eval(), tok)
    rep = cv.convert(src, tmp_path / "out", "wanda", "2:4", nsamples=2, seqlen=32, progress=False)
    rows = {r["name"]: r for r in rep.rows}
    dt = rows["backbone.layers.0.mixer.dt_proj"]
    assert dt["status"] == "dense" and "never called it" in dt["reason"], dt
    assert rows["backbone.layers.0.mixer.in_proj"]["status"] == "pruned"
    model = sparserun.load(tmp_path / "out")
    assert type(model.backbone.layers[0].mixer.dt_proj) is torch.nn.Linear
    assert isinstance(model.backbone.layers[0].mixer.in_proj, sparserun.SparseLinear)
    ids = tok("The keeper wrote", return_tensors="pt")["input_ids"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no SparseLinear.weight read
        model(ids)
