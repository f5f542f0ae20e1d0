"""Validation and segment geometry of prefill inputs, shared by the mask builders."""

from __future__ import annotations

import torch

from pbs_vllm.kernels.paged import ChunkBatch, PagedKV


def check_prefill_inputs(q: torch.Tensor, kv: PagedKV, batch: ChunkBatch) -> int:
    """Check q [T, Hq, D] against the cache and the batch; return the GQA group size Hq/Hkv."""
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, q_heads, head_dim], got shape {tuple(q.shape)}")
    tokens, hq, d = q.shape
    if tokens != sum(batch.q_lens):
        raise ValueError(f"q has {tokens} tokens but batch.q_lens sums to {sum(batch.q_lens)}")
    if d != kv.head_dim:
        raise ValueError(f"q head_dim={d} differs from the cache head_dim={kv.head_dim}")
    if hq % kv.num_kv_heads:
        raise ValueError(f"q_heads={hq} is not a multiple of kv_heads={kv.num_kv_heads}")
    if kv.block_table.shape[0] < len(batch):
        raise ValueError(
            f"block_table has {kv.block_table.shape[0]} rows for a batch of {len(batch)} sequences"
        )
    pages_needed = -(-max(batch.seq_lens) // kv.page_size)
    if kv.block_table.shape[1] < pages_needed:
        raise ValueError(
            f"block_table has {kv.block_table.shape[1]} pages per sequence, the longest sequence "
            f"({max(batch.seq_lens)} keys) needs {pages_needed}"
        )
    return hq // kv.num_kv_heads


def permuted_region_lengths(batch: ChunkBatch, segment_size: int) -> list[int]:
    """Keys in each sequence's permuted region: the whole segments before its last query's."""
    return [(n - 1) // segment_size * segment_size for n in batch.seq_lens]
