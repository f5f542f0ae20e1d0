#!/usr/bin/env bash
# Session 5 (2026-12-02, one H200), kernels only (no vLLM): host and GPU profile of one
# layer's pbs_prefill at the Qwen2.5-0.5B shape (30K: second chunk; 128K: last chunk) and
# the Llama-3.1-8B shape, plus the chunk benchmark at the Qwen shape.
. benchmarks/gpu/common.sh
cd benchmarks
for spec in "30k 16k 14 2 64 0.9" "30k 16k 14 2 64 1.0 --max-density 0.3" "128k 16k 14 2 64 0.9" "32k 16k 32 8 128 0.9"; do
  set -- $spec
  python3 profile_host.py --length $1 --chunk $2 --q-heads $3 --kv-heads $4 --head-dim $5 --tau $6 ${7:-} ${8:-} --rows 40 2>&1 | grep -v Warn
done | tee "$RES/profile.txt"
python3 bench_chunks.py --length 30k --chunk 16k --q-heads 14 --kv-heads 2 --head-dim 64 2>&1 | grep -v '^{' | tee "$RES/chunks.txt"
cd ..
pack profile
