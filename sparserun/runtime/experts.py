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

Unrolling holds no extra copy: a non-transposed expert's weight is a view of the 3-D parameter. `fuse` puts
a pruned but still dense module back into 3-D parameters, so the model saves and loads with transformers.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

# the attributes transformers' use_experts_implementation sets on a decorated experts module
_CONTRACT = ("has_gate", "has_bias", "is_transposed")


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
        fused[name] = (module._parameters.pop(name), module._parameters.pop(f"{name}_bias", None))
    for e in range(n):
        mlp = nn.Module()
        for name, (w3, b2) in fused.items():
            setattr(mlp, name, _as_linear(w3, b2, e, module.is_transposed))
        module.add_module(str(e), mlp)
    module.__dict__["_sr_unrolled"] = True
    module.__dict__["_sr_num_experts"] = n
    # a partial of a module-level function (not a bound method) so deepcopy and torch.save keep it
    module.forward = functools.partial(unrolled_forward, module)


def unroll_all(model: nn.Module, names=None) -> list[str]:
    """Unroll every fused experts module (only those named in `names`, if given); return their names."""
    done = []
    for name, m in experts_modules(model):
        if names is None or name in names:
            unroll(m)
            done.append(name)
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
        if is_bias:
            lin.bias = nn.Parameter(value[e], requires_grad=False)
        else:
            lin.weight = nn.Parameter(value[e].t() if module.is_transposed else value[e], requires_grad=False)
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
    for p in names:
        lins = [getattr(m, p) for m in mlps]
        w = torch.stack([lin.weight.detach().t() if module.is_transposed else lin.weight.detach() for lin in lins])
        module.register_parameter(p, nn.Parameter(w, requires_grad=lins[0].weight.requires_grad))
        if lins[0].bias is not None:
            b = torch.stack([lin.bias.detach() for lin in lins])
            module.register_parameter(f"{p}_bias", nn.Parameter(b, requires_grad=lins[0].bias.requires_grad))
    for e in range(n):
        del module._modules[str(e)]
    for k in ("_sr_unrolled", "_sr_num_experts", "forward"):
        module.__dict__.pop(k, None)
    return True


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
