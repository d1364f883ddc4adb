"""Helpers the kernel launchers share: interpreter detection, M bucketing, SM count, dot precision."""
from __future__ import annotations

import contextlib
import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1): one small config, no autotuning,
    because the interpreter's cost grows with programs x loop steps and each config would run."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division. Not triton.cdiv: since Triton 3.9 that is a constexpr_function, ~3 µs per call
    from Python, and the launchers call it on every forward (eager decode is host-bound)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1); host-side, for the same reason as `cdiv`."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def m_bucket(m: int) -> int:
    """Next power of two >= m: the autotune key, so a new batch size never triggers a re-tune."""
    return 1 if m <= 1 else 1 << (m - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(t: torch.Tensor) -> int:
    return sm_count(t.device.index or 0) if t.is_cuda else 4


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must be exact fp32 math (tf32 would cost ~3e-4 relative error); 16-bit inputs are
    already what the tensor cores take."""
    return "ieee" if dtype == torch.float32 else "tf32"


def as_2d(x: torch.Tensor, k: int, name: str) -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"{name}: input last dim {x.shape[-1]} != in_features {k}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name}: input dtype {x.dtype} not supported (float16, bfloat16, float32)")
    # reshape keeps a strided view when it can; the kernels take both strides, so only a layout that
    # cannot be flattened to 2-D is copied
    return x.reshape(-1, k)


# Tests set this to fill split-K workspaces with NaN, so a slice no program wrote shows up in the output.
POISON_WORKSPACE = False


def workspace(shape, device) -> torch.Tensor:
    if POISON_WORKSPACE:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def on_device(name: str, x: torch.Tensor, **tensors):
    """The context a launch for x runs in. Every tensor must be on x's device, as nn.Linear requires: Triton
    takes a pointer from another device without a word. And Triton launches on the *current* CUDA device,
    whatever device the pointers belong to, so a layer on cuda:1 called while cuda:0 is current would read
    cuda:1 memory from cuda:0 (and the tuner would time on the wrong GPU): x's device is made current."""
    for what, t in tensors.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name}: {what} is on {t.device}, the input on {x.device}")
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def check_out(out: torch.Tensor | None, m: int, n: int, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be {x.dtype} [{m}, {n}] on {x.device}, got {out.dtype} "
                         f"{list(out.shape)} on {out.device}")
    return out
