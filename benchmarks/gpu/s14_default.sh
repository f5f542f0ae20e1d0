#!/usr/bin/env bash
# Session 3, call 4: TTFT of the default PBS config (dense_above on) next to FLASH_ATTN up
# to 128K.
. benchmarks/gpu/common.sh
timeout 580 python3 benchmarks/bench_ttft.py --model /tmp/llama8b \
  --lengths 8k,16k,32k,64k,128k --configs flash,pbs-default --reps 3 --eager \
  --out "$RES/ttft-default" 2>&1 | tee "$RES/ttft-default.log" | tail -4
pack default
