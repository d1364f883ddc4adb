"""The numbers sparserun must beat, measured side by side in one run.

* copy bandwidth (the byte roofline for decode),
* dense `F.linear` (cuBLAS),
* torch's own 2:4 path, `to_sparse_semi_structured`, through cuSPARSELt and through CUTLASS
  (a backend that fails on this GPU is recorded with its error, never crashes the run).

Run: python benchmarks/bench_baselines.py [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from .shapes import ALL_SHAPES, M_VALUES
from .timing import (bench, check_out_dir, copy_bandwidth_gbs, environment, finish_results, markdown_table, n_copies,
                     results_stem, write_json)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def random_24_weight(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A random weight that keeps 2 of every 4 along K (random positions, never all-zero values)."""
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    keep = torch.rand(n, k // 4, 4, device="cuda").argsort(dim=-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, device="cuda", dtype=torch.bool).scatter_(-1, keep, True)
    return w * mask.view(n, k)


def torch_24_backends():
    """(name, converter) for torch's 2:4 tensor subclasses that exist in this torch."""
    from torch.sparse import semi_structured as ss

    out = []
    if hasattr(ss, "SparseSemiStructuredTensorCUSPARSELT"):
        out.append(("torch_cusparselt", ss.SparseSemiStructuredTensorCUSPARSELT.from_dense))
    if hasattr(ss, "SparseSemiStructuredTensorCUTLASS"):
        out.append(("torch_cutlass", ss.SparseSemiStructuredTensorCUTLASS.from_dense))
    return out


def run(shapes=ALL_SHAPES, m_values=M_VALUES, dtypes=("bf16", "fp16"), rep_ms=100) -> dict:
    env = environment()
    env["copy_gbs"] = copy_bandwidth_gbs()
    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}  copy {env['copy_gbs']:.0f} GB/s",
          flush=True)
    rows = []
    failures = {}
    for dname in dtypes:
        dtype = DTYPES[dname]
        esize = torch.finfo(dtype).bits // 8
        for sname, n, k in shapes:
            w_bytes = n * k * esize
            # Operand copies to rotate among; sized on the weight (the dominant operand at decode).
            nc = n_copies(w_bytes)
            ws = [random_24_weight(n, k, dtype) for _ in range(nc)]
            sparse = {}
            for bname, conv in torch_24_backends():
                try:
                    sparse[bname] = [conv(w) for w in ws]
                except Exception as e:  # record why this backend cannot run here
                    failures[f"{bname}/{dname}/{sname}"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            for m in m_values:
                ncx = n_copies(m * k * esize + m * n * esize, lo=1, hi=nc)
                xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(ncx)]
                flops = 2 * m * n * k
                io_bytes = (m * k + m * n) * esize
                dense_ms = bench(lambda i: F.linear(xs[i % ncx], ws[i]), nc, rep_ms=rep_ms)
                cand = [("dense_cublas", dense_ms, w_bytes)]
                for bname, sws in sparse.items():
                    key = f"{bname}/{dname}/{sname}/M={m}"
                    try:
                        # check once that the backend computes the same thing before timing it
                        ref = F.linear(xs[0], ws[0]).float()
                        got = F.linear(xs[0], sws[0]).float()
                        rel = ((got - ref).norm() / ref.norm()).item()
                        if not rel < 2e-2:
                            raise RuntimeError(f"wrong result: rel err {rel:.3g}")
                        ms = bench(lambda i: F.linear(xs[i % ncx], sws[i]), nc, rep_ms=rep_ms)
                        cand.append((bname, ms, int(w_bytes * 0.5625)))
                    except Exception as e:
                        failures[key] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                for bname, ms, wb in cand:
                    gbs = (wb + io_bytes) / (ms * 1e-3) / 1e9
                    rows.append(dict(dtype=dname, shape=sname, N=n, K=k, M=m, backend=bname, ms=ms,
                                     speedup_vs_dense=dense_ms / ms, tflops=flops / (ms * 1e-3) / 1e12,
                                     gbs=gbs, frac_copy_bw=gbs / env["copy_gbs"]))
                line = "  ".join(f"{b}={ms*1e3:8.1f}us" for b, ms, _ in cand)
                print(f"{dname} {sname:26s} M={m:5d}  {line}", flush=True)
                del xs
            del ws, sparse
            torch.cuda.empty_cache()
    return {"env": env, "rows": rows, "failures": failures}


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        for b in sorted({r["backend"] for r in rows if r["backend"] != "dense_cublas"}):
            for d in sorted({r["dtype"] for r in rows}):
                pts = sorted((r["M"], r["speedup_vs_dense"]) for r in rows
                             if r["shape"] == s and r["backend"] == b and r["dtype"] == d)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{b} {d}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1 / 0.5625, color="g", lw=0.8, ls="--", label="2:4 byte limit 1.78x")
        ax.set_xscale("log", base=2)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup vs cuBLAS dense")
    axes[0][0].legend(fontsize=7)
    env = result["env"]
    fig.suptitle(f"torch 2:4 vs dense - {env['gpu']}, torch {env['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(result: dict, out_dir="benchmarks/results") -> None:
    stem = results_stem("baselines", result["env"], out_dir)
    write_json(stem.with_suffix(".json"), result)
    env = result["env"]
    md = [f"# Baselines on {env['gpu']}",
          "",
          f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env.get('sm_count')} SMs, "
          f"L2 {env.get('l2_mb')} MB, measured {env['date']}.",
          f"Device-to-device copy bandwidth (read + write): **{env['copy_gbs']:.0f} GB/s**.",
          "",
          "Timing: triton do_bench median, L2 flushed per call, operands rotated over > 512 MiB (or 64 copies). "
          "`gbs` counts weight (2:4: 0.5625 x dense) + x + y bytes.",
          "",
          markdown_table(result["rows"], ["dtype", "shape", "M", "backend", "ms", "speedup_vs_dense",
                                          "tflops", "gbs", "frac_copy_bw"])]
    finish_results(stem, md, result, plot)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, few M values")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: baselines need a CUDA GPU", file=sys.stderr)
        return 1
    check_out_dir(a.out)
    if a.quick:
        res = run(shapes=ALL_SHAPES[:2], m_values=[1, 16, 2048], rep_ms=30)
    else:
        res = run()
    write(res, a.out)
    return 0
