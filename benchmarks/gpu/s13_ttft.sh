#!/usr/bin/env bash
# Session 3, call 3: TTFT of FLASH_ATTN and PBS at 10% density, 8K-256K, side by side in one
# call; profile of PBS at 128K.
. benchmarks/gpu/common.sh
timeout 330 python3 benchmarks/bench_ttft.py --model /tmp/llama8b \
  --lengths 8k,16k,32k,64k,128k,256k --configs flash --reps 3 --eager \
  --out "$RES/ttft-flash" 2>&1 | tee "$RES/ttft-flash.log" | tail -3
timeout $(( 585 - SECONDS )) python3 benchmarks/bench_ttft.py --model /tmp/llama8b \
  --lengths 8k,16k,32k,64k,128k,256k --configs pbs-d10 --reps 3 --eager \
  --profile 128k --out "$RES/ttft-d10" 2>&1 | tee "$RES/ttft-d10.log" | tail -3
pack ttft
