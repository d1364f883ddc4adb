"""One launch for sibling projections: q/k/v (and gate/up) read the same input, so run them as one layer.

Why: at 8B sizes a block-sparse layer at 90 % holds a few µs of bytes inside a launch of ~7-14 µs (H100
e2e results, dispatcher timings), so a decoder layer's seven sparse launches cost more than its weights.
Grouping q/k/v and gate/up makes them four.

    groups = sparserun.group_siblings(model)      # opt-in; returns what was grouped

Each group concatenates its members' packed tensors into one fused SparseLinear (N = sum of the members'),
and the members' buffers become views into it, so no weight is stored twice and the state_dict, save() and
the members' own forward (used under torch.compile and autograd) are unchanged. The first member called with
an input x runs the fused layer; the others, called with the *same tensor object*, unmodified (its version
counter), take their slice of that output. Any other call (another x, a member called twice, weights or
bias replaced) runs the fused layer again, so grouping never changes what a call computes. Up to kernel
summation order, it computes the same as the ungrouped layers.

What a caller sees: a member's output is a column slice of the fused output (row stride = the group's N).
`.view(*shape, heads, head_dim)`, `.reshape`, `.transpose` and elementwise ops work as on a contiguous
tensor; a `.view` that merges the feature dim with another needs `.reshape` or `.contiguous()`. Inference
tensors (torch.inference_mode) have no version counter: modifying x in place between sibling calls there is
not detected. The hand-off is per thread, so threads sharing one model (a threaded server) each get their own
input's slices. Names grouped: see SIBLINGS.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn

from ..formats import Packed
from .linear import SparseLinear

# Sibling projections that read the same input in the architectures we know (HF module names).
SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen2/3, Gemma, Phi-3 (unfused) attention
    ("gate_proj", "up_proj"),  # their MLPs: down(act(gate(x)) * up(x))
    ("query", "key", "value"),  # BERT-style self-attention
    ("w1", "w3"),  # Mixtral-style experts
)


class SiblingGroup:
    """The fused layer of one group and the bookkeeping that hands each member its slice."""

    def __init__(self, members: list[SparseLinear]):
        self.members = members
        self.fused = SparseLinear.from_packed(_concat([m.packed() for m in members]), _concat_bias(members))
        self.bounds: dict[int, tuple[int, int]] = {}
        start = 0
        for m in members:
            self.bounds[id(m)] = (start, start + m.out_features)
            start += m.out_features
        self._share_storage()
        # the hand-off between siblings is per thread: two threads running the same model (a threaded server)
        # must never take each other's slices
        self._local = threading.local()

    def __getstate__(self):  # deepcopy / pickle of a grouped model: a thread-local holds no state worth copying
        state = self.__dict__.copy()
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    # ---- storage ---------------------------------------------------------------------------------------
    def _share_storage(self) -> None:
        """Point every member's packed buffers (and bias) at views of the fused layer's: nothing twice."""
        f = self.fused
        nnz0 = 0
        for m in self.members:
            s, e = self.bounds[id(m)]
            if f.format == "semi24":
                m.values, m.meta = f.values[s:e], f.meta[s:e]
            else:  # bsr: rows of blocks; the members keep their own (small) crow_indices
                nnz = m.values.shape[0]
                m.values, m.col_indices = f.values[nnz0:nnz0 + nnz], f.col_indices[nnz0:nnz0 + nnz]
                nnz0 += nnz
            if f.bias is not None and m.bias is not None:
                m.bias = nn.Parameter(f.bias.data[s:e], requires_grad=m.bias.requires_grad)
        self._ptrs = {id(m): self._member_ptrs(m) for m in self.members}

    @staticmethod
    def _member_ptrs(m: SparseLinear) -> tuple:
        return (m.values.device, m.values.data_ptr(), None if m.bias is None else m.bias.data_ptr())

    def intact(self, m: SparseLinear) -> bool:
        """Do the member's tensors still live in the fused layer? (model.to(), a replaced bias, a reload: no)"""
        return self._ptrs.get(id(m)) == self._member_ptrs(m)

    # ---- forward ---------------------------------------------------------------------------------------
    def _reset(self) -> None:
        st = self._local
        st.x = st.y = st.x_version = st.w_version = None
        st.taken = set()

    def _versions(self, x: torch.Tensor):
        from .dispatch import version_of

        f = self.fused
        return version_of(x), (version_of(f.values), version_of(f.bias))

    def output(self, m: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        from .dispatch import sparse_linear

        st = self._local
        if not hasattr(st, "taken"):  # this thread's first call
            self._reset()
        xv, wv = self._versions(x)
        fresh = (st.x is x and st.x_version == xv and st.w_version == wv and id(m) not in st.taken)
        if not fresh:
            self._reset()
            st.x, st.x_version, st.w_version = x, xv, wv
            st.y = sparse_linear(self.fused, x)
        st.taken.add(id(m))
        s, e = self.bounds[id(m)]
        y = st.y[..., s:e]
        if len(st.taken) == len(self.members):
            self._reset()  # every sibling has its slice: hold no activations between calls
        return y


def _concat(parts: list[Packed]) -> Packed:
    first = parts[0]
    k = first.shape[1]
    n = sum(p.shape[0] for p in parts)
    if first.format == "semi24":
        tensors = {r: torch.cat([p.tensors[r] for p in parts]) for r in ("values", "meta")}
    elif first.format == "bsr":
        crows, offset = [parts[0].tensors["crow_indices"]], 0
        for prev, p in zip(parts, parts[1:]):
            offset += prev.tensors["values"].shape[0]
            crows.append(p.tensors["crow_indices"][1:] + offset)
        tensors = {"crow_indices": torch.cat(crows),
                   "col_indices": torch.cat([p.tensors["col_indices"] for p in parts]),
                   "values": torch.cat([p.tensors["values"] for p in parts])}
    else:
        raise ValueError(f"cannot group layers of format {first.format!r}")
    return Packed(first.format, (n, k), tensors, dict(first.meta))


def _concat_bias(members: list[SparseLinear]) -> torch.Tensor | None:
    if all(m.bias is None for m in members):
        return None
    ref = next(m.bias for m in members if m.bias is not None)
    return torch.cat([m.bias.detach() if m.bias is not None else ref.new_zeros(m.out_features) for m in members])


def _ungrouped(m: SparseLinear) -> bool:
    g = m.__dict__.get("_sr_group")
    return g is None or not g.intact(m)  # a stale group (the model was moved or edited) may be replaced


def _compatible(members: list) -> bool:
    if not all(isinstance(m, SparseLinear) for m in members):
        return False
    a = members[0]
    return (a.format in ("semi24", "bsr")
            and all(_ungrouped(m) for m in members)
            and len({id(m) for m in members}) == len(members)
            and all((m.format, m.in_features, m.block, m.pattern, m.values.dtype, m.values.device)
                    == (a.format, a.in_features, a.block, a.pattern, a.values.dtype, a.values.device)
                    for m in members)
            and not any(m.values.is_meta for m in members))


def group_siblings(model: nn.Module, siblings=SIBLINGS) -> list[str]:
    """Group the sibling SparseLinear layers of `model` (see the module docstring). Returns one line per group
    ("model.layers.0.self_attn: q_proj+k_proj+v_proj"). Layers already grouped, of a format without a kernel,
    or differing in input size, format, block, dtype or device are left alone."""
    siblings = [tuple(g) if isinstance(g, (tuple, list)) else g for g in
                ([siblings] if isinstance(siblings, str) else siblings)]
    if not all(isinstance(g, tuple) and len(g) > 1 and all(isinstance(n, str) for n in g) for g in siblings):
        # a bare "q_proj" was iterated letter by letter
        raise TypeError(f"siblings must be groups of module names, e.g. [('q_proj', 'k_proj', 'v_proj')], got "
                        f"{siblings!r}")
    done = []
    with torch.no_grad():
        for pname, parent in model.named_modules():
            for names in siblings:
                members = [getattr(parent, n, None) for n in names]
                if not _compatible(members):
                    continue
                group = SiblingGroup(members)
                for m in members:
                    m.__dict__["_sr_group"] = group  # a plain attribute: never a submodule, never saved
                done.append(f"{pname or '<root>'}: {'+'.join(names)}")
    return done


def ungroup_siblings(model: nn.Module) -> int:
    """Make every member run on its own again (its tensors stay views; that is harmless). Returns how many."""
    count = 0
    for m in model.modules():
        if m.__dict__.pop("_sr_group", None) is not None:
            count += 1
    return count


def running_layers(model: nn.Module) -> list[tuple[str, SparseLinear]]:
    """Every SparseLinear that runs in `model`: its own modules, and each intact group's fused layer, which is
    not a submodule (named after its members: "model.layers.0.self_attn.q_proj+k_proj+v_proj"). What the
    tuner must tune and what a memory count must see: at run time the fused layer runs, with its own N."""
    names = {id(m): n for n, m in model.named_modules()}
    out, seen = [], set()
    for name, m in model.named_modules():
        if not isinstance(m, SparseLinear):
            continue
        out.append((name, m))
        group = m.__dict__.get("_sr_group")
        if group is None or id(group) in seen or not all(group.intact(x) for x in group.members):
            continue
        seen.add(id(group))
        member_names = [names.get(id(x), "?") for x in group.members]
        prefix = member_names[0].rpartition(".")[0]
        fused_name = "+".join(n.rpartition(".")[2] for n in member_names)
        out.append((f"{prefix}.{fused_name}" if prefix else fused_name, group.fused))
    return out
