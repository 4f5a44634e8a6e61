#!/usr/bin/env bash
# One short call (~3 min, no llama.cpp): the id readback behind its draw (backend.Readback) on the
# GPU: its tests, where a decode step's time goes, and bench / generate on the SmolLM2 and 8B shapes.
set -u
cd "$(dirname "$0")/../.."
source bench/device/setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/card.txt"
{ timeout 60 python3 -m pytest -q -m gpu tests/test_gpu_model.py tests/test_gpu_graphs.py -k "readback or pipelined or greedy or sample" 2>&1 | tail -3
  timeout 60 python3 bench/profile/step_profile.py --shape smollm2-135m llama-3.1-8b --kv fp16 kivi:2 --steps 100
  timeout 40 minikv bench --shape smollm2-135m -p 512 -n 128 --kv fp16 --kv kivi:2 2>&1 | grep "^|"
  timeout 60 minikv bench --shape llama-3.1-8b -p 512 -n 128 --kv fp16 2>&1 | grep "^|"
  python3 ../shared/anchors/llamacpp/gen_gguf.py smollm2-135m .carry/vocab_smollm2.json /tmp/smol.gguf > /dev/null
  for t in 0 0.8; do
    timeout 40 minikv generate /tmp/smol.gguf -p "Once upon a time" -n 512 --ignore-eos --temp $t --json 2>/dev/null \
      | python3 -c "import json,sys; d=json.load(sys.stdin); print('generate temp', $t, d['timings'])"
  done
} 2>&1 | tee "$OUT/readback.txt"
