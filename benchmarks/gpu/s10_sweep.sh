#!/usr/bin/env bash
# Session 3, call 1 (rides on transfer vllm-01, no vLLM needed): launch-config sweep of the
# attention and key-importance kernels on the 16K-over-112K chunk.
. benchmarks/gpu/common.sh
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } >"$RES/gpu.txt"
cat "$RES/gpu.txt"
timeout 480 python3 benchmarks/sweep_configs.py --out "$RES/sweep" >"$RES/sweep.log" 2>&1
echo "sweep rc=$?" >>"$RES/sweep.log"
tail -50 "$RES/sweep.log"
pack sweep
