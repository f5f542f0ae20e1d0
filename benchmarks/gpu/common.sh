# Sourced by the session scripts: vLLM from /tmp/site, pbs-vllm installed editable.
set -u
. /tmp/site/env.sh
export PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1
RES=/tmp/results
mkdir -p "$RES"
python3 -m pip show pbs-vllm >/dev/null 2>&1 ||
  python3 -m pip install -q --no-deps --no-build-isolation -e . >"$RES/pip.log" 2>&1
pack() { tar -C /tmp -czf "$OUT/results-$1.tgz" results; ls -la "$OUT"; }
