"""Sibling grouping (runtime/siblings.py): q/k/v and gate/up run as one fused layer, with the members'
storage shared, outputs equal to the ungrouped model, and a hand-off that never reuses a stale output."""
import pytest
import torch

import sparserun
from sparserun.runtime import dispatch, siblings
from sparserun.runtime.linear import SparseLinear

from ._tiny import make_tokenizer, packed_pair


@pytest.fixture(scope="module", params=[("2:4", None), ("32x32", 0.5)], ids=["2of4", "32x32"])
def packed(request, tmp_path_factory):
    pattern, sparsity = request.param
    dense, path = packed_pair(tmp_path_factory.mktemp("sib"), pattern, sparsity)
    return dense, path


def _count_fused_calls(monkeypatch):
    calls = []
    real = dispatch.sparse_linear

    def spy(layer, x):
        calls.append((layer.out_features, layer.in_features))
        return real(layer, x)

    monkeypatch.setattr(dispatch, "sparse_linear", spy)
    return calls


def test_grouped_model_matches_and_launches_four_layers_per_block(packed, monkeypatch):
    dense, path = packed
    plain = sparserun.load(path)
    grouped = sparserun.load(path, group_siblings=True)
    att = grouped.model.layers[0].self_attn
    assert att.q_proj.__dict__["_sr_group"] is att.k_proj.__dict__["_sr_group"]
    ids = make_tokenizer()("Sparse weights keep only the entries", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = plain(ids).logits
        calls = _count_fused_calls(monkeypatch)
        got = grouped(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # per decoder layer: q+k+v (64+32+32 rows), o, gate+up (128+128), down
    assert calls.count((128, 64)) == 2 and calls.count((256, 64)) == 2 and len(calls) == 2 * 4, calls
    # the state_dict still holds each member under its own name, and no weight is stored twice
    assert set(grouped.state_dict()) == set(plain.state_dict())
    fused = att.q_proj.__dict__["_sr_group"].fused
    for m in (att.q_proj, att.k_proj, att.v_proj):
        assert m.values.untyped_storage().data_ptr() == fused.values.untyped_storage().data_ptr()


def test_grouped_model_generates_the_same_tokens_and_saves_the_same_checkpoint(packed, tmp_path):
    dense, path = packed
    grouped = sparserun.load(path, group_siblings=True)
    tok = make_tokenizer()
    enc = tok(["The ferry leaves"], return_tensors="pt")
    with torch.no_grad():
        a = grouped.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        b = dense.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    sparserun.save(grouped, tmp_path / "again")
    again = sparserun.load(tmp_path / "again")
    for (n1, t1), (n2, t2) in zip(sorted(grouped.state_dict().items()), sorted(again.state_dict().items())):
        assert n1 == n2 and torch.equal(t1, t2), n1


def _group_of_three(seed=0):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for n in (64, 32, 32):
        lin = torch.nn.Linear(64, n)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, 64, generator=gen))
            lin.bias.copy_(torch.randn(n, generator=gen))
        keep = torch.rand(n, 16, 4, generator=gen).argsort(-1)[..., :2]
        mask = torch.zeros(n, 16, 4, dtype=torch.bool).scatter_(-1, keep, True).view(n, 64)
        layers.append(SparseLinear.from_linear(lin, mask, "2:4"))
    parent = torch.nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = layers
    return parent


def test_hand_off_never_reuses_a_stale_output(monkeypatch):
    parent = _group_of_three()
    ref = {n: (lambda m: (lambda x: torch.nn.functional.linear(x, m.dense_weight(), m.bias)))(getattr(parent, n))
           for n in ("q_proj", "k_proj", "v_proj")}
    assert siblings.group_siblings(parent) == ["<root>: q_proj+k_proj+v_proj"]
    calls = _count_fused_calls(monkeypatch)
    x = torch.randn(3, 64)
    with torch.no_grad():
        q, k = parent.q_proj(x), parent.k_proj(x)
        assert len(calls) == 1  # k's slice came from q's launch
        x.mul_(2.0)  # modified in place: the version counter says so
        v = parent.v_proj(x)
        assert len(calls) == 2
        for name, y in (("q_proj", q), ("k_proj", k)):
            torch.testing.assert_close(y, ref[name](x / 2.0))
        torch.testing.assert_close(v, ref["v_proj"](x))
        y1 = parent.q_proj(x)  # v's launch already computed q for this very x: handed over
        assert len(calls) == 2
        y2 = parent.q_proj(x)  # the same member twice: recomputed, not handed its own slice again
        assert len(calls) == 3
        torch.testing.assert_close(y2, y1)
        torch.testing.assert_close(y1, ref["q_proj"](x))
        x2 = x.clone()  # equal values, another tensor: recomputed
        parent.k_proj(x2)
        assert len(calls) == 4
        # weights edited in place through a member's view: the fused layer sees it (shared storage)
        parent.v_proj.values.mul_(0.5)
        x3 = torch.randn(2, 64)
        torch.testing.assert_close(parent.v_proj(x3), ref["v_proj"](x3))


def test_grouping_steps_aside_for_autograd_compile_and_moved_layers(monkeypatch):
    parent = _group_of_three()
    siblings.group_siblings(parent)
    calls = _count_fused_calls(monkeypatch)
    x = torch.randn(2, 64)
    parent.q_proj(x)  # grad enabled and the bias requires grad: each layer on its own
    assert calls == [(64, 64)]
    parent.k_proj.bias = torch.nn.Parameter(torch.zeros(32), requires_grad=False)  # replaced: not a view
    with torch.no_grad():
        calls.clear()
        parent.k_proj(x)
        assert calls == [(32, 64)]
    assert siblings.ungroup_siblings(parent) == 3
    assert siblings.group_siblings(parent) == ["<root>: q_proj+k_proj+v_proj"]  # can be grouped afresh


