"""sparserun eval: perplexity (causal LMs) and output cosine similarity against another directory."""
import json
import math

import pytest
import torch

from sparserun import eval as ev
from sparserun.convert import convert

from .prune._models import make_tokenizer, one_cpu_thread, save_llama_dir  # noqa: F401 (autouse fixture)
from .test_convert import run_cli

TEXT = ("The harbourmaster wrote the ferry times on the chalkboard every morning at six. Visitors learned "
        "to trust the board, not the printed timetable, after missing their first crossing. ") * 12


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    src = save_llama_dir(root / "src", layers=2)
    convert(src, root / "packed", "wanda", "2:4", nsamples=2, seqlen=32, progress=False)
    text = root / "text.txt"
    text.write_text(TEXT)
    return src, root / "packed", text


def test_perplexity_matches_a_direct_computation(dirs):
    from transformers import AutoTokenizer, LlamaForCausalLM

    src, _, text = dirs
    r = ev.evaluate(src, text, seqlen=32)
    tok = AutoTokenizer.from_pretrained(src)
    model = LlamaForCausalLM.from_pretrained(src).eval()
    ids = ev.windows(tok, TEXT, 32)
    assert r["windows"] == ids.shape[0] > 3 and r["seqlen"] == 32
    nll = 0.0
    with torch.no_grad():
        for row in ids:
            nll += float(model(input_ids=row[None], labels=row[None]).loss) * (len(row) - 1)
    assert r["perplexity"] == pytest.approx(math.exp(nll / (ids.shape[0] * 31)), rel=1e-5)


def test_packed_against_source(dirs):
    src, packed, text = dirs
    same = ev.evaluate(src, text, src, seqlen=32)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6)
    r = ev.evaluate(packed, text, src, seqlen=32)
    assert 0.0 < r["cosine"] < 0.9999 and r["against_perplexity"] == pytest.approx(same["perplexity"])
    assert r["perplexity"] != r["against_perplexity"]


def test_tokenizer_option_for_a_checkpoint_without_one(tmp_path, dirs):
    """A packed directory saved without tokenizer files is evaluated (and fine-tuned) with --tokenizer."""
    import shutil

    src, packed, text = dirs
    bare = tmp_path / "bare"
    shutil.copytree(packed, bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab", "merges")):
            f.unlink()
    assert not ev.has_tokenizer(bare)
    rc, out = run_cli("eval", bare, "--text", text, "--seqlen", "32", "--quiet")
    assert rc == 1 and "no tokenizer found" in out and str(bare) in out
    # a name that is no directory fails at once (it spent ~50 s in Hub retries offline), saying why
    rc, out = run_cli("eval", bare, "--text", text, "--seqlen", "32", "--tokenizer", "no-such-tokenizer", "--quiet")
    assert rc == 1 and "no-such-tokenizer: no such directory" in out
    rc, out, err = run_cli("eval", bare, "--text", text, "--seqlen", "32", "--tokenizer", src, "--json", split=True)
    assert rc == 0, err
    assert json.loads(out)["perplexity"] == pytest.approx(ev.evaluate(packed, text, seqlen=32)["perplexity"])
    rc, out = run_cli("finetune", bare, tmp_path / "tuned", "--text", text, "--steps", "1", "--seqlen", "16",
                      "--batch-size", "1", "--tokenizer", src, "--quiet")
    assert rc == 0, out


def test_encoder_cosine_and_cli(tmp_path, minilm_dir):
    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(json.dumps({"text": TEXT[i * 100:(i + 1) * 100]}) for i in range(10)))
    rc, out, err = run_cli("eval", minilm_dir, "--text", text, "--against", minilm_dir, "--seqlen", "32",
                           "--json", split=True)
    assert rc == 0, err
    r = json.loads(out)
    assert r["causal_lm"] is False and "perplexity" not in r and r["cosine"] == pytest.approx(1.0, abs=1e-5)
    rc, out = run_cli("eval", minilm_dir, "--text", text, "--seqlen", "32", "--quiet")
    assert rc == 0 and "perplexity: n/a (not a causal language model)" in out
    assert "Loading weights" not in out  # --quiet silences transformers' loading bar too


