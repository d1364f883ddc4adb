"""Does training recover what one-shot pruning loses? MiniLM-L6 at 32x32 blocks, 70 % sparse, on a CPU.

    python benchmarks/training_recovery.py [--quick] [--json OUT.json]

Three models, all pruned to 32x32 blocks at 70 % in every Linear of the 6 encoder layers (the pooler and
embeddings stay dense), each packed, saved, loaded back and compared with the dense model:

    (a) one-shot wanda                   sparserun.prune(model, "wanda", "32x32", 0.7, calib=TRAIN)
    (b) (a) + LoRA recovery, distilled   rank-R adapters on the pruned Linears, base frozen, trained to match
                                         the dense model's last hidden states, merged under the masks
    (c) block movement pruning, distilled  hard movement from the dense model with the cubic schedule, all
                                         non-embedding weights fine-tuned towards the dense model's outputs

Metric: mean cosine similarity of the last hidden state to the dense model's, per token, over HELD-OUT
text (benchmarks/data/heldout_recovery.txt, written for this benchmark; never used for training or
calibration). Training and calibration use sparserun/data/calib_default.txt. The defaults finish in a few
minutes on 2 CPU cores; the table in docs/training.md records the settings and times of a run.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "benchmarks" / "data" / "heldout_recovery.txt"
TRAIN = ROOT / "sparserun" / "data" / "calib_default.txt"
PATTERN, SPARSITY = "32x32", 0.7


def packed_cosine(model, masks, src_dir, ids, dense) -> tuple[float, float]:
    """(cosine of the in-memory masked model, cosine of the same model packed, saved and loaded back)."""
    import sparserun
    from sparserun import eval as ev

    cos_mem = ev.cosine(model, dense, ids)
    m = copy.deepcopy(model)
    rep = sparserun.sparsify_(m, PATTERN, masks=masks, progress=False)
    if rep.dense:
        raise RuntimeError(f"layers left dense: {[a.name for a in rep.dense]}")
    with tempfile.TemporaryDirectory() as d:
        sparserun.save(m, Path(d) / "ckpt", source_dir=src_dir, progress=False)
        loaded = sparserun.load(Path(d) / "ckpt", progress=False)
    return cos_mem, ev.cosine(loaded, dense, ids)


def measured_sparsity(masks) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / sum(m.numel() for m in masks.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test, numbers meaningless)")
    ap.add_argument("--seqlen", type=int, default=64, help="tokens per training / calibration window")
    ap.add_argument("--eval-seqlen", type=int, default=128, help="tokens per held-out evaluation window")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--calib-nsamples", type=int, default=32, help="wanda calibration windows (of --seqlen)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-steps", type=int, default=150)
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--movement", choices=("hard", "soft"), default="hard")
    ap.add_argument("--movement-steps", type=int, default=200)
    ap.add_argument("--movement-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=float, default=0.1, help="movement warm-up, fraction of its steps")
    ap.add_argument("--cooldown", type=float, default=0.3, help="movement cool-down, fraction of its steps")
    ap.add_argument("--update-interval", type=int, default=5, help="movement mask/sparsity update interval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--only", default="abc", help="which of a, b, c to run (default all)")
    args = ap.parse_args(argv)
    if args.quick:
        args.lora_steps, args.movement_steps, args.calib_nsamples = 4, 10, 4

    from transformers import AutoModel, AutoTokenizer

    import sparserun
    from sparserun import eval as ev
    from sparserun.demo import minilm_dir
    from sparserun.finetune import TextWindows, recover, train_loop
    from sparserun.prune.calibrate import read_text
    from sparserun.prune.movement import CubicSchedule, MovementPruner

    torch.manual_seed(args.seed)
    src = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(src))
    dense = AutoModel.from_pretrained(str(src), dtype=torch.float32).eval()
    dense.requires_grad_(False)
    heldout_ids = ev.windows(tok, read_text(HELDOUT, "held-out text"), args.eval_seqlen)
    train_text = read_text(TRAIN, "training text")
    data = TextWindows(tok, train_text, args.seqlen)
    rows = []
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
           platform.machine(), "python": platform.python_version()}
    print(f"MiniLM-L6 ({src}), {PATTERN} at {SPARSITY:.0%}; held-out: {heldout_ids.shape[0]} windows x "
          f"{heldout_ids.shape[1]} tokens of {HELDOUT.name}; torch {env['torch']}, {env['threads']} threads",
          flush=True)

    def row(label, model, masks, seconds, settings):
        cm, cp = packed_cosine(model, masks, src, heldout_ids, dense)
        r = {"label": label, "cosine": round(cm, 4), "cosine_packed": round(cp, 4),
             "sparsity": round(measured_sparsity(masks), 4), "seconds": round(seconds, 1), "settings": settings}
        rows.append(r)
        print(f"{label}: cosine {cm:.4f} (packed + reloaded {cp:.4f}), sparsity {r['sparsity']:.1%}, "
              f"{seconds:.0f} s", flush=True)
        return r

    wanda_model = wanda_masks = None
    t_wanda = 0.0
    if "a" in args.only or "b" in args.only:
        wanda_model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        rep = sparserun.prune(wanda_model, "wanda", PATTERN, SPARSITY, calib=str(TRAIN), tokenizer=tok,
                              nsamples=args.calib_nsamples, seqlen=args.seqlen, progress=False)
        t_wanda = time.perf_counter() - t0
        wanda_masks = rep.masks
        row("(a) one-shot wanda", wanda_model, wanda_masks, t_wanda,
            {"calib": f"{args.calib_nsamples} x {args.seqlen} tokens of {TRAIN.name}"})

    if "b" in args.only:
        m = copy.deepcopy(wanda_model)
        res = recover(m, wanda_masks, data, steps=args.lora_steps, lr=args.lora_lr, lora_rank=args.lora_rank,
                      batch_size=args.batch_size, teacher=dense, seed=args.seed, progress=False)
        row("(b) wanda + LoRA, distilled", m, wanda_masks, t_wanda + res.seconds,
            {"rank": args.lora_rank, "alpha": 2 * args.lora_rank, "steps": args.lora_steps, "lr": args.lora_lr,
             "batch": f"{args.batch_size} x {args.seqlen}", "loss": [round(res.first_loss, 4),
                                                                    round(res.last_loss, 4)],
             "trainable": res.trainable, "train_seconds": round(res.seconds, 1)})

    if "c" in args.only:
        m = copy.deepcopy(dense).requires_grad_(True)
        steps = args.movement_steps
        sched = CubicSchedule(SPARSITY, total_steps=steps, warmup_steps=int(args.warmup * steps),
                              cooldown_steps=int(args.cooldown * steps), update_interval=args.update_interval)
        pruner = MovementPruner(m, PATTERN, sched, method=args.movement)
        emb = {id(p) for mod in m.modules() if isinstance(mod, torch.nn.Embedding) for p in mod.parameters()}
        params = [p for p in m.parameters() if id(p) not in emb]
        res = train_loop(m, params, data, steps=steps, lr=args.movement_lr, batch_size=args.batch_size,
                         teacher=dense, seed=args.seed, after_backward=lambda s: pruner.step(), progress=False)
        masks = pruner.finalize()
        row(f"(c) {args.movement} block movement, distilled", m, masks, res.seconds,
            {"steps": steps, "lr": args.movement_lr, "batch": f"{args.batch_size} x {args.seqlen}",
             "schedule": {"warmup": sched.warmup_steps, "cooldown": sched.cooldown_steps,
                          "update_interval": sched.update_interval},
             "loss": [round(res.first_loss, 4), round(res.last_loss, 4)], "trainable": res.trainable})

    print()
    print("| model | cosine to dense (held-out) | packed + reloaded | sparsity | time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['cosine']:.4f} | {r['cosine_packed']:.4f} | {r['sparsity']:.1%} | "
              f"{r['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
