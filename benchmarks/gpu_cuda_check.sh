#!/usr/bin/env bash
# One command for the CUDA 2:4 kernel on a GPU machine: JIT build, correctness tests, compute-sanitizer,
# benchmark. Logs go to $OUT if set (else benchmarks/results). About 5 minutes on an H100, build included.
#   bash benchmarks/gpu_cuda_check.sh            # everything
#   STEPS="build test" bash benchmarks/gpu_cuda_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LOGDIR=${OUT:-benchmarks/results}
mkdir -p "$LOGDIR"
STEPS=${STEPS:-"build test sanitize bench"}
PY=${PYTHON:-python3}
$PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || { echo "error: $(basename "$0") needs a CUDA GPU" >&2; exit 1; }
export PYTHONUNBUFFERED=1
# a fresh cache dir per run unless one is given, so the numbers are for these sources
export SPARSERUN_CACHE_DIR=${SPARSERUN_CACHE_DIR:-/tmp/sparserun-cache}
# sparserun.kernels (the Triton kernels, for the comparison) needs the package installed
$PY -c "import sparserun.kernels" 2>/dev/null || \
  $PY -m pip install -q --no-deps --no-build-isolation -e . >/tmp/sparserun-pip-install.log 2>&1 || true
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
summary=()
step() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }

nvidia-smi -L 2>&1 | tee "$LOGDIR/env.log"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOGDIR/env.log"

if step build; then
  t0=$(date +%s)
  $PY - <<'PYEOF' 2>&1 | tee "$LOGDIR/build.log"
import warnings
warnings.simplefilter("error")  # a failed build must fail here, not fall back quietly
from sparserun.runtime import cuda_ext
ext = cuda_ext.load_extension(verbose=True)
assert ext is not None, cuda_ext.why_unavailable()
print("built:", ext.__file__)
PYEOF
  rc=${PIPESTATUS[0]}; summary+=("build rc=$rc ($(( $(date +%s) - t0 )) s)")
  so=$(grep -o "built: .*" "$LOGDIR/build.log" | cut -d' ' -f2)
  # the sparse tensor-core instruction must be in the machine code (HMMA.SP on sm_80/sm_90)
  if command -v cuobjdump >/dev/null && [ -n "$so" ]; then
    cuobjdump -sass "$so" | grep -oE "HMMA[A-Z0-9._]*|LDSM[A-Z0-9._]*|LDGSTS[A-Z0-9._]*" | sort | uniq -c \
      | tee "$LOGDIR/sass.log"
  fi
  [ "$rc" -eq 0 ] || { printf '%s\n' "${summary[@]}"; exit 1; }
fi

if step test; then
  t0=$(date +%s)
  # one xdist worker where available: a test that crashes the process is reported by name and the rest
  # still run (faulthandler prints the crashing Python stack either way)
  xd=(); $PY -c "import xdist" 2>/dev/null && xd=(-n 1)
  $PY -m pytest -q -rfE --maxfail=20 -p no:cacheprovider "${xd[@]}" tests/gpu/test_semi24_cuda.py 2>&1 \
    | tee "$LOGDIR/test.log"
  rc=${PIPESTATUS[0]}; summary+=("test rc=$rc ($(( $(date +%s) - t0 )) s)")
fi

if step sanitize; then
  t0=$(date +%s)
  OUT="$LOGDIR" bash benchmarks/sanitize_cuda.sh 2>&1 | grep -E "^==|SUMMARY"
  rc=${PIPESTATUS[0]}; summary+=("sanitize rc=$rc ($(( $(date +%s) - t0 )) s)")
fi

if step bench; then
  t0=$(date +%s)
  timeout "${BENCH_TIMEOUT:-300}" $PY benchmarks/bench_semi24_cuda.py --quick --out "$LOGDIR" 2>&1 | tee "$LOGDIR/bench.log" | tail -80
  rc=${PIPESTATUS[0]}; summary+=("bench rc=$rc ($(( $(date +%s) - t0 )) s)")
fi

echo "== summary"; printf '%s\n' "${summary[@]}"
