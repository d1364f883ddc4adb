"""save(model, out_dir) and load(dir) for models holding SparseLinear layers.

save writes a packed checkpoint directory (sparserun/checkpoint.py, docs/format.md): SparseLinear layers as
their packed tensors plus a manifest record, every other state_dict entry as a plain tensor. A tensor that
appears under two names (tied embeddings, a module reachable by two paths) is stored once and the second name
recorded as an alias, because safetensors refuses shared storage and the tie must survive the round trip.

load builds the model from config.json with its parameters on the meta device, swaps the recorded layers for
SparseLinear skeletons, and assigns the tensors read from the shards straight to the target device and dtype:
no dense copy of a sparse layer is ever made, and no random initialisation of the dense model runs.
Buffers that are not in a state_dict (non-persistent: rotary `inv_freq`, BERT `position_ids`) cannot come from
the checkpoint; building with only *parameters* on meta (buffers are computed normally, on the CPU, by the
model's own __init__) keeps their values right for any architecture without knowing how each one is computed.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
from pathlib import Path

import torch
import torch.nn as nn

from .. import _warn, checkpoint as ckpt, formats
from ..checkpoint import CheckpointError, CheckpointReader, CheckpointWriter, DEFAULT_SHARD_BYTES
from . import experts
from .linear import SparseLinear, _buffer_shapes, guard_save_pretrained, is_linear, linear_shape, unwrap


# ---- save -----------------------------------------------------------------------------------------------

def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


def save(model: nn.Module, out_dir, overwrite: bool = False, source_dir=None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool | None = None, tokenizer_dir=None,
         extra: dict | None = None) -> Path:
    """Write `model` as a packed checkpoint directory at `out_dir`; return its path.

    source_dir: the model's original directory: its config.json, generation config and tokenizer files are
                copied unchanged (it is only read). Without it, or when its config.json no longer fits the
                model's shapes (a resized vocabulary), model.config is written as config.json.
    overwrite:  replace an existing non-empty out_dir (otherwise that is an error).
    tokenizer_dir: copy the tokenizer files from here instead of source_dir (the tokenizer actually used).
    extra:      more JSON-serialisable provenance for the manifest (e.g. how the model was pruned and trained).
    """
    from sparserun.progress import progress_bar

    model = unwrap(model)
    config = getattr(model, "config", None)
    if source_dir is None and config is None:
        raise CheckpointError("cannot save: the model has no .config and no source_dir was given "
                              "(a checkpoint needs a config.json to be loadable)")
    if config is not None and hasattr(config, "to_json_file"):
        config = copy.deepcopy(config)
        if not getattr(config, "architectures", None):
            config.architectures = [type(model).__name__]
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(model, "can_generate") and not model.can_generate():
        gen = None
    sparse = {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    if not sparse:
        # sparserun.prune leaves masked *dense* weights: saved as they are, zeros and all, nothing is smaller
        _warn(f"{type(model).__name__} has no sparse layers, so {out_dir} is a dense checkpoint, no smaller "
                      f"than the source; after sparserun.prune, pack the layers first with "
                      f"sparserun.sparsify_(model, pattern, masks=report.masks)", stacklevel=1)
    owner: dict[str, str] = {}  # state_dict key -> sparse layer name (its packed roles and bias)
    for name, m in sparse.items():
        roles = _buffer_shapes(m.format, m.out_features, m.in_features, m.block, m.values.shape[0])
        for role in list(roles) + ["bias"]:
            owner[f"{name}.{role}"] = name

    extra = {**(extra or {}), "architecture": type(model).__name__}
    if getattr(config, "model_type", None):
        extra["model_type"] = config.model_type
    source = str(source_dir) if source_dir is not None else (getattr(config, "_name_or_path", None) or None)
    if source_dir is None and source and Path(source).is_dir() and tokenizer_dir is None:
        from ..generate import has_tokenizer

        if has_tokenizer(Path(source)):  # OUT would have no tokenizer, and generate/eval on it would stop
            _warn(f"no source_dir given: {out_dir} gets no tokenizer files; pass source_dir={source!r} "
                          f"(the directory the model was loaded from) to copy them", stacklevel=1)
    sd = model.state_dict()
    stale = source_dir is not None and config is not None and _config_is_stale(Path(source_dir), model, sd, sparse)
    seen: dict = {}
    written_layers: set[str] = set()
    with CheckpointWriter(out_dir, source_dir=source_dir, config=config, generation_config=gen,
                          overwrite=overwrite, max_shard_bytes=max_shard_bytes, source=source, extra=extra,
                          prefer_config=stale, tokenizer_dir=tokenizer_dir) as w:
        for key, t in progress_bar(sd.items(), progress=progress, desc="save", unit="tensor", leave=False):
            layer = owner.get(key)
            if layer in written_layers:
                continue  # written with its layer
            if t.numel():  # empty tensors share data_ptr 0 without sharing anything
                skey = _storage_key(t)
                if skey in seen:
                    w.add_alias(key, seen[skey])
                    continue
                seen[skey] = key
            if layer is None:
                w.add_tensor(key, t)
            elif layer not in written_layers:
                m = sparse[layer]
                w.add_layer(layer, m.packed(), bias=m.bias, validate=True)
                written_layers.add(layer)
                for role, tname in w.layers[-1]["tensors"].items():
                    # later names of these tensors (the same module under another path) become aliases
                    seen.setdefault(_storage_key(getattr(m, role)), tname)
                if m.bias is not None and m.bias.numel():
                    seen.setdefault(_storage_key(m.bias.detach()), f"{layer}.bias")
    return w.out  # absolute: a relative OUT such as "." no longer names it once it has been replaced


def _config_is_stale(source_dir: Path, model: nn.Module, sd: dict, sparse: dict) -> bool:
    """Does source_dir's config.json build tensors of other shapes than the model holds (its vocabulary was
    resized, layers were cut)? Then copying it would write a checkpoint that cannot load."""
    if not (source_dir / ckpt.CONFIG).is_file():
        return False
    from ..convert import build_skeleton

    try:
        skeleton = build_skeleton(ckpt.read_hf_config(source_dir))
    except Exception:  # a config transformers cannot build is the writer's to report, not a shape question
        return False
    want = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    have = {k: tuple(t.shape) for k, t in sd.items()}
    for name, m in sparse.items():  # a packed layer against the skeleton's Linear (or Conv1D), as [out, in]
        try:
            want[f"{name}.weight"] = linear_shape(skeleton.get_submodule(name))
        except (AttributeError, TypeError):  # not in the skeleton (unrolled MoE experts): nothing to compare
            continue
        have[f"{name}.weight"] = (m.out_features, m.in_features)
    return any(k in have and have[k] != shape for k, shape in want.items())


# ---- load -----------------------------------------------------------------------------------------------

_meta_lock = threading.Lock()
_meta_users = 0  # threads inside params_on_meta: the patch is installed by the first, removed by the last
_meta_orig = None
_meta_here = threading.local()  # .depth: this thread is building a skeleton


@contextlib.contextmanager
def params_on_meta():
    """Build modules with every *parameter* on the meta device and every buffer real (on the CPU).

    Parameters are replaced by the checkpoint's tensors, so allocating or initialising them would be wasted
    (and for a large model would not fit); buffers are small and some are not in any checkpoint
    (non-persistent ones), so the model's own __init__ must compute them. Same idea as accelerate's
    init_empty_weights(include_buffers=False), without the dependency. The patch of register_parameter is
    process-wide, so it acts only for the thread inside this block: a model another thread builds meanwhile
    (a server loading while it saves) keeps real parameters.
    """
    global _meta_users, _meta_orig
    with _meta_lock:
        if _meta_users == 0:
            orig = _meta_orig = nn.Module.register_parameter

            def register_parameter(module, name, param):
                orig(module, name, param)
                if getattr(_meta_here, "depth", 0) and param is not None and param.device.type != "meta":
                    p = module._parameters[name]
                    kwargs = dict(p.__dict__)
                    kwargs["requires_grad"] = p.requires_grad
                    module._parameters[name] = type(p)(p.to("meta"), **kwargs)

            nn.Module.register_parameter = register_parameter
        _meta_users += 1
    _meta_here.depth = getattr(_meta_here, "depth", 0) + 1
    try:
        yield
    finally:
        _meta_here.depth -= 1
        with _meta_lock:
            _meta_users -= 1
            if _meta_users == 0:
                nn.Module.register_parameter = _meta_orig


def _model_class(config, manifest: dict):
    import transformers

    names = [manifest.get("architecture")] + list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None) if name else None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    return None


def _build(config, manifest: dict, model_class=None) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    cls = model_class or _model_class(config, manifest)
    with params_on_meta():
        if cls is not None:
            return cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
        # no usable `architectures`: a causal LM if transformers knows one for this config, else the base model
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    prefix, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        raise CheckpointError(f"alias {name}: the model has no module {prefix}") from None
    old = mod._parameters.get(attr, mod._buffers.get(attr))
    if old is not None and (old.shape != value.shape or old.dtype.is_floating_point != value.is_floating_point()):
        # the skeleton's own tensor (on meta) says what the model expects there
        raise CheckpointError(f"alias {name}: the model expects {list(old.shape)} there, the aliased tensor is "
                              f"{value.dtype} {list(value.shape)}")
    if attr in mod._parameters:
        mod._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(
            value, requires_grad=value.is_floating_point())
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise CheckpointError(f"alias {name} is neither a parameter nor a buffer of the model")


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    prefix, _, attr = name.rpartition(".")
    mod = model.get_submodule(prefix) if prefix else model
    if attr in mod._parameters:
        return mod._parameters[attr]
    return mod._buffers[attr]


def _usable_device(device) -> torch.device:
    """`device` as a torch.device, refused here with the reason rather than by torch mid-load (an
    AssertionError from a CPU build, an invalid ordinal from a CUDA call)."""
    try:
        dev = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"load(device={device!r}): unknown device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"load(device={str(dev)!r}): use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"load(device={str(dev)!r}): CUDA is not available ({why}, torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"load(device={str(dev)!r}): only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def _read_generation_config(path, model: nn.Module) -> None:
    """The checkpoint's generation_config.json (copied from the source), as from_pretrained reads it: it may name
    end-of-turn tokens config.json's eos_token_id does not (Llama-3-Instruct, Qwen2-Instruct), so without it
    generate() ran past them to max_new_tokens; also the model's default sampling settings."""
    f = Path(path) / "generation_config.json"
    if not f.is_file() or getattr(model, "generation_config", None) is None:
        return
    from transformers import GenerationConfig

    try:
        gc = GenerationConfig.from_pretrained(str(path))
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            # GenerationConfig takes anything here; generate() failed on a string deep inside, naming no file
            v = getattr(gc, attr, None)
            ids = v if isinstance(v, list) else [] if v is None else [v]
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"{attr} {v!r} is not a token id")
        model.generation_config = gc
    except (OSError, ValueError, TypeError) as e:  # malformed JSON, a list, values GenerationConfig refuses
        # as from_pretrained does: the file is the source's, copied unchanged; keep config.json's settings
        _warn(f"{f} ignored, not a valid generation config ({' '.join(str(e).split())[:160]}); "
                      f"generation uses config.json's settings", stacklevel=2)


