"""Density-matched top-k oracle: the best original-order block selection at a given budget."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pbs_vllm.kernels.block_mask import PBSBlockMask


def topk_oracle_mask(probs: torch.Tensor, budget: PBSBlockMask) -> PBSBlockMask:
    """Per query block and KV head, the `budget.kv_num_blocks` candidate key blocks (original
    order) with the largest dense attention mass, summed over the block's queries and the
    KV head's query-head group.

    probs [Hq, N, N] dense causal probabilities of one whole prompt (one sequence, ctx 0);
    budget: a mask for that prompt (e.g. PBS's), whose block counts, own causal regions and
    candidates (key blocks before own_start) the oracle shares. Returns a PBSBlockMask with
    the identity permutation, so it has exactly the budget's density.
    """
    batch, bs = budget.batch, budget.block_size
    n = probs.shape[-1]
    if len(batch) != 1 or batch.ctx_lens != [0] or batch.q_lens != [n]:
        raise ValueError(
            f"budget mask covers q_lens={batch.q_lens}, ctx_lens={batch.ctx_lens}; the oracle "
            f"needs one whole prompt of {n} tokens (q_lens=[{n}], ctx_lens=[0])"
        )
    hkv, dev = budget.num_kv_heads, budget.kv_num_blocks.device
    nb = -(-n // bs)
    pad = nb * bs - n
    per_kv = probs.unflatten(0, (hkv, -1)).sum(dim=1)  # [Hkv, N, N]
    tiles = F.pad(per_kv, (0, pad, 0, pad)).view(hkv, nb, bs, nb, bs).sum(dim=(2, 4))
    n_cand = budget.own_start.long().cpu() // bs  # [Tq]: blocks wholly before own segment
    not_cand = torch.arange(nb)[None, :] >= n_cand[:, None]
    order = tiles.masked_fill(not_cand, -1.0).argsort(dim=-1, descending=True, stable=True)
    n_sel = budget.kv_num_blocks.long().cpu()  # [Hkv, Tq]
    width = max(int(n_sel.max()), 1) if n_sel.numel() else 1
    chosen = order[..., :width]
    chosen = chosen.masked_fill(torch.arange(width) >= n_sel[..., None], nb).sort(dim=-1).values
    n_perm = budget.perm.shape[1]
    return PBSBlockMask(
        plan=budget.plan,
        segment_size=budget.segment_size,
        own_start=budget.own_start,
        kv_num_blocks=budget.kv_num_blocks,
        kv_indices=chosen.to(device=dev, dtype=torch.int32),
        perm=torch.arange(n_perm, dtype=torch.int32, device=dev).repeat(hkv, 1),
        perm_offset=budget.perm_offset,
    )
