"""`sparserun demo`, the README's first command: on the bundled real MiniLM, and on another model (--model)."""
import hashlib
import re

import pytest
import torch

from sparserun import demo

from .prune._models import make_tokenizer, one_cpu_thread  # noqa: F401 (autouse fixture)
from .test_convert import run_cli


def tree_hash(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_demo_on_the_bundled_minilm(tmp_path, minilm_dir, monkeypatch):
    """Both cases convert, reload and agree with dense to a plausible degree; the checkpoints are smaller;
    the table is printed; the bundled model is only read; without --out nothing is left behind."""
    before = tree_hash(minilm_dir)
    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))  # where mkdtemp puts the default output
    rc, out = run_cli("demo", "--device", "cpu")
    assert rc == 0, out
    assert "(MiniLM-L6, real pretrained weights)" in out and "speed: no GPU here" in out
    rows = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines()
            if line.startswith(("2:4 wanda", "32x32 wanda"))}
    assert sorted(rows) == ["2:4 wanda", "32x32 wanda"], out
    # one-shot 32x32 blocks at 50 % hurt a 22M encoder badly (docs/prune_quality.md: ~0.3); 2:4 much less
    for case, floor in (("2:4 wanda", 0.6), ("32x32 wanda", 0.1)):
        line = rows[case]
        ratio = float(re.search(r"\(([0-9.]+)x\)", line).group(1))
        assert 0.45 < ratio < 0.6  # packed Linear bytes / dense
        sentence_cos, token_cos = map(float, line.split()[-2:])
        assert floor < token_cos < 0.9999 and floor < sentence_cos < 0.9999, line
    assert list(tmp_path.glob("sparserun-demo-*")) == []  # the temp output was removed
    assert tree_hash(minilm_dir) == before


def test_demo_model_option_and_out(tmp_path):
    """--model runs the same comparison on another HF directory (here a tiny GPT-2: Conv1D layers, a
    tokenizer without a pad token, weights in an older pytorch_model.bin); --out keeps both checkpoints."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import sparserun

    tok = make_tokenizer()
    torch.manual_seed(0)
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(src)
    tok.save_pretrained(src)
    from safetensors.torch import load_file

    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    before = tree_hash(src)
    rows = demo.run(out=str(tmp_path / "out"), device="cpu", quiet=True, model=str(src))
    assert [r["case"] for r in rows] == ["2:4 wanda", "32x32 wanda 50%"]
    assert {r["dense_disk_bytes"] for r in rows} == {(src / "pytorch_model.bin").stat().st_size}
    assert all(r["linear_bytes"] < 0.6 * r["linear_dense_bytes"] for r in rows)
    assert all(r["disk_bytes"] < r["dense_disk_bytes"] for r in rows)  # weight files against weight files
    assert all(0.0 < r["token_cosine"] < 0.9999 for r in rows)
    for sub in ("2of4", "32x32"):
        m = sparserun.load(tmp_path / "out" / sub)
        assert isinstance(m.transformer.h[0].attn.c_attn, sparserun.SparseLinear)
    assert tree_hash(src) == before
    # a second run into the same --out refuses to replace the checkpoints unless told to
    kept = tree_hash(tmp_path / "out")
    rc, out = run_cli("demo", "--model", str(src), "--out", str(tmp_path / "out"))
    assert rc == 1 and "2of4 exists and is not empty (use --overwrite" in out.strip().splitlines()[-1], out
    assert tree_hash(tmp_path / "out") == kept
    assert demo.run(out=str(tmp_path / "out"), device="cpu", quiet=True, model=str(src), overwrite=True)


@pytest.mark.parametrize("args,msg", [
    (["--model", "/nonexistent/model"], "not a Hugging Face model directory"),
    (["--device", "tpu9"], "unknown device 'tpu9'"),
])
def test_demo_errors(args, msg):
    rc, out = run_cli("demo", *args)
    assert rc == 1 and out.strip().splitlines()[-1].startswith("error: ") and msg in out, out


def test_a_failed_demo_leaves_no_temp_dir(tmp_path, monkeypatch):
    """A --model with a config.json but no weights failed after the temp dir was made, and left it behind."""
    import tempfile

    from sparserun import demo

    bad = tmp_path / "badm"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(OSError, match="no file named model.safetensors"):
        demo.run(device="cpu", quiet=True, model=str(bad))
    assert not list(scratch.glob("sparserun-demo-*"))  # (torch may put its own caches there)




def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    """--out naming a file loaded the model first, then failed with "File exists" on OUT/2of4."""
    from sparserun import eval as ev
    from sparserun.convert import ConvertError

    f = tmp_path / "outfile"
    f.write_text("mine")
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ConvertError, match=r"--out .*outfile is a file; give a directory"):
        demo.run(out=str(f), device="cpu", quiet=True)
    assert f.read_text() == "mine"
