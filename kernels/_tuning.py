"""Per-shape kernel config tuning: time every candidate config of a launch once, keep the fastest.

Keyed by (op, N, K, M bucket, dtype, bias, device): the M bucket (next power of two) keeps a new batch
size from re-tuning. Whole launches are timed (matmul + split-K reduce) on the GPU alone (runtime/tuning.py graph_timer).
Capture-safe: inside CUDA-graph capture or torch.compile tracing nothing is timed; the cached choice
(or the op's default) is used.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..runtime.tuning import Uncheckable

_cache: dict[tuple, dict] = {}


def _cannot_time() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and getattr(compiler, "is_compiling", lambda: False)():
        return True  # checked first: torch.compile cannot trace the capture query below
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_rejected: dict[tuple, list] = {}  # key -> [(config, why)]: configs that failed or computed wrong (reports)


def pick(key: tuple, candidates: Callable[[], list[dict]], launch: Callable[[dict], object],
         default: Callable[[], dict], check: Callable[[object], float] | None = None, tol: float = 2e-2) -> dict:
    """The tuned config for `key`. `candidates` and `default` are called only on a cache miss: building the
    lists on every call cost more host time than the rest of an eager decode launch.

    `launch(cfg)` runs one config and returns its output; `check(output)` returns its relative error against
    a reference (the launchers check a sample of output rows). A config over `tol` is never chosen, however
    fast: a miscompile or a race that only shows on some GPU must cost speed, not correctness."""
    hit = _cache.get(key)
    if hit is not None:
        return hit
    candidates, default = candidates(), default()
    if _cannot_time() or len(candidates) <= 1:
        return candidates[0] if len(candidates) == 1 else default
    # GPU time only (CUDA-graph replay, L2 flushed per call), as the backend choice is timed: with do_bench,
    # a decode-size launch measures the host's launch cost, identical for every config, and noise decides
    from ..runtime.tuning import graph_timer

    best, best_ms = default, float("inf")
    for cfg in candidates:
        try:
            out = launch(cfg)  # compile (and fail, for a config that does not fit) outside any capture
            try:
                err = check(out) if check is not None else 0.0
            except Uncheckable:
                return default  # uncached: the next finite input tunes this key
            if not err <= tol:  # also catches NaN
                _rejected.setdefault(key, []).append((cfg, f"relative error {err:.3g}"))
                continue
            ms = graph_timer(lambda: launch(cfg), calls=8, replays=5)
        except Exception as e:  # a config that does not fit this GPU (shared memory, registers) is skipped
            _rejected.setdefault(key, []).append((cfg, f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best_ms == float("inf") and check is not None:
        # nothing ran correctly: raise rather than run an unchecked default (the dispatcher then drops this
        # backend for the shape and uses dense; a forced backend reports it)
        why = "; ".join(f"{c} -> {w}" for c, w in _rejected.get(key, [])[-3:])
        raise RuntimeError(f"no kernel config for {key} ran correctly on this GPU ({why})")
    _cache[key] = best
    return best


def tuned() -> dict[tuple, dict]:
    """What has been tuned in this process (benchmarks record it next to their timings)."""
    return dict(_cache)


def rejected() -> dict[tuple, list]:
    """Configs skipped while tuning in this process, with why (failed to run, or wrong output)."""
    return {k: list(v) for k, v in _rejected.items()}


def sample_rows(n: int, count: int = 64) -> slice | list:
    """Output rows a tuning check compares: the first and the last `count` (tile tails live at the end)."""
    if n <= 2 * count:
        return slice(0, n)
    return list(range(count)) + list(range(n - count, n))


def rel_err(got, ref) -> float:
    """‖got − ref‖ / ‖ref‖; raises Uncheckable when ref, as got's dtype, is not all finite."""
    if not bool(torch.isfinite(ref.to(got.dtype)).all()):
        raise Uncheckable(f"the reference output has NaN or Inf in {str(got.dtype).removeprefix('torch.')} "
                          f"(NaN/Inf in the input, or an overflow): nothing to check a candidate against")
    den = float(ref.norm())
    return float((got.float() - ref).norm()) / (den if den > 0 else 1.0)
