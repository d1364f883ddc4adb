"""Offline conversion: Hugging Face model directory -> pruned, packed checkpoint directory.

    sparserun convert SRC OUT --method sparsegpt --pattern 2:4

Streaming, so memory does not grow with depth (docs/convert_memory.md):

  * the model is built from config.json with every *parameter* on the meta device (no weights allocated)
  * the tensors outside the repeated layers (embeddings, final norm, lm_head) are read from SRC's weights files
  * decoder layer i is read from SRC (safetensors or pytorch_model.bin, memory-mapped only while it is read),
    moved to the compute device, pruned (prune/calibrate.py: layer-sequential, its inputs are the pruned layer
    i-1's outputs), packed, handed to the CheckpointWriter (which writes a shard whenever `max_shard_bytes`
    have gathered), and its tensors are put back on meta
  * taylor / obd first run a gradient pass over the same stream; its saved layer inputs and per-layer
    statistics are spilled to a temporary directory next to OUT, never held for all layers at once

Peak memory ≈ one decoder layer (plus its dense copy for the error measurement and its packed form)
+ everything outside the layers + calibration activations + pruning statistics + one shard buffer.
That estimate is checked against the free memory of the compute device (and of the host) before any
weight is read, so an impossible run fails in a second, not after an hour.

OUT is written through checkpoint.CheckpointWriter: a temp directory next to OUT, renamed into place only
when everything (shards, manifest, copied config/tokenizer files, report.json) is complete. An exception,
Ctrl-C, or (from the CLI) SIGTERM or SIGHUP removes the temp directory, so OUT never exists half-written.
SRC is only ever read.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import (DEFAULT_SHARD_BYTES, CheckpointError, CheckpointWriter, _is_within, check_output_dir,
                         linked_into, read_hf_config, source_files)
from .prune import calibrate
from .prune.api import PruneReport, check_args, human_bytes, load_calibration
from .prune.sparsegpt import check_representable
from .runtime import experts

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_dtype(dtype, error=ValueError):
    """A name from DTYPES as its torch dtype (a torch.dtype or None passes through); `error` names the valid
    ones. Shared by convert, eval and finetune so their --dtype accepts and rejects the same names."""
    if not isinstance(dtype, str):
        if dtype is not None and dtype not in DTYPES.values():  # float64 or int8 failed after the weights were read
            raise error(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise error(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device, error=ValueError) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise error(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # meta holds no data: the model's weights would be lost there
        raise error(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error("--device cuda requested but CUDA is not available (use --device cpu)")
    return device


class ConvertError(ValueError):
    """The conversion cannot start or cannot finish (one line naming the file, layer or value)."""


class NotEnoughMemory(ConvertError):
    """The estimated peak memory exceeds what the device has free."""


class NotEnoughDisk(ConvertError):
    """The estimated output (and gradient spill) exceeds the free space where OUT is written."""


# ---- the source directory -----------------------------------------------------------------------------

class SourceTensors:
    """Names, shapes and dtypes of a HF directory's weights, and lazy reads of groups of tensors. The weights
    are safetensors (model.safetensors, or shards named by model.safetensors.index.json) or, for the many
    older checkpoints saved before safetensors, PyTorch's pytorch_model.bin (or its shards): zip-format files
    that torch.load memory-maps, so neither is read whole."""

    def __init__(self, src: Path):
        self.src = src
        self.info: dict[str, tuple[tuple, torch.dtype]] = {}
        owner = {}
        for f in weight_files(src):
            if not f.is_file():
                raise ConvertError(f"shard {f} listed in the index is missing")
            for k, (shape, dt) in _tensor_infos(f).items():
                self.info[k] = (shape, dt)
                owner[k] = f
        self.file_of = owner

    def nbytes(self, key: str, dtype: torch.dtype | None = None) -> int:
        shape, dt = self.info[key]
        n = 1
        for s in shape:
            n *= s
        if dtype is not None and dt.is_floating_point:
            dt = dtype
        return n * torch.empty((), dtype=dt).element_size()

    def nbytes_of(self, source, dtype: torch.dtype | None = None) -> int:
        """Bytes of a keymap value: one tensor name, or a tuple of names stored as one tensor (match_keys)."""
        return sum(self.nbytes(k, dtype) for k in (source if isinstance(source, tuple) else (source,)))

    def read_mapped(self, keymap: dict, device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{model key: tensor} for a keymap {model key: tensor name, or a tuple of names to concatenate along
        dim 0 (one expert's gate and up weights stored apart)}."""
        names = [n for v in keymap.values() for n in (v if isinstance(v, tuple) else (v,))]
        got = self.read(names, device=device, dtype=dtype)
        out = {}
        for k, v in keymap.items():
            out[k] = torch.cat([got.pop(n) for n in v]) if isinstance(v, tuple) else got.pop(v)
        return out

    def read(self, keys, device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read `keys` (grouped by file; each file is mapped only for the duration of this call)."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with _mapped(f) as get:
                for k in ks:
                    t = get(k)  # a view of the file mapping, nothing read yet
                    # always a private copy: a view would keep the whole file mapped after this call,
                    # and writing a pruned weight into it would turn its pages into hidden private copies
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        out[k] = t.to(device=device, dtype=dtype)
                    else:
                        out[k] = t.to(device, copy=True)
        return out

    def floating_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the bytes (a bf16 model may keep its norms or head in fp32)."""
        by: dict[torch.dtype, int] = {}
        for key, (shape, dt) in self.info.items():
            if dt.is_floating_point:
                by[dt] = by.get(dt, 0) + self.nbytes(key)
        return max(by, key=by.get) if by else torch.float32


def stored_dtype(config, src: SourceTensors) -> torch.dtype:
    """The dtype OUT is written in by default: config.json's (what from_pretrained loads a model in), unless it
    is wider than the one most of the stored bytes have: a float16 checkpoint whose config says float32 would
    come out twice its size with nothing gained (an explicit --dtype still does what it says)."""
    stored = src.floating_dtype()
    # transformers 5 calls it dtype (reading the old name warns that it is deprecated); 4.x only torch_dtype
    dt = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    if not (isinstance(dt, torch.dtype) and dt.is_floating_point):
        return stored
    # (weights stored in a dtype a checkpoint cannot hold, float8 say, are written in config.json's)
    narrower = stored in (torch.float16, torch.bfloat16, torch.float32) and stored.itemsize < dt.itemsize
    return stored if narrower else dt


def _listed_files(src: Path) -> dict[str, Path] | Path:
    """{tensor name: shard} from an index, or the one weights file; safetensors preferred where both exist."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (src / index).is_file():
            try:
                wm = json.loads((src / index).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConvertError(f"{src / index}: not a valid index of weight shards ({e})") from None
            if not isinstance(wm, dict) or not all(isinstance(f, str) for f in wm.values()):
                raise ConvertError(f"{src / index}: \"weight_map\" must map tensor names to shard file names")
            return {k: src / f for k, f in wm.items()}
        if (src / single).is_file():
            return src / single
    raise ConvertError(f"{src} has no weights: none of model.safetensors, pytorch_model.bin or their "
                       f"*.index.json")


def weight_files(src: Path) -> list[Path]:
    """The files SRC's weights are read from (what a dense checkpoint's size on disk is)."""
    listed = _listed_files(Path(src))
    return sorted(set(listed.values())) if isinstance(listed, dict) else [listed]


def _is_safetensors(f: Path) -> bool:
    return f.suffix == ".safetensors"


def _torch_load_mapped(f: Path) -> dict:
    """A pytorch_model.bin's state dict, memory-mapped (weights_only: a checkpoint's pickle runs no code)."""
    import pickle

    try:
        sd = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # a legacy (pre-zip) file cannot be mapped; a pickle of objects is refused
        if isinstance(e, pickle.UnpicklingError):
            why = "it pickles objects other than tensors, which are not unpickled here: they could run code"
        else:
            why = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split("\n")[0] or type(e).__name__
        raise ConvertError(f"cannot read {f} as a memory-mapped PyTorch state dict ({why}): load the model "
                           f"with from_pretrained and save_pretrained it again (it writes safetensors)") from None
    if not isinstance(sd, dict):
        raise ConvertError(f"{f} holds a {type(sd).__name__}, not a state dict of tensors")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


@contextlib.contextmanager
def _mapped(f: Path):
    """get(name) -> tensor viewing file f's mapping, valid inside the with block."""
    if _is_safetensors(f):
        from safetensors import safe_open

        with safe_open(str(f), framework="pt", device="cpu") as h:
            yield h.get_tensor
    else:
        sd = _torch_load_mapped(f)
        yield sd.__getitem__
        del sd


def _tensor_infos(f: Path) -> dict[str, tuple[tuple, torch.dtype]]:
    """{name: (shape, dtype)} of one weights file, read from its header (nothing else is read)."""
    if not _is_safetensors(f):
        return {k: (tuple(t.shape), t.dtype) for k, t in _torch_load_mapped(f).items()}
    from safetensors import safe_open

    try:  # safetensors reports a file it may not open as "No such file or directory"
        with open(f, "rb"):
            pass
    except OSError as e:
        raise ConvertError(f"cannot read {f}: {e.strerror}") from None
    out = {}
    try:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                out[k] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
    except ConvertError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ConvertError(f"cannot read safetensors file {f}: {e}") from None
    return out


def _st_dtype(code: str) -> torch.dtype:
    from .checkpoint import _ST_DTYPES

    try:
        return _ST_DTYPES[code]
    except KeyError:
        raise ConvertError(f"unsupported safetensors dtype {code!r}") from None


def _model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    return None


def build_skeleton(config) -> nn.Module:
    """The model with parameters on meta and buffers computed normally (see runtime.io.params_on_meta)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from .runtime.io import params_on_meta

    cls = _model_class(config)
    with params_on_meta():
        if cls is not None:
            model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
        else:
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
    return model.eval()


def _transformers_mapping(model: nn.Module) -> tuple[list, list]:
    """(renamings, converters) of the key mapping transformers >= 5 applies when it loads this model: it
    saves some models under older names (GPT-NeoX's `embed_out` for `lm_head`) and renames them at load time,
    and merges others (Mixtral's per-expert weights into one 3-D tensor). ([], []) on older versions."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = list(get_model_conversion_mapping(model))
    except Exception:  # transformers 4.x, or a version whose internals moved: match names as they are
        return [], []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    return renamings, [t for t in transforms if not isinstance(t, WeightRenaming)]


def _per_expert_merge(conv) -> "list[str] | None":
    """The source patterns of a converter that only stacks per-expert 2-D weights into one 3-D tensor
    (MergeModulelist(dim=0)), perhaps concatenating two of them along the output dim first (gate and up:
    Concatenate(dim=1) after the merge), each pattern with one `*` for the expert index; else None. Those
    are the layouts whose experts an unrolled module holds as they are stored (runtime/experts.py)."""
    try:
        ops = [(type(o).__name__, getattr(o, "dim", None)) for o in conv.operations]
        pats = list(conv.source_patterns)
    except Exception:  # another version's converter objects: not a layout we know
        return None
    if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
        return None
    if any(p.count("*") != 1 for p in pats) or (len(ops) == 1) != (len(pats) == 1):
        return None
    return pats


def _expert_sources(model: nn.Module, missing: list, resolve, converters) -> tuple[dict, set]:
    """({unrolled key: (source names, ...)}, {the 3-D keys they stand for}) for the experts weights in
    `missing` that transformers builds from per-expert tensors (_per_expert_merge): after runtime.experts.unroll,
    expert e's Linear holds exactly those tensors, concatenated along dim 0 (Mixtral's w1 and w3, Qwen's
    gate_proj and up_proj)."""
    out, done = {}, set()
    miss = set(missing)
    for path, mod in experts.experts_modules(model):
        if mod.is_transposed or mod.has_bias:
            continue  # stored transposed, or with per-expert biases: not a layout handled here
        for proj in (experts.in_proj(mod), "down_proj"):
            key = f"{path}.{proj}"
            if key not in miss:
                continue
            for conv in converters:
                pats = _per_expert_merge(conv)
                targets = [t.lstrip("^") for t in getattr(conv, "target_patterns", [])]
                if pats is None or not any(key.endswith(t) for t in targets):
                    continue
                found = {}
                for e in range(experts.num_experts(mod)):
                    names = []
                    for p in pats:
                        head, tail = p.lstrip("^").split("*")
                        names.append(resolve(f"{path}.{e}{tail}") if f"{path}.".endswith(head) else None)
                    if None in names:
                        break
                    found[f"{path}.{e}.{proj}.weight"] = tuple(names)
                else:
                    out.update(found)
                    done.add(key)
                    break
    return out, done


def _renamed(names, renamings) -> dict[str, str]:
    """{name after transformers' renamings: name in SRC} for the names the renamings change."""
    out = {}
    for name in names:
        new = name
        try:
            for r in renamings:
                new, _ = r.rename_source_key(new)
        except Exception:  # an internal API that changed shape: no renaming rather than a crash
            return {}
        if new != name:
            out[new] = name
    return out


def match_keys(model: nn.Module, src: SourceTensors) -> tuple[dict[str, str], list[str]]:
    """({state_dict key of the model: tensor name in SRC}, [keys not found]); a key matches exactly, or
    with/without the model's base_model_prefix (a BertModel checkpoint read as BertForMaskedLM, ...), or
    after the renamings transformers itself applies when loading this model class."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = set(src.info)
    renamings, converters = _transformers_mapping(model)
    renamed = _renamed(names, renamings) if renamings else {}

    def resolve(k: str) -> "str | None":
        for cand in (k, k[len(prefix) + 1:] if prefix and k.startswith(prefix + ".") else None,
                     f"{prefix}.{k}" if prefix else None):
            if cand and cand in names:
                return cand
            if cand and cand in renamed:
                return renamed[cand]
        return None

    out, missing = {}, []
    for k in model.state_dict(keep_vars=True):
        sk = resolve(k)
        if sk is None:
            missing.append(k)
        else:
            out[k] = sk
    if missing and converters:
        per_expert, done = _expert_sources(model, missing, resolve, converters)
        out.update(per_expert)
        missing = [k for k in missing if k not in done]
    return out, missing


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor, requires_grad: bool = False) -> None:
    prefix, _, attr = key.rpartition(".")
    mod = model.get_submodule(prefix) if prefix else model
    old = mod._parameters.get(attr, mod._buffers.get(attr))
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise ConvertError(f"{key}: the source holds a {tuple(value.shape)} tensor, the model that config.json "
                           f"describes needs {tuple(old.shape)}")
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point())
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        try:  # a 3-D experts weight, split into the unrolled experts
            known = experts.set_fused(mod, attr, value)
        except ValueError as e:
            raise ConvertError(f"{key}: {e}") from None
        if not known:
            raise ConvertError(f"{key} is neither a parameter nor a buffer of {type(model).__name__}")


def _to_meta(module: nn.Module) -> None:
    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for k, b in list(m._buffers.items()):
            if b is not None and not b.is_meta:
                m._buffers[k] = b.to("cpu")


class StreamingLayers:
    """calibrate.LayerStore over SRC: load() reads layer i's tensors, unload() puts them back on meta."""

    def __init__(self, model, path: str, layers: nn.ModuleList, src: SourceTensors, keymap: dict,
                 dtype: torch.dtype):
        self.model, self.path, self.layers, self.src, self.dtype = model, path, layers, src, dtype
        self.keys = {i: {k: v for k, v in keymap.items() if k.startswith(f"{path}.{i}.")}
                     for i in range(len(layers))}

    def load(self, i: int, device) -> nn.Module:
        tensors = self.src.read_mapped(self.keys[i], device=device, dtype=self.dtype)
        for k in list(tensors):
            _set_tensor(self.model, k, tensors.pop(k))
        layer = self.layers[i]
        for m in layer.modules():  # buffers not in SRC (non-persistent ones) were computed on the CPU
            for bk, b in list(m._buffers.items()):
                if b is not None and not b.is_meta:
                    m._buffers[bk] = b.to(device)
        left = [n for n, p in layer.named_parameters() if p.is_meta]
        if left:
            raise ConvertError(f"{self.path}.{i}: {len(left)} tensor(s) missing from {self.src.src}: "
                               f"{', '.join(left[:3])}")
        return layer

    def unload(self, i: int) -> None:
        _to_meta(self.layers[i])
        release_memory()


# ---- memory -------------------------------------------------------------------------------------------

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # glibc only
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_memory() -> None:
    """Hand memory freed by the last layer back to the OS (glibc malloc_trim; a no-op elsewhere).

    glibc raises its mmap threshold whenever a large mapped block is freed, after which layer-sized tensors
    come from the heap, and freed heap memory stays in the process: peak memory then creeps up with the
    number of layers through fragmentation alone (measured: 670 -> 777 MB over 8 layers, where the live data
    did not grow). malloc_trim(0) returns every free heap page, so memory tracks what is alive.
    """
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def large_allocations_mapped() -> None:
    """Fix glibc's mmap threshold at 1 MiB (mallopt M_MMAP_THRESHOLD) so every tensor larger than that has
    its own mapping, unmapped the moment it is freed, instead of the heap (see release_memory)."""
    libc = _libc()
    if libc:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def free_memory(device: torch.device) -> int | None:
    """Free bytes on `device`: cuda mem_get_info, or MemAvailable from /proc/meminfo for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_memory(model, stacks, src: SourceTensors, keymap: dict, dtype, method: str,
                    nsamples: int, seqlen: int, max_shard_bytes: int) -> dict:
    """Peak bytes by component (docs/convert_memory.md has the formula); stacks: calibrate.find_stacks."""
    esize = torch.empty((), dtype=dtype).element_size()
    per_layer = [sum(src.nbytes_of(sk, dtype) for k, sk in keymap.items() if k.startswith(f"{st.path}.{i}."))
                 for st in stacks for i in range(len(st.layers))]
    layer = max(per_layer) if per_layer else 0
    outside = sum(src.nbytes_of(sk, dtype) for k, sk in keymap.items() if not calibrate.in_stacks(k, stacks))
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
    # hidden states of every window (updated in place) + one window's attention scores (eager, fp32); an
    # encoder-decoder also holds the pruned encoder's output for the decoder pass
    act = len(stacks) * nsamples * seqlen * hidden * esize + 2 * heads * seqlen * seqlen * 4
    # the Linear layers of each block (on meta): blocks differ (DeepSeek's first layers are dense MLPs, the
    # rest hold a Linear pair per expert), and the statistics are held for one block at a time
    shapes = [[tuple(calibrate.linear_weight(m).shape) for m in block.modules() if calibrate.is_linear(m)]
              for st in stacks for block in st.layers]
    stats = 0
    if method == "sparsegpt":  # XᵀX of every Linear of the layer, plus the inversion's temporaries
        stats = max((sum(k * k * 4 for _, k in b) + 3 * max((k for _, k in b), default=0) ** 2 * 4
                     for b in shapes), default=0)
    elif method in ("taylor", "obd"):  # fp32 accumulators and gradients + fp32 output gradients
        stats = 2 * layer // esize * 4 + nsamples * seqlen * hidden * 4
    elif method == "wanda":
        stats = max((sum(k for _, k in b) * 4 for b in shapes), default=0)
    # the dense copy kept for the error measurement + the packed form (≤ dense)
    work = 2 * layer
    # scratch while one Linear is scored, selected and packed: fp32 score, int64 top-k / sort indices, the
    # mask and the packing temporaries, about 5 fp32 copies of the largest Linear (measured)
    largest = max((n * k for b in shapes for n, k in b), default=0)
    return {"layer": layer, "outside_layers": outside, "activations": act, "statistics": stats,
            "layer_work": work, "scratch": 5 * 4 * largest,
            "shard_buffer": min(max_shard_bytes, sum(per_layer) + outside)}


def check_memory(est: dict, device: torch.device) -> None:
    on_dev = est["layer"] + est["activations"] + est["statistics"] + est["layer_work"] + est["scratch"]
    host = est["outside_layers"] + est["shard_buffer"]
    if device.type == "cpu":
        needs = {"cpu": on_dev + host}
    else:  # embeddings visit the device for the layer-0 capture
        needs = {str(device): on_dev + est["outside_layers"], "cpu": host + est["layer"]}
    parts = (f"one decoder layer {human_bytes(est['layer'])} (x3 while pruning: weights, dense copy, packed), "
             f"weights outside the layers {human_bytes(est['outside_layers'])}, calibration activations "
             f"{human_bytes(est['activations'])}, pruning statistics and scratch "
             f"{human_bytes(est['statistics'] + est['scratch'])}, "
             f"shard buffer {human_bytes(est['shard_buffer'])}")
    for dev, need in needs.items():
        free = free_memory(torch.device(dev))
        if free is not None and need > free:
            raise NotEnoughMemory(f"not enough memory on {dev}: converting needs about {human_bytes(need)} "
                                  f"({parts}), {human_bytes(free)} free; lower --nsamples / --seqlen"
                                  + (", or use --device cpu" if dev != "cpu" else ""))


def packed_nbytes_estimate(shape, pat, sparsity: float | None, esize: int) -> int:
    """Bytes of an [N, K] weight packed at `pat` (the buffers SparseLinear holds; masks.py's rounding), or its
    dense bytes where the layer will stay dense (a shape the blocks do not divide, a target of zero blocks)."""
    from .runtime.linear import _buffer_shapes

    n, k = shape
    dense = n * k * esize
    nnz = None
    if pat.kind == "block":
        b = pat.block
        if n % b or k % b:
            return dense
        blocks = (n // b) * (k // b)
        nnz = blocks - round(sparsity * blocks)
        if nnz == blocks:
            return dense
    elif pat.format == "bitmask":
        s = pat.fixed_sparsity if pat.kind == "nm" else sparsity
        nnz = n * k - round(s * n * k)
        if nnz == n * k:
            return dense
    buffers = _buffer_shapes(pat.format, n, k, pat.block, nnz)
    return sum(math.prod(shp) * (esize if dt is None else torch.empty((), dtype=dt).element_size())
               for shp, dt in buffers.values())


def estimate_disk(model, stacks, src: SourceTensors, keymap: dict, dtype, compute, pattern, sparsity,
                  method: str, skip: str | None, include_lm_head: bool, nsamples: int, seqlen: int) -> dict:
    """Bytes OUT will take, and the most the gradient spill of taylor / obd holds at once in OUT's temp
    directory: every layer's saved input during the forward pass, then every layer's fp32 statistics, which
    the pruning pass frees one layer at a time as the output grows."""
    from .patterns import parse

    pat = parse(pattern)
    esize = torch.empty((), dtype=dtype).element_size()
    names = calibrate.stack_linear_names(model)
    if include_lm_head:
        names.append(calibrate.output_projection(model)[0])
    if skip:
        names = [n for n in names if not re.search(skip, n)]
    saved = stats = 0
    for name in names:
        shape = tuple(calibrate.linear_weight(model.get_submodule(name)).shape)
        saved += math.prod(shape) * esize - packed_nbytes_estimate(shape, pat, sparsity, esize)
        stats += math.prod(shape) * 4
    # (+ the safetensors headers, ~100-200 bytes a tensor; the manifest and copied files are not counted)
    checkpoint = sum(src.nbytes_of(sk, dtype) for sk in keymap.values()) - saved + 256 * len(keymap)
    spill = 0
    if method in ("taylor", "obd"):
        cfg = getattr(model, "config", None)
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
        ce = torch.empty((), dtype=compute).element_size()
        acts = sum(len(st.layers) for st in stacks) * nsamples * seqlen * hidden * ce
        spill = max(acts, stats)
    return {"checkpoint": checkpoint, "gradient_spill": spill}


def check_disk(est: dict, out: Path) -> None:
    """Refuse, before the work, a conversion whose output (and spill) cannot fit where OUT is written."""
    import shutil

    where = Path(out).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    need = est["checkpoint"] + est["gradient_spill"]
    if need > free:
        spill = (f" + gradient spill {human_bytes(est['gradient_spill'])}" if est["gradient_spill"] else "")
        raise NotEnoughDisk(f"not enough disk space for {out}: converting needs about {human_bytes(need)} "
                            f"(checkpoint {human_bytes(est['checkpoint'])}{spill}), {human_bytes(free)} free on "
                            f"the filesystem of {where}")


# ---- the conversion -----------------------------------------------------------------------------------

def convert(src, out, method: str, pattern, sparsity: float | None = None, *, calib=None,
            nsamples: int = calibrate.DEFAULT_NSAMPLES, seqlen: int | None = None, device="cpu",
            dtype=None, skip: str | None = None, overwrite: bool = False, include_lm_head: bool = False,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, **opts) -> PruneReport:
    """Prune the model in SRC and write a packed checkpoint directory OUT (see module doc).

    method / pattern / sparsity / calib / nsamples / seqlen / skip / opts: as for sparserun.prune
    device:  where each layer is processed ("cpu", "cuda", "cuda:1")
    dtype:   "float16" | "bfloat16" | "float32" (or a torch dtype): the stored dtype, default the source's
             (config.json's, never wider than the stored weights');
             also the compute dtype, except that on the CPU 16-bit models are processed in float32
    include_lm_head: prune the output projection too (default: it stays dense, as do the embeddings,
             which are lookups, not matmuls)
    Returns the PruneReport, also written as OUT/report.json. Lists of masks are not kept (they would grow
    with depth); reload OUT with sparserun.load to get at the layers.
    """
    from .prune.api import _OPTION_NAMES, check_options, check_skip

    method, pattern, sparsity = check_args(method, pattern, sparsity)
    unknown = set(opts) - (_OPTION_NAMES - {"include_lm_head"})
    if unknown:
        raise TypeError(f"convert() got unknown option(s) {', '.join(sorted(unknown))}")
    options = calibrate.Options(**opts)
    check_options(pattern, options)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ConvertError(f"source model directory not found: {src}")
    if not (src / "config.json").is_file():
        raise ConvertError(f"{src} has no config.json (not a Hugging Face model directory)")
    s_r, o_r = src.resolve(), out.absolute().resolve()
    if _is_within(o_r, s_r):
        raise ConvertError(f"output {out} is inside the source directory {src}; the source is never written, "
                           f"choose an output outside it")
    if _is_within(s_r, o_r):
        raise ConvertError(f"output {out} contains the source directory {src}; choose another output")
    linked = linked_into(src, out)
    if linked is not None:
        raise ConvertError(f"output {out} holds the source's data: {linked} links into it (a Hugging Face cache "
                           f"snapshot links into its blobs/); the source is never written, choose another output")
    check_output_dir(out, overwrite)
    source_files(src)  # the files copied at the end: one that cannot be (a dangling link) fails now
    dtype = resolve_dtype(dtype, ConvertError)
    device = resolve_device(device, ConvertError)
    if skip:
        import re

        try:
            re.compile(skip)
        except re.error as e:
            raise ConvertError(f"--skip {skip!r} is not a valid regular expression: {e}") from None

    config = read_hf_config(src, ConvertError)
    tensors = SourceTensors(src)
    dtype = dtype or stored_dtype(config, tensors)
    # The checkpoint is stored in `dtype`; the work is done in `compute`. On the CPU, 16-bit matmuls are far
    # slower than fp32 ones (measured here at 576x1536, 512 tokens: bf16 3.7x, fp16 11x), so there a 16-bit
    # model is processed in fp32 (twice the layer memory, which the estimate counts) and cast when written.
    compute = torch.float32 if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) else dtype
    model = build_skeleton(config)
    keymap, missing = match_keys(model, tensors)
    # stored tensors the model has no place for are left out, as from_pretrained does; the report says so
    # (a stored copy of a buffer the model computes itself, like BERT's position_ids, is not worth a word)
    used = {n for v in keymap.values() for n in (v if isinstance(v, tuple) else (v,))}
    unused = sorted(set(tensors.info) - used - {n for n, _ in model.named_buffers()})
    # MoE experts stored as 3-D tensors are pruned and packed one expert at a time (runtime/experts.py); the
    # keymap keeps their stored names, which StreamingLayers splits into the experts as it reads them
    experts.unroll_all(model)
    stacks = calibrate.find_stacks(model)
    if include_lm_head:
        calibrate.check_head(model, method)  # raises now, before any weight is read, if it cannot be pruned
    check_skip(model, skip, include_lm_head)
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    _check_shapes(model, keymap, tensors)
    computed = set(_compute_unsaved(model, missing, stacks, compute))
    missing = [k for k in missing if k not in computed]
    if missing:
        hint = " (if from_pretrained loads it, use sparserun.prune + sparserun.save on the loaded model)"
        if _transformers_mapping(model)[1]:  # (the per-expert layouts runtime/experts.py holds are matched)
            hint = (f" (transformers builds them at load time by merging tensors stored in another layout, e.g. "
                    f"per-expert weights; convert reads the weights as stored and cannot stream such a model: "
                    f"load it with from_pretrained and use sparserun.prune + sparserun.save)")
        raise ConvertError(f"{src}: {len(missing)} tensor(s) the {type(model).__name__} needs are not in its "
                           f"weights files: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}{hint}")
    seqlen_eff = seqlen
    if not isinstance(calib, torch.Tensor):
        from .prune.api import default_seqlen

        seqlen_eff = seqlen if seqlen is not None else default_seqlen(config)
    large_allocations_mapped()
    est_windows = tuple(calib.shape) if isinstance(calib, torch.Tensor) else (nsamples, seqlen_eff)
    est = estimate_memory(model, stacks, tensors, keymap, compute, method, *est_windows, max_shard_bytes)
    check_memory(est, device)
    disk = estimate_disk(model, stacks, tensors, keymap, dtype, compute, pattern, sparsity, method, skip,
                         include_lm_head, *est_windows)
    check_disk(disk, out)

    tokenizer = None
    if not isinstance(calib, torch.Tensor):
        tokenizer = _tokenizer(src)
    # calibration problems (missing / empty / too short text) fail before any weight is read
    cal = load_calibration(model, calib, tokenizer, nsamples, seqlen_eff, options.seed)
    # everything outside the repeated layers: read once, kept for the capture and the LM head
    outside = {k: sk for k, sk in keymap.items() if not calibrate.in_stacks(k, stacks)}
    loaded = tensors.read_mapped(outside, dtype=compute)
    for k, first in tied.items():  # tying would silently keep one of two different stored tensors
        if k in loaded and first in loaded and not torch.equal(loaded[k], loaded[first]):
            raise ConvertError(f"{src}: the model ties {k} to {first} (tie_word_embeddings in config.json), but "
                               f"the checkpoint stores them with different values; if the model is untied, set "
                               f"\"tie_word_embeddings\": false in config.json")
    for k in outside:
        _set_tensor(model, k, loaded.pop(k))
    if tied:
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and not calibrate.in_stacks(n, stacks)]
    if left:
        raise ConvertError(f"{src}: no data for {', '.join(left[:4])}")

    def store(st: calibrate.Stack) -> StreamingLayers:
        return StreamingLayers(model, st.path, st.layers, tensors, keymap, compute)

    extra = {"architecture": type(model).__name__, "model_type": getattr(config, "model_type", None),
             "prune": {"method": method, "pattern": pattern, "sparsity": sparsity,
                       "calibration": cal.describe()}}
    written: set[str] = set()
    packed_bytes: dict[str, int] = {}  # layer -> bytes as stored (in `dtype`, not `compute`)
    with CheckpointWriter(out, source_dir=src, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                          source=str(src), extra=extra) as w:

        def on_layer(prefix, layer, packed):
            for name, (p, bias) in packed.items():
                if method == "sparsegpt":  # 16-bit models are pruned in fp32: its update must fit the stored dtype
                    check_representable(p.tensors["values"], dtype, name)
                p = p.to("cpu", dtype)
                w.add_layer(name, p, bias=None if bias is None else _stored(bias, dtype, f"{name}.bias"))
                packed_bytes[name] = p.nbytes()
                written.update({f"{name}.weight", f"{name}.bias"})
            if layer is None:
                return
            for k, t in layer.state_dict(prefix=f"{prefix}.").items():
                if k not in written:
                    w.add_tensor(k, _stored(t, dtype, k))
                    written.add(k)

        # taylor / obd spill per-layer activations to disk inside the writer's temp directory: whatever stops
        # the conversion, they go with it
        rows, _, info = calibrate.prune_layerwise(
            model, method, pattern, sparsity, cal, device=device, store=store, skip=skip, options=options,
            on_layer=on_layer, keep_masks=False, include_lm_head=include_lm_head,
            spill_dir=w.tmp, progress=progress, release=release_memory)
        _write_outside(w, model, stacks, written, dtype)
        if compute != dtype:  # the rows measured the fp32 working copies; report what is stored
            esize = torch.empty((), dtype=dtype).element_size()
            for r in rows:
                r["dtype"] = str(dtype).removeprefix("torch.")
                r["bytes_before"] = math.prod(r["shape"]) * esize
                r["bytes_after"] = packed_bytes.get(r["name"], r["bytes_before"])
        report = PruneReport(method, pattern, sparsity, cal.describe(), rows, {}, info)
        # the whole checkpoint against the whole source, tensor bytes both (the rows cover the pruned layers)
        report.info.update({"checkpoint_bytes": sum(t["nbytes"] for t in w.tensors.values()),
                            "source_bytes": sum(tensors.nbytes(k) for k in tensors.info),
                            "source_dtype": str(tensors.floating_dtype()).removeprefix("torch.")})
        report.info.update({"source": str(src), "output": str(out), "dtype": str(dtype).removeprefix("torch."),
                            "compute_dtype": str(compute).removeprefix("torch."), "device": str(device),
                            "memory_estimate": est, "disk_estimate": disk, "architecture": type(model).__name__,
                            "unused_tensors": len(unused),
                            "unused_example": unused[0] if unused else None})
        tmp = w.tmp / "report.json"
        tmp.write_text(report.to_json() + "\n")  # inside the temp dir: appears in OUT with everything else
    return report


def _check_shapes(model: nn.Module, keymap: dict, src: SourceTensors) -> None:
    """Every stored tensor has the shape the model built from config.json gives it, checked before any weight
    is read (a config edited apart from its weights would otherwise fail layers later, or write a checkpoint
    that cannot load). The 3-D experts tensors split into unrolled experts are checked as they are split."""
    own = model.state_dict(keep_vars=True)
    for k, sk in keymap.items():
        if k not in own:
            continue
        names = sk if isinstance(sk, tuple) else (sk,)
        shapes = [src.info[n][0] for n in names]
        stored = shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
        if tuple(stored) != tuple(own[k].shape):
            raise ConvertError(f"{src.src}: {' + '.join(names)} holds {tuple(stored)}, but the {type(model).__name__} "
                               f"that config.json describes needs {tuple(own[k].shape)} for {k}")


def _compute_unsaved(model: nn.Module, missing: list, stacks, dtype: torch.dtype) -> list[str]:
    """Compute the parameters in `missing` that transformers never saves because it computes them when it
    builds the model (the class's `_keys_to_ignore_on_save`, e.g. Marian's sinusoidal position tables), the
    way it does: the model's own `_init_weights` on their module. Only outside the stacks (the streamed
    layers are read from the source). Returns the keys computed."""
    import re

    patterns = list(getattr(model, "_keys_to_ignore_on_save", None) or [])
    init = getattr(model, "_init_weights", None)
    done = []
    for key in missing:
        if init is None or calibrate.in_stacks(key, stacks) or not any(re.search(p, key) for p in patterns):
            continue
        prefix, _, attr = key.rpartition(".")
        mod = model.get_submodule(prefix) if prefix else model
        p = mod._parameters.get(attr)
        if p is None or not p.is_meta:
            continue
        mod._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=torch.float32), requires_grad=False)
        with torch.no_grad():
            init(mod)
        mod._parameters[attr] = nn.Parameter(mod._parameters[attr].detach().to(dtype), requires_grad=False)
        done.append(key)
    return done


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """state_dict keys that are the same tensor as an earlier key (tied weights): key -> first key."""
    first: dict[int, str] = {}
    tied = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            tied[k] = first[id(t)]
        else:
            first[id(t)] = k
    # a skeleton built before tying may not share yet: ask the config too
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if out_emb is not None and in_emb is not None:
            names = {id(m): n for n, m in model.named_modules()}
            o, i_ = names.get(id(out_emb)), names.get(id(in_emb))
            if o is not None and i_ is not None:
                tied.setdefault(f"{o}.weight", f"{i_}.weight")
    return tied


def _stored(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """`t` on the CPU as the checkpoint stores it: floating tensors in `dtype`, others as they are. A value the
    narrower dtype cannot hold (an embedding of 1e6 in float16) is refused: cast, it became inf, silently."""
    t = t.detach().cpu()
    if not t.is_floating_point():
        return t
    limit = torch.finfo(dtype).max
    if limit < torch.finfo(t.dtype).max and t.numel():
        lo, hi = torch.aminmax(t)  # no |t| copy: that is an embedding-sized allocation per tensor
        top = max(-float(lo), float(hi))
        if math.isfinite(top) and top > limit:
            dt = str(dtype).removeprefix("torch.")
            raise ConvertError(f"{name}: holds {top:.4g}, beyond what {dt} holds ({limit:.4g}); store the model in "
                               f"bfloat16 or float32 (--dtype)")
    return t.to(dtype)


def _write_outside(w: CheckpointWriter, model: nn.Module, stacks, written: set, dtype: torch.dtype) -> None:
    """The tensors outside the repeated layers; a tensor shared by two names is stored once + an alias."""
    first: dict[int, str] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if calibrate.in_stacks(k, stacks) or k in written:
            continue
        if id(t) in first:
            w.add_alias(k, first[id(t)])
            continue
        first[id(t)] = k
        if t.is_meta:
            raise CheckpointError(f"{k}: no data (still on the meta device)")
        w.add_tensor(k, _stored(t, dtype, k))


def _shard_bytes(mib: int) -> int:
    if mib < 1:
        raise ConvertError(f"--max-shard-size must be at least 1 (MiB), got {mib}")
    return mib * 1024 * 1024


def _tokenizer(src: Path):
    from .checkpoint import read_tokenizer
    from .generate import TOKENIZER_FILES, has_tokenizer

    if not has_tokenizer(src):
        raise ConvertError(f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); calibration text "
                           f"must be tokenised with the model's own tokenizer: copy its files into {src}, or pass "
                           f"pre-tokenised calib=LongTensor[n, T] to sparserun.convert.convert()")
    try:
        return read_tokenizer(src)
    except Exception as e:  # many error types for a directory without tokenizer files
        raise ConvertError(f"{src} has no usable tokenizer ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); calibration text must be tokenised "
                           f"with the model's own tokenizer (sparserun.convert.convert() also takes "
                           f"pre-tokenised calib=LongTensor[n, T])") from None


# ---- CLI ----------------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="prune a Hugging Face model directory into a packed checkpoint",
                       description="Prune SRC (a Hugging Face model directory: safetensors or "
                                   "pytorch_model.bin) one decoder layer at a time and write the packed "
                                   "checkpoint OUT, with a per-layer report (also saved as OUT/report.json).")
    p.add_argument("src", help="Hugging Face model directory (config.json, *.safetensors or pytorch_model*.bin, "
                               "tokenizer)")
    p.add_argument("out", help="output directory (must not exist, be empty, or use --overwrite)")
    p.add_argument("--method", required=True, help="magnitude | wanda | sparsegpt | taylor | obd")
    p.add_argument("--pattern", required=True, help='"2:4", "4:8", "unstructured", "32x32", ...')
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction removed, in (0, 1); N:M implies it, unstructured and blocks need it")
    p.add_argument("--calib", default=None,
                   help="calibration text, JSONL (a \"text\" field per line) or a .json list of texts; "
                        "default: the shipped text")
    p.add_argument("--nsamples", type=int, default=calibrate.DEFAULT_NSAMPLES,
                   help=f"calibration windows (default {calibrate.DEFAULT_NSAMPLES})")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per window (default min({calibrate.DEFAULT_SEQLEN}, the model's limit))")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (one layer at a time goes there)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="stored dtype (default: config.json's dtype, but never wider than that of most stored bytes, "
                        "which is the default without one); on the CPU 16-bit models are processed in float32")
    p.add_argument("--skip", default=None, help="regex: Linear layers whose name matches stay dense")
    p.add_argument("--balance-rows", action="store_true",
                   help="blocks: keep the same number of blocks in every block-row")
    p.add_argument("--per-row", choices=("yes", "no"), default=None,
                   help="unstructured: same sparsity in every row (default: yes for wanda/taylor/obd)")
    p.add_argument("--include-lm-head", action="store_true", help="prune lm_head too (default: dense)")
    p.add_argument("--max-shard-size", type=int, default=DEFAULT_SHARD_BYTES // (1024 * 1024),
                   help="MiB per output shard, also the most the writer buffers in memory (default "
                        f"{DEFAULT_SHARD_BYTES // (1024 * 1024)})")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table (warnings still go to stderr)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    opts = {}
    if args.balance_rows:
        opts["balance_rows"] = True
    if args.per_row is not None:
        opts["per_row"] = args.per_row == "yes"
    report = convert(args.src, args.out, args.method, args.pattern, args.sparsity, calib=args.calib,
                     nsamples=args.nsamples, seqlen=args.seqlen, device=args.device, dtype=args.dtype,
                     skip=args.skip, overwrite=args.overwrite, include_lm_head=args.include_lm_head,
                     max_shard_bytes=_shard_bytes(args.max_shard_size), progress=not args.quiet, **opts)
    if not args.quiet:
        print(report.table())
        print(f"\nwrote {args.out} (report: {os.path.join(args.out, 'report.json')})")
    else:  # --quiet drops the table, not what may be wrong with the result
        for w in report.warnings():
            print(w, file=sys.stderr)
    return 0
