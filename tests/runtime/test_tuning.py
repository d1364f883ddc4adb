"""The measured dispatcher's logic with fake timings: choice, dense wins ties, disk cache round trip,
corrupt cache file, concurrent writers, capture/compile fallbacks, forced backends. CPU only."""
import json
import os
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparserun.formats import semi24
from sparserun.runtime import dispatch, tuning
from sparserun.runtime.linear import SparseLinear
from sparserun.runtime.tuning import Tuner, key_string, m_bucket, pick


class FakeTimer:
    """Times a candidate by name: candidates built by `cands` record their name when run."""

    def __init__(self, times):
        self.times = dict(times)
        self.calls = []
        self.last = None

    def cands(self, names):
        def make(n):
            def fn():
                self.last = n
            return fn
        return {n: make(n) for n in names}

    def __call__(self, fn):
        fn()
        self.calls.append(self.last)
        return self.times[self.last]


KEY = {"format": "semi24", "N": 4096, "K": 4096, "M_bucket": 16, "dtype": "bfloat16", "gpu": "fake"}


def test_m_bucket():
    assert [m_bucket(m) for m in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025, 8192)] == \
        [1, 1, 2, 4, 4, 8, 1024, 1024, 2048, 8192]


def test_pick_fastest_and_dense_wins_ties():
    assert pick({"dense": 1.0, "triton": 0.5, "cuda": 0.7}) == "triton"
    assert pick({"dense": 1.0, "triton": 0.99}) == "dense"        # 1 % faster is a tie
    assert pick({"dense": 1.0, "triton": 0.98}) == "dense"        # exactly the 2 % margin: still a tie
    assert pick({"dense": 1.0, "triton": 0.97}) == "triton"
    assert pick({"dense": 1.0, "triton": 1.0}) == "dense"
    assert pick({"triton": 2.0, "cuda": 1.0}) == "cuda"           # no dense candidate: fastest
    assert pick({"dense": 1.0, "cuda": 0.9}, margin=0.2) == "dense"


def test_choose_times_once_and_caches(tmp_path):
    t = FakeTimer({"dense": 1.0, "triton": 0.6, "cuda": 0.4, "cusparselt": 0.5})
    tuner = Tuner(tmp_path / "c.json", timer=t)
    assert tuner.choose(KEY, t.cands(["triton", "cuda", "cusparselt", "dense"])) == "cuda"
    assert sorted(t.calls) == ["cuda", "cusparselt", "dense", "triton"]
    assert tuner.choose(KEY, t.cands(["triton", "cuda", "cusparselt", "dense"])) == "cuda"
    assert len(t.calls) == 4  # not timed again
    assert tuner.lookup(KEY) == "cuda"
    assert tuner.lookup({**KEY, "M_bucket": 32}) is None


def test_slower_sparse_is_never_chosen(tmp_path):
    t = FakeTimer({"dense": 1.0, "triton": 1.5, "cuda": 0.995})
    assert Tuner(tmp_path / "c.json", timer=t).choose(KEY, t.cands(["triton", "cuda", "dense"])) == "dense"


def test_disk_round_trip_and_versioned_file(tmp_path):
    path = tmp_path / "c.json"
    t = FakeTimer({"dense": 1.0, "triton": 0.5})
    Tuner(path, timer=t).choose(KEY, t.cands(["triton", "dense"]))
    data = json.loads(path.read_text())
    assert data["schema"] == tuning.SCHEMA
    entry = data["entries"][key_string(KEY)]
    assert entry["choice"] == "triton" and entry["times_ms"] == {"triton": 0.5, "dense": 1.0}

    def never(fn):
        raise AssertionError("a cached key must not be timed again")

    fresh = Tuner(path, timer=never)
    assert fresh.lookup(KEY) == "triton"
    assert fresh.choose(KEY, t.cands(["triton", "dense"])) == "triton"
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed, not left behind


BAD_ENTRIES = [{"choice": ["triton"]}, {"choice": "warp9"}, {"choice": "cuda", "times_ms": "fast"},
               {"choice": "cuda", "times_ms": 3}, {"choice": "cuda", "times_ms": {"cuda": float("nan")}},
               {"choice": "cuda", "times_ms": {"cuda": True}}]


@pytest.mark.parametrize("garbage", ["{not json", "", "[1, 2]", '{"schema": 999, "entries": {}}',
                                     '{"schema": 1, "entries": {"k": 3}}']
                         + [json.dumps({"schema": tuning.SCHEMA, "entries": {key_string(KEY): e}})
                            for e in BAD_ENTRIES])
