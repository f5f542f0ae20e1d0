#!/usr/bin/env bash
# Call 3 of the GPU session (its command after install.sh). ~9.5 minutes.
# GPU 1: train the retrieval model (7 min). GPU 0: GPU tests, then the TTFT benchmark.
. benchmarks/gpu/common.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$RES/gpus.txt"
make-dummy-llama /tmp/llama-dummy --max-len 8192 >/dev/null
make-dummy-llama /tmp/llama8b --layers 32 --hidden 4096 --heads 32 --kv-heads 8 \
  --intermediate 14336 --vocab 128256 --max-len 270000 >/dev/null
CUDA_VISIBLE_DEVICES=1 setsid nohup python3 -m training.train --out /tmp/retrieval-llama \
  --minutes 7 >"$RES/train.log" 2>&1 &
T0=$(date +%s)
export CUDA_VISIBLE_DEVICES=0
timeout 150 python3 -m pytest -m gpu tests/backend tests/engine -q -x -p no:cacheprovider \
  >"$RES/gpu_tests.log" 2>&1; echo "gpu engine tests rc=$?" | tee -a "$RES/gpu_tests.log"
tail -4 "$RES/gpu_tests.log"
timeout $(( 540 - ($(date +%s) - T0) )) python3 benchmarks/bench_ttft.py --model /tmp/llama8b \
  --lengths ${TTFT_LENGTHS:-8k,16k,32k,64k,128k} --configs ${TTFT_CONFIGS:-flash,pbs-d10,pbs-d5,pbs-tau} \
  --reps 3 --eager --out "$RES" 2>&1 | tee "$RES/ttft.log" | tail -12
while pgrep -f training.train >/dev/null && [ $(( $(date +%s) - T0 )) -lt 545 ]; do sleep 3; done
tail -12 "$RES/train.log"
cp -r /tmp/retrieval-llama "$RES/" 2>/dev/null
pack setup
