"""Quick GPU smoke check (about a minute): every Triton/CUDA path tunes and runs on real shapes, against a
float64 reference. For a short lease; the full GPU suite is `pytest -m gpu`.

    python benchmarks/gpu_smoke.py
"""
import sys
import time

import torch

from sparserun.formats import bsr, semi24
from sparserun.runtime import dispatch
from sparserun.runtime.linear import SparseLinear


def layers(n, k, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g).to(dtype)
    keep = torch.rand(n, k // 4, 4, device="cuda", generator=g).argsort(-1)[..., :2]
    m24 = torch.zeros(n, k // 4, 4, dtype=torch.bool, device="cuda").scatter_(-1, keep, True).view(n, k)
    mb = (torch.rand(n // 64, k // 64, device="cuda", generator=g) < 0.1)
    mb = mb.repeat_interleave(64, 0).repeat_interleave(64, 1)
    return {"2:4": SparseLinear.from_packed(semi24.pack(w, m24)),
            "64x64-90": SparseLinear.from_packed(bsr.pack(w, mb, 64))}


def main():
    if not torch.cuda.is_available():  # one line, not an AssertionError from deep inside torch
        sys.exit("error: gpu_smoke.py needs a CUDA GPU")
    worst = 0.0
    for n, k in ((4096, 4096), (14336, 4096)):
        for name, layer in layers(n, k, torch.bfloat16).items():
            for m in (1, 8, 128):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.double() @ layer.dense_weight().double().t()
                t0 = time.perf_counter()
                with torch.no_grad():
                    y = layer(x)
                    b = dispatch.choose_backend(layer, x)
                    yt = dispatch.run_backend("triton", layer, x)
                err = max(((v.double() - ref).norm() / ref.norm()).item() for v in (y, yt))
                worst = max(worst, err)
                t = dispatch._memo_times.get(next((key for key in dispatch._memo if key[1] == n and key[2] == k
                                                   and key[3] == (1 if m == 1 else m)
                                                   and key[0] == layer.format), None), {})
                print(f"{name:9s} {n}x{k} M={m:<4d} auto={b:10s} rel.err {err:.2e}  tune {time.perf_counter() - t0:5.1f}s  "
                      + " ".join(f"{kk}={v * 1e3:.1f}us" for kk, v in sorted(t.items())), flush=True)
    print("worst rel. error", worst)
    assert worst < 1e-2, worst


if __name__ == "__main__":
    main()
