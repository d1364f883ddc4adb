"""The CUDA 2:4 GEMM (csrc/semi24_gemm.cu, mma.sp): just-in-time build, load-time repack, torch custom op.

* `load_extension()` builds csrc/ with torch.utils.cpp_extension on first use when CUDA, nvcc and an
  sm_80+ GPU are present, cached per (torch version, CUDA version, GPU arch, source hash) under
  $SPARSERUN_CACHE_DIR, else $XDG_CACHE_HOME/sparserun or ~/.cache/sparserun. `SPARSERUN_NO_CUDA_BUILD=1`
  skips it. Any build failure gives one warning and returns None (callers fall back to other backends);
  importing this module never builds.
* `repack(values, meta, n, k)` turns the portable disk layout (docs/format.md) into the kernel's operand
  layout (vf, ef); pure torch, any device. `emulate_dense(vf, ef, n, k)` rebuilds the dense weight from
  (vf, ef) by following the PTX ISA's mma.sp fragment/metadata rules, independently of `repack`, so the CPU
  tests check the layout the kernel relies on. The layout is documented in docs/cuda_kernel.md and at the
  top of csrc/semi24_gemm.cu.
* `semi24_gemm_cuda(x, vf, ef, bias, n, config)`: the op `sparserun::semi24_gemm_cuda`, with a fake
  (shape-only) implementation so torch.compile and CUDA-graph capture see one opaque op.

No `from __future__ import annotations` here: torch.library.custom_op reads the real annotations.
"""
import hashlib
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

ROW_PAD = 128    # vf/ef rows are padded to the largest CTA tile along N
KSTEP = 32       # logical K per mma.sp.m16n8k32
PAD_NIBBLE = 0b0100  # positions (0, 1): a valid, ordered nibble for padding groups (values there are 0)

ERROR_CODES = {0: "ok", 1: "bad shape", 2: "bad dtype", 3: "bad alignment", 4: "unsupported arch",
               5: "bad config", 6: "launch failed", 7: "CUDA error"}
NUM_CONFIGS = 3  # csrc/semi24_gemm.cu: 0 = decode (32x16), 1 = medium (64x64), 2 = prefill (128x128)



def _csrc_dir() -> Path:
    """csrc/ ships as the data package sparserun.csrc (pyproject); a source checkout has it at the top."""
    import importlib.util

    spec = importlib.util.find_spec("sparserun.csrc")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "csrc"


_CSRC = _csrc_dir()
_SOURCES = ("semi24_gemm.cu", "semi24_binding.cpp")


# ---- repack: portable layout -> kernel operands -------------------------------------------------------
def padded_sizes(n: int, k: int) -> tuple[int, int]:
    """(rows of vf/ef after padding, number of 32-wide k-steps) for a [n, k] weight."""
    kp = (k + 3) // 4 * 4
    return (n + ROW_PAD - 1) // ROW_PAD * ROW_PAD, (kp + KSTEP - 1) // KSTEP