def test_corrupt_cache_file_is_retuned_not_a_crash(tmp_path, garbage):
    path = tmp_path / "c.json"
    path.write_text(garbage)
    t = FakeTimer({"dense": 1.0, "cuda": 0.5})
    tuner = Tuner(path, timer=t)
    assert tuner.lookup(KEY) is None
    assert tuner.choose(KEY, t.cands(["cuda", "dense"])) == "cuda"
    assert t.calls  # it re-tuned
    data = json.loads(path.read_text())  # and rewrote a valid file
    assert data["entries"][key_string(KEY)]["choice"] == "cuda"


def test_a_bad_cache_file_is_warned_about_once(tmp_path, caplog):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    t = FakeTimer({"dense": 1.0, "cuda": 0.5})
    tuner = Tuner(None, timer=t)
    tuner.path = path  # reads the bad file on every miss, never rewrites it
    with caplog.at_level("WARNING", logger="sparserun.runtime.tuning"):
        for n in range(3):
            tuner.choose({**KEY, "N": n}, t.cands(["cuda", "dense"]))
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 1


def test_the_cache_file_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        t = FakeTimer({"dense": 1.0, "cuda": 0.5})
        Tuner(tmp_path / "c.json", timer=t).choose(KEY, t.cands(["cuda", "dense"]))
    finally:
        os.umask(old)
    assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600


def test_failing_candidate_is_skipped_and_all_failing_raises(tmp_path):
    def boom():
        raise RuntimeError("no kernel image for this GPU")

    t = FakeTimer({"dense": 1.0})
    cands = t.cands(["dense"])
    cands["cuda"] = boom
    tuner = Tuner(tmp_path / "c.json", timer=t)
    assert tuner.choose(KEY, cands) == "dense"
    assert "no kernel image" in tuner.entries()[key_string(KEY)]["errors"]["cuda"]
    with pytest.raises(RuntimeError, match="every backend failed"):
        tuner.choose({**KEY, "N": 1}, {"cuda": boom})


def test_an_unreadable_cache_path_is_not_a_crash(tmp_path):
    """Path.exists() raises for an over-long name (or an unreadable parent): the tuner works from memory."""
    t = FakeTimer({"dense": 1.0, "triton": 0.1})
    tuner = Tuner(tmp_path / ("x" * 300) / "c.json", timer=t)
    assert tuner.lookup(KEY) is None
    assert tuner.choose(KEY, t.cands(["triton", "dense"])) == "triton"
    assert tuner.lookup(KEY) == "triton"


def test_a_cache_file_that_cannot_be_read_is_left_alone(tmp_path, monkeypatch):
    """Another user's cache (mode 000 in a shared folder) was read as empty and replaced: their entries were
    lost. It is now left as it is and this process keeps its choices in memory."""
    path = tmp_path / "c.json"
    t = FakeTimer({"dense": 1.0, "triton": 0.1})
    Tuner(path, timer=t).choose({**KEY, "N": 7}, t.cands(["triton", "dense"]))
    before = path.read_bytes()
    real = Path.read_text

    def denied(self, *a, **k):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)  # as mode 000 would (root reads anything)
    tuner = Tuner(path, timer=t)
    assert tuner.choose(KEY, t.cands(["triton", "dense"])) == "triton"
    assert tuner.lookup(KEY) == "triton"
    monkeypatch.undo()
    assert path.read_bytes() == before


def test_unwritable_cache_keeps_the_choice_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    t = FakeTimer({"dense": 1.0, "triton": 0.1})
    tuner = Tuner(blocker / "sub" / "c.json", timer=t)  # parent is a file: every write fails
    assert tuner.choose(KEY, t.cands(["triton", "dense"])) == "triton"
    assert tuner.lookup(KEY) == "triton"


def _writer(path, worker, n_keys):
    timer = FakeTimer({"dense": 1.0, "triton": 0.5})
    tuner = Tuner(path, timer=timer)
    for i in range(n_keys):
        tuner.choose({**KEY, "N": 1000 * worker + i}, timer.cands(["triton", "dense"]))
        tuner.choose({**KEY, "N": -i}, timer.cands(["triton", "dense"]))  # shared keys too


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "c.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = json.loads(path.read_text())["entries"]
    want = {key_string({**KEY, "N": 1000 * w + i}) for w in range(4) for i in range(15)}
    want |= {key_string({**KEY, "N": -i}) for i in range(15)}
    assert want <= set(entries)
    assert all(e["choice"] == "triton" for e in entries.values())


