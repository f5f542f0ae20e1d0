#!/usr/bin/env bash
# Call 4: TTFT of the PBS configs (GPU 0); retrieval accuracy then the kernel benchmark (GPU 1).
. benchmarks/gpu/common.sh
rm -rf "$RES"/*; mkdir -p "$RES"
python3 -c "import pbs_vllm.backend.pbs_attn; from vllm.config import AttentionConfig; print(AttentionConfig(backend='pbs').backend.get_path())" 2>&1 | tail -1
cp -r /tmp/retrieval-llama pbs_vllm/models/
( export CUDA_VISIBLE_DEVICES=1
  OUT="$RES" timeout 250 python3 -m benchmarks.bench_accuracy --lengths 4096,8192,16384 \
    --num-prompts 50 --settings ${ACC_SETTINGS:-dense,pbs-0.9,meanpool-0.9,pbs-cap0.1,meanpool-cap0.1} \
    >"$RES/accuracy.log" 2>&1; echo "accuracy rc=$?" >>"$RES/accuracy.log"
  timeout 200 python3 benchmarks/bench_kernels.py --quick --out "$RES" >"$RES/bench_kernels.log" 2>&1 ) &
CUDA_VISIBLE_DEVICES=0 timeout 450 python3 benchmarks/bench_ttft.py --model /tmp/llama8b \
  --lengths ${TTFT_LENGTHS:-8k,16k,32k,64k,128k} --configs ${TTFT_CONFIGS:-flash,pbs-d10,pbs-tau} \
  --reps 2 --eager --out "$RES" 2>&1 | tee "$RES/ttft.log" | tail -12
wait
tail -12 "$RES/accuracy.log"; tail -22 "$RES/bench_kernels.log"
pack bench
