"""Sparsity-preserving fine-tuning: masks survive any optimizer, LoRA merges keep the pattern, a packed
checkpoint round-trips through training, the CLI."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparserun
from sparserun import cli, formats
from sparserun.finetune import (FinetuneError, LoRALinear, SparsityGuard, TensorWindows, TextWindows, add_lora_,
                                check_masks, finetune_checkpoint, recover, recovery_loss, train_loop)
from sparserun.prune.calibrate import DEFAULT_CALIB
from sparserun.runtime.linear import SparseLinear
from sparserun.runtime.sparsify import magnitude_mask

from .prune._models import make_llama, make_tokenizer, save_llama_dir

PATTERNS = [("unstructured", 0.5), ("2:4", None), ("4:8", None), ("16x16", 0.5), ("32x32", 0.5)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def windows(tok):
    return TextWindows(tok, DEFAULT_CALIB.read_text(), 24)


def decoder_masks(model, pattern, sparsity):
    """Magnitude masks for every Linear in the decoder layers; the model's pruned weights zeroed."""
    masks = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and ".layers." in name:
                masks[name] = magnitude_mask(m.weight, pattern, sparsity, name)
                m.weight.masked_fill_(~masks[name], 0)
    return masks


def tree_hash(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


# ---- masks survive training ---------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, sparsity", PATTERNS)
def test_masks_survive_adamw_with_weight_decay(tok, windows, pattern, sparsity):
    model = make_llama(tok, layers=1)
    masks = decoder_masks(model, pattern, sparsity)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    emb = model.model.embed_tokens.weight.detach().clone()
    res = recover(model, masks, windows, steps=4, lr=1e-2, weight_decay=0.1, batch_size=2, progress=False)
    assert res.mode == "masked" and len(res.losses) == 4
    for name, mask in masks.items():
        w = model.get_submodule(name).weight.detach()
        assert (w[~mask] == 0).all(), name
        assert not torch.equal(w[mask], before[name][mask])  # the kept weights did train
        formats.validate(formats.pack(w, mask, pattern, name=name), name)
    # embeddings frozen by default (weight decay would shrink rows the text never uses)
    assert torch.equal(model.model.embed_tokens.weight, emb) and model.model.embed_tokens.weight.requires_grad


def test_without_the_guard_adamw_breaks_the_pattern(tok, windows):
    """The control for the test above: the same training with no guard leaves pruned weights non-zero."""
    model = make_llama(tok, layers=1)
    masks = decoder_masks(model, "2:4", None)
    train_loop(model, model.parameters(), windows, steps=2, lr=1e-2, weight_decay=0.1, batch_size=2,
               progress=False)
    with pytest.raises(formats.PatternViolation, match="pruned weight"):
        check_masks(model, masks)


def test_guard_holds_against_an_optimizer_that_ignores_gradients(tok):
    """The post-step hook, not just the gradient mask: an optimizer that writes every weight anyway."""

    class Noisy(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    p.add_(torch.randn_like(p) * 0.01)

    model = make_llama(tok, layers=1)
    masks = decoder_masks(model, "16x16", 0.5)
    opt = Noisy(model.parameters())
    guard = SparsityGuard(model, masks).attach(opt)
    for _ in range(3):
        opt.step()
    guard.check()
    guard.remove()
    opt.step()  # detached: the next step is no longer cleaned up
    with pytest.raises(formats.PatternViolation):
        guard.check()


# ---- LoRA ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, sparsity", PATTERNS)
def test_lora_merge_keeps_pattern_and_outputs(tok, pattern, sparsity):
    model = make_llama(tok, layers=1)
    masks = decoder_masks(model, pattern, sparsity)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    ad = add_lora_(model, masks, rank=4)
    assert {id(p) for p in ad.parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    torch.manual_seed(1)
    with torch.no_grad():
        for m in ad.modules.values():
            m.lora_B.normal_(0, 0.5)  # a non-trivial update (B starts at zero)
    ids = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    merged = ad.merge()
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    for name, mask in masks.items():
        w = merged[name].weight.detach()
        assert (w[~mask] == 0).all()
        assert not torch.equal(w[mask], frozen[f"{name}.weight"][mask])  # the adapter changed kept weights
        formats.validate(formats.pack(w, mask, pattern, name=name), name)
    for n, p in model.named_parameters():  # everything else untouched
        if n.removesuffix(".weight") not in masks:
            assert torch.equal(p, frozen[n]), n


def test_lora_training_freezes_the_base_and_merges(tok, windows):
    model = make_llama(tok, layers=1)
    masks = decoder_masks(model, "2:4", None)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = recover(model, masks, windows, steps=3, lora_rank=2, lr=1e-2, batch_size=2, progress=False)
    assert res.mode == "lora" and res.trainable == sum(2 * (m.in_features + m.out_features)
                                                       for m in (model.get_submodule(n) for n in masks))
    for n, p in model.named_parameters():
        changed = not torch.equal(p, base[n])
        assert changed == (n.removesuffix(".weight") in masks), n  # only the pruned Linears moved (merge)
    check_masks(model, masks)


def test_unmasked_lora_merge_still_keeps_pattern(tok):
    model = make_llama(tok, layers=1)
    masks = decoder_masks(model, "32x32", 0.5)
    ad = add_lora_(model, masks, rank=2, masked=False)
    with torch.no_grad():
        for m in ad.modules.values():
            m.lora_B.normal_()
    merged = ad.merge()
    for name, mask in masks.items():
        formats.pack(merged[name].weight.detach(), mask, "32x32", name=name)
        assert (merged[name].weight[~mask] == 0).all()


def test_lora_errors(tok):
    model = make_llama(tok, layers=1)
    masks = decoder_masks(model, "2:4", None)
    with pytest.raises(FinetuneError, match="positive integer"):
        add_lora_(model, masks, rank=0)
    with pytest.raises(FinetuneError, match="exceeds the smaller side"):
        add_lora_(model, masks, rank=1000)
    with pytest.raises(FinetuneError, match="mask shape"):
        add_lora_(model, {"model.layers.0.mlp.up_proj": torch.ones(3, 3, dtype=torch.bool)}, rank=2)
    with pytest.raises(FinetuneError, match="does not exist"):
        add_lora_(model, {"nope": torch.ones(3, 3, dtype=torch.bool)}, rank=2)
    assert all(p.requires_grad for p in model.parameters())  # a refused call froze nothing


# ---- distillation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora_rank", [None, 8])
def test_distillation_reduces_distance_to_teacher(tok, windows, lora_rank):
    teacher = make_llama(tok, layers=1).requires_grad_(False)
    model = copy.deepcopy(teacher).requires_grad_(True)
    masks = decoder_masks(model, "32x32", 0.5)
    ids = windows.sample(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = float(recovery_loss(model, ids, teacher))
    recover(model, masks, TensorWindows(ids), steps=15, lora_rank=lora_rank, lr=1e-2, batch_size=4,
            teacher=teacher, progress=False)
    with torch.no_grad():
        after = float(recovery_loss(model, ids, teacher))
    assert after < 0.7 * before, (before, after)
    check_masks(model, masks)


def test_encoder_needs_a_teacher(tok, windows):
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64))
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in bert.named_modules()
             if isinstance(m, nn.Linear) and ".layer." in n}
    assert len(masks) == 6
    with pytest.raises(FinetuneError, match="not a causal LM"):
        recover(bert, masks, windows, steps=1, progress=False)
    teacher = copy.deepcopy(bert).requires_grad_(False)  # built in train mode: train_loop must eval() it
    res = recover(bert, masks, windows, steps=2, lr=1e-3, batch_size=2, teacher=teacher, progress=False)
    assert res.losses[0] == pytest.approx(0.0, abs=1e-5)  # student == teacher at the start (no dropout)
    assert teacher.training  # its mode is restored afterwards


def test_tensor_windows_and_text_too_short(tok):
    with pytest.raises(FinetuneError, match="only"):
        TextWindows(tok, "a few words", 64)
    with pytest.raises(FinetuneError, match="integer tensor"):
        TensorWindows(torch.zeros(2, 3))
    w = TensorWindows(torch.arange(12).view(3, 4))
    assert w.sample(5, torch.Generator().manual_seed(0)).shape == (5, 4)


# ---- from a packed checkpoint -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed_llama(tmp_path_factory):
    """(HF dir of a tiny Llama, packed checkpoint of it: attention 2:4, MLP 16x16 at 50 %)."""
    root = tmp_path_factory.mktemp("ft")
    src = save_llama_dir(root / "hf", layers=2)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    attn = {n: magnitude_mask(m.weight, "2:4", None, n) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and "self_attn" in n}
    mlp = {n: magnitude_mask(m.weight, "16x16", 0.5, n) for n, m in model.named_modules()
           if isinstance(m, nn.Linear) and ".mlp." in n}
    sparserun.sparsify_(model, "2:4", masks=attn, progress=False)
    sparserun.sparsify_(model, "16x16", masks=mlp, progress=False)
    sparserun.save(model, root / "packed", source_dir=src)
    return src, root / "packed"


def _patterns(d: Path) -> dict:
    return {r["name"]: (r["pattern"], r["format"], r["shape"]) for r in
            json.loads((d / "sparserun.json").read_text())["layers"]}


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoint_finetune_save_load_round_trip(tmp_path, packed_llama, lora):
    src, packed = packed_llama
    before = tree_hash(packed)
    out = tmp_path / "out"
    r = finetune_checkpoint(packed, out, DEFAULT_CALIB, steps=3, lr=1e-2, seqlen=32, batch_size=2,
                            lora_rank=4 if lora else None, distill=src if lora else None, progress=False)
    assert tree_hash(packed) == before  # the source checkpoint is only read
    assert _patterns(out) == _patterns(packed)  # every layer keeps its own pattern and format
    man = json.loads((out / "sparserun.json").read_text())
    assert man["finetune"]["steps"] == 3 and man["finetune"]["mode"] == r["mode"]
    for f in ("config.json", "tokenizer.json"):
        assert (out / f).read_bytes() == (packed / f).read_bytes()
    trained = r["model"]
    assert all(isinstance(trained.get_submodule(n), SparseLinear) for n in _patterns(out))
    loaded = sparserun.load(out)
    orig = sparserun.load(packed)
    ids = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y_trained, y_loaded, y_orig = (m(input_ids=ids).logits for m in (trained, loaded, orig))
    assert torch.equal(y_loaded, y_trained)  # what was trained is what was saved
    assert not torch.allclose(y_loaded, y_orig)  # and training changed it
    for name, mod in loaded.named_modules():
        if isinstance(mod, SparseLinear):
            formats.validate(mod.packed(), name)
            old = orig.get_submodule(name)
            if lora:  # the merge writes only where the mask keeps
                assert torch.equal(mod.weight_mask() | old.weight_mask(), old.weight_mask())


def test_the_pruning_record_survives_finetuning(tmp_path, packed_llama):
    """OUT's manifest lost how DIR was pruned (convert's `prune` record) and said nothing of the training."""
    import shutil

    _, packed = packed_llama
    src = tmp_path / "src"
    shutil.copytree(packed, src)
    man = json.loads((src / "sparserun.json").read_text())
    man["prune"] = {"method": "wanda", "pattern": "2:4", "sparsity": 0.5, "calibration": {"nsamples": 4}}
    (src / "sparserun.json").write_text(json.dumps(man))
    finetune_checkpoint(src, tmp_path / "out", DEFAULT_CALIB, steps=1, seqlen=16, progress=False)
    out = json.loads((tmp_path / "out" / "sparserun.json").read_text())
    assert out["prune"] == man["prune"] and out["finetune"]["from"] == str(src)


def test_checkpoint_dtype_and_ties_kept(tmp_path):
    """An fp16 checkpoint of a Llama with tied embeddings: trained in fp32, written back in fp16, still tied."""
    src = save_llama_dir(tmp_path / "hf", layers=1, tie_word_embeddings=True)
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float16)
    sparserun.sparsify_(m, "2:4", progress=False)
    sparserun.save(m, tmp_path / "half", source_dir=src)
    finetune_checkpoint(tmp_path / "half", tmp_path / "out", DEFAULT_CALIB, steps=1, seqlen=16, progress=False)
    man = json.loads((tmp_path / "out" / "sparserun.json").read_text())
    assert {r["dtype"] for r in man["layers"]} == {"float16"}
    assert {t["dtype"] for t in man["tensors"].values() if t["dtype"].startswith(("float", "bfloat"))} == {"float16"}
    assert man["aliases"] == json.loads((tmp_path / "half" / "sparserun.json").read_text())["aliases"] != {}
    out = sparserun.load(tmp_path / "out")
    assert out.lm_head.weight is out.model.embed_tokens.weight


