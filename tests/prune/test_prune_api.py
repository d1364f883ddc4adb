"""sparserun.prune on tiny random models: every method x pattern, the report, bad input, the driver."""
import gzip
import json
import os
import re
import threading

import pytest
import torch
import torch.nn as nn

import sparserun
from sparserun import formats
from sparserun.prune import calibrate
from sparserun.prune.calibrate import CalibrationError, UnknownModelFamily

from ._models import one_cpu_thread, make_llama, make_tokenizer  # noqa: F401 (autouse fixture)

METHODS = ["magnitude", "wanda", "sparsegpt", "taylor", "obd"]
PATTERNS = [("2:4", None), ("4:8", None), ("unstructured", 0.5), ("32x32", 0.5)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _prune(model, tok, method, pattern, sparsity=None, **kw):
    kw.setdefault("nsamples", 4)
    kw.setdefault("seqlen", 32)
    return sparserun.prune(model, method, pattern, sparsity, tokenizer=tok, progress=False, **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern,sparsity", PATTERNS)
def test_every_method_every_pattern(tok, method, pattern, sparsity):
    model = make_llama(tok)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    rep = _prune(model, tok, method, pattern, sparsity)
    assert len(rep.rows) == 14 and all(r["status"] == "pruned" for r in rep.rows)
    for r in rep.rows:
        w = model.get_submodule(r["name"]).weight.detach()
        mask = rep.masks[r["name"]]
        assert (w[~mask] == 0).all()
        if method != "sparsegpt":  # only sparsegpt changes the kept weights
            assert torch.equal(w[mask], before[r["name"]][mask])
        p = formats.pack(w, mask, pattern)
        assert p.nbytes() == r["bytes_after"] < r["bytes_before"]
        assert abs(r["sparsity"] - 0.5) < 1e-6
        assert 0 < r["rel_error"] < 1.5
    assert torch.equal(model.lm_head.weight, before["lm_head"])  # lm_head stays dense by default
    out = json.loads(rep.to_json())
    assert out["totals"]["pruned"] == 14 and out["calibration"]["nsamples"] == 4
    assert "model.layers.1.mlp.down_proj" in rep.table()


def test_rel_error_is_measured_on_the_pruned_models_inputs(tok):
    model = make_llama(tok)
    dense_w = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    ids = torch.randint(3, len(tok), (3, 32), generator=torch.Generator().manual_seed(0))
    rep = _prune(model, tok, "wanda", "2:4", calib=ids)
    # the inputs layer 1 sees *after* layer 0 was pruned: layer-sequential calibration
    xs = []
    h = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: xs.append(i[0]))
    with torch.no_grad():
        for s in range(3):
            model(input_ids=ids[s:s + 1])
    h.remove()
    x = torch.cat(xs)
    w = model.model.layers[1].self_attn.q_proj.weight
    want = float((x @ (dense_w - w.detach()).T).norm() / (x @ dense_w.T).norm())
    row = next(r for r in rep.rows if r["name"] == "model.layers.1.self_attn.q_proj")
    assert row["rel_error"] == pytest.approx(want, rel=1e-3)
    assert rep.calib["source"].startswith("pre-tokenised")


def test_one_layer_on_the_device_at_a_time(tok):
    model = make_llama(tok, layers=3)
    path, layers = calibrate.find_layers(model)
    inner = calibrate.InMemoryLayers(layers)
    loaded, log = set(), []

    class Store:
        def load(self, i, device):
            assert not loaded, f"layer {i} loaded while {loaded} still is"
            loaded.add(i)
            log.append(("load", i))
            return inner.load(i, device)

        def unload(self, i):
            loaded.discard(i)
            inner.unload(i)

    ids = torch.randint(3, len(tok), (2, 16))
    cal = calibrate.calibration_data(ids)
    calibrate.prune_layerwise(model, "obd", "2:4", 0.5, cal, device="cpu", store=Store(), progress=False)
    # layer 0 once on one window (what the layers return, for recording each layer's arguments), forward for
    # gradients 0,1,2, backward 2,1,0, then pruning 0,1,2
    assert [i for _, i in log] == [0, 0, 1, 2, 2, 1, 0, 0, 1, 2]


@pytest.mark.parametrize("method", ["taylor", "obd"])
def test_layerwise_gradients_equal_full_model_gradients(tok, method):
    model = make_llama(tok, layers=2)
    ids = torch.randint(3, len(tok), (3, 16), generator=torch.Generator().manual_seed(1))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    want = {n: torch.zeros_like(model.get_submodule(n).weight) for n in names}
    for s in range(3):
        model.zero_grad()
        model(input_ids=ids[s:s + 1], labels=ids[s:s + 1]).loss.backward()
        for n in names:
            g = model.get_submodule(n).weight.grad
            want[n] += g.abs() if method == "taylor" else g.square() / 3
    model.zero_grad()
    path, layers = calibrate.find_layers(model)
    store = calibrate.InMemoryLayers(layers)
    spill = calibrate.Spill()
    with torch.no_grad():
        inputs = calibrate.capture_inputs(model, layers, ids, "cpu")
    sel = lambda i, layer: {f"{path}.{i}.{k}": m for k, m in layer.named_modules() if isinstance(m, nn.Linear)}
    calibrate.gradient_stats(model, path, layers, store, inputs, ids, "cpu", method, sel, spill, progress=False)
    got = {**spill.pop("grad0"), **spill.pop("grad1")}
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-9)


