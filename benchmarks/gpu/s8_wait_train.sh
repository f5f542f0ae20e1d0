#!/usr/bin/env bash
# Call 2 (after install.sh): make the dummy model, then wait for training to finish.
. benchmarks/gpu/common.sh
make-dummy-llama /tmp/llama8b --layers 32 --hidden 4096 --heads 32 --kv-heads 8 \
  --intermediate 14336 --vocab 128256 --max-len 270000 >/dev/null
while pgrep -f training.train >/dev/null && [ $SECONDS -lt 570 ]; do sleep 2; done
grep -v "^step" "$RES/train.log" | tail -14
grep "^step" "$RES/train.log" | awk '{print $5}' | uniq -c
pack train
