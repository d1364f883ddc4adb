"""The CUDA mma.sp 2:4 GEMM beside dense cuBLAS, torch cuSPARSELt and the Triton 2:4 kernel, one run.

Same timing rule as every sparserun benchmark (sparserun/bench/timing.py): triton do_bench median after
warm-up, operands rotated over > 512 MiB so no weight sits in L2. Every backend is also checked against
dense on the same input before it is timed (rel err), so a fast wrong kernel cannot show up as a win.

Run: python benchmarks/bench_semi24_cuda.py [--quick] [--out DIR]
Writes DIR/<gpu>-<date>-semi24-cuda.{json,md} (DIR defaults to $OUT or benchmarks/results).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sparserun.bench.timing import (bench, environment, markdown_table, n_copies,  # noqa: E402
                                    results_stem, write_json)
from sparserun.formats import semi24  # noqa: E402
from sparserun.runtime import cuda_ext  # noqa: E402

SHAPES = [("q_proj/o_proj", 4096, 4096), ("k_proj/v_proj", 1024, 4096), ("gate/up", 14336, 4096),
          ("down", 4096, 14336)]
M_FULL = (1, 16, 64, 256, 1024, 2048, 8192)
M_QUICK = (1, 16, 128, 2048, 8192)


def random_packed(n, k, dtype):
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    keep = torch.rand(n, k // 4, 4, device="cuda").argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, device="cuda", dtype=torch.bool).scatter_(-1, keep, True).view(n, k)
    return semi24.pack(w, mask)


def backends(p, n, k, dtype):
    """name -> (fn(x) -> y) built once per weight copy."""
    dense = semi24.unpack(p)
    out = {"dense_cublas": lambda x, d=dense: F.linear(x, d)}
    vf, ef = cuda_ext.repack(p.tensors["values"], p.tensors["meta"], n, k)
    ext = cuda_ext.load_extension()
    for cfg in (-1, 0, 1, 2):
        name = "cuda_auto" if cfg < 0 else f"cuda_cfg{cfg}"
        out[name] = lambda x, cfg=cfg: ext.semi24_gemm(x, vf, ef, None, n, cfg)
    if hasattr(torch, "_cslt_compress"):
        try:
            packed = torch._cslt_compress(dense)

            def cslt(x, packed=packed):
                m = x.shape[0]
                mp = (m + 7) // 8 * 8
                xp = F.pad(x, (0, 0, 0, mp - m)) if mp != m else x
                return torch._cslt_sparse_mm(packed, xp.t(), transpose_result=True)[:m]
            out["cusparselt"] = cslt
        except Exception as e:  # noqa: BLE001 - a missing backend is recorded, never fatal
            print(f"cusparselt unavailable: {e}", flush=True)
    try:
        from sparserun import ops

        out["triton"] = lambda x: ops.semi24_linear(x, p.tensors["values"], p.tensors["meta"], None, k)
    except Exception as e:  # noqa: BLE001
        print(f"triton unavailable: {type(e).__name__}: {e}", flush=True)
    return out, dense


def run(quick: bool, out_dir: str, dtype=torch.bfloat16, rep_ms: float = 40):
    env = environment()
    assert cuda_ext.load_extension() is not None, cuda_ext.why_unavailable()
    rows, failures = [], {}
    m_values = M_QUICK if quick else M_FULL
    shapes = SHAPES[:3] if quick else SHAPES
    for sname, n, k in shapes:
        copies = n_copies(n * k * 2)
        ps = [random_packed(n, k, dtype) for _ in range(copies)]
        fns = [backends(p, n, k, dtype) for p in ps]
        for m in m_values:
            xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(copies)]
            ref = fns[0][0]["dense_cublas"](xs[0]).double()
            dense_ms = None
            for name in fns[0][0]:
                key = f"{name}/{sname}/M={m}"
                try:
                    y = fns[0][0][name](xs[0])
                    err = float((y.double() - ref).norm() / ref.norm())
                    if not err < 2e-2:
                        raise AssertionError(f"rel err {err:.3g} vs dense")
                    ms = bench(lambda i: fns[i][0][name](xs[i]), copies, rep_ms=rep_ms)
                except Exception as e:  # noqa: BLE001
                    failures[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    continue
                if name == "dense_cublas":
                    dense_ms = ms
                flops = 2 * m * n * k
                rows.append(dict(shape=f"{sname} {n}x{k}", M=m, backend=name, ms=ms,
                                 speedup_vs_dense=(dense_ms / ms) if dense_ms else None,
                                 tflops=flops / ms / 1e9, rel_err=err))
                print(f"{sname:>14} M={m:<5} {name:<13} {ms:8.4f} ms  "
                      f"x{(dense_ms / ms) if dense_ms else float('nan'):5.2f}  err {err:.1e}", flush=True)
            del xs
        del ps, fns
        torch.cuda.empty_cache()
    env["tuned_configs"] = "cuda_auto = launcher's static pick; cuda_cfgN forces tile config N"
    stem = results_stem("semi24-cuda", env, out_dir)
    write_json(stem.with_suffix(".json"), {"env": env, "rows": rows, "failures": failures})
    md = [f"# CUDA mma.sp 2:4 GEMM on {env['gpu']}", "",
          f"torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, {env['date']}, "
          f"{str(dtype).replace('torch.', '')}; do_bench median, operands rotated over > 512 MiB.", "",
          markdown_table(rows, ["shape", "M", "backend", "ms", "speedup_vs_dense", "tflops", "rel_err"])]
    if failures:
        md += ["", "## Failures", ""] + [f"- `{k}`: {v}" for k, v in sorted(failures.items())]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json/.md", flush=True)
    return rows, failures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 shapes x 5 M values")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    a = ap.parse_args(argv)
    try:
        run(a.quick, a.out)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
