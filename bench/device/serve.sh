#!/usr/bin/env bash
# The server under load, one call: the 8B-shape random GGUF -> minikv convert; minikv serve (kivi:2 and
# q2, 32 slots in 23 GiB; fp16, 6 slots) against llama-server f16 (32 slots, once the llama.cpp build
# of an earlier call on the same warm machine is done), 32 streams of ~7.7K-token prompts.
set -u
cd "$(dirname "$0")/../.."
source bench/device/setup.sh
startbuild
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/card.txt
G=../shared/anchors/llamacpp/gen_gguf.py; V=.carry/vocab_smollm2.json; R=$OUT/serve.txt
[ -e /tmp/l8b.gguf ] || python3 $G llama-3.1-8b $V /tmp/l8b.gguf > /dev/null
[ -d /tmp/m8b ] || timeout 240 minikv convert /tmp/l8b.gguf /tmp/m8b 2>&1 | tail -2
load() { timeout 200 python3 bench/serve_load.py --port $1 -c 32 -m 32 --max-tokens 256 --prompt-tokens 7680 --timeout 190 2>&1; }
up() { for i in $(seq 1 180); do curl -sf localhost:$1/health > /dev/null && return 0; sleep 1; done; echo "server on $1 not up"; return 1; }
run_minikv() {  # kv slots ctx
  echo "== minikv serve --kv $1 -np $2 -c $3 --gpu-mem 23" | tee -a $R
  minikv serve /tmp/m8b --kv $1 -np $2 -c $3 --gpu-mem 23 --port 8090 -v > /tmp/srv_$1.log 2>&1 & P=$!
  up 8090 && load 8090 | tee -a $R; kill $P; wait $P 2>/dev/null; tail -3 /tmp/srv_$1.log | tee -a $R
}
waitbuild 300
LS=/tmp/llb/bin/llama-server
if [ -x $LS ]; then  # first: its figures were the ones missing (its load timed out in session 22's call)
  echo "== llama-server f16 -np 32 -c 262144" | tee -a $R
  $LS -m /tmp/l8b.gguf -ngl 99 -fa on -np 32 -c 262144 --port 8091 > /tmp/lls.log 2>&1 & P=$!
  if up 8091; then
    echo "-- 8 requests of ~1K tokens first" | tee -a $R
    timeout 90 python3 bench/serve_load.py --port 8091 -c 8 -m 8 --max-tokens 64 --prompt-tokens 1024 --timeout 80 2>&1 | tee -a $R
    load 8091 | tee -a $R
  fi
  kill $P; wait $P 2>/dev/null; grep -iE "error|n_ctx_slot|n_ctx " /tmp/lls.log | head -5 | tee -a $R; tail -4 /tmp/lls.log | tee -a $R
fi
run_minikv kivi:2 32 262144
run_minikv fp16 6 49152
run_minikv q2 32 262144
