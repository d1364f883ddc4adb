"""The packed checkpoint directory: write it atomically, read it strictly and lazily.

A checkpoint directory holds (docs/format.md, "The packed checkpoint directory"):

    config.json, generation_config.json, tokenizer files   copied unchanged from the source model
    sparserun.json                                           the manifest: layer records, tensor map, shard sha256
    model.safetensors  or  model-00001-of-0000N.safetensors  packed tensors of sparse layers + plain tensors

Writing (`CheckpointWriter`) streams tensors into shards of at most `max_shard_bytes` (one tensor larger than
that gets a shard of its own), so a converter can add one decoder layer at a time and never hold the whole
model. Everything goes into a temp directory next to OUT; files and the directory are fsynced and the temp
directory is renamed to OUT only at the end, so OUT is either the old content or the complete new one.
The source directory is only ever read.

Reading (`CheckpointReader`) checks everything that is cheap before any tensor is touched: the directory,
config.json, the manifest (version, records, formats, patterns), every shard's presence, size, sha256
(optional, on by default) and safetensors header, and that every tensor a record names exists with the shape
and dtype the record implies. Tensor data is read lazily through safetensors' memory map.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from . import _umask_mode, _warn, formats
from .formats.common import SUPPORTED_DTYPES
from .patterns import parse as parse_pattern

FORMAT_VERSION = 1
MANIFEST = "sparserun.json"
CONFIG = "config.json"
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3  # ~2 GiB, like transformers' default shard size

# Files copied unchanged from the source model directory (besides config.json). Names first, then globs for
# the tokenizer-ish files whose names vary between model families.
COPY_NAMES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json",
)
COPY_GLOBS = ("tokenizer*", "vocab*", "merges*", "*.tiktoken", "chat_template*", "*spiece*.model",
              "sentencepiece*.model")
# Of the copied files, the ones that describe the model rather than its tokenizer/processor.
_NOT_TOKENIZER_FILES = (CONFIG, "generation_config.json")

# safetensors dtype codes <-> torch dtypes (only the ones a model state_dict can hold).
_MAX_HEADER = 100_000_000  # what safetensors itself refuses beyond: a reader must not parse gigabytes of JSON
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        _ST_DTYPES[_code] = getattr(torch, _name)
_TORCH_TO_ST = {v: k for k, v in _ST_DTYPES.items()}


# ---- errors -------------------------------------------------------------------------------------------

class CheckpointError(Exception):
    """Base class: a packed checkpoint cannot be written or read. The message is one line naming the problem."""


class CheckpointNotFound(CheckpointError):
    """The checkpoint directory does not exist or is not a directory."""


class MissingConfig(CheckpointError):
    """The directory has no config.json."""


class ManifestError(CheckpointError):
    """sparserun.json is missing, unparsable or inconsistent."""


class UnsupportedVersion(ManifestError):
    """sparserun.json was written by a newer sparserun (format_version too high)."""


class UnknownFormat(ManifestError):
    """A layer record names a packed format this sparserun does not know."""


class CorruptShard(CheckpointError):
    """A shard is missing, truncated, or not a readable safetensors file (the message names the file)."""


class ChecksumMismatch(CorruptShard):
    """A shard's sha256 differs from the one recorded in sparserun.json."""


class TensorMismatch(CheckpointError):
    """A tensor is missing from its shard, or its shape/dtype does not match its record."""


class OutputExists(CheckpointError):
    """The output directory exists and is not empty (pass overwrite=True / --overwrite to replace it)."""


def _check_out_args(out, overwrite) -> None:
    # "" is the current directory to pathlib: with overwrite, a typo would replace whatever the user is in
    if not str(out).strip():
        raise ValueError("the output directory is an empty path; name a directory")
    if not isinstance(overwrite, bool):  # overwrite="no" is true: a string must not decide to delete
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")


def check_output_dir(out: Path, overwrite: bool) -> None:
    """OUT may be missing or an empty directory; a non-empty one only with overwrite; a file never (it is not
    ours to delete). Commands call this before any long work, and the writer again when it starts."""
    _check_out_args(out, overwrite)
    out = Path(out)
    if out.is_symlink() and not out.exists():
        target = Path(os.path.abspath(os.path.join(out.parent, os.readlink(out))))
        left = _siblings(target, "old")  # the link's target was being replaced when the run was killed
        if left:
            raise OutputExists(f"{out} links to {target}, which is missing, but {left[0]} holds the checkpoint "
                               f"that an interrupted replace moved aside; move it back to {target} (or delete "
                               f"it), then run again")
        raise OutputExists(f"output {out} is a symbolic link to {os.readlink(out)}, which does not exist; give a "
                           f"directory")
    if out.exists() and not out.is_dir():
        raise OutputExists(f"output {out} exists and is a file, not a directory; choose a directory")
    if out.is_dir() and os.path.ismount(out):
        raise OutputExists(f"output {out} is a mount point, which a write cannot replace (the checkpoint is renamed "
                           f"into place); give a directory inside it")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"output directory {out} exists and is not empty (use --overwrite to replace it)")
    if not out.exists():
        # a replace of OUT by an older sparserun (or one whose file system cannot exchange two names) was killed
        # between moving the old checkpoint aside and moving the new one in: the old one is all there is
        left = _siblings(out, "old")
        if left:
            raise OutputExists(f"{out} is missing, but {left[0]} holds the checkpoint that an interrupted replace "
                               f"moved aside; move it back to {out} (or delete it), then run again")


