#!/usr/bin/env bash
# Call 1 (with transfer vllm-01, no vLLM yet): the chunk benchmark alone on the GPU, then
# training in the background (it runs on through the next calls).
. benchmarks/gpu/common.sh
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } >"$RES/gpu.txt"
cat "$RES/gpu.txt"
timeout 200 python3 benchmarks/bench_chunks.py --length 128k --chunk 16k --out "$RES" \
  >"$RES/bench_chunks.log" 2>&1; echo "bench_chunks rc=$?" >>"$RES/bench_chunks.log"
tail -8 "$RES/bench_chunks.log"
setsid nohup python3 -m training.train --out /tmp/retrieval-llama --minutes 7 \
  >"$RES/train.log" 2>&1 < /dev/null &
sleep 20; tail -3 "$RES/train.log"
pack s1
