#!/usr/bin/env bash
# The `soak` step of run.sh (issue 18): `vllm serve --attention-backend pbs` with vLLM's CUDA
# graphs (not eager) and prefix caching, soaked by benchmarks/soak.py (--profile gpu: prompts
# 1K-120K, 20% on one of 3 prefixes of 32K, 1-256 output tokens) and timed by `vllm bench
# serve`, with a FLASH_ATTN server beside it on the same GPU (at most two servers at once,
# SOAK_MEM of the GPU each). Logs and JSON in $RES/soak, packed into $OUT after every phase,
# so a call cut short still returns what ran. Phases (SOAK_PHASES), in order of importance;
# a phase is skipped once too little of SOAK_BUDGET_S (counted from the step's start) is left
# (at issue 18's sizes tau1 alone may take most of a 10-minute call: run the rest in a second
# call with SOAK_PHASES="default sparse flash"):
#   tau1     FLASH_ATTN and PBS tau=1 (every block kept, no dense fallback): soak.py against
#            PBS with FLASH_ATTN as --reference-url (first token of every request, prompt
#            logprobs of SOAK_LOGPROBS requests), SOAK_REQUESTS x SOAK_ROUNDS rounds with
#            SOAK_CONCURRENCY in flight, SOAK_SEQUENTIAL replayed alone, SOAK_DISCONNECTS
#            clients per round leaving mid-prefill of a 100K prompt, memory drift limits
#            SOAK_RSS_DRIFT / SOAK_GPU_DRIFT MiB; then `vllm bench serve` on both servers
#   default  PBS with its default config: one round of SOAK_CONFIG_REQUESTS (+ disconnects),
#            then `vllm bench serve`
#   sparse   PBS at tau 0.9 (no dense fallback, no dense switch): the same
#   flash    tau1's workload, one round, against FLASH_ATTN (prefix cache reset first): its
#            TTFT and throughput beside tau1's round 1, and the same SOAK_SEQUENTIAL requests
#            replayed alone (how much vLLM's own batching changes greedy outputs in bf16,
#            the baseline for tau1's replay check)
# Env (default): SOAK_PHASES ("tau1 default sparse flash"), SOAK_BUDGET_S (540), SOAK_MODEL
# (/tmp/qwen-hf, written by `prep`), SOAK_YARN (4: YaRN factor for the 32K-native Qwen model,
# 0 for none), SOAK_MAX_LEN (124928), SOAK_MEM (0.4), SOAK_BATCHED (8192, max-num-batched-
# tokens), SOAK_START_S (300, per server start), SOAK_REQUESTS (300), SOAK_ROUNDS (2),
# SOAK_KV_GIB (12, each server's KV cache), SOAK_CONCURRENCY (32), SOAK_SEQUENTIAL (40), SOAK_DISCONNECTS (2), SOAK_LOGPROBS (40),
# SOAK_CONFIG_REQUESTS (100), SOAK_RSS_DRIFT (512), SOAK_GPU_DRIFT (256), SOAK_ARGS (more
# soak.py options, e.g. "--vocab 3,900" for make-dummy-llama's ~1000-token tokenizer),
# SOAK_SERVE_ARGS (more `vllm serve` options, e.g. "--load-format dummy"), BENCH (1; 0 skips
# `vllm bench serve`), BENCH_PROMPTS (100), BENCH_INPUT (16000), BENCH_OUTPUT (128),
# BENCH_CONCURRENCY (16).
. benchmarks/gpu/common.sh
S="$RES/soak"
mkdir -p "$S"
T0=$SECONDS
MODEL_DIR=${SOAK_MODEL:-/tmp/qwen-hf}
MAX_LEN=${SOAK_MAX_LEN:-124928}
[ -f "$MODEL_DIR/config.json" ] || { echo "soak: no model in $MODEL_DIR (run the prep step)"; exit 1; }
HF_OVERRIDES=""
if [ "${SOAK_YARN:-4}" != 0 ]; then
  HF_OVERRIDES=$(python3 -c 'import json, sys
from pbs_vllm.evals.engine import yarn_hf_overrides
print(json.dumps(yarn_hf_overrides(sys.argv[1], float(sys.argv[2]))))' "$MODEL_DIR" "${SOAK_YARN:-4}") || exit 1
fi
echo "soak: model $MODEL_DIR, max_model_len $MAX_LEN, hf_overrides ${HF_OVERRIDES:-none}"

left() { echo $((${SOAK_BUDGET_S:-540} - (SECONDS - T0))); }
cap() { # SECONDS: that, or what is left of the budget if less (at least 1: `timeout 0` never ends)
  local l
  l=$(left)
  if [ "$1" -lt "$l" ]; then echo "$1"; elif [ "$l" -gt 0 ]; then echo "$l"; else echo 1; fi
}
need() { # SECONDS WHAT: true if the budget has that much left, else say what is skipped
  [ "$(left)" -ge "$1" ] && return 0
  echo "soak: skipping $2: $(left) s of SOAK_BUDGET_S left, it needs about $1 s"
  return 1
}
port_of() { case $1 in flash) echo 8101 ;; tau1) echo 8102 ;; default) echo 8103 ;; sparse) echo 8104 ;; esac; }
url_of() { echo "http://127.0.0.1:$(port_of "$1")"; }
pbs_config() {
  case $1 in
  tau1) echo '{"pbs": {"tau": 1.0, "dense_above": null, "dense_fallback_len": 0}}' ;;
  sparse) echo '{"pbs": {"tau": 0.9, "dense_above": null, "dense_fallback_len": 0}}' ;;
  esac # flash: FLASH_ATTN; default: PBS with no additional config
}

