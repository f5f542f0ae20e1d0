"""Fidelity metrics against torch's own attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pbs_vllm.fidelity.metrics import attend, dense_probs, mask_fidelity

N, HQ, HKV, D = 96, 4, 2, 16


def _qkv(gen):
    q = torch.randn(N, HQ, D, generator=gen)
    k = torch.randn(N, HKV, D, generator=gen)
    v = torch.randn(N, HKV, D, generator=gen)
    return q, k, v


def _sdpa(q, k, v, allowed=None):
    """torch's attention in float64, out [N, Hq, D]; allowed [Hq, N, N] bool or causal."""
    qh, kh, vh = (x.double().transpose(0, 1) for x in (q, k, v))
    kh, vh = (x.repeat_interleave(HQ // HKV, dim=0) for x in (kh, vh))
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=allowed, is_causal=allowed is None, scale=0.25
    )
    return out.transpose(0, 1)


def test_dense_attention_matches_sdpa(gen):
    q, k, v = _qkv(gen)
    probs = dense_probs(q, k, 0.25)
    assert probs.shape == (HQ, N, N) and probs.dtype == torch.float64
    assert torch.allclose(probs.sum(-1), torch.ones(HQ, N, dtype=torch.float64))
    assert (probs.triu(diagonal=1) == 0).all()
    torch.testing.assert_close(attend(probs, v), _sdpa(q, k, v))


def test_full_causal_mask_is_perfect(gen):
    q, k, v = _qkv(gen)
    probs = dense_probs(q, k, 0.25)
    fid = mask_fidelity(torch.ones(HKV, N, N, dtype=torch.bool), probs, v, attend(probs, v))
    assert fid.pair_fraction == pytest.approx(1.0)
    assert fid.recall == pytest.approx(1.0)
    assert fid.rel_error == pytest.approx(0.0, abs=1e-12)


def test_random_mask_matches_masked_sdpa(gen):
    q, k, v = _qkv(gen)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    mask = (torch.rand(HKV, N, N, generator=gen) < 0.3) | torch.eye(N, dtype=torch.bool)
    probs = dense_probs(q, k, 0.25)
    out = attend(probs, v)
    fid = mask_fidelity(mask, probs, v, out)

    allowed = (mask & causal).repeat_interleave(HQ // HKV, dim=0)
    expect_out = _sdpa(q, k, v, allowed)
    assert fid.rel_error == pytest.approx(((expect_out - out).norm() / out.norm()).item())
    assert fid.recall == pytest.approx((probs * allowed).sum(-1).mean().item())
    assert fid.pair_fraction == pytest.approx(
        (mask & causal).sum().item() / (HKV * N * (N + 1) / 2)
    )
    assert 0.0 < fid.recall < 1.0 and fid.rel_error > 0.0


def test_wrong_mask_shape_is_rejected(gen):
    q, k, v = _qkv(gen)
    probs = dense_probs(q, k, 0.25)
    with pytest.raises(ValueError, match=r"expected \[kv_heads, N, N\]"):
        mask_fidelity(torch.ones(HQ, N, N, dtype=torch.bool), probs, v, attend(probs, v))
