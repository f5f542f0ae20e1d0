"""Structured synthetic Q/K/V for one sequence, shaped like long-context attention heads.

Every head's causal attention is a mixture of four patterns, each built into its own slice
of the head dimension so that q.k * scale adds up to the logits named below:
  * sink: every query attends strongly to token 0;
  * local window: a Gaussian bump over the previous ~local_window tokens (cos/sin
    position features at quadrature frequencies, like a smooth RoPE band);
  * heavy hitters: each query head has its own num_heavy keys, drawn uniformly from the
    whole context, that every query of that head attends to. Spread out like this, an
    unpermuted key block holds only a few of them;
  * semantic clusters: the queries of each of num_regions contiguous regions share a
    direction with cluster_keys random earlier keys (per KV head).
plus unstructured noise. Query heads of a GQA group read the same K/V but weigh the
patterns differently (per-head weights uniform in [0.75, 1.25]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_LOCAL_FREQS = 8  # cos/sin pairs of the local-window features


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of `make_synthetic_qkv`; logits are in units of q.k / sqrt(head_dim)."""

    seq_len: int = 1024
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    sink_logit: float = 8.0
    local_window: int = 32  # tokens; the bump's standard deviation is local_window / 2
    local_logit: float = 5.0
    num_heavy: int = 12  # heavy-hitter keys per query head
    heavy_logit: float = 8.0
    num_regions: int = 8  # query regions with their own semantic cluster
    cluster_keys: int = 24  # earlier keys that share a region's direction (per KV head)
    cluster_logit: float = 6.0
    noise_logit: float = 1.0  # standard deviation of the unstructured logits
    seed: int = 0

    def __post_init__(self) -> None:
        hq, hkv = self.num_q_heads, self.num_kv_heads
        if hkv < 1 or hq < hkv or hq % hkv:
            raise ValueError(
                f"num_q_heads={hq}, num_kv_heads={hkv}: need num_q_heads a positive "
                "multiple of num_kv_heads"
            )
        if self.head_dim < self.structured_dims + 16:
            raise ValueError(
                f"head_dim={self.head_dim}: must be >= {self.structured_dims + 16} "
                "(sink, heavy and local features plus 16 for clusters and noise)"
            )
        if not 1 <= self.num_heavy < self.seq_len:
            raise ValueError(f"num_heavy={self.num_heavy}: must be in [1, seq_len={self.seq_len})")
        if not 1 <= self.num_regions <= self.seq_len:
            raise ValueError(f"num_regions={self.num_regions}: must be in [1, seq_len]")
        if self.cluster_keys < 0 or self.local_window < 1:
            raise ValueError(
                f"cluster_keys={self.cluster_keys} must be >= 0 and "
                f"local_window={self.local_window} >= 1"
            )

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def structured_dims(self) -> int:
        """Dims used by sink (1), heavy hitters (one per group head) and the local window."""
        return 1 + self.group + 2 * _LOCAL_FREQS


@dataclass
class SyntheticQKV:
    """q [N, Hq, D], k and v [N, Hkv, D] (float32) and the heavy keys [Hq, num_heavy]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heavy: torch.Tensor
    spec: SyntheticSpec


def make_synthetic_qkv(spec: SyntheticSpec) -> SyntheticQKV:
    """Seeded Q/K/V with sink, local, scattered heavy-hitter and cluster attention."""
    n, hq, hkv, d, g = spec.seq_len, spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.group
    gen = torch.Generator().manual_seed(spec.seed)
    amp = lambda logit: math.sqrt(logit * math.sqrt(d))  # q and k amplitude for that logit
    weights = 0.75 + 0.5 * torch.rand(hq, 4, generator=gen, dtype=torch.float64)
    q = torch.zeros(n, hq, d, dtype=torch.float64)
    k = torch.zeros(n, hkv, d, dtype=torch.float64)

    # sink: dim 0
    q[:, :, 0] = amp(spec.sink_logit) * weights[:, 0]
    k[0, :, 0] = amp(spec.sink_logit)

    # heavy hitters: dim 1 + (query head's index in its group)
    heavy = torch.stack(
        [torch.randperm(n - 1, generator=gen)[: spec.num_heavy] + 1 for _ in range(hq)]
    )
    for h in range(hq):
        q[:, h, 1 + h % g] = amp(spec.heavy_logit) * weights[h, 1]
        k[heavy[h], h // g, 1 + h % g] = amp(spec.heavy_logit)

    # local window: cos/sin features whose dot product is mean_m cos(w_m (i - j)), which
    # approximates exp(-(i - j)^2 / (2 sigma^2)) (frequencies: quantiles of N(0, 1/sigma^2))
    sigma = spec.local_window / 2
    quantiles = (torch.arange(_LOCAL_FREQS, dtype=torch.float64) + 0.5) / (2 * _LOCAL_FREQS) + 0.5
    freqs = torch.special.ndtri(quantiles) / sigma
    angle = torch.arange(n, dtype=torch.float64)[:, None] * freqs  # [N, M]
    feats = torch.cat([angle.cos(), angle.sin()], dim=1) / math.sqrt(_LOCAL_FREQS)
    lo, hi = 1 + g, spec.structured_dims
    q[:, :, lo:hi] = amp(spec.local_logit) * feats[:, None, :] * weights[None, :, 2, None]
    k[:, :, lo:hi] = amp(spec.local_logit) * feats[:, None, :]

    # semantic clusters: unit directions in their own subspace, one per (KV head, region)
    free = d - spec.structured_dims
    c_lo, c_hi = hi, hi + free // 2
    bounds = [r * n // spec.num_regions for r in range(spec.num_regions + 1)]
    for h in range(hkv):
        for r in range(1, spec.num_regions):
            u = torch.randn(c_hi - c_lo, generator=gen, dtype=torch.float64)
            u = amp(spec.cluster_logit) * u / u.norm()
            heads = slice(h * g, (h + 1) * g)
            q[bounds[r] : bounds[r + 1], heads, c_lo:c_hi] += u * weights[heads, 3, None]
            picked = torch.randperm(bounds[r], generator=gen)[: spec.cluster_keys]
            k[picked, h, c_lo:c_hi] += u

    # noise: Gaussian features whose dot products have std noise_logit after scaling
    n_noise = d - c_hi
    s = math.sqrt(spec.noise_logit * math.sqrt(d) / math.sqrt(n_noise))
    q[:, :, c_hi:] = s * torch.randn(n, hq, n_noise, generator=gen, dtype=torch.float64)
    k[:, :, c_hi:] = s * torch.randn(n, hkv, n_noise, generator=gen, dtype=torch.float64)

    v = torch.randn(n, hkv, d, generator=gen)
    return SyntheticQKV(q.float(), k.float(), v, heavy.sort(dim=1).values, spec)
