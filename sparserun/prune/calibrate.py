"""Layer-sequential calibration driver (the SparseGPT / Wanda recipe), for any method and pattern.

    1. tokenise the calibration text into `nsamples` windows of `seqlen` tokens (CalibData)
    2. run the model up to decoder layer 0 and capture its inputs: a forward pre-hook on layer 0 records the
       hidden states and every other argument the model passes (attention mask, rotary position_embeddings,
       position_ids, ...), then raises a sentinel so nothing past layer 0 runs (and a streaming converter's
       layers 1.. may still be on the meta device)
    3. for each decoder layer i: bring it to the compute device, collect each Linear's input statistics with
       forward hooks (Σx² for wanda, XᵀX for sparsegpt), choose masks / update weights, pack each pruned
       Linear (checks the pattern, gives the bytes), run the layer again on the same inputs to measure each
       Linear's relative output error ‖Wx − W'x‖ / ‖Wx‖ and to produce the *pruned* layer's outputs, which
       become layer i+1's inputs; then hand the layer back (`LayerStore.unload`)

An encoder-decoder has two stacks (find_stacks), pruned in that order: the encoder's, by running the encoder
alone, then the decoder's, with each window's pruned encoder output passed in as `encoder_outputs`.

Only one decoder layer is on the compute device at a time; a `LayerStore` decides where layers come from
(in memory: moved there and back; the converter: read from safetensors and dropped after packing).

Gradients for taylor / obd (`gradient_stats`) are computed before pruning, at the dense model, by
backpropagating the model's own loss through the layers one at a time in reverse order, from saved layer
inputs (activation checkpointing at layer granularity), so this too holds one decoder layer at a time:

    causal LMs   the language-model loss (next-token cross-entropy) on each calibration window; likewise
                 a sequence-to-sequence LM's decoder stack, with the window as source and target
    encoders     (and an encoder-decoder's encoder stack) there is no loss; the natural one, the distance
                 of the outputs to the dense model's, has a zero gradient at the dense point. Its curvature is
                 not zero: with J = ∂f/∂W, the Hessian of ½‖f(W') − f(W)‖² at W' = W is JᵀJ
                 (Gauss-Newton is exact there since the residual is 0), and for ε ~ N(0, I),
                 g = ∂⟨ε, f⟩/∂W = εᵀJ has E[g²] = diag(JᵀJ). So each window's gradient is
                 that of ⟨ε, f(x)⟩ (last hidden state, a fresh fixed-seed ε per window): obd = ½ W² · mean g²
                 is then OBD for the output-distance loss (in expectation over ε and the windows), and
                 taylor = |W| · Σ|g| is its first-order counterpart: for one window's J, E|g| =
                 sqrt(2/π)·sqrt(diag JᵀJ), so across windows the two orderings agree up to how J varies.
Per-window gradients (batch 1; each the mean over the window's tokens) make mean g² a per-window (mini-batch)
empirical Fisher, not the square of a mean over all windows, and not a per-token Fisher either. Cost:
one dense forward + one forward/backward per layer and window; memory: one layer, its fp32 statistic
(4 bytes per weight) and the saved layer inputs (layers × nsamples × seqlen × hidden), which a converter
spills to disk.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import formats
from ..formats import UnsupportedShape
from ..formats.common import check_weight_finite
from ..patterns import parse
from ..runtime import experts
from ..runtime.linear import (OWN_FORWARD_REASON, SparseLinear, is_linear, linear_weight, nothing_pruned_reason,
                              own_forward)
from . import masks as masks_mod
from . import scores
from .sparsegpt import sparsegpt

PER_ROW_DEFAULT = ("wanda", "taylor", "obd")  # see Options.per_row
DEFAULT_CALIB = Path(__file__).resolve().parent.parent / "data" / "calib_default.txt"
DEFAULT_NSAMPLES = 32
DEFAULT_SEQLEN = 512


class CalibrationError(ValueError):
    """Calibration data is missing, empty or too short (the message names the file)."""


class UnknownModelFamily(ValueError):
    """No repeated decoder/encoder blocks could be found in the model."""


# ---- calibration data ---------------------------------------------------------------------------------

@dataclass
class CalibData:
    """`input_ids` [nsamples, seqlen] windows and where they came from (reported)."""

    input_ids: torch.Tensor
    source: str
    text_tokens: int | None = None  # tokens in the whole text (None for pre-tokenised input)
    seed: int = 0
    unknown_tokens: float = 0.0  # fraction of the text's tokens that are the tokenizer's unknown token
    unk_token: str | None = None

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    def describe(self) -> dict:
        d = {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}
        if self.text_tokens is not None:
            d["text_tokens"] = self.text_tokens
            # windows are drawn at random: say how often the text is reused, so nobody mistakes 64 windows
            # of a 5k-token text for 64 independent documents
            d["coverage"] = round(self.nsamples * self.seqlen / max(self.text_tokens, 1), 2)
        if self.unknown_tokens:
            d["unknown_tokens"] = self.unknown_tokens
            d["unk_token"] = self.unk_token
        return d


def _json_text_record(line: str) -> "str | None":
    """The "text" field of a JSONL line, or None if the line is not a JSON object with a string "text"."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj["text"] if isinstance(obj, dict) and isinstance(obj.get("text"), str) else None


