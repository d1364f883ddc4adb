"""Training-time pruning: movement pruning (Sanh, Wolf & Rush 2020) at every granularity sparserun packs.

One-shot scores (magnitude, wanda, ...) ask how big a weight is; movement asks where fine-tuning is taking
it. A weight moving away from zero is kept, one moving towards zero is pruned. The score of weight W_ij
comes from the gradient of the loss with respect to the *masked* weight W' = W ⊙ M, through a
straight-through estimator (the top-k mask is treated as the identity in the backward pass):

    hard movement   S ← S − W ⊙ ∂L/∂W'   (accumulated every step, no learning rate: only the order matters),
                    M = TopK(S) at the scheduled sparsity
    soft movement   S is learned: ∂L/∂S = W ⊙ ∂L/∂W' plus the gradient of the regulariser
                    λ · mean_layers mean(σ(S)), stepped by its own Adam (score_lr); M = TopK(S)

Soft movement in the paper keeps σ(S) > τ, so its sparsity is whatever λ makes it; here both variants keep
exactly the top-k at the scheduled sparsity, because a packed format needs a known, pattern-shaped mask.
With top-k the regulariser no longer sets the sparsity: it decays scores towards "pruned", most strongly
near σ(S) = ½, so stale evidence fades and a weight must keep earning its place.

Granularity follows the pattern, so `finalize()` masks pack directly (`formats.pack(w, mask, pattern)`):

    "unstructured"  one score per weight, top-k per layer (or per row with per_row=True)
    "N:M"           one score per weight, the top N' of every M inputs; the cubic schedule lowers N' from M to
                    N (the sparsity after step t is round(s(t)·M)/M, so 2:4 passes through 3:4 to 2:4)
    "BxB"           one score per B x B block (block movement pruning, Lagunas et al. 2021): the block's score
                    gradient is the sum of its weights' W ⊙ ∂L/∂W'; top-k blocks per layer, or the same count
                    in every block-row with balance_rows=True

The sparsity follows the cubic schedule of Zhu & Gupta (2017), `CubicSchedule`.

Pruned weights are not zeroed while training: the forward uses W ⊙ M, W's gradient is masked (∂L/∂W =
∂L/∂W' ⊙ M), and a weight whose score climbs back into the top-k returns with its old value, as in the
paper. `finalize()` zeroes the pruned weights, restores the Linear layers' own forward and returns the masks:

    pruner = MovementPruner(model, "32x32", CubicSchedule(0.7, total_steps=300, warmup_steps=30,
                                                          cooldown_steps=60))
    for batch in data:                        # a plain PyTorch loop
        loss = loss_fn(model, batch)
        loss.backward()
        pruner.step()                         # after backward, before or after optimizer.step()
        optimizer.step(); optimizer.zero_grad()
    masks = pruner.finalize()
    sparserun.sparsify_(model, "32x32", masks=masks); sparserun.save(model, out, source_dir=src)

With a `transformers.Trainer`, pass `MovementPruningCallback(pruner)` in `callbacks=`. The scores are not
model parameters (the model's optimizer never sees them, its weight decay never touches them, they are not
in the state_dict); `pruner.state_dict()` saves them for a resume.
"""
from __future__ import annotations

import math
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import SparserunWarning
from ..formats import UnsupportedShape
from ..patterns import Pattern, parse
from ..runtime.linear import is_linear, linear_weight
from . import masks as masks_mod

METHODS = ("hard", "soft")