# ---- the dispatcher, with every GPU backend faked ---------------------------------------------------
def _layer(n=64, k=96, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).view(n, k)
    return SparseLinear.from_packed(semi24.pack(w, mask), torch.randn(n, generator=g).to(dtype))


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """auto_backend on CPU tensors, all four backends 'available', run_backend recording the name."""
    times = {"dense": 1.0, "triton": 0.5, "cuda": 0.3, "cusparselt": 0.4}
    ran = []
    last = {}
    real_run = dispatch.run_backend

    def fake_run(name, layer, x):
        ran.append(name)
        last["name"] = name
        if name in ("cuda", "cusparselt"):  # build the prepared operand as the real ones would
            getattr(dispatch, {"cuda": "cuda_cached", "cusparselt": "dense_cached"}[name])(layer)
            if name == "cusparselt":
                layer._sr_cslt = (dispatch._data_key(layer), "packed")
            return F.linear(x, layer.dense_weight(), layer.bias)
        return real_run("dense" if name == "triton" else name, layer, x)

    monkeypatch.setattr(dispatch, "run_backend", fake_run)
    for f in ("triton_ok", "cuda_kernel_ok", "cusparselt_ok"):
        monkeypatch.setattr(dispatch, f, lambda layer, x: True)
    monkeypatch.setattr(dispatch, "_software_key", lambda device: {"gpu": "fake-gpu", "torch": "t"})
    monkeypatch.setattr(dispatch, "_cannot_time", lambda: False)
    monkeypatch.setattr(dispatch, "_compiling", lambda: False)
    monkeypatch.setenv("SPARSERUN_BACKENDS", "all")  # every backend competes (the default leaves two out)
    tuner = Tuner(tmp_path / "c.json", timer=lambda fn: (fn(), times[last["name"]])[1])
    tuning.set_tuner(tuner)
    dispatch.clear_memo()
    yield {"times": times, "ran": ran, "tuner": tuner}
    tuning.set_tuner(None)
    dispatch.clear_memo()


def test_an_empty_input_neither_times_nor_decides_the_decode_bucket(fake_gpu):
    layer = _layer()
    assert dispatch.auto_backend(layer, torch.randn(0, 96)) == dispatch.static_choice(layer, 0)
    assert fake_gpu["ran"] == [] and fake_gpu["tuner"].entries() == {}


def test_e2e_report_reads_the_choices_the_dispatcher_made(fake_gpu):
    """bench e2e lists the dispatcher's in-process choices per variant. The memo is filled only on a GPU, so
    the CPU dry run never read one: a key that grew a field made every sparse e2e row fail on the H100."""
    from sparserun.bench.e2e import Variant, backend_choices
    from sparserun.formats import bsr

    w = torch.randn(64, 96)
    blocks = torch.zeros(2, 3, dtype=torch.bool)
    blocks[0, 1] = blocks[1, 0] = blocks[1, 2] = True  # 3 of 6 blocks: density 0.5
    mask = blocks.repeat_interleave(32, 0).repeat_interleave(32, 1)
    block_layer = SparseLinear.from_packed(bsr.pack(w, mask, 32))
    for layer in (_layer(), block_layer):
        dispatch.auto_backend(layer, torch.randn(3, 96))
    assert backend_choices(Variant("2:4", "2:4", 0.5)) == [
        "64x96 M<=4: cuda (cuda 300.0, cusparselt 400.0, dense 1000.0, triton 500.0 us)"]
    assert backend_choices(Variant("32x32-50", "32x32", 0.5))[0].startswith("64x96 M<=4: ")
    assert backend_choices(Variant("64x64-50", "64x64", 0.5)) == ["cpu: reference (auto)"]  # no such layer


