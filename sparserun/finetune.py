"""Sparsity-preserving fine-tuning: recover quality after pruning without losing the pattern.

Two ways to train a pruned model, both keeping every pruned weight exactly zero:

    masked fine-tuning   all weights train; `SparsityGuard` enforces the masks: a gradient hook zeroes the
                         pruned entries' gradients (so AdamW's moments stay zero there) AND an optimizer
                         post-step hook writes the pruned entries back to 0.0 after every step (so no
                         optimizer rule, weight decay, momentum or a custom one, can leave them non-zero)
    LoRA recovery        as in LLM-Pruner (Ma et al. 2023): the model is frozen and each pruned Linear gets
                         a low-rank adapter W + s·BA (s = alpha / rank). The adapter's update is masked in
                         the forward pass too, y = x (W + (s·BA) ⊙ M)ᵀ + b, so the model trained is exactly
                         the model merged: `merge` writes W + (s·BA) ⊙ M, which has the same mask as W, and
                         the merged outputs equal the adapted ones (masked=False trains the cheaper unmasked
                         x Aᵀ Bᵀ path instead and masks only at the merge, which then changes the function)

Loss: with a teacher (the dense model), distillation on the model's outputs, for causal LMs KL(teacher ‖
student) on the logits at `temperature` (mixed with next-token cross-entropy when distill_weight < 1), for
other models (encoders) the batch's relative squared error plus the per-token cosine distance of the last
hidden states;
without a teacher, next-token cross-entropy (causal LMs only: an encoder without a head has no loss of its
own). Training runs with dropout off (model.eval()): recovery teaches the pruned model to compute what the
inference model computes, and on short runs dropout only adds noise.

From a packed checkpoint (`finetune_checkpoint`, `sparserun finetune DIR OUT --text FILE`): sparserun.load
gives SparseLinear layers holding packed buffers, which cannot train; `unpack_sparse_` turns each into a
masked dense nn.Linear (weight = dense_weight(), mask = weight_mask(), its pattern remembered), training
runs in float32, `repack_` packs every layer again with its own pattern (`SparseLinear.from_linear`, which
checks the mask fits), and sparserun.save writes OUT atomically (a temp directory renamed into place) with
the config and tokenizer copied from DIR, which is only read. Embeddings stay frozen by default: their
gradient touches only the tokens of the training text, while AdamW's weight decay would shrink every row.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import _is_within, linked_into
from .formats import PatternViolation
from .prune import calibrate
from .prune.movement import _callback_base, named_linear

DEFAULT_SEQLEN = 128  # training windows: short keeps a CPU step cheap; recovery needs many steps, not long ones


class FinetuneError(ValueError):
    """Fine-tuning cannot run as asked (one line naming the argument, file or layer)."""


# ---- module surgery -----------------------------------------------------------------------------------

def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) holding it (a module may be reachable by two paths)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent.named_children():
            out.setdefault(id(child), []).append((parent, attr))
    return out


def _replace(holders, old: nn.Module, new: nn.Module) -> None:
    for parent, attr in holders.get(id(old), []):
        setattr(parent, attr, new)


@dataclass
class SparseLayerInfo:
    """What `unpack_sparse_` remembers of a SparseLinear to pack it again the same way."""

    mask: torch.Tensor  # bool [out, in], True = kept
    pattern: str


def unpack_sparse_(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, SparseLayerInfo]:
    """Replace every SparseLinear of `model` by a masked dense nn.Linear (in place);
    return {name: SparseLayerInfo}. dtype: the dense weights' dtype (default: the packed one)."""
    from .runtime.linear import SparseLinear

    holders = _holders(model)
    infos: dict[str, SparseLayerInfo] = {}
    done: dict[int, nn.Linear] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, SparseLinear) or id(m) in done:
            continue
        w = m.dense_weight()
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.to(dtype or w.dtype))
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().to(dtype or m.bias.dtype))
        infos[name] = SparseLayerInfo(m.weight_mask(), m.pattern)
        lin.train(m.training)
        _replace(holders, m, lin)
        done[id(m)] = lin
    return infos


