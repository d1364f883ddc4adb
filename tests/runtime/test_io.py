"""save/load: the "done means" round trips on the real MiniLM, a tied Llama, and the refusals."""
import json
import shutil

import pytest
import torch
import torch.nn as nn

import sparserun
from sparserun import checkpoint as ck
from sparserun.runtime.linear import SparseLinear


def header_bytes(path, names):
    """Bytes the named tensors occupy in a safetensors file (from its header)."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    return sum(h[t]["data_offsets"][1] - h[t]["data_offsets"][0] for t in names)


@pytest.mark.parametrize("pattern, limit", [("2:4", 0.57), ("32x32", 0.52)])
def test_minilm_round_trip_equals_masked_dense(minilm_packed, pattern, limit):
    info = minilm_packed[pattern]
    d = info["dir"]
    assert info["n_linear"] == 37  # 6 layers x 6 Linear + pooler
    assert len(info["report"].sparsified) == 37
    # config and tokenizer copied unchanged
    for f in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (d / f).is_file(), f
    model = sparserun.load(d)
    assert type(model).__name__ == "BertModel" and not model.training
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert len(sparse) == 37 and not any(isinstance(m, nn.Linear) for m in model.modules())
    assert {m.format for m in sparse.values()} == {"semi24" if pattern == "2:4" else "bsr"}
    for n, m in sparse.items():
        mask = info["masks"][n]
        got = m.weight_mask()
        assert bool((got | ~mask).all()), n  # the stored positions contain the chosen mask
        if pattern == "32x32":
            assert torch.equal(got, mask), n
    # non-persistent buffers were recomputed, not left on meta or garbage
    assert torch.equal(model.embeddings.position_ids, torch.arange(512).unsqueeze(0))
    assert torch.equal(model.embeddings.token_type_ids, torch.zeros(1, 512, dtype=torch.long))
    with torch.no_grad():
        out = model(**info["inputs"])
    ref_h, ref_p = info["ref"]
    torch.testing.assert_close(out.last_hidden_state, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pooler_output, ref_p, rtol=1e-5, atol=1e-6)
    # linear-layer bytes on disk vs the dense layers
    m = json.loads((d / "sparserun.json").read_text())
    packed = sum(header_bytes(d / "model.safetensors", r["tensors"].values()) for r in m["layers"])
    dense = sum(r["shape"][0] * r["shape"][1] * 4 for r in m["layers"])
    assert packed == sum(r["nbytes"] for r in m["layers"])
    assert packed <= limit * dense, (packed / dense, limit)
    if pattern == "32x32":
        assert all(r["sparsity"] == 0.5 for r in m["layers"])


def test_source_dir_never_modified(minilm_packed, minilm_dir):
    before, after = minilm_packed["2:4"]["source_hashes"]
    assert before == after and "model.safetensors" in before
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in minilm_dir.parent.iterdir())


def test_load_never_makes_a_dense_copy(minilm_packed, monkeypatch):
    from sparserun import formats

    def boom(*a, **k):
        raise AssertionError("load decompressed a sparse layer")

    monkeypatch.setattr(formats, "unpack", boom)
    monkeypatch.setattr(SparseLinear, "dense_weight", boom)
    real_init = torch.nn.init.kaiming_uniform_

    def init_on_meta_only(t, *a, **k):  # nn.Linear.__init__ initialises its weight: it must be a meta tensor
        assert t.is_meta, "load initialised a real dense weight"
        return real_init(t, *a, **k)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", init_on_meta_only)
    model = sparserun.load(minilm_packed["32x32"]["dir"], verify=False)
    assert all(not p.is_meta for p in model.parameters())


def test_load_casts_floating_only(minilm_packed):
    model = sparserun.load(minilm_packed["2:4"]["dir"], dtype=torch.float16)
    q = model.encoder.layer[0].attention.self.query
    assert q.values.dtype == torch.float16 and q.meta.dtype == torch.uint8 and q.bias.dtype == torch.float16
    assert model.embeddings.word_embeddings.weight.dtype == torch.float16
    assert model.embeddings.position_ids.dtype == torch.int64
    model = sparserun.load(minilm_packed["32x32"]["dir"], dtype="bfloat16")
    q = model.encoder.layer[0].attention.self.query
    assert q.values.dtype == torch.bfloat16 and q.crow_indices.dtype == torch.int32
    for bad in (torch.int32, torch.float64, torch.float8_e4m3fn, float):  # float64 loaded, then save refused it
        with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32"):
            sparserun.load(minilm_packed["32x32"]["dir"], dtype=bad)


def tiny_llama(tie=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("pattern, sparsity", [("2:4", None), ("32x32", 0.6), ("4:8", None)])
def test_llama_tied_round_trip(tmp_path, pattern, sparsity):
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = sparserun.sparsify_(model, pattern=pattern, sparsity=sparsity)
    assert [a.name for a in report if a.action == "skipped"] == ["lm_head"]
    assert len(report.sparsified) == 14
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    sparserun.save(model, tmp_path / "p")
    m = json.loads((tmp_path / "p" / "sparserun.json").read_text())
    assert m["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    loaded = sparserun.load(tmp_path / "p")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight, "tied embeddings must stay tied"
    rot, rot0 = loaded.model.rotary_emb, model.model.rotary_emb
    assert rot.inv_freq.dtype == torch.float32 and torch.equal(rot.inv_freq, rot0.inv_freq)
    with torch.no_grad():
        out = loaded(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # cast: floating tensors follow dtype, rotary buffers stay as the model computes them, tie kept
    half = sparserun.load(tmp_path / "p", dtype=torch.bfloat16)
    assert half.lm_head.weight is half.model.embed_tokens.weight
    assert half.model.layers[0].mlp.up_proj.values.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(half(input_ids=ids).logits.float(), ref, rtol=0.05, atol=0.05)


def _poke(ckpt_dir, tensor, index, value):
    """Overwrite one element of a stored tensor in place and reseal the manifest's sha256, as anyone handing
    out a checkpoint can: the sha256 sits in the same directory, so it vouches for nothing against them."""
    import hashlib
    import struct

    m = json.loads((ckpt_dir / "sparserun.json").read_text())
    shard = m["tensors"][tensor]["shard"]
    path = ckpt_dir / shard
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
        size = {"I32": 4, "U8": 1}[h[tensor]["dtype"]]  # index tensors only
        f.seek(8 + n + h[tensor]["data_offsets"][0] + index * size)
        f.write(int(value).to_bytes(size, "little", signed=size == 4))
    m["shards"][shard]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (ckpt_dir / "sparserun.json").write_text(json.dumps(m))


@pytest.mark.parametrize("pattern, tensor, index, value, match", [
    # a block column past the matrix: unpack and the kernels would write / read outside their buffers
    ("32x32", "col_indices", 0, 10**6, r"col_indices out of range \[0, 2\)"),
    ("32x32", "col_indices", 0, -1, r"col_indices out of range"),  # negative indexing would wrap silently
    # row offsets whose counts go negative: torch's repeat_interleave wrote past its buffer (heap corruption)
    ("32x32", "crow_indices", 1, 100000, r"crow_indices must rise from 0 to nnz"),
    # a 2:4 group whose two positions are equal: the second value would be silently dropped
    ("2:4", "meta", 0, 0x00, r"meta at row 0, group 0 has positions \(0, 0\)"),
    ("2:4", "meta", 3, 0x64, r"meta at row 0, group 7 has positions \(2, 1\)"),
    # more set bits than stored values: the dense fallback failed at the first forward, naming no layer
    ("4:8", "bitmask", 0, 0xFF, r"bitmask has \d+ set bits but \d+ values"),
])
def test_load_refuses_index_tensors_a_kernel_would_misaddress(tmp_path, pattern, tensor, index, value, match):
    model = tiny_llama()
    sparserun.sparsify_(model, pattern=pattern, sparsity=0.5 if "x" in pattern else None)
    assert isinstance(model.model.layers[1].self_attn.o_proj, SparseLinear)
    sparserun.save(model, tmp_path / "p")
    layer = "model.layers.1.self_attn.o_proj"
    _poke(tmp_path / "p", f"{layer}.{tensor}", index, value)
    with pytest.raises(ck.TensorMismatch, match=f"{layer}: .*{match}"):
        sparserun.load(tmp_path / "p")
    assert ck.CheckpointReader(tmp_path / "p").layer(layer)  # the manifest itself is sound
    # a Packed built by hand gets the same check
    bad = ck.CheckpointReader(tmp_path / "p", verify=False).load_layer(layer)
    with pytest.raises(ValueError, match=f"SparseLinear.from_packed: .*{match}"):
        SparseLinear.from_packed(bad)


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compiled", "data_parallel"])
def test_a_wrapped_model_is_sparsified_and_saved_as_the_model_inside(tmp_path, wrap):
    """torch.compile's OptimizedModule and DataParallel prefix every state_dict key (_orig_mod., module.):
    saved through them, the checkpoint named no layer the config builds and failed only at load."""
    model = tiny_llama()
    wrapped = wrap(model)
    report = sparserun.sparsify_(wrapped, pattern="2:4")
    assert len(report.sparsified) == 14 and isinstance(model.model.layers[0].mlp.up_proj, SparseLinear)
    sparserun.save(wrapped, tmp_path / "p")
    names = json.loads((tmp_path / "p" / "sparserun.json").read_text())["tensors"]
    assert "model.embed_tokens.weight" in names and not any(n.startswith(("_orig_mod", "module.")) for n in names)
    assert type(sparserun.load(tmp_path / "p")).__name__ == "LlamaForCausalLM"


def test_saving_a_pruned_but_unpacked_model_warns(tmp_path):
    """sparserun.prune leaves masked dense weights: saving that wrote a dense checkpoint, zeros and all, with no
    word. It warns and says how to pack; after sparsify_(masks=) the same save is silent and smaller."""
    import warnings

    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    report = sparserun.prune(model, "wanda", "2:4", calib=ids, progress=False)
    with pytest.warns(sparserun.SparserunWarning, match=r"LlamaForCausalLM has no sparse layers, so .*dense "
                                                        r"checkpoint.*sparsify_\(model, pattern, masks=report.masks\)"):
        sparserun.save(model, tmp_path / "dense")
    sparserun.sparsify_(model, pattern="2:4", masks=report.masks, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparserun.SparserunWarning)
        sparserun.save(model, tmp_path / "packed")
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "packed") < size(tmp_path / "dense")


def test_load_reads_the_generation_config(tmp_path):
    """generation_config.json was copied into the checkpoint but never read: an end-of-turn token listed only
    there (as Llama-3-Instruct lists its <|eot_id|>) did not stop generate(), which ran to max_new_tokens."""
    model = tiny_llama()
    model.generation_config.eos_token_id = [2, 50]
    model.generation_config.temperature = 0.6
    sparserun.sparsify_(model, pattern="2:4", progress=False)
    sparserun.save(model, tmp_path / "p")
    loaded = sparserun.load(tmp_path / "p")
    assert loaded.generation_config.eos_token_id == [2, 50] and loaded.generation_config.temperature == 0.6
    assert loaded.config.eos_token_id != [2, 50]  # the list lives only in generation_config.json
    for bad in ("{not json", "[1, 2]", '{"eos_token_id": "x"}', '{"eos_token_id": [2, -1]}'):
        # as from_pretrained: ignored with a warning, config.json's settings (a string id failed in generate)
        (tmp_path / "p" / "generation_config.json").write_text(bad)
        with pytest.warns(sparserun.SparserunWarning, match=r"generation_config\.json ignored, not a valid "):
            again = sparserun.load(tmp_path / "p")
        assert again.generation_config.eos_token_id == loaded.config.eos_token_id


def test_save_without_source_dir_says_the_tokenizer_is_left_behind(tmp_path):
    """A model loaded from a local directory and saved without source_dir got no tokenizer files, silently;
    `sparserun generate OUT` then stopped with "no tokenizer files"."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    tiny_llama().save_pretrained(src)
    (src / "tokenizer.json").write_text("{}")  # only its presence matters here
    model = AutoModelForCausalLM.from_pretrained(str(src))
    sparserun.sparsify_(model, pattern="2:4", progress=False)
    with pytest.warns(sparserun.SparserunWarning, match=r"gets no tokenizer files; pass source_dir="):
        sparserun.save(model, tmp_path / "out")
    sparserun.save(model, tmp_path / "out2", source_dir=src)
    assert (tmp_path / "out2" / "tokenizer.json").is_file()


