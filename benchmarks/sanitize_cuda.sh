#!/usr/bin/env bash
# compute-sanitizer on the CUDA 2:4 kernel: memcheck, racecheck, synccheck and initcheck, each over one
# small launch per tile config and dtype (ragged M, N and K so every tail path runs). Only our kernel is
# checked by memcheck/racecheck/synccheck (--kernel-name), so torch's own kernels add no noise; initcheck
# instruments every kernel (see below). Exit code != 0 on any finding.
# PYTORCH_NO_CUDA_MEMORY_CACHING=1: torch's caching allocator hides allocations from initcheck (seen on an
# H100, 2026-11-22: every global read of every tensor flagged as uninitialized); plain cudaMalloc per
# tensor lets it track initialization.
# One log: $OUT/sanitize.log (or benchmarks/results/sanitize.log). SANITIZE_TOOLS picks the tools.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGDIR=${OUT:-benchmarks/results}
mkdir -p "$LOGDIR"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
PY=${PYTHON:-python3}
$PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || { echo "error: $(basename "$0") needs a CUDA GPU" >&2; exit 1; }
# build outside the sanitizer (nvcc under it would be slow and is not what we check)
$PY -c "from sparserun.runtime import cuda_ext as c; assert c.load_extension() is not None, c.why_unavailable()" || exit 1
read -r -d '' DRIVER <<'PYEOF'
import torch
from sparserun.formats import semi24
from sparserun.runtime import cuda_ext
ext = cuda_ext.load_extension()
torch.manual_seed(0)
n, k = 200, 136          # ragged N (not a multiple of any tile) and K (last k-step partial)
for dtype in (torch.float16, torch.bfloat16):
    w = torch.randn(n, k, dtype=dtype)
    keep = torch.rand(n, k // 4, 4).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).view(n, k)
    p = semi24.pack(w, mask)
    vf, ef = cuda_ext.repack(p.tensors["values"].cuda(), p.tensors["meta"].cuda(), n, k)
    bias = torch.randn(n, dtype=dtype, device="cuda")
    wd = semi24.unpack(p).double().cuda()
    for cfg, m in ((0, 5), (1, 37), (2, 150)):
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        y = ext.semi24_gemm(x, vf, ef, bias, n, cfg)
        torch.cuda.synchronize()
        err = float((y.double() - (x.double() @ wd.t() + bias.double())).norm() / (x.double() @ wd.t()).norm())
        print(f"{dtype} config {cfg} M={m}: rel err {err:.2e}", flush=True)
        assert err < 1e-2
PYEOF
status=0
: > "$LOGDIR/sanitize.log"
for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}; do
  # initcheck must instrument every kernel: with a kernel filter it never sees torch's kernels write the
  # inputs and reports every read of them as uninitialized (seen on an H100, 2026-11-22)
  filter=(--kernel-name kns=semi24_gemm)
  [ "$tool" = initcheck ] && filter=()
  echo "== compute-sanitizer --tool $tool" | tee -a "$LOGDIR/sanitize.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 9 "${filter[@]}" \
      $PY -c "$DRIVER" >> "$LOGDIR/sanitize.log" 2>&1
  rc=$?
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|rel err" "$LOGDIR/sanitize.log" | tail -7
  echo "== $tool exit code $rc" | tee -a "$LOGDIR/sanitize.log"
  [ "$rc" -eq 0 ] || status=1
done
exit $status
