"""sparsify_: swap a model's nn.Linear layers (and GPT-2-style Conv1D) for SparseLinear, in place.

The mask of each layer is explicit, never `weight != 0` (a kept weight may be 0.0):

* `masks={name: bool tensor}` given (e.g. from `sparserun.prune`): exactly those layers are packed with
  those masks; a mask that does not fit the pattern raises PatternViolation naming the layer/row/column.
* no `masks`: sparsify_ picks a magnitude mask itself (this prunes the model; use sparserun.prune for
  better methods):
      N:M (e.g. 2:4)   keep the N largest |w| of every M consecutive weights along the input dim
      BxB blocks       keep the (1 - sparsity) fraction of B x B blocks with the largest sum of |w| (per layer)
      unstructured     keep the (1 - sparsity) fraction of weights with the largest |w| (per layer)
  Blocks and unstructured need `sparsity=`; N:M implies it.

Layers whose shape the format cannot hold (formats.UnsupportedShape, e.g. not divisible by the block size)
stay dense and the report says why; so do layers whose weight is tied to another module (packing would
untie them). By default `lm_head` and anything named like an embedding is skipped. MoE experts held as 3-D
parameters are packed per expert, as `<experts>.<e>.gate_up_proj` / `.down_proj` (runtime/experts.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import formats
from ..formats.common import check_weight
from ..patterns import Pattern, parse
from . import experts
from .linear import (OWN_FORWARD_REASON, SparseLinear, guard_save_pretrained, is_linear, linear_shape,
                     linear_weight, nothing_pruned_reason, own_forward, unwrap)


@dataclass
class LayerAction:
    """What sparsify_ did with one nn.Linear."""

    name: str
    action: str  # "sparsified" | "dense" (chosen but kept dense, see reason) | "skipped" (not chosen)
    reason: str = ""
    shape: tuple = ()
    format: str | None = None


class SparsifyReport(list):
    """A list of LayerAction, in module order, with a few conveniences."""

    @property
    def sparsified(self) -> list[LayerAction]:
        return [a for a in self if a.action == "sparsified"]

    @property
    def dense(self) -> list[LayerAction]:
        return [a for a in self if a.action == "dense"]

    def summary(self) -> str:
        s = f"{len(self.sparsified)} layers sparsified, {len(self.dense)} kept dense"
        skipped = len(self) - len(self.sparsified) - len(self.dense)
        return s + (f", {skipped} skipped by the filter" if skipped else "")


def default_filter(module: nn.Module, name: str) -> bool:
    """Skip the LM head and embeddings: they are usually tied and very sensitive to pruning."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf != "lm_head" and "embed" not in name.lower()


def magnitude_mask(weight: torch.Tensor, pattern: "str | Pattern", sparsity: float | None = None,
                   name: str = "weight") -> torch.Tensor:
    """A bool mask of `weight`'s shape that fits `pattern`, chosen by magnitude (see module docstring): the
    selection `sparserun.prune(method="magnitude")` makes, so both name the same mask."""
    from ..prune.masks import select

    return select(weight.detach().abs(), pattern, sparsity, name=name)


def sparsify_(model: nn.Module, pattern: "str | Pattern" = "2:4", filter_fn=None,
              masks: "dict[str, torch.Tensor] | None" = None, sparsity: float | None = None,
              progress: bool | None = None) -> SparsifyReport:
    """Replace the chosen nn.Linear layers of `model` by SparseLinear, in place; return a SparsifyReport.

    pattern:   "2:4", "4:8", "32x32", "unstructured", ... (sparserun.patterns)
    filter_fn: (module, name) -> bool choosing layers; default skips lm_head and embeddings. With `masks`,
               exactly the layers named in `masks` are packed (a filter_fn you pass still applies; the default
               one does not, so an lm_head that sparserun.prune(include_lm_head=True) pruned is packed).
    masks:     {layer name: bool mask [out, in]}; without it a magnitude mask is computed (module docstring).
    sparsity:  target for blocks / unstructured when no masks are given.
    """
    pat = parse(pattern)
    if masks is not None and sparsity is not None:  # the masks decide what is kept: a target would be ignored
        raise ValueError(f"sparsify_: give masks or sparsity, not both (sparsity={sparsity!r} with {len(masks)} "
                         f"mask(s))")
    model = unwrap(model)  # torch.compile'd or DataParallel: the layers (and the names masks use) are inside
    filter_fn = filter_fn or (default_filter if masks is None else (lambda module, name: True))
    # MoE experts held as 3-D parameters become one Linear pair per expert (runtime/experts.py): those the
    # masks name, or without masks all of them; a module none of whose experts gets packed is fused back
    unrolled = experts.unroll_stored(model, masks) if masks is not None else experts.unroll_all(model)
    try:
        return _sparsify(model, pat, filter_fn, masks, sparsity, progress)
    finally:  # also when a mask or an argument is refused: the model keeps the layout it came with
        experts.fuse_all(model, unrolled)


