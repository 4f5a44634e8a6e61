#!/usr/bin/env bash
# One device call (~9 min): start the llama.cpp build (it outlives the call), the GPU tests (250 s),
# where a decode step's time goes, then the SmolLM2-shape side by side once the build is done.
#   device run: bash bench/device/tests_profile.sh   carry [".whl", ".carry"]
set -u
cd "$(dirname "$0")/../.."
source bench/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
startbuild
timeout -s INT 250 python3 -m pytest -q -m gpu -rs --timeout 120 tests/test_gpu_ops.py tests/test_gpu_quant_kernels.py \
  tests/test_gpu_graphs.py tests/test_gpu_kv.py tests/test_gpu_model.py tests/test_gpu_store.py tests/test_gpu_pattern_kernels.py \
  tests/test_gpu_attention.py tests/test_smollm2.py tests/test_server.py tests/test_passkey.py 2>&1 \
  | grep -vE "Writing model shards" > "$OUT/gpu_tests.log"
tail -25 "$OUT/gpu_tests.log"
timeout 120 python3 bench/profile/step_profile.py --shape smollm2-135m llama-3.1-8b --kv fp16 kivi:2 kivi:2,g=64 kivi:2,g=64,rot=kv q2 --steps 100 2>&1 \
  | tee "$OUT/step_profile.txt"
waitbuild 200
bash bench/device/side_smol.sh
