#!/usr/bin/env bash
# Session 4 (2026-12-02, one H200): the real model (Qwen2.5-Coder-0.5B-Instruct, carried as
# its GGUF in qwen05-NN parts and rebuilt in /tmp/qwen05), step $1:
#   prep   dequantize to /tmp/qwen-hf, GPU kernel tests, host profile + chunk benchmark
#   native TTFT 8K-30K: FLASH_ATTN, PBS default, PBS tau 0.9 (no fallback), with profiles
#   yarn   TTFT 64K-128K with YaRN x4: the same configurations
. benchmarks/gpu/common.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/site-gguf .whl/gguf-*.whl >>"$RES/pip.log" 2>&1
export PYTHONPATH=/tmp/site-gguf:$PYTHONPATH
MODEL=/tmp/qwen-hf
case "$1" in
prep)
  python3 - <<'PY' 2>&1 | tail -5
import pathlib, torch, safetensors.torch as st
from transformers import AutoModelForCausalLM, AutoTokenizer
src = pathlib.Path("/tmp/qwen05/tmp/qwen"); name = "qwen2.5-coder-0.5b-instruct.gguf"
out = pathlib.Path("/tmp/qwen-hf"); out.mkdir(exist_ok=True)
m = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.bfloat16)
sd = {k: v.contiguous().clone() for k, v in m.state_dict().items()}
if m.config.tie_word_embeddings: sd.pop("lm_head.weight", None)
st.save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
m.config.save_pretrained(out); m.generation_config.save_pretrained(out)
AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(out)
print("converted", sorted(p.name for p in out.iterdir()))
PY
  python3 -m pytest -m gpu tests/kernels -q -x --timeout 600 2>&1 | tee "$RES/gpu-kernel-tests.log" | tail -4
  (cd benchmarks && python3 profile_host.py --length 30k --chunk 16k) 2>&1 | grep -v Warn | tee "$RES/profile-host.txt" | head -14
  (cd benchmarks && python3 bench_chunks.py --length 30k --chunk 16k --q-heads 14 --kv-heads 2 --head-dim 64 \
    && python3 bench_chunks.py --length 128k --chunk 16k --q-heads 14 --kv-heads 2 --head-dim 64) 2>&1 \
    | grep -v '^{' | tee "$RES/chunks.txt" | grep -E '^\||per layer'
  ;;
native)
  python3 benchmarks/bench_ttft.py --model $MODEL --real-weights --lengths 8k,16k,30k \
    --configs flash,pbs-default,pbs-tau --reps 3 --warmup-lengths 8k,20k --profile 30k \
    --out "$RES/ttft-native" 2>&1 | tail -12
  ;;
yarn)
  python3 benchmarks/bench_ttft.py --model $MODEL --real-weights --yarn 4 --lengths 64k,128k \
    --configs flash,pbs-default,pbs-tau --reps 2 --warmup-lengths 8k,20k --profile 128k \
    --out "$RES/ttft-yarn" 2>&1 | tail -12
  ;;
esac
pack "$1"