def read_tokenizer(path):
    """AutoTokenizer of the directory `path`, never running code it ships and never downloading: a
    tokenizer_config.json whose `auto_map` names a module in the directory would otherwise be imported (a
    packed checkpoint is often someone else's), and a name that is no directory spent ~50 s in Hub retries
    offline. Raises what transformers raises; callers turn it into their one-line error."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def read_hf_config(path, error=None):
    """transformers' config of the model directory `path`, never running code the directory ships: a config
    whose `model_type` only the model's own code defines (`auto_map`, trust_remote_code) is refused, and
    transformers is told not to run it (else it may ask on stdin, or run it if stdin says yes). Errors are
    `error` (default CheckpointError), one line naming config.json."""
    from transformers import CONFIG_MAPPING, AutoConfig

    error = error or CheckpointError
    p = Path(path) / CONFIG
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError):
        raw = None  # AutoConfig says what is wrong with it, below
    if isinstance(raw, dict) and raw.get("auto_map") and raw.get("model_type") not in CONFIG_MAPPING:
        raise error(f"{p}: model_type {raw.get('model_type')!r} is defined by the model's own code (auto_map), "
                    f"which sparserun does not run; only architectures transformers implements are supported")
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # ValueError / OSError / KeyError for unknown or bad configs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if len(first) > 300:  # transformers lists every model type it knows
            first = first[:300] + " ..."
        raise error(f"{p}: cannot build a transformers config: {first}") from None


# ---- helpers --------------------------------------------------------------------------------------------

def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes renames/creates durable; not supported everywhere (e.g. Windows), hence best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def source_files(source_dir: "str | os.PathLike") -> list[Path]:
    """config.json, generation config and tokenizer files of a model directory (the files copied unchanged)."""
    src = Path(source_dir)
    found: dict[str, Path] = {}
    for name in (CONFIG,) + COPY_NAMES:
        p = src / name
        if p.is_file():
            found[name] = p
        elif p.is_symlink():  # a link to nothing: copying would silently leave the file out
            raise CheckpointError(f"{p} is a link to {os.readlink(p)}, which does not exist (a Hugging Face cache "
                                  f"blob deleted?); restore it or remove the link")
    for pat in COPY_GLOBS:
        for p in sorted(src.glob(pat)):
            # never copy weights that happen to match a glob (e.g. a "tokenizer.safetensors" is not a thing we copy)
            if p.is_file() and p.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
                found.setdefault(p.name, p)
    for p in found.values():  # one that cannot be read must fail when the writer starts, not after the work
        try:
            with open(p, "rb"):
                pass
        except OSError as e:
            raise CheckpointError(f"{p} cannot be read ({e.strerror}); it is copied into the output") from None
    return [found[k] for k in sorted(found)]


def _is_within(a: Path, b: Path) -> bool:
    """True if path a is b or inside b."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


@contextmanager
def _signals_deferred():
    """Hold Ctrl-C (and the CLI's SIGTERM/SIGHUP handlers) until the block ends, then deliver them.

    The block is the commit of a write (OUT swapped in, the previous OUT removed) or the removal of a temp dir:
    an interrupt inside it used to report "interrupted" over a complete OUT, or leave the old checkpoint or a
    half-removed temp dir behind as hidden siblings of OUT. Only Python-level handlers can be held (a signal
    left at the OS default still ends the process at once), and only from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    held, previous = [], {}
    for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        handler = signal.getsignal(sig)
        if callable(handler):
            previous[sig] = handler
            signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        _restore_handlers(list(previous.items()))
        if held:
            previous[held[0]](held[0], None)  # raises KeyboardInterrupt (or the CLI's Terminated) now


def _restore_handlers(items: list) -> None:
    """signal.signal for each (signal, handler), all of them even if a signal arrives in between and its
    (already restored) handler raises: one left holding would swallow that signal for the rest of the process."""
    if items:
        try:
            signal.signal(*items[0])
        finally:
            _restore_handlers(items[1:])


def _hidden_name(out: Path, kind: str) -> str:
    """Prefix of OUT's temp siblings: `.OUT.tmp-` (cut to 200 bytes, not characters, so that it and the random
    suffix fit the 255-byte name limit when OUT's own name nearly fills it, in any script)."""
    return f".{out.name.encode('utf-8', 'surrogateescape')[:200].decode('utf-8', 'ignore')}.{kind}-"