def test_keep_dense_is_part_of_the_tuning_key(fake_gpu, monkeypatch):
    """With a resident dense copy the dense candidate is a bare GEMM: its timing must not answer for a default
    process, where dense means decompress + GEMM per call (and the other way round)."""
    layer = _layer()
    x = torch.randn(5, 96)
    monkeypatch.setenv("SPARSERUN_KEEP_DENSE", "1")
    with_copy = dispatch.tuning_key(layer, 5, x.dtype, x.device)
    fake_gpu["times"].update(dense=0.1)
    assert dispatch.auto_backend(layer, x) == "dense"
    monkeypatch.delenv("SPARSERUN_KEEP_DENSE")
    assert dispatch.tuning_key(layer, 5, x.dtype, x.device) != with_copy
    fake_gpu["times"].update(dense=1.0)
    assert dispatch.auto_backend(layer, x) == "cuda"  # timed again, not replayed from the other setting


def test_auto_picks_the_fastest_and_frees_the_losers(fake_gpu):
    layer = _layer()
    x = torch.randn(5, 96)
    assert dispatch.auto_backend(layer, x) == "cuda"
    assert set(fake_gpu["ran"]) == {"dense", "triton", "cuda", "cusparselt"}
    assert layer._sr_cuda is not None  # the winner keeps its repacked operands
    assert layer._dense_cache is None and layer._sr_cslt is None  # the losers' are freed
    n_runs = len(fake_gpu["ran"])
    assert dispatch.auto_backend(layer, torch.randn(7, 96)) == "cuda"  # same M bucket (8): memo hit
    assert len(fake_gpu["ran"]) == n_runs
    key = dispatch.tuning_key(layer, 5, x.dtype, x.device)
    assert key["M_bucket"] == 8 and key["N"] == 64 and key["K"] == 96 and key["format"] == "semi24"
    assert fake_gpu["tuner"].lookup(key) == "cuda"


def test_a_backend_with_wrong_output_is_never_chosen(fake_gpu, monkeypatch):
    """cuda is the fastest (0.3) but computes garbage on this 'GPU': auto takes the fastest correct one, and
    the cache records why cuda lost."""
    real = dispatch.run_backend  # the fixture's fake

    def run(name, layer, x):
        y = real(name, layer, x)
        return y + 1.0 if name == "cuda" else y

    monkeypatch.setattr(dispatch, "run_backend", run)
    layer = _layer()
    x = torch.randn(5, 96)
    assert dispatch.auto_backend(layer, x) == "cusparselt"  # 0.4: next fastest, correct
    entry = fake_gpu["tuner"]._mem[tuning.key_string(dispatch.tuning_key(layer, 5, x.dtype, x.device))]
    assert "wrong output" in entry["errors"]["cuda"] and "cuda" not in entry["times_ms"]


@pytest.mark.parametrize("poison", ["nan", "overflow"])
def test_a_non_finite_input_runs_untuned_and_decides_nothing(fake_gpu, poison):
    """NaN in x, or an fp16 output past 65504: every backend (dense too) failed the output check and the forward
    raised "every backend failed while tuning", where nn.Linear returns NaN/Inf. It now runs the static
    choice, caches nothing, and the next finite input of the bucket tunes it."""
    layer = _layer(dtype=torch.float16)
    x = torch.randn(5, 96).half()
    if poison == "nan":
        x[0, 3] = float("nan")
    else:
        x[0] = 60000.0
    assert dispatch.auto_backend(layer, x) == dispatch.static_choice(layer, 5)
    assert fake_gpu["tuner"].entries() == {} and dispatch._memo == {}
    assert dispatch.auto_backend(layer, torch.randn(5, 96).half()) == "cuda"  # tuned now
    assert len(fake_gpu["tuner"].entries()) == 1


def test_kernel_config_pick_on_a_non_finite_input_runs_the_default_uncached():
    from sparserun.kernels import _tuning as kt

    ran = []

    def check(y):
        return kt.rel_err(y, torch.tensor([float("inf"), 1.0]))

    got = kt.pick(("probe-nonfinite",), lambda: [{"a": 1}, {"a": 2}], lambda cfg: ran.append(cfg) or
                  torch.zeros(2), lambda: {"a": 0}, check)
    assert got == {"a": 0} and ("probe-nonfinite",) not in kt.tuned()


def test_output_check_compares_sampled_rows_with_torch():
    layer = _layer(n=200, k=96)
    x = torch.randn(150, 96)  # more tokens and features than the sample: first and last 64 of each
    check = dispatch.output_check(layer, x)
    y = dispatch.run_backend("reference", layer, x)
    assert check(y) < 1e-6
    bad = y.clone()
    bad[-1, -1] += 100.0  # the last token's last feature is in the sample
    assert check(bad) > 1e-2