def test_a_skeleton_built_in_one_thread_leaves_other_threads_alone():
    """save/load patch nn.Module.register_parameter while they build a skeleton: a model another thread built
    meanwhile (a server loading while it saves) got meta parameters, and two threads in the block at once
    could leave the patch installed for good."""
    import threading

    from sparserun.runtime.io import params_on_meta

    inside, done, bad = threading.Event(), threading.Event(), []

    def other():
        inside.wait()
        for _ in range(50):
            if torch.nn.Linear(4, 4).weight.is_meta:
                bad.append(1)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with params_on_meta():
        assert torch.nn.Linear(4, 4).weight.is_meta  # this thread's modules are skeletons
        inside.set()
        done.wait(30)
    t.join()
    assert bad == [] and not torch.nn.Linear(4, 4).weight.is_meta  # and the patch is gone afterwards


def test_untied_llama_and_fallback_class(tmp_path):
    model = tiny_llama(tie=False, seed=1)
    sparserun.sparsify_(model, "2:4", filter_fn=lambda m, n: True)  # lm_head too (untied, 101x64)
    assert isinstance(model.lm_head, SparseLinear)
    ids = torch.randint(0, 101, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    sparserun.save(model, tmp_path / "p")
    # neither the manifest nor config.json name a class transformers knows: fall back to an Auto class
    m = json.loads((tmp_path / "p" / "sparserun.json").read_text())
    m["architecture"] = "NoSuchModel"
    (tmp_path / "p" / "sparserun.json").write_text(json.dumps(m))
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModel"]
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    loaded = sparserun.load(tmp_path / "p")
    assert type(loaded).__name__ == "LlamaForCausalLM" and isinstance(loaded.lm_head, SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-6)


def test_save_refusals(tmp_path, minilm_packed):
    model = tiny_llama()
    sparserun.sparsify_(model, "2:4")
    sparserun.save(model, tmp_path / "p")
    with pytest.raises(ck.OutputExists, match="exists and is not empty"):
        sparserun.save(model, tmp_path / "p")
    sparserun.save(model, tmp_path / "p", overwrite=True)
    seq = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ck.CheckpointError, match="no .config and no source_dir"):
        sparserun.save(seq, tmp_path / "q")
    with pytest.raises(ck.CheckpointError, match="overlaps the source directory"):
        sparserun.save(model, tmp_path / "p" / "inner", source_dir=tmp_path / "p")


