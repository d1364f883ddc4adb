"""A model from sparserun.load works unchanged in user code: generate, pipelines, a hand-written KV-cache
loop, torch.compile with a static cache, and (GPU) CUDA graphs.

CPU tests run fp32 on the reference backend, where the sparse model computes exactly what the masked dense
model computes, so greedy tokens must be identical. The Triton-backend tests run the kernels on CPU tensors
under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU) through a whole model.
"""
import copy

import pytest
import torch

import sparserun
from sparserun.runtime.linear import SparseLinear

from ._tiny import make_tokenizer, packed_pair

CASES = [("2:4", None), ("32x32", 0.5)]
NEW = 10


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c[0])
def pair(request, tmp_path_factory):
    pattern, sparsity = request.param
    dense, path = packed_pair(tmp_path_factory.mktemp(pattern.replace(":", "of")), pattern, sparsity)
    return dense, path, pattern


def _prompts(tok, texts=("The ferry leaves", "Sparse weights keep only the entries that matter. Memory")):
    tok.padding_side = "left"  # decoder-only models generate after the prompt: pad on the left
    return tok(list(texts), return_tensors="pt", padding=True)


def _load(path):
    model = sparserun.load(path)
    n_sparse = sum(isinstance(m, SparseLinear) for m in model.modules())
    assert n_sparse == 14, f"expected 14 SparseLinear layers, found {n_sparse}"  # else we would test dense
    return model


def _next_token(model, logits):
    """Greedy next token as `_greedy` picks it: min_new_tokens keeps generate from choosing EOS, so a
    hand-written loop compared with it must not either (a random model may well rank EOS first)."""
    logits = logits[:, -1].clone()
    eos = model.generation_config.eos_token_id
    if eos is not None:
        logits[:, eos] = -float("inf")
    return logits.argmax(-1, keepdim=True)


def _greedy(model, enc, n=NEW, **kw):
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def test_generate_equals_masked_dense(pair):
    dense, path, _ = pair
    model = _load(path)
    enc = _prompts(make_tokenizer())
    ref = _greedy(dense, enc)
    out = _greedy(model, enc)
    assert out.shape == ref.shape == (2, enc["input_ids"].shape[1] + NEW)
    assert torch.equal(out, ref)
    # the static cache path of generate (eager on a CPU: transformers compiles it only on accelerators)
    assert torch.equal(_greedy(model, enc, cache_implementation="static"), ref)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autocast_computes_as_nn_linear_does(pair, stored):
    """Under torch.autocast a SparseLinear computes in the autocast dtype, as nn.Linear does, whether the
    model is stored in that dtype (its kernels run on the cast input) or not (its dense weight, cast)."""
    _, path, _ = pair
    model = sparserun.load(path, dtype=stored)
    ref = copy.deepcopy(model)  # the same model with each SparseLinear as an nn.Linear of its dense weight
    for name, m in list(ref.named_modules()):
        if isinstance(m, SparseLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=stored)
            with torch.no_grad():
                lin.weight.copy_(m.dense_weight())
            ref.set_submodule(name, lin)
    ids = _prompts(make_tokenizer())["input_ids"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(ids).logits, ref(ids).logits
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)
    layer = model.model.layers[0].mlp.down_proj
    with pytest.raises(TypeError, match="input dtype torch.float16 does not match the weight dtype"):
        layer(torch.ones(1, 128, dtype=torch.float16))  # outside autocast, a dtype mismatch is an error
    with pytest.raises(RuntimeError, match=r"SparseLinear\(64x128\): weight is on meta, the input on cpu"):
        copy.deepcopy(layer).to("meta")(torch.ones(1, 128, dtype=stored))  # as nn.Linear: one device