def test_skip_unsupported_shape_and_conv1d(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = make_llama(tok, hidden=128, intermediate=96)  # 96 is not a multiple of 64: MLP stays dense
    mlp_before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    rep = _prune(model, tok, "magnitude", "64x64", 0.5, skip=r"k_proj$")
    by = {r["name"]: r for r in rep.rows}
    assert by["model.layers.0.self_attn.k_proj"]["status"] == "skipped"
    assert "skip regex" in by["model.layers.0.self_attn.k_proj"]["reason"]
    up = by["model.layers.0.mlp.up_proj"]
    assert up["status"] == "dense" and "96x128 is not divisible by the 64x64" in up["reason"]
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, mlp_before)
    assert by["model.layers.0.self_attn.q_proj"]["status"] == "pruned"
    assert rep.totals()["skipped"] == 2 and "kept dense" in rep.table()
    # GPT-2 keeps its Linear weights transposed (Conv1D): masks are in [out, in] like everywhere else
    g = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    rep = _prune(g, tok, "sparsegpt", "2:4")
    m = rep.masks["transformer.h.0.mlp.c_fc"]
    assert m.shape == (256, 64)
    formats.check_nm(m, 2, 4)
    assert (g.transformer.h[0].mlp.c_fc.weight.t()[~m] == 0).all()


def test_lm_head_only_when_asked(tok):
    model = make_llama(tok)
    rep = _prune(model, tok, "wanda", "2:4", include_lm_head=True)
    assert rep.rows[-1]["name"] == "lm_head" and rep.rows[-1]["status"] == "pruned"
    formats.check_nm(rep.masks["lm_head"], 2, 4)
    assert (model.lm_head.weight[~rep.masks["lm_head"]] == 0).all()
    # the documented next step packs exactly the pruned layers, the head included
    assert len(sparserun.sparsify_(model, "2:4", masks=rep.masks).sparsified) == len(rep.masks) == 15
    assert isinstance(model.lm_head, sparserun.SparseLinear)
    tied = make_llama(tok, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="lm_head shares its weight with the input embeddings"):
        _prune(tied, tok, "wanda", "2:4", include_lm_head=True)
    with pytest.raises(ValueError, match="lm_head with taylor is not supported"):
        _prune(make_llama(tok), tok, "taylor", "2:4", include_lm_head=True)
    skipped = make_llama(tok)
    head = skipped.lm_head.weight.detach().clone()
    rep = _prune(skipped, tok, "wanda", "2:4", include_lm_head=True, skip="lm_head")
    assert rep.rows[-1]["name"] == "lm_head" and rep.rows[-1]["status"] == "skipped"  # --skip covers the head
    assert "lm_head" not in rep.masks and torch.equal(skipped.lm_head.weight, head)


