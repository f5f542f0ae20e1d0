"""Synthetic inputs shared by tests and benchmarks (no vLLM).

`structured_qkv`: queries and keys whose attention has the structure of real long-context
attention, so that estimation keeps a realistic fraction of the blocks (random data makes
tau 0.9 keep ~90%):
  * a sink: key 0 aligned with every query;
  * a local window: a slowly varying positional component shared by q and k (a random
    walk over positions), so nearby keys score higher;
  * scattered heavy keys: a few percent of positions whose keys align with a per-head
    direction that every query carries.
"""

from __future__ import annotations

import torch


def structured_qkv(
    n: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    heavy_fraction: float = 0.02,
    strength: float = 0.25,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [n, Hq, D], k [n, Hkv, D], v [n, Hkv, D]) for a causal sequence of n tokens.

    strength scales the structured components against unit-variance noise (per element,
    in units of head_dim ** 0.25). At the default, PBS at tau 0.9 (segment 256) keeps 0.79
    / 0.72 of the blocks for the last 4K queries of 16K / 32K tokens (8 q / 2 KV heads,
    d 64, float32 on the CPU); 0.15 keeps 0.87, 1.0 keeps 0.05. Random numbers come from
    `generator` (seeded 0 on the CPU by default) on its device.
    """
    if not 0.0 <= heavy_fraction <= 1.0:
        raise ValueError(f"heavy_fraction={heavy_fraction}: must be in [0, 1]")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    dev = g.device
    group = q_heads // kv_heads
    a = strength * head_dim**0.25

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev)

    # local window: a random walk over positions, normalised to unit variance per element
    walk = randn(n, kv_heads, head_dim).mul_(0.05).cumsum(0)
    walk = (walk - walk.mean(0)) / walk.std(0).clamp_min(1e-6)
    direction = torch.nn.functional.normalize(randn(kv_heads, head_dim), dim=-1)
    heavy = torch.rand(n, kv_heads, generator=g, device=dev) < heavy_fraction
    heavy[0] = True  # the sink
    k = randn(n, kv_heads, head_dim) + 0.5 * a * walk
    k = k + heavy[..., None] * (2.0 * a * head_dim**0.5) * direction
    q = randn(n, kv_heads, group, head_dim) + 0.5 * a * walk[:, :, None]
    q = q + a * direction[None, :, None]
    v = randn(n, kv_heads, head_dim)
    out = q.reshape(n, q_heads, head_dim), k, v
    return tuple(x.to(device=device, dtype=dtype) for x in out)
