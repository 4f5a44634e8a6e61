#!/usr/bin/env bash
# Llama-3.1-8B shape side by side in one call (after tests_profile.sh on the same warm machine, or
# it waits for the build), then long contexts inside 23 GiB, batch 8 at 32K, and llama.cpp f16 and
# q4_0 KV at 32K / 128K.
set -u
cd "$(dirname "$0")/../.."
source bench/device/setup.sh
startbuild
[ -x /tmp/llb/bin/llama-bench ] || waitbuild 400
[ -e /tmp/side_smol.done ] || bash bench/device/side_smol.sh
V=.carry/vocab_smollm2.json; L=/tmp/llb/bin/llama-bench
[ -e /tmp/l8b.gguf ] || python3 ../shared/anchors/llamacpp/gen_gguf.py llama-3.1-8b $V /tmp/l8b.gguf > /dev/null
{ echo "== llama-bench 8B f16"; $L -m /tmp/l8b.gguf -ngl 99 -fa 1 -ctk f16 -ctv f16 -p 512 -n 128 -d 0,8192 -r 2 -o md 2>&1 | grep "^|"
  echo "== minikv bench 8B"; timeout 150 minikv bench --shape llama-3.1-8b -p 512 -n 128 -d 0,8192 --kv fp16 --kv kivi:2 --kv q2 2>&1
  echo "== llama-bench 8B f16 and q4_0 at 32K, 128K"
  for t in f16 q4_0; do
    timeout 120 $L -m /tmp/l8b.gguf -ngl 99 -fa 1 -ctk $t -ctv $t -p 512 -n 64 -d 32768,131072 -r 1 -o md 2>&1 | grep "^|"
  done
  echo "== minikv 8B in 23 GiB: 2-bit at 130K, batch 1/8 at 32K"
  timeout 150 minikv bench --shape llama-3.1-8b -p 512 -n 64 -d 130048 --kv kivi:2 --kv q2 --gpu-mem 23 2>&1
  timeout 200 minikv bench --shape llama-3.1-8b -p 512 -n 64 -d 32768 -b 1,8 --kv fp16 --kv kivi:2 --gpu-mem 23 2>&1
} 2>&1 | tee "$OUT/side_8b.txt"
