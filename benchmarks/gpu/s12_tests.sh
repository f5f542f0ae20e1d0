#!/usr/bin/env bash
# Session 3, call 2 (rides on transfer vllm-02 + install.sh): the dummy 8B model, then every
# GPU test (kernels, memory bound, backend, engine) with the 256-row kernel tiles.
. benchmarks/gpu/common.sh
make-dummy-llama /tmp/llama8b --layers 32 --hidden 4096 --heads 32 --kv-heads 8 \
  --intermediate 14336 --vocab 128256 --max-len 270000 >/dev/null
timeout 500 python3 -m pytest -m gpu tests/kernels tests/reliability/test_bounded_memory.py \
  tests/backend tests/engine -q -p no:cacheprovider >"$RES/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" >>"$RES/gpu_tests.log"
tail -8 "$RES/gpu_tests.log"
pack tests
