"""Where one layer's PBS prefill call spends its time, host and GPU: torch.profiler tables,
no vLLM.

The last chunk of a `--length` prompt prefilled in `--chunk` chunks (one sequence, shuffled
pages, random bf16), at the Qwen2.5-0.5B shape by default (14 q / 2 KV heads, d 64). After
warm-up, `--calls` calls of `pbs_prefill` run under the profiler; the first table ranks ops
by self CPU time per call (the launches and Python around the kernels, one by one), the
second ranks GPU kernels by device time per call.

    python benchmarks/profile_host.py --length 30k --chunk 16k
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_chunks import paged_cache  # sibling script: run this one as a file, like it
from bench_ttft import parse_length
from torch.profiler import ProfilerActivity, profile

from pbs_vllm.kernels import ChunkBatch, SparsityParams, pbs_prefill, plan_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=parse_length, default=30 * 1024)
    ap.add_argument("--chunk", type=parse_length, default=16 * 1024)
    ap.add_argument("--q-heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--max-kept-fraction", type=float, default=None)
    args = ap.parse_args()

    gen = torch.Generator(device="cuda").manual_seed(0)
    ctx = (args.length - 1) // args.chunk * args.chunk
    q_len = args.length - ctx
    kv = paged_cache(args.length, args.kv_heads, args.head_dim, 16, torch.bfloat16, gen)
    q = torch.randn(
        q_len, args.q_heads, args.head_dim, dtype=torch.bfloat16, device="cuda", generator=gen
    )
    batch = ChunkBatch([q_len], [ctx])
    params = SparsityParams(tau=args.tau, max_kept_fraction=args.max_kept_fraction)
    scale = args.head_dim**-0.5
    plan = plan_for(q, kv, batch, params)  # once per step, as the metadata builder does
    for _ in range(3):
        pbs_prefill(q, kv, batch, params, scale, plan=plan)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        pbs_prefill(q, kv, batch, params, scale, plan=plan)
    host_ms = (time.perf_counter() - t0) / args.calls * 1e3
    torch.cuda.synchronize()
    gpu_ms = (time.perf_counter() - t0) / args.calls * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            pbs_prefill(q, kv, batch, params, scale, plan=plan)
        torch.cuda.synchronize()
    print(
        f"{torch.cuda.get_device_name()}: chunk {q_len} over ctx {ctx}, "
        f"{args.q_heads}/{args.kv_heads} heads d{args.head_dim}: host {host_ms:.3f} ms/call, "
        f"host+drain {gpu_ms:.3f} ms/call"
    )
    averages = prof.key_averages()
    events = sorted(averages, key=lambda e: -e.self_cpu_time_total)
    print(f"{'host op':60s} {'calls/layer':>11s} {'self us/layer':>13s}")
    for e in events[: args.rows]:
        per = e.self_cpu_time_total / args.calls
        print(f"{e.key[:60]:60s} {e.count / args.calls:11.1f} {per:13.1f}")
    gpu = [e for e in averages if str(e.device_type).endswith("CUDA") and _device_us(e) > 0]
    gpu.sort(key=lambda e: -_device_us(e))
    total = sum(_device_us(e) for e in gpu) / args.calls
    print(f"{'GPU kernel':60s} {'calls/layer':>11s} {'us/layer':>13s}  (total {total:.1f} us)")
    for e in gpu[: args.rows]:
        per = _device_us(e) / args.calls
        print(f"{e.key[:60]:60s} {e.count / args.calls:11.1f} {per:13.1f}")


def _device_us(event) -> float:
    """Self device time of a profiler average (the attribute's name varies by torch)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return getattr(event, name)
    return 0.0


if __name__ == "__main__":
    main()
