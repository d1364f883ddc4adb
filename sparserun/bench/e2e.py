"""End-to-end benchmark: a Llama-3.1-8B-shaped model with random weights, dense vs 2:4 vs NxN blocks.

What runs: one `LlamaForCausalLM` built from a `LlamaConfig` directly on the GPU in bf16 (parameters are
created on the meta device and materialised one tensor at a time, so no CPU or fp32 copy of 8B parameters
ever exists). Its decoder Linears (q, k, v, o, gate, up, down of every layer) are then filled with one
*variant* at a time, layer by layer: dense `nn.Linear`, or `SparseLinear.from_packed(formats.pack(w, mask))`
with a random mask (2:4: 2 of every 4 at random; blocks: exactly round(density x blocks) blocks at random
places). The embeddings, norms and LM head stay dense and are counted in every number. Random weights are
fine for speed (no kernel's work depends on the values) and say nothing about quality.

For every (variant, batch, prompt) the same steps run, in one process, with the dense model measured first:
  prefill   the prompt through the eager model into a static KV cache (`logits_to_keep=1`, as generate does);
            `prefill_ms` is the forward alone (CUDA events), `ttft_ms` runs until the first generated token is
            on the host (prefill + LM head + argmax + copy). Median of `prefill_reps` after one warm-up.
  decode    greedy, one token per sequence per step, from the same static cache, in each *mode*:
              eager       the HF forward as is (Python + one launch per kernel)
              cudagraphs  one decode step captured by hand in a torch.cuda.CUDAGraph and replayed (inputs
                          copied into static buffers): CUDA graphs, no codegen. Not dynamo's "cudagraphs"
                          backend: that one treats parameters as graph inputs and copies all of them into
                          static buffers on every replay (measured on an H100: 2x weight memory, 21 ms/step
                          for the 8B model whatever the sparsity).
              inductor    torch.compile(mode="reduce-overhead", fullgraph=True): inductor + CUDA graphs
            `warmup` untimed steps first (they compile and capture; their wall time is `compile_s`), then
            `decode_tokens` timed steps with no host sync inside the loop (CUDA events around all of them).
            decode_tok_s = batch x steps / time; decode_ms = time per step.
The dense baseline of a (batch, prompt) is its best mode; `speedup` is a variant's best mode over it, and
`speedup_same_mode` compares within one mode; both compare rows of the same run (process) only. The best-mode
table (`--table`, the .md) prints each variant's best row beside dense's best row and divides those two, also
when `--merge` put them in from different runs (which it allows only for the same model, dtype, device,
backend and software).

Memory (CUDA): `weights_bytes` is what the model's tensors hold; `kv_bytes` the static cache;
`extra_bytes` prepared operands the runtime built on purpose (e.g. a dense copy the dispatcher decompressed
because dense was faster at prefill sizes); `peak_decode_bytes` is torch.cuda.max_memory_allocated from the
start of the decode phase (weights + cache + activations + graph pools); `peak_prefill_bytes` over prefill.
`checkpoint_bytes` is the packed checkpoint's tensor bytes, computed from packed nbytes (nothing is written).

Results: benchmarks/results/<gpu>-<date>-e2e.json, .md and .png (tokens/s vs sparsity), rewritten after every
variant so a run cut short keeps what it measured; `--merge` folds a run into the day's file (replacing rows
with the same variant/batch/prompt/mode). `--dry-run`: a tiny config on the CPU through the whole harness
(compile modes use dynamo's eager/aot_eager backends as stand-ins, no CUDA graphs); its numbers are not
GPU numbers and its files say so.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .timing import check_out_dir, environment, finish_results, markdown_table, results_stem, write_json

# Llama-3.1-8B's shapes (rope scaling left at the config default: it changes no shape and no kernel)
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, attention_bias=False,
                   mlp_bias=False)
# dry run: every dimension a multiple of 64 so 2:4, 32x32 and 64x64 all fit (k/v: 2 heads x 32 = 64)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MODES = ("eager", "cudagraphs", "inductor")
# the dry run's stand-ins: same code path (dynamo, fullgraph, static cache), no CUDA graphs on a CPU
DRY_RUN_BACKENDS = {"cudagraphs": "eager", "inductor": "aot_eager"}
BATCHES = (1, 8, 32)
PROMPTS = (128, 2048)
INIT_STD = 0.02


@dataclass(frozen=True)
class Variant:
    name: str
    pattern: str | None  # None: dense
    sparsity: float
    grouped: bool = False  # q/k/v and gate/up as one launch each (runtime/siblings.py); name ends in "+g"

    @property
    def block(self) -> int | None:
        return int(self.pattern.split("x")[0]) if self.pattern and "x" in self.pattern else None


def all_variants() -> list[Variant]:
    out = [Variant("dense", None, 0.0), Variant("2:4", "2:4", 0.5)]
    for b in (32, 64):
        for s in (0.5, 0.7, 0.9):
            out.append(Variant(f"{b}x{b}-{round(s * 100)}", f"{b}x{b}", s))
    return out


def parse_variants(spec: str | None) -> list[Variant]:
    """Comma-separated names (see all_variants; a sparse name + "+g" groups sibling projections); dense is
    always measured first, as the baseline."""
    known = {v.name: v for v in all_variants()}
    if not spec or spec == "all":
        return list(known.values())
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        base = n.removesuffix("+g")
        if n != base and base in known and known[base].pattern is not None:
            known[n] = Variant(n, known[base].pattern, known[base].sparsity, grouped=True)
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown variant(s) {', '.join(bad)}; known: {', '.join(known)}")
    return [known["dense"]] + [known[n] for n in dict.fromkeys(names) if n != "dense"]


# ---- building the model ------------------------------------------------------------------------------
def build_skeleton(config_kw: dict, device, dtype, seed: int = 0):
    """LlamaForCausalLM with its decoder Linears left on the meta device (apply_variant fills them) and every
    other parameter materialised straight on `device` in `dtype` with random values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..runtime.io import params_on_meta

    cfg = LlamaConfig(**config_kw)
    with params_on_meta():  # parameters on meta; buffers (rotary inv_freq) computed for real by __init__
        model = LlamaForCausalLM(cfg)
    model.eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    linear_names = set(decoder_linear_names(model))
    for name, p in list(model.named_parameters()):
        if name.rsplit(".", 1)[0] in linear_names:
            continue
        t = torch.empty(p.shape, device=device, dtype=dtype)
        if "norm" in name:
            t.normal_(1.0, INIT_STD, generator=gen)  # RMSNorm gains sit near 1
        else:
            t.normal_(0.0, INIT_STD, generator=gen)
        _set_param(model, name, t)
    for mod in model.modules():
        for bname, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[bname] = b.to(device)  # never cast: rotary inv_freq stays float32
    return model


