#!/usr/bin/env bash
# Call 3: retrieval accuracy per setting with the new model, then decode throughput of
# FLASH_ATTN and PBS (default config) side by side.
. benchmarks/gpu/common.sh
while pgrep -f training.train >/dev/null; do sleep 2; done
if [ -f /tmp/retrieval-llama/model.safetensors ]; then
  cp /tmp/retrieval-llama/* pbs_vllm/models/retrieval-llama/
  mkdir -p "$RES/retrieval-llama" && cp /tmp/retrieval-llama/* "$RES/retrieval-llama/"
fi
for s in ${ACC_SETTINGS:-dense pbs-0.9 meanpool-0.9 pbs-0.8 pbs-0.95}; do
  OUT="$RES/acc-$s" timeout 100 python3 -m benchmarks.bench_accuracy --lengths 4096,8192,16384 \
    --num-prompts 50 --gpu-mem 0.3 --settings "$s" >"$RES/acc-$s.log" 2>&1
  grep -h "^| $s " "$RES/acc-$s/bench_accuracy.md" || tail -3 "$RES/acc-$s.log"
done
timeout $(( 585 - SECONDS )) python3 benchmarks/bench_ttft.py --model /tmp/llama8b \
  --lengths 8k --warmup-lengths 8k --configs flash,pbs-default --reps 3 --eager \
  --decode-tokens 128 --out "$RES/decode" 2>&1 | tee "$RES/decode.log" | tail -5
pack acc