def test_cli_finetune(tmp_path, packed_llama):
    src, packed = packed_llama
    text = tmp_path / "t.txt"
    text.write_text(DEFAULT_CALIB.read_text())
    rc, out, err = run_cli("finetune", packed, tmp_path / "o", "--text", text, "--steps", 2, "--lora-rank", 2,
                           "--distill", src, "--seqlen", 16, "--quiet")
    assert rc == 0, err
    assert "LoRA: 2 steps" in out and "repacked with their patterns" in out
    assert _patterns(tmp_path / "o") == _patterns(packed)
    # again into the same OUT: refused without --overwrite, accepted with it
    rc, _, err = run_cli("finetune", packed, tmp_path / "o", "--text", text, "--steps", 1, "--quiet")
    assert rc == 1 and "exists and is not empty" in err
    rc, _, err = run_cli("finetune", packed, tmp_path / "o", "--text", text, "--steps", 1, "--seqlen", 16,
                         "--quiet", "--overwrite")
    assert rc == 0, err


def test_cli_tokenizer_from_elsewhere_is_written_to_out(tmp_path, packed_llama):
    """DIR saved without a tokenizer, trained with --tokenizer T: OUT carries T's tokenizer files (it had none, so
    `sparserun generate OUT` failed), DIR's config, and nothing of DIR's tokenizer mixed in."""
    import shutil

    from sparserun.eval import load_tokenizer

    src, packed = packed_llama
    bare = tmp_path / "bare"
    shutil.copytree(packed, bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    (bare / "vocab.txt").write_text("a stale vocabulary that T does not have\n")
    text = tmp_path / "t.txt"
    text.write_text(DEFAULT_CALIB.read_text())
    rc, _, err = run_cli("finetune", bare, tmp_path / "o", "--text", text, "--steps", 1, "--seqlen", 16,
                         "--tokenizer", src, "--quiet")
    assert rc == 0, err
    out = tmp_path / "o"
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert not (out / "vocab.txt").exists()  # one tokenizer's files, never a mix of two
    assert (out / "config.json").read_bytes() == (bare / "config.json").read_bytes()
    assert load_tokenizer(out)("hello world").input_ids == load_tokenizer(src)("hello world").input_ids


def test_not_enough_disk_is_refused_before_training(tmp_path, packed_llama, monkeypatch):
    import shutil
    from collections import namedtuple

    _, packed = packed_llama
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    monkeypatch.setattr("sparserun.finetune.recover", lambda *a, **k: pytest.fail("trained anyway"))
    with pytest.raises(FinetuneError, match=r"not enough disk space for .*: the fine-tuned checkpoint needs"):
        finetune_checkpoint(packed, tmp_path / "o", DEFAULT_CALIB, steps=1, progress=False)
    assert not (tmp_path / "o").exists()


def test_a_tokenizer_dir_whose_files_cannot_be_copied_fails_before_training(tmp_path, packed_llama,
                                                                           monkeypatch):
    """--tokenizer's files are copied into OUT at the end; a dangling link among them failed after training."""
    import shutil

    src, _ = packed_llama
    tok_dir = tmp_path / "tok"
    shutil.copytree(src, tok_dir)
    (tok_dir / "preprocessor_config.json").symlink_to(tmp_path / "gone.json")
    monkeypatch.setattr("sparserun.finetune.recover", lambda *a, **k: pytest.fail("trained anyway"))
    _, packed = packed_llama
    with pytest.raises(Exception, match=r"preprocessor_config\.json is a link to .*gone\.json, which does not "
                                        r"exist"):
        finetune_checkpoint(packed, tmp_path / "o", DEFAULT_CALIB, steps=1, tokenizer=tok_dir, progress=False)


@pytest.fixture(scope="module")
def packed_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    tok = make_tokenizer()
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64)).eval()
    bert.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    sparserun.sparsify_(bert, "2:4", filter_fn=lambda m, n: ".layer." in n, progress=False)
    sparserun.save(bert, root / "packed", source_dir=root / "hf")
    return root / "hf", root / "packed"