def _set_param(model, name: str, t: torch.Tensor) -> None:
    prefix, _, attr = name.rpartition(".")
    mod = model.get_submodule(prefix) if prefix else model
    mod._parameters[attr] = nn.Parameter(t, requires_grad=False)


def decoder_linear_names(model) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(len(model.model.layers)) for p in PROJECTIONS]


def _replace(model, name: str, new: nn.Module) -> None:
    prefix, _, attr = name.rpartition(".")
    setattr(model.get_submodule(prefix), attr, new)


def apply_variant(model, variant: Variant, device, dtype, seed: int = 1, progress: bool = True) -> None:
    """Fill every decoder Linear with `variant`, one layer at a time: a dense random weight exists for one
    Linear at a time only, so building a sparse 8B variant never needs the dense model's memory."""
    from sparserun.progress import progress_bar

    from .. import formats
    from ..runtime.linear import SparseLinear
    from .kernels import random_block_mask, random_mask_24

    torch.manual_seed(seed)  # random_mask_* draw from the global generator
    gen = torch.Generator(device=device).manual_seed(seed)
    for name in progress_bar(decoder_linear_names(model), progress=progress, desc=f"build {variant.name}",
                             unit="linear", leave=False):
        old = model.get_submodule(name)
        n, k = old.out_features, old.in_features
        w = torch.empty(n, k, device=device, dtype=dtype).normal_(0.0, INIT_STD, generator=gen)
        if variant.pattern is None:
            new = nn.Linear(k, n, bias=False, device="meta", dtype=dtype)
            new.weight = nn.Parameter(w, requires_grad=False)
        else:
            if variant.pattern == "2:4":
                mask = random_mask_24(n, k, device)
            else:
                mask = random_block_mask(n, k, variant.block, 1.0 - variant.sparsity, device)
            new = SparseLinear.from_packed(formats.pack(w, mask, variant.pattern, name=name))
            del mask
        del w
        _replace(model, name, new)
    if variant.grouped:
        from ..runtime.siblings import group_siblings

        group_siblings(model)


def clear_variant(model) -> None:
    """Put meta placeholders back in place of the decoder Linears and free their memory."""
    for name in decoder_linear_names(model):
        old = model.get_submodule(name)
        _replace(model, name, nn.Linear(old.in_features, old.out_features, bias=False, device="meta"))
    _free()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def model_bytes(model) -> dict:
    """checkpoint bytes (packed sparse layers + every other tensor, as a packed checkpoint would hold them)
    and the decoder Linears' packed and dense bytes."""
    from ..runtime.linear import SparseLinear

    lin, lin_dense, seen = 0, 0, set()
    names = set(decoder_linear_names(model))
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, SparseLinear):
            lin += m.packed().nbytes()
            lin_dense += m.out_features * m.in_features * m.values.element_size()
        else:
            lin += _nbytes(m.weight)
            lin_dense += _nbytes(m.weight)
        for t in list(m.parameters()) + list(m.buffers()):
            seen.add(t.data_ptr())
    other = sum(_nbytes(t) for t in list(model.parameters()) + list(model.buffers())
                if t.data_ptr() not in seen and t.device.type != "meta")
    return {"checkpoint_bytes": lin + other, "linear_bytes": lin, "linear_dense_bytes": lin_dense,
            "linear_ratio": lin / lin_dense if lin_dense else None}


def prepared_bytes(model) -> int:
    """Bytes of operands the dispatcher prepared on purpose (dense copies, repacked or compressed weights)."""
    from ..runtime.siblings import running_layers

    total = 0
    for _, m in running_layers(model):  # a sibling group's fused layer holds its own prepared operands
        for attr in ("_dense_cache", "_sr_cuda", "_sr_cslt"):
            hit = getattr(m, attr, None)
            if hit:
                total += sum(_nbytes(t) for t in hit[1:] if isinstance(t, torch.Tensor))
    return total


def release_prepared(model) -> None:
    from ..runtime.siblings import running_layers

    for _, m in running_layers(model):
        for attr in ("_dense_cache", "_sr_cuda", "_sr_cslt"):
            if getattr(m, attr, None) is not None:
                setattr(m, attr, None)


def kv_cache_bytes(cfg, batch: int, max_len: int, dtype) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    esize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * head_dim * max_len * esize


