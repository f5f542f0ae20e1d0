#!/usr/bin/env bash
# Call 2 (after install.sh): every GPU test (kernels, memory bound, backend, engine) while
# training goes on.
. benchmarks/gpu/common.sh
make-dummy-llama /tmp/llama8b --layers 32 --hidden 4096 --heads 32 --kv-heads 8 \
  --intermediate 14336 --vocab 128256 --max-len 270000 >/dev/null
timeout 480 python3 -m pytest -m gpu tests/kernels tests/reliability/test_bounded_memory.py \
  tests/backend tests/engine -q -p no:cacheprovider >"$RES/gpu_engine_tests.log" 2>&1
echo "gpu tests rc=$?" >>"$RES/gpu_engine_tests.log"
tail -6 "$RES/gpu_engine_tests.log"; tail -3 "$RES/train.log"
pack s2