def test_eval_errors(tmp_path, dirs):
    src, packed, text = dirs
    rc, out = run_cli("eval", packed, "--text", tmp_path / "missing.txt")
    assert rc == 1 and f"evaluation text file not found: {tmp_path / 'missing.txt'}" in out
    rc, out = run_cli("eval", tmp_path / "nowhere", "--text", text)
    assert rc == 1 and "model directory not found" in out
    rc, out = run_cli("eval", packed, "--text", text, "--device", "gpu0")
    assert rc == 1 and "unknown device 'gpu0'; use cpu, cuda or cuda:N" in out
    with pytest.raises(ev.EvalError, match="seqlen must be an integer, got '32'"):
        ev.evaluate(packed, text, seqlen="32")  # a TypeError deep in the window split before


def test_cpu_default_dtype_is_float32(tmp_path, dirs):
    """On the CPU a 16-bit checkpoint is evaluated in float32 unless --dtype says otherwise (CPU 16-bit matmuls
    are several times slower and less exact); the numbers then equal those of the fp32 checkpoint of the
    same (bf16-rounded) weights."""
    src, packed, text = dirs
    from sparserun.runtime.io import load, save

    half = tmp_path / "bf16"
    save(load(packed, dtype=torch.bfloat16), half, source_dir=packed)
    rounded = tmp_path / "rounded"
    save(load(half, dtype=torch.float32), rounded, source_dir=packed)
    assert ev.evaluate(half, text, seqlen=32)["perplexity"] == ev.evaluate(rounded, text, seqlen=32)["perplexity"]
    in_bf16 = ev.evaluate(half, text, seqlen=32, dtype="bfloat16")["perplexity"]
    assert in_bf16 != ev.evaluate(half, text, seqlen=32)["perplexity"]


def _one_line(rc, err, *needles):
    # the error is the last line; transformers' own "Loading weights" bar may come before it
    errors = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert rc == 1 and len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], (n, errors[0])


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, dirs):
    """A tiny GPT-2 (learned positions, n_positions 64) with the Llama's tokenizer: a valid --against."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    src = dirs[0]
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2")
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=1, n_head=4, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_seqlen_and_nsamples_are_checked_like_convert(dirs, gpt2_dir, minilm_dir):
    """Was: IndexError (GPT-2 past n_positions, --nsamples 0), ZeroDivisionError (--seqlen 1), a silent run past
    Llama's max_position_embeddings; --seqlen 0 became the default."""
    src, packed, text = dirs
    cases = [
        ((src, "--seqlen", "300"), (f"{src}: seqlen 300 exceeds the model's max_position_embeddings 256",)),
        ((gpt2_dir, "--seqlen", "100"), (f"{gpt2_dir}: seqlen 100 exceeds the model's n_positions 64",)),
        ((minilm_dir, "--seqlen", "600"), ("seqlen 600 exceeds the model's max_position_embeddings 512",)),
        ((src, "--seqlen", "1"), ("need nsamples >= 1 and seqlen >= 2", "seqlen=1")),
        ((src, "--seqlen", "0"), ("need nsamples >= 1 and seqlen >= 2", "seqlen=0")),
        ((src, "--nsamples", "0"), ("need nsamples >= 1 and seqlen >= 2", "nsamples=0")),
        # the windows feed --against too: its limit counts
        ((packed, "--against", gpt2_dir, "--seqlen", "100"), (f"{gpt2_dir}: seqlen 100 exceeds", "n_positions 64")),
    ]
    for (d, *opts), needles in cases:
        rc, out, err = run_cli("eval", d, "--text", text, "--quiet", *opts, split=True)
        _one_line(rc, err, *needles)
    # without --seqlen the default fits both models: min(512, 256, 64)
    r = ev.evaluate(src, text, gpt2_dir, nsamples=1)
    assert r["seqlen"] == 64 and r["windows"] == 1 and -1 <= r["cosine"] <= 1


