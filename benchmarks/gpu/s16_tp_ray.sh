#!/usr/bin/env bash
# Session 3, on nvidia-h100-x2 (vLLM + Ray staged, rides on transfer 3): tensor parallel 2
# under Ray, served; greedy answers of PBS (every block kept) against FLASH_ATTN on the
# trained retrieval model, 16 prompts, the answer token only (past the answer the model
# has no margin: session 2 saw 2 of 4 eight-token completions part at token 7 or 8).
. benchmarks/gpu/common.sh
nvidia-smi --query-gpu=name --format=csv
ray start --head --num-gpus 2 --disable-usage-stats >"$RES/ray.log" 2>&1
timeout 500 python3 benchmarks/check_served.py --model pbs_vllm/models/retrieval-llama \
  --retrieval-prompts 16 --tokens 1 --startup-s 200 -- --tensor-parallel-size 2 \
  --distributed-executor-backend ray --enforce-eager --gpu-memory-utilization 0.3 2>&1 | tee "$RES/tp.log"
cp /tmp/serve-*.log "$RES/" 2>/dev/null
ray stop >/dev/null 2>&1
pack tp
