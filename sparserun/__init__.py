"""sparserun: pruned LLMs that run faster on NVIDIA GPUs.

Public API (everything else is internal):
    prune(model, method, pattern, sparsity=None, calib=None, **opts) -> report
    sparsify_(model, pattern=..., filter_fn=None, masks=None, sparsity=None)
    save(model, out_dir) / load(dir, device=None, dtype=None, group_siblings=None: SPARSERUN_GROUP_SIBLINGS)
    group_siblings(model) / ungroup_siblings(model)
    SparseLinear, patterns
"""
from __future__ import annotations

from . import patterns

__version__ = "0.1.0"

__all__ = ["prune", "sparsify_", "save", "load", "group_siblings", "ungroup_siblings", "SparseLinear", "patterns",
           "SparserunWarning", "__version__"]


class SparserunWarning(UserWarning):
    """What sparserun warns about (the CLI prints these as one `warning: ...` line, wherever they point)."""


def _warn(message: str, stacklevel: int = 1) -> None:
    """warnings.warn(message, SparserunWarning), pointing `stacklevel` frames above the caller."""
    import warnings

    warnings.warn(message, SparserunWarning, stacklevel=stacklevel + 2)


def _umask_mode(mode: int) -> int:
    """`mode` (0o666 for a file, 0o777 for a directory) under the process umask: what open() or mkdir would
    have given. mkstemp/mkdtemp make 0600/0700, too tight for a checkpoint, results or a cache others read."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def __getattr__(name):
    # Lazy: `import sparserun` must stay cheap and must not import triton or transformers.
    if name == "SparseLinear":
        from .runtime.linear import SparseLinear
        return SparseLinear
    if name == "sparsify_":
        from .runtime.sparsify import sparsify_
        return sparsify_
    if name in ("save", "load"):
        from .runtime import io
        return getattr(io, name)
    if name in ("group_siblings", "ungroup_siblings"):
        from .runtime import siblings
        return getattr(siblings, name)
    if name == "prune":
        from .prune.api import prune
        return prune
    raise AttributeError(f"module 'sparserun' has no attribute {name!r}")
