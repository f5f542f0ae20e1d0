#!/usr/bin/env bash
# Call 5: TTFT of the remaining PBS configs up to 128K (default config: dense below 64K).
. benchmarks/gpu/common.sh
timeout 575 python3 benchmarks/bench_ttft.py --model /tmp/llama8b \
  --lengths 8k,16k,32k,64k,128k --configs ${TTFT_CONFIGS:-pbs-default,pbs-d5,pbs-d25} \
  --reps 3 --eager --out "$RES/ttft-more" 2>&1 | tee "$RES/ttft-more.log" | tail -6
pack s5
