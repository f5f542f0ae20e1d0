#!/usr/bin/env bash
# Call 4: TTFT of PBS at 10% density up to 256K and tau-only up to 128K, profiles at 128K.
. benchmarks/gpu/common.sh
timeout 280 python3 benchmarks/bench_ttft.py --model /tmp/llama8b \
  --lengths 8k,16k,32k,64k,128k,256k --configs pbs-d10 --reps 3 --eager \
  --decode-tokens 128 --profile 128k --out "$RES/ttft-d10" 2>&1 | tee "$RES/ttft-d10.log" | tail -4
timeout $(( 575 - SECONDS )) python3 benchmarks/bench_ttft.py --model /tmp/llama8b \
  --lengths 8k,16k,32k,64k,128k --configs pbs-tau --reps 3 --eager \
  --profile 128k --out "$RES/ttft-tau" 2>&1 | tee "$RES/ttft-tau.log" | tail -4
pack s4