def test_transformers_save_pretrained_refuses_packed_layers(tmp_path):
    """transformers would write the packed tensors, and from_pretrained would then load the model with every
    pruned layer silently re-initialised: save_pretrained refuses and names sparserun.save, also on copies
    and on a reloaded model, and works again once no SparseLinear is left."""
    import copy
    import io

    from sparserun.runtime.linear import PackedSaveError

    model = tiny_llama()
    sparserun.sparsify_(model, "2:4")
    for m in (model, copy.deepcopy(model)):
        with pytest.raises(PackedSaveError, match=r"Use sparserun.save\(model, '.*x'\) and sparserun.load"):
            m.save_pretrained(tmp_path / "x")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with pytest.raises(PackedSaveError):
        torch.load(buf, weights_only=False).save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    sparserun.save(model, tmp_path / "p")
    loaded = sparserun.load(tmp_path / "p")
    with pytest.raises(PackedSaveError):
        loaded.save_pretrained(tmp_path / "x")
    for name, mod in list(loaded.named_modules()):  # unpacked again (as fine-tuning does): a plain model
        if isinstance(mod, SparseLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.dense_weight()
            parent, _, attr = name.rpartition(".")
            setattr(loaded.get_submodule(parent), attr, lin)
    loaded.save_pretrained(tmp_path / "x")
    assert (tmp_path / "x" / "config.json").is_file()


def test_loaded_config_states_the_loaded_dtype(tmp_path):
    """config.json is copied unchanged from the fp32 source; a model stored or loaded in 16 bits says so."""
    model = tiny_llama()
    sparserun.sparsify_(model, "2:4")
    sparserun.save(model.to(torch.bfloat16), tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text()).get("dtype") in (None, "float32")
    assert sparserun.load(tmp_path / "p").config.dtype == torch.bfloat16
    assert sparserun.load(tmp_path / "p", dtype=torch.float16).config.dtype == torch.float16


def test_load_refusals(tmp_path, minilm_packed):
    with pytest.raises(ck.CheckpointNotFound, match="not found"):
        sparserun.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ck.MissingConfig, match="has no config.json"):
        sparserun.load(tmp_path / "empty")
    import shutil

    d = tmp_path / "c"
    shutil.copytree(minilm_packed["2:4"]["dir"], d)
    m = json.loads((d / "sparserun.json").read_text())
    m["layers"][0]["name"] = "encoder.layer.0.attention.self.nonexistent"
    (d / "sparserun.json").write_text(json.dumps(m))
    with pytest.raises(ck.CheckpointError, match="layer encoder.layer.0.attention.self.nonexistent recorded"):
        sparserun.load(d, verify=False)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("model_type")
    cfg["architectures"] = []
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match="cannot build a transformers config"):
        sparserun.load(d, verify=False)
    cfg.update(model_type="bert", architectures=["BertModel"], vocab_size=10**13)  # no allocation holds it
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match=r"config.json: cannot build the model it describes: .*"):
        sparserun.load(d, verify=False)


