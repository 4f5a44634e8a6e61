#!/usr/bin/env bash
# One device call (~9.5 min): start the llama.cpp build (it outlives the call), the GPU tests (300 s,
# what changed since the last GPU run first), where a decode step's time goes, whether cuBLAS can be
# captured, the attention kernel of each preset against kivi at the same bits (3-bit codes in
# attention.cu and, on trial, in decode.cu). side_8b.sh then runs the side by side.
#   device run: bash bench/device/tests_profile.sh   carry [".whl", ".carry"]
set -u
cd "$(dirname "$0")/../.."
source bench/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
startbuild
timeout -s INT 300 python3 -m pytest -q -m gpu -rs --timeout 120 tests/test_gpu_model.py tests/test_gpu_ops.py \
  tests/test_gpu_graphs.py tests/test_gpu_attention.py tests/test_gpu_kv.py tests/test_smollm2.py tests/test_passkey.py \
  tests/test_server.py tests/test_gpu_quant_kernels.py tests/test_gpu_store.py tests/test_gpu_pattern_kernels.py 2>&1 \
  | grep -vE "Writing model shards" > "$OUT/gpu_tests.log"
tail -25 "$OUT/gpu_tests.log"
{ timeout 90 python3 bench/profile/step_profile.py --shape smollm2-135m llama-3.1-8b --kv fp16 kivi:2 q2 --steps 100
  echo "== can a step of 32 rows (cuBLAS) be captured?"
  timeout 40 python3 bench/profile/cublas_capture.py --rows 32
  echo "== attention kernel: presets against kivi at the same bits (Llama-3.1-8B attention shape)"
  timeout 60 python3 bench/kernels.py --ctx 32768 --batch 1 --prefill --kv kivi:2 q2 kivi:3 q3 kivi:4 q4
  echo "== the same, 3-bit codes in decode.cu (--trial)"
  timeout 45 python3 bench/kernels.py --ctx 32768 --batch 1 --prefill --trial --kv kivi:3 q3 q4
} 2>&1 | tee "$OUT/step_profile.txt"
