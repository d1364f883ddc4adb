"""sparserun convert: streaming HF dir -> packed dir; load it back and check it is the pruned model."""
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparserun
from sparserun import checkpoint as ck
from sparserun import cli
from sparserun import convert as cv
from sparserun.prune import calibrate

from .prune._models import one_cpu_thread, save_llama_dir, write_random_llama_dir  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


def tree_hash(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory) -> Path:
    return save_llama_dir(tmp_path_factory.mktemp("src") / "llama", layers=2)


def run_cli(*argv, split: bool = False):
    """(exit code, stdout + stderr), or (exit code, stdout, stderr) with split=True."""
    import contextlib
    import io

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = cli.main([str(a) for a in argv])
    if split:
        return rc, out.getvalue(), err.getvalue()
    return rc, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("method,pattern,sparsity,tied", [("sparsegpt", "2:4", None, False),
                                                           ("wanda", "32x32", 0.5, True),
                                                           ("taylor", "unstructured", 0.6, False)])
def test_llama_convert_load_generate_same_tokens(tmp_path, method, pattern, sparsity, tied):
    from transformers import AutoTokenizer, LlamaForCausalLM

    src = save_llama_dir(tmp_path / "src", layers=2, tie_word_embeddings=tied) if tied else \
        save_llama_dir(tmp_path / "src", layers=2)
    before = tree_hash(src)
    out = tmp_path / "out"
    rep = cv.convert(src, out, method, pattern, sparsity, nsamples=4, seqlen=48, progress=False)
    assert tree_hash(src) == before  # the source is only read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp dirs left behind
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["totals"]["pruned"] == 14 and on_disk["method"] == method
    assert on_disk["calibration"]["source"].endswith("calib_default.txt)")

    model = sparserun.load(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    # the masked dense model: the same pruning in memory (the API and the streaming converter agree)
    tok = AutoTokenizer.from_pretrained(src)
    ref = LlamaForCausalLM.from_pretrained(src).eval()
    ref_rep = sparserun.prune(ref, method, pattern, sparsity, tokenizer=tok, nsamples=4, seqlen=48,
                              progress=False)
    for name, mask in ref_rep.masks.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, sparserun.SparseLinear), name
        assert torch.equal(layer.dense_weight(), ref.get_submodule(name).weight.detach()), name
        assert torch.equal(layer.weight_mask() | mask, layer.weight_mask())  # 2:4 may store filler slots
    assert [r["rel_error"] for r in rep.rows] == [r["rel_error"] for r in ref_rep.rows]
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tok("The keeper wrote in the ledger", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=20, do_sample=False)
        want = ref.generate(ids, max_new_tokens=20, do_sample=False)
    assert got.shape[1] == ids.shape[1] + 20
    assert torch.equal(got, want)


MINILM_CELLS = [(m, p, s) for m in ("magnitude", "wanda", "sparsegpt", "taylor", "obd")
                for p, s in (("2:4", None), ("4:8", None), ("unstructured", 0.5), ("32x32", 0.5))]