@pytest.mark.parametrize("method,pattern,sparsity,err,msg", [
    ("random", "2:4", None, ValueError, "unknown pruning method 'random'"),
    ("wanda", "3x3", 0.5, ValueError, "unknown sparsity pattern '3x3'"),
    ("wanda", "2:4", 0.6, ValueError, "sparsity is 0.5; got sparsity=0.6"),
    ("wanda", "unstructured", 1.0, ValueError, r"sparsity must be in \(0, 1\)"),
    ("wanda", "unstructured", 0.0, ValueError, r"sparsity must be in \(0, 1\)"),
    ("wanda", "32x32", None, ValueError, "needs a target sparsity"),
])
def test_bad_arguments(tok, method, pattern, sparsity, err, msg):
    model = make_llama(tok)
    with pytest.raises(err, match=msg):
        _prune(model, tok, method, pattern, sparsity)


@pytest.mark.parametrize("pattern,sparsity,kw,msg", [
    ("2:4", None, dict(balance_rows=True), "balance_rows .* applies to block patterns such as 32x32, not 2:4"),
    ("32x32", 0.5, dict(per_row=True), "per_row .* applies to unstructured sparsity, not 32x32"),
    ("2:4", None, dict(skip="lm_haed"), r"--skip 'lm_haed' matches none of the 14 Linear layers"),
    ("2:4", None, dict(skip="proj"), r"--skip 'proj' matches all 14 Linear layers to prune: nothing would be"),
])
def test_options_that_cannot_apply(tok, pattern, sparsity, kw, msg):
    """Options that do not apply to the pattern, or a --skip that matches nothing or everything, are errors
    (raised before any calibration data is read)."""
    with pytest.raises(ValueError, match=msg):
        sparserun.prune(make_llama(tok), "wanda", pattern, sparsity, calib="/nonexistent/never-read.txt",
                        tokenizer=tok, progress=False, **kw)


@pytest.mark.parametrize("pattern,sparsity,msg", [
    ("unstructured", 0.001, r"14 layer\(s\) are not smaller packed than dense .* bitmask index costs more"),
    ("16x16", 0.001, r"no layer was pruned, so the result is the dense model \(e\.g\. model\.layers\.0\.self_attn"
                     r"\.q_proj: the target sparsity rounds to zero 16x16 blocks at this shape\)"),
])
def test_report_warns_when_pruning_saves_nothing(tok, pattern, sparsity, msg):
    """A layer whose target rounds down to zero blocks stays dense (packed, it would only add index bytes)."""
    rep = sparserun.prune(make_llama(tok), "magnitude", pattern, sparsity, calib=torch.randint(0, 400, (2, 32)),
                          progress=False)
    assert len(rep.warnings()) == 1 and re.search(msg, rep.warnings()[0])
    assert rep.totals()["pruned"] == (0 if "x" in pattern else 14)
    assert rep.warnings()[0] in rep.table() and rep.to_dict()["warnings"] == rep.warnings()
    assert sparserun.prune(make_llama(tok), "magnitude", "2:4", calib=torch.randint(0, 400, (2, 32)),
                           progress=False).warnings() == []


def test_report_warns_when_block_rounding_empties_layers(tok):
    """Two 32x32 blocks per block-row at 75 % with balance_rows keep round(0.5) = 0 of them: whole layers were
    emptied, and the report had no warning."""
    rep = sparserun.prune(make_llama(tok), "magnitude", "32x32", 0.75, calib=torch.randint(0, 400, (2, 32)),
                          progress=False, balance_rows=True)
    emptied = [r for r in rep.pruned if r["sparsity"] == 1.0]
    assert emptied
    (w,) = [w for w in rep.warnings() if "far past" in w]
    assert re.search(rf"layer\(s\) were pruned far past the 75% target, {len(emptied)} of them to nothing \(e\.g\. "
                     r".*: 100\.0%\): whole 32x32 blocks round that way", w)