def test_incompatible_siblings_are_left_alone():
    parent = _group_of_three()
    parent.v_proj = torch.nn.Linear(64, 32)  # a dense sibling
    assert siblings.group_siblings(parent) == []
    assert parent.q_proj.__dict__.get("_sr_group") is None


def test_load_reads_the_environment_switch(packed, monkeypatch):
    _, path = packed
    monkeypatch.setenv("SPARSERUN_GROUP_SIBLINGS", "1")
    m = sparserun.load(path)
    assert m.model.layers[1].mlp.gate_proj.__dict__.get("_sr_group") is not None
    monkeypatch.setenv("SPARSERUN_GROUP_SIBLINGS", "0")
    assert sparserun.load(path).model.layers[1].mlp.gate_proj.__dict__.get("_sr_group") is None


@pytest.mark.parametrize("pattern", ["2:4", "32x32"])
def test_real_minilm_grouped_query_key_value(minilm_packed, pattern):
    """BERT-style attention (query/key/value) on the real MiniLM: the grouped model gives the masked dense
    model's embeddings, as the ungrouped one does."""
    info = minilm_packed[pattern]
    model = sparserun.load(info["dir"], group_siblings=True)
    assert model.encoder.layer[0].attention.self.query.__dict__.get("_sr_group") is not None
    with torch.no_grad():
        out = model(**info["inputs"]).last_hidden_state
    torch.testing.assert_close(out, info["ref"][0], rtol=1e-4, atol=1e-4)


def test_grouped_model_through_the_triton_kernels(packed, monkeypatch):
    """The fused layers (concatenated 2:4 rows, BSR crow offsets) run through the Triton kernels (the
    interpreter here, CUDA on a GPU) and agree with the ungrouped model on the same backend."""
    monkeypatch.setenv("SPARSERUN_BACKEND", "triton")
    _, path = packed
    ids = make_tokenizer()("Memory bandwidth limits decoding", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = sparserun.load(path)(ids).logits
        got = sparserun.load(path, group_siblings=True)(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_grouped_decode_step_in_a_cuda_graph(packed):
    """Captured once, replayed on new inputs: the hand-off between siblings is Python state that exists only at
    capture, so the replay must still give each member its own slice of the fused launch."""
    _, path = packed
    plain = sparserun.load(path, device="cuda", dtype=torch.bfloat16)
    grouped = sparserun.load(path, device="cuda", dtype=torch.bfloat16, group_siblings=True)
    ids = torch.randint(3, 300, (2, 12), device="cuda")
    static = ids.clone()
    with torch.no_grad():
        grouped(static)  # warm-up: tunes the fused shapes outside the capture
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            grouped(static)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = grouped(static).logits
        new = torch.randint(3, 300, (2, 12), device="cuda")
        static.copy_(new)
        g.replay()
        ref = plain(new).logits
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)


def test_two_threads_never_take_each_others_slices(packed, monkeypatch):
    """Thread A's fused call is held until thread B has run q and k on its own input; B's v then runs
    between A's q and A's k. Every output must be its own input's projection (the hand-off is per thread:
    shared, B's v took a slice of A's output)."""
    import threading

    _, path = packed
    grouped = sparserun.load(path, group_siblings=True)
    att = grouped.model.layers[0].self_attn
    xa, xb = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    want = {(n, w): dispatch.sparse_linear(getattr(att, n), x)
            for n in ("q_proj", "k_proj", "v_proj") for w, x in (("a", xa), ("b", xb))}
    real = dispatch.sparse_linear
    a_inside, b_qk, a_q, b_v = (threading.Event() for _ in range(4))

    def held(layer, x):
        if x is xa and not a_inside.is_set():
            a_inside.set()
            assert b_qk.wait(10)
        return real(layer, x)

    monkeypatch.setattr(dispatch, "sparse_linear", held)
    got = {}

    def run_a():
        with torch.no_grad():
            got["q_proj", "a"] = att.q_proj(xa)
            a_q.set()
            assert b_v.wait(10)
            got["k_proj", "a"], got["v_proj", "a"] = att.k_proj(xa), att.v_proj(xa)

    thread = threading.Thread(target=run_a)
    thread.start()
    assert a_inside.wait(10)
    with torch.no_grad():
        got["q_proj", "b"], got["k_proj", "b"] = att.q_proj(xb), att.k_proj(xb)
        b_qk.set()
        assert a_q.wait(10)
        got["v_proj", "b"] = att.v_proj(xb)
    b_v.set()
    thread.join(10)
    for key, y in want.items():
        torch.testing.assert_close(got[key], y, rtol=1e-5, atol=1e-5, msg=str(key))


def test_bad_sibling_names_and_flags_are_one_line_errors(packed):
    _, path = packed
    model = sparserun.load(path)
    with pytest.raises(TypeError, match="siblings must be groups of module names"):
        siblings.group_siblings(model, siblings="q_proj")  # was iterated letter by letter
    with pytest.raises(TypeError, match=r"load\(group_siblings=...\) must be True or False, got 'yes'"):
        sparserun.load(path, group_siblings="yes")
    assert siblings.group_siblings(model, siblings=[["gate_proj", "up_proj"]])  # lists work as tuples
