"""`plan_step`: build everything a step's PBS work derives from its batch, before any layer.

The step's `ChunkBatch` caches these plans (`ChunkBatch.derived`); building them up front
(the metadata builder calls this once per step) keeps host-to-device uploads out of the
layers, and out of a captured CUDA graph (`pbs_vllm.kernels.graphs`), where an upload
would replay from a host buffer that has since been reused.

  estimation   query blocks on the device, the estimate plan (permuted-region offsets,
               own-segment starts, kept-ids width)
  fa3 route    the varlen plan (scratch pages, cu_seqlens of the query blocks, tail rows)
  triton       nothing more: its tile table is built on first use
"""

from __future__ import annotations

import torch

from pbs_vllm.kernels.block_mask import QueryBlocks
from pbs_vllm.kernels.estimate import _EstimatePlan
from pbs_vllm.kernels.inputs import permuted_region_lengths
from pbs_vllm.kernels.paged import ChunkBatch
from pbs_vllm.kernels.params import SparsityParams
from pbs_vllm.kernels.varlen import VarlenPlan

ATTENTION_ROUTES = ("fa3", "triton")


def has_permuted_region(batch: ChunkBatch, params: SparsityParams) -> bool:
    """Whether estimation builds a sparse mask for `batch` (else the dense mask, which
    attends straight from the cache)."""
    return any(permuted_region_lengths(batch, params.segment_size))


def plan_step(
    batch: ChunkBatch, params: SparsityParams, device: torch.device | str, attention: str
) -> None:
    """Build and cache on `batch` the device plans of its estimation and of the attention
    route `attention` ('fa3' or 'triton'). CPU devices need none (the PyTorch kernels)."""
    if attention not in ATTENTION_ROUTES:
        raise ValueError(f"attention={attention!r}: must be one of {ATTENTION_ROUTES}")
    device = torch.device(device)
    if device.type != "cuda" or not has_permuted_region(batch, params):
        return
    if device.index is None:  # the plans are cached under the tensors' own device name
        device = torch.device("cuda", torch.cuda.current_device())
    QueryBlocks.on(batch, params.block_size, device)
    _EstimatePlan.of(batch, params, device)
    if attention == "fa3":
        VarlenPlan.for_batch(batch, params.block_size, params.segment_size, device)