def test_a_layer_emptied_at_a_90_percent_target_is_named():
    """At a target of 0.9 or more, "10 points past the target" is 100 % itself, so a layer pruned to nothing
    (128x128 blocks: 4 per row at 90 % keep none) got no warning."""
    from sparserun.prune.api import PruneReport

    def row(name, sparsity):
        return {"name": name, "pattern": "128x128", "format": "bsr", "shape": [512, 512], "status": "pruned",
                "reason": "", "sparsity": sparsity, "rel_error": 1.0, "bytes_before": 1 << 19,
                "bytes_after": int((1 << 19) * (1 - sparsity)) + 64}

    rep = PruneReport("magnitude", "128x128", 0.9, {}, [row("a.q_proj", 1.0), row("a.up_proj", 0.9375)])
    (w,) = [w for w in rep.warnings() if "far past" in w]
    assert "1 layer(s) were pruned far past the 90% target, 1 of them to nothing (e.g. a.q_proj" in w


def test_layers_far_below_the_target_and_silent_layers_are_named():
    """64x64 at 70 % on a layer of two blocks per row keeps half of them: 50 %, and nothing said; a layer whose
    kept weights only meet zero inputs outputs nothing (relative error 1.0), and nothing said either."""
    from sparserun.prune.api import PruneReport

    def row(name, sparsity, err):
        return {"name": name, "pattern": "64x64", "format": "bsr", "shape": [128, 128], "status": "pruned",
                "reason": "", "sparsity": sparsity, "rel_error": err, "bytes_before": 1 << 16,
                "bytes_after": int((1 << 16) * (1 - sparsity)) + 64}

    rep = PruneReport("magnitude", "64x64", 0.7, {}, [row("l.k_proj", 0.5, 0.3), row("l.down_proj", 0.75, 1.0),
                                                      row("l.up_proj", 0.75, 0.4)])
    w = rep.warnings()
    assert any("1 layer(s) were pruned far below the 70% target (e.g. l.k_proj, 128x128: 50.0%)" in x for x in w)
    assert any("1 layer(s) output (almost) nothing" in x and "l.down_proj" in x for x in w)
    calm = PruneReport("magnitude", "64x64", 0.7, {}, [row("l.up_proj", 0.75, 0.4)])
    assert calm.warnings() == []


def test_a_short_calibration_text_is_named():
    """A 632-token text cut into 32 windows of 512: the same tokens over and over, and the report said nothing."""
    from sparserun.prune.api import PruneReport

    calib = {"source": "calib.txt", "nsamples": 32, "seqlen": 512, "text_tokens": 632, "coverage": 25.92}
    rep = PruneReport("wanda", "2:4", 0.5, calib, [])
    (w,) = rep.warnings()
    assert "only 632 tokens, 1.2 windows of 512" in w and "each used 25.92x" in w
    assert "32 x 512 tokens from 632 tokens of text" in rep.table()
    assert PruneReport("wanda", "2:4", 0.5, {**calib, "text_tokens": 5130, "coverage": 3.19}, []).warnings() == []