start_server() { # NAME: start its server unless it is up (returns at once)
  local name=$1 pid cfg backend=pbs
  [ -f "$S/$name.pid" ] && kill -0 "$(cat "$S/$name.pid")" 2>/dev/null && return 0
  [ "$name" = flash ] && backend=FLASH_ATTN
  # A fixed KV cache (SOAK_KV_GIB): servers that start side by side would each count the
  # other's memory in vLLM's memory profile and size their caches wrong.
  local args=(serve "$MODEL_DIR" --host 127.0.0.1 --port "$(port_of "$name")"
    --attention-backend "$backend" --max-model-len "$MAX_LEN" --enable-prefix-caching
    --gpu-memory-utilization "${SOAK_MEM:-0.4}" --max-num-batched-tokens "${SOAK_BATCHED:-8192}"
    --kv-cache-memory-bytes "$((${SOAK_KV_GIB:-12} * 1073741824))" --seed 0)
  cfg=$(pbs_config "$name")
  [ -n "$cfg" ] && args+=(--additional-config "$cfg")
  [ -n "$HF_OVERRIDES" ] && args+=(--hf-overrides "$HF_OVERRIDES")
  # shellcheck disable=SC2086 # SOAK_SERVE_ARGS is a list of options
  VLLM_SERVER_DEV_MODE=1 setsid vllm "${args[@]}" ${SOAK_SERVE_ARGS:-} >"$S/server-$name.log" 2>&1 &
  pid=$!
  echo "$pid" >"$S/$name.pid"
  echo "$SECONDS" >"$S/$name.t0"
}

wait_healthy() { # NAME: wait for its /health (SOAK_START_S from its start at most)
  local name=$1 pid t0 limit
  pid=$(cat "$S/$name.pid" 2>/dev/null) || return 1
  t0=$(cat "$S/$name.t0" 2>/dev/null || echo "$SECONDS")
  limit=$(cap "${SOAK_START_S:-300}")
  until curl -sf -m 5 "$(url_of "$name")/health" >/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null || [ $((SECONDS - t0)) -ge "$limit" ]; then
      echo "soak: $name server not healthy after $((SECONDS - t0)) s; log tail:"
      tail -25 "$S/server-$name.log"
      stop "$name"
      return 1
    fi
    sleep 2
  done
  echo "soak: $name server up in $((SECONDS - t0)) s ($(url_of "$name"), pid $pid)"
}

serve() { # NAME...: start their servers side by side, then wait until every one is healthy
  local name ok=0
  for name in "$@"; do start_server "$name"; done
  for name in "$@"; do wait_healthy "$name" || ok=1; done
  return $ok
}

stop() { # NAME: SIGTERM its process group, SIGKILL after 30 s; wait until the group is gone
  local f="$S/$1.pid" pid killer
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  rm -f "$f"
  kill -TERM -- "-$pid" 2>/dev/null
  (sleep 30 && kill -KILL -- "-$pid" 2>/dev/null) &
  killer=$!
  wait "$pid" 2>/dev/null
  kill -KILL -- "-$pid" 2>/dev/null # the engine core and workers, if any lingers
  for _ in $(seq 60); do pgrep -g "$pid" >/dev/null || break; sleep 0.5; done
  kill "$killer" 2>/dev/null
  echo "soak: $1 server stopped"
}
stop_all() { for n in tau1 default sparse flash; do stop "$n"; done; }
trap stop_all EXIT