def check_encodable(text: str, where: str) -> None:
    """A lone surrogate (a JSON "\\ud800" escape, or undecodable bytes in argv) cannot be tokenised, and
    tokenizers say so without naming the text: refuse it here, saying where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        hint = (f" (byte 0x{ord(bad) - 0xDC00:02x}, not UTF-8)" if 0xDC80 <= ord(bad) <= 0xDCFF
                else f" (a lone surrogate \\u{ord(bad):04x})")
        raise CalibrationError(f"{where} is not valid text at character {e.start}{hint}") from None


def read_text(path, what: str = "calibration") -> str:
    """Plain text; JSONL with a "text" field per line (a .jsonl/.ndjson file, or any file whose first line is
    such a record); or a .json file holding a list of strings or of objects with a "text" field. Source code
    or prose that merely starts with "{" is plain text. UTF-8, with or without a byte-order mark; a pipe
    (`<(zcat f.gz)` in bash) reads like a file."""
    if not isinstance(path, (str, os.PathLike)):  # 123 or a generator failed inside pathlib
        raise CalibrationError(f"{what}: expected a file path, a list of strings or a LongTensor of token ids, got "
                               f"{type(path).__name__}")
    p = Path(path)
    try:
        if not p.exists():
            raise CalibrationError(f"{what} file not found: {str(p)[:200]}")
        if p.is_dir():
            raise CalibrationError(f"{what} path is a directory, not a file: {p}")
        data = p.read_bytes()
    except OSError as e:  # a name too long (text passed where a path goes), unreadable, ...
        raise CalibrationError(f"{what} file {str(p)[:200]!r} cannot be read ({e.strerror or e}); a str is a "
                               f"file path: pass text as a list of strings") from None
    if data[:2] == b"\x1f\x8b":
        raise CalibrationError(f"{what} file {p} is gzip-compressed: decompress it first (zcat, or pass "
                               f"<(zcat {p}) in bash)")
    try:
        raw = data.decode("utf-8-sig")  # Notepad and Excel write a byte-order mark; it is not text
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{what} file {p} is not UTF-8 text: {e}") from None
    # JSONL records end at "\n" only: str.splitlines() also splits at U+2028, U+0085 and others, which JSON
    # writes raw inside strings (json.dumps(ensure_ascii=False)); line numbers then match an editor's
    lines = [ln.removesuffix("\r") for ln in raw.split("\n")]
    if not any(ln.strip() for ln in lines):
        raise CalibrationError(f"{what} file {p} is empty")
    if p.suffix.lower() == ".json":
        texts = _json_list_texts(raw, p, what)
    elif p.suffix.lower() in (".jsonl", ".ndjson") or _json_text_record(
            next(ln for ln in lines if ln.strip())) is not None:
        texts = []
        for no, ln in enumerate(lines, 1):
            if not ln.strip():
                continue
            text = _json_text_record(ln)
            if text is None:
                try:
                    json.loads(ln)
                    why = "expected an object with a string \"text\" field"
                except ValueError as e:
                    why = f"not valid JSON ({e})"
                raise CalibrationError(f"{what} file {p}, line {no}: {why}")
            check_encodable(text, f"{what} file {p}, line {no}")
            texts.append(text)
    else:
        return raw  # decoded UTF-8 holds no surrogates
    raw = "\n\n".join(texts)
    if not raw.strip():
        raise CalibrationError(f"{what} file {p} has no text in its \"text\" fields")
    return raw


def _json_list_texts(raw: str, p: Path, what: str) -> list[str]:
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise CalibrationError(f"{what} file {p}: not valid JSON ({e}); plain text belongs in a .txt file") from None
    if not isinstance(obj, list):
        raise CalibrationError(f"{what} file {p}: expected a JSON list of strings or of objects with a \"text\" "
                               f"field, got a {type(obj).__name__}")
    texts = []
    for i, it in enumerate(obj):
        t = it if isinstance(it, str) else it.get("text") if isinstance(it, dict) else None
        if not isinstance(t, str):
            raise CalibrationError(f"{what} file {p}, item {i}: expected a string or an object with a string "
                                   f"\"text\" field")
        check_encodable(t, f"{what} file {p}, item {i}")
        texts.append(t)
    return texts


def _special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before / after a text (e.g. [CLS] .. [SEP], or <s>)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain):])
    return [], []


UNKNOWN_WARN_FRACTION = 0.05  # English prose gives ~0 unknown tokens on a WordPiece vocabulary; emoji, 100 %


def unknown_fraction(ids: list[int], tokenizer) -> float:
    unk = getattr(tokenizer, "unk_token_id", None)
    return ids.count(unk) / len(ids) if unk is not None and ids else 0.0


def unknown_warning(frac: float, n: int, source: str, unk_token) -> str | None:
    """The warning for a text whose tokens are mostly the unknown token (a script the vocabulary lacks:
    statistics from [UNK] runs say little about the model), or None."""
    if frac <= UNKNOWN_WARN_FRACTION:
        return None
    return (f"{100 * frac:.0f}% of the {n} tokens of {source} are the unknown token {unk_token!r}: the tokenizer "
            f"cannot read most of this text (another script or emoji?), so what is computed from it says little "
            f"about the model")


def tokenize_text(text: str, tokenizer, source: str = "the text", warn: bool = True) -> list[int]:
    """The text's token ids, no special tokens; with `warn`, a Python warning when many are the unknown
    token (unknown_warning)."""
    ids: list[int] = []
    # paragraph by paragraph (some tokenizers slow down on one huge call); verbose=False: a paragraph longer
    # than model_max_length is fine here (windows are cut later), so transformers' warning would mislead
    for para in re.split(r"\n\s*\n", text):
        if para.strip():
            ids.extend(tokenizer(para.strip() + "\n\n", add_special_tokens=False, verbose=False)["input_ids"])
    msg = unknown_warning(unknown_fraction(ids, tokenizer), len(ids), source, getattr(tokenizer, "unk_token", None))
    if warn and msg:
        from .. import SparserunWarning

        warnings.warn(msg, SparserunWarning, stacklevel=2)
    return ids


def calibration_data(calib=None, tokenizer=None, nsamples: int = DEFAULT_NSAMPLES,
                     seqlen: int = DEFAULT_SEQLEN, seed: int = 0) -> CalibData:
    """Calibration windows from `calib`: None (the shipped default text), a file path (text / JSONL),
    a list of strings, or a LongTensor [n, T] of token ids (used as is)."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32) or calib.numel() == 0:
            raise CalibrationError(f"pre-tokenised calibration must be a non-empty integer tensor [nsamples, "
                                   f"seqlen], got {calib.dtype} {tuple(calib.shape)}")
        return CalibData(calib.long(), f"pre-tokenised tensor {tuple(calib.shape)}", None, seed)
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    if calib is None:
        text, source = read_text(DEFAULT_CALIB), "sparserun default calibration text (sparserun/data/calib_default.txt)"
    elif isinstance(calib, (list, tuple)):
        if not all(isinstance(t, str) for t in calib):
            raise CalibrationError("a calibration list must hold strings")
        text, source = "\n\n".join(calib), f"{len(calib)} text(s) passed in memory"
        if not text.strip():
            raise CalibrationError("calibration texts are empty")
        for i, t in enumerate(calib):
            check_encodable(t, f"calibration text {i}")
    else:
        text, source = read_text(calib), str(calib)
    if tokenizer is None:
        raise CalibrationError("calibration text needs the model's tokenizer (pass tokenizer=, or pre-tokenised "
                               "input_ids as calib=)")
    ids = tokenize_text(text, tokenizer, warn=False)  # the report warns (PruneReport.warnings)
    pre, post = _special_wrap(tokenizer)
    body = seqlen - len(pre) - len(post)
    if body < 1:
        raise CalibrationError(f"seqlen {seqlen} leaves no room for text next to {len(pre) + len(post)} "
                               f"special tokens")
    if len(ids) < body:
        raise CalibrationError(f"calibration text {source} has only {len(ids)} tokens; a window of seqlen "
                               f"{seqlen} needs {body} (use a longer text or a smaller seqlen)")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - body + 1, (nsamples,), generator=g).tolist()
    rows = [pre + ids[s:s + body] + post for s in starts]
    return CalibData(torch.tensor(rows, dtype=torch.long), source, len(ids), seed,
                     round(unknown_fraction(ids, tokenizer), 4), getattr(tokenizer, "unk_token", None))


# ---- model structure ----------------------------------------------------------------------------------

KNOWN_LAYOUTS = ("model.layers (Llama/Qwen/Mistral)", "transformer.h (GPT-2)", "model.decoder.layers (OPT)",
                 "encoder.layer (BERT)")


