#!/usr/bin/env bash
# The GPU runner: `bash benchmarks/gpu/run.sh STEP [STEP ...]` on the GPU host (vLLM staged in
# /tmp/site, see ../shared/gpu/README.md); results in /tmp/results, packed into $OUT per step.
#   tests    the GPU tests of the kernels (FA3 path, Triton kernel, estimation; TESTS picks files)
#   kernels  bench_kernels.py at the Qwen2.5-0.5B shape (14 q / 2 KV heads, d 64) and the
#            Llama-3.1-8B shape (32 / 8, d 128): FA3 dense, PBS through FA3 and Triton, cuDNN
#   graphs   the step-graph GPU tests, then bench_layers.py: one step's PBS work over 24
#            layers at the Qwen shape, eager launches against step graphs (host and wall)
#   structured  estimation + FA3 attention at tau 0.9 on structured attention (sink, local
#            window, scattered heavy keys) against FA3 and cuDNN at 32K / 64K, both shapes
#   prep     the real model (Qwen2.5-Coder-0.5B-Instruct) from its GGUF in /tmp/qwen05 (carried
#            as qwen05-NN parts, docs/models.md) into /tmp/qwen-hf; one layer's chunk benchmark
#   native   TTFT 8K-30K on code prompts (CONFIGS), FLASH_ATTN beside every PBS config
#            (native, yarn and ttft-llama start one untimed engine first the first time they
#            run on a machine: its first engine ran 19-37% slower; PRIME=0 skips, 1 forces)
#   yarn     TTFT 64K-127K with YaRN x4 (the first rep shows whether the warm-up worked)
#   ruler    RULER-style suite (SETTINGS, LENGTHS, N; RULER_OUT names the results folder,
#            RULER_ARGS adds options, e.g. --known-densities from an earlier run)
#   ruler-par  the same, SETTINGS split into groups by ';' (e.g. "flash;pbs-last1k,unpermuted-last1k-matched")
#            (RULER_PAR_S: seconds after which the groups are stopped and the merge runs)
#            run as parallel processes sharing the GPU (a fixed KV cache of RULER_KV_GIB each,
#            default 8: vLLM's memory profile would count the others' memory), then merged
#            into one table in RULER_OUT (agreement included)
#   density  PBS density per layer and KV head at 8K-30K and a mask heatmap
#   soak     issue 18's served soak (benchmarks/gpu/soak.sh, its head lists the SOAK_* env):
#            FLASH_ATTN and PBS tau=1 served side by side (CUDA graphs, prefix caching, YaRN
#            to 122K), soak.py with FLASH_ATTN as reference, then the default and a sparse
#            config one round each, `vllm bench serve` on each; budgeted by SOAK_BUDGET_S
# Llama-3.1-8B shape with dummy weights (`llama` writes the model to /tmp/llama8b first):
#   llama       the dummy 8B model folder (config + tokenizer, no weights)
#   tests-all   every GPU test: kernels, bounded memory, backend, engine (needs llama)
#   ttft-llama  TTFT to 256K (LENGTHS) of CONFIGS (default flash,pbs-d10,pbs-default), eager
#   decode      decode throughput, FLASH_ATTN and the default config, two rounds
#   profile     host and GPU profile of one layer call (profile_host.py) at four shapes
#   sweep       launch-config sweep of the Triton attention and importance kernels
# Others:
#   accuracy    retrieval accuracy of the trained model per SETTING@SEGMENT in ACC_RUNS
#   train       retrain the retrieval model in the background (a fresh machine)
#   tp-ray      tensor parallel 2 under Ray, served (two GPUs, vLLM staged --with-ray)
. benchmarks/gpu/common.sh
MODEL=/tmp/qwen-hf
gguf() {
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-gguf .whl/gguf-*.whl >>"$RES/pip.log" 2>&1
  export PYTHONPATH=/tmp/site-gguf:$PYTHONPATH
}
prime() { # --prime for bench_ttft.py the first time a model configuration ($1) is timed on
  # this machine (its first engine runs slower, docs/benchmarks.md); PRIME=1 always, 0 never
  [ "${PRIME:-}" = 0 ] && return
  [ "${PRIME:-}" != 1 ] && [ -e "/tmp/.primed-$1" ] && return
  touch "/tmp/.primed-$1" && echo --prime
}
# the suite on the real model at LENGTHS with N prompts per task; more options after
RULER_CMD=(python3 benchmarks/bench_ruler.py --model $MODEL --lengths "${LENGTHS:-8k,16k,32k}" --num-prompts "${N:-30}")
ruler() { "${RULER_CMD[@]}" "$@"; }
for step in "$@"; do
  case "$step" in
  tests)
    python3 -m pytest -m gpu ${TESTS:-tests/kernels} -q --timeout 600 -rs 2>&1 | tee "$RES/gpu-kernel-tests.log" | tail -12
    ;;
  kernels)
    for shape in qwen llama; do
      python3 benchmarks/bench_kernels.py --shape $shape --sizes 32768 131072 --fractions 0.1 0.25 0.5 1.0 \
        --flex-fractions --sdpa sdpa_cudnn ${KERNEL_ARGS:-} --out "$RES" 2>&1 | grep -v Warn | tail -40
    done
    ;;
  graphs)
    python3 -m pytest -m gpu tests/kernels/test_graphs.py -q --timeout 300 -rs 2>&1 | tee "$RES/gpu-graph-tests.log" | tail -5
    for spec in "30k 16k" "16k 16k" "8k 8k"; do
      set -- $spec
      (cd benchmarks && python3 bench_layers.py --length $1 --chunk $2 --layers 24) 2>&1 | grep -v Warn | tail -5
    done | tee "$RES/layers.md"
    ;;
  structured)
    for shape in llama qwen; do
      python3 benchmarks/bench_kernels.py --shape $shape --sizes 32768 65536 --fractions 0.1 --no-chunk \
        --flex-fractions --sdpa sdpa_cudnn --structured --out "$RES/structured" 2>&1 | grep -E "structured|target|x cuDNN" | tail -12
    done
    ;;
  prep)
    gguf
    python3 -m pbs_vllm.cli fetch-model qwen2.5-coder-0.5b-instruct --gguf /tmp/qwen05 --out $MODEL 2>&1 | tail -3
    ls $MODEL || exit 1
    [ "${CHUNKS:-1}" != 0 ] || { pack "$step"; continue; }
    (cd benchmarks && python3 bench_chunks.py --length 30k --chunk 16k --q-heads 14 --kv-heads 2 --head-dim 64) 2>&1 \
      | grep -v '^{' | tee "$RES/chunks.txt" | grep -E '^\||per layer'
    ;;
  native)
    python3 benchmarks/bench_ttft.py --model $MODEL --real-weights --prompts code --lengths ${LENGTHS:-8k,16k,30k} \
      --configs ${CONFIGS:-flash,pbs-default,pbs-tau,pbs-tau-triton,pbs-tau0.8,pbs-default-16k} --reps 3 \
      --warmup-lengths 8k,20k ${PROFILE:+--profile $PROFILE} $(prime native) --out "$RES/ttft-native" 2>&1 \
      | tee "$RES/ttft-native.log" | grep -v '^RESULT' | tail -24
    ;;
  yarn)
    python3 benchmarks/bench_ttft.py --model $MODEL --real-weights --prompts code --yarn 4 --lengths 64k,127k \
      --configs ${CONFIGS:-flash,pbs-default,pbs-tau} --reps 2 --warmup-lengths 16k $(prime yarn) \
      --out "$RES/ttft-yarn" 2>&1 | tee "$RES/ttft-yarn.log" | grep -v '^RESULT' | tail -16
    ;;
  ruler)
    ruler --settings ${SETTINGS:-flash,pbs-sparse,unpermuted-matched} ${RULER_ARGS:-} \
      --out "$RES/${RULER_OUT:-ruler}" 2>&1 | tee "$RES/${RULER_OUT:-ruler}.log" | tail -30
    ;;
  ruler-par)
    out="$RES/${RULER_OUT:-ruler}"; i=0; merge=()
    IFS=';' read -ra groups <<<"${SETTINGS:?SETTINGS: groups of settings separated by ;}"
    # vLLM refuses to start while less than gpu_memory_utilization x the device is free,
    # so each engine asks for its share (the KV cache itself is fixed by --kv-cache-gib).
    util=$(python3 -c "print(round(0.9 / ${#groups[@]} - 0.02, 3))")
    for g in "${groups[@]}"; do
      i=$((i + 1)); merge+=(--merge-from "$out-g$i")
      # RULER_PAR_S: stop every group after this many seconds, so the merge below still
      # runs inside the call (a stopped group's setting is missing from the table)
      timeout -k 10 "${RULER_PAR_S:-86400}" "${RULER_CMD[@]}" \
        --settings "$g" --kv-cache-gib ${RULER_KV_GIB:-8} --gpu-memory-utilization $util \
        ${RULER_ARGS:-} --out "$out-g$i" \
        >"$out-g$i.log" 2>&1 &
      sleep 5
    done
    wait
    tail -4 "$out"-g*.log
    ruler --settings "$(echo "$SETTINGS" | tr ';' ',')" "${merge[@]}" --out "$out" 2>&1 | tee "$out.log" | tail -30
    ;;
  density)
    python3 benchmarks/bench_density.py --model $MODEL --lengths 8k,16k,30k --prompts-per-length 4 \
      --out "$RES/density" 2>&1 | tail -40
    ;;
  soak)
    bash benchmarks/gpu/soak.sh 2>&1 | tee "$RES/soak.log"
    ;;
  llama)
    make-dummy-llama /tmp/llama8b --layers 32 --hidden 4096 --heads 32 --kv-heads 8 \
      --intermediate 14336 --vocab 128256 --max-len 270000 >/dev/null && ls /tmp/llama8b
    ;;
  tests-all)
    timeout 500 python3 -m pytest -m gpu tests/kernels tests/reliability/test_bounded_memory.py \
      tests/backend tests/engine -q -p no:cacheprovider >"$RES/gpu_tests.log" 2>&1
    echo "gpu tests rc=$?" >>"$RES/gpu_tests.log"; tail -8 "$RES/gpu_tests.log"
    ;;
  ttft-llama)
    python3 benchmarks/bench_ttft.py --model /tmp/llama8b --lengths ${LENGTHS:-8k,16k,32k,64k,128k,256k} \
      --configs ${CONFIGS:-flash,pbs-d10,pbs-default} --reps 3 --eager $(prime llama) ${TTFT_ARGS:-} \
      --out "$RES/ttft-llama" 2>&1 | tee "$RES/ttft-llama.log" | tail -8
    ;;
  decode)
    for round in 1 2; do
      python3 benchmarks/bench_ttft.py --model /tmp/llama8b --lengths 8k --warmup-lengths 8k \
        --configs flash,pbs-default --reps 5 --decode-tokens 256 --out "$RES/decode-$round" 2>&1 | tail -4
    done
    ;;
  profile)
    (cd benchmarks && for spec in "30k 16k 14 2 64" "128k 16k 14 2 64" "32k 16k 32 8 128"; do
      set -- $spec
      python3 profile_host.py --length $1 --chunk $2 --q-heads $3 --kv-heads $4 --head-dim $5 --rows 40 2>&1 | grep -v Warn
    done) | tee "$RES/profile.txt" | grep "host"
    ;;
  sweep)
    timeout 480 python3 benchmarks/sweep_configs.py --out "$RES/sweep" 2>&1 | grep -v '^{' | tail -40
    python3 benchmarks/loop_ceiling.py 2>&1 | tail -9
    ;;
  accuracy)
    for run in ${ACC_RUNS:-dense@512 pbs-0.9@512 pooled-0.9@256}; do
      s=${run%@*}; seg=${run#*@}
      OUT="$RES/acc-$s-s$seg" timeout 150 python3 -m benchmarks.bench_accuracy \
        --lengths 4096,8192,16384 --num-prompts 50 --gpu-mem 0.3 --settings "$s" --segment "$seg" \
        >"$RES/acc-$s-s$seg.log" 2>&1
      echo "S=$seg $(grep -h "^| $s " "$RES/acc-$s-s$seg/bench_accuracy.md" || tail -3 "$RES/acc-$s-s$seg.log")"
    done
    ;;
  train)
    setsid nohup python3 -m training.train --out /tmp/retrieval-llama --minutes 7 \
      >"$RES/train.log" 2>&1 </dev/null &
    sleep 15; tail -2 "$RES/train.log"
    ;;
  tp-ray)
    ray start --head --num-gpus 2 --disable-usage-stats >"$RES/ray.log" 2>&1
    timeout 500 python3 benchmarks/check_served.py --model pbs_vllm/models/retrieval-llama \
      --retrieval-prompts 16 --tokens 1 --startup-s 200 -- --tensor-parallel-size 2 \
      --distributed-executor-backend ray --enforce-eager --gpu-memory-utilization 0.3 2>&1 | tee "$RES/tp.log"
    cp /tmp/serve-*.log "$RES/" 2>/dev/null; ray stop >/dev/null 2>&1
    ;;
  *) echo "unknown step $step (see the head of benchmarks/gpu/run.sh)"; exit 2 ;;
  esac
  pack "$step"
done
