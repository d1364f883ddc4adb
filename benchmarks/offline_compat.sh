#!/usr/bin/env bash
# Compile every kernel candidate offline (no GPU) with another Triton version, e.g. the GPU machine's 3.6,
# and report failures and spills: python -m sparserun.bench.offline in a venv that sees this environment's
# torch but has its own Triton. Needs network (pip download) the first time.
#   benchmarks/offline_compat.sh [triton version, default 3.6.0] [sweep args, e.g. --arch 80 --dtype float16]
set -euo pipefail
ver=${1:-3.6.0}; shift || true
venv=${VENV:-/tmp/sparserun-triton-$ver}
if [[ ! -x $venv/bin/python ]]; then
  python -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q --no-deps "triton==$ver"
fi
"$venv/bin/python" -c "import triton; print('triton', triton.__version__)"
"$venv/bin/python" -m sparserun.bench.offline --m 1,2,4,8,16,32,64,128,512 "$@" 2>&1 | grep -v -i warn \
  | awk 'NR<3 || /FAILED/ || ($4 != 0 && $4 ~ /^[0-9]+$/) {print} END {print "(rows shown: header, failures, spills)"}'
