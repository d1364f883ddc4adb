"""Backend choice for SparseLinear.forward.

Backends:
  "triton"      sparserun.kernels via sparserun.ops (CUDA, or CPU tensors under TRITON_INTERPRET=1)
  "cuda"        the mma.sp 2:4 GEMM in csrc/ (runtime/cuda_ext.py); 2:4 only, fp16/bf16, sm_80+
  "cusparselt"  torch's cuSPARSELt (torch._cslt_sparse_mm); 2:4 only, where this torch has it
  "dense"       cuBLAS / CPU BLAS on the decompressed weight: decompressed per call for kernel formats
                (no resident dense copy, see `keeps_dense`), cached with SPARSERUN_KEEP_DENSE=1
  "reference"   pure torch, decompress per call: the oracle

`SPARSERUN_BACKEND` forces one; `SPARSERUN_BACKENDS` says what auto may choose: by default "triton,dense",
the backends that run on the checkpoint's own packed tensors; "all" (or a list naming them) adds "cuda" and
"cusparselt", which keep a second copy of the weight in their own layout once chosen.
Otherwise ("auto"): CPU tensors use the reference path (bitmask layers:
dense); CUDA tensors of a kernel format use the measured choice of runtime/tuning.py: every available
candidate is timed once per (format, N, K, M bucket, dtype, GPU, versions), the fastest is kept on disk,
and a sparse backend must beat dense by more than 2 % to be chosen. Inside CUDA-graph capture or
torch.compile tracing nothing is timed: the cached choice is used, else a static rule (Triton for M <= 64,
dense above), and a backend whose prepared operands (repacked / compressed / decompressed weight) do not
exist yet is replaced by Triton, which needs none. Warm up eagerly before capturing.

Prepared operands live on the layer as plain attributes (`_dense_cache`, `_sr_cuda`, `_sr_cslt`), never
buffers, so they never reach a checkpoint.
"""
from __future__ import annotations

import os
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "cuda", "cusparselt", "dense", "reference")
KERNEL_FORMATS = ("semi24", "bsr")
STATIC_TRITON_MAX_M = 64
_MMA_DTYPES = (torch.float16, torch.bfloat16)


def forced_backend() -> str:
    b = os.environ.get("SPARSERUN_BACKEND", "auto").strip().lower() or "auto"
    if b not in BACKENDS:
        raise ValueError(f"SPARSERUN_BACKEND={b!r} is not one of {', '.join(BACKENDS)}")
    return b


def _cannot_time() -> bool:
    # is_compiling first: torch.compile cannot trace is_current_stream_capturing (it returns a bool)
    return _compiling() or capturing()


