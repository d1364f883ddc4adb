#!/usr/bin/env bash
# One lent-GPU session's work in few calls: install, smoke check, GPU tests, benchmarks. Logs and results go
# to $OUT (the device tool brings them back) or benchmarks/results when run by hand.
#   benchmarks/gpu_session.sh smoke|tests|decode|ncu|bench|e2e|all [extra benchmark args]
# Measured on an H100: smoke ~1 min, tests ~5 min (-n 2), e2e batch 1 + 8 at prompt 128 in eager + cudagraphs
# for 4 variants ~5 min (inductor adds ~35 s of compile per variant).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1
# the GPU machine cannot download the real MiniLM package; its tests opt out explicitly
export SPARSERUN_SKIP_MINILM=${SPARSERUN_SKIP_MINILM:-1}
what=${1:-all}; shift || true
python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || { echo "error: $(basename "$0") needs a CUDA GPU" >&2; exit 1; }
rc=0  # any failed step makes the script fail (pipefail: a step's status survives its tee/tail)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
if [[ $what == smoke || $what == all ]]; then
  timeout 120 python3 benchmarks/gpu_smoke.py 2>&1 | tee "$OUT/smoke.log" | tail -20 || rc=1
fi
if [[ $what == tests || $what == all ]]; then
  xd=(); python3 -c "import xdist" 2>/dev/null && xd=(-n 2)
  timeout ${TEST_TIMEOUT:-360} python3 -m pytest -q -rfE -p no:cacheprovider "${xd[@]}" -m gpu ${PYTEST_ARGS:-} \
    ${TESTS:-tests} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || rc=1
fi
if [[ $what == decode || $what == all ]]; then
  # every 2:4 decode candidate (v3 2-D GEMV, v4 unit GEMV, dot tiles) timed from CUDA graphs on the big shapes
  timeout ${DECODE_TIMEOUT:-300} python3 benchmarks/tune_semi24_decode.py 2>&1 | tee "$OUT/semi24_decode_tune.log" || rc=1
fi
if [[ $what == ncu ]]; then
  # issue-bound or memory-bound? v3 vs v4 2:4 decode on the 70B shape (each kernel launched twice: warm, profiled)
  timeout ${NCU_TIMEOUT:-300} ncu --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
    -k regex:semi24_gemv python3 benchmarks/ncu_decode.py 2>&1 | tee "$OUT/ncu_decode.txt" | grep -E \
    "semi24|Throughput|Issue Slots|Stall|Duration" | head -60
fi
if [[ $what == bench || $what == all ]]; then
  python3 benchmarks/bench_kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" || rc=1
fi
if [[ $what == e2e ]]; then
  timeout ${E2E_TIMEOUT:-480} python3 benchmarks/bench_e2e.py --out "$OUT" "$@" 2>&1 | tr '\r' '\n' \
    | grep -v "^build " | tee "$OUT/e2e.log" || rc=1
fi
exit $rc
