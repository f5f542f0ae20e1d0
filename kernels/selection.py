"""Block probabilities and top-p block selection, batched over KV heads and query blocks.

Everything runs as torch ops on the device over padded [Hkv, Tq, C] tensors, where C is the
number of permuted key blocks of the sequence and query block k's candidates are the first
n_cand[k] of them (the blocks of the segments before its own segment).
"""

from __future__ import annotations

import torch

from pbs_vllm.kernels.params import SparsityParams


def density_cap(n_cand: torch.Tensor, max_density: float) -> torch.Tensor:
    """ceil(max_density * n_cand), at least 1; float64 with a rounding guard (0.3 * 10 -> 3)."""
    return torch.ceil(n_cand.double() * max_density - 1e-9).long().clamp_(min=1)


def block_probs(
    q_pool: torch.Tensor, k_pool: torch.Tensor, n_cand: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax over each query block's candidates of pooled q.k * scale, mean over the group.

    q_pool [Hq, Tq, E] pooled query blocks, k_pool [Hkv, C, E] pooled permuted key blocks,
    n_cand [Tq] int. Returns p [Hkv, Tq, C] fp32, zero outside the candidates (rows with no
    candidate are all zero).
    """
    hq, tq, e = q_pool.shape
    hkv, c, _ = k_pool.shape
    group = hq // hkv
    q_rows = q_pool.reshape(hkv, group * tq, e)
    logits = torch.bmm(q_rows, k_pool.transpose(1, 2)).view(hkv, group, tq, c)
    not_cand = torch.arange(c, device=n_cand.device)[None, :] >= n_cand[:, None]
    logits.mul_(scale).masked_fill_(not_cand, float("-inf"))
    # in-place softmax: at long contexts logits is the largest tensor of the estimation
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    logits.div_(logits.sum(dim=-1, keepdim=True)).nan_to_num_(0.0)
    return logits.mean(dim=1)


def select_blocks(
    p: torch.Tensor, n_cand: torch.Tensor, sink_block: torch.Tensor, params: SparsityParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the smallest prefix of candidates by descending p whose mass reaches tau.

    p [Hkv, Tq, C] from `block_probs`, n_cand [Tq], sink_block [Hkv] (permuted block of
    original token 0, forced when params.keep_sink and the row has candidates). With
    params.max_density at most density_cap(n_cand) blocks are kept, the sink included.
    Returns kv_num_blocks [Hkv, Tq] int32 and kv_indices [Hkv, Tq, C] int32 (selected ids
    ascending, then padding C).
    """
    c = p.shape[-1]
    vals, order = p.sort(dim=-1, descending=True, stable=True)
    n = n_cand.long()[None, :]
    if params.tau >= 1.0:
        n_keep = n.expand(p.shape[:2])
    else:
        # keep rank i while the mass before it is < tau: 1 + #{j: cumsum[j] < tau}
        below = vals.cumsum_(dim=-1) < params.tau  # in place: vals is not needed after
        n_keep = torch.minimum(below.sum(dim=-1) + 1, n)
    del vals  # the [Hkv, Tq, C] temporaries dominate peak memory at long contexts
    cap = n
    if params.max_density is not None:
        cap = density_cap(n, params.max_density)
        n_keep = torch.minimum(n_keep, cap)
    rank = torch.arange(c, device=p.device)
    if params.keep_sink:
        # the sink replaces the last kept block when it falls outside the prefix at the cap
        sink_rank = (order == sink_block.view(-1, 1, 1)).to(torch.uint8).argmax(dim=-1)
        n_keep = torch.where(sink_rank < n_keep, n_keep, torch.minimum(n_keep, cap - 1))
        keep_sorted = (rank < n_keep[..., None]) | (
            (rank == sink_rank[..., None]) & (n > 0)[..., None]
        )
    else:
        keep_sorted = rank < n_keep[..., None]
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    del order, keep_sorted
    ids = torch.where(keep, rank.int(), c).sort(dim=-1).values
    return keep.sum(dim=-1, dtype=torch.int32), ids