def repack_(model: nn.Module, infos: dict[str, SparseLayerInfo]) -> int:
    """Pack each nn.Linear named in `infos` into a SparseLinear with its own mask and pattern (in place);
    returns the number of layers packed. Raises PatternViolation if a mask no longer fits its pattern."""
    from .runtime.linear import SparseLinear

    holders = _holders(model)
    swaps = []  # all packed before any is swapped: a refusal at the last layer leaves the model as it was
    for name, info in infos.items():
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise FinetuneError(f"{name} is a {type(lin).__name__}, expected the nn.Linear to pack again "
                                f"(merge LoRA adapters first)")
        new = SparseLinear.from_linear(lin, info.mask.to(lin.weight.device), info.pattern, name=name)
        new.train(lin.training)
        swaps.append((lin, new))
    for lin, new in swaps:
        _replace(holders, lin, new)
    return len(infos)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    return named_linear(model, name, FinetuneError, " (named in the masks)")


def _check_mask(name: str, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise FinetuneError(f"{name}: mask must be a torch.bool tensor (True = kept)")
    if tuple(mask.shape) != tuple(w.shape):
        raise FinetuneError(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
    return mask.to(w.device)


# ---- masked fine-tuning -------------------------------------------------------------------------------

def check_masks(weights, masks: dict[str, torch.Tensor]) -> None:
    """Raise PatternViolation naming the first layer whose pruned weights are not all exactly zero.
    weights: a model (the masks name its nn.Linear layers) or {name: weight}."""
    for name, mask in masks.items():
        w = (weights[name] if isinstance(weights, dict) else _linear(weights, name).weight).detach()
        bad = (w != 0) & ~mask.to(w.device)
        if bad.any():
            r, c = (int(i) for i in bad.nonzero()[0])
            raise PatternViolation(f"{name}: pruned weight at row {r}, column {c} is {float(w[r, c])} "
                                   f"({int(bad.sum())} non-zero pruned in all)")


class SparsityGuard:
    """Keep the pruned weights of `model` exactly zero while any optimizer trains it (see module doc).

        guard = SparsityGuard(model, masks)       # zeroes pruned weights now, masks their gradients
        guard.attach(optimizer)                    # and re-zeroes them after every optimizer.step()
        ... train ...
        guard.check(); guard.remove()
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        if not masks:
            raise FinetuneError("no masks given: nothing to keep sparse")
        self.entries: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        for name, mask in masks.items():
            w = _linear(model, name).weight
            self.entries.append((name, w, _check_mask(name, w, mask)))
        self._handles = []
        for _, w, mask in self.entries:
            pruned = ~mask
            self._handles.append(w.register_hook(lambda g, p=pruned: g.masked_fill(p, 0)))
        self.apply_()

    def attach(self, optimizer: torch.optim.Optimizer) -> "SparsityGuard":
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply_()))
        return self

    @torch.no_grad()
    def apply_(self) -> None:
        for _, w, mask in self.entries:
            w.masked_fill_(~mask, 0)  # +0.0, never -0.0 (a multiply by 0 keeps the sign)

    def check(self) -> None:
        """Raise PatternViolation naming the first layer with a non-zero pruned weight."""
        check_masks(dict((n, w) for n, w, _ in self.entries), {n: m for n, _, m in self.entries})

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class SparsityGuardCallback(_callback_base()):
    """`transformers.TrainerCallback` for masked fine-tuning with a Trainer: the guard's gradient hooks
    work as they are; on every optimizer step (on_optimizer_step) the pruned weights are zeroed again."""

    def __init__(self, guard: SparsityGuard):
        self.guard = guard

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.guard.apply_()

    def on_train_end(self, args, state, control, **kwargs):
        self.guard.apply_()
        self.guard.check()


# ---- LoRA ---------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank adapter whose update is confined to `mask` (see module doc).

    A [rank, in] starts Kaiming-uniform and B [out, rank] at zero (as in the LoRA paper), so the adapted
    layer starts equal to the base."""

    def __init__(self, base: nn.Linear, mask: torch.Tensor, rank: int, alpha: float | None = None,
                 masked: bool = True):
        super().__init__()
        self.base = base
        self.rank = int(rank)
        self.scaling = float(alpha if alpha is not None else 2 * rank) / self.rank
        self.masked = masked
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("mask", mask.to(w.device), persistent=False)
        # s·M as one float tensor: the delta is then a single multiply (weight-sized elementwise work is
        # what a CPU step spends most of its time on here, more than the small B @ A)
        self.register_buffer("_scaled_mask", mask.to(device=w.device, dtype=w.dtype) * self.scaling,
                             persistent=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self) -> torch.Tensor:
        """(s·BA) ⊙ M: the adapter's weight update, zero wherever the base is pruned."""
        return (self.lora_B @ self.lora_A) * self._scaled_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.masked:
            return F.linear(x, self.base.weight + self.delta(), self.base.bias)
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """The base Linear with W + (s·BA) ⊙ M written into it (pruned entries exactly 0.0)."""
        self.base.weight.add_(self.delta())
        self.base.weight.masked_fill_(~self.mask, 0)  # exact +0.0 where pruned, whatever the base held
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, masked={self.masked}"


class LoRAAdapters:
    """The adapters `add_lora_` put in a model: `.parameters()` to train, `.merge()` to fold them in."""

    def __init__(self, model: nn.Module, modules: dict[str, LoRALinear], flags: dict[int, bool]):
        self.model = model
        self.modules = modules
        self._flags = flags  # requires_grad of every model parameter before the freeze

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in (m.lora_A, m.lora_B)]

    def merge(self) -> dict[str, nn.Linear]:
        """Replace each LoRALinear by its merged base Linear (in place); restore requires_grad flags."""
        holders = _holders(self.model)
        merged = {}
        for name, m in self.modules.items():
            lin = m.merge()
            _replace(holders, m, lin)
            merged[name] = lin
        for p in self.model.parameters():
            if id(p) in self._flags:
                p.requires_grad_(self._flags[id(p)])
        self.modules = {}
        return merged


def add_lora_(model: nn.Module, masks: dict[str, torch.Tensor], rank: int, alpha: float | None = None,
              masked: bool = True) -> LoRAAdapters:
    """Freeze `model` and wrap every nn.Linear named in `masks` in a LoRALinear (in place)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise FinetuneError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not masks:
        raise FinetuneError("no masks given: LoRA recovery adapts the pruned layers, and there are none")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    targets = {}
    for name, mask in masks.items():
        lin = _linear(model, name)
        if rank > min(lin.in_features, lin.out_features):
            raise FinetuneError(f"LoRA rank {rank} exceeds the smaller side of {name} "
                                f"({lin.out_features}x{lin.in_features})")
        targets[name] = (lin, _check_mask(name, lin.weight, mask))
    for p in model.parameters():
        p.requires_grad_(False)
    holders = _holders(model)
    modules = {}
    for name, (lin, mask) in targets.items():
        with torch.no_grad():
            lin.weight.masked_fill_(~mask, 0)
        lora = LoRALinear(lin, mask, rank, alpha, masked)
        _replace(holders, lin, lora)
        modules[name] = lora
    return LoRAAdapters(model, modules, flags)


# ---- data and loss ------------------------------------------------------------------------------------

class TextWindows:
    """Random windows of `seqlen` tokens of a text (each wrapped in the tokenizer's special tokens)."""

    def __init__(self, tokenizer, text: str, seqlen: int, source: str = "training text"):
        if seqlen < 2:
            raise FinetuneError(f"seqlen must be >= 2, got {seqlen}")
        self.ids = calibrate.tokenize_text(text, tokenizer, source)
        self.pre, self.post = calibrate._special_wrap(tokenizer)
        self.body = seqlen - len(self.pre) - len(self.post)
        if self.body < 1:
            raise FinetuneError(f"seqlen {seqlen} leaves no room for text next to the special tokens")
        if len(self.ids) < self.body:
            raise FinetuneError(f"{source} has only {len(self.ids)} tokens; a window of seqlen {seqlen} needs "
                                f"{self.body} (use a longer text or a smaller --seqlen)")
        self.seqlen = seqlen

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(self.ids) - self.body + 1, (batch_size,), generator=generator).tolist()
        return torch.tensor([self.pre + self.ids[s:s + self.body] + self.post for s in starts], dtype=torch.long)


class TensorWindows:
    """Rows of a pre-tokenised LongTensor [n, T], drawn at random."""

    def __init__(self, ids: torch.Tensor):
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
            raise FinetuneError(f"training data must be a non-empty integer tensor [n, seqlen], got "
                                f"{ids.dtype} {tuple(ids.shape)}")
        self.ids = ids.long()

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return self.ids[torch.randint(0, self.ids.shape[0], (batch_size,), generator=generator)]


def model_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What the loss compares: logits for causal LMs, the last hidden state otherwise."""
    out = model(**calibrate.forward_inputs(model, ids))
    if calibrate.is_causal_lm(model):
        return out.logits
    return calibrate._model_output(out)


def hidden_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ‖s − t‖² / Σ‖t‖² over the batch's tokens plus the mean (1 − cos(s, t)) per token: the relative error
    fixes the scale, the cosine term the direction (what the output-agreement metric measures). The error is
    relative to the whole batch, not per token: a token whose teacher output is short (a special token) would
    otherwise dominate the loss."""
    s, t = student.float(), teacher.float()
    rel = (s - t).square().sum() / t.square().sum().clamp_min(1e-12)
    return rel + (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def logit_distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) per token at `temperature`, times T² (Hinton et al.), averaged over tokens."""
    v = student.shape[-1]
    s = F.log_softmax(student.float().reshape(-1, v) / temperature, -1)
    t = F.log_softmax(teacher.float().reshape(-1, v) / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def recovery_loss(model: nn.Module, ids: torch.Tensor, teacher: nn.Module | None = None, *,
                  distill_weight: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """The training loss (see module doc) on one batch of token ids."""
    causal = calibrate.is_causal_lm(model)
    if teacher is None and not causal:
        raise FinetuneError(f"{type(model).__name__} is not a causal LM, so it has no training loss of its own: "
                            f"give a teacher (--distill SRC, the dense model) to distil from")
    out = model_output(model, ids)
    if teacher is None:
        return F.cross_entropy(out[:, :-1].float().reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
    with torch.no_grad():
        t_out = model_output(teacher, ids.to(_device_of(teacher)))
    t_out = t_out.to(out.device)
    if t_out.shape != out.shape:
        raise FinetuneError(f"teacher output shape {tuple(t_out.shape)} differs from the model's "
                            f"{tuple(out.shape)}: the teacher must be the same architecture")
    if not causal:
        return hidden_distill_loss(out, t_out)
    loss = logit_distill_loss(out, t_out, temperature)
    if distill_weight < 1.0:
        ce = F.cross_entropy(out[:, :-1].float().reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        loss = distill_weight * loss + (1.0 - distill_weight) * ce
    return loss


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# ---- the loop -----------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    mode: str  # "masked" | "lora" | "custom"
    steps: int
    seconds: float
    trainable: int  # trainable parameters
    losses: list = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    @property
    def last_loss(self) -> float:
        """Mean of the last 10 % of step losses (one step's loss is noisy)."""
        if not self.losses:
            return float("nan")
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def _check_loop_args(steps, lr, weight_decay, batch_size) -> None:
    _check_positive(steps=steps, batch_size=batch_size)
    if not (lr > 0) or not (weight_decay >= 0):
        raise FinetuneError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")


def train_loop(model: nn.Module, params, data, *, steps: int, lr: float, weight_decay: float = 0.0,
               batch_size: int = 4, teacher: nn.Module | None = None, seed: int = 0, distill_weight: float = 1.0,
               temperature: float = 1.0, after_backward=None, optimizer_hook=None, warmup_steps: int = 0,
               progress: bool = True, desc: str = "finetune") -> TrainResult:
    """AdamW on `params` for `steps` steps of recovery_loss on batches from `data` (TextWindows /
    TensorWindows / LongTensor). Linear learning-rate warm-up over `warmup_steps`, then constant.

    after_backward(step): called after each backward, before the optimizer step (movement pruning's hook).
    optimizer_hook(optimizer): called once with the optimizer (e.g. SparsityGuard.attach).
    """
    from sparserun.progress import progress_bar

    if isinstance(data, torch.Tensor):
        data = TensorWindows(data)
    _check_loop_args(steps, lr, weight_decay, batch_size)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise FinetuneError("nothing to train: no parameter requires grad")
    device = _device_of(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer_hook is not None:
        optimizer_hook(opt)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()  # dropout off: see module doc
    teacher_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()  # the teacher's outputs are the targets: deterministic, no dropout
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = progress_bar(range(steps), progress=progress, desc=desc, unit="step")
    try:
        for step in bar:
            if warmup_steps:
                for g in opt.param_groups:
                    g["lr"] = lr * min(1.0, (step + 1) / warmup_steps)
            ids = data.sample(batch_size, gen).to(device)
            loss = recovery_loss(model, ids, teacher, distill_weight=distill_weight, temperature=temperature)
            if not torch.isfinite(loss):
                raise FinetuneError(f"the loss became {float(loss.detach())} at step {step} (lower --lr)")
            loss.backward()
            if after_backward is not None:
                after_backward(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_training)
    return TrainResult("custom", steps, time.perf_counter() - t0, sum(p.numel() for p in params), losses)


def _check_positive(**kw) -> None:
    for k, v in kw.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise FinetuneError(f"{k} must be a positive integer, got {v!r}")


def _frozen_embeddings(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}


def recover(model: nn.Module, masks: dict[str, torch.Tensor], data, *, steps: int, lr: float | None = None,
            lora_rank: int | None = None, lora_alpha: float | None = None, lora_masked: bool = True,
            weight_decay: float = 0.0, batch_size: int = 4, teacher: nn.Module | None = None,
            train_embeddings: bool = False, seed: int = 0, progress: bool = True, **loop_kw) -> TrainResult:
    """Fine-tune a pruned model (masked dense Linears, `masks` = {name: bool mask}) in place, keeping every
    mask: LoRA recovery with merge when `lora_rank` is given, masked fine-tuning of all weights otherwise
    (embeddings frozen unless train_embeddings). Afterwards every pruned weight is exactly 0.0 (checked)."""
    # before the adapters or the guard touch the model: a bad value must leave it as it was
    _check_loop_args(steps, (1e-3 if lora_rank is not None else 1e-4) if lr is None else lr, weight_decay,
                     batch_size)
    if lora_alpha is not None and not lora_alpha > 0:
        raise FinetuneError(f"lora_alpha must be > 0 (it scales the adapters; 0 would train nothing), "
                            f"got {lora_alpha}")
    if lora_rank is not None:
        lr = 1e-3 if lr is None else lr
        with torch.random.fork_rng(devices=[]):  # seeded adapter initialisation, global RNG left alone
            torch.manual_seed(seed)
            adapters = add_lora_(model, masks, lora_rank, lora_alpha, lora_masked)
        try:
            res = train_loop(model, adapters.parameters(), data, steps=steps, lr=lr, weight_decay=weight_decay,
                             batch_size=batch_size, teacher=teacher, seed=seed, progress=progress,
                             desc=f"LoRA r={lora_rank}", **loop_kw)
        finally:
            adapters.merge()
        res.mode = "lora"
    else:
        lr = 1e-4 if lr is None else lr
        frozen = set() if train_embeddings else _frozen_embeddings(model)
        # frozen for real (requires_grad off while training, restored after), so no gradient is even computed
        flags = {id(p): p.requires_grad for p in model.parameters()}
        guard = SparsityGuard(model, masks)  # checks the masks first: a refused one leaves nothing frozen
        try:
            for p in model.parameters():
                if id(p) in frozen:
                    p.requires_grad_(False)
            res = train_loop(model, model.parameters(), data, steps=steps, lr=lr, weight_decay=weight_decay,
                             batch_size=batch_size, teacher=teacher, seed=seed, progress=progress,
                             optimizer_hook=guard.attach, desc="masked finetune", **loop_kw)
        finally:
            guard.remove()
            for p in model.parameters():
                p.requires_grad_(flags[id(p)])
        res.mode = "masked"
    check_masks(model, masks)
    return res


# ---- from a packed checkpoint -------------------------------------------------------------------------

def _stored_dtype(src: Path) -> torch.dtype:
    from .checkpoint import CheckpointReader, dtype_from_name

    with CheckpointReader(src, verify=False) as r:
        dts = [rec["dtype"] for rec in r.layers]
    if not dts:
        raise FinetuneError(f"{src} has no sparse layers: finetune keeps the sparse layers' patterns, and "
                            f"there are none to keep")
    return dtype_from_name(max(set(dts), key=dts.count))


def _cast_params_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and persistent buffers (what a checkpoint stores) to `dtype`; non-persistent
    buffers keep theirs (rotary inv_freq stays float32 on purpose, as sparserun.load keeps it)."""
    new: dict[int, nn.Parameter] = {}  # one new Parameter per old one, so tied weights stay tied
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
                mod._parameters[name] = new[id(p)]
        for name, b in mod._buffers.items():
            if (b is not None and b.is_floating_point() and b.dtype != dtype
                    and name not in mod._non_persistent_buffers_set):
                mod._buffers[name] = b.to(dtype)


def finetune_checkpoint(src, out, text, *, steps: int = 100, lora_rank: int | None = None,
                        lora_alpha: float | None = None, distill=None, lr: float | None = None,
                        weight_decay: float = 0.0, batch_size: int = 4, seqlen: int | None = None, seed: int = 0,
                        device="cpu", dtype=None, overwrite: bool = False, progress: bool = True,
                        tokenizer=None) -> dict:
    """Load the packed checkpoint SRC, fine-tune it on `text` (a file: plain text or JSONL), write the packed
    checkpoint OUT with every layer's pattern kept (see module doc). Returns a summary dict.

    distill: a dense (Hugging Face or packed) model directory to distil from; needed for models without a
             language-model loss (encoders)
    dtype:   of OUT (default: SRC's); training itself runs in float32
    seqlen:  tokens per training window (default min(128, the model's max_position_embeddings))
    tokenizer: a directory to load the tokenizer from (default: SRC's); its tokenizer files are written to OUT
    """
    from . import eval as ev
    from .checkpoint import check_output_dir
    from .runtime.io import load, save

    src, out = Path(src), Path(out)
    _check_positive(steps=steps, batch_size=batch_size)
    if lora_rank is not None:
        _check_positive(lora_rank=lora_rank)
    if lora_alpha is not None and lora_rank is None:
        raise FinetuneError("lora_alpha (--lora-alpha) applies to LoRA: give lora_rank (--lora-rank) too, or leave "
                            "it out for masked fine-tuning")
    if lora_alpha is not None and not lora_alpha > 0:
        raise FinetuneError(f"lora_alpha must be > 0 (it scales the adapters; 0 would train nothing), got {lora_alpha}")
    if lr is not None and not lr > 0:
        raise FinetuneError(f"lr must be > 0, got {lr}")
    if not src.is_dir():
        raise FinetuneError(f"checkpoint directory not found: {src}")
    s_r, o_r = src.resolve(), out.absolute().resolve()
    if _is_within(o_r, s_r) or _is_within(s_r, o_r) or linked_into(src, out) is not None:
        raise FinetuneError(f"output {out} overlaps the checkpoint {src}, which is only read; choose another "
                            f"output directory")
    check_output_dir(out, overwrite)  # before spending minutes training (the writer checks again at the end)
    if tokenizer is not None:  # its files are copied into OUT at the end: one that cannot be must fail now
        from .checkpoint import source_files

        if not Path(tokenizer).is_dir():
            raise FinetuneError(f"tokenizer directory not found: {tokenizer}")
        source_files(Path(tokenizer))
    if distill is not None and not Path(distill).is_dir():
        raise FinetuneError(f"teacher directory not found: {distill}")
    from .convert import resolve_device, resolve_dtype

    dtype = resolve_dtype(dtype, FinetuneError)
    device = resolve_device(device, FinetuneError)
    body = calibrate.read_text(text, what="training text")
    stored = _stored_dtype(src)
    out_dtype = dtype or stored
    _check_disk(src, out, out_dtype, stored)  # before training, not after it

    model = load(src, device=device, dtype=torch.float32, progress=progress)
    if distill is None and not calibrate.is_causal_lm(model):
        raise FinetuneError(f"{type(model).__name__} is not a causal LM, so it has no training loss of its own: "
                            f"give the dense model to distil from with --distill SRC")
    from .prune.api import position_limit

    limit, field = position_limit(model.config)
    if seqlen is None:
        seqlen = min(DEFAULT_SEQLEN, limit) if limit else DEFAULT_SEQLEN
    elif limit and seqlen > limit:
        raise FinetuneError(f"seqlen {seqlen} exceeds the model's {field} {limit}")
    tok = ev.load_tokenizer(tokenizer if tokenizer is not None else src)
    data = TextWindows(tok, body, seqlen, source=f"training text {text}")
    teacher = None
    if distill is not None:
        teacher = ev.load_model(distill, device, torch.float32, progress=progress).eval()
        teacher.requires_grad_(False)
        # Logits are compared id by id: a teacher that reads the text as other ids would train silently wrong.
        ev.check_same_vocabulary(src, model, distill, teacher, tok, tokenizer, flag="--distill", error=FinetuneError)
        t_limit, t_field = position_limit(getattr(teacher, "config", None))
        if t_limit and seqlen > t_limit:  # the teacher may be another architecture, with a shorter limit
            raise FinetuneError(f"seqlen {seqlen} exceeds the --distill teacher's {t_field} {t_limit}; lower --seqlen")
    infos = unpack_sparse_(model)
    if not infos:
        raise FinetuneError(f"{src} has no sparse layers: finetune keeps the sparse layers' patterns, and "
                            f"there are none to keep")
    masks = {n: i.mask for n, i in infos.items()}
    res = recover(model, masks, data, steps=steps, lr=lr, lora_rank=lora_rank, lora_alpha=lora_alpha,
                  weight_decay=weight_decay, batch_size=batch_size, teacher=teacher, seed=seed,
                  progress=progress)
    _cast_params_(model, out_dtype)
    repack_(model, infos)
    # OUT carries the tokenizer it was trained with, so `sparserun generate OUT` needs no --tokenizer, and
    # its manifest says how it was pruned (DIR's record) and then trained
    from .checkpoint import CheckpointReader

    with CheckpointReader(src, verify=False) as r:
        pruned = r.manifest.get("prune")
    history = {"finetune": {"from": str(src), "text": str(text), "mode": res.mode, "steps": res.steps,
                            "lora_rank": lora_rank, "teacher": str(distill) if distill is not None else None,
                            "seed": seed}}
    save(model, out, overwrite=overwrite, source_dir=src, progress=progress, tokenizer_dir=tokenizer,
         extra={**({"prune": pruned} if pruned else {}), **history})
    return {"checkpoint": str(src), "output": str(out), "mode": res.mode, "steps": res.steps,
            "seconds": round(res.seconds, 1), "trainable_parameters": res.trainable,
            "first_loss": res.first_loss, "last_loss": res.last_loss, "sparse_layers": len(infos),
            "teacher": str(distill) if distill is not None else None, "dtype": str(out_dtype).removeprefix("torch."),
            "model": model}


def _check_disk(src: Path, out: Path, out_dtype: torch.dtype, stored: torch.dtype) -> None:
    """OUT holds what DIR holds (same layers, same patterns), in `out_dtype`: refuse to train for minutes when
    the result cannot be written."""
    from .convert import NotEnoughDisk, check_disk

    shards = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    need = shards * out_dtype.itemsize // max(1, stored.itemsize)  # a wider --dtype grows the floating tensors
    try:
        check_disk({"checkpoint": need, "gradient_spill": 0}, out)
    except NotEnoughDisk as e:
        raise FinetuneError(str(e).replace("converting needs", "the fine-tuned checkpoint needs")) from None


# ---- CLI ----------------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    from .cli import seed_arg

    p = sub.add_parser("finetune", help="fine-tune a packed checkpoint, keeping its sparsity pattern",
                       description="Load the packed checkpoint DIR, fine-tune it on a text (masked fine-tuning "
                                   "of every weight but the embeddings, or LoRA adapters merged under the masks with --lora-rank), "
                                   "optionally distilling from the dense model, and write the packed checkpoint "
                                   "OUT with every layer's pattern kept. DIR is only read.")
    p.add_argument("dir", help="packed checkpoint directory (from `sparserun convert` or sparserun.save)")
    p.add_argument("out", help="output directory (must not exist, be empty, or use --overwrite)")
    p.add_argument("--text", required=True, help="training text (plain or JSONL with a \"text\" field)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="train rank-R LoRA adapters on the sparse layers (base frozen) and merge them under "
                        "the masks; default: masked fine-tuning of all weights")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--distill", default=None, metavar="SRC",
                   help="dense model directory to distil from (needed for encoders)")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default 1e-3 with --lora-rank, else 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per window (default min({DEFAULT_SEQLEN}, the model's limit))")
    p.add_argument("--seed", type=seed_arg, default=0, help="seeds the batch order and adapter initialisation")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                   help="dtype of OUT (default: DIR's); training runs in float32")
    p.add_argument("--tokenizer", default=None, help="load the tokenizer from here, and write its files to OUT (default: DIR's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:
    r = finetune_checkpoint(args.dir, args.out, args.text, steps=args.steps, lora_rank=args.lora_rank,
                            lora_alpha=args.lora_alpha, distill=args.distill, lr=args.lr,
                            weight_decay=args.weight_decay, batch_size=args.batch_size, seqlen=args.seqlen,
                            seed=args.seed, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
                            progress=not args.quiet, tokenizer=args.tokenizer)
    how = "LoRA" if r["mode"] == "lora" else "masked fine-tuning"
    print(f"{how}: {r['steps']} steps in {r['seconds']:.1f} s, loss {r['first_loss']:.4f} -> "
          f"{r['last_loss']:.4f}; {r['sparse_layers']} sparse layers repacked with their patterns")
    print(f"wrote {r['output']}")
    return 0
