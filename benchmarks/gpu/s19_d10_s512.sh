#!/usr/bin/env bash
# Session 3, after s18 on the same machine: PBS at 10% density with 512-token segments (the
# default from then on) at 128K / 256K.
. benchmarks/gpu/common.sh
PBS_SEGMENT_SIZE=512 timeout 400 python3 benchmarks/bench_ttft.py --model /tmp/llama8b \
  --lengths 128k,256k --configs pbs-d10 --reps 3 --eager --out "$RES/ttft-d10-s512" 2>&1 |
  tee "$RES/ttft-d10-s512.log" | tail -3
pack s512