def capturing() -> bool:
    """Inside a CUDA-graph capture. Nothing made there may be cached: its kernels are only recorded, so the
    tensor holds garbage until a replay runs them, and it lives in the graph's private pool."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", lambda: False)())


def _needs_grad(layer, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (layer.bias is not None and layer.bias.requires_grad))


# ---- availability -----------------------------------------------------------------------------------
def cuda_kernel_ok(layer, x: torch.Tensor) -> bool:
    if layer.format != "semi24" or not x.is_cuda or x.dtype not in _MMA_DTYPES:
        return False
    from . import cuda_ext

    return cuda_ext.available()


def cusparselt_ok(layer, x: torch.Tensor) -> bool:
    # cuSPARSELt 16-bit: the sparse operand's rows and columns must be multiples of 16
    return (layer.format == "semi24" and x.is_cuda and x.dtype in _MMA_DTYPES
            and hasattr(torch, "_cslt_compress") and hasattr(torch, "_cslt_sparse_mm")
            and layer.out_features % 16 == 0 and layer.in_features % 16 == 0
            and not getattr(layer, "_sr_cslt_failed", False))


def triton_ok(layer, x: torch.Tensor) -> bool:
    if layer.format not in KERNEL_FORMATS:
        return False
    try:
        from .. import ops
    except Exception:  # triton missing or broken: the other backends still work
        return False
    return hasattr(ops, "sparse_linear_triton")


# ---- prepared operands (plain attributes, not buffers) ---------------------------------------------
def _stale(hit, layer) -> bool:
    """Is a cached (key, operands) entry missing or built from other weights? While torch.compile traces,
    data pointers and write counters cannot be read: an entry of the layer's device and dtype is trusted
    (eager calls keep entries fresh; a weight edited in place after compiling needs an eager call and a
    recompile, docs/runtime.md)."""
    if hit is None:
        return True
    if _compiling():
        return hit[0][:2] != (layer.values.device, layer.values.dtype)
    return hit[0] != _data_key(layer)


def version_of(t: torch.Tensor | None) -> int | None:
    """t's in-place write counter; None for an inference tensor (made under torch.inference_mode, e.g. a model
    loaded there), which has none and cannot be written to outside inference mode."""
    if t is None or t.is_inference():
        return None
    return t._version


def _data_key(layer):
    v = layer.values
    return (v.device, v.dtype, v.data_ptr(), version_of(v), version_of(getattr(layer, "meta", None)))


def keeps_dense(layer) -> bool:
    """Does the "dense" backend keep a decompressed copy of this layer on its device?

    Not by default for kernel formats: a resident dense copy next to the packed weight gives back the memory
    the pruning saved (the layer would hold 1.56x the dense bytes, not 0.56x). The tuner times the dense
    backend as it runs here (decompress + GEMM), so it is chosen only where that still wins, i.e. at large M
    where the GEMM dwarfs the decompression. SPARSERUN_KEEP_DENSE=1 (or forcing SPARSERUN_BACKEND=dense)
    trades that memory for cuBLAS speed at every M; formats without a kernel (bitmask) always cache."""
    if layer.format not in KERNEL_FORMATS:
        return True
    return os.environ.get("SPARSERUN_KEEP_DENSE", "0").strip() == "1" or forced_backend() == "dense"


# Tests set this to run the Triton unpack kernels on CPU tensors under TRITON_INTERPRET=1.
UNPACK_WITH_TRITON_ON_CPU = False


def decompress(layer) -> torch.Tensor:
    """The layer's dense weight, fresh. On CUDA, kernel formats go through the Triton unpack kernels (one read
    of the packed tensors, one write of W; the torch version took 1.34 ms for a 14336x4096 2:4 layer on the
    H100, 4x the prefill GEMM it fed); elsewhere formats.unpack. Both are bit-exact."""
    v = layer.values
    if layer.format in KERNEL_FORMATS and (v.is_cuda or UNPACK_WITH_TRITON_ON_CPU):
        try:
            from .. import ops
        except Exception:  # no usable Triton: the torch path still works
            return layer.dense_weight()
        return ops.unpack_triton(layer)
    return layer.dense_weight()


def dense_cached(layer) -> torch.Tensor:
    """The dense weight: decompressed once per (device, dtype, data version) where `keeps_dense`, else per
    call (transient). The cache is not part of the state_dict."""
    if not keeps_dense(layer):
        return decompress(layer)
    if _stale(layer._dense_cache, layer):
        if _compiling() or capturing():  # no key can be read while tracing; see capturing()
            return decompress(layer)
        layer._dense_cache = (_data_key(layer), decompress(layer))
    return layer._dense_cache[1]


def cuda_cached(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The (vf, ef) operands of csrc/semi24_gemm.cu, repacked once from the portable layout."""
    from . import cuda_ext

    hit = getattr(layer, "_sr_cuda", None)
    if _stale(hit, layer):
        vf, ef = cuda_ext.repack(layer.values, layer.meta, layer.out_features, layer.in_features)
        if capturing():
            return vf, ef
        layer._sr_cuda = hit = (_data_key(layer), vf, ef)
    return hit[1], hit[2]


def cslt_cached(layer) -> torch.Tensor:
    """torch._cslt_compress of the dense weight, once."""
    hit = getattr(layer, "_sr_cslt", None)
    if _stale(hit, layer):
        packed = torch._cslt_compress(dense_cached(layer))
        if capturing():
            return packed
        layer._sr_cslt = hit = (_data_key(layer), packed)
    return hit[1]


_CACHE_ATTRS = {"dense": "_dense_cache", "cuda": "_sr_cuda", "cusparselt": "_sr_cslt"}


def _has_cache(layer, backend: str) -> bool:
    attr = _CACHE_ATTRS.get(backend)
    if attr is None or (backend == "dense" and not keeps_dense(layer)):
        return True
    hit = getattr(layer, attr, None)
    return not _stale(hit, layer)


