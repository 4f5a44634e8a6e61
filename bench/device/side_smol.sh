#!/usr/bin/env bash
# SmolLM2 shape side by side in one call: llama-bench, minikv bench, minikv generate on the same GGUF.
set -u
cd "$(dirname "$0")/../.."
source bench/device/setup.sh
V=.carry/vocab_smollm2.json; L=/tmp/llb/bin/llama-bench
python3 ../shared/anchors/llamacpp/gen_gguf.py smollm2-135m $V /tmp/smol.gguf > /dev/null
{ echo "== llama-bench smol"; [ -x $L ] && $L -m /tmp/smol.gguf -ngl 99 -fa 1 -p 512 -n 128 -r 3 -o md 2>&1 | grep "^|"
  echo "== minikv bench smol"; timeout 100 minikv bench --shape smollm2-135m -p 512 -n 128 --kv fp16 --kv kivi:2 --kv q2 2>&1
  echo "== minikv generate SMOL.gguf (random weights), temp 0 / 0.8"
  for t in 0 0.8; do
    timeout 100 minikv generate /tmp/smol.gguf -p "Once upon a time" -n 512 --ignore-eos --temp $t --json 2>/dev/null \
      | python3 -c "import json,sys; d=json.load(sys.stdin); print('temp', $t, d['timings'])"
  done
} 2>&1 | tee "$OUT/side_smol.txt"
[ -x $L ] && touch /tmp/side_smol.done
