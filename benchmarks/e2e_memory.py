"""Where does a sparse model's GPU memory beyond its own tensors go? Live allocations after a few eager
decode steps of the e2e model (fewer layers), grouped by the innermost sparserun/transformers frame.

    python benchmarks/e2e_memory.py [--variant 64x64-90] [--layers 8]
"""
import argparse
import collections

import torch

from sparserun.bench import e2e


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="64x64-90")
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()
    cfg = dict(e2e.LLAMA_31_8B, num_hidden_layers=a.layers)
    torch.cuda.memory._record_memory_history(max_entries=200000)
    model = e2e.build_skeleton(cfg, "cuda", torch.bfloat16)
    variant = next(v for v in e2e.parse_variants(a.variant) if v.name == a.variant)
    e2e.apply_variant(model, variant, "cuda", torch.bfloat16, progress=False)
    torch.cuda.synchronize()
    weights = e2e.model_bytes(model)["checkpoint_bytes"]
    base = torch.cuda.memory_allocated()
    ids = torch.randint(0, 1000, (1, 128), device="cuda")
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    print(f"{a.variant}, {a.layers} layers: model bytes {weights / 2**30:.3f} GiB; allocated after load "
          f"{base / 2**30:.3f} GiB, after decode {torch.cuda.memory_allocated() / 2**30:.3f} GiB, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB")
    snap = torch.cuda.memory._snapshot()
    sites = collections.Counter()
    for seg in snap["segments"]:
        for blk in seg["blocks"]:
            if blk["state"] != "active_allocated":
                continue
            frames = blk.get("frames") or []
            where = next((f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}" for f in frames
                          if "sparserun" in f["filename"] or "kernels/" in f["filename"]
                          or "transformers" in f["filename"]), "?")
            sites[where] += blk["size"]
    for where, size in sites.most_common(15):
        print(f"{size / 2**20:10.1f} MiB  {where}")


if __name__ == "__main__":
    main()