def test_pipeline(pair):
    from transformers import pipeline

    dense, path, _ = pair
    tok = make_tokenizer()
    model = _load(path)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_full_text=False)
    got = pipeline("text-generation", model=model, tokenizer=tok)("The ferry leaves", **kw)
    want = pipeline("text-generation", model=dense, tokenizer=tok)("The ferry leaves", **kw)
    assert isinstance(got[0]["generated_text"], str) and got[0]["generated_text"]
    assert got == want


def test_hand_written_decode_loop_with_dynamic_cache(pair):
    from transformers import DynamicCache

    dense, path, _ = pair
    model = _load(path)
    enc = _prompts(make_tokenizer())
    ref = _greedy(dense, enc)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: positions count real tokens only
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        toks = []
        for _ in range(NEW):
            nxt = _next_token(model, out.logits)
            toks.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True)
    assert cache.get_seq_length() == ids.shape[1] + NEW
    assert torch.equal(torch.cat([ids, *toks], dim=1), ref)


def _static_decode(model, fwd, ids, n, max_len=64):
    """Greedy decode of batch-1 `ids` with a StaticCache: eager prefill, then `fwd` for every new token."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    with torch.no_grad():
        p = ids.shape[1]
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(p), use_cache=True)
        toks = []
        for i in range(n):
            nxt = _next_token(model, out.logits)
            toks.append(nxt)
            cp = torch.tensor([p + i])
            out = fwd(input_ids=nxt, past_key_values=cache, cache_position=cp, position_ids=cp[None],
                      use_cache=True)
    return torch.cat([ids, *toks], dim=1)


def test_torch_compile_fullgraph_static_cache(pair):
    """torch.compile(fullgraph=True) of the forward with a static KV cache: one graph for every decode step
    (no recompiles as the position advances), same tokens as eager. aot_eager: no C++ compiler needed."""
    from torch._dynamo.testing import CompileCounterWithBackend

    dense, path, _ = pair
    model = _load(path)
    ids = make_tokenizer()("The ferry leaves", return_tensors="pt")["input_ids"]
    ref = _greedy(dense, {"input_ids": ids})
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    fwd = torch.compile(model.forward, backend=cnt, fullgraph=True)
    got = _static_decode(model, fwd, ids, NEW)
    assert torch.equal(got, ref)
    assert cnt.frame_count == 1, f"decode recompiled: {cnt.frame_count} graphs for {NEW} steps"
    torch._dynamo.reset()


# ---- the Triton kernels through a whole model (interpreter on CPU, real kernels on a GPU) -------------
def _count_triton_calls(monkeypatch):
    from sparserun import ops

    calls = {"n": 0}
    orig = ops.sparse_linear_triton

    def counted(layer, x):
        calls["n"] += 1
        return orig(layer, x)

    monkeypatch.setattr(ops, "sparse_linear_triton", counted)
    return calls


@pytest.mark.parametrize("pattern, sparsity", CASES, ids=[c[0] for c in CASES])
def test_triton_backend_runs_a_whole_model(tmp_path, monkeypatch, pattern, sparsity):
    """SPARSERUN_BACKEND=triton: every sparse Linear goes through the kernels; greedy tokens equal the masked
    dense model's (fp32, only the summation order differs)."""
    dense, path = packed_pair(tmp_path, pattern, sparsity, seed=1)
    model = _load(path)
    ids = make_tokenizer()("Memory bandwidth", return_tensors="pt")["input_ids"]
    n = 4
    ref = _greedy(dense, {"input_ids": ids}, n)
    monkeypatch.setenv("SPARSERUN_BACKEND", "triton")
    calls = _count_triton_calls(monkeypatch)
    got = _greedy(model, {"input_ids": ids}, n)
    assert torch.equal(got, ref)
    assert calls["n"] == 14 * n, calls  # prefill + (n - 1) decode steps, 14 sparse layers each