def _sparsify(model, pat, filter_fn, masks, sparsity, progress) -> SparsifyReport:
    from sparserun.progress import progress_bar

    # the default choice leaves MoE routers dense (runtime/experts.router_names); a filter_fn you pass decides
    routers = experts.router_names(model) if filter_fn is default_filter else set()
    # Every (parent, attribute) holding each module, so a module reachable by two paths is swapped in both.
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for pname, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent.named_children():
            holders.setdefault(id(child), []).append((parent, attr))
    # Parameter -> the distinct modules holding it: a weight held by two modules is tied (a module reachable
    # by two paths is not, it is one module).
    param_owners: dict[int, dict[int, str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                param_owners.setdefault(id(p), {}).setdefault(id(mod), f"{mname}.{pname}" if mname else pname)

    # nn.Linear and GPT-2's Conv1D (the same matmul with the weight stored transposed)
    linears = [(n, m) for n, m in model.named_modules() if is_linear(m) and n]
    if masks is not None:
        unknown = sorted(set(masks) - {n for n, _ in linears})
        if unknown:
            raise ValueError(f"masks given for layers that are not nn.Linear (or Conv1D) modules of the model: "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")

    report = SparsifyReport()
    # every layer is packed before any is swapped: a mask or weight refused at the last layer leaves the model
    # as it was (the price: the dense and the packed layers are both held until the swap)
    swaps: list[tuple[nn.Module, SparseLinear]] = []
    bar = progress_bar(linears, progress=progress, desc=f"sparsify {pat}", unit="layer", leave=False)
    for name, lin in bar:
        shape = linear_shape(lin)
        if not filter_fn(lin, name):
            report.append(LayerAction(name, "skipped", "filter_fn excluded it", shape))
            continue
        if name in routers:
            report.append(LayerAction(name, "skipped", "routes tokens to MoE experts", shape))
            continue
        if own_forward(lin):
            if masks is not None:
                raise ValueError(f"mask given for {name}: {type(lin).__name__} is a Linear subclass with its own "
                                 f"forward, which a SparseLinear cannot stand in for")
            report.append(LayerAction(name, "dense", OWN_FORWARD_REASON, shape))
            continue
        if masks is not None and name not in masks:
            report.append(LayerAction(name, "skipped", "no mask given for it", shape))
            continue
        tied = [p for mid, p in param_owners.get(id(lin.weight), {}).items() if mid != id(lin)]
        if tied:
            report.append(LayerAction(name, "dense", f"weight is tied to {tied[0]}; packing would untie it",
                                      shape))
            continue
        try:
            weight = linear_weight(lin)
            check_weight(weight.detach(), name)
            if masks is not None:
                if not isinstance(masks[name], torch.Tensor):
                    raise TypeError(f"{name}: mask must be a torch.bool tensor, got {type(masks[name]).__name__}")
                mask = masks[name].to(weight.device)
            else:
                mask = magnitude_mask(weight, pat, sparsity, name)
                if bool(mask.all()):  # packed, the same values would only gain an index
                    report.append(LayerAction(name, "dense", f"{name}: {nothing_pruned_reason(pat)}", shape))
                    continue
            new = SparseLinear.from_linear(lin, mask, pat, name=name)
        except formats.UnsupportedShape as e:
            report.append(LayerAction(name, "dense", str(e), shape))
            continue
        new.train(lin.training)
        swaps.append((lin, new))
        report.append(LayerAction(name, "sparsified", "", shape, new.format))
    for lin, new in swaps:
        for parent, attr in holders.get(id(lin), []):
            setattr(parent, attr, new)
    if report.sparsified:
        guard_save_pretrained(model)
    elif any(isinstance(m, SparseLinear) for m in model.modules()):
        # a second call (another pattern, say) finds no nn.Linear left to pack: it changed nothing
        from .. import _warn

        _warn(f"sparsify_: {type(model).__name__} already holds SparseLinear layers and no nn.Linear was packed; "
              f"the model is unchanged (unpack or reload the dense model to pack it another way)", stacklevel=2)
    return report