def release_unused_caches(layer) -> None:
    """Drop prepared operands of backends no M bucket of this layer has chosen (tuning builds them all)."""
    used = getattr(layer, "_sr_used", set())
    for backend, attr in _CACHE_ATTRS.items():
        if backend not in used and getattr(layer, attr, None) is not None:
            if backend == "dense" and "cusparselt" in used and not _has_cache(layer, "cusparselt"):
                continue  # cslt_cached needs the dense weight to (re)compress
            setattr(layer, attr, None)


# ---- backends -----------------------------------------------------------------------------------------
def _cusparselt_linear(layer, x: torch.Tensor) -> torch.Tensor:
    packed = cslt_cached(layer)
    n, k = layer.out_features, layer.in_features
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    mp = (m + 7) // 8 * 8  # cuSPARSELt's dense operand wants multiples of 8 (torch pads the same way)
    if mp != m:
        x2 = F.pad(x2, (0, 0, 0, mp - m))
    y = torch._cslt_sparse_mm(packed, x2.t(), bias=layer.bias, transpose_result=True)
    if tuple(y.shape) != (mp, n):
        y = y.t()
    return y[:m].reshape(*x.shape[:-1], n)


def run_backend(backend: str, layer, x: torch.Tensor) -> torch.Tensor:
    if backend == "reference":
        return F.linear(x, layer.dense_weight(), layer.bias)
    if backend == "dense":
        return F.linear(x, dense_cached(layer), layer.bias)
    if backend == "triton":
        from .. import ops

        if not x.is_cuda:
            _check_interpreted(layer, x)
        return ops.sparse_linear_triton(layer, x)
    if backend == "cuda":
        from . import cuda_ext

        if not cuda_kernel_ok(layer, x):
            raise RuntimeError(
                f"SparseLinear({layer.out_features}x{layer.in_features}, {layer.format}): backend 'cuda' "
                f"unavailable for a {x.dtype} tensor on {x.device}: "
                f"{cuda_ext.why_unavailable() or 'needs format semi24, fp16/bf16, a CUDA tensor'}")
        vf, ef = cuda_cached(layer)
        return cuda_ext.semi24_gemm_cuda(x, vf, ef, layer.bias, layer.out_features)
    if backend == "cusparselt":
        if not cusparselt_ok(layer, x):
            raise RuntimeError(
                f"SparseLinear({layer.out_features}x{layer.in_features}, {layer.format}): backend "
                f"'cusparselt' unavailable (needs format semi24, fp16/bf16 on CUDA, N and K multiples of 16, "
                f"torch._cslt_sparse_mm; this torch has it: {hasattr(torch, '_cslt_sparse_mm')})")
        return _cusparselt_linear(layer, x)
    raise ValueError(f"unknown backend {backend!r}")


def _check_interpreted(layer, x: torch.Tensor) -> None:
    """The Triton kernels run on CPU tensors only under the interpreter, and there not in bf16 (the
    interpreter's bf16 arithmetic is wrong: tl.dot, and in Triton 3.9 even x * 2; moves are exact). Say so
    instead of failing once per kernel config."""
    name = f"SparseLinear({layer.out_features}x{layer.in_features}, {layer.format})"
    if os.environ.get("TRITON_INTERPRET", "0").strip() != "1":
        raise RuntimeError(f"{name}: backend 'triton' needs a CUDA tensor, got one on {x.device} (CPU tensors "
                           f"run the kernels only under TRITON_INTERPRET=1, for tests)")
    if x.dtype == torch.bfloat16:
        raise RuntimeError(f"{name}: the Triton interpreter computes bfloat16 wrongly; test the kernels in "
                           f"float16 or float32 on the CPU, bfloat16 on a GPU")


# ---- the choice -------------------------------------------------------------------------------------
class MemoKey(NamedTuple):
    """What an in-process choice is remembered under (readers use the field names: the key has grown)."""
    format: str
    n: int
    k: int
    bucket: int
    dtype: torch.dtype
    device: torch.device
    grad: bool
    keeps_dense: bool
    detail: tuple  # _format_detail's items: block size and rounded density for block-sparse layers


_static_key: dict = {}
_memo: dict[MemoKey, str] = {}
_memo_times: dict[MemoKey, dict] = {}  # the timings behind choices made in this process (reports)
_memo_lock = threading.Lock()