@pytest.fixture(scope="module")
def other_teachers(tmp_path_factory):
    """Teachers that read text as other ids: (another vocab_size, the same vocab_size with another tokenizer)."""
    root = tmp_path_factory.mktemp("teachers")
    small, default = make_tokenizer(300), make_tokenizer()
    make_llama(small).save_pretrained(root / "vocab")
    small.save_pretrained(root / "vocab")
    make_llama(default).save_pretrained(root / "tok")
    small.save_pretrained(root / "tok")
    make_llama(default, max_position_embeddings=16).save_pretrained(root / "short")  # same ids, 16 positions
    default.save_pretrained(root / "short")
    return root / "vocab", root / "tok", root / "short"


@pytest.mark.parametrize("args, msg", [
    (["{missing}", "{out}", "--text", "{text}"], "checkpoint directory not found"),
    (["{packed}", "{packed}/sub", "--text", "{text}"], "overlaps the checkpoint"),
    (["{packed}", "{out}", "--text", "{tmp}/nope.txt"], "training text file not found"),
    (["{packed}", "{out}", "--text", "{text}", "--steps", "0"], "steps must be a positive integer"),
    (["{packed}", "{out}", "--text", "{text}", "--lora-rank", "0"], "lora_rank must be a positive integer"),
    (["{packed}", "{out}", "--text", "{text}", "--lr", "-1"], "lr must be > 0"),
    (["{packed}", "{out}", "--text", "{text}", "--lora-rank", "2", "--lora-alpha", "0"], "lora_alpha must be > 0"),
    (["{packed}", "{out}", "--text", "{text}", "--lora-alpha", "8"], "applies to LoRA: give lora_rank"),
    (["{packed}", "{out}", "--text", "{text}", "--seqlen", "32", "--distill", "{teacher_short}"],
     "seqlen 32 exceeds the --distill teacher's max_position_embeddings 16"),
    (["{packed}", "{out}", "--text", "{text}", "--steps", "6", "--lr", "1e9"], "the loss became"),
    (["{packed}", "{out}", "--text", "{text}", "--distill", "{tmp}/nope"], "teacher directory not found"),
    (["{packed}", "{out}", "--text", "{text}", "--distill", "{teacher_vocab}"], "but --distill"),
    (["{packed}", "{out}", "--text", "{text}", "--distill", "{teacher_tok}"], "encode the same text differently"),
    (["{bert}", "{out}", "--text", "{text}"], "not a causal LM"),
    (["{packed}", "{out}", "--text", "{short}"], "has only"),
    (["{packed}", "{out}", "--text", "{text}", "--seqlen", "1000"], "exceeds the model's max_position"),
    (["{packed}", "{out}", "--text", "{text}", "--device", "cuda"] if not torch.cuda.is_available() else
     ["{packed}", "{out}", "--text", "{text}", "--steps", "-3"], "cuda" if not torch.cuda.is_available()
     else "steps"),
])
def test_cli_errors(tmp_path, packed_llama, packed_bert, other_teachers, args, msg):
    _, packed = packed_llama
    text, short = tmp_path / "t.txt", tmp_path / "s.txt"
    text.write_text(DEFAULT_CALIB.read_text())
    short.write_text("Too short.")
    subs = {"missing": tmp_path / "missing", "out": tmp_path / "out", "text": text, "tmp": tmp_path,
            "packed": packed, "bert": packed_bert[1], "short": short, "teacher_vocab": other_teachers[0],
            "teacher_tok": other_teachers[1], "teacher_short": other_teachers[2]}
    before = tree_hash(packed)
    rc, _, err = run_cli("finetune", *[a.format(**subs) for a in args], "--quiet")
    assert rc == 1
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err  # one line, no traceback
    assert not (tmp_path / "out").exists()
    assert tree_hash(packed) == before


