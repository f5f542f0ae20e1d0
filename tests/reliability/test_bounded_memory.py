"""Bounded workspace (GPU): one prefill chunk at the largest supported length allocates at
most the benchmark's stated budget beyond q, the paged K/V cache and the output.

A 16K-token chunk over a 128K-token prefix (32 query / 8 KV heads, head dim 128, bf16,
the paper's B=128, S=256, tau=0.9): estimation workspace plus the block index must stay
within 64 MiB of `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import pytest
import torch

from pbs_vllm.kernels import ChunkBatch, PagedKV, SparsityParams, pbs_prefill

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PREFIX, CHUNK = 128 * 1024, 16 * 1024
Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
BUDGET_BYTES = 64 * 2**20


def test_chunk_at_max_length_stays_within_workspace_budget():
    gen = torch.Generator(device="cuda").manual_seed(11)
    batch = ChunkBatch(q_lens=[CHUNK], ctx_lens=[PREFIX])
    pages = batch.seq_lens[0] // PAGE
    opts = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    key_cache = torch.randn(pages, PAGE, KV_HEADS, HEAD_DIM, **opts)
    value_cache = torch.randn(pages, PAGE, KV_HEADS, HEAD_DIM, **opts)
    order = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32)[None]
    kv = PagedKV(key_cache, value_cache, order)
    q = torch.randn(CHUNK, Q_HEADS, HEAD_DIM, **opts)
    out = torch.full_like(q, float("nan"))
    params = SparsityParams(block_size=128, segment_size=256, tau=0.9)

    pbs_prefill(q, kv, batch, params, HEAD_DIM**-0.5, out=out)  # compile and autotune first
    out.fill_(float("nan"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _, mask = pbs_prefill(q, kv, batch, params, HEAD_DIM**-0.5, out=out)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base

    assert not out.isnan().any()
    assert mask.density() < 1.0  # the sparse path ran, not the dense fallback
    assert extra <= BUDGET_BYTES, f"{extra / 2**20:.1f} MiB over q/k/v/out (budget 64 MiB)"