def _software_key(device: torch.device) -> dict:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    hit = _static_key.get(idx)
    if hit is None:
        import sparserun

        try:
            import triton

            tv = triton.__version__
        except Exception:
            tv = None
        hit = {"gpu": torch.cuda.get_device_name(idx), "torch": torch.__version__, "cuda": torch.version.cuda,
               "triton": tv, "sparserun": sparserun.__version__}
        _static_key[idx] = hit
    return hit


def _format_detail(layer) -> dict:
    if layer.format == "bsr":
        nnz = int(layer.values.shape[0])
        blocks = max(1, (layer.out_features // layer.block) * (layer.in_features // layer.block))
        return {"block": layer.block, "density": round(nnz / blocks, 2)}
    return {}


def tuning_key(layer, m: int, dtype: torch.dtype, device: torch.device, grad: bool = False) -> dict:
    from .tuning import SCHEMA, m_bucket

    key = {"schema": SCHEMA, "format": layer.format, "N": layer.out_features, "K": layer.in_features,
           "M_bucket": m_bucket(m), "dtype": str(dtype).replace("torch.", ""),
           **_format_detail(layer), **_software_key(device)}
    if grad:
        key["autograd"] = True
    if layer.format in KERNEL_FORMATS and keeps_dense(layer):
        # a resident dense copy makes the dense candidate a bare GEMM, not decompress + GEMM: another answer
        key["keep_dense"] = True
    allowed = allowed_backends()
    if allowed != ALL_BACKENDS:  # a restricted choice must not answer for an unrestricted process, or back
        key["backends"] = sorted(allowed)
    return key


from .tuning import CHOICES as ALL_BACKENDS  # noqa: E402  (the backends auto may choose; tuning.py has no torch)
COPY_FREE_BACKENDS = frozenset(("triton", "dense"))


def allowed_backends() -> frozenset[str]:
    """SPARSERUN_BACKENDS: the backends auto may choose among. Default "triton,dense": every layer runs on the
    checkpoint's own packed tensors. "cuda" and "cusparselt" each build a second copy of a 2:4 weight in their
    own layout once the tuner picks them for any M: on the 8B shape that was +7.3 GB, twice the memory the
    pruning saved, for prefill speedups the H100 runs did not show (docs/runtime.md). "all" allows them.
    Read when a shape is first chosen in this process: set it before the first forward (or clear_memo())."""
    raw = os.environ.get("SPARSERUN_BACKENDS", "").strip().lower()
    if not raw:
        return COPY_FREE_BACKENDS
    if raw == "all":
        return ALL_BACKENDS
    names = frozenset(b.strip() for b in raw.split(",") if b.strip())
    bad = sorted(names - ALL_BACKENDS)
    if bad:
        raise ValueError(f"SPARSERUN_BACKENDS={raw!r}: unknown {', '.join(bad)}; choose among triton, cuda, "
                         f"cusparselt, dense, or all")
    return names | {"dense"}  # dense is the floor every choice is measured against


def candidates(layer, x: torch.Tensor, grad: bool = False) -> dict:
    """name -> zero-argument callable running that backend on x (only the backends usable and allowed here)."""
    allowed = allowed_backends()
    out = {}
    if triton_ok(layer, x):
        out["triton"] = lambda: run_backend("triton", layer, x)
    if not grad:  # the CUDA and cuSPARSELt ops have no autograd formula
        if cuda_kernel_ok(layer, x):
            out["cuda"] = lambda: run_backend("cuda", layer, x)
        if cusparselt_ok(layer, x):
            out["cusparselt"] = lambda: run_backend("cusparselt", layer, x)
    out["dense"] = lambda: run_backend("dense", layer, x)
    return {k: v for k, v in out.items() if k in allowed}


def output_check(layer, x: torch.Tensor):
    """check(y) -> relative error of a backend's output y = layer(x) on sampled rows (first and last 64 tokens)
    and output features, against pure torch in fp32 (the reference backend's weight). Built lazily, once."""
    from ..kernels._tuning import rel_err, sample_rows  # torch only: no Triton import

    ref = {}

    def check(y: torch.Tensor) -> float:
        k, n = layer.in_features, layer.out_features
        rm, rn = sample_rows(x.numel() // k if k else 0), sample_rows(n)
        if "ref" not in ref:
            with torch.no_grad():
                w = layer.dense_weight()[rn].float()
                r = x.reshape(-1, k)[rm].float() @ w.T
                if layer.bias is not None:
                    r = r + layer.bias.detach()[rn].float()
            ref["ref"] = r
        return rel_err(y.detach().reshape(-1, n)[rm][:, rn], ref["ref"])

    return check


def static_choice(layer, m: int) -> str:
    """Used where timing is impossible and nothing is cached."""
    if m <= STATIC_TRITON_MAX_M:
        return "triton"
    return "dense" if _has_cache(layer, "dense") else "triton"


def auto_backend(layer, x: torch.Tensor, allow_timing: bool = True) -> str:
    """The measured choice for a CUDA tensor x and a kernel-format layer."""
    k = layer.in_features
    m = x.numel() // k if k else 0
    grad = _needs_grad(layer, x)
    from .tuning import Uncheckable, get_tuner, m_bucket

    if m == 0:
        return static_choice(layer, m)  # nothing to time: an empty input must not decide the decode (M=1) bucket
    mk = MemoKey(layer.format, layer.out_features, k, m_bucket(m), x.dtype, x.device, grad, keeps_dense(layer),
                 tuple(_format_detail(layer).items()))
    choice = _memo.get(mk)
    if choice is None:
        if _compiling():
            choice = None  # no file access while tracing
        elif not allow_timing or _cannot_time():
            choice = get_tuner().lookup(tuning_key(layer, m, x.dtype, x.device, grad))
        else:
            key = tuning_key(layer, m, x.dtype, x.device, grad)
            try:
                from ..kernels._common import on_device

                with on_device("tuning", x):  # graph_timer captures and times on the current device
                    choice = get_tuner().choose(key, candidates(layer, x, grad), output_check(layer, x))
            except Uncheckable:
                # NaN/Inf in x (or an overflowing output), as nn.Linear passes them on: not an error, and
                # not an input to tune on. An earlier process's choice, else the static one, uncached.
                choice = get_tuner().lookup(key)
            else:
                _memo_times[mk] = get_tuner().times(key)
                layer.__dict__.setdefault("_sr_used", set()).add(choice)
                release_unused_caches(layer)
        if choice is not None:
            with _memo_lock:
                _memo[mk] = choice
    if choice is None:
        choice = static_choice(layer, m)
    if _cannot_time() and not _has_cache(layer, choice):
        return "triton"  # preparing operands inside capture/tracing would record garbage or break graphs
    if grad and choice in ("cuda", "cusparselt"):
        return "triton"
    return choice


def choose_backend(layer, x: torch.Tensor) -> str:
    b = forced_backend()
    if b == "auto":
        if x.is_cuda and layer.format in KERNEL_FORMATS:
            return auto_backend(layer, x)
        return "dense" if layer.format == "bitmask" else "reference"
    if b in ("triton", "cuda", "cusparselt") and layer.format not in KERNEL_FORMATS:
        return "dense"  # no kernel exists for this format: same math, decompressed once
    if b in ("cuda", "cusparselt") and layer.format != "semi24":
        return "triton"  # block-sparse has only the Triton kernel
    return b


def sparse_linear(layer, x: torch.Tensor) -> torch.Tensor:
    wdt = layer.values.dtype
    if torch.is_autocast_enabled(x.device.type):
        # as nn.Linear under autocast: computed in the autocast dtype whatever x's dtype is. A layer stored in
        # that dtype runs its kernels on x cast to it; one stored in another dtype can only match nn.Linear
        # through its dense weight, which F.linear then casts itself (autocast covers it).
        dt = torch.get_autocast_dtype(x.device.type)
        if dt != wdt:
            return F.linear(x, decompress(layer), layer.bias)
        x = x.to(dt)
    elif x.dtype != wdt:
        raise TypeError(f"SparseLinear({layer.out_features}x{layer.in_features}, {layer.format}): input dtype "
                        f"{x.dtype} does not match the weight dtype {wdt}")
    if torch.compiler.is_compiling():  # traced: the ops' launchers guard the device when the graph runs
        return run_backend(choose_backend(layer, x), layer, x)
    from ..kernels._common import on_device

    # the Triton kernels launch on the current CUDA device: make it x's (the launchers and the tuner guard
    # too; one guard here covers every backend of the call)
    with on_device(f"SparseLinear({layer.out_features}x{layer.in_features})", x, weight=layer.values):
        return run_backend(choose_backend(layer, x), layer, x)


def clear_memo() -> None:
    """Forget in-process choices (tests; after changing the tuning cache)."""
    with _memo_lock:
        _memo.clear()
        _memo_times.clear()
