#!/usr/bin/env bash
# Call 4: tensor parallel 2 under Ray, served; greedy output PBS (full mask) vs FLASH_ATTN.
. benchmarks/gpu/common.sh
rm -rf "$RES"/*; mkdir -p "$RES"
ray start --head --num-gpus 2 --disable-usage-stats >"$RES/ray.log" 2>&1
timeout 500 python3 benchmarks/check_served.py --model /tmp/llama-dummy -- --load-format dummy \
  --tensor-parallel-size 2 --distributed-executor-backend ray --enforce-eager 2>&1 | tee "$RES/tp.log"
cp /tmp/serve-*.log "$RES/" 2>/dev/null
ray stop >/dev/null 2>&1
pack tp