def test_auto_dense_when_sparse_is_not_faster(fake_gpu):
    fake_gpu["times"].update(dense=1.0, triton=1.2, cuda=0.99, cusparselt=2.0)
    layer = _layer()
    assert dispatch.auto_backend(layer, torch.randn(300, 96)) == "dense"


def test_prepared_operands_never_reach_the_state_dict(fake_gpu, monkeypatch):
    layer = _layer()
    before = set(layer.state_dict())
    dispatch.cuda_cached(layer)
    monkeypatch.setenv("SPARSERUN_KEEP_DENSE", "1")
    dispatch.dense_cached(layer)
    assert layer._dense_cache is not None
    assert set(layer.state_dict()) == before == {"values", "meta", "bias"}


def test_capture_or_compile_uses_cache_or_static_rule(fake_gpu, monkeypatch):
    layer = _layer()
    monkeypatch.setattr(dispatch, "_cannot_time", lambda: True)
    # nothing cached: static rule (Triton for small M; dense above, which by default decompresses per call)
    assert dispatch.auto_backend(layer, torch.randn(8, 96)) == "triton"
    assert dispatch.auto_backend(layer, torch.randn(500, 96)) == "dense"
    # with a resident dense copy asked for, dense only once that copy exists (never built inside capture)
    monkeypatch.setenv("SPARSERUN_KEEP_DENSE", "1")
    dispatch.clear_memo()
    assert dispatch.auto_backend(layer, torch.randn(500, 96)) == "triton"
    dispatch.dense_cached(layer)
    dispatch.clear_memo()
    assert dispatch.auto_backend(layer, torch.randn(500, 96)) == "dense"
    monkeypatch.delenv("SPARSERUN_KEEP_DENSE")
    assert fake_gpu["ran"] == []  # nothing was timed
    # a cached choice is used, but only if its operands exist already
    monkeypatch.setattr(dispatch, "_cannot_time", lambda: False)
    dispatch.clear_memo()
    assert dispatch.auto_backend(layer, torch.randn(2000, 96)) == "cuda"
    layer._sr_cuda = None
    dispatch.clear_memo()
    monkeypatch.setattr(dispatch, "_cannot_time", lambda: True)
    assert dispatch.auto_backend(layer, torch.randn(2000, 96)) == "triton"
    dispatch.cuda_cached(layer)
    assert dispatch.auto_backend(layer, torch.randn(2000, 96)) == "cuda"
    # while tracing (torch.compile) nothing is read from disk either: memo or static rule
    monkeypatch.setattr(dispatch, "_compiling", lambda: True)
    dispatch.clear_memo()
    assert dispatch.auto_backend(layer, torch.randn(2000, 96)) == "dense"  # static rule, not the disk's "cuda"
    assert dispatch.auto_backend(layer, torch.randn(3, 96)) == "triton"


def test_autograd_excludes_backends_without_a_backward(fake_gpu):
    layer = _layer()
    x = torch.randn(4, 96, requires_grad=True)
    assert dispatch.auto_backend(layer, x) == "triton"
    assert "cuda" not in fake_gpu["ran"] and "cusparselt" not in fake_gpu["ran"]
    with torch.no_grad():
        assert dispatch.auto_backend(layer, x) == "cuda"


def test_tune_model_dedups_shapes(fake_gpu):
    model = torch.nn.Sequential(_layer(seed=1), _layer(seed=2), _layer(n=32, k=64, seed=3))
    rows = tuning.tune_model(model, m_values=(1, 16, 100))
    assert [(r["N"], r["K"], r["M"]) for r in rows] == [(64, 96, 1), (64, 96, 16), (64, 96, 100),
                                                        (32, 64, 1), (32, 64, 16), (32, 64, 100)]
    assert all(r["choice"] == "cuda" and r["times_ms"]["dense"] == 1.0 for r in rows)
    assert len(fake_gpu["tuner"].entries()) == 6


