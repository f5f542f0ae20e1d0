#!/usr/bin/env bash
# Session 3: the rest of the accuracy runs, then the default config (dense_hold_steps on)
# next to FLASH_ATTN at 64K / 128K on the dummy 8B model.
. benchmarks/gpu/common.sh
make-dummy-llama /tmp/llama8b --layers 32 --hidden 4096 --heads 32 --kv-heads 8 \
  --intermediate 14336 --vocab 128256 --max-len 270000 >/dev/null
ACC_RUNS="pooled-0.9@512 meanpool-0.9@512 pbs-0.95@512 pbs-0.8@512" PACK=2 \
  bash benchmarks/gpu/s17_accuracy.sh
timeout $(( 590 - SECONDS )) python3 benchmarks/bench_ttft.py --model /tmp/llama8b \
  --lengths 64k,128k --configs flash,pbs-default --reps 3 --eager --out "$RES/ttft-hold" 2>&1 |
  tee "$RES/ttft-hold.log" | tail -4
pack hold