def backend_choices(variant: Variant) -> list[str]:
    """What the dispatcher chose for this variant's layers (per format, shape and M bucket)."""
    from ..runtime import dispatch

    forced = dispatch.forced_backend()
    if variant.pattern is None:
        return []
    if forced != "auto":
        return [f"{forced} (forced by SPARSERUN_BACKEND)"]
    fmt = "semi24" if variant.pattern == "2:4" else "bsr"
    out = []
    for key, choice in sorted(dispatch._memo.items(), key=lambda kv: str(kv[0])):
        detail = dict(key.detail)
        if key.format == fmt and (fmt == "semi24" or detail.get("block") == variant.block and
                                  abs(detail.get("density", -1) - round(1 - variant.sparsity, 2)) < 1e-6):
            t = dispatch._memo_times.get(key) or {}
            timed = f" ({', '.join(f'{b} {ms * 1e3:.1f}' for b, ms in sorted(t.items()))} us)" if t else ""
            out.append(f"{key.n}x{key.k} M<={key.bucket}: {choice}{timed}")
    return out or ["cpu: reference (auto)"]


# ---- timing ----------------------------------------------------------------------------------------------
class _Clock:
    """CUDA events on a GPU (device time, no sync inside the timed region), perf_counter on a CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms_since(self, start) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return (time.perf_counter() - start) * 1e3


def _forward_fn(model, mode: str, dry_run: bool):
    if mode == "eager":
        return model.forward, "eager"
    if dry_run:
        bk = DRY_RUN_BACKENDS[mode]
        return torch.compile(model.forward, backend=bk, fullgraph=True), f"torch.compile(backend={bk!r}) stand-in"
    if mode == "cudagraphs":
        return _GraphStep(model), "torch.cuda.CUDAGraph of one decode step, captured by hand"
    if mode == "inductor":
        return (torch.compile(model.forward, mode="reduce-overhead", fullgraph=True),
                "torch.compile(mode='reduce-overhead', fullgraph=True)")
    raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")


class _GraphStep:
    """Drop-in for model.forward in the decode loop: the first call captures one step (static input buffers,
    static KV cache, logits in the graph's pool), every call copies its inputs in and replays.

    The dispatcher must have chosen its backends for this M already (the eager warm-up steps do that): inside
    capture nothing is timed (runtime/dispatch.py)."""

    def __init__(self, model):
        self.model = model
        self.graph = None
        self.static: dict[str, torch.Tensor] = {}
        self.logits = None

    def __call__(self, *, input_ids, past_key_values, cache_position, position_ids, use_cache=True):
        from types import SimpleNamespace

        dyn = dict(input_ids=input_ids, cache_position=cache_position, position_ids=position_ids)
        if self.graph is None:
            self.static = {k: v.clone() for k, v in dyn.items()}
            fwd = lambda: self.model(**self.static, past_key_values=past_key_values,  # noqa: E731
                                     use_cache=use_cache).logits
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # one eager step on a side stream: lazy inits happen outside capture
                fwd()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = fwd()
        for k, v in dyn.items():
            self.static[k].copy_(v)
        self.graph.replay()
        return SimpleNamespace(logits=self.logits)


def _mem_reset(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _mem_peak(cuda: bool) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if cuda else None


def measure(model, variant: Variant, batch: int, prompt: int, modes, *, decode_tokens: int, warmup: int,
            prefill_reps: int, device, dry_run: bool, seed: int = 0) -> tuple[list[dict], dict]:
    """Rows (one per mode) for one (variant, batch, prompt), and failures keyed by mode."""
    from transformers import StaticCache

    cfg = model.config
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    clock = _Clock(dev)
    dtype = model.model.embed_tokens.weight.dtype
    gen = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=dev, generator=gen)
    # after the prompt: 2 eager dispatcher warm-up steps, the mode's warm-up steps, the timed steps
    # + slack: a StaticCache advances its own on-device write counter on every executed step, and capturing
    # a graph costs one extra eager step (_GraphStep)
    max_len = prompt + 2 + warmup + decode_tokens + 8
    kv = kv_cache_bytes(cfg, batch, max_len, dtype)
    failures: dict[str, str] = {}
    # operands the dispatcher prepared for an earlier shape (e.g. a dense copy chosen at a large prefill) would
    # count in this shape's memory; dropped here, they are rebuilt on demand during the untimed warm-ups
    release_prepared(model)
    torch._dynamo.reset()
    _free()
    _mem_reset(cuda)
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    prompt_pos = torch.arange(prompt, device=dev)
    # one contiguous tensor per step, made before any timing: plain inputs for CUDA graphs to copy from
    cps = [torch.full((1,), prompt + i, device=dev, dtype=torch.long) for i in range(max_len - prompt)]
    pids = [torch.full((batch, 1), prompt + i, device=dev, dtype=torch.long) for i in range(max_len - prompt)]

    def prefill():
        # reset() zeroes the cache in place (graphs keep its addresses). Newer transformers track the write
        # position inside StaticCache and ignore cache_position, so every prefill must start from a reset.
        cache.reset()
        return model(input_ids=ids, past_key_values=cache, cache_position=prompt_pos, use_cache=True,
                     logits_to_keep=1).logits

    def step(fwd, nxt, i, mark=False):
        if mark:  # inductor's CUDA graphs: a new iteration, earlier graph outputs may be reused. Only there: the
            # call imports torch._inductor, which fails to read its templates in an ASCII (C) locale
            torch.compiler.cudagraph_mark_step_begin()
        logits = fwd(input_ids=nxt, past_key_values=cache, cache_position=cps[i], position_ids=pids[i],
                     use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    # prefill: one warm-up (tunes the dispatcher for this M), then timed repetitions
    with torch.no_grad():
        prefill()
        clock.sync()
        prefill_ms, ttft_ms = [], []
        for _ in range(prefill_reps):
            clock.sync()
            t0 = time.perf_counter()
            s = clock.start()
            logits = prefill()
            prefill_ms.append(clock.ms_since(s))
            first = logits[:, -1].argmax(-1, keepdim=True)
            first.cpu()  # the first generated token is on the host
            ttft_ms.append((time.perf_counter() - t0) * 1e3)
        del logits
    peak_prefill = _mem_peak(cuda)
    base = dict(variant=variant.name, pattern=variant.pattern or "dense", sparsity=variant.sparsity,
                block=variant.block, batch=batch, prompt=prompt, prefill_ms=statistics.median(prefill_ms),
                ttft_ms=statistics.median(ttft_ms), kv_bytes=kv, peak_prefill_bytes=peak_prefill,
                prefill_tok_s=batch * prompt / (statistics.median(prefill_ms) * 1e-3))

    rows = []
    with torch.no_grad():
        for mode in modes:
            try:
                from torch._dynamo.utils import counters

                torch._dynamo.reset()
                counters.clear()
                _free()
                first = prefill()[:, -1].argmax(-1, keepdim=True)
                # eager steps first: the dispatcher measures and caches its choice for the decode M bucket
                # outside any capture or trace (dispatch.py: "warm up eagerly before capturing")
                x = step(model.forward, first, 0)
                x = step(model.forward, x, 1)
                _mem_reset(cuda)  # the decode-phase peak starts here (the prefill's is peak_prefill_bytes)
                fwd, impl = _forward_fn(model, mode, dry_run)
                t0 = time.perf_counter()
                mark = mode == "inductor"
                for i in range(warmup):
                    x = step(fwd, x, 2 + i, mark)
                clock.sync()
                compile_s = time.perf_counter() - t0
                s = clock.start()
                for i in range(decode_tokens):
                    x = step(fwd, x, 2 + warmup + i, mark)
                ms = clock.ms_since(s)
                skips = int(sum(v for k, v in counters["inductor"].items() if "cudagraph_skips" in k))
                rows.append(dict(base, mode=mode, mode_impl=impl, decode_tokens=decode_tokens,
                                 decode_ms=ms / decode_tokens, decode_tok_s=batch * decode_tokens / (ms * 1e-3),
                                 decode_tok_s_per_seq=decode_tokens / (ms * 1e-3), compile_s=compile_s,
                                 cudagraph_skips=skips, peak_decode_bytes=_mem_peak(cuda),
                                 extra_bytes=prepared_bytes(model), backends=backend_choices(variant)))
                del fwd
            except Exception as e:  # recorded, never crashes the run: the other modes and variants still run
                failures[mode] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]
                if os.environ.get("SPARSERUN_BENCH_DEBUG"):
                    traceback.print_exc()
                _free()
    cache = None  # free the KV cache before the next shape
    torch._dynamo.reset()
    _free()
    return rows, failures


# ---- the run --------------------------------------------------------------------------------------------
def run(*, config_kw: dict | None = None, variants=None, batches=BATCHES, prompts=PROMPTS, modes=MODES,
        decode_tokens: int = 64, warmup: int = 3, prefill_reps: int = 3, device=None, dtype=torch.bfloat16,
        dry_run: bool = False, backend: str | None = None, out_dir=None, merge: bool = False,
        progress: bool = True, say=print) -> dict:
    """Measure every (variant, batch, prompt, mode); write results after each variant if out_dir is given."""
    import transformers

    config_kw = dict(config_kw or (TINY if dry_run else LLAMA_31_8B))
    variants = variants or all_variants()
    if variants[0].pattern is not None:
        variants = parse_variants(",".join(v.name for v in variants))  # dense first, always
    device = torch.device(device or ("cpu" if dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the e2e benchmark needs a CUDA GPU (or --dry-run)")
    if prefill_reps < 1 or decode_tokens < 1 or warmup < 0:
        raise ValueError("prefill_reps and decode_tokens must be at least 1, warmup at least 0")
    for what, values in (("--batches", batches), ("--prompts", prompts)):
        if not values or min(values) < 1:
            raise ValueError(f"{what} takes positive integers, got {','.join(map(str, values)) or 'none'}")
    if config_kw["num_hidden_layers"] < 1:
        raise ValueError(f"--layers must be at least 1, got {config_kw['num_hidden_layers']}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    env = environment()
    env["transformers"] = transformers.__version__
    if dry_run:
        env["dry_run"] = "CPU, tiny config, compile stand-ins without CUDA graphs: timings are not GPU numbers"
    from ..runtime.dispatch import BACKENDS, forced_backend

    if backend and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    backend_name = backend or forced_backend()

    result = {"kind": "e2e", "env": env, "config": config_kw,
              "settings": dict(dtype=str(dtype).removeprefix("torch."), device=str(device), batches=list(batches),
                               prompts=list(prompts), modes=list(modes), decode_tokens=decode_tokens,
                               warmup=warmup, prefill_reps=prefill_reps, backend=backend_name,
                               variants=[v.name for v in variants], init_std=INIT_STD),
              "rows": [], "failures": {}, "complete": False}
    run_id = uuid.uuid4().hex[:12]
    # a dry run gets its own file name, so it can never pass for (or be merged into) GPU results
    if out_dir is not None:
        check_out_dir(out_dir)
    stem = results_stem("e2e-dryrun" if dry_run else "e2e", env, out_dir) if out_dir is not None else None
    if stem is not None and merge and stem.with_suffix(".json").is_file():
        prev = json.loads(stem.with_suffix(".json").read_text())
        _check_mergeable(prev, result, stem.with_suffix(".json"))
        result["previous_runs"] = prev.get("previous_runs", []) + [prev.get("settings", {})]
        result["rows"] = prev.get("rows", [])
        result["failures"] = prev.get("failures", {})
    say(f"# e2e: {env['gpu']}  torch {env['torch']}  transformers {env['transformers']}  "
        f"{config_kw['num_hidden_layers']} layers x hidden {config_kw['hidden_size']}  "
        f"backend {backend_name}"
        + ("  DRY RUN (*: dynamo eager/aot_eager stand-ins, no CUDA graphs)" if dry_run else ""))
    # set only now, with every check above passed: the finally below puts both back
    old_backend, old_threads = os.environ.get("SPARSERUN_BACKEND"), torch.get_num_threads()
    if backend:
        os.environ["SPARSERUN_BACKEND"] = backend
    if device.type == "cpu":
        # tiny CPU ops: with several intra-op threads on a busy machine, OpenMP's waiting threads stalled
        # every step by ~100 ms (measured); one thread keeps the dry run fast and its timings stable
        torch.set_num_threads(1)
    try:
        model = build_skeleton(config_kw, device, dtype)
        for variant in variants:
            try:
                apply_variant(model, variant, device, dtype, progress=progress)
            except Exception as e:
                result["failures"][f"{variant.name}/build"] = f"{type(e).__name__}: {e}"[:400]
                clear_variant(model)
                continue
            _free()
            sizes = model_bytes(model)
            weights = sum(_nbytes(t) for t in list(model.parameters()) + list(model.buffers()))
            for batch in batches:
                for prompt in prompts:
                    try:
                        rows, fails = measure(model, variant, batch, prompt, modes, decode_tokens=decode_tokens,
                                              warmup=warmup, prefill_reps=prefill_reps, device=device,
                                              dry_run=dry_run)
                    except Exception as e:  # prefill failed (e.g. out of memory): record, go on
                        if os.environ.get("SPARSERUN_BENCH_DEBUG"):
                            traceback.print_exc()
                        rows, fails = [], {"prefill": f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]}
                        _free()
                    for r in rows:
                        r.update(sizes, weights_bytes=weights, run_id=run_id)
                        r["mem_ok"] = _mem_ok(r)
                        say(f"{variant.name:9s} b={batch:<3d} p={prompt:<5d} "
                            f"{r['mode'] + ('*' if dry_run and r['mode'] != 'eager' else ''):11s} "
                            f"decode {r['decode_tok_s']:9.1f} tok/s ({r['decode_ms']:.2f} ms/step)  "
                            f"prefill {r['prefill_ms']:.1f} ms  ttft {r['ttft_ms']:.1f} ms"
                            + (f"  peak {r['peak_decode_bytes'] / 2**30:.2f} GiB" if r["peak_decode_bytes"]
                               else ""))
                    for mode, msg in fails.items():
                        result["failures"][f"{variant.name}/b{batch}/p{prompt}/{mode}"] = msg
                        say(f"{variant.name:9s} b={batch:<3d} p={prompt:<5d} {mode:10s} FAILED {msg[:160]}")
                    key = lambda r: (r["variant"], r["batch"], r["prompt"], r["mode"])  # noqa: E731
                    new = {key(r) for r in rows}
                    result["rows"] = [r for r in result["rows"] if key(r) not in new] + rows
            clear_variant(model)
            summarize(result)
            if stem is not None:
                write(result, stem)
        result["complete"] = True
    finally:
        # which kernel tiles the tuner kept, and which it threw out (failed to run, or wrong output)
        try:
            from ..kernels import _tuning

            result["tuned_configs"] = {repr(k): v for k, v in _tuning.tuned().items()}
            result["rejected_configs"] = {repr(k): [[c, why] for c, why in v] for k, v in _tuning.rejected().items()}
        except Exception:  # no Triton: nothing was tuned
            pass
        torch.set_num_threads(old_threads)
        if backend:
            if old_backend is None:
                os.environ.pop("SPARSERUN_BACKEND", None)
            else:
                os.environ["SPARSERUN_BACKEND"] = old_backend
    summarize(result)
    if stem is not None:
        write(result, stem)
    return result


MERGE_MUST_MATCH = (("config", None), ("settings", "dtype"), ("settings", "device"), ("settings", "backend"),
                    ("settings", "init_std"), ("env", "gpu"), ("env", "torch"), ("env", "triton"),
                    ("env", "transformers"))


def _check_mergeable(prev: dict, result: dict, path: Path) -> None:
    """--merge puts rows of two runs in one table: only when they measured the same model the same way."""
    for part, field in MERGE_MUST_MATCH:
        old = prev.get(part, {}) if field is None else prev.get(part, {}).get(field)
        new = result[part] if field is None else result[part].get(field)
        if old != new:
            what = part if field is None else f"{part}.{field}"
            raise ValueError(f"--merge: {path} was measured with another {what} ({old!r}, this run {new!r}); "
                             f"merge only runs of the same model and settings, or write to another --out")


def _mem_ok(r: dict) -> bool | None:
    """Decode-phase peak within 5 % of (the model's tensors + the KV cache): activations at decode are
    small, so more than that means something (a prepared dense copy, a graph pool) holds memory."""
    if r.get("peak_decode_bytes") is None:
        return None
    return r["peak_decode_bytes"] <= 1.05 * (r["weights_bytes"] + r["kv_bytes"])


def summarize(result: dict) -> None:
    """Speedups against the dense baseline of the same run, batch and prompt (best mode; and same mode)."""
    dense: dict = {}
    for r in result["rows"]:
        if r["variant"] == "dense":
            dense.setdefault((r["run_id"], r["batch"], r["prompt"]), {})[r["mode"]] = r
    for r in result["rows"]:
        d = dense.get((r["run_id"], r["batch"], r["prompt"]))
        if not d:
            r["speedup"] = r["speedup_same_mode"] = r["prefill_speedup"] = None
            r["dense_best_mode"] = None
            continue
        best = max(d.values(), key=lambda x: x["decode_tok_s"])
        r["dense_best_mode"] = best["mode"]
        r["speedup"] = _best_tok_s(result["rows"], r) / best["decode_tok_s"]
        same = d.get(r["mode"])
        r["speedup_same_mode"] = r["decode_tok_s"] / same["decode_tok_s"] if same else None
        r["prefill_speedup"] = min(x["prefill_ms"] for x in d.values()) / r["prefill_ms"]


def _best_tok_s(rows, r) -> float:
    return max(x["decode_tok_s"] for x in rows if x["run_id"] == r["run_id"] and x["variant"] == r["variant"]
               and x["batch"] == r["batch"] and x["prompt"] == r["prompt"])


def _row_order(r: dict):
    order = {v.name: i for i, v in enumerate(all_variants())}
    return (r["prompt"], r["batch"], order.get(r["variant"], 99), MODES.index(r["mode"]) if r["mode"] in MODES
            else 99)


def best_rows(result: dict) -> list[dict]:
    """One row per (variant, batch, prompt): its best decode mode, with `speedup` and `prefill_speedup` over the
    dense row this table shows for that batch and prompt (dense's best mode). With runs merged (`--merge`, one
    model and settings), a variant's best mode and dense's best mode may come from different runs: a speedup
    against its own run's dense would then not be the ratio of the two rows printed side by side."""
    best: dict = {}
    for r in result["rows"]:
        k = (r["variant"], r["batch"], r["prompt"])
        if k not in best or r["decode_tok_s"] > best[k]["decode_tok_s"]:
            best[k] = r
    out = []
    for (variant, batch, prompt), r in best.items():
        dense = best.get(("dense", batch, prompt))
        dense_prefill = [x["prefill_ms"] for x in result["rows"]
                         if x["variant"] == "dense" and x["batch"] == batch and x["prompt"] == prompt]
        out.append(dict(r, speedup=r["decode_tok_s"] / dense["decode_tok_s"] if dense else None,
                        prefill_speedup=min(dense_prefill) / r["prefill_ms"] if dense_prefill else None,
                        dense_best_mode=dense["mode"] if dense else None))
    return sorted(out, key=_row_order)


TARGETS = [  # (variant, what, target speedup): DESIGN.md / issue 7, batch-1 decode vs dense
    ("2:4", "2:4, batch 1 decode", 1.5),
    ("64x64-90", "64x64 blocks at 90 %, batch 1 decode", 4.0),
]


def targets(result: dict) -> list[str]:
    lines = []
    for variant, what, target in TARGETS:
        rows = [r for r in best_rows(result) if r["variant"] == variant and r["batch"] == 1 and r["speedup"]]
        if not rows:
            lines.append(f"- {what}: target >= {target}x dense: **not measured**")
            continue
        for r in sorted(rows, key=lambda r: r["prompt"]):
            ok = ("dry run: no verdict" if result["env"].get("dry_run")
                  else "met" if r["speedup"] >= target else "not met")
            lines.append(f"- {what}, prompt {r['prompt']}: **{r['speedup']:.2f}x** dense tokens/s "
                         f"(target >= {target}x: {ok}; {r['mode']} vs dense {r['dense_best_mode']})")
    mem = [r for r in result["rows"] if r.get("mem_ok") is not None and r["variant"] != "dense"]
    if mem:
        bad = [r for r in mem if not r["mem_ok"]]
        lines.append(f"- decode peak memory <= 1.05 x (model tensors + KV cache): {len(mem) - len(bad)}/{len(mem)} "
                     f"sparse rows" + (f"; over in: {', '.join(sorted({r['variant'] for r in bad}))}" if bad else ""))
    else:
        lines.append("- peak memory target: not measured (no CUDA)")
    return lines


# ---- writing -----------------------------------------------------------------------------------------------
def _gib(x):
    return None if x is None else x / 2**30


def headline_table(result: dict) -> str:
    """Best mode per (variant, batch, prompt): the table for a README."""
    rows = []
    for r in best_rows(result):
        rows.append({"prompt": r["prompt"], "batch": r["batch"], "variant": r["variant"],
                     "decode tok/s": r["decode_tok_s"], "mode": r["mode"],
                     "speedup": None if r["speedup"] is None else f"{r['speedup']:.2f}x",
                     "prefill ms": r["prefill_ms"],
                     "prefill speedup": None if r["prefill_speedup"] is None else f"{r['prefill_speedup']:.2f}x",
                     "TTFT ms": r["ttft_ms"], "peak GiB": _gib(r["peak_decode_bytes"]),
                     "checkpoint GiB": _gib(r["checkpoint_bytes"])})
    return markdown_table(rows, ["prompt", "batch", "variant", "decode tok/s", "mode", "speedup", "prefill ms",
                                 "prefill speedup", "TTFT ms", "peak GiB", "checkpoint GiB"])


def markdown_lines(result: dict) -> list[str]:
    env, st, cfg = result["env"], result["settings"], result["config"]
    md = [f"# End-to-end decode benchmark on {env['gpu']}", ""]
    if env.get("dry_run"):
        md += [f"**DRY RUN** ({env['dry_run']}).", ""]
    if not result.get("complete"):
        md += ["**Incomplete**: the run stopped before every variant was measured.", ""]
    md += [f"Llama-shaped model with random weights: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
           f"MLP {cfg['intermediate_size']}, {cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV "
           f"heads, vocab {cfg['vocab_size']}; {st['dtype']}; every decoder Linear sparse, LM head and embeddings "
           f"dense (and counted). torch {env['torch']}, transformers {env.get('transformers')}, triton "
           f"{env['triton']}, CUDA {env['cuda']}, measured {env['date']}; sparse backend {st['backend']}.", "",
           f"Decode: {st['decode_tokens']} timed greedy steps after {st['warmup']} warm-up steps, static KV cache, "
           f"no host sync inside the loop; tok/s = batch x steps / time. Prefill: eager, median of "
           f"{st['prefill_reps']}; TTFT = prefill + first token on the host. Best-mode table: speedup = the row's "
           f"tok/s over the dense row's in the same table (dense's best mode"
           f"{', over the merged runs' if result.get('previous_runs') else ''}); every-mode table: "
           f"speedup_same_mode = over dense in the same mode and run (eager, cudagraphs = one decode step "
           f"captured in a CUDA graph by hand, inductor = reduce-overhead). Method: `sparserun/bench/e2e.py` "
           f"docstring.", "",
           "## Targets", "", *targets(result), "",
           "## Best mode per variant", "", headline_table(result), "",
           "## Every mode", "",
           markdown_table([dict(r, peak_decode_gib=_gib(r["peak_decode_bytes"]),
                                peak_prefill_gib=_gib(r["peak_prefill_bytes"]), extra_gib=_gib(r["extra_bytes"]),
                                kv_gib=_gib(r["kv_bytes"]), weights_gib=_gib(r["weights_bytes"]),
                                checkpoint_gib=_gib(r["checkpoint_bytes"]))
                           for r in sorted(result["rows"], key=_row_order)],
                          ["prompt", "batch", "variant", "mode", "decode_tok_s", "decode_ms", "speedup_same_mode",
                           "prefill_ms", "ttft_ms", "compile_s", "cudagraph_skips", "weights_gib", "kv_gib",
                           "extra_gib", "peak_decode_gib", "peak_prefill_gib", "mem_ok", "checkpoint_gib"])]
    choices = {r["variant"]: r["backends"] for r in result["rows"] if r.get("backends")}
    if choices:
        md += ["", "## Backends the dispatcher chose", ""]
        md += [f"- {v}: {'; '.join(c)}" for v, c in choices.items()]
    if result.get("tuned_configs"):
        md += ["", "## Kernel configs the tuner kept (key: op, N, K, M bucket, ...)", ""]
        md += [f"- `{k}`: {v}" for k, v in sorted(result["tuned_configs"].items())]
    rejected = {k: v for k, v in (result.get("rejected_configs") or {}).items() if v}
    if rejected:
        md += ["", "## Kernel configs rejected while tuning", ""]
        md += [f"- `{k}`: " + "; ".join(f"{c} ({why})" for c, why in v) for k, v in sorted(rejected.items())]
    return md  # finish_results appends the failures


def plot(result: dict, path) -> None:
    """tokens/s vs sparsity (best mode), one panel per prompt length, one line per (pattern, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = best_rows(result)
    prompts = sorted({r["prompt"] for r in rows})
    if not rows:
        return
    fig, axes = plt.subplots(2, len(prompts), figsize=(5.5 * len(prompts), 8), squeeze=False)
    for col, p in enumerate(prompts):
        top, bottom = axes[0][col], axes[1][col]
        for ci, batch in enumerate(sorted({r["batch"] for r in rows if r["prompt"] == p})):
            color = f"C{ci}"
            sel = [r for r in rows if r["prompt"] == p and r["batch"] == batch]
            dense = [r for r in sel if r["variant"] == "dense"]
            for fam, marker, ls in (("32x32", "o", "-"), ("64x64", "s", "--")):
                pts = sorted((r["sparsity"], r["decode_tok_s"], r["speedup"]) for r in sel if r["pattern"] == fam)
                if dense:
                    pts = [(0.0, dense[0]["decode_tok_s"], 1.0)] + pts
                if len(pts) > 1:
                    kw = dict(marker=marker, ls=ls, color=color, label=f"{fam}, batch {batch}")
                    top.plot([x[0] for x in pts], [x[1] for x in pts], **kw)
                    if all(x[2] for x in pts):
                        bottom.plot([x[0] for x in pts], [x[2] for x in pts], **kw)
            for r in sel:
                if r["pattern"] == "2:4":
                    kw = dict(marker="*", ms=12, ls="", color=color, label=f"2:4, batch {batch}")
                    top.plot([0.5], [r["decode_tok_s"]], **kw)
                    if r["speedup"]:
                        bottom.plot([0.5], [r["speedup"]], **kw)
        top.set_yscale("log")
        top.set_title(f"prompt {p}: decode tokens/s (best mode)", fontsize=9)
        top.set_xlabel("sparsity of the decoder Linears")
        top.set_ylabel("tokens/s (batch total)")
        if top.get_legend_handles_labels()[0]:
            top.legend(fontsize=6)
        dd = [0.5, 0.7, 0.9]
        bottom.axhline(1.0, color="k", lw=0.8)
        bottom.set_title(f"prompt {p}: speedup over the best dense mode", fontsize=9)
        bottom.set_xlabel("sparsity of the decoder Linears")
        bottom.set_ylabel("x dense tokens/s")
        bottom.plot(dd, [1 / (1 - s) for s in dd], "g--", lw=0.8, label="1/density (decoder Linear bytes only)")
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend(fontsize=6)
    env = result["env"]
    fig.suptitle(f"sparserun end to end, {result['settings']['dtype']} - {env['gpu']}"
                 + (" - DRY RUN (CPU, not GPU numbers)" if env.get("dry_run") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict, stem: Path) -> None:
    """JSON first (the numbers), then markdown and PNG; a plotting error is printed, never loses results."""
    write_json(stem.with_suffix(".json"), result)
    finish_results(stem, markdown_lines(result), result, plot)


def latest_results(out_dir="benchmarks/results") -> Path | None:
    """The newest non-dry-run e2e results file (by the date in its name, then modification time)."""
    files = [p for p in Path(out_dir).glob("*-e2e.json")]
    return max(files, key=lambda p: (p.stem[-14:-4], p.stat().st_mtime)) if files else None


# ---- command line --------------------------------------------------------------------------------------------
def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {s!r}") from None


def _add_args(p) -> None:
    p.add_argument("--variants", default="all",
                   help="comma-separated: dense, 2:4, 32x32-50/70/90, 64x64-50/70/90, and any sparse one + \"+g\" "
                        "(q/k/v and gate/up as one launch each); dense always runs")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--prompts", default=None, help="comma-separated prompt lengths (default 128,2048)")
    p.add_argument("--modes", default=None, help=f"comma-separated, of {', '.join(MODES)} (default: all)")
    p.add_argument("--decode-tokens", type=int, default=None, help="timed decode steps (default 64)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps per mode (compile + capture)")
    p.add_argument("--prefill-reps", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quicker, smaller model)")
    p.add_argument("--backend", default=None, help="force SPARSERUN_BACKEND (default: auto; dry run: reference)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--merge", action="store_true",
                   help="fold this run into the day's results file (rows with the same key are replaced)")
    p.add_argument("--table", nargs="?", const="latest", default=None, metavar="JSON",
                   help="print the best-mode table of a results file (default: the latest in --out) and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: a tiny config on the CPU through the whole harness (not GPU numbers)")


def run_cli(a) -> int:
    if a.table:
        path = latest_results(a.out) if a.table == "latest" else Path(a.table)
        if path is None or not path.is_file():
            raise FileNotFoundError(f"no e2e results file {'in ' + a.out if a.table == 'latest' else a.table}"
                                    + (" (dry runs are never picked as the latest: give the file)"
                                       if a.table == "latest" else ""))
        res = json.loads(path.read_text())
        dry = f"  DRY RUN ({res['env']['dry_run']})" if res["env"].get("dry_run") else ""
        print(f"{res['env']['gpu']}, {res['settings']['dtype']}, {res['env']['date'][:10]} ({path.name}){dry}\n")
        print(headline_table(res))
        return 0
    modes = tuple(a.modes.split(",")) if a.modes else MODES
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # a forced triton backend runs in the interpreter
        cfg = dict(TINY)
        batches, prompts = _ints(a.batches) if a.batches else (1, 2), _ints(a.prompts) if a.prompts else (16,)
        variants = parse_variants(a.variants if a.variants != "all" else "dense,2:4,32x32-50,64x64-90")
        kw = dict(decode_tokens=4 if a.decode_tokens is None else a.decode_tokens, warmup=min(a.warmup, 2),
                  prefill_reps=min(a.prefill_reps, 2), dtype=torch.float32, dry_run=True,
                  backend=a.backend or "reference")
    else:
        if not torch.cuda.is_available():
            print("error: the e2e benchmark needs a CUDA GPU (use --dry-run to check the harness on a CPU)",
                  file=sys.stderr)
            return 1
        cfg = dict(LLAMA_31_8B)
        batches, prompts = _ints(a.batches) if a.batches else BATCHES, _ints(a.prompts) if a.prompts else PROMPTS
        variants = parse_variants(a.variants)
        kw = dict(decode_tokens=64 if a.decode_tokens is None else a.decode_tokens, warmup=a.warmup,
                  prefill_reps=a.prefill_reps, dtype=torch.bfloat16, backend=a.backend)
    if a.layers is not None:
        cfg["num_hidden_layers"] = a.layers
    res = run(config_kw=cfg, variants=variants, batches=batches, prompts=prompts, modes=modes, out_dir=a.out,
              merge=a.merge, **kw)
    return 0 if res["rows"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _add_args(ap)
    return run_cli(ap.parse_args(argv))


def add_bench_e2e(bsub) -> None:
    """`sparserun bench e2e`: the same options as benchmarks/bench_e2e.py."""
    p = bsub.add_parser("e2e", help="end-to-end decode benchmark, Llama-3.1-8B shapes (writes benchmarks/results)",
                        description=__doc__.splitlines()[0])
    _add_args(p)
    p.set_defaults(func=run_cli)
