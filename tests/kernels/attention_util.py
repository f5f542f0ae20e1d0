"""Float64 truths and random inputs shared by the attention tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pbs_vllm.kernels.paged import ChunkBatch


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def _random_qkv(gen, batch: ChunkBatch, hq: int, hkv: int, d: int, dtype, device):
    """q [T, Hq, D] and contiguous varlen k, v [sum(seq_lens), Hkv, D]."""
    t, n = sum(batch.q_lens), sum(batch.seq_lens)
    q, k, v = (torch.randn(rows, h, d, generator=gen) for rows, h in ((t, hq), (n, hkv), (n, hkv)))
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


def _causal_masks(batch: ChunkBatch, hkv: int, device) -> list[torch.Tensor]:
    """Lower-right causal token masks [Hkv, q_len, seq_len] per sequence."""
    masks = []
    for c, n in zip(batch.ctx_lens, batch.q_lens, strict=True):
        q_pos = torch.arange(c, c + n, device=device)
        allowed = torch.arange(c + n, device=device)[None, :] <= q_pos[:, None]
        masks.append(allowed.expand(hkv, -1, -1))
    return masks


def _truth(q, k, v, batch: ChunkBatch, token_masks, scale):
    """float64 SDPA per sequence with explicit token masks: (out [T, Hq, D], lse [Hq, T])."""
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    q_starts, k_start = batch.cu_seqlens_q, 0
    for b, n in enumerate(batch.seq_lens):
        qs = q[q_starts[b] : q_starts[b + 1]].double().transpose(0, 1)  # [Hq, L, D]
        ks, vs = (
            x[k_start : k_start + n].double().repeat_interleave(group, 1).transpose(0, 1)
            for x in (k, v)
        )
        allowed = token_masks[b].repeat_interleave(group, dim=0)  # [Hq, L, N]
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale))
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))
        lses.append(scores.logsumexp(-1))
        k_start += n
    return torch.cat(outs, 1).transpose(0, 1), torch.cat(lses, 1)


def _fa3():
    """vLLM's FA3 varlen function (fa_version=3 bound), or None without a Hopper GPU and
    vLLM's FA3."""
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import (
            flash_attn_varlen_func,
            is_fa_version_supported,
        )
    except ImportError:
        return None
    if not torch.cuda.is_available() or not is_fa_version_supported(3):
        return None

    def fa3(*args, **kwargs):
        return flash_attn_varlen_func(*args, **kwargs, fa_version=3)

    return fa3
