"""`sparserun generate DIR --prompt TEXT`: stream text from a packed causal LM (or sequence-to-sequence LM,
such as T5) and report its speed.

The loaded model is used exactly as user code would use it: `sparserun.load`, the checkpoint's own tokenizer,
and transformers' `model.generate` with a streamer, so what this prints is what a drop-in user gets.
Timing: a streamer records when each new token reaches the host (after the device has produced it: the
token is copied to the CPU before the clock is read), so

    time to first token = prefill + first token, from the call to generate (tokenized prompt on the device)
    decode tokens/s     = (new tokens - 1) / (time of the last token - time of the first token)

On a CPU the sparse layers run the pure-torch path (2:4 and block layers are decompressed per call,
unstructured ones once and cached): the numbers then describe that path, not GPU speed, and the summary
says so.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# files any transformers tokenizer is loaded from; a checkpoint with none of them cannot tokenize
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def has_tokenizer(path) -> bool:
    """Whether the directory holds any tokenizer file (checked before transformers' less clear errors)."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


class GenerateError(ValueError):
    """A one-line, user-facing reason `sparserun generate` cannot run (the CLI prints it as `error: ...`)."""


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise GenerateError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {device}: CUDA is not available here (torch {torch.__version__}"
                            f"{', built without CUDA' if torch.version.cuda is None else ', no GPU visible'})")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype | None:
    """None or "auto": bfloat16 on a GPU (what the kernels are tuned for), float32 on a CPU; "stored" keeps
    the checkpoint's dtype."""
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "stored":
        return None
    try:
        return DTYPES[dtype]
    except KeyError:
        raise GenerateError(f"--dtype {dtype!r}: use one of auto, stored, {', '.join(DTYPES)}") from None


def load_tokenizer(model_dir: Path, tokenizer: str | None = None):
    """The checkpoint's tokenizer (or `tokenizer`, a directory), with a one-line error if absent. Nothing is
    downloaded: a name that is no directory spent ~50 s in Hub retries offline before failing."""
    from .checkpoint import read_tokenizer

    src = tokenizer or str(model_dir)
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise GenerateError(f"--tokenizer {tokenizer}: no such directory (give a local directory with the "
                            f"tokenizer files; nothing is downloaded)")
    if tokenizer is None and not has_tokenizer(model_dir):
        raise GenerateError(f"{model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): save it "
                            f"with sparserun.save(model, out, source_dir=HF_DIR) so they are copied, or pass "
                            f"--tokenizer PATH")
    try:
        return read_tokenizer(src)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError/ImportError depending on the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenerateError(f"cannot load a tokenizer from {src}: {first}") from None


def check_causal_lm(model, model_dir) -> None:
    can = getattr(model, "can_generate", None)
    if not (hasattr(model, "generate") and callable(can) and can()):
        raise GenerateError(f"{model_dir} holds a {type(model).__name__}, which cannot generate text: "
                            f"`sparserun generate` needs a causal or sequence-to-sequence language model (e.g. "
                            f"LlamaForCausalLM, T5ForConditionalGeneration)")




def check_sampling(sample: bool, temperature: float | None, top_p: float | None, top_k: int | None) -> dict:
    """The sampling options given, checked ({} for greedy decoding). None means not given: generate() then
    takes the model's own (its generation_config.json, as from_pretrained does: Llama-3-Instruct samples at
    temperature 0.6, top-p 0.9), else transformers' 1.0, 1.0 and 50."""
    # checked even without --sample: a wrong value is a mistake either way, and it is cheaper to hear now
    # (`not x > 0` is also true for nan). Without --sample, a sampling option that was given would be ignored
    # (greedy decoding reads none of them): say so rather than decode greedily behind the user's back, also
    # when the value given happens to equal the default.
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    if not sample:
        named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        if named:
            raise GenerateError(f"{', '.join(named)} only {'applies' if len(named) == 1 else 'apply'} to "
                                f"sampling: add --sample (decoding is greedy without it)")
        return {}
    opts = {k: v for k, v in given.items() if v is not None}
    if "temperature" in opts and not opts["temperature"] > 0:
        raise GenerateError(f"--temperature must be > 0, got {opts['temperature']} (for greedy decoding leave "
                            f"out --sample)")
    if "top_p" in opts and not 0 < opts["top_p"] <= 1:
        raise GenerateError(f"--top-p must be in (0, 1], got {opts['top_p']}")
    if "top_k" in opts and opts["top_k"] < 0:
        raise GenerateError(f"--top-k must be >= 0 (0: no top-k filter), got {opts['top_k']}")
    return opts


def check_positions(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """Prompt and completion must fit the model's position limit: past it a learned position table (GPT-2)
    raises IndexError mid-generation, and rotary models run on positions they were never trained on."""
    from .prune.api import position_limit

    limit, field = position_limit(config)
    if not limit:
        return  # relative positions (T5): no fixed limit
    where = f"the model's position limit {limit} ({field})"
    if prompt_tokens > limit:
        raise GenerateError(f"prompt ({prompt_tokens} tokens) exceeds {where}; shorten the prompt")
    if getattr(config, "is_encoder_decoder", False):
        # the prompt is the encoder's input; the decoder holds its start token and the new tokens
        if 1 + max_new_tokens > limit:
            raise GenerateError(f"--max-new-tokens {max_new_tokens} (+ 1 decoder start token) exceeds {where}; "
                                f"lower --max-new-tokens")
    elif prompt_tokens + max_new_tokens > limit:
        raise GenerateError(f"prompt ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} = "
                            f"{prompt_tokens + max_new_tokens} exceeds {where}; shorten the prompt or lower "
                            f"--max-new-tokens")


def _backend_note(device: torch.device) -> str:
    forced = os.environ.get("SPARSERUN_BACKEND", "auto").strip().lower() or "auto"
    if device.type == "cuda":
        return f"sparse backend {forced}"
    if forced == "auto":
        return ("sparse backend reference (CPU: 2:4 and block layers are decompressed per call, unstructured "
                "ones once and cached; these numbers are not GPU speed)")
    if forced == "reference":
        return ("sparse backend reference (CPU: each sparse layer is decompressed per call; "
                "these numbers are not GPU speed)")
    return f"sparse backend {forced} on CPU (not GPU speed)"


def _make_streamer(tokenizer, out, times: list):
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        """Prints text as it forms and records when each generated token reached the host."""

        def put(self, value):
            if self.skip_prompt and self.next_tokens_are_prompt:
                return super().put(value)
            value = value.cpu()  # waits for the device: the clock below is read after the token exists
            times.append(time.perf_counter())
            return super().put(value)

        def on_finalized_text(self, text, stream_end=False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return TimedStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def fullgraph_ok(model) -> bool:
    """Whether the decode step compiles as one graph. Packed MoE experts route tokens expert by expert with a
    host sync (runtime/experts.py, as transformers' eager loop), which a full graph cannot hold: those models
    compile with graph breaks around the routing, and CUDA graphs cover the pieces between them."""
    from .runtime.experts import experts_modules

    return not experts_modules(model, unrolled=True)


def generate(model_dir, prompt: str, *, max_new_tokens: int = 64, device=None, dtype=None, sample: bool = False,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             seed: int | None = None, ignore_eos: bool = False, chat: bool = False, compile: bool = False,
             tokenizer: str | None = None, out=None, progress: bool = False) -> dict:
    """Stream a completion of `prompt` to `out` (stdout) and return timings:
    {"text", "new_tokens", "prompt_tokens", "ttft_s", "decode_tokens_per_s", "total_s", "device", "dtype"}.
    temperature, top_p, top_k: only with sample=True (default: the model's generation_config.json, else
    transformers' 1.0, 1.0, 50). The model's end-of-sequence tokens are its generation config's too."""
    import sparserun

    out = out or sys.stdout
    model_dir = Path(model_dir)
    if not prompt.strip():
        raise GenerateError("--prompt is empty" + (" (only whitespace)" if prompt else ""))
    try:  # bytes the shell passed that are not UTF-8 arrive as lone surrogates, which no tokenizer accepts
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        try:  # an ASCII (C/POSIX) locale decodes UTF-8 arguments the same way: their bytes are still UTF-8
            prompt = os.fsencode(prompt).decode("utf-8")
        except (UnicodeError, TypeError):
            raise GenerateError(f"--prompt is not valid UTF-8 text at character {e.start}") from None
    if max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    sampling = check_sampling(sample, temperature, top_p, top_k)
    if not model_dir.is_dir():
        raise GenerateError(f"{model_dir}: no such checkpoint directory")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if compile and dev.type != "cuda":
        raise GenerateError("--compile needs a CUDA device (static KV cache + torch.compile with CUDA graphs)")
    tok = load_tokenizer(model_dir, tokenizer)  # before the (possibly large) model: fail fast
    model = sparserun.load(model_dir, device=dev, dtype=dt, progress=progress)
    check_causal_lm(model, model_dir)

    if chat:
        if not getattr(tok, "chat_template", None):
            raise GenerateError(f"--chat: the tokenizer in {tokenizer or model_dir} has no chat template")
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        enc = tok(prompt, return_tensors="pt")
    input_ids = enc["input_ids"].to(dev)
    attention_mask = enc.get("attention_mask")
    attention_mask = attention_mask.to(dev) if attention_mask is not None else None
    if input_ids.shape[1] == 0:
        raise GenerateError("the prompt tokenized to zero tokens")
    check_positions(model.config, input_ids.shape[1], max_new_tokens)

    kw = dict(max_new_tokens=max_new_tokens, do_sample=sample, **sampling)
    if ignore_eos:
        kw["min_new_tokens"] = max_new_tokens  # suppresses EOS: a fixed token count for timing
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        kw["pad_token_id"] = tok.eos_token_id  # silences transformers' open-end warning; batch 1, no padding
    if compile:
        from transformers import CompileConfig

        # generate() compiles the decode step itself when the cache is static and the device is CUDA;
        # reduce-overhead = CUDA graphs. The sparse layers' kernels are torch.library custom ops (ops.py).
        kw.update(cache_implementation="static",
                  compile_config=CompileConfig(fullgraph=fullgraph_ok(model), mode="reduce-overhead"))
        print("compiling the decode step (warm-up generation, not timed) ...", file=sys.stderr, flush=True)
        with torch.inference_mode():
            warm = {k: v for k, v in kw.items() if k != "min_new_tokens"}
            model.generate(input_ids=input_ids, attention_mask=attention_mask,
                           **{**warm, "max_new_tokens": min(8, max_new_tokens)})

    if seed is not None:
        torch.manual_seed(seed)
    times: list[float] = []
    streamer = _make_streamer(tok, out, times)
    with torch.inference_mode():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        seq = model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer, **kw)
        t_end = time.perf_counter()
    # a decoder-only model returns prompt + completion; an encoder-decoder (T5, BART) returns the decoder's
    # sequence, which starts with its one decoder-start token
    start = 1 if getattr(model.config, "is_encoder_decoder", False) else input_ids.shape[1]
    new = seq[0, start:]
    n = int(new.numel())
    res = {"text": tok.decode(new, skip_special_tokens=True), "new_tokens": n,
           "prompt_tokens": int(input_ids.shape[1]), "ttft_s": (times[0] - t0) if times else None,
           "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and
           times[-1] > times[0] else None,
           "total_s": t_end - t0, "device": str(dev), "dtype": str(model.dtype).removeprefix("torch."),
           "backend_note": _backend_note(dev)}
    return res


def format_stats(res: dict) -> str:
    tps = res["decode_tokens_per_s"]
    ttft = res["ttft_s"]
    parts = [f"{res['new_tokens']} new tokens (prompt {res['prompt_tokens']})",
             f"time to first token {ttft * 1e3:.1f} ms" if ttft is not None else "no token generated",
             f"decode {tps:.2f} tokens/s" if tps is not None else "decode tokens/s: n/a (fewer than 2 tokens)",
             f"{res['device']}, {res['dtype']}, {res['backend_note']}"]
    return "[" + "; ".join(parts) + "]"


def _run(args) -> int:
    res = generate(args.dir, args.prompt, max_new_tokens=args.max_new_tokens, device=args.device,
                   dtype=args.dtype, sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos, chat=args.chat,
                   compile=args.compile, tokenizer=args.tokenizer)
    print(format_stats(res), file=sys.stderr, flush=True)
    return 0


def add_parser(sub) -> None:
    from .cli import seed_arg

    p = sub.add_parser("generate", help="stream a completion from a packed causal LM and print tokens/s",
                       description="Load a packed checkpoint with its tokenizer, stream the completion of "
                                   "--prompt to stdout, then print time to first token and decode tokens/s "
                                   "to stderr.")
    p.add_argument("dir", help="packed checkpoint directory (with the source model's tokenizer files)")
    p.add_argument("--prompt", required=True, help="text to complete")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None,
                   help="auto (bfloat16 on GPU, float32 on CPU; default) | stored | float32 | bfloat16 | float16")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", dest="sample", action="store_false", help="greedy decoding (default)")
    mode.add_argument("--sample", dest="sample", action="store_true", help="sample (see --temperature/--top-p/--top-k)")
    p.set_defaults(sample=False)
    p.add_argument("--temperature", type=float, default=None, help="with --sample (default: the model's generation config, else 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="with --sample: nucleus filter (default: the model's generation "
                                                             "config, else 1.0, off)")
    p.add_argument("--top-k", type=int, default=None, help="with --sample: keep the k likeliest tokens (default: the "
                                                            "model's generation config, else 50; 0: no filter)")
    p.add_argument("--seed", type=seed_arg, default=None, help="seed the sampler")
    p.add_argument("--ignore-eos", action="store_true", help="always produce --max-new-tokens tokens, never choosing an end token (for timing)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--compile", action="store_true",
                   help="CUDA only: static KV cache + torch.compile(mode='reduce-overhead') (CUDA graphs); "
                        "a short untimed warm-up generation compiles first")
    p.add_argument("--tokenizer", default=None, help="load the tokenizer from here instead of DIR")
    p.set_defaults(func=_run)
