"""How much did pruning cost? Perplexity (causal LMs) and output agreement with another model (any model).

    sparserun eval DIR --text FILE [--against SRC]

DIR and SRC may each be a packed checkpoint (has sparserun.json: loaded with sparserun.load) or a plain
Hugging Face directory. The text is cut into consecutive, non-overlapping windows of `seqlen` tokens (each
wrapped in the tokenizer's special tokens, like the calibration windows), so no token is used twice and the
numbers are deterministic; a tail shorter than a window is left out.

    perplexity   exp(mean next-token negative log-likelihood over all predicted tokens), causal LMs only
    cosine       cosine similarity of the last hidden state (the encoder output, or the hidden state fed to
                 the LM head) of DIR and of SRC at each token, averaged over tokens and windows
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .prune import calibrate
from .generate import has_tokenizer
from .prune.api import position_limit

MANIFEST = "sparserun.json"
# encoded with both tokenizers when DIR and --against each have their own: a different encoding means the ids
# fed to --against are not its tokens (letters, digits, punctuation, spaces, non-ASCII)
PROBE = "Sparse weights, dense results: the 6:45 ferry left Ålesund with 128 passengers, naïvely on time."


class EvalError(ValueError):
    """Evaluation cannot run (one line naming the directory or file)."""


def load_model(path, device="cpu", dtype=None, progress: bool | None = None) -> nn.Module:
    """A packed checkpoint via sparserun.load, or a Hugging Face directory via from_pretrained.
    progress=False also silences transformers' own loading bar (--quiet means quiet)."""
    p = Path(path)
    if not p.is_dir():
        raise EvalError(f"model directory not found: {p}")
    if (p / MANIFEST).is_file():
        from .runtime.io import load

        return load(p, device=device, dtype=dtype, progress=progress)
    if not (p / "config.json").is_file():
        raise EvalError(f"{p} has no config.json (neither a packed checkpoint nor a Hugging Face directory)")
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    from .checkpoint import read_hf_config

    config = read_hf_config(p, EvalError)
    cls = next((getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)), None)
    kw = {"dtype": dtype} if dtype is not None else {}
    kw["trust_remote_code"] = False  # the directory's own code is never run (read_hf_config)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if progress is False:
        hf_logging.disable_progress_bar()
    try:
        if cls is None:
            try:
                model = AutoModelForCausalLM.from_pretrained(str(p), **kw)
            except ValueError:
                model = AutoModel.from_pretrained(str(p), **kw)
        else:
            model = cls.from_pretrained(str(p), **kw)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def load_tokenizer(*dirs):
    from .checkpoint import read_tokenizer

    errors = []
    for d in dirs:
        if d is None:
            continue
        if not Path(d).is_dir():  # never a Hub name: offline, one cost ~50 s of retries before failing
            errors.append(f"{d}: no such directory")
            continue
        try:
            return read_tokenizer(d)
        except Exception as e:  # many error types for a directory without tokenizer files
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            errors.append(f"{d}: {type(e).__name__}{': ' + first if first else ''}")
    raise EvalError(f"no tokenizer found ({'; '.join(errors)})")


def check_windows(seqlen: int, nsamples: int | None, models: dict) -> None:
    """convert's checks on --seqlen / --nsamples, against every model the windows are fed to ({dir: model})."""
    if (nsamples is not None and nsamples < 1) or seqlen < 2:
        raise EvalError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={'all' if nsamples is None else nsamples}, "
                        f"seqlen={seqlen}")
    for d, model in models.items():
        limit, field = position_limit(getattr(model, "config", None))
        if limit and seqlen > limit:
            raise EvalError(f"{d}: seqlen {seqlen} exceeds the model's {field} {limit}")


