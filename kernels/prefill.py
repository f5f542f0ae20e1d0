"""`pbs_prefill`: estimate the PBS mask of a chunk batch and run block-sparse attention
(`prefill_mask` alone: the estimation half).

This is the entry point of the vLLM backend for the prefill part of a batch. Estimation
runs under the `torch.profiler` range "pbs_estimate" (attention: "pbs_attention").
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from pbs_vllm.kernels.attention import pbs_attention
from pbs_vllm.kernels.block_mask import PBSBlockMask
from pbs_vllm.kernels.estimate import build_block_mask
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
from pbs_vllm.kernels.params import SparsityParams
from pbs_vllm.kernels.plan import PrefillPlan, has_permuted_region, plan_for


def prefill_mask(
    q: torch.Tensor,
    kv: PagedKV,
    batch: ChunkBatch,
    params: SparsityParams,
    scale: float,
    dense: bool = False,
    plan: PrefillPlan | None = None,
) -> PBSBlockMask:
    """The block mask `pbs_prefill` attends with (estimation only; arguments as there).

    plan: the run's `PrefillPlan`, built with the same `dense` (the serving path builds it
    once per step); None builds one on the fly.
    """
    with record_function("pbs_estimate"):
        if plan is None:
            plan = plan_for(q, kv, batch, params, dense=dense)
        elif plan.dense != dense:
            raise ValueError(f"dense={dense}, but the plan was built with dense={plan.dense}")
        if dense or not has_permuted_region(batch, params):
            plan.check(batch, params, q.device, kv.num_kv_heads)
            return plan.dense_mask()
        return build_block_mask(q, kv, batch, params, scale, plan)


def pbs_prefill(
    q: torch.Tensor,
    kv: PagedKV,
    batch: ChunkBatch,
    params: SparsityParams,
    scale: float,
    out: torch.Tensor | None = None,
    dense: bool = False,
    plan: PrefillPlan | None = None,
) -> tuple[torch.Tensor, PBSBlockMask]:
    """Causal attention of q [T, Hq, D] over the paged cache; returns (out [T, Hq, D], mask).

    The mask is PBS-sparse, or the full causal mask (`PrefillPlan.dense_mask`) when `dense`
    is set or no sequence reaches past its first segment (nothing to permute or skip).
    plan: as for `prefill_mask`.
    """
    mask = prefill_mask(q, kv, batch, params, scale, dense, plan)
    return pbs_attention(q, kv, mask, scale, out=out), mask
