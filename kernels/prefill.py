"""`pbs_prefill`: estimate the PBS mask of a chunk batch and run block-sparse attention
(`prefill_mask` alone: the estimation half).

This is the entry point of the vLLM backend for the prefill part of a batch. Estimation
runs under the `torch.profiler` range "pbs_estimate" (attention: "pbs_attention").
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from pbs_vllm.kernels.attention import pbs_attention
from pbs_vllm.kernels.block_mask import PBSBlockMask, dense_block_mask
from pbs_vllm.kernels.estimate import build_block_mask
from pbs_vllm.kernels.inputs import permuted_region_lengths
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
from pbs_vllm.kernels.params import SparsityParams


def prefill_mask(
    q: torch.Tensor,
    kv: PagedKV,
    batch: ChunkBatch,
    params: SparsityParams,
    scale: float,
    dense: bool = False,
) -> PBSBlockMask:
    """The block mask `pbs_prefill` attends with (estimation only; arguments as there)."""
    with record_function("pbs_estimate"):
        if dense or not any(permuted_region_lengths(batch, params.segment_size)):
            return dense_block_mask(batch, params.block_size, kv.num_kv_heads, q.device)
        return build_block_mask(q, kv, batch, params, scale)


def pbs_prefill(
    q: torch.Tensor,
    kv: PagedKV,
    batch: ChunkBatch,
    params: SparsityParams,
    scale: float,
    out: torch.Tensor | None = None,
    dense: bool = False,
) -> tuple[torch.Tensor, PBSBlockMask]:
    """Causal attention of q [T, Hq, D] over the paged cache; returns (out [T, Hq, D], mask).

    The mask is PBS-sparse, or the full causal `dense_block_mask` when `dense` is set or
    no sequence reaches past its first segment (nothing to permute or skip).
    """
    mask = prefill_mask(q, kv, batch, params, scale, dense)
    return pbs_attention(q, kv, mask, scale, out=out), mask