def repack(values: Tensor, meta: Tensor, n: int, k: int) -> tuple[Tensor, Tensor]:
    """values [n, Kp/2], meta [n, ceil(Kp/8)] uint8 (docs/format.md) -> (vf, ef) for csrc/semi24_gemm.cu.

    vf [Np/16, KS, 32, 8] (values dtype): lane 4g+t of the (16-row tile, k-step) holds, in order,
        compressed (row g, cols 2t, 2t+1), (row g+8, cols 2t, 2t+1), (row g, cols 2t+8, 2t+9),
        (row g+8, cols 2t+8, 2t+9), where compressed col c of k-step s is values[row, 16 s + c].
    ef [Np/16, KS, 16] int32 (bit pattern of the uint32 metadata register): word 2g+t (t in {0, 1}) =
        (16-bit metadata of row g, logical cols 16t..16t+15) | (same for row g+8) << 16, a 16-bit half being
        4 disk nibbles (group 4q+i in bits 4i..4i+3). Np = n rounded up to 128, KS = ceil(Kp/32).
    Padding rows and columns hold value 0 with positions (0, 1).
    """
    kp = (k + 3) // 4 * 4
    g = kp // 4
    if tuple(values.shape) != (n, kp // 2):
        raise ValueError(f"repack: values shape {tuple(values.shape)}, expected {(n, kp // 2)} for a "
                         f"[{n}, {k}] weight")
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (n, (g + 1) // 2):
        raise ValueError(f"repack: meta must be uint8 {(n, (g + 1) // 2)}, got {meta.dtype} "
                         f"{tuple(meta.shape)}")
    np_, ks = padded_sizes(n, k)
    kpad = ks * KSTEP
    dev = values.device
    vals = values.new_zeros(np_, kpad // 2)
    vals[:n, : kp // 2] = values
    m = meta.to(torch.int32)
    nib = torch.stack([m & 0xF, m >> 4], dim=-1).reshape(n, -1)[:, :g]
    nibs = torch.full((np_, kpad // 4), PAD_NIBBLE, dtype=torch.int32, device=dev)
    nibs[:n, :g] = nib
    q = nibs.view(np_, kpad // 16, 4)
    w16 = q[..., 0] | (q[..., 1] << 4) | (q[..., 2] << 8) | (q[..., 3] << 12)  # [np_, 2*ks]
    w = w16.view(np_ // 16, 2, 8, ks, 2).to(torch.int64)  # [tile, row>=8, g, step, t]
    e = (w[:, 0] | (w[:, 1] << 16)).permute(0, 2, 1, 3).reshape(np_ // 16, ks, 16)
    ef = torch.where(e >= 2**31, e - 2**32, e).to(torch.int32)
    v = vals.view(np_ // 16, 16, ks, 16).permute(0, 2, 1, 3)  # [tile, step, row, compressed col]
    lane = torch.arange(32, device=dev)
    h = torch.arange(8, device=dev)
    row = (lane // 4)[:, None] + 8 * ((h[None, :] >> 1) & 1)
    col = 2 * (lane % 4)[:, None] + (h[None, :] & 1) + 8 * (h[None, :] >> 2)
    vf = v[:, :, row, col]  # [tile, step, 32, 8]
    return vf.contiguous(), ef.contiguous()


def emulate_dense(vf: Tensor, ef: Tensor, n: int, k: int) -> Tensor:
    """The dense [n, k] weight that mma.sp.m16n8k32 (sparsity selector 0) sees given (vf, ef), built from
    the PTX ISA rules directly (not by inverting `repack`):

    * compressed A is laid out like a dense m16n8k16 A fragment: lane 4g+t, element h (0..7) is
      row g + 8*((h >> 1) & 1), compressed col 2t + (h & 1) + 8*(h >> 2); compressed col c is the
      (c % 2)-th stored value of group c // 2 of that row (4 logical columns per group);
    * metadata: with selector 0, thread t' in {0, 1} of quad g supplies the indices of logical columns
      16t'..16t'+15 for row g (bits 0..15) and row g+8 (bits 16..31), 2 bits per stored value in column
      order, so the index of stored value j of group q (0..7) is
      bits [2 (2 (q % 4) + j), +1] of half (row >= 8) of lane (4g + q // 4)'s register.
    Raises ValueError on an invalid nibble (the two indices equal or out of order: undefined behaviour).
    """
    nt, ks = vf.shape[0], vf.shape[1]
    dense = torch.zeros(nt, ks, 16, 32, dtype=torch.float64)
    e = ef.to(torch.int64) & 0xFFFFFFFF
    v = vf.to(torch.float64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for h in range(8):
            row = g + 8 * ((h >> 1) & 1)
            c = 2 * t + (h & 1) + 8 * (h >> 2)
            grp, j = divmod(c, 2)
            word = e[:, :, 2 * g + grp // 4]
            half = (word >> (16 * (row >= 8))) & 0xFFFF
            nibble = (half >> (4 * (grp % 4))) & 0xF
            i0, i1 = nibble & 3, nibble >> 2
            if bool((i0 >= i1).any()):
                bad = (i0 >= i1).nonzero()[0].tolist()
                raise ValueError(f"emulate_dense: invalid metadata nibble at tile {bad[0]}, k-step {bad[1]}, "
                                 f"row {row}, group {grp}")
            pos = i1 if j else i0  # [nt, ks]
            cols = grp * 4 + pos
            dense[:, :, row].scatter_(-1, cols[..., None], v[:, :, lane, h][..., None])
    full = dense.permute(0, 2, 1, 3).reshape(nt * 16, ks * 32)
    return full[:n, :k]


# ---- build ----------------------------------------------------------------------------------------
_lock = threading.Lock()
_ext = None
_tried = False
_why_not: Optional[str] = None


def cache_dir() -> Path:
    root = os.environ.get("SPARSERUN_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sparserun"


def _nvcc() -> Optional[str]:
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - torch without cpp_extension
        CUDA_HOME = None
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def skip_reason() -> Optional[str]:
    """Why the extension cannot be built here (None if it can be tried)."""
    if os.environ.get("SPARSERUN_NO_CUDA_BUILD", "").strip() not in ("", "0"):
        return "SPARSERUN_NO_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return "this torch has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"GPU compute capability {major}.{minor} < 8.0 (mma.sp needs sm_80+)"
    if _nvcc() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    missing = [s for s in _SOURCES if not (_CSRC / s).exists()]
    if missing:
        return f"CUDA sources missing under {_CSRC}: {', '.join(missing)}"
    return None


def _build_key() -> str:
    h = hashlib.sha256()
    for s in _SOURCES:
        h.update((_CSRC / s).read_bytes())
    major, minor = torch.cuda.get_device_capability()
    raw = f"torch{torch.__version__}-cu{torch.version.cuda}-sm{major}{minor}-{h.hexdigest()[:12]}"
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in raw)


def load_extension(verbose: bool = False):
    """The compiled module (built on first call), or None with one warning if it cannot be built."""
    global _ext, _tried, _why_not
    if _tried:
        return _ext
    with _lock:
        if _tried:
            return _ext
        reason = skip_reason()
        if reason is not None:
            _why_not = reason
            log.info("sparserun CUDA 2:4 kernel not built: %s", reason)
            _tried = True
            return None
        key = _build_key()
        build_dir = cache_dir() / "cuda_ext" / key
        major, minor = torch.cuda.get_device_capability()
        old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        try:
            from torch.utils.cpp_extension import load

            build_dir.mkdir(parents=True, exist_ok=True)
            # Build for this GPU only (torch's default adds every arch it knows: minutes of nvcc).
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
            _ext = load(name="sparserun_semi24_" + hashlib.sha1(key.encode()).hexdigest()[:10],
                        sources=[str(_CSRC / s) for s in _SOURCES],
                        extra_cflags=["-O3"],
                        extra_cuda_cflags=["-O3", "-lineinfo"],
                        build_directory=str(build_dir), verbose=verbose)
        except Exception as exc:  # any build/load failure: warn once, fall back
            _ext = None
            first = str(exc).strip().splitlines()
            _why_not = f"build failed: {type(exc).__name__}: {first[-1] if first else ''}"
            warnings.warn(f"sparserun: the CUDA 2:4 kernel could not be built ({_why_not}); using the other "
                          f"backends. Build log: rerun with sparserun.runtime.cuda_ext.load_extension("
                          f"verbose=True) after clearing {build_dir}; SPARSERUN_NO_CUDA_BUILD=1 skips "
                          f"the build.", RuntimeWarning, stacklevel=2)
        finally:
            if old_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
        _tried = True
        return _ext


def available() -> bool:
    return load_extension() is not None


def why_unavailable() -> Optional[str]:
    load_extension()
    return _why_not


# ---- the op -----------------------------------------------------------------------------------------
@torch.library.custom_op("sparserun::semi24_gemm_cuda", mutates_args=())
def semi24_gemm_cuda(x: Tensor, vf: Tensor, ef: Tensor, bias: Optional[Tensor], n: int,
                     config: int = -1) -> Tensor:
    """y[..., n] = x[..., K] · Wᵀ + bias with W given as `repack`'s (vf, ef); fp16/bf16, CUDA, sm_80+."""
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"sparserun CUDA 2:4 kernel unavailable: {_why_not}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    k8 = (k + 7) // 8 * 8
    if k8 != k:  # the kernel reads x in 16-byte chunks: pad K with zeros (the weight's pad columns are 0)
        x2 = torch.nn.functional.pad(x2, (0, k8 - k))
    if x2.stride(-1) != 1 or x2.stride(0) % 8 != 0 or x2.data_ptr() % 16 != 0:
        x2 = x2.contiguous()
        if x2.data_ptr() % 16 != 0:
            x2 = x2.clone()
    y = ext.semi24_gemm(x2, vf, ef, bias, n, config)
    return y.view(*x.shape[:-1], n)


@semi24_gemm_cuda.register_fake
def _(x, vf, ef, bias, n, config=-1):
    return x.new_empty((*x.shape[:-1], n))
