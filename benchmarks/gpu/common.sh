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
pack() { tar -C /tmp -czf "$OUT/results-$1.tgz" results; ls -la "$OUT"; }
# While a step runs, /tmp/results is mirrored into $OUT/live.tgz every 20 s (written aside,
# then renamed), so a call cut off by its time limit still returns what its steps wrote.
if [ -n "${OUT:-}" ] && [ -z "${PBS_LIVE_MIRROR:-}" ]; then
  export PBS_LIVE_MIRROR=1
  (while sleep 20; do
    tar -C /tmp -czf "$OUT/.live.tgz" results 2>/dev/null && mv "$OUT/.live.tgz" "$OUT/live.tgz"
  done) &
  mirror_pid=$!
  trap 'kill $mirror_pid 2>/dev/null' EXIT
fi