def test_an_alias_must_fit_the_place_it_names(tmp_path):
    """Aliases tie a plain tensor to another name (lm_head.weight -> the embedding). One onto a tensor of
    another shape loaded, and the model returned [1, 3] logits instead of [1, 3, vocab]."""
    model = tiny_llama(tie=False)
    sparserun.sparsify_(model, pattern="2:4")
    sparserun.save(model, tmp_path / "p")
    m = json.loads((tmp_path / "p" / "sparserun.json").read_text())
    m["tensors"].pop("lm_head.weight")
    m["aliases"] = {"lm_head.weight": "model.norm.weight"}
    (tmp_path / "p" / "sparserun.json").write_text(json.dumps(m))
    with pytest.raises(ck.CheckpointError, match=r"alias lm_head.weight: the model expects \[101, 64\] there, "
                                                 r"the aliased tensor is torch.float32 \[64\]"):
        sparserun.load(tmp_path / "p")
    m["aliases"] = {"lm_head.nothing.weight": "model.norm.weight"}
    (tmp_path / "p" / "sparserun.json").write_text(json.dumps(m))
    with pytest.raises(ck.CheckpointError, match="alias lm_head.nothing.weight: the model has no module"):
        sparserun.load(tmp_path / "p")


def test_load_to_a_device_that_is_not_there(minilm_packed):
    d = minilm_packed["2:4"]["dir"]
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bad = "cuda" if not n else f"cuda:{n}"
    msg = "CUDA is not available" if not n else f"only {n} CUDA device"
    with pytest.raises(ValueError, match=rf"load\(device='{bad}'\): {msg}"):
        sparserun.load(d, device=bad)
    with pytest.raises(ValueError, match=r"load\(device='meta'\): use cpu, cuda or cuda:N"):
        sparserun.load(d, device="meta")  # a model without data (it failed deep in the index check)
    with pytest.raises(ValueError, match=r"load\(device='cpux'\): unknown device"):
        sparserun.load(d, device="cpux")
    with pytest.raises(TypeError, match="model_class must be an nn.Module class .*got 'NoSuchModel'"):
        sparserun.load(d, model_class="NoSuchModel")  # was blamed on config.json
    assert type(sparserun.load(d, model_class="BertModel")).__name__ == "BertModel"


