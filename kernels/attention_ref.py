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


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    max_seqlen_q: int,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_k: int,
    seqused_k: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    block_table: torch.Tensor,
    out: torch.Tensor | None = None,
    return_softmax_lse: bool = False,
):
    """PyTorch reference of the paged varlen flash-attention interface that
    `pbs_vllm.kernels.varlen` calls (FlashAttention's `flash_attn_varlen_func` with
    `block_table` and `seqused_k`), float32 compute.

    q [total_q, H, D] (any strides); k, v [pages, page_size, H_kv, D]; sequence i has
    queries [cu_seqlens_q[i], cu_seqlens_q[i + 1]) and keys [0, seqused_k[i]) on the pages
    block_table[i]; causal is aligned bottom-right (query r of L sees keys up to
    seqused_k - L + r). Writes out [total_q, H, D] in q's dtype; returns it, and with
    return_softmax_lse also the natural-log sum-exp [H, total_q] (float32). Checks the
    sizes the real kernel relies on (max_seqlen_q / max_seqlen_k bound every sequence).
    """
    if out is None:
        out = torch.empty_like(q)
    h, h_kv, ps = q.shape[1], k.shape[2], k.shape[1]
    lse = torch.full((h, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    cu, used = cu_seqlens_q.tolist(), seqused_k.tolist()
    for i, n_k in enumerate(used):
        q0, q1 = cu[i], cu[i + 1]
        if q1 - q0 > max_seqlen_q or n_k > max_seqlen_k:
            raise ValueError(
                f"sequence {i}: {q1 - q0} queries / {n_k} keys exceed max_seqlen_q="
                f"{max_seqlen_q} / max_seqlen_k={max_seqlen_k}"
            )
        if q1 == q0:
            continue
        if n_k == 0:  # no keys: zero output (the kernel's convention), lse -inf
            out[q0:q1] = 0
            continue
        pos = torch.arange(n_k, device=k.device)
        pages = block_table[i, pos // ps].long()
        ks, vs = (x[pages, pos % ps].float().repeat_interleave(h // h_kv, 1) for x in (k, v))
        qs = q[q0:q1].float()
        s = torch.einsum("qhd,khd->hqk", qs, ks) * softmax_scale
        if causal:
            r = torch.arange(q1 - q0, device=q.device)
            last = n_k - (q1 - q0) + r  # the last key each query sees
            s = s.masked_fill(pos[None, None, :] > last[None, :, None], float("-inf"))
        m = s.amax(-1, keepdim=True).clamp_min(-1e30)
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        o = torch.einsum("hqk,khd->qhd", p / denom.clamp_min(1e-30), vs)
        out[q0:q1] = o.to(out.dtype)
        lse[:, q0:q1] = (m + torch.log(denom)).squeeze(-1)
    return (out, lse) if return_softmax_lse else out
