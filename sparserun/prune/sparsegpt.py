"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with weight reconstruction, for every pattern.

Given a Linear weight W [N, K] and the calibration Hessian H = Σ_tokens x xᵀ [K, K] (XᵀX of its inputs),
prune columns left to right; when column q loses weights, the error is spread over the not-yet-processed
columns through the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), so the layer output on the calibration
data moves as little as possible. Per row, the OBS cost of removing w_q given the columns before q are
fixed is w_q² / U_qq² (U_qq² = [H_{q:,q:}⁻¹]_qq, the diagonal of the inverse Hessian of the remaining
columns), and the update of the remaining row is -(w_q / U_qq) · U_{q, q:}.

Mask choice, per pattern:
    unstructured  per lazy block of `blocksize` columns, the round(s·N·cols) entries with the lowest
                  w²/U_qq² over the whole [N x cols] block (per_row=True: the same count in every row)
    N:M           at the first column of every group of M: the M-N lowest w²/U_qq² in each row
    BxB           (not in the paper) pool w²/U_qq² over each B x B block and drop the lowest-cost blocks of
                  the whole layer (balance_rows=True: the same number in every block-row), then reconstruct
                  column by column as usual; derivation and measurements in docs/sparsegpt_blocks.md
Counts use cumulative rounding over column blocks, so a layer's total is exactly round(s·total).

Numerics follow the reference implementation: float32, dampening percdamp · mean(diag H) (raised ×10 up
to 4 times if H is still not positive definite), dead inputs (H_jj = 0: never active on calibration data)
get H_jj = 1 and a zero cost so they are pruned first. Unlike the reference, weights of dead inputs that
the pattern forces us to keep keep their original value instead of being zeroed: calibration saw no
signal there, so there is no reason to change them.
"""
from __future__ import annotations

import contextlib

import torch

from ..formats import UnsupportedShape
from ..patterns import Pattern, parse
from . import masks


class HessianError(RuntimeError):
    """H + damping is not positive definite even after raising the damping."""


def inverse_hessian_factor(h: torch.Tensor, percdamp: float = 0.01, name: str = "weight"):
    """Upper Cholesky factor U of (H + damp·I)⁻¹ (H⁻¹ = UᵀU), and the dead-input mask."""
    h = h.detach().to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = torch.mean(torch.diag(h)).item()
    damp = percdamp * mean_diag
    for _ in range(5):
        hd = h.clone()
        hd.diagonal().add_(damp)
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            u, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0 and torch.isfinite(u).all():
                return u, dead
        damp *= 10
    raise HessianError(f"{name}: calibration Hessian XᵀX is not positive definite even with dampening "
                       f"{damp / 10:.3g} (mean diagonal {mean_diag:.3g}); use more calibration data or a "
                       f"larger percdamp")


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, pattern: "str | Pattern",
              sparsity: float | None = None, *, blocksize: int = 128, percdamp: float = 0.01,
              per_row: bool = False, balance_rows: bool = False, name: str = "weight"):
    """Prune `weight` [N, K] with OBS reconstruction; returns (new_weight, mask) with new_weight in the
    input dtype and zero where mask is False. The input tensor is not modified."""
    pat = parse(pattern)
    s = masks.resolve_sparsity(pat, sparsity)
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got {tuple(weight.shape)}")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"{name}: Hessian has shape {tuple(hessian.shape)}, expected ({k}, {k})")
    if pat.kind == "block" and (n % pat.block or k % pat.block):
        raise UnsupportedShape(f"{name}: shape {n}x{k} is not divisible by the {pat.block}x{pat.block} "
                               f"block size")
    dev = weight.device
    w0 = weight.detach().to(torch.float32)
    w = w0.clone()
    u, dead = inverse_hessian_factor(hessian.to(dev), percdamp, name)
    w[:, dead] = 0  # zero cost: calibration never saw these inputs (original values restored if kept)
    d = torch.diag(u)  # U_qq
    prune = torch.zeros(n, k, dtype=torch.bool, device=dev)  # True = pruned

    # the lazy block must hold whole N:M groups / block stripes so a choice never straddles two blocks
    unit = pat.m if pat.kind == "nm" else pat.block if pat.kind == "block" else 1
    bs = max(unit, blocksize // unit * unit)

    plan = None
    if pat.kind == "block":
        # whole-layer choice from the pooled OBS cost, then column-by-column reconstruction; choosing per
        # stripe with an equal count per stripe is much worse (docs/sparsegpt_blocks.md, "Why a plan")
        b = pat.block
        nr, nc = n // b, k // b
        cost = masks.block_scores(w.square() / d.square().unsqueeze(0), b, name)
        if balance_rows:
            kept = masks._keep_top(cost, nc - round(s * nc))
        else:
            kept = masks._keep_top(cost.reshape(-1), nr * nc - round(s * nr * nc)).view(nr, nc)
        plan = ~masks.expand_blocks(kept, b)
    elif pat.kind == "unstructured":
        nblocks = (k + bs - 1) // bs
        # cumulative rounding over column blocks, by the number of columns each holds
        targets = [round(s * min((j + 1) * bs, k) * (1 if per_row else n)) for j in range(nblocks)]
        block_drop = [t - (targets[j - 1] if j else 0) for j, t in enumerate(targets)]

    for bi, i1 in enumerate(range(0, k, bs)):
        i2 = min(i1 + bs, k)
        cnt = i2 - i1
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diag(u1)
        m1 = prune[:, i1:i2]  # a view: writes land in `prune`
        if pat.kind == "unstructured":
            cost = w1.square() / d1.square().unsqueeze(0)
            if per_row:
                m1.copy_(~masks._keep_top(cost, cnt - block_drop[bi]))
            else:
                m1.copy_(~masks._keep_top(cost.reshape(-1), n * cnt - block_drop[bi]).view(n, cnt))
        elif plan is not None:
            m1.copy_(plan[:, i1:i2])

        # e_i = (w_i − q_i) / U_ii is w_i / U_ii on pruned entries and 0 on kept ones: `scale` holds
        # pruned / U_ii, so each column costs one multiply and one rank-1 update. After its own update
        # column i equals q_i (kept values untouched, pruned ones ≈ 0, zeroed exactly below).
        inv_d1 = 1.0 / d1
        scale = m1.to(w1.dtype) * inv_d1 if pat.kind != "nm" else None
        with _one_cpu_thread(dev):
            _columns(w1, err1, u1, m1, inv_d1, scale, pat, i1, k, cnt)
        q1 = w1.masked_fill(m1, 0.0)
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    keep = ~prune
    if dead.any():
        w[:, dead] = torch.where(keep[:, dead], w0[:, dead], torch.zeros((), device=dev))
    w = torch.where(keep, w, torch.zeros((), device=dev))
    check_representable(w, weight.dtype, name)
    return w.to(weight.dtype), keep


class UpdateOverflow(ValueError):
    """SparseGPT's reconstruction moved a kept weight past what the stored dtype can hold."""


