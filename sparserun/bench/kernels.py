"""Kernel benchmark: sparserun's Triton kernels against dense cuBLAS and torch's own 2:4, side by side.

Per (dtype, shape, M): dense `F.linear` (cuBLAS), torch 2:4 (`to_sparse_semi_structured`, cuSPARSELt;
CUTLASS is recorded where it fails), sparserun 2:4, sparserun BSR (32x32 and 64x64 at densities 0.5, 0.3,
0.1). Two timings:
  ms        triton do_bench median, L2 flushed before every call, operands rotated over > 512 MiB (at most
            64 copies: a layer under 8 MiB rotates over less);
  graph_ms  (decode, M <= 16) the same calls captured in one CUDA graph and replayed: launch overhead gone,
            as in a served model that uses CUDA graphs. No flush in the graph: the 64 calls use 64 copies,
            so a layer whose 64 packed copies fit in L2 (under ~0.8 MB each on an H100) is partly read
            from L2 there; `rotated_mb` in each row says how much was cycled over.
Ratios are taken within one method. `gbs` counts the bytes the op must move (packed weight + x + y).

Run: python benchmarks/bench_kernels.py [--quick] [--dtypes bf16,fp16] [--out DIR]
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from .baselines import DTYPES, torch_24_backends
from .shapes import ALL_SHAPES, M_VALUES
from .timing import (bench, check_out_dir, copy_bandwidth_gbs, environment, finish_results, markdown_table,
                     n_copies, results_stem, write_json)

BLOCK_VARIANTS = [(32, 0.5), (32, 0.3), (32, 0.1), (64, 0.5), (64, 0.3), (64, 0.1)]
GRAPH_MAX_M = 16


def bench_graph(fn, copies: int, calls: int = 64, replays: int = 7) -> float:
    """Median ms per call of `calls` calls captured in one CUDA graph (warm-up and tuning run first)."""
    from ..runtime.tuning import graph_replay_ms

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    nxt = iter(range(calls))  # body runs only while capturing: call j uses operand copy j % copies
    return graph_replay_ms(lambda: fn(next(nxt) % copies), calls, replays)


def random_mask_24(n: int, k: int, device="cuda") -> torch.Tensor:
    score = torch.rand(n, k // 4, 4, device=device)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.argsort(-1)[..., :2], True)
    return keep.view(n, k)


def random_block_mask(n: int, k: int, b: int, density: float, device="cuda") -> torch.Tensor:
    """Exactly round(density * blocks) blocks kept, placed uniformly at random (rows come out uneven)."""
    rb, cb = n // b, k // b
    keep = torch.zeros(rb * cb, dtype=torch.bool, device=device)
    keep[torch.randperm(rb * cb, device=device)[: round(density * rb * cb)]] = True
    return keep.view(rb, cb).repeat_interleave(b, 0).repeat_interleave(b, 1)


def _layers(kind, n, k, dtype, copies, device="cuda"):
    """`copies` SparseLinear layers of one kind (independent random weights), and their packed bytes."""
    from ..runtime.linear import SparseLinear

    out = []
    for _ in range(copies):
        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        torch.nn.init.normal_(lin.weight)
        if kind == "semi24":
            mask, pat = random_mask_24(n, k, device), "2:4"
        else:
            b, d = kind
            mask, pat = random_block_mask(n, k, b, d, device), f"{b}x{b}"
        out.append(SparseLinear.from_linear(lin, mask, pat))
    return out, out[0].packed().nbytes()


def _cpu_bench(fn, copies, rep_ms=None) -> float:
    """Dry-run timer (CPU, Triton interpreter): median wall ms of a few calls. Proves the harness runs;
    the numbers mean nothing about GPUs and are labelled so."""
    import time

    fn(0)
    times = []
    for i in range(3):
        t = time.perf_counter()
        fn(i % copies)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run(shapes=ALL_SHAPES, m_values=M_VALUES, dtypes=("bf16", "fp16"), block_variants=BLOCK_VARIANTS,
        rep_ms=40, fp16_m_values=None, dry_run=False) -> dict:
    """Time every backend on every (dtype, shape, M). dry_run: CPU tensors through the Triton interpreter,
    wall-clock timing, no copies rotated, no graphs (checks the harness end to end without a GPU)."""
    from ..kernels import _tuning
    from .. import ops

    dev = "cpu" if dry_run else "cuda"
    timer = _cpu_bench if dry_run else bench
    env = environment()
    env["copy_gbs"] = 1.0 if dry_run else copy_bandwidth_gbs()
    if dry_run:
        env["dry_run"] = "CPU + Triton interpreter: timings are not GPU numbers"
    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}  copy {env['copy_gbs']:.0f} GB/s",
          flush=True)
    rows, failures = [], {}
    for dname in dtypes:
        dtype = DTYPES[dname]
        esize = torch.finfo(dtype).bits // 8
        ms_list = m_values if dname == "bf16" or fp16_m_values is None else fp16_m_values
        for sname, n, k in shapes:
            dense_bytes = n * k * esize
            nc = n_copies(dense_bytes)
            if dry_run:
                nc = 1
            dense_w = [torch.randn(n, k, device=dev, dtype=dtype) for _ in range(nc)]
            # candidates: name -> (weight bytes, per-copy callable factory, density)
            cands = {}
            try:
                layers24, nb24 = _layers("semi24", n, k, dtype, 1 if dry_run else n_copies(int(dense_bytes * 0.5625)),
                                         dev)
                cands["sparserun_2:4"] = (layers24, nb24, 0.5)
            except Exception as e:
                failures[f"sparserun_2:4/{dname}/{sname}/pack"] = repr(e)[:300]
            for b, d in block_variants:
                try:
                    lays, nb = _layers((b, d), n, k, dtype, 1 if dry_run else n_copies(int(dense_bytes * d)), dev)
                    cands[f"sparserun_{b}x{b}_d{d}"] = (lays, nb, d)
                except Exception as e:
                    failures[f"bsr{b}/d{d}/{dname}/{sname}/pack"] = repr(e)[:300]
            torch24 = {}
            for bname, conv in ([] if dry_run else torch_24_backends()):
                try:
                    torch24[bname] = [conv(lay.dense_weight()) for lay in layers24]
                except Exception as e:
                    failures[f"{bname}/{dname}/{sname}"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            for m in ms_list:
                io_bytes = (m * k + m * n) * esize
                ncx = max(nc, max(len(v[0]) for v in cands.values()) if cands else 1)
                xs = [torch.randn(m, k, device=dev, dtype=dtype) for _ in range(1 if dry_run else min(ncx, 8))]
                nx = len(xs)
                fns = {"dense_cublas": (lambda i: F.linear(xs[i % nx], dense_w[i]), nc, dense_bytes, 1.0)}
                for bname, sws in torch24.items():
                    fns[bname] = ((lambda sws: lambda i: F.linear(xs[i % nx], sws[i]))(sws), len(sws),
                                  int(dense_bytes * 0.5625), 0.5)
                for cname, (lays, nb, d) in cands.items():
                    fns[cname] = ((lambda lays: lambda i: ops.sparse_linear_triton(lays[i], xs[i % nx]))(lays),
                                  len(lays), nb, d)
                    # the layer as a user runs it: the dispatcher's measured choice among the allowed backends
                    # (env: SPARSERUN_BACKENDS, SPARSERUN_KEEP_DENSE), tuned by the correctness call below
                    fns[cname + "_auto"] = ((lambda lays: lambda i: lays[i](xs[i % nx]))(lays), len(lays), nb, d)
                res = {}
                for name, (fn, copies, wbytes, d) in fns.items():
                    key = f"{name}/{dname}/{sname}/M={m}"
                    try:
                        if name != "dense_cublas":  # correctness before speed
                            base = name[:-len("_auto")] if name.endswith("_auto") else name
                            lay_w = (cands[base][0][0].dense_weight() if base in cands
                                     else torch24[name][0].to_dense())
                            ref = F.linear(xs[0].float(), lay_w.float())
                            got = fn(0).float()
                            rel = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                            if not rel < 2e-2:
                                raise RuntimeError(f"wrong result: relative error {rel:.3g}")
                        ms = timer(fn, copies, rep_ms=rep_ms)
                        gms = None
                        if m <= GRAPH_MAX_M and not dry_run:
                            try:
                                gms = bench_graph(fn, copies)
                            except Exception as e:
                                failures[key + "/graph"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                        res[name] = (ms, gms, wbytes, d, copies)
                    except Exception as e:
                        failures[key] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                        if not dry_run:
                            torch.cuda.synchronize()
                dense_ms, dense_g = res.get("dense_cublas", (None, None))[:2]
                t24 = res.get("torch_cusparselt", (None, None))
                for name, (ms, gms, wbytes, d, copies) in res.items():
                    gbs = (wbytes + io_bytes) / (ms * 1e-3) / 1e9
                    row = dict(dtype=dname, shape=sname, N=n, K=k, M=m, backend=name, density=d, ms=ms,
                               speedup_vs_dense=dense_ms / ms if dense_ms else None,
                               speedup_vs_torch24=(t24[0] / ms) if t24[0] else None,
                               gbs=gbs, frac_copy_bw=gbs / env["copy_gbs"], weight_bytes=wbytes,
                               rotated_mb=wbytes * copies / 1e6,
                               graph_ms=gms,
                               graph_speedup_vs_dense=(dense_g / gms) if (gms and dense_g) else None,
                               graph_frac_copy_bw=((wbytes + io_bytes) / (gms * 1e-3) / 1e9 / env["copy_gbs"])
                               if gms else None)
                    rows.append(row)
                line = "  ".join(f"{nm.replace('sparserun_', '')}={v[0]*1e3:.1f}"
                                 + (f"/{v[1]*1e3:.1f}g" if v[1] else "") for nm, v in res.items())
                print(f"{dname} {sname:24s} M={m:5d} us: {line}", flush=True)
                del xs
            del dense_w, cands, torch24
            if not dry_run:
                torch.cuda.empty_cache()
    tuned = {repr(k_): v for k_, v in _tuning.tuned().items()}
    rejected = {repr(k_): [[c, why] for c, why in v] for k_, v in _tuning.rejected().items()}
    return {"env": env, "rows": rows, "failures": failures, "tuned_configs": tuned, "rejected_configs": rejected}


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["dtype"] == "bf16"] or result["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7.4), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        for b in dict.fromkeys(r["backend"] for r in rows if r["backend"] != "dense_cublas"):
            pts = sorted((r["M"], r["speedup_vs_dense"]) for r in rows
                         if r["shape"] == s and r["backend"] == b and r["speedup_vs_dense"])
            if pts:
                ax.plot(*zip(*pts), marker=".", label=b.replace("sparserun_", ""))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup vs cuBLAS (do_bench)")
    axes[0][0].legend(fontsize=6)
    for ax, s in zip(axes[1], shapes):
        for bsz in (32, 64):
            pts = sorted((r["density"], r["graph_speedup_vs_dense"] or r["speedup_vs_dense"]) for r in rows
                         if r["shape"] == s and r["M"] == 1 and r["backend"].startswith(f"sparserun_{bsz}x"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{bsz}x{bsz}, M=1")
        pts = [(r["density"], r["graph_speedup_vs_dense"] or r["speedup_vs_dense"]) for r in rows
               if r["shape"] == s and r["M"] == 1 and r["backend"] == "sparserun_2:4"]
        if pts:
            ax.plot(*zip(*pts), marker="s", ls="", label="2:4, M=1")
        dd = [0.1, 0.3, 0.5]
        ax.plot(dd, [1 / d for d in dd], "g--", lw=0.8, label="1/density")
        ax.set_xlabel("density")
        ax.set_ylabel("speedup vs cuBLAS, M=1 (graph)")
        ax.set_title(s, fontsize=9)
    axes[1][0].legend(fontsize=6)
    env = result["env"]
    fig.suptitle(f"sparserun kernels, bf16 - {env['gpu']}, torch {env['torch']}, triton {env['triton']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write(result: dict, out_dir="benchmarks/results", kind="kernels") -> None:
    stem = results_stem(kind, result["env"], out_dir)
    write_json(stem.with_suffix(".json"), result)
    env = result["env"]
    md = [f"# Kernel benchmark on {env['gpu']}", ""]
    if env.get("dry_run"):
        md += [f"**DRY RUN** ({env['dry_run']}).", ""]
    gpu = (f", CUDA {env['cuda']}, {env.get('sm_count')} SMs, L2 {env.get('l2_mb')} MB" if env.get("cuda") else
           " (no CUDA: `dense_cublas` is torch's CPU F.linear here)")
    md += [
          f"torch {env['torch']}, triton {env['triton']}{gpu}, measured {env['date']}. Copy bandwidth (read + "
          f"write): **{env['copy_gbs']:.0f} GB/s**.", "",
          "`ms`: do_bench median, L2 flushed per call, operands rotated over > 512 MiB or 64 copies, whichever is "
          "less. `graph_ms` (M <= 16): 64 calls in one CUDA graph, per call, no flush (compare `rotated_mb` with "
          f"the {env.get('l2_mb')} MB L2). Speedups are within one method. `frac_copy_bw`: bytes the op "
          "must move over time, as a fraction of the copy bandwidth.", "",
          markdown_table(result["rows"], ["dtype", "shape", "M", "backend", "ms", "speedup_vs_dense",
                                          "speedup_vs_torch24", "frac_copy_bw", "graph_ms",
                                          "graph_speedup_vs_dense", "graph_frac_copy_bw", "rotated_mb"])]
    finish_results(stem, md, result, plot)


DEFAULT_DTYPES = "bf16,fp16"


def _add_options(p) -> None:
    p.add_argument("--quick", action="store_true", help="two shapes, M in 1, 16, 2048 (or --m), shorter timing")
    p.add_argument("--dtypes", default=DEFAULT_DTYPES, help="comma-separated: bf16, fp16")
    p.add_argument("--shapes", default=None, help="comma-separated indices into the shape list (benchmarks/shapes.py)")
    p.add_argument("--out", default="benchmarks/results", help="results directory")
    p.add_argument("--kind", default="kernels", help="results file suffix (letters, digits, - and _)")
    p.add_argument("--blocks", default="all", choices=("all", "none"),
                   help="'none' to time only 2:4 (and the baselines)")
    p.add_argument("--m", default=None, help="comma-separated M values (default: the full sweep)")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: tiny shapes on the CPU through the Triton interpreter (checks the harness)")


def _check_options(a) -> None:
    """Bad values are one-line errors before anything runs (a dry run included), never silently ignored."""
    import re

    bad = set(a.dtypes.split(",")) - {"bf16", "fp16"}
    if bad:
        raise ValueError(f"--dtypes takes bf16 and/or fp16, got {', '.join(sorted(bad))}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", a.kind):
        raise ValueError(f"--kind {a.kind!r} must be letters, digits, - and _ (it names the results file)")
    for opt, value, ok in (("--shapes", a.shapes, lambda i: 0 <= i < len(ALL_SHAPES)), ("--m", a.m, lambda m: m >= 1)):
        if value is None:
            continue
        try:
            nums = [int(v) for v in value.split(",")]
        except ValueError:
            nums = None
        if nums is None or not all(ok(v) for v in nums):
            hint = f"indices 0..{len(ALL_SHAPES) - 1}" if opt == "--shapes" else "token counts >= 1"
            raise ValueError(f"{opt} takes comma-separated {hint}, got {value!r}")
    if a.dry_run:
        ignored = [opt for opt, value, default in (("--quick", a.quick, False), ("--dtypes", a.dtypes, DEFAULT_DTYPES),
                                                   ("--shapes", a.shapes, None), ("--m", a.m, None),
                                                   ("--blocks", a.blocks, "all")) if value != default]
        if ignored:
            raise ValueError(f"--dry-run times fixed tiny shapes (fp16, M 1,3,33, 32x32 blocks); leave out "
                             f"{', '.join(ignored)}, which it would ignore")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _add_options(ap)
    return run_cli(ap.parse_args(argv))


def run_cli(a) -> int:
    _check_options(a)
    check_out_dir(a.out)
    if a.dry_run:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
        res = run(shapes=[("tiny 64x128", 64, 128)], m_values=[1, 3, 33], dtypes=("fp16",),
                  block_variants=[(32, 0.5)], dry_run=True)
        write(res, a.out, a.kind + "-dryrun")
        if not any(r["backend"].startswith("sparserun") for r in res["rows"]):
            # e.g. TRITON_INTERPRET=0 exported on a CPU machine: the harness ran, no kernel did
            print(f"error: every sparserun kernel failed in the dry run ({len(res['failures'])} failures, first: "
                  f"{next(iter(res['failures'].values()), 'none recorded')})", file=sys.stderr)
            return 1
        return 0
    if not torch.cuda.is_available():
        print("error: the kernel benchmark needs a CUDA GPU (CPU correctness lives in the tests)", file=sys.stderr)
        return 1
    dtypes = tuple(a.dtypes.split(","))
    shapes = ALL_SHAPES if a.shapes is None else [ALL_SHAPES[int(i)] for i in a.shapes.split(",")]
    blocks = [] if a.blocks == "none" else BLOCK_VARIANTS
    if a.quick:
        ms = [int(v) for v in a.m.split(",")] if a.m else [1, 16, 2048]
        res = run(shapes=shapes[:2], m_values=ms, dtypes=dtypes, fp16_m_values=ms, rep_ms=20, block_variants=blocks)
    elif a.m:
        ms = [int(v) for v in a.m.split(",")]
        res = run(shapes=shapes, m_values=ms, dtypes=dtypes, fp16_m_values=ms, block_variants=blocks)
    else:
        res = run(shapes=shapes, dtypes=dtypes, fp16_m_values=[1, 4, 16, 64, 512, 2048, 8192],
                  block_variants=blocks)
    write(res, a.out, a.kind)
    return 0


def add_bench_kernels(bsub) -> None:
    """`sparserun bench kernels`: the same options as benchmarks/bench_kernels.py."""
    p = bsub.add_parser("kernels", help="kernel benchmark vs cuBLAS and torch 2:4 (writes benchmarks/results)",
                        description=__doc__.splitlines()[0])
    _add_options(p)
    p.set_defaults(func=run_cli)
