#!/usr/bin/env bash
# One device call: install minikv into the machine's python and run the GPU tests.
# Usage (on the GPU machine): bash bench/gpu_check.sh [pytest args; default: all of tests/]
# Benchmarks run after it in the same call: bash bench/gpu_check.sh && python3 bench/...
# (bench/device/ has whole calls: tests, profiles and llama.cpp side by side.)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import cupy, numpy, sys; print('python', sys.version.split()[0], 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
python3 -m pytest -q -m gpu -rs -s "${@:-tests}" 2>&1 | tee "$OUT/gpu_tests.log" | grep -vE "Writing model shards"
exit "${PIPESTATUS[0]}"