def check_representable(w: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """The OBS update adds error terms to the kept weights; with large weights and a near-singular Hessian they
    can pass fp16's 65504. Cast, they became inf, and the checkpoint check then blamed the source model for an
    inf it never held. Say what happened instead."""
    if not dtype.is_floating_point or torch.finfo(dtype).max >= torch.finfo(w.dtype).max:
        return
    top = float(w.abs().max()) if w.numel() else 0.0
    limit = torch.finfo(dtype).max
    if top > limit:
        raise UpdateOverflow(f"{name}: SparseGPT's weight update reaches {top:.4g}, beyond what "
                             f"{str(dtype).removeprefix('torch.')} holds ({limit:.4g}); store the model in "
                             f"float32 or bfloat16 (convert --dtype), or prune with another method")


@contextlib.contextmanager
def _one_cpu_thread(dev: torch.device):
    """The column loop is thousands of small memory-bound ops: on a CPU, intra-op threads cost more in
    synchronisation than they save, and on a machine whose cores are shared they are disastrous (each op
    waits for a descheduled thread: measured 11.7 s with 2 threads vs 0.31 s with 1 for two MiniLM-sized
    layers on a loaded 2-core machine; ~equal when idle)."""
    if dev.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _columns(w1, err1, u1, m1, inv_d1, scale, pat, i1: int, k: int, cnt: int) -> None:
    """OBS over the columns of one lazy block, in place on w1 / err1 / m1 (see sparsegpt())."""
    g0 = 0
    for i in range(cnt):
        col = i1 + i
        if pat.kind == "nm" and col % pat.m == 0:
            g = min(pat.m, k - col)  # the last group may be short (K padded with never-kept columns)
            if g > pat.n:
                cost = w1[:, i:i + g].square() * inv_d1[i:i + g].square().unsqueeze(0)
                m1[:, i:i + g] = ~masks._keep_top(cost, pat.n)
            g0, scale = i, m1[:, i:i + g].to(w1.dtype) * inv_d1[i:i + g]
        e = w1[:, i] * (scale[:, i - g0] if pat.kind == "nm" else scale[:, i])
        err1[:, i] = e
        w1[:, i:].addr_(e, u1[i, i:], alpha=-1)
