"""Mixture-of-experts weights held as 3-D parameters, unrolled into one pair of Linear layers per expert.

transformers >= 5 stores the experts of an MoE block as 3-D parameters (`gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I], transposed in some families, `up_proj` alone where there is no gate, optional
`*_bias` [E, out]) in a module decorated with `use_experts_implementation`. That decorator states one
contract for all of them, the one transformers' own batched/grouped implementations rely on:

    y_t = Σ_k w_tk · post_norm(down_e(gate(gate_up_e(x_t))))    e = top_k_index[t, k]

with `gate` the module's `_apply_gate` (or `act_fn` without a gate) and `post_norm` its `post_expert_norm`
where it has one. Those experts are most of an MoE model's weights, and pruning, packing, the checkpoint
and the kernels all work on 2-D Linear layers, so such a module is *unrolled*: expert e becomes a child
module named "e" holding `gate_up_proj` (or `up_proj`) and `down_proj` as nn.Linear, [out, in] like any
other, and the module gets an instance `forward` that routes tokens expert by expert by the contract above
(transformers' eager loop). Its class, `_apply_gate`, activation and norm stay what they were. After
unrolling, `model.layers.0.mlp.experts.3.down_proj` is one more Linear to prune, pack (SparseLinear) and
save; load unrolls the modules whose experts the checkpoint stores that way.

Unrolling holds no extra copy: each expert's weight is a view of the 3-D parameter (transposed where the
family stores it so). `fuse` puts a pruned but still dense module back into its 3-D parameters (the same
objects, which the views wrote into), so the model saves and loads with transformers.
"""
from __future__ import annotations

import functools
import re
import weakref

import torch
import torch.nn as nn

