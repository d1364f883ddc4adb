"""SparseLinear: a drop-in nn.Linear whose weight is held packed.

One class holding a format, not one class per format: every format shares the Linear contract
(in/out features, bias, y = x Wᵀ + b), the module swap, the checkpoint naming and the backend dispatch, so
a per-format class would repeat all of that and differ only in which buffers exist. The format decides the
buffers (the tensor roles of sparserun/formats/<format>.py, registered under the same names, so the
state_dict *is* the packed checkpoint) and the kernels the dispatcher may use.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from .. import formats
from ..formats import Packed
from ..formats.common import SUPPORTED_DTYPES
from ..patterns import parse


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # transformers without Conv1D: nothing to match
        return ()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's OptimizedModule (`_orig_mod`) or nn.DataParallel /
    DistributedDataParallel (`module`). Their state_dict names every tensor with that prefix, so a checkpoint
    saved through the wrapper named no layer the model's config builds (it failed only at load)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def is_linear(m: nn.Module) -> bool:
    """An nn.Linear, or a GPT-2-style Conv1D (y = x W + b with W stored [in, out]): the same matmul, so a
    SparseLinear replaces either."""
    return isinstance(m, nn.Linear) or (bool(_conv1d_type()) and isinstance(m, _conv1d_type()))


def own_forward(m: nn.Module) -> bool:
    """An is_linear module whose class computes something else than y = x Wᵀ + b (PhiMoE's and Llama 4's
    routers return tuples): a SparseLinear cannot stand in for it, so pruning leaves it dense. A subclass
    that only restates the matmul (Falcon's FalconLinear) is a plain Linear: one probe row tells them apart
    (on the meta device, only the output's type and shape can be checked)."""
    import torch.nn.functional as F

    conv = _conv1d_type()
    if type(m).forward in (nn.Linear.forward,) + ((conv.forward,) if conv else ()):
        return False
    w = linear_weight(m)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, w.shape[1], generator=gen).to(device=w.device, dtype=w.dtype)
    try:
        with torch.no_grad():
            y = m(x)
    except Exception:  # it cannot even take a row of inputs: certainly not a drop-in matmul
        return True
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (1, w.shape[0]):
        return True
    if w.is_meta:
        return False
    with torch.no_grad():
        ref = F.linear(x, w, m.bias).float()
    tol = 1e-2 * float(ref.abs().max()) + 1e-3
    return not bool(((y.float() - ref).abs() <= tol).all())


OWN_FORWARD_REASON = "a Linear subclass with its own forward (not y = x Wᵀ + b): kept dense"


def nothing_pruned_reason(pat) -> str:
    """Why a layer whose mask keeps every weight stays dense: packed, it would only add its index bytes (and a
    sparse kernel) to the same values."""
    unit = f"{pat} blocks" if pat.kind == "block" else "weights"
    return f"the target sparsity rounds to zero {unit} at this shape"


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an is_linear module (Conv1D's [in, out] weight as a transposed view)."""
    return m.weight if isinstance(m, nn.Linear) else m.weight.t()


def linear_shape(m: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an is_linear module or a SparseLinear."""
    if isinstance(m, (nn.Linear, SparseLinear)):
        return (m.out_features, m.in_features)
    return tuple(linear_weight(m).shape)


def _buffer_shapes(fmt: str, n: int, k: int, block: int | None, nnz: int | None) -> dict:
    """role -> (shape, dtype or None for the weight dtype) of each packed buffer."""
    if fmt == "semi24":
        kp = (k + 3) // 4 * 4
        return {"values": ((n, kp // 2), None), "meta": ((n, (kp // 4 + 1) // 2), torch.uint8)}
    if fmt == "bsr":
        return {"crow_indices": ((n // block + 1,), torch.int32), "col_indices": ((nnz,), torch.int32),
                "values": ((nnz, block, block), None)}
    if fmt == "bitmask":
        return {"values": ((nnz,), None), "bitmask": ((n, (k + 7) // 8), torch.uint8)}
    raise ValueError(f"unknown packed format {fmt!r}")


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W stored packed (format "semi24", "bsr" or "bitmask").

    Build one with `SparseLinear.from_linear(linear, mask, pattern)` or `from_packed(packed, bias)`; the
    plain constructor makes empty buffers of the right shapes (on the meta device for loading).
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = True, *,
                 pattern: str | None = None, block: int | None = None, nnz: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if fmt not in formats.FORMATS:
            raise ValueError(f"SparseLinear: unknown format {fmt!r}; known: {', '.join(formats.FORMATS)}")
        if fmt == "bsr" and block not in (16, 32, 64, 128):
            raise ValueError(f"SparseLinear: a bsr layer needs block in 16, 32, 64, 128, got {block!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (in_features, out_features)):
            raise ValueError(f"SparseLinear: in_features and out_features must be positive integers, got "
                             f"{in_features!r}, {out_features!r}")
        self.in_features, self.out_features = in_features, out_features
        self.format = fmt
        self.pattern = str(parse(pattern)) if pattern else {"semi24": "2:4", "bsr": f"{block}x{block}",
                                                             "bitmask": "unstructured"}[fmt]
        self.block = block
        dtype = dtype or torch.get_default_dtype()
        for role, (shape, dt) in _buffer_shapes(fmt, out_features, in_features, block, nnz).items():
            self.register_buffer(role, torch.empty(shape, dtype=dt or dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._dense_cache = None  # (key, tensor): the dense fallback, decompressed once
        self._max_row_blocks = None  # (crow data_ptr, int): bsr only, see max_row_blocks

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_packed(cls, packed: Packed, bias: torch.Tensor | None = None) -> "SparseLinear":
        # the kernels address memory with the index tensors: a Packed built by hand must be well formed
        formats.check_indices(packed, "SparseLinear.from_packed")
        n, k = packed.shape
        if packed.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"SparseLinear.from_packed: values dtype {packed.dtype} (supported: float16, bfloat16, "
                            f"float32)")
        pattern = packed.meta.get("pattern")
        if pattern is not None and parse(pattern).format != packed.format:
            raise ValueError(f"SparseLinear.from_packed: pattern {pattern!r} is not stored as {packed.format}")
        if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_floating_point() or bias.is_meta):
            # a [1] bias broadcast silently over every output
            raise ValueError(f"SparseLinear.from_packed: bias must be a floating tensor of shape ({n},) with "
                             f"data, got {bias.dtype} {tuple(bias.shape)} on {bias.device}")
        nnz = packed.tensors["values"].shape[0] if packed.format in ("bsr", "bitmask") else None
        mod = cls(k, n, packed.format, bias is not None, pattern=packed.meta.get("pattern"),
                  block=packed.meta.get("block"), nnz=nnz, device="meta", dtype=packed.dtype)
        for role, t in packed.tensors.items():
            setattr(mod, role, t)
        if bias is not None:
            # a copy: the source Linear's bias must not change when this layer's is trained or edited
            mod.bias = nn.Parameter(bias.detach().to(packed.dtype, copy=True), requires_grad=bias.requires_grad)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Module, mask: torch.Tensor, pattern, name: str = "weight"):
        """Pack the [out, in] weight of `linear` (nn.Linear or Conv1D) under `mask` (raises
        formats.UnsupportedShape / PatternViolation)."""
        p = formats.pack(linear_weight(linear).detach(), mask, pattern, name=name)
        return cls.from_packed(p, linear.bias)

    # ---- views ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def packed(self) -> Packed:
        roles = _buffer_shapes(self.format, self.out_features, self.in_features, self.block,
                               self.values.shape[0]).keys()
        meta = {"pattern": self.pattern}
        if self.block:
            meta["block"] = self.block
        return Packed(self.format, self.shape, {r: getattr(self, r) for r in roles}, meta)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight (a fresh tensor; for references, fallbacks and export)."""
        return formats.unpack(self.packed())

    @property
    def weight(self) -> torch.Tensor:
        """The dense [out, in] weight, decompressed (writing to it changes nothing in the layer).

        Not a parameter: it exists so that model code which inspects a Linear's weight keeps working after the
        swap (T5 reads `wo.weight.dtype` three times in every feed-forward, then calls `wo`). A read costs a
        full decompression, hence the warning; sparserun itself never reads it. So that T5's three reads cost
        one, the process keeps the last weight read until that layer runs, or another layer's weight is read
        (at most one dense layer held, briefly); a read after the packed tensors or that tensor changed
        decompresses again."""
        if not SparseLinear._weight_warned:
            SparseLinear._weight_warned = True
            import warnings

            from .. import SparserunWarning

            warnings.warn("SparseLinear.weight was read: it decompresses the dense weight "
                          "(slow; model code that only needs its dtype/device can use .values)", SparserunWarning,
                          stacklevel=2)
        from .dispatch import _data_key, capturing, decompress, version_of

        if torch.compiler.is_compiling() or capturing():  # see dispatch.capturing
            return decompress(self)
        key, hit = _data_key(self), SparseLinear._last_read
        if hit is not None and hit[0]() is self and hit[1] == key and version_of(hit[2]) == hit[3]:
            return hit[2]
        w = decompress(self)
        # under inference_mode there is no write counter: a read there trusts that the weight was not written
        SparseLinear._last_read = (weakref.ref(self), key, w, version_of(w))
        return w

    _weight_warned = False  # class-wide: one warning per process, not one per layer
    _last_read = None  # (weakref to the layer, its data key, the weight, the weight's version): see weight

    def weight_mask(self) -> torch.Tensor:
        return formats.mask(self.packed())

    @property
    def density(self) -> float:
        return float(self.weight_mask().float().mean())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # load_state_dict copies into the existing buffers. The caches below are keyed on the buffers' write
        # counters, which tensors made under torch.inference_mode do not have: drop them here, whatever the mode
        from .dispatch import _CACHE_ATTRS

        for attr in _CACHE_ATTRS.values():
            if getattr(self, attr, None) is not None:
                setattr(self, attr, None)
        self._max_row_blocks = None

    @property
    def max_row_blocks(self) -> int:
        """Most kept blocks in any block-row (bsr). The kernels size their work split with it; computing it
        syncs with the device once, so it is cached, keyed on the index tensor's storage and its in-place write
        counter: load_state_dict copies a new mask into the same storage, and a stale count launches too few
        segments (blocks silently dropped)."""
        from .dispatch import version_of

        if self._max_row_blocks is not None and torch.compiler.is_compiling():
            return self._max_row_blocks[1]  # a traced graph cannot compare data pointers; eager checks
        crow = self.crow_indices
        key = (crow.device, crow.data_ptr(), version_of(crow))
        if self._max_row_blocks is None or self._max_row_blocks[0] != key:
            n = int((crow[1:] - crow[:-1]).max()) if crow.numel() > 1 else 0
            self._max_row_blocks = (key, n)
        return self._max_row_blocks[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .dispatch import sparse_linear

        if not torch.compiler.is_compiling():  # the weight read before this call is no longer needed
            hit = SparseLinear._last_read
            if hit is not None and hit[0]() is self:
                SparseLinear._last_read = None

        if x.dim() == 0 or x.shape[-1] != self.in_features:
            # as nn.Linear refuses it; the block-sparse kernel reads K from x and would read past its rows
            raise RuntimeError(f"SparseLinear({self.out_features}x{self.in_features}, {self.format}): input of "
                               f"shape {tuple(x.shape)} does not end in in_features={self.in_features}")
        group = self.__dict__.get("_sr_group")  # runtime/siblings.py: q/k/v or gate/up as one launch
        if group is not None and self._group_usable(group, x):
            return group.output(self, x)
        return sparse_linear(self, x)

    def _group_usable(self, group, x: torch.Tensor) -> bool:
        """The grouped path is for inference outside torch.compile (its hand-off between siblings is Python
        state a trace cannot keep); anything else runs this layer on its own."""
        if torch.compiler.is_compiling() or not group.intact(self):
            return False
        if x.dtype != self.values.dtype or x.device != self.values.device:
            return False
        bias = self.bias
        return not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format}, pattern={self.pattern}")


class PackedSaveError(RuntimeError):
    """transformers' save_pretrained was called on a model holding SparseLinear layers (or MoE experts
    unrolled into Linear layers, runtime/experts.py)."""


def _save_pretrained_guard(model: nn.Module, save_directory, *args, **kwargs):
    if any(isinstance(m, SparseLinear) for m in model.modules()):
        raise PackedSaveError(
            f"{type(model).__name__}.save_pretrained cannot save packed sparse layers: transformers would write "
            f"their packed tensors, and from_pretrained would load the model with those layers initialised at "
            f"random. Use sparserun.save(model, {str(save_directory)!r}) and sparserun.load")
    from .experts import experts_modules

    unrolled = experts_modules(model, unrolled=True)
    if unrolled:
        raise PackedSaveError(
            f"{type(model).__name__}.save_pretrained: {unrolled[0][0]} holds its MoE experts unrolled into "
            f"per-expert Linear layers, which transformers would save under names it does not load back; "
            f"call sparserun.runtime.experts.fuse_all(model) first")
    return type(model).save_pretrained(model, save_directory, *args, **kwargs)


def guard_save_pretrained(model: nn.Module) -> None:
    """Make `model.save_pretrained` refuse while the model holds SparseLinear layers or MoE experts unrolled
    into Linear layers (and behave as usual once it holds neither, e.g. after fine-tuning unpacked them). The
    checkpoint it would write looks fine and loads "successfully" in transformers, with every pruned layer
    silently re-initialised: a failure far from its cause. A partial, not a bound method, so the guard
    survives copy.deepcopy and pickling (torch.save)."""
    import functools

    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in vars(model):
        model.save_pretrained = functools.partial(_save_pretrained_guard, model)