def set_weight(m: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        linear_weight(m).copy_(w)


def _language_model(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of what get_decoder() returns inside `model` (a causal LM's backbone, a VLM's language
    model), or ("", model) for an encoder-decoder (find_stacks takes both halves), a base model, or none."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "", model
    try:
        dec = model.get_decoder()
    except Exception:  # no such accessor, or one that raises for this model
        return "", model
    if not isinstance(dec, nn.Module) or dec is model:
        return "", model
    name = next((n for n, m in model.named_modules() if m is dec), "")
    return (name, dec) if name else ("", model)


def _largest_stack(part: nn.Module) -> "tuple[str, nn.ModuleList] | None":
    """(name, list) of the ModuleList of blocks holding Linear layers with the most parameters, or None."""
    best, best_size = None, -1
    for name, mod in part.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if isinstance(mod[0], (nn.ModuleList, nn.ModuleDict)):  # a list of lists (Funnel's blocks): not blocks
            continue
        if not any(is_linear(m) for b in mod for m in b.modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > best_size:
            best, best_size = (name, mod), size
    return best


def _shared_between_layers(layers: nn.ModuleList) -> str:
    """The name (within its layer) of a module or parameter that two layers hold (tied), or ""."""
    seen: dict[int, int] = {}
    for i, block in enumerate(layers):
        named = list(block.named_modules()) + list(block.named_parameters())
        for sub, m in named:
            if sub and seen.setdefault(id(m), i) != i:
                return f"{i}.{sub}"
    return ""


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the nn.ModuleList of blocks holding Linear layers with the most parameters
    (model.layers, transformer.h, model.decoder.layers, encoder.layer, bert.encoder.layer, ...), looked for
    first in the language model get_decoder() names, so that a VLM whose vision tower outweighs its language
    model (LLaVA-OneVision-0.5B) still has its language model pruned."""
    prefix, part = _language_model(model)
    best = _largest_stack(part)
    if best is None and part is not model:
        prefix, best = "", _largest_stack(model)
    if best is not None and len({type(b) for b in best[1]}) > 1:
        # a hybrid stack (Jamba's attention and Mamba layers): pruned layer by layer like any other, as long
        # as no module or weight is shared between its layers (Zamba2's shared transformer would be pruned
        # once per layer that holds it) and a text-only forward calls every layer (record_layer_args checks)
        shared = _shared_between_layers(best[1])
        if shared:
            name = f"{prefix}.{best[0]}" if prefix else best[0]
            raise UnknownModelFamily(f"{type(model).__name__}: the layers of {name} share modules or weights "
                                     f"({shared}); layer-by-layer pruning would prune them once per layer that "
                                     f"holds them (magnitude pruning without calibration, sparserun.sparsify_, "
                                     f"does not)")
    if best is not None and prefix:
        best = (f"{prefix}.{best[0]}", best[1])
    if best is None:
        if any(isinstance(m, SparseLinear) for m in model.modules()):
            raise UnknownModelFamily(f"{type(model).__name__} already holds packed SparseLinear layers (from "
                                     f"sparserun.load or sparsify_): prune the dense model")
        raise UnknownModelFamily(f"cannot find the repeated decoder/encoder layers of {type(model).__name__}: "
                                 f"no nn.ModuleList of blocks with Linear layers (known layouts: "
                                 f"{', '.join(KNOWN_LAYOUTS)})")
    return best


@dataclass
class Stack:
    """One repeated stack of blocks that pruning goes through, and the module run to calibrate it."""

    path: str  # from the model's root: "model.layers", "encoder.block", ...
    layers: nn.ModuleList
    runner: nn.Module  # the model, or for an encoder-decoder's encoder stack the encoder alone
    rel: str  # `path` relative to `runner`


def find_stacks(model: nn.Module) -> list[Stack]:
    """The stacks to prune, in the order the model runs them: the repeated layers (find_layers), or for an
    encoder-decoder (T5, BART, Marian, ...) its encoder's stack and then its decoder's. The encoder stack is
    calibrated by running the encoder alone; the decoder then sees the pruned encoder's output."""
    path, layers = find_layers(model)
    main = Stack(path, layers, model, path)
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return [main]
    try:
        enc, dec = model.get_encoder(), model.get_decoder()
    except Exception:  # no such accessors (or they raise): prune the one stack found
        return [main]
    if not isinstance(enc, nn.Module) or not isinstance(dec, nn.Module) or enc is dec or enc is model:
        return [main]
    names = {id(m): n for n, m in model.named_modules()}
    stacks = []
    for part in (enc, dec):
        try:
            rel, part_layers = find_layers(part)
        except UnknownModelFamily:
            return [main]
        full = f"{names[id(part)]}.{rel}" if names.get(id(part)) else rel
        stacks.append(Stack(full, part_layers, part, rel))
    a, b = stacks[0].path, stacks[1].path
    if a == b or a.startswith(b + ".") or b.startswith(a + ".") or id(dec) not in names:
        return [main]
    stacks[1] = Stack(b, stacks[1].layers, model, b)  # the decoder runs inside the whole model
    return stacks


ROUTER_REASON = "routes tokens to MoE experts: kept dense"
UNREACHED_REASON = "no calibration token reached it: pruned by magnitude"
# reached, but its statistic is zero anyway (e.g. an all-zero layer before or after it): more text cannot help
ZERO_INPUT_REASON = "its inputs were zero on every calibration token: pruned by magnitude"
ZERO_GRAD_REASON = ("its calibration gradient is zero everywhere (no token reached it, or nothing after it "
                    "depends on it): pruned by magnitude")
NEVER_CALLED_REASON = ("the model's forward never called it on the calibration text (it reads the weight "
                       "directly, or needs other inputs): kept dense")


def stack_linear_names(model: nn.Module) -> list[str]:
    """Full names of the Linear (and Conv1D) layers inside the stacks: what pruning touches by default (MoE
    routers stay dense, runtime/experts.router_names)."""
    routers = experts.router_names(model)
    names = [f"{st.path}.{i}.{sub}" for st in find_stacks(model) for i, block in enumerate(st.layers)
             for sub, m in block.named_modules() if is_linear(m) and not own_forward(m)]
    return [n for n in names if n not in routers]


def in_stacks(name: str, stacks) -> bool:
    """Whether a parameter / module name lies inside one of the stacks."""
    return any(name.startswith(st.path + ".") for st in stacks)


def is_causal_lm(model: nn.Module) -> bool:
    name = type(model).__name__
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names
        if name in set(names.values()):
            return True
    except Exception:
        pass
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _forward_params(model: nn.Module) -> "set | None":
    """The keyword arguments model.forward takes, with "**" among them if it takes **kwargs (None if its
    signature cannot be read)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return {"**" if p.kind is inspect.Parameter.VAR_KEYWORD else n for n, p in params.items()}


def forward_inputs(model: nn.Module, ids: torch.Tensor, **extra) -> dict:
    """Keyword arguments for running `model` on token windows `ids`: no KV cache, and for encoder-decoders
    (T5, BART) decoder inputs too, the window shifted right as in teacher forcing (T5 raises without them).
    An encoder-decoder's own encoder (whose config may still say is_encoder_decoder) gets none."""
    sig = _forward_params(model)
    params = sig or set()
    # no KV cache: asked for by name, or through **kwargs where the config says the model has a cache (a causal
    # LM or VLM whose forward takes only **kwargs hands them to the backbone, which would otherwise build one)
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    no_cache = "use_cache" in params or ("**" in params and any(
        getattr(c, "use_cache", None) is not None for c in (cfg, text_cfg)))
    kw = {"input_ids": ids, **({"use_cache": False} if no_cache else {}), **extra}
    seq2seq = getattr(cfg, "is_encoder_decoder", False) and (
        sig is None or "decoder_input_ids" in params)
    if seq2seq and "labels" not in kw and "decoder_input_ids" not in kw:
        shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        try:
            kw["decoder_input_ids"] = shift(labels=ids) if shift is not None else ids
        except Exception:  # a model whose shift needs config fields it lacks: the window itself
            kw["decoder_input_ids"] = ids
    return kw


def has_lm_loss(model: nn.Module) -> bool:
    """The model computes a next-token loss from labels=input_ids: a causal LM, or a sequence-to-sequence LM
    (T5ForConditionalGeneration, BART) fed the window as both source and target."""
    if is_causal_lm(model):
        return True
    params = _forward_params(model) or set()
    return (getattr(getattr(model, "config", None), "is_encoder_decoder", False) and "labels" in params
            and "decoder_input_ids" in params and hasattr(model, "get_output_embeddings")
            and model.get_output_embeddings() is not None)


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    """Raised by the layer-0 hook: everything needed has been captured."""


@dataclass
class LayerInputs:
    """The hidden states entering layer 0 ([n, T, H], on the compute device) and the other arguments the model
    passes to each layer for each window.

    Layers need not all get the same arguments: Gemma 2/3, ModernBERT, Qwen with sliding windows and others
    hand each layer the mask and rotary table of its attention type (local or global), and T5 passes the
    position bias its first block computes to the blocks after it. Nor need windows: an encoder-decoder's
    decoder layers get each window's own encoder output. `calls[s][i]` is what layer i received for window
    s (layer 0 from capture_inputs, the others from record_layer_args); a layer missing there gets layer 0's.
    An argument equal to window 0's is stored once (the same object), so only what really differs costs memory.
    """

    hidden: torch.Tensor
    calls: list = field(default_factory=list)  # per window: {layer index: (args, kwargs)}
    # What the layers return besides the hidden states: None for a bare tensor, else the rest of the tuple
    # (() for Falcon/Bloom, T5's position biases). The stubs that stand in for the layers while the head runs
    # must return the same structure, or the model indexes into the hidden states or fails to unpack.
    tuple_out: "tuple | None" = None

    def run(self, layer: nn.Module, x: torch.Tensor, i: int = 0, s: int = 0) -> torch.Tensor:
        """Layer i (of the repeated stack) on window s's hidden states x ([1, T, H])."""
        c = self.calls[s]
        args, kwargs = c.get(i) or c[0]
        out = layer(x, *args, **kwargs)
        self.tuple_out = tuple(out[1:]) if isinstance(out, (tuple, list)) else None
        return _layer_out(out)


def _split_layer_call(args: tuple, kwargs: dict) -> tuple:
    """(hidden states, other positional args, other keyword args) of a call to a layer, with no KV cache.

    forward_inputs asks for use_cache=False, but a model may build a cache anyway (a config forward_inputs
    could not read, a forward that ignores the flag) and hand it to every layer. Recorded as is, each re-run
    of a layer would append its keys and values to it, and attend to the dense layers' ones. So a cache among
    the arguments becomes None and use_cache False."""
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    args = tuple(None if _is_cache(a) else a for a in args)
    if args:
        return args[0], tuple(args[1:]), kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def _is_cache(obj) -> bool:
    try:
        from transformers.cache_utils import Cache
    except Exception:  # a transformers without cache objects passes tuples, which forward_inputs turned off
        return False
    return isinstance(obj, Cache)


def _share(new, old):
    """`new`, with every part equal to the matching part of `old` replaced by `old`'s object (tensors by
    value), so that arguments repeated across windows are held once."""
    if isinstance(new, torch.Tensor):
        same = (isinstance(old, torch.Tensor) and new.shape == old.shape and new.dtype == old.dtype
                and new.device == old.device and torch.equal(new, old))
        return old if same else new
    if isinstance(new, (tuple, list)) and isinstance(old, (tuple, list)) and len(new) == len(old):
        return type(new)(_share(a, b) for a, b in zip(new, old))
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _share(v, old[k]) if k in old else v for k, v in new.items()}
    return new


def _window_kwargs(extra, s: int) -> dict:
    """Keyword arguments besides the tokens for window s (an encoder-decoder's decoder pass: the pruned
    encoder's output); `extra` is None or a function of the window index."""
    return extra(s) if extra is not None else {}


def _forward_until_stop(model: nn.Module, ids: torch.Tensor, **kw) -> bool:
    """Run `model` on one window; True if a layer hook ended the forward early (raised _Stop)."""
    try:
        model(**forward_inputs(model, ids, **kw))
    except _Stop:
        return True
    return False


def _record(calls: list, s: int, i: int, args: tuple, kwargs: dict) -> None:
    """calls[s][i] = (args, kwargs), sharing what equals window 0's arguments for the same layer."""
    while len(calls) <= s:
        calls.append({})
    if s > 0 and i in calls[0]:
        args, kwargs = _share((args, kwargs), calls[0][i])
    calls[s][i] = (args, kwargs)


@torch.no_grad()
def record_layer_args(model: nn.Module, path: str, layers: nn.ModuleList, store, inputs: LayerInputs,
                      input_ids: torch.Tensor, device, extra=None) -> None:
    """Record what layers 1.. receive, per window, into inputs.calls: run layer 0 for real on one window (to
    learn what the layers return), then run the model on each window with every layer replaced by a stub
    that records its arguments and passes the hidden states on in the layers' own output structure. Only what
    surrounds the layers runs (embeddings, masks, rotary tables, an encoder); the stub after the last layer
    stops the forward before the head."""
    if len(layers) < 2:
        return
    layer = store.load(0, device)
    try:
        inputs.run(layer, inputs.hidden[:1])
    finally:
        store.unload(0)
    holder: dict = {"tuple": inputs.tuple_out}
    window = {"s": 0}

    def hook(module, args, kwargs):
        i = index[id(module)]
        if i > 0:
            _, rest, kw = _split_layer_call(args, kwargs)
            _record(inputs.calls, window["s"], i, rest, kw)
        if i == len(layers) - 1:
            raise _Stop

    with stubbed(model, path, layers, holder):
        stubs = model.get_submodule(path)
        index = {id(st): i for i, st in enumerate(stubs)}
        handles = [st.register_forward_pre_hook(hook, with_kwargs=True) for st in stubs]
        try:
            for s in range(input_ids.shape[0]):
                window["s"] = s
                _forward_until_stop(model, input_ids[s:s + 1].to(device), **_window_kwargs(extra, s))
        finally:
            for hd in handles:
                hd.remove()
    # one class of layer gets one kind of arguments, and a layer the stubs did not see takes layer 0's; a
    # layer of another class (Mllama's cross-attention layers, skipped without an image) cannot
    if len({type(b) for b in layers}) > 1:
        unseen = [i for i in range(1, len(layers)) if i not in inputs.calls[0]]
        if unseen:
            raise CalibrationError(f"{type(model).__name__}: a text-only forward never calls {path}.{unseen[0]} "
                                   f"({type(layers[unseen[0]]).__name__}), so it cannot be calibrated; prune "
                                   f"without calibration: sparserun.sparsify_(model, pattern) + sparserun.save")


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, device,
                   extra=None) -> LayerInputs:
    """Run the model up to layer 0 for every window and record what layer 0 receives (extra: see
    _window_kwargs)."""
    params = _forward_params(model)
    if params is not None and "input_ids" not in params:
        raise CalibrationError(f"{type(model).__name__} takes no input_ids (it reads other inputs, such as audio "
                               f"features or pixels), and calibration runs text windows through it; prune it "
                               f"without calibration: sparserun.sparsify_(model, pattern) + sparserun.save")
    rec: dict = {}
    calls: list = []

    def hook(module, args, kwargs):
        h, rest, kwargs = _split_layer_call(args, kwargs)
        rec["h"] = h
        _record(calls, rec["s"], 0, rest, kwargs)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    hidden = None
    path = next((n for n, m in model.named_modules() if m is layers), "the layers")
    try:
        for s in range(input_ids.shape[0]):
            rec["s"] = s
            if not _forward_until_stop(model, input_ids[s:s + 1].to(device), **_window_kwargs(extra, s)):
                raise CalibrationError(f"{type(model).__name__}: a text-only forward never reaches {path}.0, the "
                                       f"stack chosen for pruning; prune it without calibration: "
                                       f"sparserun.sparsify_(model, pattern) + sparserun.save")
            h = rec.pop("h")
            if not isinstance(h, torch.Tensor) or h.dim() < 2 or h.shape[0] != 1:
                shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise CalibrationError(f"{type(model).__name__}: the hidden states entering {path}.0 for one window "
                                       f"are {shape}, not [1, tokens, hidden] (batch first): layer-by-layer "
                                       f"pruning cannot feed them (Gemma 3n stacks streams first, XLNet is "
                                       f"sequence first); prune it without calibration: "
                                       f"sparserun.sparsify_(model, pattern) + sparserun.save")
            if hidden is None:
                hidden = torch.empty((input_ids.shape[0],) + tuple(h.shape[1:]), dtype=h.dtype, device=device)
            hidden[s] = h[0]
    finally:
        handle.remove()
    return LayerInputs(hidden, calls)


class _Stub(nn.Module):
    """Stands in for a decoder layer: passes the hidden states through (or replaces them with `inject`),
    so running the model runs only what comes before and after the layers (embeddings, final norm, head).
    Other attributes (e.g. Qwen's `attention_type`, read by the model's forward) come from the real layer."""

    def __init__(self, orig: nn.Module, holder: dict):
        super().__init__()
        object.__setattr__(self, "_orig", orig)  # not a submodule: its (meta) parameters stay out of sight
        object.__setattr__(self, "_holder", holder)

    @property
    def __class__(self):
        # isinstance(stub, JambaMambaDecoderLayer) as for the real layer: a model whose forward picks each
        # layer's mask or cache by its class must hand the stub what it hands the layer
        return type(object.__getattribute__(self, "_orig"))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_orig"), name)

    def forward(self, hidden_states=None, *args, **kwargs):
        h = self._holder.get("inject")
        if h is not None:
            self._holder["inject"] = None  # only the first layer replaces; the rest pass it on
        else:
            h = hidden_states
        rest = self._holder.get("tuple")
        return h if rest is None else (h, *rest)


@contextlib.contextmanager
def stubbed(model: nn.Module, path: str, layers: nn.ModuleList, holder: dict):
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList([_Stub(b, holder) for b in layers]))
    try:
        yield
    finally:
        setattr(parent, attr, layers)