@pytest.mark.gpu
def test_load_to_cuda_allocates_only_the_packed_model(tmp_path):
    """Peak device memory during load == the loaded tensors themselves: no dense copy, no staging."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                      tie_word_embeddings=True)  # the tie must survive the load (not the default everywhere)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sparserun.sparsify_(model, "2:4")
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    sparserun.save(model, tmp_path / "p")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loaded = sparserun.load(tmp_path / "p", device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    tensors = {t.data_ptr(): t for t in list(loaded.parameters()) + list(loaded.buffers())}
    assert all(t.is_cuda for t in tensors.values())
    held = sum((t.numel() * t.element_size() + 511) // 512 * 512 for t in tensors.values())  # allocator: 512 B
    assert peak <= held + 64 * 1024, (peak, held)
    up = loaded.model.layers[0].mlp.up_proj
    assert isinstance(up, SparseLinear) and up.values.dtype == torch.float16 and up.meta.dtype == torch.uint8
    dense_bytes = sum(p.numel() * 2 for p in model.parameters()) + sum(
        m.out_features * m.in_features * 2 for m in model.modules() if isinstance(m, SparseLinear))
    assert held < 0.8 * dense_bytes
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        out = loaded(input_ids=ids.cuda()).logits.float().cpu()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


def test_save_writes_the_models_config_when_the_sources_no_longer_fits(tmp_path, minilm_dir):
    """A vocabulary resized after loading: copying the source's config.json would write a checkpoint that
    cannot load, so model.config is written; a model that still fits keeps the source's file byte for byte
    (GPT-2's Conv1D layers included)."""
    from transformers import AutoModel, GPT2Config, GPT2LMHeadModel

    model = AutoModel.from_pretrained(minilm_dir)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    sparserun.sparsify_(model, "2:4", progress=False)
    sparserun.save(model, tmp_path / "resized", source_dir=minilm_dir)
    assert json.loads((tmp_path / "resized" / "config.json").read_text())["vocab_size"] == 30530
    assert sparserun.load(tmp_path / "resized").embeddings.word_embeddings.weight.shape[0] == 30530
    g = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    g.save_pretrained(tmp_path / "g")
    sparserun.sparsify_(g, "2:4", progress=False)
    sparserun.save(g, tmp_path / "gp", source_dir=tmp_path / "g")
    assert (tmp_path / "gp" / "config.json").read_bytes() == (tmp_path / "g" / "config.json").read_bytes()


def test_a_config_that_does_not_fit_the_stored_tensors_is_one_line(tmp_path, minilm_packed):
    d = tmp_path / "c"
    shutil.copytree(minilm_packed["2:4"]["dir"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] += 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match=r"config\.json does not describe the stored tensors: size mismatch "
                                                 r"for embeddings\.word_embeddings\.weight") as e:
        sparserun.load(d)
    assert "\n" not in str(e.value)
