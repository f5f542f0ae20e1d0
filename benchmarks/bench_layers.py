"""The PBS work of one prefill step over all of a model's layers: eager launches against
step graphs (`pbs_vllm.kernels.graphs`), without vLLM's model around it.

Each layer has its own paged cache (same block table, fresh structured keys, so tau keeps
a realistic fraction); a step estimates and attends every layer through FA3. `eager`
launches every kernel from Python per layer; `graphs` captures the work at the first layer
(a new capture per step, as in serving) and replays it for the others; `stock` attends
every layer with one FA3 call over the paged cache (what FLASH_ATTN runs). Reported per
step: host ms (Python and launches, the GPU left to run), wall ms (to the end of the GPU
work), host ms per layer, and the wall ms the routing's cost model predicts for the step
(`pbs_vllm.backend.cost`, at the measured density; "-" on a GPU without rates), which this
benchmark is also the check of. On a small model the host, not the GPU, sets the pace;
this is the number the graphs are for.

    python benchmarks/bench_layers.py --length 30k --chunk 16k --layers 24   # Qwen2.5-0.5B
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_ttft import parse_length  # sibling script: run this one as a file, like it

from pbs_vllm.backend.cost import CostModel, StepWork, rates_for
from pbs_vllm.kernels import ChunkBatch, PagedKV, SparsityParams, prefill_mask
from pbs_vllm.kernels.graphs import StepGraphs, capture_prefill
from pbs_vllm.kernels.plan import plan_for
from pbs_vllm.kernels.varlen import pbs_attention_varlen
from pbs_vllm.testing import structured_qkv


def layer_inputs(layers, n, q_len, hq, hkv, d, page, gen):
    """Per layer: (q [q_len, Hq, D] of the last q_len positions, PagedKV of n keys)."""
    n_pages = -(-n // page)
    table = torch.randperm(n_pages, device="cuda", generator=gen).to(torch.int32)[None]
    out = []
    for _ in range(layers):
        q, k, v = structured_qkv(n, hq, hkv, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        kc = torch.empty(n_pages * page, hkv, d, dtype=k.dtype, device="cuda")
        vc = torch.empty_like(kc)
        rows = (table[0].long()[:, None] * page + torch.arange(page, device="cuda")).flatten()[:n]
        kc[rows], vc[rows] = k, v
        kv = PagedKV(kc.view(n_pages, page, hkv, d), vc.view(n_pages, page, hkv, d), table)
        out.append((q[n - q_len :].contiguous(), kv))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", default="30k")
    ap.add_argument("--chunk", default="16k")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--q-heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

    def fa3(*a, **kw):
        return flash_attn_varlen_func(*a, **kw, fa_version=3)

    n, chunk = parse_length(args.length), parse_length(args.chunk)
    q_len = n - (n - 1) // chunk * chunk  # the last chunk of the prompt
    batch = ChunkBatch([q_len], [n - q_len])
    params = SparsityParams(tau=args.tau)
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = layer_inputs(args.layers, n, q_len, hq, hkv, d, 16, gen)
    outs = [torch.empty_like(q) for q, _ in inputs]

    def attend(q, kv, mask, scale, out):
        pbs_attention_varlen(q, kv, mask, scale, fa3, out=out)

    def eager_step(plan) -> None:
        for (q, kv), out in zip(inputs, outs, strict=True):
            mask = prefill_mask(q, kv, plan.batch, params, scale, plan=plan)
            pbs_attention_varlen(q, kv, mask, scale, fa3, out=out)

    def graph_step(plan) -> None:
        g = StepGraphs(q_len, hq, d, torch.bfloat16, "cuda")
        for i, ((q, kv), out) in enumerate(zip(inputs, outs, strict=True)):
            g.bind(q, kv.key_cache, kv.value_cache)
            if i == 0:
                capture_prefill(g, kv.block_table, plan, params, scale, attend)
            g.replay("estimate")
            g.replay("attend")
            out.copy_(g.out)

    def stock_step(plan) -> None:
        mask = plan.dense_mask()
        for (q, kv), out in zip(inputs, outs, strict=True):
            pbs_attention_varlen(q, kv, mask, scale, fa3, out=out)

    rows = []
    density = None
    for name, step in (("eager", eager_step), ("graphs", graph_step), ("stock", stock_step)):
        host, wall = [], []
        for rep in range(args.reps + 1):
            b = ChunkBatch(list(batch.q_lens), list(batch.ctx_lens))  # a new step
            dense = name == "stock"
            plan = plan_for(inputs[0][0], inputs[0][1], b, params, "fa3", dense=dense)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(plan)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if rep:  # the first rep compiles and warms up
                host.append((t1 - t0) * 1e3)
                wall.append((t2 - t0) * 1e3)
        check = [out.float().clone() for out in outs[:2]]
        if density is None and name != "stock":
            mask = prefill_mask(inputs[0][0], inputs[0][1], b, params, scale, plan=plan)
            density = mask.density()
        rows.append((name, statistics.median(host), statistics.median(wall), check))
    same = all(torch.equal(a, b) for a, b in zip(rows[0][3], rows[1][3], strict=True))
    rates = rates_for(torch.cuda.get_device_name())
    model = CostModel(rates, hq, hkv, d) if rates is not None else None
    work = StepWork.of([(batch.q_lens, batch.ctx_lens, False)])
    predicted = {}
    if model is not None:
        predicted = {
            "eager": args.layers * model.pbs_ms(work, density, "fa3"),
            "graphs": args.layers * model.pbs_ms(work, density, "fa3", graphs=True),
            "stock": args.layers * model.stock_ms(work),
        }
        above = model.switch_above(work, "fa3")
    print(
        f"{torch.cuda.get_device_name()}: {args.layers} layers, {q_len} queries over "
        f"{n - q_len} keys, {hq} q / {hkv} KV heads, d {d}, tau {args.tau} (density "
        f"{density:.3f}); outputs identical eager vs graphs: {same}"
        + (f"; cost model's break-even density {above:.2f}" if model is not None else "")
    )
    print("| mode | host ms / step | wall ms / step | predicted wall ms / step | host ms / layer |")
    print("|---|---:|---:|---:|---:|")
    for name, h, w, _ in rows:
        p = f"{predicted[name]:.2f}" if name in predicted else "-"
        print(f"| {name} | {h:.2f} | {w:.2f} | {p} | {h / args.layers:.3f} |")


if __name__ == "__main__":
    main()
