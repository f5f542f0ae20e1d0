"""PBS block-mask estimation (spec section 2, steps 1-4, chunked as in section 3).

Per sequence of the batch: Triton key importance over its permuted region, one Triton
launch that sorts every segment into the permutation and writes the attention kernel's
row table and the exact block mass beside it, Triton pooling of the permuted key blocks,
one matmul of pooled scores and one Triton selection over all of its query blocks and KV
heads. `segment_permutation` and `exact_block_mass` are the PyTorch references of the
permutation kernel.
No host-device synchronisation: every size comes from the run's `PrefillPlan` (built on
the host from the ChunkBatch, once per step).
"""

from __future__ import annotations

import torch

from pbs_vllm.kernels.block_mask import PBSBlockMask, RowTable, row_table_key
from pbs_vllm.kernels.block_pool import pool_key_blocks, pool_query_blocks
from pbs_vllm.kernels.importance import key_importance
from pbs_vllm.kernels.inputs import check_prefill_inputs
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV, refuse_cache_offset
from pbs_vllm.kernels.params import SparsityParams
from pbs_vllm.kernels.permute import permute_region
from pbs_vllm.kernels.plan import PrefillPlan, plan_for
from pbs_vllm.kernels.selection import select_into


def segment_permutation(scores: torch.Tensor, segment_size: int) -> torch.Tensor:
    """Sort keys inside each segment by descending score, ties by position.

    scores [Hkv, n] (n a multiple of segment_size) -> perm [Hkv, n] int32, perm[h, slot] =
    original position.
    """
    hkv, n = scores.shape
    order = (
        scores.view(hkv, n // segment_size, segment_size)
        .sort(dim=-1, descending=True, stable=True)
        .indices
    )
    order += torch.arange(0, n, segment_size, device=scores.device).view(1, -1, 1)
    return order.view(hkv, n).int()


def exact_block_mass(scores: torch.Tensor, perm: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention mass of the scoring queries per permuted key block, normalised.

    scores [Hkv, n] key importance, perm [Hkv, n] -> [Hkv, n // block_size] summing to 1
    per head (all zero if every key's mass underflowed: the selection then keeps all).
    """
    hkv, n = perm.shape
    mass = scores.gather(1, perm.long()).view(hkv, n // block_size, block_size).sum(-1)
    return mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)


def estimation_plan(
    q: torch.Tensor,
    kv: PagedKV,
    batch: ChunkBatch,
    params: SparsityParams,
    plan: PrefillPlan | None,
) -> PrefillPlan:
    """`plan` checked against the inputs (ValueError naming the values), or a plan built
    on the fly when None; it must hold the estimation plan (built with dense=False)."""
    if plan is None:
        return plan_for(q, kv, batch, params)
    check_prefill_inputs(q, kv, batch)
    plan.check(batch, params, q.device, kv.num_kv_heads)
    if plan.estimate is None:
        raise ValueError("plan was built with dense=True: it has no estimation plan")
    return plan


def build_block_mask(
    q: torch.Tensor,
    kv: PagedKV,
    batch: ChunkBatch,
    params: SparsityParams,
    scale: float,
    plan: PrefillPlan | None = None,
) -> PBSBlockMask:
    """PBS block mask of q [T, Hq, D] (rows in batch order) over the paged cache.

    Each sequence's permuted region is the whole segments before its last query's segment;
    query blocks of sequences without one get no permuted blocks (dense own segment only).
    With params.exact_last_block the sequence's last query block (whose candidates are the
    whole permuted region) selects by `exact_block_mass` instead of pooled scores.
    plan: the run's `PrefillPlan` (the serving path builds it once per step); None builds
    one on the fly.
    """
    from pbs_vllm.kernels.cpu import build_block_mask_torch, use_torch_kernels

    if use_torch_kernels(q):  # CPU tensors: vectorized PyTorch (PBS_VLLM_CPU_KERNELS)
        refuse_cache_offset(kv, "the PyTorch estimation")
        return build_block_mask_torch(q, kv, batch, params, scale, plan)
    plan = estimation_plan(q, kv, batch, params, plan)
    bs, ss, hkv, dev = params.block_size, params.segment_size, kv.num_kv_heads, q.device
    stride = params.antidiagonal_stride if params.scoring == "antidiagonal" else 1
    qb, est, blocks_per_seq = plan.qblocks, plan.estimate, plan.blocks_per_seq
    n_perm, offsets, width = est.n_perm, est.offsets, est.width

    i32 = dict(dtype=torch.int32, device=dev)
    perm = torch.empty(hkv, offsets[-1], **i32)
    rows = torch.empty(hkv, offsets[-1], **i32)
    # Query blocks of a sequence without a permuted region select nothing: only then does
    # kv_num_blocks need zeros (the selection kernel writes every other entry).
    alloc = torch.zeros if not all(n_perm) else torch.empty
    kv_num_blocks = alloc(hkv, len(qb), **i32)
    kv_indices = torch.empty(hkv, len(qb), width, **i32)
    q_pool = pool_query_blocks(q, qb, bs, stride) if any(n_perm) else None
    exact_last = params.exact_last_block and params.permute
    k0 = 0
    for b, n in enumerate(n_perm):
        k1 = k0 + blocks_per_seq[b]
        if n:
            scores = mass = None
            if params.permute:
                q_end, nq = batch.cu_seqlens_q[b + 1], min(bs, batch.q_lens[b])
                q_pos = batch.seq_lens[b] - nq
                scores = key_importance(q[q_end - nq : q_end], kv, b, q_pos, n, scale)
            if exact_last:
                mass = torch.empty(hkv, n // bs, dtype=torch.float32, device=dev)
            bt_row = kv.block_table[b]
            permute_region(scores, bt_row, kv.page_size, perm, rows, offsets[b], n, ss, bs, mass)
            perm_b = perm[:, offsets[b] : offsets[b] + n]
            k_pool = pool_key_blocks(kv, b, perm_b, bs, stride)
            logits = torch.bmm(q_pool[:, k0:k1].reshape(hkv, -1, q_pool.shape[-1]), k_pool.mT)
            del k_pool  # bound peak memory: the selection temporaries come next
            select_into(
                logits,
                qb.pos[k0:k1],
                perm_b,
                mass,
                kv_num_blocks[:, k0:k1],
                kv_indices[:, k0:k1],
                params,
                scale,
                params.dense_from(batch.ctx_lens[b], batch.seq_lens[b]),
            )
        k0 = k1
    # The permutation kernel wrote the attention kernel's row table for this block table.
    key = row_table_key(kv.block_table, kv.page_size)
    return PBSBlockMask(
        plan=plan,
        segment_size=ss,
        own_start=est.own_start,
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        perm=perm,
        perm_offset=est.perm_offset,
        row_table=RowTable(kv.block_table, key, rows),
    )
