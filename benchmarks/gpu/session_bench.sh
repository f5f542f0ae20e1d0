#!/usr/bin/env bash
# Call 4: kernel benchmark (GPU 0) and retrieval accuracy (GPU 1), side by side. ~5 minutes.
. benchmarks/gpu/common.sh
rm -rf "$RES"/*; mkdir -p "$RES"
cp -r /tmp/retrieval-llama pbs_vllm/models/
( CUDA_VISIBLE_DEVICES=1 OUT="$RES" timeout 280 python3 -m benchmarks.bench_accuracy \
    --lengths 4096,8192,16384 --num-prompts 50 \
    --settings ${ACC_SETTINGS:-dense,pbs-0.9,pbs-0.8,pbs-0.95,meanpool-0.9,pbs-cap0.1,meanpool-cap0.1} \
    >"$RES/accuracy.log" 2>&1; echo "accuracy rc=$?" >>"$RES/accuracy.log" ) &
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -m gpu tests/kernels -q -x -p no:cacheprovider \
  >"$RES/gpu_kernel_tests.log" 2>&1; tail -3 "$RES/gpu_kernel_tests.log"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_kernels.py --quick --out "$RES" \
  >"$RES/bench_kernels.log" 2>&1; tail -25 "$RES/bench_kernels.log"
wait
tail -15 "$RES/accuracy.log"
pack bench