drive() { # NAME SERVER CAP_S [soak.py options]: soak.py against SERVER, report in soak-NAME.json
  local name=$1 server=$2 t
  t=$(cap "$3")
  shift 3
  echo "soak: soak.py $name against $server, at most $t s"
  # shellcheck disable=SC2086 # SOAK_ARGS is a list of options
  timeout -k 10 "$t" python3 benchmarks/soak.py --url "$(url_of "$server")" \
    --server-pid "$(cat "$S/$server.pid")" --profile gpu --max-model-len "$MAX_LEN" \
    --concurrency "${SOAK_CONCURRENCY:-32}" --json "$S/soak-$name.json" ${SOAK_ARGS:-} "$@" \
    2>&1 >"$S/soak-$name.out" | tee "$S/soak-$name.log" | tail -5
  echo "soak: soak.py $name rc=${PIPESTATUS[0]}"
}

bench() { # NAME: `vllm bench serve` (random prompts) against that server, bench-NAME.json
  [ "${BENCH:-1}" = 1 ] || return 0
  need 60 "bench $1" || return 0
  timeout -k 10 "$(cap 180)" vllm bench serve --backend vllm --base-url "$(url_of "$1")" \
    --model "$MODEL_DIR" --tokenizer "$MODEL_DIR" --dataset-name random \
    --random-input-len "${BENCH_INPUT:-16000}" --random-output-len "${BENCH_OUTPUT:-128}" \
    --num-prompts "${BENCH_PROMPTS:-100}" --max-concurrency "${BENCH_CONCURRENCY:-16}" \
    --ignore-eos --seed 0 --save-result --result-dir "$S" --result-filename "bench-$1.json" \
    >"$S/bench-$1.log" 2>&1
  echo "soak: bench $1 rc=$?"
  grep -E "Successful requests|Failed requests|Mean TTFT|Median TTFT|Output token throughput" "$S/bench-$1.log"
}

# tau1 and flash share their two servers: start both side by side before the first phase
# (a start takes about two minutes), whichever of the two phases comes first.
case " ${SOAK_PHASES:-tau1 default sparse flash} " in
*" tau1 "* | *" flash "*) start_server flash && start_server tau1 ;;
esac
for phase in ${SOAK_PHASES:-tau1 default sparse flash}; do
  case $phase in
  tau1)
    need 300 tau1 || continue
    serve flash tau1 || continue
    drive tau1 tau1 420 --requests "${SOAK_REQUESTS:-300}" --rounds "${SOAK_ROUNDS:-2}" \
      --sequential "${SOAK_SEQUENTIAL:-40}" --disconnects "${SOAK_DISCONNECTS:-2}" \
      --reference-url "$(url_of flash)" --prompt-logprobs "${SOAK_LOGPROBS:-40}" \
      --max-rss-drift-mib "${SOAK_RSS_DRIFT:-512}" --max-gpu-drift-mib "${SOAK_GPU_DRIFT:-256}"
    bench tau1
    bench flash
    ;;
  flash)
    need 120 flash || continue
    serve flash || continue
    curl -sf -m 60 -X POST "$(url_of flash)/reset_prefix_cache" >/dev/null
    drive flash flash 240 --requests "${SOAK_REQUESTS:-300}" --rounds 1 \
      --sequential "${SOAK_SEQUENTIAL:-40}"
    ;;
  default | sparse)
    stop tau1
    stop default
    need 180 "$phase" || continue
    serve "$phase" || continue
    drive "$phase" "$phase" 240 --requests "${SOAK_CONFIG_REQUESTS:-100}" --rounds 1 \
      --disconnects "${SOAK_DISCONNECTS:-2}"
    bench "$phase"
    [ -f "$S/bench-flash.json" ] || { serve flash && bench flash; }
    stop "$phase"
    ;;
  *) echo "soak: unknown phase $phase (tau1, flash, default, sparse)"; exit 2 ;;
  esac
  pack soak >/dev/null
done
echo "soak: done in $((SECONDS - T0)) s; results in $S"
