#!/usr/bin/env bash
# One device call: install minikv into the machine's python and run the GPU tests.
# Usage (on the GPU machine): bash bench/gpu_check.sh [pytest args; default: all of tests/]
# Benchmarks run after it in the same call: bash bench/gpu_check.sh && python3 bench/...
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then  # wheels the GPU image lacks (e.g. gguf), carried with the call
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
# ../shared does not travel with the working tree: recreate it from the carried copy.
[ -d ../shared ] || { [ -d .carry/shared ] && cp -r .carry/shared ../shared; }
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import cupy, numpy, sys; print('python', sys.version.split()[0], 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
python3 -m pytest -q -m gpu -rs -s "${@:-tests}" 2>&1 | tee "$OUT/gpu_tests.log" | grep -vE "Writing model shards"
exit "${PIPESTATUS[0]}"
