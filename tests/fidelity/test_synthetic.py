"""The synthetic generator: shapes, seeding, and really scattered heavy hitters."""

from __future__ import annotations

import math

import pytest
import torch

from pbs_vllm.fidelity.metrics import dense_probs
from pbs_vllm.fidelity.synthetic import SyntheticSpec, make_synthetic_qkv

B = 32


def test_shapes_and_seeding(seed):
    spec = SyntheticSpec(seq_len=256, num_q_heads=6, num_kv_heads=2, head_dim=48, seed=seed)
    a, b = make_synthetic_qkv(spec), make_synthetic_qkv(spec)
    assert a.q.shape == (256, 6, 48) and a.k.shape == a.v.shape == (256, 2, 48)
    assert a.heavy.shape == (6, spec.num_heavy)
    for x, y in zip((a.q, a.k, a.v, a.heavy), (b.q, b.k, b.v, b.heavy)):
        assert torch.equal(x, y)
    other = make_synthetic_qkv(SyntheticSpec(seq_len=256, seed=seed + 1))
    assert not torch.equal(a.heavy[:4], other.heavy)


def test_heavy_hitters_are_scattered_and_heavy(seed):
    spec = SyntheticSpec(seed=seed)  # N=1024, 4 query / 2 KV heads, d 64
    s = make_synthetic_qkv(spec)
    n = spec.seq_len
    probs = dense_probs(s.q, s.k, 1 / math.sqrt(spec.head_dim))
    late = slice(3 * n // 4, n)  # queries that see (almost) every heavy key
    for h in range(spec.num_q_heads):
        heavy = s.heavy[h]
        assert heavy.unique().numel() == spec.num_heavy and heavy.min() > 0
        # spread over the whole context: many blocks, few per block, wide span
        per_block = torch.bincount(heavy // B, minlength=n // B)
        assert (per_block > 0).sum() >= 0.7 * spec.num_heavy
        assert per_block.max() <= 3
        assert heavy.max() - heavy.min() >= n / 2
        # heavy: together a large share; the typical one far more than a uniform share
        on_heavy = probs[h, late][:, heavy]
        assert on_heavy.sum(dim=-1).mean() >= 0.2
        visible = torch.arange(3 * n // 4, n)[:, None] > heavy[None, :]
        per_key = (on_heavy * visible).sum(dim=0) / visible.sum(dim=0).clamp(min=1)
        assert per_key[visible.any(dim=0)].median() >= 5.0 / n
        # and per head: another group head's heavy keys are not heavy for this head
        other = s.heavy[h ^ 1]
        assert probs[h, late][:, other].mean(dim=0).median() < 2.0 / n
    assert probs[:, 1:, 0].mean() > 0.05  # the sink


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="num_q_heads=3, num_kv_heads=2"):
        SyntheticSpec(num_q_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="head_dim=16"):
        SyntheticSpec(head_dim=16)
    with pytest.raises(ValueError, match="num_heavy=0"):
        SyntheticSpec(num_heavy=0)
