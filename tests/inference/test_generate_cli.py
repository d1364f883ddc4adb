"""`sparserun generate`: streams the completion, reports time to first token and decode tokens/s, and fails
with one line (no traceback) when it cannot run."""
import warnings

import pytest
import torch

import sparserun
from sparserun.cli import main

from ._tiny import make_tokenizer, packed_pair


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return packed_pair(tmp_path_factory.mktemp("gen"), "2:4")


def _one_line_error(capsys, rc, match):
    out, err = capsys.readouterr()
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err


def test_streams_the_greedy_completion_and_reports_speed(packed, capsys):
    dense, path = packed
    tok = make_tokenizer()
    prompt = "The ferry leaves the"
    rc = main(["generate", str(path), "--prompt", prompt, "--max-new-tokens", "12", "--ignore-eos"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = dense.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    # what was streamed, piece by piece, is the masked dense model's greedy completion
    assert out == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    assert "12 new tokens" in err and "time to first token" in err and "tokens/s" in err
    assert "not GPU speed" in err  # a CPU number is labelled as such


def test_python_api_timings(packed):
    import io

    from sparserun.generate import generate

    _, path = packed
    buf = io.StringIO()
    res = generate(path, "Memory bandwidth", max_new_tokens=6, ignore_eos=True, out=buf)
    assert res["new_tokens"] == 6 and buf.getvalue() == res["text"] + "\n"
    assert res["ttft_s"] > 0 and res["decode_tokens_per_s"] > 0 and res["total_s"] >= res["ttft_s"]
    assert res["device"] == "cpu" and res["dtype"] == "float32"


def test_sampling_is_reproducible_with_a_seed(packed, capsys):
    _, path = packed
    args = ["generate", str(path), "--prompt", "Sparse", "--max-new-tokens", "8", "--sample", "--seed", "7",
            "--temperature", "1.5", "--ignore-eos"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_errors_are_one_line(packed, tmp_path, capsys):
    _, path = packed
    cases = [
        (["generate", str(tmp_path / "missing"), "--prompt", "x"], "no such checkpoint directory"),
        (["generate", str(path), "--prompt", ""], "--prompt is empty"),
        (["generate", str(path), "--prompt", " \t\n"], "--prompt is empty (only whitespace)"),
        (["generate", str(path), "--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text at character 3"),
        (["generate", str(path), "--prompt", "x", "--max-new-tokens", "0"], "at least 1"),
        (["generate", str(path), "--prompt", "x", "--dtype", "int8"], "--dtype 'int8'"),
        (["generate", str(path), "--prompt", "x", "--device", "cuda:0"] if not torch.cuda.is_available()
         else ["generate", str(path), "--prompt", "x", "--device", "nonsense"], "--device"),
        (["generate", str(path), "--prompt", "x", "--chat"], "no chat template"),
        (["generate", str(path), "--prompt", "x", "--tokenizer", "no-such-tok"],
         "--tokenizer no-such-tok: no such directory"),
        (["generate", str(path), "--prompt", "x", "--sample", "--temperature", "0"], "--temperature must be > 0"),
        (["generate", str(path), "--prompt", "x", "--sample", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["generate", str(path), "--prompt", "x", "--sample", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["generate", str(path), "--prompt", "x", "--sample", "--top-k", "-1"], "--top-k must be >= 0 (0: no top-k"),
        (["generate", str(path), "--prompt", "x", "--temperature", "0.5", "--top-k", "5"],
         "--temperature, --top-k only apply to sampling: add --sample"),
        (["generate", str(path), "--prompt", "x", "--top-k", "50"], "--top-k only applies to sampling"),  # the default
    ]
    if not torch.cuda.is_available():
        cases.append((["generate", str(path), "--prompt", "x", "--compile"], "--compile needs a CUDA device"))
    for argv, match in cases:
        _one_line_error(capsys, main(argv), match)


def test_prompt_and_new_tokens_must_fit_the_position_limit(packed, tmp_path, capsys):
    """Was: GPT-2 (learned positions) stopped mid-generation with `IndexError: index out of range in self`; a
    rotary model (the Llama, max_position_embeddings 128) ran on positions it was never trained on."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, path = packed
    tok = make_tokenizer()
    n = tok("The ferry", return_tensors="pt")["input_ids"].shape[1]
    _one_line_error(capsys, main(["generate", str(path), "--prompt", "The ferry", "--max-new-tokens", "200"]),
                    f"prompt ({n} tokens) + --max-new-tokens 200 = {n + 200} exceeds the model's position limit "
                    f"128 (max_position_embeddings)")
    long = "The ferry leaves the harbour at six. " * 30
    n = tok(long, return_tensors="pt")["input_ids"].shape[1]
    assert n > 128
    _one_line_error(capsys, main(["generate", str(path), "--prompt", long]),
                    f"prompt ({n} tokens) exceeds the model's position limit 128 (max_position_embeddings)")

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=1, n_head=4, n_positions=32)).eval()
    sparserun.sparsify_(gpt2, "2:4")
    tok.save_pretrained(tmp_path / "src")
    sparserun.save(gpt2, tmp_path / "p", source_dir=tmp_path / "src")
    prompt = "The ferry leaves"
    n = tok(prompt, return_tensors="pt")["input_ids"].shape[1]
    base = ["generate", str(tmp_path / "p"), "--prompt", prompt, "--ignore-eos", "--max-new-tokens"]
    _one_line_error(capsys, main(base + [str(33 - n)]),
                    f"prompt ({n} tokens) + --max-new-tokens {33 - n} = 33 exceeds the model's position limit 32 "
                    f"(n_positions); shorten the prompt or lower --max-new-tokens")
    rc = main(base + [str(32 - n)])  # exactly at the limit: runs
    out, err = capsys.readouterr()
    assert rc == 0 and f"{32 - n} new tokens" in err, err


def test_missing_tokenizer_is_one_line(tmp_path, capsys):
    _, path = packed_pair(tmp_path, "2:4", with_tokenizer=False)
    _one_line_error(capsys, main(["generate", str(path), "--prompt", "x"]), "has no tokenizer files")
    # --tokenizer points elsewhere and then it works
    make_tokenizer().save_pretrained(tmp_path / "tok")
    rc = main(["generate", str(path), "--prompt", "The", "--max-new-tokens", "2", "--tokenizer",
               str(tmp_path / "tok")])
    assert rc == 0


def test_a_tokenizer_that_ships_code_is_refused_not_run(packed, tmp_path, capsys, monkeypatch):
    """A packed checkpoint is often someone else's: a tokenizer_config.json whose auto_map names a module in
    the directory must not import it (transformers asked on stdin, and ran it on a "y"), in generate or eval."""
    import io
    import json
    import shutil

    _, path = packed
    d = tmp_path / "shipped"
    shutil.copytree(path, d)
    marker = tmp_path / "ran"
    (d / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                   "from transformers import PreTrainedTokenizerFast as EvilTok\n")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(auto_map={"AutoTokenizer": ["evil_tok.EvilTok", None]}, tokenizer_class="EvilTok")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\n"))
    _one_line_error(capsys, main(["generate", str(d), "--prompt", "x"]), "cannot load a tokenizer")
    text = tmp_path / "t.txt"
    text.write_text("The ferry leaves the harbour at noon and the gulls follow it out. " * 20)
    assert main(["eval", str(d), "--text", str(text), "--seqlen", "16"]) == 1
    assert "no tokenizer found" in capsys.readouterr().err
    assert not marker.exists()


def test_not_a_causal_lm_is_one_line(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(make_tokenizer()), hidden_size=64, num_hidden_layers=1,
                                num_attention_heads=4, intermediate_size=128)).eval()
    sparserun.sparsify_(bert, "2:4")
    make_tokenizer().save_pretrained(tmp_path / "src")
    sparserun.save(bert, tmp_path / "p", source_dir=tmp_path / "src")
    _one_line_error(capsys, main(["generate", str(tmp_path / "p"), "--prompt", "x"]), "cannot generate text")


def test_encoder_decoder_counts_only_generated_tokens(tmp_path, capsys):
    """T5 returns the decoder's sequence (decoder-start token + completion), not prompt + completion."""
    from transformers import T5Config, T5ForConditionalGeneration

    tok = make_tokenizer()
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=1, num_heads=4,
                                             vocab_size=len(tok), pad_token_id=0, eos_token_id=2,
                                             decoder_start_token_id=0)).eval()
    sparserun.sparsify_(t5, "2:4")
    tok.save_pretrained(tmp_path / "src")
    sparserun.save(t5, tmp_path / "p", source_dir=tmp_path / "src")
    prompt = "The ferry leaves the harbour at dawn"  # longer than the completion: a prompt-length slice is empty
    rc = main(["generate", str(tmp_path / "p"), "--prompt", prompt, "--max-new-tokens", "5", "--ignore-eos"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # T5 reads wo.weight
        ref = t5.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert "5 new tokens" in err and out == tok.decode(ref[0, 1:], skip_special_tokens=True) + "\n"


@pytest.mark.gpu
def test_generate_on_gpu_compiled(packed, capsys):
    """--compile: static cache + CUDA graphs; bf16; the completion streams and tokens/s is printed."""
    _, path = packed
    rc = main(["generate", str(path), "--prompt", "The ferry", "--max-new-tokens", "16", "--ignore-eos",
               "--device", "cuda", "--compile"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "16 new tokens" in err and "cuda" in err and "bfloat16" in err and out.strip()


def test_cpu_summary_names_what_is_decompressed_per_call(monkeypatch):
    """Unstructured layers cache their dense weight on the CPU path; only the forced reference backend
    decompresses every layer per call. The summary must not claim otherwise."""
    from sparserun.generate import _backend_note

    cpu = torch.device("cpu")
    monkeypatch.delenv("SPARSERUN_BACKEND", raising=False)
    assert "unstructured ones once and cached" in _backend_note(cpu)
    monkeypatch.setenv("SPARSERUN_BACKEND", "reference")
    assert "each sparse layer is decompressed per call" in _backend_note(cpu)
    assert "not GPU speed" in _backend_note(cpu)


def test_a_utf8_prompt_in_an_ascii_locale(packed):
    """LC_ALL=C: Python decodes argv as ASCII with surrogate escapes, so 'café' arrived as 'caf\\udcc3\\udca9'
    and was refused as not UTF-8. Its bytes are UTF-8: it is recovered, and the run prints in ASCII."""
    import os
    import subprocess
    import sys

    _, path = packed
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONIOENCODING="ascii",
               PYTHONCOERCECLOCALE="0")
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "generate", str(path), "--prompt", "café au lait",
                        "--max-new-tokens", "3", "--ignore-eos"], env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode("ascii", "replace")[-800:]
    assert b"3 new tokens" in r.stderr


def test_stops_at_an_end_token_listed_only_in_the_generation_config(packed, tmp_path):
    """Instruct models list their end-of-turn token in generation_config.json only; load ignored that file,
    and generate ran on to --max-new-tokens. Here the end token is whatever greedy decoding emits 4th."""
    import io
    import json
    import shutil

    from sparserun.generate import generate

    _, path = packed
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)
    tok = make_tokenizer()
    ids = tok("The ferry leaves the", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        free = sparserun.load(ckpt).generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    end = int(free[0, ids.shape[1] + 3])
    f = ckpt / "generation_config.json"
    cfg = json.loads(f.read_text()) if f.exists() else {}
    cfg["eos_token_id"] = [tok.eos_token_id, end]
    f.write_text(json.dumps(cfg))
    res = generate(ckpt, "The ferry leaves the", max_new_tokens=12, out=io.StringIO())
    assert res["new_tokens"] <= 4