@pytest.fixture(scope="module")
def minilm_ref(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    ids = tok("A short sentence about lighthouses and the sea.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = AutoModel.from_pretrained(minilm_dir).eval()(input_ids=ids).last_hidden_state
    return tree_hash(minilm_dir), ids, ref


@pytest.mark.parametrize("method,pattern,sparsity", MINILM_CELLS)
def test_minilm_every_method_and_pattern(tmp_path, minilm_dir, minilm_ref, method, pattern, sparsity):
    """Done-means: every method x pattern converts, loads and runs on the real MiniLM (tiny calibration
    here; benchmarks/prune_quality.py measures the quality of each cell for docs/prune_quality.md)."""
    from transformers import AutoTokenizer

    before, ids, ref = minilm_ref
    out = tmp_path / "out"
    cv.convert(minilm_dir, out, method, pattern, sparsity, nsamples=2, seqlen=32, progress=False)
    assert tree_hash(minilm_dir) == before
    model = sparserun.load(out)
    n_sparse = sum(isinstance(m, sparserun.SparseLinear) for m in model.modules())
    assert n_sparse == 36  # 6 layers x (q, k, v, attention output, intermediate, output)
    tok = AutoTokenizer.from_pretrained(out)  # tokenizer files travel with the checkpoint
    assert tok("A short sentence about lighthouses and the sea.", return_tensors="pt")["input_ids"].equal(ids)
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(a, ref, dim=-1).mean().item()
    assert a.shape == ref.shape and 0.1 < cos < 0.9999


def test_cli_convert_prints_table_and_inspect_reads_it(tmp_path, llama_src):
    out = tmp_path / "out"
    rc, text = run_cli("convert", llama_src, out, "--method", "wanda", "--pattern", "4:8", "--nsamples", "2",
                       "--seqlen", "32", "--skip", r"mlp\.down_proj$", "--include-lm-head")
    assert rc == 0, text
    assert re.search(r"model\.layers\.0\.self_attn\.q_proj\s+4:8\s+bitmask\s+50\.0%", text)
    assert re.search(r"\nlm_head\s+4:8\s+bitmask\s+50\.0%", text)
    assert "matches skip regex" in text and "13 pruned, 0 kept dense, 2 skipped" in text
    rc, text = run_cli("inspect", out)
    assert rc == 0 and "sparse linear layers: 13" in text
    model = sparserun.load(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.lm_head, sparserun.SparseLinear)


@pytest.mark.parametrize("args,msg", [
    (["--method", "random", "--pattern", "2:4"], "unknown pruning method 'random'"),
    (["--method", "wanda", "--pattern", "3:3"], "unknown sparsity pattern '3:3'"),
    (["--method", "wanda", "--pattern", "unstructured", "--sparsity", "1.5"], r"sparsity must be in \(0, 1\)"),
    (["--method", "wanda", "--pattern", "unstructured", "--sparsity", "0"], r"sparsity must be in \(0, 1\)"),
    (["--method", "wanda", "--pattern", "2:4", "--sparsity", "0.7"], "sparsity is 0.5; got sparsity=0.7"),
    (["--method", "wanda", "--pattern", "64x64"], "needs a target sparsity"),
    (["--method", "wanda", "--pattern", "2:4", "--calib", "/nonexistent/calib.txt"],
     "calibration file not found: /nonexistent/calib.txt"),
    (["--method", "wanda", "--pattern", "2:4", "--skip", "(("], "--skip '\\(\\(' is not a valid regular"),
    (["--method", "wanda", "--pattern", "2:4", "--skip", "mlp.dwn"], "--skip 'mlp.dwn' matches none of the"),
    (["--method", "wanda", "--pattern", "2:4", "--balance-rows"], "applies to block patterns such as 32x32"),
    (["--method", "wanda", "--pattern", "32x32", "--sparsity", "0.5", "--per-row", "yes"],
     "applies to unstructured sparsity, not 32x32"),
    (["--method", "wanda", "--pattern", "2:4", "--device", "cuda:0"], None),
    (["--method", "wanda", "--pattern", "2:4", "--device", "gpu"], "unknown device 'gpu'; use cpu, cuda or cuda:N"),
    (["--method", "magnitude", "--pattern", "2:4", "--max-shard-size", "0"],
     "--max-shard-size must be at least 1 \\(MiB\\), got 0"),
])
def test_cli_bad_input(tmp_path, llama_src, args, msg):
    if msg is None:  # --device cuda: an error on a CPU-only machine; runs on a GPU one
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        msg = "CUDA is not available"
    out = tmp_path / "out"
    rc, text = run_cli("convert", llama_src, out, "--nsamples", "2", "--seqlen", "32", *args)
    assert rc != 0
    lines = text.strip().splitlines()
    assert lines[-1].startswith("error: ") and re.search(msg, lines[-1]), text
    assert not out.exists()


def test_empty_calibration_file(tmp_path, llama_src):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    rc, text = run_cli("convert", llama_src, tmp_path / "out", "--method", "sparsegpt", "--pattern", "2:4",
                       "--calib", empty)
    assert rc == 1 and f"calibration file {empty} is empty" in text
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if convert reads any weight from SRC (errors that can be known must come first)."""
    monkeypatch.setattr(cv.SourceTensors, "read", lambda *a, **k: pytest.fail("read weights before the check"))


@pytest.mark.parametrize("text,msg", [(None, "calibration file not found"), ("\n \n", "is empty"),
                                      ("only a few words", "has only .* tokens; a window of seqlen 32")])
def test_calibration_errors_before_weights_are_read(tmp_path, llama_src, no_weight_reads, text, msg):
    calib = tmp_path / "calib.txt"
    if text is not None:
        calib.write_text(text)
    rc, text = run_cli("convert", llama_src, tmp_path / "out", "--method", "wanda", "--pattern", "2:4",
                       "--calib", calib, "--nsamples", "2", "--seqlen", "32")
    assert rc == 1 and re.search(msg, text.strip().splitlines()[-1]), text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,tied,msg", [
    ("wanda", True, "lm_head shares its weight with the input embeddings"),
    ("taylor", False, "pruning the lm_head with taylor is not supported"),
])
def test_lm_head_that_cannot_be_pruned_fails_before_weights_are_read(tmp_path, no_weight_reads, method, tied,
                                                                     msg):
    src = save_llama_dir(tmp_path / "src", layers=2, tie_word_embeddings=tied)
    rc, text = run_cli("convert", src, tmp_path / "out", "--method", method, "--pattern", "2:4",
                       "--nsamples", "2", "--seqlen", "32", "--include-lm-head")
    assert rc == 1 and msg in text.strip().splitlines()[-1], text
    assert not (tmp_path / "out").exists()


def test_out_inside_src_and_existing_out(tmp_path, llama_src):
    src = tmp_path / "src"
    shutil.copytree(llama_src, src)
    before = tree_hash(src)
    rc, text = run_cli("convert", src, src / "packed", "--method", "magnitude", "--pattern", "2:4")
    assert rc == 1 and "is inside the source directory" in text
    assert tree_hash(src) == before and not (src / "packed").exists()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, text = run_cli("convert", src, out, "--method", "magnitude", "--pattern", "2:4")
    assert rc == 1 and "exists and is not empty (use --overwrite" in text
    assert (out / "keep.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces a directory, never a file
        rc, text = run_cli("convert", src, afile, "--method", "magnitude", "--pattern", "2:4", *extra)
        assert rc == 1 and "exists and is a file, not a directory" in text and afile.read_text() == ""


def test_not_enough_memory_fails_before_work(tmp_path, llama_src, monkeypatch):
    monkeypatch.setattr(cv, "free_memory", lambda device: 1024 * 1024)
    monkeypatch.setattr(cv.SourceTensors, "read", lambda *a, **k: pytest.fail("read weights before the check"))
    rc, text = run_cli("convert", llama_src, tmp_path / "out", "--method", "sparsegpt", "--pattern", "2:4")
    assert rc == 1 and "not enough memory on cpu: converting needs about" in text
    assert "one decoder layer" in text and "1.0 MiB free" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,pattern,sparsity", [("magnitude", "2:4", None), ("wanda", "32x32", 0.6),
                                                     ("magnitude", "unstructured", 0.5), ("taylor", "4:8", None)])
def test_disk_estimate_matches_what_is_written(tmp_path, llama_src, method, pattern, sparsity):
    rep = cv.convert(llama_src, tmp_path / "out", method, pattern, sparsity, nsamples=2, seqlen=32, progress=False)
    est = rep.info["disk_estimate"]
    written = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert written <= est["checkpoint"] <= 1.05 * written
    assert (est["gradient_spill"] > 0) == (method == "taylor")


def test_not_enough_disk_fails_before_work(tmp_path, llama_src, monkeypatch, no_weight_reads):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    seen = []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: seen.append(p) or usage(10**12, 10**12, 100 * 1024))
    rc, text = run_cli("convert", llama_src, tmp_path / "new" / "out", "--method", "taylor", "--pattern", "2:4",
                       "--nsamples", 2, "--seqlen", 32)
    last = text.strip().splitlines()[-1]
    assert rc == 1 and re.fullmatch(rf"error: not enough disk space for {tmp_path}/new/out: converting needs about "
                                    rf"\S+ \S+ \(checkpoint \S+ \S+ \+ gradient spill \S+ \S+\), 100\.0 KiB free on "
                                    rf"the filesystem of {tmp_path}", last), text
    assert seen == [tmp_path] and not (tmp_path / "new").exists()


def test_unknown_family(tmp_path, llama_src, monkeypatch):
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    monkeypatch.setattr(cv, "build_skeleton", lambda config: Weird())
    rc, text = run_cli("convert", llama_src, tmp_path / "out", "--method", "wanda", "--pattern", "2:4")
    assert rc == 1 and "cannot find the repeated decoder/encoder layers of Weird" in text


def test_interrupt_leaves_nothing(tmp_path, llama_src, monkeypatch):
    from sparserun.checkpoint import CheckpointWriter

    calls = []
    orig = CheckpointWriter.add_layer

    def add_layer(self, *a, **k):
        calls.append(1)
        if len(calls) == 9:  # in the middle of layer 1
            # the gradient spill lives inside the writer's temp directory, never loose next to OUT
            (tmp,) = list(work.iterdir())
            assert tmp.name.startswith(".out.tmp-") and list(tmp.glob("sparserun-grad-*")), list(tmp.iterdir())
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(CheckpointWriter, "add_layer", add_layer)
    work = tmp_path / "work"
    work.mkdir()
    rc, text = run_cli("convert", llama_src, work / "out", "--method", "obd", "--pattern", "2:4",
                       "--nsamples", "2", "--seqlen", "32", "--max-shard-size", "1")
    assert rc == 130 and "interrupted" in text
    assert list(work.iterdir()) == []  # no OUT, no temp dir, no spilled gradients


def test_pre_tokenised_calibration_without_tokenizer(tmp_path, llama_src):
    src = tmp_path / "src"
    shutil.copytree(llama_src, src)
    for p in src.glob("tokenizer*"):
        p.unlink()
    with pytest.raises(cv.ConvertError, match=r"src has no tokenizer files \(tokenizer.json, .*pre-tokenised"):
        cv.convert(src, tmp_path / "out", "wanda", "2:4", progress=False)
    (src / "tokenizer.json").write_text("{not json")
    with pytest.raises(cv.ConvertError, match="has no usable tokenizer"):
        cv.convert(src, tmp_path / "out", "wanda", "2:4", progress=False)
    (src / "tokenizer.json").unlink()
    ids = torch.randint(3, 300, (3, 24))
    rep = cv.convert(src, tmp_path / "out", "wanda", "2:4", calib=ids, progress=False)
    assert rep.calib["source"].startswith("pre-tokenised") and (tmp_path / "out" / "report.json").is_file()


@pytest.mark.parametrize("method,pattern,sparsity", [("sparsegpt", "2:4", None), ("wanda", "32x32", 0.5)])
def test_16bit_source_on_cpu_is_processed_in_fp32_and_stored_16bit(tmp_path, method, pattern, sparsity):
    """CPU 16-bit matmuls are several times slower than fp32 ones, so a bf16 model is pruned in fp32 on the CPU;
    the checkpoint is still bf16, holds the fp32 pruning's weights rounded once, and reports bf16 bytes."""
    from transformers import LlamaForCausalLM

    from .prune._models import make_llama, make_tokenizer

    tok = make_tokenizer()
    src = tmp_path / "src"
    make_llama(tok, layers=2).to(torch.bfloat16).save_pretrained(src)
    tok.save_pretrained(src)
    assert cv.SourceTensors(src).floating_dtype() == torch.bfloat16
    rep = cv.convert(src, tmp_path / "out", method, pattern, sparsity, nsamples=4, seqlen=48, progress=False)
    assert rep.info["compute_dtype"] == "float32" and rep.info["dtype"] == "bfloat16"
    model = sparserun.load(tmp_path / "out")
    ref = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref_rep = sparserun.prune(ref, method, pattern, sparsity, tokenizer=tok, nsamples=4, seqlen=48,
                              progress=False)
    assert [r["rel_error"] for r in rep.rows] == [r["rel_error"] for r in ref_rep.rows]
    for r in rep.rows:
        layer = model.get_submodule(r["name"])
        assert layer.values.dtype == torch.bfloat16 and r["dtype"] == "bfloat16"
        assert torch.equal(layer.dense_weight(), ref.get_submodule(r["name"]).weight.detach().bfloat16())
        assert r["bytes_before"] == 2 * math.prod(r["shape"]) and r["bytes_after"] == layer.packed().nbytes()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def _peak_rss_kib(src: Path, out: Path) -> int:
    """Peak resident memory of a fresh process converting src (convert() itself: no CLI imports)."""
    code = ("import sys, resource; from sparserun.convert import convert; "
            "convert(sys.argv[1], sys.argv[2], 'wanda', '2:4', nsamples=4, seqlen=64, "
            "max_shard_bytes=8 << 20, progress=False); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    cmd = [sys.executable, "-c", code, str(src), str(out)]
    if os.path.exists("/usr/bin/time"):  # GNU time -v: the kernel's peak RSS of the child
        cmd = ["/usr/bin/time", "-v"] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    return int(m.group(1)) if m else int(re.search(r"MAXRSS (\d+)", r.stdout).group(1))


def test_memory_does_not_grow_with_depth(tmp_path):
    # 51 MB (fp32) per decoder layer: keeping the 4 extra layers (or only their packed form) in memory would
    # add 120-200 MB to a ~0.75 GB peak (+16-27%); streaming stays within noise (measured -2% .. +2%).
    # 8 MiB shards keep the writer's buffer (which is part of the peak) small next to a layer. Run to run the
    # peak varies by ~3% (it did by ~12% before convert returned freed memory after each Linear).
    peaks = {}
    for n in (4, 8):
        src = write_random_llama_dir(tmp_path / f"src{n}", layers=n, hidden=1024, intermediate=2816)
        peaks[n] = _peak_rss_kib(src, tmp_path / f"out{n}")
        shutil.rmtree(src)
    print(f"peak RSS: 4 layers {peaks[4] / 1024:.0f} MiB, 8 layers {peaks[8] / 1024:.0f} MiB")
    assert peaks[8] < 1.10 * peaks[4], peaks


def test_a_config_that_does_not_match_the_stored_shapes_stops_before_any_weight_is_read(tmp_path, llama_src,
                                                                                        monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(llama_src, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] + 32
    (src / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(cv.SourceTensors, "read", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(cv.ConvertError, match=r"mlp\.gate_proj\.weight holds \(128, 64\), but .* needs \(160, 64\)"):
        cv.convert(src, tmp_path / "out", "magnitude", "2:4", nsamples=2, seqlen=16, progress=False)
    assert not (tmp_path / "out").exists()


# ---- source weight files ------------------------------------------------------------------------------

def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if not p.name.startswith("model") or p.suffix != ".safetensors":
            shutil.copy(p, dst / p.name)
    return dst


def _state_dict(src: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(src / "model.safetensors"))


def _packed_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(f)))
    return got


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_source_converts_as_its_safetensors_twin(tmp_path, llama_src, sharded):
    """Checkpoints saved before safetensors (pytorch_model.bin, or its shards and index) are read memory-mapped
    and give the same packed checkpoint."""
    sd = _state_dict(llama_src)
    bin_src = _copy_without_weights(llama_src, tmp_path / "bin")
    if sharded:
        names = sorted(sd)
        halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for f, ks in halves.items():
            torch.save({k: sd[k] for k in ks}, bin_src / f)
        (bin_src / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    else:
        torch.save(sd, bin_src / "pytorch_model.bin")
    before = tree_hash(bin_src)
    kw = dict(nsamples=2, seqlen=32, progress=False)
    cv.convert(llama_src, tmp_path / "a", "wanda", "2:4", None, **kw)
    cv.convert(bin_src, tmp_path / "b", "wanda", "2:4", None, **kw)
    assert tree_hash(bin_src) == before
    a, b = _packed_tensors(tmp_path / "a"), _packed_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _weights_case(d: Path, case: str) -> None:
    if case == "none":
        return
    if case == "bad index":
        (d / "model.safetensors.index.json").write_text('{"weights": {}}')
    elif case == "index list":
        (d / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    elif case == "index number":
        (d / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": 5}}')
    elif case == "missing shard":
        (d / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": "gone.safetensors"}}')
    elif case == "damaged safetensors":
        (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif case == "legacy bin":
        torch.save({"w": torch.ones(3)}, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    elif case == "pickled objects":
        torch.save({"w": torch.ones(3), "opt": Path("x")}, d / "pytorch_model.bin")
    elif case == "not a dict":
        torch.save([torch.ones(3)], d / "pytorch_model.bin")


@pytest.mark.parametrize("case,msg", [
    ("none", r"has no weights: none of model\.safetensors, pytorch_model\.bin or their \*\.index\.json"),
    ("bad index", r"model\.safetensors\.index\.json: not a valid index of weight shards"),
    ("index list", r"model\.safetensors\.index\.json: \"weight_map\" must map tensor names to shard file names"),
    ("index number", r"\"weight_map\" must map tensor names to shard file names"),
    ("missing shard", r"shard .*gone\.safetensors listed in the index is missing"),
    ("damaged safetensors", r"cannot read safetensors file .*model\.safetensors"),
    ("legacy bin", r"cannot read .*pytorch_model\.bin as a memory-mapped PyTorch state dict .*save_pretrained"),
    ("pickled objects", r"pytorch_model\.bin as a memory-mapped PyTorch state dict \(it pickles objects other than"),
    ("not a dict", r"pytorch_model\.bin holds a list, not a state dict"),
])
def test_unreadable_source_weights_are_one_line_errors(tmp_path, llama_src, case, msg):
    src = _copy_without_weights(llama_src, tmp_path / "src")
    _weights_case(src, case)
    before = tree_hash(src)
    rc, out, err = run_cli("convert", src, tmp_path / "out", "--method", "magnitude", "--pattern", "2:4",
                           "--quiet", split=True)
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and re.search(msg, err), err
    assert not (tmp_path / "out").exists() and tree_hash(src) == before


def test_unknown_token_warning_reaches_the_report_and_stderr_under_quiet(tmp_path, minilm_dir):
    emoji = tmp_path / "emoji.txt"
    emoji.write_text("\U0001F600\U0001F680 \U0001F44D " * 400)
    rc, out, err = run_cli("convert", minilm_dir, tmp_path / "out", "--method", "magnitude", "--pattern", "2:4",
                           "--calib", emoji, "--nsamples", 1, "--seqlen", 16, "--quiet", split=True)
    assert rc == 0 and out == ""
    want = f"warning: 100% of the 800 tokens of the calibration text {emoji} are the unknown token '[UNK]'"
    assert err.startswith(want) and err.count("\n") == 1, err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["warnings"][0].startswith(want)


def test_hub_cache_snapshot_converts_and_its_blobs_are_never_an_output(tmp_path, llama_src):
    """A Hugging Face cache snapshot is symlinks into ../../blobs/: it converts (files copied as content), and
    an OUT holding the linked data is refused even with --overwrite, which would have deleted the model."""
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(llama_src.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(os.path.relpath(blobs / f"blob{i}", snap))
    before = tree_hash(blobs)
    rc, out, err = run_cli("convert", snap, tmp_path / "out", "--method", "magnitude", "--pattern", "2:4", "--quiet",
                           split=True)
    assert rc == 0, err
    assert not (tmp_path / "out" / "config.json").is_symlink()
    assert (tmp_path / "out" / "config.json").read_bytes() == (llama_src / "config.json").read_bytes()
    for dest, msg in ((blobs, "holds the source's data: .* links into it"), (repo, "contains the source")):
        rc, out, err = run_cli("convert", snap, dest, "--method", "magnitude", "--pattern", "2:4", "--quiet",
                               "--overwrite", split=True)
        assert rc == 1 and re.search(msg, err), err
        assert tree_hash(blobs) == before
    model = sparserun.load(tmp_path / "out")
    with pytest.raises(ck.CheckpointError, match="holds the source's data"):
        sparserun.save(model, blobs, source_dir=snap, overwrite=True)
    assert tree_hash(blobs) == before


def test_a_model_that_needs_its_own_code_is_refused_without_running_it(tmp_path, llama_src):
    src = tmp_path / "fancy"
    shutil.copytree(llama_src, src)
    marker = tmp_path / "ran"
    (src / "configuration_fancy.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="fancy", architectures=["FancyForCausalLM"],
               auto_map={"AutoConfig": "configuration_fancy.FancyConfig"})
    (src / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "sparserun.cli", "convert", str(src), str(tmp_path / "out"),
                           "--method", "magnitude", "--pattern", "2:4"], input="y\n", capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "model_type 'fancy' is defined by the model's own code (auto_map), which sparserun does not run" \
        in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
    with pytest.raises(ck.CheckpointError, match="defined by the model's own code"):
        ck.read_hf_config(src)


def test_default_dtype_is_the_configs_not_the_first_tensors(tmp_path, llama_src):
    """A bf16 model whose norms and head are stored in fp32 is written in bf16 (config.json's dtype; without
    one, the dtype of most stored bytes), not in the fp32 of the alphabetically first tensor."""
    from safetensors.torch import load_file, save_file

    sd = _state_dict(llama_src)
    mixed = {k: v if ("norm" in k or k == "lm_head.weight") else v.to(torch.bfloat16) for k, v in sd.items()}
    for with_cfg in (True, False):
        src = _copy_without_weights(llama_src, tmp_path / f"src{with_cfg}")
        save_file(mixed, str(src / "model.safetensors"))
        cfg = json.loads((src / "config.json").read_text())
        cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
        if with_cfg:
            cfg["dtype"] = "bfloat16"
        (src / "config.json").write_text(json.dumps(cfg))
        cv.convert(src, tmp_path / f"out{with_cfg}", "magnitude", "2:4", progress=False)
        got = {}
        for f in (tmp_path / f"out{with_cfg}").glob("*.safetensors"):
            got.update(load_file(str(f)))
        assert got["model.layers.0.self_attn.q_proj.values"].dtype == torch.bfloat16
        assert got["lm_head.weight"].dtype == torch.bfloat16


def test_a_config_wider_than_the_weights_does_not_double_the_checkpoint(tmp_path, llama_src):
    """fp16 weights under a config that says float32 came out in fp32: 1.9x the source while every printed
    ratio said smaller. The default never widens; an explicit wider --dtype is done, and said to be larger."""
    from safetensors.torch import save_file

    src = _copy_without_weights(llama_src, tmp_path / "src")
    save_file({k: v.half() for k, v in _state_dict(llama_src).items()}, str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "float32"
    (src / "config.json").write_text(json.dumps(cfg))
    source = (src / "model.safetensors").stat().st_size
    rep = cv.convert(src, tmp_path / "out", "magnitude", "2:4", progress=False)
    assert rep.info["dtype"] == "float16" and rep.info["checkpoint_bytes"] < rep.info["source_bytes"]
    shards = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert shards < source
    line = [ln for ln in rep.table().splitlines() if ln.startswith("checkpoint:")]
    assert line and f"({rep.info['checkpoint_bytes'] / rep.info['source_bytes']:.3f}x)" in line[0]
    assert not [w for w in rep.warnings() if "not smaller than the source" in w]
    wide = cv.convert(src, tmp_path / "wide", "magnitude", "2:4", dtype="float32", progress=False)
    assert wide.info["checkpoint_bytes"] > wide.info["source_bytes"]
    (w,) = [w for w in wide.warnings() if "not smaller than the source" in w]
    assert "stored in float32, the source in float16" in w


def test_a_dense_tensor_beyond_the_stored_dtype_is_refused(tmp_path, llama_src):
    """An embedding value of 1e6 written as float16 became inf with nothing said (a Linear's weight was checked,
    the tensors kept dense were not). Now it is named, and nothing is written."""
    from safetensors.torch import save_file

    src = _copy_without_weights(llama_src, tmp_path / "src")
    sd = _state_dict(llama_src)
    sd["model.embed_tokens.weight"][5, :4] = 1e6
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(cv.ConvertError, match=r"model\.embed_tokens\.weight: holds 1e\+06, beyond what float16 "
                                              r"holds \(6\.55e\+04\); store the model in bfloat16 or float32"):
        cv.convert(src, tmp_path / "out", "magnitude", "2:4", dtype="float16", progress=False)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_a_shard_that_cannot_be_opened_says_so(tmp_path, llama_src, monkeypatch):
    """safetensors reported a shard the user may not read as "No such file or directory"."""
    import builtins

    real_open = open

    def denied(path, *a, **k):
        if str(path).endswith("model.safetensors") and str(llama_src) in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", denied)  # as mode 000 would (root reads anything)
    with pytest.raises(cv.ConvertError, match=r"cannot read .*model\.safetensors: Permission denied"):
        cv.SourceTensors(llama_src)


def test_output_links_and_long_names(tmp_path, llama_src):
    """OUT given as a link to a directory is written there (the link still points at it); a dangling link is
    refused before any work; a name near the 255-byte limit does not overflow in the temp name."""
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    args = ("--method", "magnitude", "--pattern", "2:4", "--quiet")
    rc, out, err = run_cli("convert", llama_src, link, *args, split=True)
    assert rc == 0, err
    assert link.is_symlink() and (target / "sparserun.json").is_file()
    rc, out, err = run_cli("convert", llama_src, link, *args, "--overwrite", split=True)
    assert rc == 0, err
    assert link.is_symlink() and (target / "sparserun.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # nothing left beside it
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    rc, out, err = run_cli("convert", llama_src, dangling, *args, split=True)
    assert rc == 1 and "is a symbolic link to" in err and "which does not exist" in err, err
    long = tmp_path / ("x" * 250)
    rc, out, err = run_cli("convert", llama_src, long, *args, split=True)
    assert rc == 0 and (long / "sparserun.json").is_file(), err


def test_an_unwritable_output_place_is_named_as_the_output(tmp_path, llama_src, monkeypatch):
    import errno
    import tempfile

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".out.tmp-abc"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    rc, out, err = run_cli("convert", llama_src, tmp_path / "out", "--method", "magnitude", "--pattern", "2:4",
                           "--quiet", split=True)
    assert rc == 1 and f"cannot write the output {tmp_path / 'out'}: Read-only file system (in {tmp_path})" in err
    assert ".tmp-" not in err and err.count("\n") == 1


def test_tied_in_config_but_stored_apart_with_other_values_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    src = save_llama_dir(tmp_path / "src", layers=2, tie_word_embeddings=True)
    sd = load_file(str(src / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1.0
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(cv.ConvertError, match=r"ties lm_head\.weight to model\.embed_tokens\.weight .* stores them "
                                              r"with different values"):
        cv.convert(src, tmp_path / "out", "magnitude", "2:4", progress=False)
    assert not (tmp_path / "out").exists()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # stored twice, equal: tied as before
    save_file(sd, str(src / "model.safetensors"))
    cv.convert(src, tmp_path / "out", "magnitude", "2:4", progress=False)
    assert json.loads((tmp_path / "out" / "sparserun.json").read_text())["aliases"] == {
        "lm_head.weight": "model.embed_tokens.weight"}


def test_a_dangling_tokenizer_link_fails_before_the_work(tmp_path, llama_src, no_weight_reads):
    src = tmp_path / "src"
    shutil.copytree(llama_src, src)
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to("../../blobs/gone")
    with pytest.raises(ck.CheckpointError, match=r"tokenizer\.json is a link to \.\./\.\./blobs/gone, which does "
                                                 r"not exist"):
        cv.convert(src, tmp_path / "out", "magnitude", "2:4", progress=False)
    assert not (tmp_path / "out").exists()


def test_stored_tensors_the_model_has_no_place_for_are_reported(tmp_path, llama_src):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(llama_src, src)
    sd = _state_dict(llama_src)
    sd["model.layers.0.mlp.extra_adapter.weight"] = torch.ones(4, 4)
    save_file(sd, str(src / "model.safetensors"))
    rep = cv.convert(src, tmp_path / "out", "magnitude", "2:4", progress=False)
    assert rep.info["unused_tensors"] == 1
    assert any("1 stored tensor(s) the LlamaForCausalLM has no place for were left out (e.g. "
               "model.layers.0.mlp.extra_adapter.weight)" in w for w in rep.warnings())
    assert cv.convert(llama_src, tmp_path / "plain", "magnitude", "2:4", progress=False).info["unused_tensors"] == 0


def test_dtypes_the_library_cannot_store_are_refused_up_front():
    """convert(dtype=torch.float64 / int8) failed only after reading the weights (int8 deep inside sdpa)."""
    from sparserun.convert import ConvertError, resolve_dtype

    assert resolve_dtype("bfloat16") == resolve_dtype(torch.bfloat16) == torch.bfloat16 and resolve_dtype(None) is None
    for bad in (torch.float64, torch.int8, torch.float8_e4m3fn, "bf16"):
        with pytest.raises(ConvertError, match="dtype"):
            resolve_dtype(bad, ConvertError)
