. benchmarks/gpu/common.sh
nvidia-smi --query-gpu=name --format=csv
timeout 300 python3 benchmarks/sweep_configs.py --out "$RES/sweep2" 2>&1 | grep -v '^{' | tail -40
python3 benchmarks/tma_probe.py 2>&1 | tail -9
pack sweep2