def named_linear(model: nn.Module, name: str, error=ValueError, named_in: str = "",
                 conv1d: bool = False) -> nn.Module:
    """model.get_submodule(name), which must be an nn.Linear (or, with conv1d=True, GPT-2's Conv1D); else
    `error` naming the layer (and where it was named, e.g. " (named in the masks)")."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise error(f"layer {name}{named_in} does not exist in {type(model).__name__}") from None
    if not (isinstance(m, nn.Linear) or (conv1d and is_linear(m))):
        raise error(f"layer {name} is a {type(m).__name__}, not an nn.Linear")
    return m


class MovementError(ValueError):
    """Movement pruning cannot be set up or continued as asked (one line naming the problem)."""


# ---- schedule -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CubicSchedule:
    """Sparsity after `step` optimizer steps (Zhu & Gupta 2017, "To prune, or not to prune"):

        step < warmup                       initial_sparsity
        warmup <= step < total - cooldown   s_f + (s_i − s_f) · (1 − (t − warmup) / ramp)³
                                            with t = step rounded down to a multiple of update_interval past
                                            warmup, ramp = total − warmup − cooldown
        step >= total − cooldown            final_sparsity

    The sparsity only changes every `update_interval` steps, and falls fastest at first, when the weights
    that are easy to lose go, then slowly while the network adapts to each cut. The cool-down trains at
    the final sparsity so the last cuts are recovered from too.
    """

    final_sparsity: float
    total_steps: int
    initial_sparsity: float = 0.0
    warmup_steps: int = 0
    cooldown_steps: int = 0
    update_interval: int = 1

    def __post_init__(self):
        for name in ("final_sparsity", "initial_sparsity"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or not 0.0 <= v < 1.0:
                raise MovementError(f"{name} must be in [0, 1), got {v!r}")
        if self.initial_sparsity > self.final_sparsity:
            raise MovementError(f"initial_sparsity {self.initial_sparsity} is above final_sparsity "
                                f"{self.final_sparsity} (the schedule only prunes more over time)")
        for name in ("total_steps", "warmup_steps", "cooldown_steps", "update_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise MovementError(f"{name} must be a non-negative integer, got {v!r}")
        if self.update_interval < 1:
            raise MovementError(f"update_interval must be >= 1, got {self.update_interval}")
        if self.total_steps < 1:
            raise MovementError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps + self.cooldown_steps > self.total_steps:
            raise MovementError(f"warmup_steps ({self.warmup_steps}) + cooldown_steps ({self.cooldown_steps}) "
                                f"exceed total_steps ({self.total_steps})")

    @property
    def ramp_steps(self) -> int:
        return self.total_steps - self.warmup_steps - self.cooldown_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return float(self.initial_sparsity)
        if step >= self.total_steps - self.cooldown_steps or self.ramp_steps == 0:
            return float(self.final_sparsity)
        t = (step - self.warmup_steps) // self.update_interval * self.update_interval
        frac = 1.0 - t / self.ramp_steps
        s = self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * frac ** 3
        # clamp: rounding must not dip below the warm-up value at t = 0 (the schedule never un-prunes)
        return float(min(max(s, self.initial_sparsity), self.final_sparsity))


# ---- mask selection at one sparsity -------------------------------------------------------------------

def _all_kept(shape, device) -> torch.Tensor:
    return torch.ones(shape, dtype=torch.bool, device=device)


def select_mask(score: torch.Tensor, pat: Pattern, sparsity: float, *, per_row: bool = False,
                balance_rows: bool = False, name: str = "weight") -> torch.Tensor:
    """Weight-shaped bool mask from a movement score at `sparsity` (block scores [N/B, K/B] for blocks).

    Uses prune/masks.py, the same selection one-shot pruning uses, so the final masks pack exactly as
    one-shot masks do. For N:M the sparsity is rounded to a whole number of pruned weights per group."""
    if pat.kind == "block":
        b = pat.block
        if sparsity <= 0.0:
            return _all_kept((score.shape[0] * b, score.shape[1] * b), score.device)
        # every weight of a block gets the block's score: masks.blocks pools by sum, which keeps the order
        return masks_mod.blocks(masks_mod.expand_blocks(score, b), b, sparsity, balance_rows=balance_rows,
                                name=name)
    if pat.kind == "nm":
        pruned = min(round(sparsity * pat.m), pat.m - pat.n)
        if pruned <= 0:
            return _all_kept(score.shape, score.device)
        return masks_mod.nm(score.float(), pat.m - pruned, pat.m)
    if sparsity <= 0.0:
        return _all_kept(score.shape, score.device)
    return masks_mod.unstructured(score.float(), sparsity, per_row=per_row)


# ---- the pruner ---------------------------------------------------------------------------------------

class _Layer:
    """Movement state of one nn.Linear: its scores, current mask, and the forward it had before."""

    def __init__(self, name: str, linear: nn.Module, pat: Pattern):
        self.name = name
        self.linear = linear
        w = linear_weight(linear)  # [out, in]; a transposed view for Conv1D
        if pat.kind == "block":
            b = pat.block
            n, k = w.shape
            if n % b or k % b:
                raise UnsupportedShape(f"{name}: shape {n}x{k} is not divisible by the {b}x{b} block size")
            shape = (n // b, k // b)
        else:
            shape = tuple(w.shape)
        # fp32 whatever the weight dtype: accumulated movement in fp16 would lose the small late steps
        self.scores = torch.zeros(shape, dtype=torch.float32, device=w.device, requires_grad=True)
        self.mask = _all_kept(w.shape, w.device)  # bool, weight-shaped
        self.block_mask = _all_kept(shape, w.device) if pat.kind == "block" else None
        self.block = pat.block if pat.kind == "block" else 0


def _default_layers(model: nn.Module) -> list[str]:
    """The nn.Linear layers inside the model's repeated blocks (what sparserun.prune prunes by default:
    not the LM head, not a pooler, never embeddings)."""
    from .calibrate import stack_linear_names

    return stack_linear_names(model)


def _refuse_fused_experts(model: nn.Module) -> None:
    """The default layers would silently leave an MoE's experts (most of its weights) dense when they are
    still 3-D parameters. Unrolling them here is no fix: it replaces the parameters an optimizer built
    before the pruner trains, so the order (unroll, then optimizer) must be the caller's."""
    from ..runtime.experts import experts_modules

    fused = experts_modules(model)
    if fused:
        raise MovementError(f"{fused[0][0]} holds MoE experts as 3-D parameters ({len(fused)} such modules), "
                            f"which MovementPruner prunes only as per-expert Linears: call "
                            f"sparserun.runtime.experts.unroll_all(model) before building the optimizer and "
                            f"the pruner, or pass layers= to leave the experts dense")


