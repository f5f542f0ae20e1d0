#!/usr/bin/env bash
# Session 3, call 5: decode throughput of FLASH_ATTN and the default PBS config as served
# (torch.compile + CUDA graphs, no --eager), two alternated rounds.
. benchmarks/gpu/common.sh
for round in 1 2; do
  timeout $(( (590 - SECONDS) / (3 - round) )) python3 benchmarks/bench_ttft.py \
    --model /tmp/llama8b --lengths 8k --warmup-lengths 8k --configs flash,pbs-default \
    --reps 5 --decode-tokens 256 --out "$RES/decode-$round" 2>&1 |
    tee "$RES/decode-$round.log" | tail -4
done
pack decode
