#!/usr/bin/env bash
# Sourced by the session scripts: vLLM from /tmp/site (once staged), pbs-vllm installed
# editable, pytest from the carried wheels in .whl/ if the GPU host lacks it.
set -u
[ -f /tmp/site/env.sh ] && . /tmp/site/env.sh
export PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1
RES=/tmp/results
mkdir -p "$RES"
python3 -m pip show pbs-vllm >/dev/null 2>&1 ||
  python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$RES/pip.log" 2>&1
python3 -c "import pytest, hypothesis, pytest_timeout" 2>/dev/null ||
  python3 -m pip install -q --no-index --find-links .whl pytest hypothesis pytest-timeout \
    >>"$RES/pip.log" 2>&1
# Only files under 1 MiB travel back (files over ~6 MiB in $OUT do not come back at all:
# session 11 lost a whole step's tarball to the engines' outputs.jsonl and logs).
small_tar() { (cd /tmp && find results -type f -size -1024k | tar -czf "$1" -T -); }
pack() { small_tar "$OUT/results-$1.tgz"; ls -la "$OUT"; }
# While a step runs, /tmp/results is mirrored into $OUT/live.tgz every 20 s (written aside
# under a name of this process, then renamed), so a call cut off by its time limit still
# returns what its steps wrote. The mirror stops with the script that started it, also when
# `timeout` stops that one with SIGTERM (an EXIT trap alone does not run then), and a
# TERM/INT stops the script's background jobs too (ruler-par's engines), so no orphan keeps
# the call running past its steps.
if [ -n "${OUT:-}" ] && [ -z "${PBS_LIVE_MIRROR:-}" ]; then
  export PBS_LIVE_MIRROR=1
  parent=$$
  (while sleep 20; do
    kill -0 "$parent" 2>/dev/null || exit 0
    small_tar "$OUT/.live-$parent.tgz" 2>/dev/null &&
      mv "$OUT/.live-$parent.tgz" "$OUT/live.tgz"
  done) &
  mirror_pid=$!
  trap 'kill $mirror_pid 2>/dev/null' EXIT
fi
trap 'trap - TERM INT; kill $(jobs -p) 2>/dev/null; pkill -TERM -P $$ 2>/dev/null; exit 143' TERM INT