class MovementPruner:
    """Movement pruning driven from a training loop (see module doc).

    model:        the model being fine-tuned (changed in place: the chosen Linears' forward uses W ⊙ M)
    pattern:      "unstructured", "N:M", "BxB"
    schedule:     a CubicSchedule, or a final sparsity (then total_steps= is required and warmup_steps,
                  cooldown_steps, initial_sparsity, update_interval may be given as keywords)
    method:       "hard" (accumulated movement) or "soft" (learned scores with the σ regulariser)
    layers:       names of the nn.Linear layers to prune (default: every Linear in the repeated blocks)
    score_lr:     soft: Adam learning rate of the scores (the paper: 1e-2)
    regularization: soft: λ of the regulariser λ · mean_layers mean(σ(S))
    per_row:      unstructured: top-k per output row instead of per layer
    balance_rows: blocks: the same number of kept blocks in every block-row
    Layers whose shape the pattern cannot hold stay dense; `skipped` says why.
    """

    def __init__(self, model: nn.Module, pattern, schedule=None, *, method: str = "hard", layers=None,
                 score_lr: float = 1e-2, regularization: float = 0.0, per_row: bool = False,
                 balance_rows: bool = False, **schedule_kw):
        self.pattern = parse(pattern)
        if method not in METHODS:
            raise MovementError(f"unknown movement method {method!r}; known: {', '.join(METHODS)}")
        self.method = method
        self.schedule = self._make_schedule(schedule, schedule_kw)
        if not (score_lr > 0 and math.isfinite(score_lr)) or not (regularization >= 0 and math.isfinite(regularization)):
            raise MovementError(f"need score_lr > 0 and regularization >= 0, got {score_lr}, {regularization}")
        self.score_lr, self.regularization = float(score_lr), float(regularization)
        # as prune() refuses them: an option the pattern cannot use is an error, not silently ignored
        if per_row and self.pattern.kind != "unstructured":
            raise MovementError(f"per_row applies to unstructured sparsity, not {self.pattern}")
        if balance_rows and self.pattern.kind != "block":
            raise MovementError(f"balance_rows applies to block patterns such as 32x32, not {self.pattern}")
        self.per_row, self.balance_rows = bool(per_row), bool(balance_rows)
        self.model = model
        if layers is None:
            _refuse_fused_experts(model)
        if isinstance(layers, str):  # list("a.b") would be its characters
            raise MovementError(f"layers= takes a list of layer names, got the string {layers!r} (use [{layers!r}])")
        names = list(layers) if layers is not None else _default_layers(model)
        if not names:
            raise MovementError("no layers to prune")
        self.layers: dict[str, _Layer] = {}
        self.skipped: dict[str, str] = {}
        for name in names:
            mod = named_linear(model, name, MovementError, conv1d=True)
            try:
                self.layers[name] = _Layer(name, mod, self.pattern)
            except UnsupportedShape as e:
                self.skipped[name] = str(e)
        if not self.layers:
            raise MovementError(f"none of the {len(names)} layers can hold pattern {self.pattern}: "
                                f"{next(iter(self.skipped.values()))}")
        self.step_count = 0
        self.current_sparsity = None
        self._finalized = False
        self._score_opt = (torch.optim.Adam([s.scores for s in self.layers.values()], lr=self.score_lr)
                           if method == "soft" else None)
        for st in self.layers.values():
            self._install(st)
        self._update_masks(self.schedule(0))

    # -- set-up
    def _make_schedule(self, schedule, kw) -> CubicSchedule:
        if isinstance(schedule, CubicSchedule):
            if kw:
                raise MovementError(f"give either a CubicSchedule or schedule keywords, not both "
                                    f"({', '.join(sorted(kw))})")
            sched = schedule
        else:
            final = schedule if schedule is not None else self.pattern.fixed_sparsity
            if final is None:
                raise MovementError(f"pattern {self.pattern} needs a final sparsity (schedule=0.7 or a "
                                    f"CubicSchedule)")
            if "total_steps" not in kw:
                raise MovementError("total_steps= is required when the schedule is given as a sparsity")
            sched = CubicSchedule(float(final), **kw)
        fixed = self.pattern.fixed_sparsity
        if fixed is not None and not math.isclose(sched.final_sparsity, fixed, abs_tol=1e-9):
            raise MovementError(f"pattern {self.pattern} keeps {self.pattern.n} of every {self.pattern.m}, so "
                                f"its final sparsity is {fixed:g}, not {sched.final_sparsity:g}")
        if fixed is None and sched.final_sparsity <= 0.0:
            raise MovementError(f"final sparsity must be in (0, 1) for pattern {self.pattern}")
        return sched

    def _install(self, st: _Layer) -> None:
        lin = st.linear

        def forward(mod, x, _st=st):
            # F.linear on the [out, in] weight is also Conv1D's x W + b, so one forward serves both. The weight
            # and bias are the module's own (`mod`), not the closure's: a deepcopy of the model (an EMA or
            # best-model snapshot) copies this bound method onto the copy, whose weights it must compute with
            return F.linear(x, self._masked_weight(_st, linear_weight(mod)), mod.bias)

        # an instance attribute shadows nn.Linear.forward without changing the module's class or state_dict;
        # finalize()/remove() delete it again
        lin.forward = types.MethodType(forward, lin)

    def _masked_weight(self, st: _Layer, w: torch.Tensor) -> torch.Tensor:
        """W ⊙ M, with the straight-through estimator: the value is W times the 0/1 mask, and the scores get
        the gradient the mask would (∂L/∂S = W ⊙ ∂L/∂W', summed per block by the broadcast's backward)."""
        if not torch.is_grad_enabled():
            return w * st.mask.to(w.dtype)
        small = st.block_mask if st.block else st.mask
        m = (small.to(torch.float32) + (st.scores - st.scores.detach())).to(w.dtype)
        if st.block:
            # broadcast [N/B, 1, K/B, 1] over the blocks instead of expanding the mask to the weight's size
            n, k = w.shape
            b = st.block
            # reshape, not view: a Conv1D's [out, in] weight is a transposed view
            return (w.reshape(n // b, b, k // b, b) * m.view(n // b, 1, k // b, 1)).reshape(n, k)
        return w * m

    # -- the loop
    def _check_live(self) -> None:
        if self._finalized:
            raise MovementError("this MovementPruner was finalized (or removed); create a new one")

    @torch.no_grad()
    def _update_masks(self, sparsity: float) -> None:
        for st in self.layers.values():
            sc = st.scores.detach()
            if not bool(sc.any()):
                # no movement seen yet (initial_sparsity > 0 at step 0): all-zero scores would tie-break by
                # position (2:4 kept columns 2 and 3 of every group) for the whole warm-up; magnitude is the
                # informed choice, pooled per block as the scores are
                w = linear_weight(st.linear).detach().float().abs()  # block sums of |w|, as magnitude_mask
                sc = (w.reshape(sc.shape[0], st.block, sc.shape[1], st.block).sum(dim=(1, 3)) if st.block else w)
            if st.block:
                st.mask = select_mask(sc, self.pattern, sparsity, balance_rows=self.balance_rows, name=st.name)
                b = st.block
                st.block_mask = st.mask[::b, ::b].contiguous()
            else:
                st.mask = select_mask(sc, self.pattern, sparsity, per_row=self.per_row, name=st.name)
        self.current_sparsity = sparsity

    def regularizer(self) -> torch.Tensor:
        """λ · mean over layers of mean(σ(S)) (soft movement's regulariser, for logging; step() applies
        its gradient itself, so it must not be added to the loss as well)."""
        vals = [torch.sigmoid(st.scores).mean() for st in self.layers.values()]
        return self.regularization * torch.stack(vals).mean()

    def step(self, global_step: int | None = None) -> float:
        """Call once per optimizer step, after backward: update the scores from this step's gradients and,
        on an update step, the masks. Returns the sparsity the next forward uses.

        global_step: the number of optimizer steps completed (a Trainer's state.global_step); default:
        one more than last time."""
        self._check_live()
        if self.method == "hard":
            with torch.no_grad():
                for st in self.layers.values():
                    if st.scores.grad is not None:
                        st.scores.sub_(st.scores.grad)  # S ← S − W ⊙ ∂L/∂W' (pooled per block)
        else:
            if self.regularization > 0:
                self.regularizer().backward()
            self._score_opt.step()
        for st in self.layers.values():
            st.scores.grad = None
        self.step_count = self.step_count + 1 if global_step is None else int(global_step)
        t = self.step_count
        s = self.schedule(t)
        sch = self.schedule
        on_update = (sch.warmup_steps <= t <= self._final_step()
                     and (t - sch.warmup_steps) % sch.update_interval == 0)
        # the cool-down trains the final masks (so the last cuts are recovered from): no re-selection there
        if s != self.current_sparsity or on_update:
            self._update_masks(s)
        return s

    def _final_step(self) -> int:
        """The step the schedule reaches its final sparsity; the cool-down after it keeps the masks."""
        return self.schedule.total_steps - self.schedule.cooldown_steps

    # -- results
    def masks(self) -> dict[str, torch.Tensor]:
        """The current masks {layer name: bool [out, in]} (on the weights' device)."""
        return {name: st.mask for name, st in self.layers.items()}

    def sparsity(self) -> float:
        """Fraction of the pruned layers' weights currently masked out."""
        kept = sum(int(st.mask.sum()) for st in self.layers.values())
        total = sum(st.mask.numel() for st in self.layers.values())
        return 1.0 - kept / total

    def finalize(self) -> dict[str, torch.Tensor]:
        """Masks at the *final* sparsity from the current scores (whatever step training stopped at), the
        pruned weights set to exactly zero, the Linears' own forward restored. Returns {name: bool mask}
        on the CPU, ready for `sparserun.sparsify_(model, pattern, masks=...)`."""
        self._check_live()
        if self.step_count < self._final_step():
            warnings.warn(f"movement pruning finalized after {self.step_count} steps, before the schedule "
                          f"reached its final sparsity (step {self._final_step()}"
                          f"): the last cut was not trained", SparserunWarning, stacklevel=2)
        if self.step_count < self._final_step() or self.current_sparsity != self.schedule.final_sparsity:
            self._update_masks(self.schedule.final_sparsity)  # else: the masks the cool-down trained
        out = {}
        with torch.no_grad():
            for name, st in self.layers.items():
                linear_weight(st.linear).masked_fill_(~st.mask, 0)
                out[name] = st.mask.cpu()
        self.remove()
        return out

    def remove(self) -> None:
        """Restore the Linears' own forward without applying any mask (abandon pruning)."""
        for st in self.layers.values():
            st.linear.__dict__.pop("forward", None)
            st.scores = st.scores.detach()
        self._score_opt = None
        self._finalized = True

    def state_dict(self) -> dict:
        return {"step": self.step_count, "scores": {n: st.scores.detach().cpu() for n, st in self.layers.items()},
                "masks": {n: st.mask.cpu() for n, st in self.layers.items()}, "sparsity": self.current_sparsity,
                "score_opt": self._score_opt.state_dict() if self._score_opt is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self._check_live()
        if not isinstance(state, dict) or not isinstance(state.get("scores"), dict) or "step" not in state:
            raise MovementError("not a movement pruning state: expected a dict with 'scores' and 'step' (from "
                                "MovementPruner.state_dict())")
        missing = set(self.layers) - set(state["scores"])
        if missing:
            raise MovementError(f"saved movement state lacks scores for {', '.join(sorted(missing)[:3])}")
        # every check before anything is copied: a refused state leaves the pruner as it was
        saved = state.get("masks")
        for n, st in self.layers.items():
            src = state["scores"][n]
            if src.shape != st.scores.shape:
                raise MovementError(f"{n}: saved scores have shape {tuple(src.shape)}, expected "
                                    f"{tuple(st.scores.shape)}")
            if saved is not None and set(saved) >= set(self.layers):
                m = saved[n]
                if m.shape != st.mask.shape or m.dtype != torch.bool:
                    raise MovementError(f"{n}: saved mask has shape {tuple(m.shape)} ({m.dtype}), expected "
                                        f"{tuple(st.mask.shape)} (torch.bool)")
        with torch.no_grad():
            for n, st in self.layers.items():
                st.scores.copy_(state["scores"][n])
        if self._score_opt is not None and state.get("score_opt") is not None:
            self._score_opt.load_state_dict(state["score_opt"])
        self.step_count = int(state["step"])
        if saved is not None and set(saved) >= set(self.layers):
            # the masks in use, not re-selected from the scores: between update steps (and in the cool-down)
            # they differ, and a resume must continue exactly where training stopped
            for n, st in self.layers.items():
                st.mask = saved[n].to(st.mask.device)
                if st.block:
                    st.block_mask = st.mask[::st.block, ::st.block].contiguous()
            self.current_sparsity = state.get("sparsity", self.schedule(self.step_count))
        else:  # a state saved before masks were kept
            self._update_masks(self.schedule(self.step_count))


# ---- transformers.Trainer -----------------------------------------------------------------------------

def _callback_base():
    try:
        from transformers import TrainerCallback
        return TrainerCallback
    except Exception:  # transformers missing: the class still works when driven by hand
        return object


class MovementPruningCallback(_callback_base()):
    """`transformers.TrainerCallback` running a MovementPruner: `Trainer(..., callbacks=[cb])`.

    The pruner steps at every optimizer step's end (on_step_end, after the Trainer's backward and optimizer
    step: the scores are not model parameters, so the Trainer's zero_grad leaves their gradients alone) with
    the Trainer's global_step, and is finalized at the end of training (finalize_at_end=True), leaving masked
    weights; `callback.masks` then holds the masks for sparsify_ / save.
    """

    def __init__(self, pruner: MovementPruner, finalize_at_end: bool = True):
        self.pruner = pruner
        self.finalize_at_end = finalize_at_end
        self.masks: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        sched = self.pruner.schedule
        if state.max_steps and state.max_steps < sched.total_steps - sched.cooldown_steps:
            warnings.warn(f"the Trainer runs {state.max_steps} steps but the sparsity schedule reaches its "
                          f"final value only at step {sched.total_steps - sched.cooldown_steps}", SparserunWarning,
                          stacklevel=2)

    def on_step_end(self, args, state, control, **kwargs):
        self.pruner.step(global_step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.finalize_at_end and not self.pruner._finalized:
            self.masks = self.pruner.finalize()
