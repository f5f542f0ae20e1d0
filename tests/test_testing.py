"""`pbs_vllm.testing.structured_qkv`: structured attention that PBS finds sparse."""

from __future__ import annotations

import pytest
import torch

from pbs_vllm.kernels import ChunkBatch, PagedKV, SparsityParams, build_block_mask
from pbs_vllm.testing import structured_qkv


def _density(q, k, v, n: int, q_len: int) -> float:
    kv = PagedKV.from_contiguous(k, v, [n], 16)
    params = SparsityParams(segment_size=256)
    mask = build_block_mask(q[-q_len:], kv, ChunkBatch([q_len], [n - q_len]), params, 0.125)
    return mask.density()


def test_structured_attention_is_sparser_than_random_and_not_trivial():
    n, q_len = 8192, 2048
    q, k, v = structured_qkv(n, 8, 2, 64)
    assert (q.shape, k.shape, v.shape) == ((n, 8, 64), (n, 2, 64), (n, 2, 64))
    structured = _density(q, k, v, n, q_len)
    g = torch.Generator().manual_seed(1)
    rq, rk, rv = (torch.randn(n, h, 64, generator=g) for h in (8, 2, 2))
    random = _density(rq, rk, rv, n, q_len)
    assert 0.4 < structured < 0.95 < random + 0.05, (structured, random)
    stronger = _density(*structured_qkv(n, 8, 2, 64, strength=1.0), n, q_len)
    assert stronger < structured


def test_structured_inputs_are_reproducible_and_validated():
    a = structured_qkv(300, 4, 2, 16, generator=torch.Generator().manual_seed(5))
    b = structured_qkv(300, 4, 2, 16, generator=torch.Generator().manual_seed(5))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="heavy_fraction=2"):
        structured_qkv(10, 4, 2, 16, heavy_fraction=2)
    with pytest.raises(ValueError, match="q_heads=3 must be a multiple of kv_heads=2"):
        structured_qkv(10, 3, 2, 16)
