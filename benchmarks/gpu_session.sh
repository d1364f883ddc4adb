#!/usr/bin/env bash
# One lent-GPU session's work in one call: install, GPU tests, kernel benchmark. Logs and results go to
# $OUT (the device tool brings them back) or benchmarks/results when run by hand.
#   benchmarks/gpu_session.sh tests|bench|all [extra bench args]
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1
what=${1:-all}; shift || true
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
if [[ $what == tests || $what == all ]]; then
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -x -p no:cacheprovider ${PYTEST_ARGS:-} ${TESTS:-tests/kernels} 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ $what == bench || $what == all ]]; then
  python3 benchmarks/bench_kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
fi
