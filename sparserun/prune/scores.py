"""Importance scores: one number per weight, higher = more important to keep.

Scores and masks are separate (masks.py turns any score into any pattern), so every score works with every
pattern. Each score takes the weight `W` [out, in] and the calibration statistic its method needs:

    magnitude   |W|                                   nothing
    wanda       |W| · ‖X_j‖₂                          xnorm2[j] = Σ_tokens x_j²   (Wanda, Sun et al. 2023)
    taylor      |W| · Σ_b |∂L_b/∂W|  = Σ_b |W ⊙ g_b|  gabs = Σ over calibration samples of |g_b|
    obd         ½ · W² · mean_b (∂L_b/∂W)²            g2 = mean over samples of g_b² (diagonal empirical Fisher)

sparsegpt is not a score: it chooses the mask *and* updates the kept weights (sparsegpt.py); its selection
criterion w²/[H⁻¹]_qq lives there because it changes as the weights are updated.

How the gradients for taylor / obd are obtained (which loss, at what cost) is documented in calibrate.py.
All scores are computed in float32 whatever the weight dtype, so fp16 products cannot overflow or flush.
"""
from __future__ import annotations

import torch

METHODS = ("magnitude", "wanda", "sparsegpt", "taylor", "obd")

# statistic each method needs from calibration: None | "xnorm2" | "hessian" | "grad"
STAT = {"magnitude": None, "wanda": "xnorm2", "sparsegpt": "hessian", "taylor": "grad", "obd": "grad"}


def check_method(method: str) -> str:
    m = str(method).strip().lower()
    if m not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; known: {', '.join(METHODS)}")
    return m


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()


def wanda(weight: torch.Tensor, xnorm2: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂; xnorm2 is Σ over calibration tokens of x_j² (shape [in_features])."""
    if xnorm2.shape != (weight.shape[1],):
        raise ValueError(f"wanda: input norms have shape {tuple(xnorm2.shape)}, expected ({weight.shape[1]},)")
    return weight.detach().float().abs() * xnorm2.float().to(weight.device).clamp_min(0).sqrt().unsqueeze(0)


def taylor(weight: torch.Tensor, gabs: torch.Tensor) -> torch.Tensor:
    """Σ_b |W ⊙ g_b| = |W| ⊙ Σ_b |g_b|: first-order change of the loss when a weight is set to zero, with
    absolute values taken per calibration sample so gradients of opposite sign do not cancel."""
    _same_shape("taylor", weight, gabs)
    return weight.detach().float().abs() * gabs.float().to(weight.device)


def obd(weight: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Optimal Brain Damage: ½ · W² · F_ii with F the diagonal empirical Fisher (mean squared gradient)."""
    _same_shape("obd", weight, g2)
    return 0.5 * weight.detach().float().square() * g2.float().to(weight.device)


def score(method: str, weight: torch.Tensor, stat: torch.Tensor | None = None) -> torch.Tensor:
    """The importance of every weight for `method` (not sparsegpt, which is not a score)."""
    method = check_method(method)
    if method == "magnitude":
        return magnitude(weight)
    if method == "sparsegpt":
        raise ValueError("sparsegpt chooses its mask while updating weights; use prune.sparsegpt.sparsegpt()")
    if stat is None:
        raise ValueError(f"{method}: needs calibration statistics ({STAT[method]}), got none")
    return {"wanda": wanda, "taylor": taylor, "obd": obd}[method](weight, stat)


def _same_shape(what: str, weight: torch.Tensor, stat: torch.Tensor) -> None:
    if stat.shape != weight.shape:
        raise ValueError(f"{what}: gradient statistic has shape {tuple(stat.shape)}, expected "
                         f"{tuple(weight.shape)}")
