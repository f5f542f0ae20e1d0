#!/usr/bin/env bash
# Session 5 (2026-12-02, one H200): the real model (Qwen2.5-Coder-0.5B-Instruct, carried as
# its GGUF in qwen05-NN parts, rebuilt in /tmp/qwen05), step $1:
#   prep    convert with `pbs-vllm fetch-model --gguf`, GPU kernel tests, chunk benchmark
#           and host profile at the model's shape
#   native  TTFT 8K-30K on code prompts: FLASH_ATTN, PBS default, sparse tau 0.9 / 0.8,
#           the default with sparse prefill from 16K
#   ruler   RULER-style suite at 8K-32K: FLASH_ATTN, PBS sparse, unpermuted at matched density
#   density PBS density per layer and KV head at 8K-32K (code prompts) and a mask heatmap
#   yarn    TTFT 64K-128K with YaRN x4: FLASH_ATTN, PBS default, sparse tau 0.9 (the first of
#           the reps shows whether the start-up warm-up removed the first-request compiles)
. benchmarks/gpu/common.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/site-gguf .whl/gguf-*.whl >>"$RES/pip.log" 2>&1
export PYTHONPATH=/tmp/site-gguf:$PYTHONPATH
MODEL=/tmp/qwen-hf
case "$1" in
prep)
  python3 -m pbs_vllm.cli fetch-model qwen2.5-coder-0.5b-instruct --gguf /tmp/qwen05 --out $MODEL 2>&1 | tail -4
  ls $MODEL || exit 1
  python3 -m pytest -m gpu tests/kernels -q -x --timeout 600 2>&1 | tee "$RES/gpu-kernel-tests.log" | tail -3
  python3 -m pytest tests/kernels/test_permute.py tests/kernels/test_selection.py -q -x 2>&1 | tail -2
  (cd benchmarks && python3 bench_chunks.py --length 30k --chunk 16k --q-heads 14 --kv-heads 2 --head-dim 64 \
    && python3 bench_chunks.py --length 128k --chunk 16k --q-heads 14 --kv-heads 2 --head-dim 64 --settings tau0.9 \
    && python3 bench_chunks.py --length 32k --chunk 16k --settings tau0.9) 2>&1 \
    | grep -v '^{' | tee "$RES/chunks.txt" | grep -E '^\||per layer'
  (cd benchmarks && python3 profile_host.py --length 30k --chunk 16k --rows 25) 2>&1 | grep -v Warn > "$RES/profile-host.txt"
  head -30 "$RES/profile-host.txt"
  ;;
native)
  python3 benchmarks/bench_ttft.py --model $MODEL --real-weights --prompts code --lengths 8k,16k,30k \
    --configs flash,pbs-default,pbs-tau,pbs-tau0.8,pbs-default-16k --reps 3 --warmup-lengths 8k,20k \
    --profile 30k --out "$RES/ttft-native" 2>&1 | tail -16
  ;;
ruler)
  # SETTINGS picks a subset per call (each setting is its own child process; a later call
  # reuses the cached prompts and, for unpermuted-matched, needs pbs-sparse in the same call)
  python3 benchmarks/bench_ruler.py --model $MODEL --lengths ${LENGTHS:-8k,16k,32k} --num-prompts ${N:-30} \
    --settings ${SETTINGS:-flash,pbs-sparse,unpermuted-matched} --out "$RES/ruler" 2>&1 | tail -30
  ;;
density)
  python3 benchmarks/bench_density.py --model $MODEL --lengths 8k,16k,30k --prompts-per-length 4 \
    --out "$RES/density" 2>&1 | tail -40
  ;;
yarn)
  python3 benchmarks/bench_ttft.py --model $MODEL --real-weights --prompts code --yarn 4 --lengths 64k,127k \
    --configs flash,pbs-default,pbs-tau --reps 2 --warmup-lengths 16k --profile 127k \
    --out "$RES/ttft-yarn" 2>&1 | tail -12
  ;;
esac
pack "$1"
