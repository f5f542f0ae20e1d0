"""One attention layer of a chunked prefill, as vLLM runs it, without vLLM.

A prompt of `--length` tokens is prefilled in chunks of `--chunk` tokens over a paged cache
(shuffled pages, random bf16 keys and values). For every chunk and setting it reports the
GPU time of PBS estimation (`build_block_mask`) and of the attention kernel, the host time
of one `pbs_prefill` call (what the CPU spends launching it: hidden behind the GPU as long
as nothing synchronises), the estimation's peak extra memory and the achieved density.
Before timing it checks that `pbs_prefill` does not synchronise the stream
(`torch.cuda.set_sync_debug_mode("error")`; column `sync`).

    python benchmarks/bench_chunks.py --length 128k --chunk 16k --out results/

Sum the per-chunk columns and multiply by the layer count to compare with an end-to-end
TTFT (`bench_ttft.py`): what is left is linear layers and framework time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_ttft import parse_length  # sibling script: run this one as a file, like it
from triton.testing import do_bench

from pbs_vllm.kernels import (
    ChunkBatch,
    PagedKV,
    SparsityParams,
    build_block_mask,
    pbs_attention,
    pbs_prefill,
    plan_for,
)

SETTINGS = {
    "tau0.9": SparsityParams(tau=0.9),
    "d10": SparsityParams(tau=1.0, max_kept_fraction=0.1),
}


def paged_cache(n_keys: int, hkv: int, d: int, page: int, dtype, gen) -> PagedKV:
    """A cache of shuffled pages holding n_keys random keys/values of one sequence."""
    n_pages = -(-n_keys // page)
    kc = torch.randn(n_pages, page, hkv, d, dtype=dtype, device="cuda", generator=gen)
    vc = torch.randn(n_pages, page, hkv, d, dtype=dtype, device="cuda", generator=gen)
    order = torch.randperm(n_pages, device="cuda", generator=gen)
    table = order.to(torch.int32)[None, :].contiguous()
    return PagedKV(kc, vc, table)


def sync_error(q, kv, batch, params, scale, plan) -> str | None:
    """pbs_prefill twice (the second as a later layer of the step would run it) with
    sync-debug 'error' on the second; the error text if it synchronised, else None."""
    pbs_prefill(q, kv, batch, params, scale, plan=plan)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pbs_prefill(q, kv, batch, params, scale, plan=plan)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def chunk_row(q, kv, batch, params, scale) -> dict:
    """GPU ms of estimation and attention (medians), host ms of a layer's call once the
    step's plan is built, peak extra MiB of estimation, density."""
    plan = plan_for(q, kv, batch, params)  # once per step, as the metadata builder does
    sync = sync_error(q, kv, batch, params, scale, plan)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mask = build_block_mask(q, kv, batch, params, scale, plan)
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    est_ms = do_bench(
        lambda: build_block_mask(q, kv, batch, params, scale, plan), return_mode="median"
    )
    attn_ms = do_bench(lambda: pbs_attention(q, kv, mask, scale), return_mode="median")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        pbs_prefill(q, kv, batch, params, scale, plan=plan)
    host_ms = (time.perf_counter() - t0) / 5 * 1e3
    torch.cuda.synchronize()
    return {
        "estimate_ms": est_ms,
        "attention_ms": attn_ms,
        "host_ms": host_ms,
        "estimate_peak_mib": peak_mib,
        "density": mask.density(),
        "sync": sync,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=parse_length, default=128 * 1024)
    ap.add_argument("--chunk", type=parse_length, default=16 * 1024)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    d, scale = args.head_dim, args.head_dim**-0.5
    kv = paged_cache(args.length, args.kv_heads, d, args.page_size, torch.bfloat16, gen)
    rows = []
    for name in args.settings.split(","):
        params = SETTINGS[name]
        for ctx in range(0, args.length, args.chunk):
            n = min(args.chunk, args.length - ctx)
            q = torch.randn(n, args.q_heads, d, dtype=torch.bfloat16, device="cuda", generator=gen)
            row = chunk_row(q, kv, ChunkBatch([n], [ctx]), params, scale)
            rows.append({"setting": name, "ctx": ctx, "q_len": n, **row})
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"{torch.cuda.get_device_name()}, {args.length} tokens in chunks of {args.chunk}, "
        f"{args.q_heads}/{args.kv_heads} heads, d {d}, bf16; one layer",
        "",
        "| setting | chunk start | estimate ms | attention ms | host ms/call | "
        "estimate peak MiB | density | sync |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['ctx'] // 1024}K | {r['estimate_ms']:.2f} | "
            f"{r['attention_ms']:.2f} | {r['host_ms']:.2f} | {r['estimate_peak_mib']:.1f} | "
            f"{r['density']:.3f} | {r['sync'] or 'none'} |"
        )
    for name in args.settings.split(","):
        mine = [r for r in rows if r["setting"] == name]
        lines.append(
            f"\n{name}: per layer, all chunks: estimate "
            f"{sum(r['estimate_ms'] for r in mine):.1f} ms, attention "
            f"{sum(r['attention_ms'] for r in mine):.1f} ms, host "
            f"{sum(r['host_ms'] for r in mine):.1f} ms"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_chunks.md").write_text(text + "\n")
        (args.out / "bench_chunks.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
