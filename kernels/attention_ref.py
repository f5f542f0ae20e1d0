"""Plain PyTorch reference of PBS attention (float32 compute), for tests and debugging."""

from __future__ import annotations

import torch

from pbs_vllm.kernels.block_mask import PBSBlockMask
from pbs_vllm.kernels.paged import PagedKV


def gather_sequence_kv(kv: PagedKV, seq: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, Hkv, D] of sequence `seq`, in original order."""
    pos = torch.arange(seq_len, device=kv.block_table.device)
    pages = kv.block_table[seq, pos // kv.page_size].long()
    slots = pos % kv.page_size
    return kv.key_cache[pages, slots], kv.value_cache[pages, slots]


def pbs_attention_ref(
    q: torch.Tensor, kv: PagedKV, mask: PBSBlockMask, scale: float
) -> torch.Tensor:
    """Same semantics as `pbs_attention`: out [T, Hq, D] in q's dtype.

    Per sequence: gather its keys from the pages, build the token mask with
    `mask.to_dense`, and take a masked softmax in float32.
    """
    out = torch.empty_like(q)
    group = q.shape[1] // kv.num_kv_heads
    starts = mask.batch.cu_seqlens_q
    for b, seq_len in enumerate(mask.batch.seq_lens):
        k, v = (
            x.float().repeat_interleave(group, dim=1) for x in gather_sequence_kv(kv, b, seq_len)
        )
        qs = q[starts[b] : starts[b + 1]].float()  # [q_len, Hq, D]
        allowed = mask.to_dense(b).repeat_interleave(group, dim=0)  # [Hq, q_len, seq_len]
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out[starts[b] : starts[b + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out