@pytest.mark.parametrize("method", ["taylor", "obd", "sparsegpt", "magnitude"])
def test_a_non_finite_weight_is_named_before_calibration_spreads_it(tok, method):
    """The gradients carried one NaN into every layer's scores, and taylor/obd blamed the first layer checked
    (layers.0.self_attn.q_proj); SparseGPT turned one inf into NaNs; magnitude had pruned layer 0 in place by
    the time it found the inf in layer 1. Nothing is pruned now."""
    model = make_llama(tok)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.up_proj: non-finite value inf at row 3, "
                                         r"column 5 \(1 non-finite in all\)"):
        sparserun.prune(model, method, "2:4", calib=torch.randint(0, 400, (2, 32)), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("opt, match", [(dict(blocksize=0), "blocksize must be a positive integer, got 0"),
                                        (dict(percdamp=-1.0), "percdamp must be a finite number >= 0, got -1.0")])
def test_sparsegpt_options_out_of_range_are_refused_up_front(tok, opt, match):
    with pytest.raises(ValueError, match=match):
        sparserun.prune(make_llama(tok), "sparsegpt", "2:4", calib=torch.randint(0, 400, (2, 32)), progress=False,
                        **opt)


def test_argument_kinds_are_checked_in_one_line(tok, tmp_path):
    model = make_llama(tok)
    ids = torch.randint(0, 400, (2, 32))
    with pytest.raises(ValueError, match=r"skip '\[' is not a regular expression"):
        sparserun.prune(model, "wanda", "2:4", calib=ids, skip="[", progress=False)
    with pytest.raises(CalibrationError, match="nsamples must be an integer, got 2.5"):
        sparserun.prune(model, "wanda", "2:4", calib="some text " * 400, tokenizer=tok, nsamples=2.5,
                        progress=False)
    tok.save_pretrained(tmp_path / "tok")  # a tokenizer directory works as the tokenizer
    rep = sparserun.prune(model, "wanda", "2:4", calib=["some text to calibrate on " * 200], tokenizer=tmp_path / "tok",
                          nsamples=2, seqlen=16, progress=False)
    assert rep.rows
    for calib, match in (("text " * 200, "cannot be read .*a str is a file path: pass text as a list of strings"),
                         (123, "expected a file path, a list of strings or a LongTensor of token ids, got int")):
        with pytest.raises(CalibrationError, match=match):
            sparserun.prune(make_llama(tok), "wanda", "2:4", calib=calib, tokenizer=tok, progress=False)


def test_each_modules_train_flag_is_put_back(tok):
    model = make_llama(tok)
    model.train()
    model.model.layers[0].eval()  # e.g. a frozen part kept in eval mode while the rest trains
    sparserun.prune(model, "wanda", "2:4", calib=torch.randint(0, 400, (2, 32)), progress=False)
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training
    assert not model.model.layers[0].mlp.up_proj.training


def test_an_unusable_device_is_refused_before_any_layer_moves(tok):
    model = make_llama(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for device, match in (("meta", "device 'meta' is not supported"), ("cpux", "unknown device 'cpux'")):
        with pytest.raises(ValueError, match=match):
            sparserun.prune(model, "wanda", "2:4", calib=torch.randint(0, 400, (2, 32)), device=device,
                            progress=False)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method, zeroed, hit, reason", [
    ("taylor", "o_proj", "q_proj", "its calibration gradient is zero everywhere"),
    ("wanda", "v_proj", "o_proj", "its inputs were zero on every calibration token")])
def test_an_all_zero_statistic_is_not_called_unreached(tok, method, zeroed, hit, reason):
    """A layer the tokens reached whose statistic is zero anyway (a zeroed layer next to it) was reported as
    'saw no calibration token ... an MoE expert', with advice (more --nsamples) that cannot help."""
    model = make_llama(tok)
    with torch.no_grad():
        getattr(model.model.layers[0].self_attn, zeroed).weight.zero_()
    rep = sparserun.prune(model, method, "2:4", calib=torch.randint(0, 400, (2, 32)), progress=False)
    row = next(r for r in rep.rows if r["name"] == f"model.layers.0.self_attn.{hit}")
    assert row["reason"].startswith(reason) and row["status"] == "pruned"
    assert not any("saw no calibration token" in w for w in rep.warnings())
    assert any("all-zero calibration statistic" in w and reason in w for w in rep.warnings())
    if method == "wanda":  # zero inputs: 0/0, no relative error to report (a 0 lowered the mean)
        assert row["rel_error"] is None


