#!/usr/bin/env bash
# pbs-vllm-serve MODEL [VLLM_SERVE_OPTIONS...]
# The image's entrypoint: `vllm serve` with the PBS attention backend. It adds
# `--attention-backend pbs` unless the options already choose a backend, so the same image
# can also serve a dense baseline (e.g. `--attention-backend FLASH_ATTN`) for comparison.
set -euo pipefail

for arg in "$@"; do
  case "${arg}" in
    --attention-backend | --attention-backend=*) exec vllm serve "$@" ;;
  esac
done
exec vllm serve "$@" --attention-backend pbs
