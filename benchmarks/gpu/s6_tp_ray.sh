#!/usr/bin/env bash
# On an nvidia-h100-x2 machine (vLLM + Ray staged): tensor parallel 2 under Ray, served,
# greedy tokens of PBS (every block kept) against FLASH_ATTN on the trained retrieval model.
. benchmarks/gpu/common.sh
ray start --head --num-gpus 2 --disable-usage-stats >"$RES/ray.log" 2>&1
timeout 400 python3 benchmarks/check_served.py --model pbs_vllm/models/retrieval-llama \
  --retrieval-prompts 4 --tokens 8 --startup-s 180 -- --tensor-parallel-size 2 \
  --distributed-executor-backend ray --enforce-eager --gpu-memory-utilization 0.3 2>&1 | tee "$RES/tp.log"
cp /tmp/serve-*.log "$RES/" 2>/dev/null
ray stop >/dev/null 2>&1
pack tp