def test_output_that_is_a_file_is_refused_before_training(tmp_path, packed_llama, monkeypatch):
    from sparserun import finetune as ft

    _, packed = packed_llama
    afile = tmp_path / "afile"
    afile.write_text("mine")
    monkeypatch.setattr(ft, "recover", lambda *a, **k: pytest.fail("trained before checking OUT"))
    for extra in ([], ["--overwrite"]):  # --overwrite replaces a directory, never a file
        rc, _, err = run_cli("finetune", packed, afile, "--text", DEFAULT_CALIB, "--quiet", *extra)
        assert rc == 1 and "exists and is a file, not a directory" in err and err.count("\n") == 1, err
    assert afile.read_text() == "mine"


def test_bert_checkpoint_with_teacher(tmp_path, packed_bert):
    hf, packed = packed_bert
    r = finetune_checkpoint(packed, tmp_path / "o", DEFAULT_CALIB, steps=2, seqlen=16, lora_rank=2, distill=hf,
                            progress=False)
    assert r["mode"] == "lora" and r["sparse_layers"] == 6
    assert _patterns(tmp_path / "o") == _patterns(packed)


# ---- on a GPU (skipped without one) -------------------------------------------------------------------

@pytest.mark.gpu
def test_training_paths_on_cuda(tmp_path, tok, windows, packed_llama):
    """Masked fine-tuning, LoRA recovery with distillation, movement pruning and `finetune_checkpoint`, all
    on a CUDA device: every pattern still packs and validates afterwards."""
    from sparserun.prune.movement import MovementPruner

    dev = torch.device("cuda")
    teacher = make_llama(tok, layers=1).to(dev).requires_grad_(False)
    for lora_rank in (None, 4):
        model = copy.deepcopy(teacher).requires_grad_(True)
        masks = decoder_masks(model, "16x16", 0.5)
        recover(model, masks, windows, steps=3, lr=1e-2, weight_decay=0.1, lora_rank=lora_rank, batch_size=2,
                teacher=teacher, progress=False)
        for name, mask in masks.items():
            w = model.get_submodule(name).weight.detach()
            assert w.is_cuda and not (w[~mask.to(dev)] != 0).any(), name
            formats.validate(formats.pack(w.cpu(), mask.cpu(), "16x16", name=name), name)

    model = copy.deepcopy(teacher).requires_grad_(True)
    pr = MovementPruner(model, "16x16", 0.5, total_steps=4, warmup_steps=1)
    train_loop(model, model.parameters(), windows, steps=4, lr=1e-3, batch_size=2, teacher=teacher,
               after_backward=lambda s: pr.step(), progress=False)
    masks = pr.finalize()
    for name, mask in masks.items():
        w = model.get_submodule(name).weight.detach()
        assert w.is_cuda
        formats.validate(formats.pack(w.cpu(), mask, "16x16", name=name), name)
        assert 1 - mask.float().mean().item() == pytest.approx(0.5)

    src, packed = packed_llama
    r = finetune_checkpoint(packed, tmp_path / "out", DEFAULT_CALIB, steps=2, lr=1e-2, seqlen=32, batch_size=2,
                            lora_rank=4, distill=src, device="cuda", progress=False)
    assert r["mode"] == "lora" and _patterns(tmp_path / "out") == _patterns(packed)
    for name, mod in sparserun.load(tmp_path / "out").named_modules():
        if isinstance(mod, SparseLinear):
            formats.validate(mod.packed(), name)