def _model_output(out) -> torch.Tensor:
    for key in ("last_hidden_state", "logits"):
        v = getattr(out, key, None)
        if v is not None:
            return v
    return out[0] if isinstance(out, (tuple, list)) else out


# ---- where layers live --------------------------------------------------------------------------------

class InMemoryLayers:
    """Layers already in memory: moved to the compute device for their turn and back afterwards."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self._home: dict[int, torch.device] = {}

    def load(self, i: int, device) -> nn.Module:
        layer = self.layers[i]
        p = next(iter(layer.parameters()), None)
        self._home[i] = p.device if p is not None else torch.device("cpu")
        return layer.to(device)

    def unload(self, i: int) -> None:
        self.layers[i].to(self._home.pop(i, torch.device("cpu")))


@contextlib.contextmanager
def non_layers_on(model: nn.Module, path: str, layers: nn.ModuleList, device, others=()):
    """Move everything except the decoder layers (embeddings, norms, head) to `device` for a while. `others`:
    more (path, layers) to leave where they are, such as an encoder-decoder's other stack, which a
    streaming converter holds on the meta device and whose output the decoder pass is given precomputed."""
    detached = [(path, layers)] + [(p, m) for p, m in others if p != path]
    parents = []
    for p_, m_ in detached:
        parent_name, _, attr = p_.rpartition(".")
        parents.append((model.get_submodule(parent_name) if parent_name else model, attr, m_))

    def detach():
        for parent, attr, _ in parents:
            setattr(parent, attr, nn.ModuleList())

    def attach():
        for parent, attr, m_ in parents:
            setattr(parent, attr, m_)

    inside = tuple(p_ + "." for p_, _ in detached)
    p = next((p for n, p in model.named_parameters() if not n.startswith(inside) and not p.is_meta), None)
    home = p.device if p is not None else torch.device("cpu")
    detach()
    try:
        model.to(device)
    finally:
        attach()
    try:
        yield
    finally:
        detach()
        try:
            model.to(home)
        finally:
            attach()


class Spill:
    """Per-layer tensors kept in memory, or on disk under `directory` (one file each) when given."""

    def __init__(self, directory=None):
        self.dir = Path(directory) if directory is not None else None
        self._mem: dict = {}

    def put(self, key: str, obj) -> None:
        if self.dir is None:
            self._mem[key] = obj
        else:
            torch.save(obj, self.dir / f"{key}.pt")

    def pop(self, key: str, device=None):
        if self.dir is None:
            obj = self._mem.pop(key)
        else:
            f = self.dir / f"{key}.pt"
            obj = torch.load(f, map_location="cpu", weights_only=True)
            f.unlink()
        if device is not None:
            obj = _to(obj, device)
        return obj


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


# ---- gradients for taylor / obd -----------------------------------------------------------------------

def gradient_stats(model, path, layers, store, inputs: LayerInputs, input_ids, device, method: str,
                   select_fn, spill: Spill, seed: int = 0, progress: bool = True, extra=None) -> None:
    """Per-window gradients of the model's loss (see module doc) w.r.t. every selected Linear weight,
    reduced to Σ|g| (taylor) or mean g² (obd) in float32 and put in `spill` under "grad{i}"."""
    from sparserun.progress import progress_bar

    n = inputs.hidden.shape[0]
    nl = len(layers)
    lm_loss = has_lm_loss(model)
    h = inputs.hidden
    with torch.no_grad():
        for i in progress_bar(range(nl), progress=progress, desc="gradients: forward", unit="layer", leave=False):
            spill.put(f"act{i}", h.cpu() if spill.dir is not None else h)  # h is never written in place
            layer = store.load(i, device)
            _check_finite_weights(layer, f"{path}.{i}")
            out = torch.empty_like(h)
            for s in range(n):
                out[s:s + 1] = inputs.run(layer, h[s:s + 1], i, s)
            store.unload(i)
            h = out
    # gradient of each window's loss w.r.t. the last layer's output, through the final norm / head
    holder: dict = {"tuple": inputs.tuple_out}
    gout = torch.empty_like(h, dtype=torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with stubbed(model, path, layers, holder), torch.enable_grad():
        for s in range(n):
            x = h[s:s + 1].detach().clone().requires_grad_(True)
            holder["inject"] = x
            ids = input_ids[s:s + 1].to(device)
            kw = _window_kwargs(extra, s)
            if lm_loss:
                loss = model(**forward_inputs(model, ids, labels=ids, **kw)).loss
            else:
                y = _model_output(model(**forward_inputs(model, ids, **kw)))
                eps = torch.randn(y.shape, generator=gen).to(device=device, dtype=y.dtype)
                loss = (y * eps).sum()
            gout[s:s + 1] = torch.autograd.grad(loss, x)[0].float()
    del h
    for i in progress_bar(reversed(range(nl)), progress=progress, total=nl, desc="gradients: backward",
                          unit="layer", leave=False):
        layer = store.load(i, device)
        mods = select_fn(i, layer)
        weights = {name: linear_weight(m) for name, m in mods.items()}
        flags = {name: m.weight.requires_grad for name, m in mods.items()}
        for m in mods.values():
            m.weight.requires_grad_(True)
        acc = {name: torch.zeros(w.shape, dtype=torch.float32, device=device) for name, w in weights.items()}
        act = spill.pop(f"act{i}", device)
        names = list(weights)
        with torch.enable_grad():
            for s in range(n):
                x = act[s:s + 1].detach().clone().requires_grad_(True)
                out = inputs.run(layer, x, i, s)
                grads = torch.autograd.grad(out, [x] + [mods[k].weight for k in names],
                                            grad_outputs=gout[s:s + 1].to(out.dtype), allow_unused=True)
                gout[s:s + 1] = grads[0].float()
                for k, g in zip(names, grads[1:]):
                    if g is None:
                        continue
                    g = g.float() if isinstance(mods[k], nn.Linear) else g.float().t()
                    acc[k] += g.abs() if method == "taylor" else g.square()
        for k, m in mods.items():
            m.weight.requires_grad_(flags[k])
        if method == "obd":
            for k in acc:
                acc[k] /= n
        spill.put(f"grad{i}", {k: v.cpu() for k, v in acc.items()} if spill.dir is not None else acc)
        # drop this layer's statistics, last gradients and activations before the next layer arrives, or
        # they would sit next to it (two layers' worth of fp32 at the peak)
        act = acc = grads = out = x = g = None  # (not `del`: the window loop may not have bound them all)
        store.unload(i)


# ---- the layer-sequential pass ------------------------------------------------------------------------

@dataclass
class Options:
    # unstructured: the same sparsity in every output row. Default True for wanda (as in the paper), taylor
    # and obd: their scores carry a per-output-row factor (‖δ_i‖, the loss's sensitivity to output i) that
    # a layer-wide ranking turns into pruning whole rows; on MiniLM at 50% that drops the output cosine
    # from ~0.82 to ~0.43 (docs/prune_quality.md). magnitude and sparsegpt: layer-wide, as in their papers.
    per_row: bool | None = None
    balance_rows: bool = False  # blocks: the same number of kept blocks in every block-row
    blocksize: int = 128  # sparsegpt lazy column block
    percdamp: float = 0.01  # sparsegpt dampening, fraction of mean(diag H)
    seed: int = 0


class _Collector:
    """Forward hooks accumulating a Linear's input statistic over the calibration windows."""

    def __init__(self, kind: str, k: int, device):
        self.kind = kind
        self.tokens = 0
        if kind == "xnorm2":
            self.stat = torch.zeros(k, dtype=torch.float32, device=device)
        else:  # running mean of x xᵀ, as the reference SparseGPT (keeps fp32 sums from growing with tokens)
            self.stat = torch.zeros(k, k, dtype=torch.float32, device=device)

    def __call__(self, module, inp, out):
        x = inp[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        if self.kind == "xnorm2":
            self.stat += x.square().sum(0)
        else:
            self.stat *= self.tokens / (self.tokens + t)
            self.stat += (x.t() @ x) / (self.tokens + t)
        self.tokens += t


class _ErrorMeter:
    """Forward hook measuring ‖W x − W' x‖² and ‖W x‖² over calibration tokens (bias excluded): W is the
    dense weight kept aside, W' x is the pruned module's own output minus its bias."""

    def __init__(self, dense_w: torch.Tensor):
        self.dense = dense_w
        self.num = 0.0
        self.den = 0.0
        self.calls = 0

    def __call__(self, module, inp, out):
        self.calls += 1
        yd = F.linear(inp[0].detach(), self.dense).float()
        yp = out.detach().float()
        if getattr(module, "bias", None) is not None:
            yp = yp - module.bias.detach().float()
        self.num += float((yd - yp).square().sum())
        self.den += float(yd.square().sum())

    @property
    def value(self) -> float | None:
        """None when the layer never ran, or its dense output was zero on every token (0/0: its inputs were
        zero): there is no relative error to measure, and a 0 would lower the mean."""
        if self.calls == 0 or (self.den == 0 and self.num == 0):
            return None
        return math.sqrt(self.num / self.den) if self.den > 0 else math.inf


def prune_layerwise(model: nn.Module, method: str, pattern, sparsity: float, calib: CalibData, *,
                    device, store=None, skip: str | None = None, options: Options | None = None,
                    on_layer=None, keep_masks: bool = True,
                    include_lm_head: bool = False, spill_dir=None, progress: bool = True, release=None):
    """Prune every Linear in the repeated layers (see module doc), stack by stack (find_stacks: an
    encoder-decoder's encoder, then its decoder). Returns (rows, masks, info).

    store:        where layers come from: a LayerStore for a one-stack model, or a function Stack -> LayerStore
                  (default InMemoryLayers over the model's own layers)
    on_layer:     called as on_layer(prefix, layer, packed) after the layer named `prefix` (e.g.
                  "model.layers.3") is pruned and measured, before it is unloaded; packed maps the full Linear
                  name to (formats.Packed, bias or None). For the LM head: on_layer(None, None, packed)
    keep_masks:   return the bool masks (a converter turns this off: they would grow with depth)
    include_lm_head: also prune the output projection (after the layers, on the final hidden states)
    release:      called after each Linear is pruned and packed (a converter returns freed memory to the OS)
    """
    method = scores.check_method(method)
    pat = parse(pattern)
    opts = options or Options()
    per_row = opts.per_row if opts.per_row is not None else method in PER_ROW_DEFAULT
    skip_re = re.compile(skip) if skip else None
    device = torch.device(device)
    stacks = find_stacks(model)
    if store is not None and hasattr(store, "load"):
        if len(stacks) > 1:
            raise ValueError("a single LayerStore cannot serve several stacks; pass a function Stack -> LayerStore")
        one = store
        store = lambda st: one  # noqa: E731
    store_for = store or (lambda st: InMemoryLayers(st.layers))
    rows: list[dict] = []
    kept_masks: dict[str, torch.Tensor] = {}
    if include_lm_head:
        check_head(model, method)  # fail before any work if the head cannot be pruned
    # each module's own flag: model.train(flag) afterwards would also switch a submodule kept in eval mode
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    ctx = dict(method=method, pat=pat, sparsity=sparsity, opts=opts, per_row=per_row, skip_re=skip_re,
               skip=skip, device=device, calib=calib, rows=rows, kept_masks=kept_masks if keep_masks else None,
               on_layer=on_layer, release=release, spill_dir=spill_dir, progress=progress)
    try:
        extra = None  # the decoder pass of an encoder-decoder: each window's pruned encoder output
        for j, st in enumerate(stacks):
            last = j == len(stacks) - 1
            h, tuple_out = _prune_stack(model, st, stacks, store_for(st), extra, ctx)
            if not last:
                extra = _encoder_outputs(st, h, tuple_out, calib, device)
        if include_lm_head:
            st = stacks[-1]
            head_rows, head_packed = _prune_head(model, st.path, st.layers, h, calib, method, pat, sparsity, opts,
                                                  per_row, device, keep_masks, kept_masks, tuple_out, extra,
                                                  [(o.path, o.layers) for o in stacks], skip)
            rows.extend(head_rows)
            if on_layer is not None and head_packed:
                on_layer(None, None, head_packed)
    finally:
        for m, flag in was_training.items():
            m.training = flag
    paths = [st.path for st in stacks]
    total = max(1, sum(p.numel() for p in model.parameters()))
    info = {"layers_path": ", ".join(paths), "stacks": paths, "num_layers": sum(len(st.layers) for st in stacks),
            "causal_lm": is_causal_lm(model),
            "dense_outside": linears_outside(model, stacks, {r["name"] for r in rows}),
            # how much of the model the pruned layers are (embeddings and other non-Linear weights are not):
            # "50 % sparse" of 12 % of the weights is not a smaller model
            "pruned_param_fraction": round(sum(math.prod(r["shape"]) for r in rows if r["status"] == "pruned")
                                           / total, 4)}
    # weights in the stacks that no Linear holds: MoE experts outside transformers' experts contract (DBRX,
    # JetMoE, Llama 4 in transformers 5.23), convolution kernels; the report warns when they are a large share
    dense_3d = [(n, p.numel()) for n, p in model.named_parameters() if p.dim() >= 3 and in_stacks(n, stacks)]
    info["unpruned_3d_fraction"] = round(sum(k for _, k in dense_3d) / total, 4)
    info["unpruned_3d_example"] = max(dense_3d, key=lambda t: t[1])[0] if dense_3d else None
    return rows, kept_masks, info


def _prune_stack(model: nn.Module, st: Stack, stacks: list, store, extra, ctx: dict):
    """Prune one stack layer by layer; returns (its final hidden states [n, T, H], what its layers return
    besides them)."""
    from sparserun.progress import progress_bar

    method, pat, opts, device = ctx["method"], ctx["pat"], ctx["opts"], ctx["device"]
    rows, kept_masks, skip_re = ctx["rows"], ctx["kept_masks"], ctx["skip_re"]
    release, on_layer = ctx["release"], ctx["on_layer"]
    runner, rel, layers = st.runner, st.rel, st.layers
    input_ids = ctx["calib"].input_ids
    stat_kind = scores.STAT[method]
    # the other stacks, as paths relative to this stack's runner (those inside it), left off the device
    base = st.path[:len(st.path) - len(rel)]
    others = [(o.path[len(base):], o.layers) for o in stacks if o is not st and o.path.startswith(base)]

    routers = experts.router_names(model)
    expert_names = experts.expert_linear_names(model)

    def select_modules(i: int, layer: nn.Module, record: bool = False) -> dict:
        chosen = {}
        for sub, m in layer.named_modules():
            if not is_linear(m):
                continue
            name = f"{st.path}.{i}.{sub}"
            reason = (f"matches skip regex {ctx['skip']!r}" if skip_re is not None and skip_re.search(name)
                      else ROUTER_REASON if name in routers else OWN_FORWARD_REASON if own_forward(m) else None)
            if reason:
                if record:  # a layer SparseLinear cannot stand in for is dense by necessity, not by choice
                    rows.append(_row(name, m, pat, "dense" if reason == OWN_FORWARD_REASON else "skipped", reason))
                continue
            chosen[name] = m
        return chosen

    tmp = None
    try:
        with non_layers_on(runner, rel, layers, device, others):
            inputs = capture_inputs(runner, layers, input_ids, device, extra)
            record_layer_args(runner, rel, layers, store, inputs, input_ids, device, extra)
            spill = None
            if stat_kind == "grad":
                if ctx["spill_dir"] is not None:
                    tmp = tempfile.TemporaryDirectory(prefix="sparserun-grad-", dir=ctx["spill_dir"])
                spill = Spill(tmp.name if tmp is not None else None)
                gradient_stats(runner, rel, layers, store, inputs, input_ids, device, method,
                               lambda i, layer: select_modules(i, layer), spill, opts.seed, ctx["progress"],
                               extra)

        h = inputs.hidden
        n = h.shape[0]
        desc = f"prune {method} {pat}" + (f" ({st.path})" if len(stacks) > 1 else "")
        bar = progress_bar(range(len(layers)), progress=ctx["progress"], desc=desc, unit="layer")
        for i in bar:
            layer = store.load(i, device)
            mods = select_modules(i, layer, record=True)
            stats: dict = {}
            if stat_kind in ("xnorm2", "hessian") and mods:
                cols = {name: _Collector(stat_kind, linear_weight(m).shape[1], device) for name, m in mods.items()}
                handles = [m.register_forward_hook(cols[name]) for name, m in mods.items()]
                try:
                    with torch.no_grad():
                        for s in range(n):
                            inputs.run(layer, h[s:s + 1], i, s)
                finally:
                    for hd in handles:
                        hd.remove()
                stats = {name: c.stat for name, c in cols.items()}
                tokens = {name: c.tokens for name, c in cols.items()}
                del cols
            elif stat_kind == "grad" and mods:
                stats = spill.pop(f"grad{i}", device)

            if stat_kind not in ("xnorm2", "hessian") or not mods:
                tokens = {}
            packed, meters, layer_rows = {}, {}, {}
            for name, m in mods.items():
                w = linear_weight(m).detach()
                stat, note = stats.get(name), ""
                if stat is not None and not bool(stat.any()):
                    # no calibration token reached this layer (an MoE expert the router never chose): every
                    # weight would score 0 and the mask would be arbitrary; magnitude is the informed choice left
                    stat, note = None, (ZERO_GRAD_REASON if stat_kind == "grad"
                                        else ZERO_INPUT_REASON if tokens.get(name) else UNREACHED_REASON)
                try:
                    new_w, mask = _prune_one("magnitude" if note else method, w, stat, pat, ctx["sparsity"],
                                             opts, ctx["per_row"], name)
                except UnsupportedShape as e:
                    rows.append(_row(name, m, pat, "dense", str(e).split(": ", 1)[-1]))
                    continue
                stats.pop(name, None)  # free a Hessian as soon as its layer is done
                if bool(mask.all()):
                    rows.append(_row(name, m, pat, "dense", nothing_pruned_reason(pat)))
                    continue
                p = formats.pack(new_w, mask, pat, name=name)
                meters[name] = _ErrorMeter(w.clone())
                set_weight(m, new_w)
                packed[name] = (p, m.bias.detach() if m.bias is not None else None)
                row = _row(name, m, pat, "pruned", note)
                row.update(sparsity=round(1.0 - float(mask.sum()) / mask.numel(), 6), bytes_after=p.nbytes())
                layer_rows[name] = row
                if kept_masks is not None:
                    kept_masks[name] = mask.cpu()
                del w, new_w, mask, p
                if release is not None:
                    release()
            del stats

            handles = [mods[name].register_forward_hook(meters[name]) for name in meters]
            try:
                with torch.no_grad():
                    for s in range(n):  # pruned outputs become the next layer's inputs, in place
                        h[s:s + 1] = inputs.run(layer, h[s:s + 1], i, s)
            finally:
                for hd in handles:
                    hd.remove()
            for name, row in layer_rows.items():
                meter = meters[name]
                if meter.calls == 0 and name not in expert_names:
                    # never called in the model's forward: it reads the weight itself (Mamba's dt_proj), or uses
                    # the layer only on inputs calibration lacks (Longformer's global attention); packed, every
                    # read would decompress it, and nothing measured says the pruning is harmless
                    set_weight(mods[name], meter.dense)
                    packed.pop(name)
                    if kept_masks is not None:
                        kept_masks.pop(name)
                    rows.append(_row(name, mods[name], pat, "dense", NEVER_CALLED_REASON))
                    continue
                row["rel_error"] = None if meter.value is None else round(meter.value, 6)
                rows.append(row)
            meters.clear()
            if on_layer is not None:
                on_layer(f"{st.path}.{i}", layer, packed)
            packed.clear()
            store.unload(i)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return h, inputs.tuple_out


@torch.no_grad()
def _encoder_outputs(st: Stack, h: torch.Tensor, tuple_out, calib: CalibData, device):
    """Per-window keyword arguments for the decoder pass of an encoder-decoder: the pruned encoder's output
    (its stack's final hidden states `h` through what follows the stack, e.g. T5's final norm), computed once
    here so that the decoder pass never runs, or loads, the encoder's layers."""
    from transformers.modeling_outputs import BaseModelOutput

    enc, holder = st.runner, {"tuple": tuple_out}
    outs = torch.empty_like(h)
    with non_layers_on(enc, st.rel, st.layers, device), stubbed(enc, st.rel, st.layers, holder):
        for s in range(h.shape[0]):
            holder["inject"] = h[s:s + 1]
            outs[s:s + 1] = _model_output(enc(**forward_inputs(enc, calib.input_ids[s:s + 1].to(device))))
    return lambda s: {"encoder_outputs": BaseModelOutput(last_hidden_state=outs[s:s + 1])}


def linears_outside(model: nn.Module, stacks, named: set) -> list[str]:
    """Linear layers that pruning leaves alone because they are outside the repeated stacks (a pooler, a
    vision tower), not counting the output projection: the report names them, so that "N pruned" is never
    read as "the whole model"."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if is_linear(m) and m is not head and n not in named
            and not in_stacks(n, stacks)]


def _check_finite_weights(layer: nn.Module, prefix: str) -> None:
    """A NaN or inf in a source weight, named before calibration spreads it: through the gradients every layer
    gets NaN scores (taylor/obd blamed the first layer checked), and SparseGPT's update turns one inf into NaNs."""
    for n, m in layer.named_modules():
        if is_linear(m) and not m.weight.is_meta:
            check_weight_finite(linear_weight(m).detach(), f"{prefix}.{n}" if n else prefix)


def _prune_one(method, w, stat, pat, sparsity, opts: Options, per_row, name):
    check_weight_finite(w, name)
    if method == "sparsegpt":
        return sparsegpt(w, stat, pat, sparsity, blocksize=opts.blocksize, percdamp=opts.percdamp,
                         per_row=per_row, balance_rows=opts.balance_rows, name=name)
    sc = scores.score(method, w, stat)
    mask = masks_mod.select(sc, pat, sparsity, per_row=per_row, balance_rows=opts.balance_rows, name=name)
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device)), mask


