"""One-shot pruning: scores.py (magnitude, wanda, taylor, obd), masks.py (pattern-aware selection),
sparsegpt.py (OBS with reconstruction), calibrate.py (layer-sequential driver), api.py (`prune`).

The function's arguments: help(sparserun.prune.api.prune), or docs/prune_quality.md.

`sparserun.prune` is both this package and the public function `sparserun.prune(model, method, pattern,
...)`: once any submodule is imported, Python binds the attribute `sparserun.prune` to this package, which
would shadow the function. Making the package itself callable keeps `sparserun.prune(...)` working
whichever of the two the attribute holds.
"""
from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .api import prune

        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage


def __getattr__(name):
    if name in ("prune", "PruneReport"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