def test_repack_refused_at_a_later_layer_leaves_the_model_as_it_was():
    from sparserun.finetune import SparseLayerInfo, repack_
    from sparserun.formats import PatternViolation

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 16))
    infos = {"0": SparseLayerInfo(magnitude_mask(model[0].weight, "2:4"), "2:4"),
             "1": SparseLayerInfo(torch.ones(16, 8, dtype=torch.bool), "2:4")}  # violates 2:4
    with pytest.raises(PatternViolation, match="1: 2:4 pattern violated"):
        repack_(model, infos)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


@pytest.mark.parametrize("bad, match", [
    (dict(lr=-1.0), "need lr > 0"), (dict(steps=0), "steps"),
    (dict(lora_rank=2, lora_alpha=0), "lora_alpha must be > 0"),
    (dict(masks={"nope": torch.ones(3, 3, dtype=torch.bool)}), "nope")])
def test_recover_refuses_before_it_touches_the_model(tok, windows, bad, match):
    """The embeddings were left frozen by a refused mask, and lr/steps were checked after the guard or the
    adapters had been put on the model."""
    from sparserun.finetune import recover

    model = make_llama(tok, layers=1)
    masks = decoder_masks(model, "2:4", None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    kw = {"steps": 1, **bad}
    with pytest.raises(FinetuneError, match=match):
        recover(model, kw.pop("masks", masks), windows, **kw)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert set(model.state_dict()) == set(before)  # no adapters left in place
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