def load(path, device=None, dtype: torch.dtype | None = None, *, verify: bool = True, model_class=None,
         progress: bool | None = None, group_siblings: bool | None = None) -> nn.Module:
    """Load a packed checkpoint directory as a model (eval mode) on `device`.

    dtype:       cast floating tensors (weights, biases, norms) to it; index/metadata tensors keep theirs.
    verify:      check shard sha256 against the manifest first (reads every shard once).
    model_class: override the class named in the manifest / config.json `architectures` (a class, or a
                 transformers class name).
    group_siblings: run q/k/v and gate/up as one launch each (runtime/siblings.py). Default: the
                 SPARSERUN_GROUP_SIBLINGS environment variable ("1" = on), else off until measured on a GPU.
    """
    from sparserun.progress import progress_bar

    if isinstance(dtype, str):
        dtype = ckpt.dtype_from_name(dtype)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in formats.common.SUPPORTED_DTYPES):
        # float64 loaded but could not be saved again; float8 failed in the first forward
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    device = _usable_device(device)
    for what, flag in (("verify", verify), ("group_siblings", group_siblings)):
        if flag is not None and not isinstance(flag, bool):  # "no" is true
            raise TypeError(f"load({what}=...) must be True or False, got {flag!r}")
    if isinstance(model_class, str):  # a transformers class name, as config.json's `architectures` holds them
        import transformers

        model_class = getattr(transformers, model_class, None) or model_class
    if model_class is not None and not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise TypeError(f"model_class must be an nn.Module class (or a transformers class name), got {model_class!r}")
    reader = CheckpointReader(path, verify=verify)
    config = ckpt.read_hf_config(path)
    try:
        model = _build(config, reader.manifest, model_class)
    except (RuntimeError, ValueError, TypeError, AttributeError) as e:
        # a size no allocation can hold (vocab_size 1e12), a negative one, an architecture the config does not
        # fit: the model's constructor says what, config.json is where
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{Path(path) / ckpt.CONFIG}: cannot build the model it describes: {first}") from e
    _read_generation_config(path, model)
    # MoE experts the checkpoint stores per expert (packed or pruned): unroll them to match (runtime/experts.py)
    experts.unroll_stored(model, list(reader.tensor_map) + list(reader.aliases))

    # Swap recorded layers for SparseLinear skeletons (meta), in every place that holds the old module.
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent.named_children():
            holders.setdefault(id(child), []).append((parent, attr))
    for rec in reader.layers:
        name, (n, k) = rec["name"], rec["shape"]
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"layer {name} recorded in {ckpt.MANIFEST} does not exist in "
                                  f"{type(model).__name__}") from None
        # a Conv1D (GPT-2) is replaced too: its packed weight was stored as [out, in] like any other
        if not (is_linear(old) or isinstance(old, SparseLinear)) or linear_shape(old) != (n, k):
            raise CheckpointError(f"layer {name}: the model has {old!r} there, the checkpoint records a "
                                  f"{n}x{k} linear layer")
        new = SparseLinear(k, n, rec["format"], bias=rec.get("bias") is not None, pattern=rec["pattern"],
                           block=rec.get("block"), nnz=rec.get("nnz"), device="meta",
                           dtype=dtype or ckpt.dtype_from_name(rec["dtype"]))
        for parent, attr in holders.get(id(old), []):
            setattr(parent, attr, new)

    sd = {}
    for name in progress_bar(reader.tensor_map, progress=progress, desc="load", unit="tensor", leave=False):
        sd[name] = reader.get_tensor(name, device=device, dtype=dtype)
    reader.close()
    try:
        result = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # torch lists every size mismatch over many lines
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), None)
        if first is None:
            raise
        raise CheckpointError(f"{Path(path) / ckpt.CONFIG} does not describe the stored tensors: {first}") from None
    del sd
    for rec in reader.layers:
        # the kernels and unpack address memory with the index tensors, and the sha256 that vouches for them
        # sits in the same manifest: a damaged or hostile index must be an error here, not a write outside
        # a buffer on the GPU (values are not scanned: a NaN shows in the outputs)
        try:
            formats.check_indices(model.get_submodule(rec["name"]).packed(), rec["name"])
        except ValueError as e:
            raise ckpt.TensorMismatch(f"{Path(path)}: {e}") from None
    for alias, target in reader.aliases.items():
        _set_tensor(model, alias, _get_tensor(model, target))
    missing = [k for k in result.missing_keys if k not in reader.aliases]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensor(s) the model needs: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if result.unexpected_keys:
        u = result.unexpected_keys
        raise CheckpointError(f"checkpoint {path} has {len(u)} tensor(s) {type(model).__name__} does not: "
                              f"{', '.join(u[:5])}{' ...' if len(u) > 5 else ''}")

    # Non-persistent buffers were computed on the CPU by __init__; move them (never cast: e.g. rotary
    # inv_freq is kept in float32 on purpose) to the target device.
    for mod in model.modules():
        for bname, b in list(mod._buffers.items()):
            if b is not None and b.device != device and b.device.type != "meta":
                mod._buffers[bname] = b.to(device)
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise CheckpointError(f"after loading, {len(on_meta)} tensor(s) have no data: "
                              f"{', '.join(on_meta[:5])}{' ...' if len(on_meta) > 5 else ''}")
    if hasattr(model, "config"):
        # config.json is the source's, copied unchanged: its dtype may not be what was stored (convert --dtype)
        # or loaded; the model's config says what the model now holds
        model.config.dtype = dtype if dtype is not None else getattr(model, "dtype", model.config.dtype)
    guard_save_pretrained(model)
    if group_siblings is None:
        group_siblings = os.environ.get("SPARSERUN_GROUP_SIBLINGS", "0").strip() == "1"
    if group_siblings:
        from .siblings import group_siblings as _group

        _group(model)
    model.eval()
    return model
