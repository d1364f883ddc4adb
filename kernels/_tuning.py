"""Per-shape kernel config tuning: time every candidate config of a launch once, keep the fastest.

Keyed by (op, N, K, M bucket, dtype, bias, device): the M bucket (next power of two) keeps a new batch
size from re-tuning. Whole launches are timed (matmul + split-K reduce) on the GPU alone (runtime/tuning.py graph_timer).
Capture-safe: inside CUDA-graph capture or torch.compile tracing nothing is timed; the cached choice
(or the op's default) is used.
"""
from __future__ import annotations

from typing import Callable

import torch

_cache: dict[tuple, dict] = {}


def _cannot_time() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and getattr(compiler, "is_compiling", lambda: False)():
        return True  # checked first: torch.compile cannot trace the capture query below
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def pick(key: tuple, candidates: list[dict], launch: Callable[[dict], None], default: dict) -> dict:
    hit = _cache.get(key)
    if hit is not None:
        return hit
    if _cannot_time() or len(candidates) <= 1:
        return candidates[0] if len(candidates) == 1 else default
    # GPU time only (CUDA-graph replay, L2 flushed per call), as the backend choice is timed: with do_bench,
    # a decode-size launch measures the host's launch cost, identical for every config, and noise decides
    from ..runtime.tuning import graph_timer

    best, best_ms = default, float("inf")
    for cfg in candidates:
        try:
            launch(cfg)  # compile (and fail, for a config that does not fit) outside any capture
            ms = graph_timer(lambda: launch(cfg), calls=8, replays=5)
        except Exception:  # a config that does not fit this GPU (shared memory, registers) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _cache[key] = best
    return best


def tuned() -> dict[tuple, dict]:
    """What has been tuned in this process (benchmarks record it next to their timings)."""
    return dict(_cache)