def test_tune_model_tunes_the_fused_layer_that_grouped_siblings_run(fake_gpu):
    """With q/k/v grouped, the layer that runs is the fused one (N = 64+32+32), not a submodule: bench tune
    must tune its shape, or the first grouped call tunes it lazily (inside a capture: a static guess)."""
    from sparserun.bench.e2e import prepared_bytes, release_prepared
    from sparserun.runtime.siblings import group_siblings, running_layers

    att = torch.nn.Module()
    att.q_proj, att.k_proj, att.v_proj = _layer(seed=1), _layer(n=32, seed=2), _layer(n=32, seed=3)
    model = torch.nn.Sequential(att)
    assert group_siblings(model) == ["0: q_proj+k_proj+v_proj"]
    assert [(n, m.out_features) for n, m in running_layers(model)] == [
        ("0.q_proj", 64), ("0.q_proj+k_proj+v_proj", 128), ("0.k_proj", 32), ("0.v_proj", 32)]
    rows = tuning.tune_model(model, m_values=(1,))
    assert [(r["layer"], r["N"]) for r in rows] == [("0.q_proj", 64), ("0.q_proj+k_proj+v_proj", 128),
                                                   ("0.k_proj", 32)]  # v_proj has k_proj's key
    # the fused layer's prepared operand (the fake cuda backend built one) is counted and released
    fused = att.q_proj.__dict__["_sr_group"].fused
    assert fused._sr_cuda is not None and prepared_bytes(model) > 0
    release_prepared(model)
    assert fused._sr_cuda is None and prepared_bytes(model) == 0


def test_nothing_made_inside_a_cuda_graph_capture_is_cached(monkeypatch):
    """A tensor made while a CUDA graph captures holds garbage until a replay runs its kernels: a first call
    inside a capture (a forced backend, a read of .weight) must compute its operands without keeping them."""
    layer = _layer()
    monkeypatch.setenv("SPARSERUN_KEEP_DENSE", "1")
    monkeypatch.setattr(dispatch, "capturing", lambda: True)
    SparseLinear._last_read = None
    assert torch.equal(dispatch.dense_cached(layer), layer.dense_weight()) and layer._dense_cache is None
    assert len(dispatch.cuda_cached(layer)) == 2 and getattr(layer, "_sr_cuda", None) is None
    monkeypatch.setattr(SparseLinear, "_weight_warned", True)  # (its one warning per process: not tested here)
    layer.weight
    assert SparseLinear._last_read is None
    monkeypatch.setattr(dispatch, "capturing", lambda: False)  # outside a capture they are kept, as before
    dispatch.dense_cached(layer), dispatch.cuda_cached(layer)
    assert layer._dense_cache is not None and layer._sr_cuda is not None


def test_forced_backends(monkeypatch):
    layer = _layer()
    x = torch.randn(3, 96)
    for b in ("dense", "reference", "triton", "cuda", "cusparselt"):
        monkeypatch.setenv("SPARSERUN_BACKEND", b)
        assert dispatch.choose_backend(layer, x) == b
    monkeypatch.setenv("SPARSERUN_BACKEND", "cuda")
    bitmask = SparseLinear.from_linear(torch.nn.Linear(16, 8), torch.rand(8, 16) > 0.5, "unstructured")
    assert dispatch.choose_backend(bitmask, torch.randn(2, 16)) == "dense"
    monkeypatch.setenv("SPARSERUN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        dispatch.choose_backend(layer, x)
    # forced cuda on a CPU tensor: a clear error, not a crash inside the kernel
    monkeypatch.setenv("SPARSERUN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' unavailable"):
        layer(x)
    monkeypatch.setenv("SPARSERUN_BACKEND", "cusparselt")
    with pytest.raises(RuntimeError, match="cusparselt' unavailable"):
        layer(x)


def test_cpu_auto_is_the_reference(monkeypatch):
    monkeypatch.delenv("SPARSERUN_BACKEND", raising=False)
    layer = _layer()
    x = torch.randn(2, 3, 96)
    assert dispatch.choose_backend(layer, x) == "reference"
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))


