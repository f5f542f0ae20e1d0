#!/usr/bin/env bash
# pbs-ray-node ROLE [ARGS...]: one pod of a multi-node vLLM group under LeaderWorkerSet.
#   leader MODEL [VLLM_SERVE_OPTIONS...]  start the Ray head, wait until all
#       $LWS_GROUP_SIZE nodes joined, then run pbs-vllm-serve with the options (which
#       should include --distributed-executor-backend ray).
#   worker                                join the leader's Ray cluster and block.
#   check                                 exit 0 while the leader's Ray cluster answers
#                                         (the workers' probe).
# LeaderWorkerSet sets LWS_LEADER_ADDRESS and LWS_GROUP_SIZE in every pod of a group.
set -euo pipefail

RAY_PORT="${RAY_PORT:-6379}"
# Seconds the leader waits for its workers, and a worker for the leader.
RAY_JOIN_TIMEOUT_S="${RAY_JOIN_TIMEOUT_S:-1200}"

die() {
  echo "pbs-ray-node: $*" >&2
  exit 2
}

alive_nodes() {
  python3 -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))'
}

wait_for() {
  local what="$1"
  shift
  local waited=0
  until "$@"; do
    if ((waited >= RAY_JOIN_TIMEOUT_S)); then
      die "gave up after ${RAY_JOIN_TIMEOUT_S}s waiting for ${what}"
    fi
    sleep 5
    waited=$((waited + 5))
  done
}

group_complete() {
  local n
  n="$(alive_nodes 2>/dev/null || echo 0)"
  echo "pbs-ray-node: ${n}/${LWS_GROUP_SIZE} Ray nodes alive"
  [[ "${n}" -ge "${LWS_GROUP_SIZE}" ]]
}

leader_reachable() {
  ray health-check --address "${LWS_LEADER_ADDRESS}:${RAY_PORT}" >/dev/null 2>&1
}

role="${1:-}"
[[ $# -gt 0 ]] && shift
case "${role}" in
  leader)
    [[ -n "${LWS_GROUP_SIZE:-}" ]] || die "LWS_GROUP_SIZE is not set (run under LeaderWorkerSet)"
    ray start --head --port="${RAY_PORT}" --disable-usage-stats
    wait_for "${LWS_GROUP_SIZE} Ray nodes" group_complete
    exec pbs-vllm-serve "$@"
    ;;
  worker)
    [[ -n "${LWS_LEADER_ADDRESS:-}" ]] || die "LWS_LEADER_ADDRESS is not set (run under LeaderWorkerSet)"
    wait_for "the Ray head at ${LWS_LEADER_ADDRESS}:${RAY_PORT}" leader_reachable
    exec ray start --address="${LWS_LEADER_ADDRESS}:${RAY_PORT}" --block --disable-usage-stats
    ;;
  check)
    [[ -n "${LWS_LEADER_ADDRESS:-}" ]] || die "LWS_LEADER_ADDRESS is not set (run under LeaderWorkerSet)"
    leader_reachable
    ;;
  *)
    die "unknown role '${role}': expected leader, worker or check"
    ;;
esac