def test_triton_backend_under_compile(tmp_path, monkeypatch):
    """torch.compile(fullgraph=True) with the static cache keeps the kernels as opaque custom ops."""
    from torch._dynamo.testing import CompileCounterWithBackend

    dense, path = packed_pair(tmp_path, "32x32", 0.5, seed=2)
    model = _load(path)
    ids = make_tokenizer()("The ferry", return_tensors="pt")["input_ids"]
    n = 3
    ref = _greedy(dense, {"input_ids": ids}, n)
    monkeypatch.setenv("SPARSERUN_BACKEND", "triton")
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    got = _static_decode(model, torch.compile(model.forward, backend=cnt, fullgraph=True), ids, n)
    assert torch.equal(got, ref)
    assert cnt.frame_count == 1
    assert "sparserun.bsr_linear" in cnt.graphs[0].code  # the kernel op itself is in the graph
    torch._dynamo.reset()


# ---- GPU: bf16 agreement, compile + CUDA graphs -------------------------------------------------------
GPU_PROMPTS = ("The ferry leaves the harbour", "Sparse weights keep only", "Memory bandwidth, not arithmetic,",
               "A good unit test fails when")


def _gpu_pair(tmp_path, pattern, sparsity, fp32_too=False):
    """A larger tiny Llama (4 layers, hidden 256) so the kernels see more than one tile, on the GPU: the masked
    dense model in bf16 and the loaded sparse one (and the masked dense model in fp32 if asked)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.02, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    sparserun.sparsify_(model, pattern=pattern, sparsity=sparsity)
    dense = LlamaForCausalLM(cfg).eval()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if k in dense.state_dict()}, strict=False)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, SparseLinear):
                dense.get_submodule(name).weight.copy_(mod.dense_weight())
    sparserun.save(model, tmp_path / "p")
    dense32 = copy.deepcopy(dense).to("cuda", torch.float32) if fp32_too else None
    dense = copy.deepcopy(dense).to("cuda", torch.bfloat16)
    sparse = sparserun.load(tmp_path / "p", device="cuda", dtype=torch.bfloat16)
    return (dense, sparse, dense32) if fp32_too else (dense, sparse)


def _gpu_ids(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(3, 1024, (1, 8 + 3 * i), generator=g).cuda()


def _forced_agreement(model, seq, start):
    """Teacher forcing: how many of seq[start:] are `model`'s own greedy choice given the tokens before them,
    and the logits at those positions."""
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0, start - 1:-1].float()
    return int((logits.argmax(-1) == seq[0, start:]).sum()), logits


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("pattern, sparsity", [("2:4", None), ("64x64", 0.5), ("32x32", 0.9)],
                         ids=["2:4", "64x64-50", "32x32-90"])
def test_gpu_bf16_generate_agrees_with_masked_dense(tmp_path, monkeypatch, backend, pattern, sparsity):
    """bf16 on the GPU: the masked dense model's 64 greedy tokens (fp32) are the bf16 sparse model's own greedy
    choice at >= 95 % of positions over four prompts, and its logits are no further from fp32 than the bf16
    dense model's are.

    Teacher-forced (the model sees the reference prefix): free-running, one bf16 near-tie flip changes every
    later token, and the count measures the chaos of a random model rather than the kernels. Where bf16
    itself cannot reach 95 % on this random model, the sparse model must match the dense bf16 model's rate
    within 2 points; the logits bound catches a wrong kernel either way."""
    monkeypatch.setenv("SPARSERUN_BACKEND", backend)
    dense, model, dense32 = _gpu_pair(tmp_path, pattern, sparsity, fp32_too=True)
    n, total = 64, 0
    agree = {"sparse": 0, "dense": 0}
    errs = {"sparse": [], "dense": []}
    for i in range(len(GPU_PROMPTS)):
        ids = _gpu_ids(i)
        ref = _greedy(dense32, {"input_ids": ids}, n)
        _, ref_logits = _forced_agreement(dense32, ref, ids.shape[1])
        for name, m in (("sparse", model), ("dense", dense)):
            a, logits = _forced_agreement(m, ref, ids.shape[1])
            agree[name] += a
            errs[name].append(((logits - ref_logits).norm() / ref_logits.norm()).item())
        total += n
    rate = {k: v / total for k, v in agree.items()}
    msg = f"agreement with fp32 {rate}; logits rel. error vs fp32 {errs}"
    assert rate["sparse"] >= min(0.95, rate["dense"] - 0.02), msg
    assert max(errs["sparse"]) <= 1.5 * max(errs["dense"]) + 1e-3, msg


@pytest.mark.gpu
def test_gpu_generate_static_cache_compiled_with_cuda_graphs(tmp_path):
    """generate(cache_implementation="static") compiles the decode step (mode reduce-overhead = CUDA graphs);
    each token it produces is the eager model's greedy choice given the same prefix (>= 95 %)."""
    from transformers import CompileConfig

    _, model = _gpu_pair(tmp_path, "2:4", None)
    torch._dynamo.reset()
    n, same, total = 64, 0, 0
    for i in range(2):
        ids = _gpu_ids(i)
        _greedy(model, {"input_ids": ids}, 4)  # warms up the dispatcher outside capture
        comp = _greedy(model, {"input_ids": ids}, n, cache_implementation="static",
                       compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))
        assert comp.shape[1] == ids.shape[1] + n
        agree, _ = _forced_agreement(model, comp, ids.shape[1])
        same += agree
        total += n
    assert same / total >= 0.95, f"{same}/{total} compiled tokens are the eager model's choice"
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("pattern, sparsity", [("2:4", None), ("64x64", 0.9)], ids=["2:4", "64x64-90"])
def test_gpu_manual_compile_reduce_overhead_uses_cuda_graphs(tmp_path, pattern, sparsity):
    """torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) on a static cache: decode runs
    from CUDA graphs (inductor skipped none) and gives the eager tokens."""
    from torch._dynamo.utils import counters

    _, model = _gpu_pair(tmp_path, pattern, sparsity)
    ids = _gpu_ids(0)
    n = 16
    with torch.no_grad():
        ref = _greedy(model, {"input_ids": ids}, n)
    torch._dynamo.reset()
    counters.clear()
    fwd = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def step(**kw):
        torch.compiler.cudagraph_mark_step_begin()
        return fwd(**kw)

    # _static_decode builds CPU position tensors; on the GPU they must live on the device
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        p = ids.shape[1]
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(p, device="cuda"),
                    use_cache=True)
        toks = []
        for i in range(n):
            nxt = _next_token(model, out.logits)
            toks.append(nxt)
            cp = torch.tensor([p + i], device="cuda")
            out = step(input_ids=nxt, past_key_values=cache, cache_position=cp, position_ids=cp[None],
                       use_cache=True)
            out = type(out)(logits=out.logits.clone())  # graph outputs are overwritten by the next replay
    got = torch.cat([ids, *toks], dim=1)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    agree = float((got[0, p:] == ref[0, p:]).float().mean())
    assert agree >= 0.95, agree
    torch._dynamo.reset()


def test_compile_a_fresh_unstructured_model_and_one_cast_after_an_eager_call(tmp_path):
    """bitmask layers cache their dense weight: tracing must neither read the cache key (data pointers, write
    counters) nor reuse an entry of another dtype (the model cast after an eager call)."""
    dense, path = packed_pair(tmp_path, "unstructured", 0.5)
    ids = _prompts(make_tokenizer())["input_ids"]
    model = sparserun.load(path)
    with torch.no_grad():
        want = dense(ids).logits
        got = torch.compile(model, fullgraph=True, backend="eager")(ids).logits  # no eager call before
        assert torch.equal(got, want)
        model(ids)  # the cache now holds fp32 weights
        model.to(torch.bfloat16)
        ref = copy.deepcopy(model)(ids).logits
        assert torch.equal(torch.compile(model, fullgraph=True, backend="eager")(ids).logits, ref)