def test_unknown_option(tok):
    with pytest.raises(TypeError, match="unknown option.*blocksz"):
        _prune(make_llama(tok), tok, "wanda", "2:4", blocksz=64)


def test_unknown_model_family():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, input_ids):
            return self.b(self.a(input_ids.float()))

    with pytest.raises(UnknownModelFamily, match="Weird.*known layouts: model.layers.*transformer.h"):
        sparserun.prune(Weird(), "magnitude", "2:4", calib=torch.ones(1, 8, dtype=torch.long))


def test_calibration_files(tmp_path, tok):
    with pytest.raises(CalibrationError, match="calibration file not found: .*nope.txt"):
        _prune(make_llama(tok), tok, "wanda", "2:4", calib=tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(CalibrationError, match="empty.txt is empty"):
        _prune(make_llama(tok), tok, "wanda", "2:4", calib=empty)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(CalibrationError, match="has only .* tokens; a window of seqlen 32"):
        _prune(make_llama(tok), tok, "wanda", "2:4", calib=short)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(CalibrationError, match="bad.jsonl, line 2: expected an object with a string \"text\""):
        calibrate.read_text(bad)
    good = tmp_path / "good.jsonl"
    text = calibrate.DEFAULT_CALIB.read_text()
    good.write_text("\n".join(json.dumps({"text": p}) for p in text.split("\n\n")[:40]))
    rep = _prune(make_llama(tok), tok, "wanda", "2:4", calib=good)
    assert rep.calib["source"] == str(good)
    with pytest.raises(CalibrationError, match="exceeds the model's max_position_embeddings 256"):
        _prune(make_llama(tok), tok, "wanda", "2:4", seqlen=300)


def test_foreign_token_ids_and_packed_models_are_clear_errors(tok):
    model = make_llama(tok)
    with pytest.raises(CalibrationError, match=r"token ids span \[4999, 4999\] but the model's embedding has 400 rows"):
        sparserun.prune(model, "wanda", "2:4", calib=torch.full((2, 30), 4999), progress=False)
    sparserun.sparsify_(model, "2:4")
    with pytest.raises(calibrate.UnknownModelFamily, match="already holds packed SparseLinear layers"):
        sparserun.prune(model, "wanda", "2:4", calib=torch.randint(0, 400, (2, 30)), progress=False)


def test_calibration_file_kinds(tmp_path):
    """JSONL by extension or by a first line that is a {"text": ...} record; a .json list; anything else,
    including source code whose first line opens a brace, is plain text."""
    code = tmp_path / "code.txt"
    code.write_text('{ "indent": 2 }\nfn main() { println!("hi"); }\n')
    assert calibrate.read_text(code) == code.read_text()
    sniffed = tmp_path / "records.txt"
    sniffed.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert calibrate.read_text(sniffed) == "one\n\ntwo"
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["one", {"text": "two"}]))
    assert calibrate.read_text(listed) == "one\n\ntwo"
    for name, body, msg in [
        ("obj.json", json.dumps({"text": "x"}), "expected a JSON list .* got a dict"),
        ("item.json", json.dumps(["ok", 3]), "item 1: expected a string or an object"),
        ("broken.json", "[1, ", "not valid JSON"),
        ("broken.jsonl", '{"text": "a"}\nnot json\n', "line 2: not valid JSON"),
        ("blank.jsonl", '{"text": "  "}\n', "has no text in its \"text\" fields"),
    ]:
        f = tmp_path / name
        f.write_text(body)
        with pytest.raises(CalibrationError, match=msg):
            calibrate.read_text(f)


