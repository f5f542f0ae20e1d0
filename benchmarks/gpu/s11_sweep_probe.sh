#!/usr/bin/env bash
# Session 3 (no vLLM needed): the launch-config sweep again with 256-row tiles, then the
# loop-ceiling probe (pointer loads vs TMA) on the same card.
. benchmarks/gpu/common.sh
nvidia-smi --query-gpu=name --format=csv
timeout 300 python3 benchmarks/sweep_configs.py --out "$RES/sweep2" 2>&1 | grep -v '^{' | tail -40
python3 benchmarks/loop_ceiling.py 2>&1 | tail -9
pack sweep2
