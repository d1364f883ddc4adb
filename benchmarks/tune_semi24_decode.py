"""Every 2:4 decode candidate config, CUDA-graph timed, on the big decode shapes: which kernel variant
(2-D GEMV, 3-D FMA, tensor-core dot) and tile streams the packed weight fastest. Prints a table."""
import sys

import torch
import torch.nn.functional as F

from sparserun.bench.kernels import bench_graph, random_mask_24
from sparserun.kernels.semi24_matmul import candidate_configs, semi24_matmul
from sparserun import formats

if not torch.cuda.is_available():  # one line, not an AssertionError from deep inside torch
    sys.exit("error: tune_semi24_decode.py needs a CUDA GPU")
torch.manual_seed(0)
sms = torch.cuda.get_device_properties(0).multi_processor_count
for n, k in ((28672, 8192), (14336, 4096), (4096, 4096)):
    copies = 4
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    ps = [formats.pack(w, random_mask_24(n, k), "2:4") for w in ws]
    nbytes = ps[0].nbytes()
    for m in (1, 4):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        dense = bench_graph(lambda i: F.linear(x, ws[i]), copies)
        print(f"N={n} K={k} M={m}: dense {dense*1e3:.1f} us ({n*k*2/dense/1e6:.0f} GB/s)")
        ref = F.linear(x.float(), formats.unpack(ps[0]).float())
        for cfg in candidate_configs(m, n, k, sms, torch.bfloat16):
            try:
                y = semi24_matmul(x, ps[0].tensors["values"], ps[0].tensors["meta"], k, config=cfg).float()
                err = ((y - ref).norm() / ref.norm()).item()
                if not err < 2e-2:
                    print(f"   WRONG (relative error {err:.3g}) {cfg}")
                    continue
                t = bench_graph(lambda i: semi24_matmul(x, ps[i].tensors["values"], ps[i].tensors["meta"], k,
                                                        config=cfg), copies)
                print(f"   {t*1e3:8.1f} us  {nbytes/t/1e6:6.0f} GB/s  x{dense/t:5.2f}  {cfg}")
            except Exception as e:
                print(f"   failed {cfg}: {type(e).__name__}: {str(e)[:120]}")
    del ws, ps
    torch.cuda.empty_cache()