def test_calibration_text_as_users_write_it(tmp_path):
    """Byte-order marks, JSON strings holding U+2028 / U+0085 (json.dumps(ensure_ascii=False) writes them
    raw), CRLF, .ndjson, and a pipe are read; gzip, a directory and lone surrogates are one-line errors."""
    recs = ["para\u2028graph one", "next\x85line two", "plain three"]
    jsonl = "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in recs)
    want = "\n\n".join(recs)
    for name, data in [("u.jsonl", jsonl.encode()), ("bom.jsonl", b"\xef\xbb\xbf" + jsonl.encode()),
                       ("bom_sniffed.txt", b"\xef\xbb\xbf" + jsonl.encode()),
                       ("crlf.jsonl", jsonl.replace("\n", "\r\n").encode()), ("n.ndjson", jsonl.encode())]:
        (tmp_path / name).write_bytes(data)
        assert calibrate.read_text(tmp_path / name) == want, name
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfplain text")
    assert calibrate.read_text(tmp_path / "bom.txt") == "plain text"
    (tmp_path / "bom_only.txt").write_bytes(b"\xef\xbb\xbf\n")
    with pytest.raises(CalibrationError, match="bom_only.txt is empty"):
        calibrate.read_text(tmp_path / "bom_only.txt")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("through a pipe"))
    writer.start()
    assert calibrate.read_text(fifo) == "through a pipe"
    writer.join()
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(b"zipped"))
    (tmp_path / "sur.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800 here"}\n')
    (tmp_path / "sur.json").write_text('["ok", "bad \\udfff"]')
    for path, msg in [(tmp_path / "t.txt.gz", r"t\.txt\.gz is gzip-compressed: decompress it first"),
                      (tmp_path, "path is a directory, not a file"),
                      (tmp_path / "sur.jsonl", r"sur\.jsonl, line 2 is not valid text at character 4 \(a lone "
                                               r"surrogate \\ud800\)"),
                      (tmp_path / "sur.json", r"sur\.json, item 1 is not valid text")]:
        with pytest.raises(CalibrationError, match=msg):
            calibrate.read_text(path)
    with pytest.raises(CalibrationError, match=r"calibration text 1 is not valid text at character 3"):
        calibrate.calibration_data(["fine", "caf\udce9"], make_tokenizer(), nsamples=1, seqlen=4)


def test_long_paragraphs_and_unknown_tokens(minilm_dir, capfd):
    """No transformers 'longer than the specified maximum' warning for a paragraph past model_max_length
    (windows are cut later); a warning when most tokens are the unknown token, in the report for pruning."""
    import warnings

    from transformers import AutoTokenizer

    bert = AutoTokenizer.from_pretrained(minilm_dir)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ids = calibrate.tokenize_text("word " * 3000, bert, "long.txt")
    assert len(ids) == 3000 and not w
    assert "longer than the specified maximum" not in capfd.readouterr().err  # transformers' own handler
    with pytest.warns(UserWarning, match=r"100% of the 600 tokens of emoji.txt are the unknown token '\[UNK\]'"):
        calibrate.tokenize_text("\U0001F600\U0001F680 " * 600, bert, "emoji.txt")
    cal = calibrate.calibration_data(["\U0001F600 " * 600], bert, nsamples=1, seqlen=8)
    assert cal.describe()["unknown_tokens"] == 1.0
    assert "unknown_tokens" not in calibrate.calibration_data(None, bert, nsamples=1, seqlen=8).describe()


def test_default_calibration_windows(tok, minilm_dir):
    from transformers import AutoTokenizer

    cal = calibrate.calibration_data(None, tok, nsamples=5, seqlen=40, seed=3)
    assert cal.input_ids.shape == (5, 40)
    assert "calib_default.txt" in cal.source and cal.describe()["text_tokens"] > 3000
    assert torch.equal(cal.input_ids, calibrate.calibration_data(None, tok, 5, 40, seed=3).input_ids)
    bert = AutoTokenizer.from_pretrained(minilm_dir)
    ids = calibrate.calibration_data(None, bert, nsamples=2, seqlen=16).input_ids
    assert (ids[:, 0] == bert.cls_token_id).all() and (ids[:, -1] == bert.sep_token_id).all()
    assert calibrate.DEFAULT_CALIB.read_text().count(" ") > 3000  # ~4k words of prose ship in the package