def test_cli_bench_group_and_tune(monkeypatch, tmp_path, capsys):
    from sparserun import cli

    assert cli.main(["bench"]) == 2  # a group without a sub-subcommand: help, usage error
    assert cli.main(["bench", "tune", "--help"]) == 0
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert cli.main(["bench", "tune", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: bench tune times GPU kernels and needs a CUDA device") and err.count("\n") == 1
    assert cli.main(["bench", "tune", str(tmp_path), "--m", "x"]) == 1
    assert "--m takes comma-separated token counts such as 1,16,2048, got 'x'" in capsys.readouterr().err
    # an unwritable --json fails before the tuning (its timings would be lost after it), on any machine
    (tmp_path / "file").write_text("x")
    for bad, said in [(tmp_path, "is a directory"), (tmp_path / "file" / "rows.json", "cannot write results")]:
        assert cli.main(["bench", "tune", str(tmp_path), "--json", str(bad)]) == 1
        assert said in capsys.readouterr().err
    # the command wires its options through to tune_dir and writes the rows
    seen = {}

    def fake_tune_dir(path, device, dtype, m_values, progress):
        seen.update(path=path, device=device, dtype=dtype, m=list(m_values))
        return [{"layer": "l", "format": "semi24", "N": 8, "K": 8, "M": 1, "choice": "dense",
                 "times_ms": {"dense": 1.0}, "errors": {}}]

    monkeypatch.setattr(tuning, "tune_dir", fake_tune_dir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tuning.set_tuner(Tuner(tmp_path / "c.json"))
    try:
        out = tmp_path / "rows.json"
        assert cli.main(["bench", "tune", str(tmp_path), "--m", "1,16,4096", "--dtype", "bf16",
                         "--json", str(out)]) == 0
    finally:
        tuning.set_tuner(None)
    assert seen == {"path": str(tmp_path), "device": "cuda", "dtype": torch.bfloat16, "m": [1, 16, 4096]}
    assert json.loads(out.read_text())[0]["choice"] == "dense"
    assert "tuned 1 (shape, M) keys: dense 1" in capsys.readouterr().out


def test_dense_backend_holds_no_resident_copy_by_default(monkeypatch):
    """The dense fallback of a kernel format decompresses per call: no dense copy stays beside the packed
    weight unless SPARSERUN_KEEP_DENSE=1 asks for one (formats without a kernel always keep theirs)."""
    monkeypatch.delenv("SPARSERUN_KEEP_DENSE", raising=False)
    monkeypatch.delenv("SPARSERUN_BACKEND", raising=False)
    layer = _layer()
    x = torch.randn(3, 96)
    ref = F.linear(x.double(), layer.dense_weight().double(), layer.bias.double())
    y = dispatch.run_backend("dense", layer, x)
    assert layer._dense_cache is None
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6
    monkeypatch.setenv("SPARSERUN_KEEP_DENSE", "1")
    dispatch.run_backend("dense", layer, x)
    assert layer._dense_cache is not None and torch.equal(layer._dense_cache[1], layer.dense_weight())


@pytest.mark.gpu
def test_graph_timer_times_gpu_work_not_host_launches():
    """graph_timer: positive, grows with the work, and a launch-heavy but tiny op stays far below do_bench's
    host-bound number (the reason it is the default)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    x1 = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    xb = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    small = tuning.graph_timer(lambda: x1 @ a.t())
    big = tuning.graph_timer(lambda: xb @ a.t())
    assert 0 < small < big
    tiny = torch.randn(8, device="cuda")

    def many_launches():
        y = tiny
        for _ in range(50):
            y = y + 1
        return y

    assert tuning.graph_timer(many_launches) < tuning.do_bench_timer(many_launches)


@pytest.mark.parametrize("setting", [None, "triton,dense", "dense,triton"])
def test_by_default_auto_never_builds_a_second_weight_copy(fake_gpu, monkeypatch, setting):
    """By default (and with SPARSERUN_BACKENDS=triton,dense) auto chooses only among backends that run on the
    packed tensors themselves: cuda/cusparselt would keep their own copy of the weight."""
    if setting is None:
        monkeypatch.delenv("SPARSERUN_BACKENDS")
    else:
        monkeypatch.setenv("SPARSERUN_BACKENDS", setting)
    layer = _layer()
    assert dispatch.auto_backend(layer, torch.randn(5, 96)) == "triton"  # cuda (0.3) would have won
    assert set(fake_gpu["ran"]) == {"dense", "triton"}
    assert getattr(layer, "_sr_cuda", None) is None and getattr(layer, "_sr_cslt", None) is None
    # the restricted choice is cached under its own key: a process allowing all still gets the fastest
    monkeypatch.setenv("SPARSERUN_BACKENDS", "all")
    dispatch.clear_memo()
    assert dispatch.auto_backend(layer, torch.randn(5, 96)) == "cuda"


def test_allowed_backends_reject_unknown_names(fake_gpu, monkeypatch):
    layer = _layer()
    monkeypatch.setenv("SPARSERUN_BACKENDS", "triton,cudnn")
    dispatch.clear_memo()
    with pytest.raises(ValueError, match="SPARSERUN_BACKENDS='triton,cudnn': unknown cudnn; .* or all"):
        dispatch.auto_backend(layer, torch.randn(300, 96))