def check_same_vocabulary(path, model, against, ref, tokenizer, tokenizer_dir=None, flag="--against",
                          error=EvalError) -> None:
    """DIR's tokenizer (or --tokenizer's) feeds both models: refuse when the other model (`flag`: eval's
    --against, finetune's --distill teacher) reads other ids (IndexError, or a comparison of unrelated
    tokens)."""
    a = getattr(getattr(model, "config", None), "vocab_size", None)
    b = getattr(getattr(ref, "config", None), "vocab_size", None)
    if a is not None and b is not None and a != b:
        raise error(f"{path} has vocab_size {a} but {flag} {against} has vocab_size {b}: the models use "
                    f"different tokenizers, so their outputs cannot be compared token by token")
    if has_tokenizer(tokenizer_dir or path) and has_tokenizer(against):
        if tokenizer(PROBE)["input_ids"] != load_tokenizer(against)(PROBE)["input_ids"]:
            raise error(f"the tokenizers of {path} and {flag} {against} encode the same text differently: "
                        f"their outputs cannot be compared token by token")


def windows(tokenizer, text: str, seqlen: int, nsamples: int | None = None,
            source: str = "the evaluation text") -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seqlen] (a text shorter than one window gives one shorter
    window), each wrapped in the tokenizer's special tokens."""
    ids = calibrate.tokenize_text(text, tokenizer, source)
    pre, post = calibrate._special_wrap(tokenizer)
    body = seqlen - len(pre) - len(post)
    if body < 1:
        raise EvalError(f"seqlen {seqlen} leaves no room for text next to the special tokens")
    if not ids:
        raise EvalError("the evaluation text has no tokens")
    body = min(body, len(ids))
    n = len(ids) // body
    if nsamples is not None:
        n = min(n, nsamples)
    return torch.tensor([pre + ids[j * body:(j + 1) * body] + post for j in range(n)], dtype=torch.long)


def last_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The last hidden state [1, T, H]: what the LM head reads (a causal LM's, or a sequence-to-sequence
    model's decoder's, fed the window shifted right), or an encoder's output."""
    if calibrate.is_causal_lm(model):
        out = model(**calibrate.forward_inputs(model, ids, output_hidden_states=True))
        return out.hidden_states[-1]
    out = model(**calibrate.forward_inputs(model, ids, output_hidden_states=True))
    dec = getattr(out, "decoder_hidden_states", None)
    if dec:  # a seq2seq output has logits but no last_hidden_state: compare hidden states, not vocab scores
        return dec[-1]
    return calibrate._model_output(out)


