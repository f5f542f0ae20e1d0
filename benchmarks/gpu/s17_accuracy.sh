#!/usr/bin/env bash
# Session 3 (the first call rides on transfer vllm-02 + install.sh): retrieval accuracy per
# setting, one engine per process, in turn. ACC_RUNS: SETTING@SEGMENT words (block 128);
# pbs-* run exact_last_block, pooled-* the paper's pooled scores for every block. With
# KERNEL_TESTS=1 first the kernel GPU tests (the estimator against its reference).
. benchmarks/gpu/common.sh
if [ "${KERNEL_TESTS:-0}" = 1 ]; then
  timeout 200 python3 -m pytest -m gpu tests/kernels -q -p no:cacheprovider \
    >"$RES/gpu_kernel_tests.log" 2>&1; echo "kernel gpu tests rc=$?" >>"$RES/gpu_kernel_tests.log"
  tail -2 "$RES/gpu_kernel_tests.log"
fi
for run in ${ACC_RUNS:-dense@256 pbs-0.9@256 pooled-0.9@256 pbs-0.9@512 pbs-0.9@1024}; do
  s=${run%@*}; seg=${run#*@}
  OUT="$RES/acc-$s-s$seg" timeout 100 python3 -m benchmarks.bench_accuracy \
    --lengths 4096,8192,16384 --num-prompts 50 --gpu-mem 0.3 --settings "$s" --segment "$seg" \
    >"$RES/acc-$s-s$seg.log" 2>&1
  echo "S=$seg $(grep -h "^| $s " "$RES/acc-$s-s$seg/bench_accuracy.md" || tail -3 "$RES/acc-$s-s$seg.log")"
done
pack "acc-${PACK:-1}"