def _siblings(out: Path, kind: str) -> list[Path]:
    """OUT's own `.OUT.<kind>-XXXXXXXX` siblings (mkdtemp's 8 random characters exactly: `.bar.old-*` must not
    match `.bar.old-2024.tmp-abcd12_z`, the temp folder of another output named `bar.old-2024`)."""
    prefix = _hidden_name(out, kind)
    pattern = re.compile(re.escape(prefix) + r"[A-Za-z0-9_]{8}")
    parent = out.absolute().parent
    return sorted(p for p in parent.glob(glob.escape(prefix) + "*") if pattern.fullmatch(p.name))


@contextmanager
def _parent_locked(d: Path):
    """An exclusive flock on OUT's parent directory for the commit: two writers of one OUT (two `--overwrite`
    runs) commit one after the other instead of interleaving their renames (which left old checkpoints behind as
    hidden siblings, and failed with "Directory not empty"). No lock file is left; where flock is missing or
    refused (no fcntl, some network file systems) the commit runs unlocked."""
    try:
        import fcntl

        fd = os.open(d, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries a and b in one step (Linux renameat2 RENAME_EXCHANGE), so there is never a
    moment without b. False where the kernel, libc or file system cannot; other errors raise."""
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc older than glibc 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_old(old: Path, out: Path) -> None:
    """Delete the replaced checkpoint; what cannot be deleted (a read-only folder in it) is named, not left as a
    silent hidden sibling for a later run to mistake for a killed write."""
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        _warn(f"{out} was replaced, but the previous checkpoint could not be fully deleted: what is left of "
                      f"it is in {old}; delete it by hand", stacklevel=3)


def linked_into(src: Path, out: Path) -> Path | None:
    """A file of `src` whose real path (links followed) lies inside `out`, or None. A Hugging Face cache
    snapshot links every file into ../../blobs/: writing (or replacing) such an OUT would destroy the source
    while the two directories look apart."""
    out_r = Path(out).absolute().resolve()
    for p in Path(src).rglob("*"):
        if p.is_symlink() and _is_within(p.resolve(), out_r):
            return p
    return None


def expected_tensors(record: dict) -> dict:
    """role -> (shape, dtype) that a layer record implies for its packed tensors."""
    from .runtime.linear import _buffer_shapes

    n, k = record["shape"]
    dt = dtype_from_name(record["dtype"])
    shapes = _buffer_shapes(record["format"], n, k, record.get("block"), record.get("nnz"))
    return {role: (tuple(shape), d or dt) for role, (shape, d) in shapes.items()}


def _default_pattern(packed: formats.Packed) -> str:
    b = packed.meta.get("block")
    return {"semi24": "2:4", "bsr": f"{b}x{b}"}.get(packed.format, "unstructured")


def packed_record(name: str, packed: formats.Packed, tensor_names: dict, bias: str | None) -> dict:
    """The manifest record of one sparse layer (tensor_names: role -> tensor name in the shards)."""
    n, k = packed.shape
    kept = int(formats.mask(packed).sum())
    rec = {
        "name": name,
        "format": packed.format,
        "pattern": packed.meta.get("pattern") or _default_pattern(packed),
        "shape": [n, k],
        "dtype": dtype_name(packed.dtype),
        # fraction of the weights that are not stored (for 2:4 the stored filler positions count as stored)
        "sparsity": round(1.0 - kept / max(n * k, 1), 6),
        "tensors": dict(tensor_names),
        "bias": bias,
        "nbytes": packed.nbytes(),
        "dense_nbytes": packed.dense_nbytes(),
        "block": packed.meta.get("block"),
        "nnz": int(packed.tensors["values"].shape[0]) if packed.format in ("bsr", "bitmask") else None,
    }
    return rec


# ---- writing --------------------------------------------------------------------------------------------

class CheckpointWriter:
    """Write a packed checkpoint directory incrementally; nothing appears at `out_dir` until `finish()`.

        with CheckpointWriter(out, source_dir=src) as w:
            w.add_layer("model.layers.0.mlp.up_proj", packed, bias=None)
            w.add_tensor("model.norm.weight", t)
        # leaving the block normally calls finish(); an exception calls abort() (temp dir removed)

    config:     a dict or a transformers PretrainedConfig written as config.json when `source_dir` has none
                (or no source_dir is given); the source's own config.json wins, copied unchanged, unless
                `prefer_config` (the caller found that the source's no longer describes the model).
    overwrite:  replace an existing non-empty `out_dir` (exchanged with the new one in one step where the file
                system can, else moved aside; then deleted).
    tokenizer_dir: the tokenizer files (all files copied unchanged but config.json and the generation config)
                come from this directory instead of `source_dir`: the tokenizer the caller actually used.
    """

    def __init__(self, out_dir, *, source_dir=None, config=None, generation_config=None, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, source: str | None = None, extra: dict | None = None,
                 prefer_config: bool = False, tokenizer_dir=None):
        _check_out_args(out_dir, overwrite)
        self.out = Path(os.path.abspath(out_dir))  # `sub/..` normalised: its temp sibling must not land inside it
        self.prefer_config = prefer_config and config is not None
        self.source_dir = Path(source_dir).absolute() if source_dir is not None else None
        self.overwrite = overwrite
        self.max_shard_bytes = int(max_shard_bytes)
        if self.max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if self.source_dir is not None:
            if not self.source_dir.is_dir():
                raise CheckpointNotFound(f"source directory not found: {self.source_dir}")
            src_r, out_r = self.source_dir.resolve(), self.out.resolve()
            if _is_within(out_r, src_r) or _is_within(src_r, out_r):
                raise CheckpointError(f"output {self.out} overlaps the source directory {self.source_dir}; "
                                      "the source is never written, choose another output directory")
            linked = linked_into(self.source_dir, self.out)
            if linked is not None:
                raise CheckpointError(f"output {self.out} holds the source's data: {linked} links into it; the "
                                      f"source is never written, choose another output directory")
            source_files(self.source_dir)  # a file it cannot copy fails now, not after the work
        self.tokenizer_dir = Path(tokenizer_dir).absolute() if tokenizer_dir is not None else None
        if self.tokenizer_dir is not None:
            if not self.tokenizer_dir.is_dir():
                raise CheckpointNotFound(f"tokenizer directory not found: {self.tokenizer_dir}")
            source_files(self.tokenizer_dir)
        check_output_dir(self.out, overwrite)
        if self.out.is_symlink():  # a link to a directory: write there (the link keeps pointing at OUT)
            self.out = self.out.resolve()
        stale = _siblings(self.out, "tmp")
        if stale:  # a killed write (or one running now) leaves its temp folder: say so rather than fill the disk
            _warn(f"{len(stale)} temp folder(s) of earlier writes of {self.out.name} are next to it (e.g. "
                          f"{stale[0]}): left by a killed run, or in use by one still writing; delete them if no "
                          f"other process is writing {self.out}", stacklevel=2)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=_hidden_name(self.out, "tmp"), dir=self.out.parent))
        except OSError as e:  # say what we tried to write, not the temp name (read-only file system, ...)
            raise OSError(e.errno, f"cannot write the output {self.out}: {e.strerror} (in {self.out.parent})") \
                from None
        self.config = config
        self.generation_config = generation_config
        self.source = source if source is not None else (str(self.source_dir) if self.source_dir else None)
        self.extra = dict(extra or {})
        self.layers: list[dict] = []
        self.tensors: dict[str, dict] = {}  # name -> {shard (temp name), dtype, shape, nbytes}
        self.aliases: dict[str, str] = {}
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._buf_storages: set[int] = set()
        self._shards: list[str] = []  # temp shard names in order
        self._done = False
        self._said_complete = False

    # -- context manager
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if not self._done:
                self.finish()
        else:
            self.abort()
        return False

    # -- adding content
    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Add a plain tensor (a state_dict entry) under `name`."""
        if self._done:
            raise CheckpointError("checkpoint writer already finished")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if name in self.tensors or name in self._buf or name in self.aliases:
            raise CheckpointError(f"tensor {name!r} added twice")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type == "meta":
            raise CheckpointError(f"{name}: tensor is on the meta device (no data to save)")
        if tensor.dtype not in _TORCH_TO_ST:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        # safetensors refuses tensors that share storage (tied weights, views of a bigger buffer): copy those
        storage = t.untyped_storage()
        if storage.data_ptr() in self._buf_storages or storage.nbytes() != nbytes:
            t = t.clone()
            storage = t.untyped_storage()
        if self._buf and self._buf_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buf[name] = t
        self._buf_bytes += nbytes
        if nbytes:
            self._buf_storages.add(storage.data_ptr())
        self.tensors[name] = {"shard": None, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                              "nbytes": nbytes}

    def add_layer(self, name: str, packed: formats.Packed, bias: torch.Tensor | None = None,
                  validate: bool = True) -> dict:
        """Add one sparse Linear: its packed tensors under `{name}.{role}`, its bias under `{name}.bias`."""
        if validate:
            formats.validate(packed, name)
        roles = expected_tensors({"format": packed.format, "shape": list(packed.shape),
                                  "dtype": dtype_name(packed.dtype), "block": packed.meta.get("block"),
                                  "nnz": packed.tensors["values"].shape[0]})
        if set(roles) != set(packed.tensors):
            raise CheckpointError(f"{name}: {packed.format} tensors {sorted(packed.tensors)} != expected "
                                  f"{sorted(roles)}")
        names = {role: f"{name}.{role}" for role in roles}
        for role, tname in names.items():
            self.add_tensor(tname, packed.tensors[role])
        bias_name = None
        if bias is not None:
            bias_name = f"{name}.bias"
            self.add_tensor(bias_name, bias)
        rec = packed_record(name, packed, names, bias_name)
        self.layers.append(rec)
        return rec

    def add_alias(self, alias: str, target: str) -> None:
        """`alias` is the same tensor as `target` (tied weights): stored once, re-tied on load."""
        if alias in self.tensors or alias in self.aliases:
            raise CheckpointError(f"tensor {alias!r} added twice")
        self.aliases[alias] = target

    # -- finishing
    def _flush(self) -> None:
        if not self._buf:
            return
        from safetensors.torch import save_file

        fname = f"shard-{len(self._shards) + 1:05d}.safetensors"
        path = self.tmp / fname
        try:
            save_file(self._buf, str(path), metadata={"format": "pt", "producer": "sparserun"})
            _fsync_file(path)
        except Exception as e:  # a full disk: safetensors' message names neither OUT nor where it wrote
            raise CheckpointError(f"cannot write the output {self.out} (a shard in {self.tmp.parent}): "
                                  f"{' '.join(str(e).split())[:300]}") from e
        for name in self._buf:
            self.tensors[name]["shard"] = fname
        self._shards.append(fname)
        self._buf, self._buf_bytes, self._buf_storages = {}, 0, set()

    def _write_config(self) -> None:
        copied = set()
        if self.source_dir is not None:
            for p in source_files(self.source_dir):
                if (p.name == CONFIG and self.prefer_config) or (self.tokenizer_dir is not None
                                                                 and p.name not in _NOT_TOKENIZER_FILES):
                    continue
                shutil.copyfile(p, self.tmp / p.name)
                copied.add(p.name)
        if self.tokenizer_dir is not None:
            for p in source_files(self.tokenizer_dir):
                if p.name not in _NOT_TOKENIZER_FILES:  # one tokenizer's files, never a mix of two
                    shutil.copyfile(p, self.tmp / p.name)
        if CONFIG not in copied:
            if self.config is None:
                raise CheckpointError("no config.json: give a source_dir that has one or pass config=")
            cfg = self.config
            if hasattr(cfg, "to_json_file"):
                cfg.to_json_file(str(self.tmp / CONFIG), use_diff=False)
            else:
                (self.tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if "generation_config.json" not in copied and self.generation_config is not None:
            self.generation_config.to_json_file(str(self.tmp / "generation_config.json"))
        for p in self.tmp.iterdir():
            if p.is_file() and p.suffix != ".safetensors":
                _fsync_file(p)

    def finish(self) -> Path:
        """Write the last shard, the manifest and the copied files, then move the temp dir to `out_dir`."""
        if self._done:
            return self.out
        try:
            for alias, target in self.aliases.items():
                if target not in self.tensors:
                    raise CheckpointError(f"alias {alias!r} points to {target!r}, which was not saved")
            self._flush()
            final = self._rename_shards()
            try:
                self._write_config()
            except OSError as e:  # ENOSPC while copying the tokenizer: say which output it was for
                what = Path(e.filename).name if e.filename else "the config and tokenizer files"
                raise CheckpointError(f"cannot write the output {self.out}: {e.strerror or e} (copying "
                                      f"{what})") from e
            manifest = self._manifest(final)
            mpath = self.tmp / MANIFEST
            mpath.write_text(json.dumps(manifest, indent=1) + "\n")
            _fsync_file(mpath)
            self._fix_permissions()
            _fsync_dir(self.tmp)
            # the lock first: a wait for another writer's commit must stay interruptible
            with _parent_locked(self.out.parent), _signals_deferred() as held:
                self._move_into_place()
                self._done = True
                if held:  # raised once this block ends: say that it came after OUT was complete
                    self._say_complete()
        except BaseException as e:
            if self._done and not self._said_complete and isinstance(e, KeyboardInterrupt):
                self._say_complete()  # an interrupt in the instant after the commit block
            self.abort()
            raise
        return self.out

    def _say_complete(self) -> None:
        self._said_complete = True
        _warn(f"{self.out} was written completely before the interrupt", stacklevel=2)

    def _fix_permissions(self) -> None:
        # mkdtemp makes the directory 0700 (and safetensors its files 0600); a checkpoint should get the modes
        # any directory made with mkdir would get (e.g. readable by a serving user), i.e. follow the umask.
        os.chmod(self.tmp, _umask_mode(0o777))
        for p in self.tmp.iterdir():
            if p.is_file():
                os.chmod(p, _umask_mode(0o666))

    def _rename_shards(self) -> dict[str, str]:
        n = len(self._shards)
        final = {}
        for i, tmpname in enumerate(self._shards, 1):
            name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / tmpname, self.tmp / name)
            final[tmpname] = name
        for info in self.tensors.values():
            info["shard"] = final[info["shard"]]
        return final

    def _manifest(self, final: dict[str, str]) -> dict:
        from . import __version__

        shards = {}
        for name in final.values():
            p = self.tmp / name
            shards[name] = {"sha256": sha256_file(p), "nbytes": p.stat().st_size}
        packed_names = {t for rec in self.layers for t in rec["tensors"].values()}
        dense = {k: v for k, v in self.tensors.items() if k not in packed_names}
        totals = {
            "sparse_layers": len(self.layers),
            "sparse_nbytes": sum(r["nbytes"] for r in self.layers),
            "sparse_dense_nbytes": sum(r["dense_nbytes"] for r in self.layers),
            "dense_tensors": len(dense),
            "dense_nbytes": sum(v["nbytes"] for v in dense.values()),
            "shard_nbytes": sum(s["nbytes"] for s in shards.values()),
        }
        m = {"format_version": FORMAT_VERSION, "sparserun_version": __version__}
        if self.source:
            m["source"] = self.source
        m.update(self.extra)
        m.update({"layers": self.layers, "aliases": self.aliases, "totals": totals,
                  "tensors": self.tensors, "shards": shards})
        return m

    def _move_into_place(self) -> None:
        """Called holding the parent's lock (finish)."""
        out = self.out
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            os.replace(self.tmp, out)
            _fsync_dir(out.parent)
            return
        if not self.overwrite:  # appeared while we were writing
            raise OutputExists(f"output directory {out} exists and is not empty")
        if _exchange(self.tmp, out):  # OUT is the new checkpoint; the temp name now holds the old one
            _fsync_dir(out.parent)
            _remove_old(self.tmp, out)
            return
        # two renames: a kill between them leaves OUT missing and the old checkpoint in `old`, which
        # check_output_dir then names rather than let a new run write OUT as if nothing had been there
        old = Path(tempfile.mkdtemp(prefix=_hidden_name(out, "old"), dir=out.parent))
        old.rmdir()
        os.replace(out, old)
        try:
            os.replace(self.tmp, out)
        except BaseException:
            os.replace(old, out)  # put the previous checkpoint back
            raise
        _fsync_dir(out.parent)
        _remove_old(old, out)

    def abort(self) -> None:
        """Drop everything written so far (OUT is untouched)."""
        self._buf = {}
        if self.tmp.exists():
            with _signals_deferred():  # a second Ctrl-C must not leave half a temp dir behind
                shutil.rmtree(self.tmp, ignore_errors=True)


# ---- reading --------------------------------------------------------------------------------------------

def _read_header(path: Path) -> dict:
    """Parse a safetensors header (8-byte little-endian length + JSON) and check it against the file size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            if n > _MAX_HEADER:
                raise ValueError(f"header length {n} exceeds the {_MAX_HEADER} bytes safetensors allows")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptShard(f"shard {path.name} is not a readable safetensors file: "
                           f"{'nested too deeply' if isinstance(e, RecursionError) else e}") from None
    data = size - 8 - n
    if not isinstance(header, dict):
        raise CorruptShard(f"shard {path.name} is not a readable safetensors file: header is not an object")
    header.pop("__metadata__", None)
    extents = []
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape, code = info["shape"], info["dtype"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (begin, end, *shape)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CorruptShard(f"shard {path.name}: malformed header entry for tensor {name!r}") from None
        if code not in _ST_DTYPES:
            raise CorruptShard(f"shard {path.name}: tensor {name!r} has unsupported dtype {code!r}")
        if not (begin <= end <= data):
            raise CorruptShard(f"shard {path.name}: tensor {name!r} lies past the end of the file "
                               f"(truncated?)")
        if end - begin != math.prod(shape) * _ST_DTYPES[code].itemsize:
            raise CorruptShard(f"shard {path.name}: tensor {name!r} spans {end - begin} bytes, its shape "
                               f"{shape} and dtype {code} need {math.prod(shape) * _ST_DTYPES[code].itemsize}")
        extents.append((begin, end, name))
    extents.sort()
    for (_, end0, a), (begin1, _, b) in zip(extents, extents[1:]):
        if begin1 < end0:
            raise CorruptShard(f"shard {path.name}: tensors {a!r} and {b!r} overlap")
    return header


class CheckpointReader:
    """Strict, lazy reader of a packed checkpoint directory (see module docstring for what is checked).

    verify: check every shard's sha256 against the manifest (reads each shard once; False skips it, the
            size and header checks still run).
    """

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointNotFound(f"checkpoint directory not found: {self.path}")
        if not self.path.is_dir():
            raise CheckpointNotFound(f"not a directory: {self.path}")
        if not (self.path / CONFIG).is_file():
            raise MissingConfig(f"{self.path} has no config.json (not a model checkpoint directory)")
        self.manifest = self._read_manifest()
        self.layers: list[dict] = self.manifest["layers"]
        self.aliases: dict[str, str] = self.manifest.get("aliases", {})
        self.tensor_map: dict[str, dict] = self.manifest["tensors"]
        self._handles: dict = {}
        self._headers = self._check_shards(verify)
        self._check_tensors()

    # -- context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        self._handles.clear()

    @property
    def config(self) -> dict:
        try:
            return json.loads((self.path / CONFIG).read_text())
        except (OSError, ValueError) as e:
            raise MissingConfig(f"{self.path / CONFIG} is not valid JSON: {e}") from None

    # -- checks
    def _read_manifest(self) -> dict:
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise ManifestError(f"{self.path} has no {MANIFEST}: not a sparserun packed checkpoint "
                                "(make one with `sparserun convert` or sparserun.save)")
        try:
            m = json.loads(mpath.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise ManifestError(f"{mpath} is not valid JSON: "
                                f"{'nested too deeply' if isinstance(e, RecursionError) else e}") from None
        if not isinstance(m, dict):
            raise ManifestError(f"{mpath}: expected a JSON object")
        v = m.get("format_version")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ManifestError(f"{mpath}: missing or invalid format_version {v!r}")
        if v > FORMAT_VERSION:
            raise UnsupportedVersion(f"{mpath}: format_version {v} is newer than this sparserun supports "
                                     f"({FORMAT_VERSION}); upgrade sparserun")
        for key, typ in (("layers", list), ("tensors", dict), ("shards", dict)):
            if not isinstance(m.get(key), typ):
                raise ManifestError(f"{mpath}: missing or invalid {key!r}")
        if not isinstance(m.get("aliases", {}), dict):
            raise ManifestError(f"{mpath}: invalid 'aliases'")
        for shard, info in m["shards"].items():
            if "/" in shard or "\\" in shard or shard in ("", ".", "..") or not shard.endswith(".safetensors"):
                raise ManifestError(f"{mpath}: invalid shard file name {shard!r}")
            if not isinstance(info, dict):
                raise ManifestError(f"{mpath}: shard {shard!r}: expected an object with sha256 and nbytes")
        for name, info in m["tensors"].items():
            if not isinstance(info, dict) or info.get("shard") not in m["shards"]:
                raise ManifestError(f"{mpath}: tensor {name!r} points to an unlisted shard")
        seen = set()
        for i, rec in enumerate(m["layers"]):
            self._check_record(mpath, i, rec)
            if rec["name"] in seen:
                raise ManifestError(f"{mpath}: layer {rec['name']!r} recorded twice")
            seen.add(rec["name"])
        packed = {t for rec in m["layers"] for t in rec["tensors"].values()}
        for alias, target in m.get("aliases", {}).items():
            if not isinstance(target, str) or target not in m["tensors"]:
                raise ManifestError(f"{mpath}: alias {alias!r} points to unknown tensor {target!r}")
            # an alias names a tied plain tensor (lm_head.weight -> the embedding): never a stored tensor, which
            # it would silently replace, nor a part of a packed weight
            if alias in m["tensors"]:
                raise ManifestError(f"{mpath}: alias {alias!r} is also a stored tensor")
            if target in packed:
                raise ManifestError(f"{mpath}: alias {alias!r} points into the packed layer tensor {target!r}")
        return m

    @staticmethod
    def _check_record(mpath: Path, i: int, rec) -> None:
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
            raise ManifestError(f"{mpath}: layer record {i} has no name")
        name = rec["name"]
        fmt = rec.get("format")
        if fmt not in formats.FORMATS:
            raise UnknownFormat(f"{mpath}: layer {name}: unknown format {fmt!r} (known: "
                                f"{', '.join(formats.FORMATS)}); upgrade sparserun?")
        try:
            pat = parse_pattern(rec.get("pattern"))
        except ValueError as e:
            raise ManifestError(f"{mpath}: layer {name}: {e}") from None
        if pat.format != fmt:
            raise ManifestError(f"{mpath}: layer {name}: pattern {rec.get('pattern')!r} is not stored as {fmt}")
        shape = rec.get("shape")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise ManifestError(f"{mpath}: layer {name}: invalid shape {shape!r}")
        try:
            dt = dtype_from_name(rec.get("dtype"))
        except ValueError:
            raise ManifestError(f"{mpath}: layer {name}: unknown dtype {rec.get('dtype')!r}") from None
        if dt not in SUPPORTED_DTYPES:
            raise ManifestError(f"{mpath}: layer {name}: unsupported weight dtype {rec.get('dtype')!r}")
        if fmt == "bsr" and (rec.get("block") != pat.block):
            raise ManifestError(f"{mpath}: layer {name}: block {rec.get('block')!r} does not match pattern "
                                f"{rec.get('pattern')!r}")
        nnz = rec.get("nnz")
        if fmt in ("bsr", "bitmask") and not (isinstance(nnz, int) and not isinstance(nnz, bool) and nnz >= 0):
            raise ManifestError(f"{mpath}: layer {name}: {fmt} record needs a non-negative 'nnz'")
        if fmt == "bsr" and (shape[0] % pat.block or shape[1] % pat.block):
            raise ManifestError(f"{mpath}: layer {name}: shape {shape} is not divisible by block {pat.block}")
        roles = set(expected_tensors(rec))
        tensors = rec.get("tensors")
        if not isinstance(tensors, dict) or set(tensors) != roles:
            raise ManifestError(f"{mpath}: layer {name}: tensors {sorted(tensors or {})} != {sorted(roles)} "
                                f"for format {fmt}")
        if not all(isinstance(t, str) for t in (*tensors.values(), rec.get("bias") or "")):
            raise ManifestError(f"{mpath}: layer {name}: tensor names must be strings")

    def _check_shards(self, verify: bool) -> dict[str, dict]:
        headers = {}
        for shard, info in self.manifest["shards"].items():
            p = self.path / shard
            if not p.is_file():
                raise CorruptShard(f"shard {shard} listed in {MANIFEST} is missing from {self.path}")
            size = p.stat().st_size
            if size != info.get("nbytes"):
                raise CorruptShard(f"shard {shard} has {size} bytes but {MANIFEST} says {info.get('nbytes')} "
                                   f"(truncated or modified)")
            if verify:
                got = sha256_file(p)
                if got != info.get("sha256"):
                    raise ChecksumMismatch(f"shard {shard}: sha256 mismatch (file corrupted or modified): "
                                           f"expected {info.get('sha256')}, got {got}")
            headers[shard] = _read_header(p)
        return headers

    def _check_tensors(self) -> None:
        for name, info in self.tensor_map.items():
            h = self._headers[info["shard"]].get(name)
            if h is None:
                raise TensorMismatch(f"tensor {name} is missing from shard {info['shard']}")
            dt = _ST_DTYPES[h["dtype"]]
            if list(h["shape"]) != list(info.get("shape", [])) or dtype_name(dt) != info.get("dtype"):
                raise TensorMismatch(f"tensor {name} in shard {info['shard']} is {dtype_name(dt)} "
                                     f"{list(h['shape'])}, {MANIFEST} says {info.get('dtype')} {info.get('shape')}")
        for rec in self.layers:
            exp = expected_tensors(rec)
            for role, tname in rec["tensors"].items():
                if tname not in self.tensor_map:
                    raise TensorMismatch(f"layer {rec['name']}: tensor {tname} is not in any shard")
                info = self.tensor_map[tname]
                shape, dt = exp[role]
                if tuple(info["shape"]) != shape or info["dtype"] != dtype_name(dt):
                    raise TensorMismatch(f"layer {rec['name']}: tensor {tname} is {info['dtype']} {info['shape']}, "
                                         f"the record implies {dtype_name(dt)} {list(shape)}")
            b = rec.get("bias")
            if b is not None:
                info = self.tensor_map.get(b)
                if info is None:
                    raise TensorMismatch(f"layer {rec['name']}: bias tensor {b} is not in any shard")
                if info["shape"] != [rec["shape"][0]]:
                    raise TensorMismatch(f"layer {rec['name']}: bias {b} has shape {info['shape']}, "
                                         f"expected [{rec['shape'][0]}]")

    # -- access
    def packed_tensor_names(self) -> set[str]:
        return {t for rec in self.layers for t in rec["tensors"].values()}

    def dense_tensor_names(self) -> list[str]:
        """Plain tensors (everything not part of a layer's packed weight; biases included)."""
        packed = self.packed_tensor_names()
        return [n for n in self.tensor_map if n not in packed]

    def _handle(self, shard: str):
        h = self._handles.get(shard)
        if h is None:
            from safetensors import safe_open

            try:
                h = safe_open(str(self.path / shard), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error type
                raise CorruptShard(f"shard {shard} cannot be opened: {e}") from None
            self._handles[shard] = h
        return h

    def get_tensor(self, name: str, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor by state_dict name; `dtype` casts floating tensors only (index tensors never)."""
        if name in self.aliases:
            name = self.aliases[name]
        info = self.tensor_map.get(name)
        if info is None:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.path}")
        try:
            t = self._handle(info["shard"]).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CorruptShard(f"shard {info['shard']}: cannot read tensor {name}: {e}") from None
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        return t

    def load_layer(self, record: "dict | str", device=None, dtype: torch.dtype | None = None,
                   validate: bool = False) -> formats.Packed:
        """The Packed weight of one recorded layer (validate=True also runs the format's full validation)."""
        if isinstance(record, str):
            record = self.layer(record)
        tensors = {role: self.get_tensor(t, device, dtype) for role, t in record["tensors"].items()}
        meta = {"pattern": record["pattern"]}
        if record.get("block"):
            meta["block"] = record["block"]
        p = formats.Packed(record["format"], tuple(record["shape"]), tensors, meta)
        if validate:
            try:
                formats.validate(p, record["name"])
            except ValueError as e:
                raise TensorMismatch(str(e)) from None
        return p

    def layer(self, name: str) -> dict:
        for rec in self.layers:
            if rec["name"] == name:
                return rec
        raise KeyError(f"layer {name!r} is not recorded in {self.path / MANIFEST}")


def read_manifest(path) -> dict:
    """Just the checked manifest (no sha256 pass): for inspection."""
    with CheckpointReader(path, verify=False) as r:
        return r.manifest