def _bar(n: int, desc: str, progress: bool | None):
    """range(n) with a progress bar (sparserun.progress: None = only on a terminal)."""
    from sparserun.progress import progress_bar

    return progress_bar(range(n), progress=progress, desc=desc, unit="window", leave=False)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, device="cpu", progress: bool | None = False) -> float:
    nll, count = 0.0, 0
    for s in _bar(ids.shape[0], "perplexity", progress):
        x = ids[s:s + 1].to(device)
        logits = model(**calibrate.forward_inputs(model, x)).logits.float()
        nll += float(F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
        count += x.shape[1] - 1
    if count == 0:
        raise EvalError(f"the evaluation windows are {ids.shape[1]} token(s) long: perplexity needs at least 2 "
                        f"(a longer text, or a larger --seqlen)")
    try:
        return math.exp(nll / count)
    except OverflowError:  # mean NLL past ~709 nats: a diverged model, reported as such rather than crashing
        return math.inf


@torch.no_grad()
def cosine(model: nn.Module, other: nn.Module, ids: torch.Tensor, device="cpu", other_device=None,
           progress: bool | None = False) -> float:
    """Mean over tokens and windows of cos(h_model, h_other) of the last hidden states."""
    total, count = 0.0, 0
    for s in _bar(ids.shape[0], "cosine", progress):
        a = last_hidden(model, ids[s:s + 1].to(device)).float()
        b = last_hidden(other, ids[s:s + 1].to(other_device or device)).float().to(a.device)
        if a.shape != b.shape:
            raise EvalError(f"the two models' outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        c = F.cosine_similarity(a, b, dim=-1)
        total += float(c.sum())
        count += c.numel()
    return total / count


def evaluate(path, text_file, against=None, *, seqlen: int | None = None, nsamples: int | None = None,
             device="cpu", dtype=None, progress: bool | None = None, tokenizer=None) -> dict:
    """Perplexity of DIR (causal LMs) and, with `against`, cosine similarity of outputs to that model.
    dtype: default float32 on the CPU (16-bit matmuls are several times slower there, and less exact), else
    each model's own. progress: bars over the windows (None: only on a terminal). tokenizer: a directory to
    load the tokenizer from (default: DIR's, else --against's)."""
    from .convert import resolve_dtype, resolve_device

    dtype = resolve_dtype(dtype, EvalError)
    device = resolve_device(device, EvalError)
    for what, v in (("seqlen", seqlen), ("nsamples", nsamples)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):  # before loading two models
            raise EvalError(f"{what} must be an integer, got {v!r}")
    if dtype is None and device.type == "cpu":
        dtype = torch.float32
    text = calibrate.read_text(text_file, what="evaluation text")
    model = load_model(path, device, dtype, progress=progress)
    # --against is loaded now, not after DIR's perplexity, so a mismatch fails before the long part (both
    # models are in memory for the cosine anyway)
    ref = load_model(against, device, dtype, progress=progress) if against is not None else None
    models = {path: model} if ref is None else {path: model, against: ref}
    tok = load_tokenizer(tokenizer) if tokenizer is not None else load_tokenizer(path, against)
    if ref is not None:
        check_same_vocabulary(path, model, against, ref, tok, tokenizer)
    from .prune.api import default_seqlen

    if seqlen is None:  # not `seqlen or ...`: an explicit 0 is an error, not the default
        seqlen = min(default_seqlen(getattr(m, "config", None)) for m in models.values())
    check_windows(seqlen, nsamples, models)
    ids = windows(tok, text, seqlen, nsamples, source=f"evaluation text {text_file}")
    from .prune.api import check_token_ids

    for name, m in models.items():  # a --tokenizer of a larger vocabulary
        check_token_ids(m, ids, f"{name} with the tokenizer{f' {tokenizer}' if tokenizer is not None else ''}",
                        EvalError)
    result = {"model": str(path), "text": str(text_file), "windows": ids.shape[0], "seqlen": ids.shape[1],
              "tokens": int(ids.numel()), "causal_lm": calibrate.is_causal_lm(model)}
    if result["causal_lm"]:
        result["perplexity"] = perplexity(model, ids, device, progress)
    if ref is not None:
        result["against"] = str(against)
        result["cosine"] = cosine(model, ref, ids, device, progress=progress)
        if calibrate.is_causal_lm(ref):
            result["against_perplexity"] = perplexity(ref, ids, device, progress)
    return result


# ---- CLI ----------------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and output agreement of a (packed) model",
                       description="Perplexity of DIR on a text (causal LMs) and, with --against, the mean "
                                   "cosine similarity of DIR's last hidden states to another model's.")
    p.add_argument("dir", help="packed checkpoint or Hugging Face model directory")
    p.add_argument("--text", required=True, help="evaluation text (plain or JSONL with a \"text\" field)")
    p.add_argument("--against", default=None, help="compare outputs with this model directory (HF or packed)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default min(512, model limit))")
    p.add_argument("--nsamples", type=int, default=None, help="at most this many windows (default: all)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                   help="default: float32 on the CPU, each model's own dtype on a GPU")
    p.add_argument("--tokenizer", default=None, help="load the tokenizer from here (default: DIR's, else --against's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:
    r = evaluate(args.dir, args.text, args.against, seqlen=args.seqlen, nsamples=args.nsamples,
                 device=args.device, dtype=args.dtype, progress=not args.quiet,
                 tokenizer=args.tokenizer)
    if args.json:  # JSON has no NaN or Infinity: a diverged model's non-finite numbers are null
        print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()},
                         indent=1, allow_nan=False))
        return 0
    print(f"{r['model']}: {r['windows']} window(s) x {r['seqlen']} tokens of {r['text']}")
    if "perplexity" in r:
        line = f"perplexity: {r['perplexity']:.4f}"
        if "against_perplexity" in r:
            line += f" (against {r['against']}: {r['against_perplexity']:.4f})"
        print(line)
    else:
        print("perplexity: n/a (not a causal language model)")
    if "cosine" in r:
        print(f"output cosine similarity to {r['against']}: {r['cosine']:.6f}")
    return 0