# the attributes transformers' use_experts_implementation sets on a decorated experts module
_CONTRACT = ("has_gate", "has_bias", "is_transposed")
# unrolled module -> {parameter name: weak reference to its 3-D Parameter}: see unroll (outside the module, so
# that copies and pickles of it, whose experts are no views of these, never see them)
_FUSED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def in_proj(module: nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def _fused_names(module: nn.Module) -> tuple[str, str]:
    return (in_proj(module), "down_proj")


def is_unrolled(module: nn.Module) -> bool:
    return bool(module.__dict__.get("_sr_unrolled"))


def is_fused_experts(module: nn.Module) -> bool:
    """An experts module under transformers' experts contract whose weights are still 3-D parameters."""
    if is_unrolled(module) or not all(isinstance(getattr(module, a, None), bool) for a in _CONTRACT):
        return False
    if getattr(module, "_is_expert_parallel", False):
        return False  # a shard of the experts: its routing indices are global, this contract does not hold
    ps = [module._parameters.get(n) for n in _fused_names(module)]
    return all(p is not None and p.dim() == 3 for p in ps) and ps[0].shape[0] == ps[1].shape[0]


def experts_modules(model: nn.Module, unrolled: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, module) of every fused (or, with unrolled=True, unrolled) experts module of `model`."""
    test = is_unrolled if unrolled else is_fused_experts
    return [(n, m) for n, m in model.named_modules() if test(m)]


def num_experts(module: nn.Module) -> int:
    if is_unrolled(module):
        return module.__dict__["_sr_num_experts"]
    return module._parameters["down_proj"].shape[0]


def _as_linear(w3: torch.Tensor, b2: torch.Tensor | None, e: int, transposed: bool) -> nn.Linear:
    """Expert e of a 3-D weight (and its [E, out] bias) as an nn.Linear, its weight [out, in]."""
    w = w3[e].t() if transposed else w3[e]  # a view either way: no copy of the experts is made here
    out_f, in_f = w.shape
    lin = nn.Linear(in_f, out_f, bias=b2 is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach(), requires_grad=w3.requires_grad)
    if b2 is not None:
        lin.bias = nn.Parameter(b2[e].detach(), requires_grad=b2.requires_grad)
    return lin


def unroll(module: nn.Module) -> None:
    """Turn a fused experts module into per-expert Linear children (in place; see the module doc)."""
    if not is_fused_experts(module):
        raise ValueError(f"{type(module).__name__} is not a fused experts module under transformers' contract")
    n = num_experts(module)
    fused = {}
    for name in _fused_names(module):
        for key in (name, f"{name}_bias"):
            if module._parameters.get(key) is not None:
                fused[key] = module._parameters.pop(key)
    for e in range(n):
        mlp = nn.Module()
        for name in _fused_names(module):
            setattr(mlp, name, _as_linear(fused[name], fused.get(f"{name}_bias"), e, module.is_transposed))
        module.add_module(str(e), mlp)
    module.__dict__["_sr_unrolled"] = True
    module.__dict__["_sr_num_experts"] = n
    # fuse() gives these very Parameter objects back while the experts are still views of them, so that an
    # optimizer built before unrolling keeps training them; weak, so that packed experts free the dense ones
    _FUSED[module] = {k: weakref.ref(p) for k, p in fused.items()}
    # a partial of a module-level function (not a bound method) so deepcopy and torch.save keep it
    module.forward = functools.partial(unrolled_forward, module)


def unroll_all(model: nn.Module, names=None) -> list[str]:
    """Unroll every fused experts module (only those named in `names`, if given); return their names. While
    any is unrolled, `model.save_pretrained` refuses (transformers would not load the per-expert names back)."""
    from .linear import guard_save_pretrained

    done = []
    for name, m in experts_modules(model):
        if names is None or name in names:
            unroll(m)
            done.append(name)
    if done:
        guard_save_pretrained(model)
    return done


def unroll_stored(model: nn.Module, tensor_names) -> list[str]:
    """Unroll the experts modules whose experts a checkpoint stores unrolled (`<module>.<e>.*` names)."""
    stored = set()
    for t in tensor_names:
        parts = t.split(".")
        for i in range(1, len(parts)):
            if parts[i].isdigit():
                stored.add(".".join(parts[:i]))
    return unroll_all(model, stored)


def set_fused(module: nn.Module, attr: str, value: torch.Tensor) -> bool:
    """Put a 3-D weight (or [E, out] bias) named as in the fused layout into an unrolled module's experts
    (each expert's Linear gets a view of `value`); False if `attr` is not such a name of this module."""
    if not is_unrolled(module):
        return False
    proj, is_bias = (attr[:-len("_bias")], True) if attr.endswith("_bias") else (attr, False)
    if proj not in _fused_names(module) or value.shape[0] != num_experts(module):
        return False
    for e in range(num_experts(module)):
        lin = getattr(module._modules[str(e)], proj)
        part = value[e] if is_bias or not module.is_transposed else value[e].t()
        want = lin.bias if is_bias else lin.weight
        if want is None or part.shape != want.shape:
            raise ValueError(f"expert {e} gets a {tuple(part.shape)} {'bias' if is_bias else 'weight'}, its "
                             f"Linear layer holds {None if want is None else tuple(want.shape)}")
        if is_bias:
            lin.bias = nn.Parameter(part, requires_grad=False)
        else:
            lin.weight = nn.Parameter(part, requires_grad=False)
    return True


def fuse(module: nn.Module) -> bool:
    """Undo `unroll` for a module whose experts are all still nn.Linear (a pruned, unpacked model): stack
    their weights back into 3-D parameters. False (and nothing changed) if any expert is packed."""
    if not is_unrolled(module):
        return False
    n = num_experts(module)
    mlps = [module._modules[str(e)] for e in range(n)]
    names = _fused_names(module)
    if not all(type(getattr(m, p)) is nn.Linear for m in mlps for p in names):
        return False
    originals = {k: r() for k, r in _FUSED.pop(module, {}).items()}
    for p in names:
        lins = [getattr(m, p) for m in mlps]
        for key, parts in ((p, [lin.weight for lin in lins]), (f"{p}_bias", [lin.bias for lin in lins])):
            if parts[0] is None:
                continue
            orig = originals.get(key)
            if orig is not None and all(_is_view_of(t, orig, e) for e, t in enumerate(parts)):
                module.register_parameter(key, orig)  # the experts wrote into it in place: it holds their values
                continue
            t = torch.stack([x.detach().t() if module.is_transposed and key == p else x.detach() for x in parts])
            module.register_parameter(key, nn.Parameter(t, requires_grad=parts[0].requires_grad))
    for e in range(n):
        del module._modules[str(e)]
    for k in ("_sr_unrolled", "_sr_num_experts", "forward"):
        module.__dict__.pop(k, None)
    return True


def _is_view_of(t: torch.Tensor, whole: torch.Tensor, e: int) -> bool:
    """Is `t` still expert e's slice of the 3-D `whole` (as _as_linear made it), not a replacement?"""
    part = whole[e]
    return (t.device == whole.device and t.dtype == whole.dtype and t.numel() == part.numel()
            and t.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            and t.data_ptr() == part.data_ptr())


def router_names(model: nn.Module) -> set[str]:
    """The Linear layers that route tokens to experts: in the block holding an experts module (its parent),
    outside it, with one output per expert (the router) or a single output (Qwen's shared_expert_gate).
    Pruning them changes which experts run, and their outputs are too narrow for a pattern to pay off, so
    pruning leaves them dense. Routers held as plain parameters (most families) are not Linear layers."""
    from .linear import is_linear

    out = set()
    for path, mod in experts_modules(model) + experts_modules(model, unrolled=True):
        parent_path = path.rpartition(".")[0]
        parent = model.get_submodule(parent_path) if parent_path else model
        n, h = num_experts(mod), _input_dim(mod)
        for name, m in parent.named_modules():
            full = f"{parent_path}.{name}" if parent_path else name
            if full == path or full.startswith(path + "."):
                continue
            if is_linear(m) and getattr(m, "in_features", None) == h and getattr(m, "out_features", None) in (n, 1):
                out.add(full)
    return out


def _input_dim(module: nn.Module) -> int:
    """The hidden size the experts read (what a router reads too)."""
    if is_unrolled(module):
        return getattr(module._modules["0"], in_proj(module)).in_features
    w = module._parameters[in_proj(module)]
    return w.shape[1] if module.is_transposed else w.shape[2]


def expert_linear_names(model: nn.Module) -> set[str]:
    """Full names of the per-expert Linear layers of every unrolled experts module."""
    return {f"{path}.{e}.{p}" for path, mod in experts_modules(model, unrolled=True)
            for e in range(num_experts(mod)) for p in _fused_names(mod)}


_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


def group_experts(items: list, name_of, key_of) -> list[list]:
    """`items` (report rows, checkpoint layer records) grouped for a table: the items of one experts module
    that differ only in the expert index and agree on key_of(item) form one group, in first-seen order;
    every other item is a group of its own. A 128-expert, 48-layer model prints 96 expert lines, not 12,288."""
    groups: dict = {}
    for item in items:
        name = name_of(item)
        wild = _EXPERT_INDEX.sub(".experts.*.", name)
        groups.setdefault((wild, key_of(item)) if wild != name else (name, id(item)), []).append(item)
    return list(groups.values())


def group_name(group: list, name_of) -> str:
    """The table name of a group_experts group: the name, or `...experts.*.down_proj (x128)`."""
    name = name_of(group[0])
    return name if len(group) == 1 else f"{_EXPERT_INDEX.sub('.experts.*.', name)} (x{len(group)})"


def fuse_all(model: nn.Module, names=None) -> list[str]:
    """fuse() every unrolled experts module (those named in `names`, if given); return the names fused."""
    return [n for n, m in experts_modules(model, unrolled=True) if (names is None or n in names) and fuse(m)]


def _routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index, top_k_weights) as the MoE block passed them: positionally (every family), or by the
    names the families use (gpt-oss calls them router_indices / routing_weights)."""
    args = list(args)
    idx = kwargs.pop("top_k_index", None)
    idx = kwargs.pop("router_indices", idx)
    wts = kwargs.pop("top_k_weights", None)
    wts = kwargs.pop("routing_weights", wts)
    if idx is None:
        idx = args.pop(0)
    if wts is None:
        wts = args.pop(0)
    if args or kwargs:
        raise TypeError(f"unrolled experts forward got unexpected arguments: {len(args)} positional, "
                        f"{', '.join(kwargs) or 'no'} keyword")
    return idx, wts


def unrolled_forward(module: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The experts contract (module doc), one expert at a time over the experts some token chose."""
    top_k_index, top_k_weights = _routing(args, kwargs)
    n = num_experts(module)
    proj = in_proj(module)
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    # one host sync for the experts hit, as transformers' eager loop; ids outside [0, E) are no expert
    for e in torch.unique(top_k_index).tolist():
        if not 0 <= e < n:
            continue
        token_idx, pos = torch.where(top_k_index == e)
        mlp = module._modules[str(e)]
        h = getattr(mlp, proj)(hidden_states[token_idx])
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        h = mlp.down_proj(h)
        if getattr(module, "has_post_expert_norm", False):
            h = module.post_expert_norm(h)
        out.index_add_(0, token_idx, h.float() * top_k_weights[token_idx, pos, None].float())
    return out.to(hidden_states.dtype)