def _row(name, m, pat, status, reason) -> dict:
    w = linear_weight(m)
    return {"name": name, "pattern": str(pat), "format": pat.format if status == "pruned" else "dense",
            "shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."), "status": status,
            "reason": reason, "sparsity": 0.0, "rel_error": 0.0 if status != "pruned" else None,
            "bytes_before": w.numel() * w.element_size(), "bytes_after": w.numel() * w.element_size()}


def output_projection(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the output projection (lm_head) if it can be pruned on its own, else ValueError."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no nn.Linear output projection (lm_head) to prune")
    name = next(n for n, m in model.named_modules() if m is head)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if (emb is not None and getattr(emb, "weight", None) is head.weight) or tied:
        raise ValueError(f"{name} shares its weight with the input embeddings (tie_word_embeddings): pruning "
                         f"it would prune the embeddings too; keep it dense")
    return name, head


def check_head(model: nn.Module, method: str) -> tuple[str, nn.Linear]:
    """(name, module) of the lm_head if `method` can prune it (include_lm_head=True), else ValueError."""
    if scores.STAT[scores.check_method(method)] == "grad":
        raise ValueError(f"pruning the lm_head with {method} is not supported (its gradient pass covers the "
                         f"repeated layers only); use magnitude, wanda or sparsegpt, or keep lm_head dense")
    return output_projection(model)


