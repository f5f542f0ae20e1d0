#!/usr/bin/env bash
# Retraining session, call 1 (with transfer vllm-01): train the retrieval model (background).
. benchmarks/gpu/common.sh
rm -rf "$RES"/*
setsid nohup python3 -m training.train --out /tmp/retrieval-llama --minutes 7 \
  >"$RES/train.log" 2>&1 < /dev/null &
sleep 15; tail -2 "$RES/train.log"
