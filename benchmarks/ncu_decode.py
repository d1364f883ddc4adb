"""Target for Nsight Compute: one launch of each 2:4 decode kernel family (v3 2-D GEMV, v4 unit GEMV) on the
70B MLP shape at M = 1, so `ncu` can say whether each is issue-bound or memory-bound (NOTES.md, v4).

    ncu --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \\
        -k regex:'semi24_gemv' python benchmarks/ncu_decode.py      (benchmarks/gpu_session.sh ncu)
"""
import sys

import torch

from sparserun import formats
from sparserun.bench.kernels import random_mask_24
from sparserun.kernels.semi24_matmul import candidate_configs, semi24_matmul

if not torch.cuda.is_available():  # one line, not an AssertionError from deep inside torch
    sys.exit("error: ncu_decode.py needs a CUDA GPU")
torch.manual_seed(0)
n, k = 28672, 8192
w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
p = formats.pack(w, random_mask_24(n, k), "2:4")
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
sms = torch.cuda.get_device_properties(0).multi_processor_count
seen = set()
for cfg in candidate_configs(1, n, k, sms, torch.bfloat16):
    fam = "units" if cfg.get("UNITS") else "gemv" if cfg.get("GEMV") else "dot"
    if fam in seen or fam == "dot":
        continue
    seen.add(fam)
    semi24_matmul(x, p.tensors["values"], p.tensors["meta"], k, config=cfg)  # compile outside the profiled range
    torch.cuda.synchronize()
    print(fam, cfg, flush=True)
    semi24_matmul(x, p.tensors["values"], p.tensors["meta"], k, config=cfg)
    torch.cuda.synchronize()