def test_against_a_model_with_another_tokenizer_is_refused(tmp_path, dirs):
    """DIR's tokenizer feeds both models: a different vocabulary gave IndexError or a meaningless cosine."""
    import shutil

    from transformers import LlamaForCausalLM

    src, packed, text = dirs
    small = tmp_path / "small-vocab"
    shutil.copytree(src, small)
    cfg = LlamaForCausalLM.from_pretrained(src).config
    cfg.vocab_size = 300
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(small)
    make_tokenizer(vocab_size=300).save_pretrained(small)
    rc, out, err = run_cli("eval", packed, "--text", text, "--against", small, "--seqlen", "32", split=True)
    _one_line(rc, err, f"{packed} has vocab_size 400 but --against {small} has vocab_size 300")

    # same vocab_size, different tokenizer (fewer merges: the probe text splits differently)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(src, other)
    make_tokenizer(vocab_size=300).save_pretrained(other)
    rc, out, err = run_cli("eval", packed, "--text", text, "--against", other, "--seqlen", "32", split=True)
    _one_line(rc, err, f"the tokenizers of {packed} and --against {other} encode the same text differently")


def test_a_one_token_text_and_a_diverged_model(tmp_path, dirs):
    """Perplexity needs two tokens per window; a model whose loss overflows exp() reports inf, and --json
    prints a non-finite number as null (JSON has no NaN or Infinity)."""
    from transformers import LlamaForCausalLM

    src, _, _ = dirs
    # (a text is one token only for a tokenizer that drops the paragraph breaks and adds no BOS: WordPiece)
    with pytest.raises(ev.EvalError, match=r"windows are 1 token\(s\) long: perplexity needs at least 2"):
        ev.perplexity(LlamaForCausalLM.from_pretrained(src), torch.tensor([[5]]))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    for name, spoil, want in [("hot", lambda m: m.lm_head.weight.mul_(1e4), math.inf),
                              ("nan", lambda m: m.model.norm.weight.fill_(float("nan")), None)]:
        m = LlamaForCausalLM.from_pretrained(src)
        with torch.no_grad():
            spoil(m)
        m.save_pretrained(tmp_path / name)
        r = ev.evaluate(tmp_path / name, text, seqlen=32, nsamples=1, progress=False, tokenizer=src)
        assert r["perplexity"] == want if want else math.isnan(r["perplexity"])
        rc, out, err = run_cli("eval", tmp_path / name, "--text", text, "--seqlen", 32, "--nsamples", 1,
                               "--tokenizer", src, "--json", "--quiet", split=True)
        assert rc == 0 and json.loads(out)["perplexity"] is None, (out, err)


def test_cli_prints_sparseruns_own_warnings_as_one_line(tmp_path, minilm_dir):
    emoji = tmp_path / "emoji.txt"
    emoji.write_text("\U0001F600\U0001F680 \U0001F44D " * 20)
    rc, out, err = run_cli("eval", minilm_dir, "--text", emoji, "--against", minilm_dir, "--quiet", split=True)
    assert rc == 0 and "output cosine similarity" in out
    line = f"warning: 100% of the 40 tokens of evaluation text {emoji} are the unknown token '[UNK]'"
    assert [ln for ln in err.splitlines() if "unknown token" in ln][0].startswith(line), err


def test_a_tokenizer_with_a_larger_vocabulary_is_refused(tmp_path, dirs, minilm_dir):
    """--tokenizer of another model whose ids pass the embedding's size: was `IndexError: index out of range
    in self` from deep inside the embedding."""
    text = tmp_path / "t.txt"
    text.write_text("Sparse matrices keep only the weights that matter. " * 20)
    rc, out, err = run_cli("eval", dirs[1], "--text", text, "--seqlen", "32", "--tokenizer", minilm_dir,
                           "--quiet", split=True)
    assert rc == 1 and "embedding has" in err and "tokenise with the model's own tokenizer" in err, err
    assert len(err.strip().splitlines()) == 1
