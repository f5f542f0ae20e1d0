"""Launch-configuration sweep of the PBS kernels on one chunk of a long prefill (GPU only).

The last 16K chunk over a 112K prefix (and a 16K chunk over 48K), Llama-3.1-8B attention
shape (32 / 8 heads, d 128, bf16, page 16, block 128, segment 256), mask estimated at a 10%
kept-fraction cap (`max_kept_fraction` 0.1). It times, side by side in one process:
  - the attention kernel for the query-tile heights (BLOCK_M 128 / 256) x key tile x
    warps x stages, each output checked against the autotuned default's and poisoned
    beforehand, and the default with no selected blocks (the own causal region alone);
  - key importance (the estimation's largest part) for several tile shapes, checked against
    the current default's scores;
  - dense causal SDPA (cuDNN or flash) on the same chunk as the card's anchor.
TFLOP/s count computed (query, key) pairs only.

    python benchmarks/sweep_configs.py --out results/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from bench_chunks import paged_cache  # sibling scripts: run this one as a file, like them
from bench_kernels import attended_pairs
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

from pbs_vllm.kernels import ChunkBatch, SparsityParams, build_block_mask, plan_for
from pbs_vllm.kernels import attention as attention_mod
from pbs_vllm.kernels.importance import key_importance

HQ, HKV, D, PAGE = 32, 8, 128, 16
PARAMS = SparsityParams(block_size=128, segment_size=256, tau=1.0, max_kept_fraction=0.1)
CASES = [(112 * 1024, 16 * 1024), (48 * 1024, 16 * 1024)]
ATTN_CONFIGS = [
    (128, triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3)),
    *((256, triton.Config({"BLOCK_N": 64}, num_warps=16, num_stages=s)) for s in (2, 3, 4)),
]
# (block_m, block_n, num_warps, num_stages, split_len)
IMPORTANCE_CONFIGS = [
    (64, 64, 4, 2, 4096),
    (64, 64, 4, 3, 4096),
    (64, 64, 4, 2, 2048),
    (128, 64, 8, 2, 2048),
]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def attention_rows(q, kv, batch, mask, scale, label) -> list[dict]:
    """Every attention config on one mask: ms, TFLOP/s, error vs the autotuned default."""
    flops = 4 * D * (HQ // HKV) * attended_pairs(mask)
    ref = attention_mod.pbs_attention(q, kv, mask, scale)
    rows = [{"case": label, "config": "default (autotuned)"}]
    rows[0]["ms"] = do_bench(lambda: attention_mod.pbs_attention(q, kv, mask, scale))
    for block_m, cfg in ATTN_CONFIGS:
        name = f"M{block_m} N{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"
        out = torch.full_like(q, float("nan"))

        def run(out=out, block_m=block_m, cfg=cfg):
            return attention_mod._pbs_attention(q, kv, mask, scale, out, False, block_m, cfg)

        try:
            run()
            err = rel_err(out, ref)
            ms = do_bench(run)
        except Exception as e:  # out of resources for this config: record and go on
            rows.append({"case": label, "config": name, "error": str(e).splitlines()[0][:120]})
            continue
        rows.append({"case": label, "config": name, "ms": ms, "rel_err": err})
    for r in rows:
        if "ms" in r:
            r["tflops"] = flops / r["ms"] / 1e9
        print(json.dumps(r), flush=True)
    return rows


def own_region_row(q, kv, mask, scale, label) -> dict:
    """The default kernel with no selected blocks: the own causal region's share."""
    own_only = dataclasses.replace(mask, kv_num_blocks=torch.zeros_like(mask.kv_num_blocks))
    flops = 4 * D * (HQ // HKV) * attended_pairs(own_only)
    ms = do_bench(lambda: attention_mod.pbs_attention(q, kv, own_only, scale))
    row = {"case": label, "config": "default, own region only", "ms": ms}
    row["tflops"] = flops / ms / 1e9
    print(json.dumps(row), flush=True)
    return row


def importance_rows(q, kv, ctx, label, scale) -> list[dict]:
    """Key importance of the chunk's last 128 queries over the permuted region."""
    n_keys = (ctx + q.shape[0]) // 256 * 256 - 256
    q_last, q_pos = q[-128:], ctx + q.shape[0] - 128
    ref = key_importance(q_last, kv, 0, q_pos, n_keys, scale)
    rows = []
    for bm, bn, w, s, split in IMPORTANCE_CONFIGS:
        tiles = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s, split_len=split)

        def run(tiles=tiles):
            return key_importance(q_last, kv, 0, q_pos, n_keys, scale, **tiles)

        try:
            err = rel_err(run(), ref)
            ms = do_bench(run)
        except Exception as e:
            rows.append({"case": label, "config": tiles, "error": str(e).splitlines()[0][:120]})
            continue
        rows.append({"case": label, "config": tiles, "ms": ms, "rel_err": err})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cudnn_row(q, kv, ctx, label, scale) -> dict:
    """Dense causal SDPA of the chunk over contiguous K/V (the card's anchor)."""
    n = ctx + q.shape[0]
    pages = kv.block_table[0, : n // PAGE].long()
    k = kv.key_cache[pages].reshape(n, HKV, D).transpose(0, 1)
    v = kv.value_cache[pages].reshape(n, HKV, D).transpose(0, 1)
    qt = q.transpose(0, 1)[None]  # [1, Hq, n, D]: SDPA's fused kernels want 4-D
    # bottom-right causal: query i (absolute ctx + i) sees keys [0, ctx + i]
    bias = causal_lower_right(q.shape[0], n)
    k, v = (x.repeat_interleave(HQ // HKV, 0)[None] for x in (k, v))
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            ms = do_bench(
                lambda: F.scaled_dot_product_attention(qt, k, v, attn_mask=bias, scale=scale)
            )
    except RuntimeError as e:  # no fused kernel for this shape: the sweep goes on without
        return {"case": label, "config": "SDPA dense", "error": str(e).splitlines()[0][:120]}
    pairs = q.shape[0] * ctx + q.shape[0] * (q.shape[0] + 1) // 2
    row = {
        "case": label,
        "config": "SDPA dense (cuDNN / flash)",
        "ms": ms,
        "tflops": 4 * D * HQ * pairs / ms / 1e9,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(1)
    scale = D**-0.5
    kv = paged_cache(128 * 1024, HKV, D, PAGE, torch.bfloat16, gen)
    rows = []
    for ctx, n in CASES:
        label = f"{n // 1024}K over {ctx // 1024}K"
        q = torch.randn(n, HQ, D, dtype=torch.bfloat16, device="cuda", generator=gen)
        batch = ChunkBatch([n], [ctx])
        mask = build_block_mask(q, kv, batch, PARAMS, scale, plan_for(q, kv, batch, PARAMS))
        rows.append(cudnn_row(q, kv, ctx, label, scale))
        rows += attention_rows(q, kv, batch, mask, scale, label)
        rows.append(own_region_row(q, kv, mask, scale, label))
        rows += importance_rows(q, kv, ctx, label, scale)
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}",
        "",
        "| case | config | ms | TFLOP/s | rel err vs default |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        cfg = r["config"] if isinstance(r["config"], str) else json.dumps(r["config"])
        if "error" in r:
            lines.append(f"| {r['case']} | {cfg} | failed: {r['error']} | | |")
            continue
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        lines.append(f"| {r['case']} | {cfg} | {r['ms']:.3f} | {tf} | {err} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep_configs.md").write_text(text + "\n")
        (args.out / "sweep_configs.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