def _prune_head(model, path, layers, h, calib, method, pat, sparsity, opts, per_row, device, keep_masks,
                kept_masks, tuple_out: "tuple | None", extra=None, others=(), skip=None):
    """Prune the output projection on the final hidden states (the layers are stubbed out; extra and others:
    an encoder-decoder's precomputed encoder outputs and its stacks, as in _prune_stack)."""
    name, head = output_projection(model)
    if skip and re.search(skip, name):
        return [_row(name, head, pat, "skipped", f"matches skip regex {skip!r}")], {}
    kind = scores.STAT[method]
    holder: dict = {"tuple": tuple_out}
    col = _Collector(kind, head.in_features, device) if kind else None
    rows = []
    with non_layers_on(model, path, layers, device, others), stubbed(model, path, layers, holder):
        hd = head.register_forward_hook(col) if col else None
        try:
            with torch.no_grad():
                if col:
                    for s in range(h.shape[0]):
                        holder["inject"] = h[s:s + 1]
                        model(**forward_inputs(model, calib.input_ids[s:s + 1].to(device),
                                               **_window_kwargs(extra, s)))
        finally:
            if hd:
                hd.remove()
        w = head.weight.detach()
        try:
            new_w, mask = _prune_one(method, w, col.stat if col else None, pat, sparsity, opts, per_row, name)
        except UnsupportedShape as e:
            return [_row(name, head, pat, "dense", str(e).split(": ", 1)[-1])], {}
        if bool(mask.all()):
            return [_row(name, head, pat, "dense", nothing_pruned_reason(pat))], {}
        p = formats.pack(new_w, mask, pat, name=name)
        meter = _ErrorMeter(w.clone())
        set_weight(head, new_w)
        hd = head.register_forward_hook(meter)
        try:
            with torch.no_grad():
                for s in range(h.shape[0]):
                    holder["inject"] = h[s:s + 1]
                    model(**forward_inputs(model, calib.input_ids[s:s + 1].to(device), **_window_kwargs(extra, s)))
        finally:
            hd.remove()
        row = _row(name, head, pat, "pruned", "")
        row.update(sparsity=round(1.0 - float(mask.sum()) / mask.numel(), 6), bytes_after=p.nbytes(),
                   rel_error=round(meter.value, 6))
        rows.append(row)
        if keep_masks:
            kept_masks[name] = mask.cpu()
        packed = {name: (p.to("cpu"), head.bias.detach().cpu() if head.bias is not None else None)}
    return rows, packed
