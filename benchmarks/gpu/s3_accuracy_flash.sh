#!/usr/bin/env bash
# Call 3: wait for training, retrieval accuracy (one engine per process, in turn), then
# the FLASH_ATTN TTFT baseline up to 256K with a profile at 128K and decode throughput.
. benchmarks/gpu/common.sh
while pgrep -f training.train >/dev/null; do sleep 2; done
tail -12 "$RES/train.log"
if [ -f /tmp/retrieval-llama/model.safetensors ]; then
  cp /tmp/retrieval-llama/* pbs_vllm/models/retrieval-llama/
  cp -r /tmp/retrieval-llama "$RES/"
fi
for s in ${ACC_SETTINGS:-dense pbs-0.9 meanpool-0.9 pbs-0.8 pbs-0.95}; do
  OUT="$RES/acc-$s" timeout 100 python3 -m benchmarks.bench_accuracy --lengths 4096,8192,16384 \
    --num-prompts 50 --gpu-mem 0.3 --settings "$s" >"$RES/acc-$s.log" 2>&1
  grep -h "^| $s " "$RES/acc-$s/bench_accuracy.md" || tail -3 "$RES/acc-$s.log"
done
[ "${SKIP_TTFT:-0}" = 1 ] || timeout $(( 575 - SECONDS )) python3 benchmarks/bench_ttft.py --model /tmp/llama8b \
  --lengths 8k,16k,32k,64k,128k,256k --configs flash --reps 3 --eager \
  --decode-tokens 128 --profile 128k --out "$RES/ttft-flash" 2>&1 | tee "$RES/ttft-flash.log" | tail -4
pack s3
