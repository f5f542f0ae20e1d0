"""Fidelity of a sparse token mask against dense causal attention (float64, small sizes).

Shapes: N keys = queries (one whole prompt), Hq query heads, Hkv KV heads, D head dim.
Query head h reads KV head h // (Hq / Hkv), as in GQA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def dense_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax(q.k * scale) of q [N, Hq, D], k [N, Hkv, D]: [Hq, N, N] float64."""
    n, hq, _ = q.shape
    group = hq // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill_(~causal, float("-inf")).softmax(dim=-1)


def attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs [Hq, N, N] applied to v [N, Hkv, D]: out [N, Hq, D] float64."""
    group = probs.shape[0] // v.shape[1]
    return torch.einsum("hqk,khd->qhd", probs, v.double().repeat_interleave(group, dim=1))


def kept_pairs(token_mask: torch.Tensor) -> torch.Tensor:
    """token_mask [Hkv, N, N] bool restricted to the causal (query, key) pairs, on the CPU."""
    n = token_mask.shape[-1]
    return token_mask.cpu() & torch.ones(n, n, dtype=torch.bool).tril()


def masked_attention(
    kept: torch.Tensor, probs: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention over `kept` [Hkv, N, N] (from `kept_pairs`): (mass [Hq, N], the
    dense attention mass each query keeps; out [N, Hq, D], probs restricted to the kept
    keys, renormalised, applied to v [N, Hkv, D])."""
    masked = probs * kept.repeat_interleave(probs.shape[0] // kept.shape[0], dim=0)
    mass = masked.sum(dim=-1)
    return mass, attend(masked.div_(mass[..., None]), v)


@dataclass(frozen=True)
class Fidelity:
    """pair_fraction: computed / causally visible (query, key) pairs, mean over KV heads
    (token level; `PBSBlockMask.density()` is the block-level fraction).
    recall: dense attention mass on the computed keys, mean over queries and query heads.
    rel_error: ||out_sparse - out_dense||_F / ||out_dense||_F over all queries and heads.
    """

    pair_fraction: float
    recall: float
    rel_error: float


def mask_fidelity(
    token_mask: torch.Tensor, probs: torch.Tensor, v: torch.Tensor, out_dense: torch.Tensor
) -> Fidelity:
    """Score token_mask [Hkv, N, N] bool (e.g. `PBSBlockMask.to_dense`) against dense attention.

    probs [Hq, N, N] from `dense_probs`, v [N, Hkv, D], out_dense [N, Hq, D] = attend(probs, v).
    The sparse output is the masked softmax, i.e. probs restricted to the mask, renormalised.
    """
    hq, n, _ = probs.shape
    if token_mask.shape != (v.shape[1], n, n):
        raise ValueError(
            f"token_mask has shape {tuple(token_mask.shape)}, expected [kv_heads, N, N] = "
            f"{(v.shape[1], n, n)}"
        )
    kept = kept_pairs(token_mask)
    pair_fraction = kept.sum().item() / (n * (n + 1) // 2 * kept.shape[0])
    mass, out = masked_attention(kept, probs, v)
    rel_error = ((out - out_dense).norm() / out_dense.norm()).item()
    return Fidelity(pair_fraction=pair_fraction, recall=mass.mean().item(), rel_error=rel_error)
