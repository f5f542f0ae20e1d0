#!/usr/bin/env bash
# The GPU runner: `bash benchmarks/gpu/run.sh STEP [STEP ...]` on the GPU host (vLLM staged in
# /tmp/site, see ../shared/gpu/README.md); results in /tmp/results, packed into $OUT per step.
#   tests    the GPU tests of the kernels (FA3 path, Triton kernel, estimation)
#   kernels  bench_kernels.py at the Qwen2.5-0.5B shape (14 q / 2 KV heads, d 64) and the
#            Llama-3.1-8B shape (32 / 8, d 128): FA3 dense, PBS through FA3 and Triton, cuDNN
#   prep     the real model (Qwen2.5-Coder-0.5B-Instruct) from its GGUF in /tmp/qwen05 (carried
#            as qwen05-NN parts, docs/models.md) into /tmp/qwen-hf; one layer's chunk benchmark
#   native   TTFT 8K-30K on code prompts (CONFIGS), FLASH_ATTN beside every PBS config
#   yarn     TTFT 64K-127K with YaRN x4 (the first rep shows whether the warm-up worked)
#   ruler    RULER-style suite (SETTINGS, LENGTHS, N)
#   density  PBS density per layer and KV head at 8K-30K and a mask heatmap
. benchmarks/gpu/common.sh
MODEL=/tmp/qwen-hf
gguf() {
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-gguf .whl/gguf-*.whl >>"$RES/pip.log" 2>&1
  export PYTHONPATH=/tmp/site-gguf:$PYTHONPATH
}
for step in "$@"; do
  case "$step" in
  tests)
    python3 -m pytest -m gpu tests/kernels -q --timeout 600 -rs 2>&1 | tee "$RES/gpu-kernel-tests.log" | tail -12
    ;;
  kernels)
    for shape in qwen llama; do
      python3 benchmarks/bench_kernels.py --shape $shape --sizes 32768 131072 --fractions 0.1 0.25 0.5 1.0 \
        --flex-fractions --sdpa sdpa_cudnn ${KERNEL_ARGS:-} --out "$RES" 2>&1 | grep -v Warn | tail -40
    done
    ;;
  prep)
    gguf
    python3 -m pbs_vllm.cli fetch-model qwen2.5-coder-0.5b-instruct --gguf /tmp/qwen05 --out $MODEL 2>&1 | tail -3
    ls $MODEL || exit 1
    (cd benchmarks && python3 bench_chunks.py --length 30k --chunk 16k --q-heads 14 --kv-heads 2 --head-dim 64) 2>&1 \
      | grep -v '^{' | tee "$RES/chunks.txt" | grep -E '^\||per layer'
    ;;
  native)
    python3 benchmarks/bench_ttft.py --model $MODEL --real-weights --prompts code --lengths ${LENGTHS:-8k,16k,30k} \
      --configs ${CONFIGS:-flash,pbs-default,pbs-tau,pbs-tau-triton,pbs-tau0.8,pbs-default-16k} --reps 3 \
      --warmup-lengths 8k,20k --profile ${PROFILE:-30k} --out "$RES/ttft-native" 2>&1 | tail -20
    ;;
  yarn)
    python3 benchmarks/bench_ttft.py --model $MODEL --real-weights --prompts code --yarn 4 --lengths 64k,127k \
      --configs ${CONFIGS:-flash,pbs-default,pbs-tau} --reps 2 --warmup-lengths 16k \
      --out "$RES/ttft-yarn" 2>&1 | tail -12
    ;;
  ruler)
    python3 benchmarks/bench_ruler.py --model $MODEL --lengths ${LENGTHS:-8k,16k,32k} --num-prompts ${N:-30} \
      --settings ${SETTINGS:-flash,pbs-sparse,unpermuted-matched} --out "$RES/ruler" 2>&1 | tail -30
    ;;
  density)
    python3 benchmarks/bench_density.py --model $MODEL --lengths 8k,16k,30k --prompts-per-length 4 \
      --out "$RES/density" 2>&1 | tail -40
    ;;
  *) echo "unknown step $step"; exit 2 ;;
  esac
  pack "$step"
done
