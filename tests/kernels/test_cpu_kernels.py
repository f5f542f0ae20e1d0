"""The vectorized PyTorch kernels (pbs_vllm.kernels.cpu) against the Triton kernels.

The Triton side runs in the interpreter, so shapes stay small (B=16, S=32/64, a few hundred
keys): ragged batches with chunks off block boundaries, GQA ratios 1/4/7, head dims 64/128,
shuffled pages in every cache layout, fp32 and fp16. Masks must be identical (permutation,
kept-block counts and ids); attention on one mask equal within fp32 (fp16) rounding.
"""

from __future__ import annotations

import logging

import pytest
import torch

from pbs_vllm.kernels import ChunkBatch, SparsityParams, build_block_mask, pbs_attention
from pbs_vllm.kernels import cpu as cpu_kernels
from pbs_vllm.kernels.block_mask import dense_block_mask, random_block_mask
from pbs_vllm.kernels.cpu import KERNELS_ENV, build_block_mask_torch, pbs_attention_torch

# Ragged chunks, most off block boundaries: one whose last B queries straddle a segment
# boundary, one shorter than a block, one with no permuted region, one from position 0.
BATCH = ChunkBatch(q_lens=[40, 100, 5, 20, 70], ctx_lens=[150, 37, 203, 3, 0])


def make_inputs(gen, paged_kv, batch, kv_heads, group, head_dim, page_size, layout, dtype):
    q = torch.randn(sum(batch.q_lens), kv_heads * group, head_dim, generator=gen) * 2
    k, v = torch.randn(2, sum(batch.seq_lens), kv_heads, head_dim, generator=gen) * 2
    kv = paged_kv(k.to(dtype), v.to(dtype), batch.seq_lens, page_size, gen, layout)
    return q.to(dtype), kv


def selections(mask) -> list[list[list[int]]]:
    num, idx = mask.kv_num_blocks, mask.kv_indices
    return [
        [idx[h, k, : num[h, k]].tolist() for k in range(num.shape[1])] for h in range(num.shape[0])
    ]


def triton(monkeypatch, fn, *args, **kwargs):
    """fn (build_block_mask or pbs_attention) on the Triton kernels (interpreted)."""
    with monkeypatch.context() as m:
        m.setenv(KERNELS_ENV, "triton")
        return fn(*args, **kwargs)


B16_S32 = dict(block_size=16, segment_size=32)


@pytest.mark.parametrize(
    "params,group,head_dim,page_size,layout,dtype",
    [
        (SparsityParams(**B16_S32, tau=0.8), 1, 128, 4, "head_major", torch.float32),
        (SparsityParams(**B16_S32, tau=0.8), 4, 64, 16, "k_transposed", torch.float32),
        (SparsityParams(**B16_S32, tau=0.6, keep_sink=False), 7, 64, 16, "fused", torch.float32),
        (
            SparsityParams(block_size=16, segment_size=64, tau=0.9, max_kept_fraction=0.3),
            4,
            128,
            8,
            "contiguous",
            torch.float32,
        ),
        (
            SparsityParams(**B16_S32, tau=0.8, exact_last_block=False),
            2,
            64,
            4,
            "fused",
            torch.float16,
        ),
        (SparsityParams(**B16_S32, tau=0.5, permute=False), 1, 64, 16, "head_major", torch.float32),
        (
            SparsityParams(**B16_S32, tau=0.7, scoring="antidiagonal", antidiagonal_stride=4),
            4,
            64,
            4,
            "k_transposed",
            torch.float32,
        ),
        (
            SparsityParams(**B16_S32, tau=0.5, max_kept_fraction=0.2, dense_last_tokens=17),
            7,
            64,
            16,
            "head_major",
            torch.float32,
        ),
    ],
    ids=[
        "g1-d128",
        "g4",
        "g7-no_sink",
        "kept_cap-s64",
        "fp16-pooled",
        "unpermuted",
        "pbs+",
        "dense_last_tokens",
    ],
)
def test_mask_equals_triton(
    gen, paged_kv, monkeypatch, params, group, head_dim, page_size, layout, dtype
):
    q, kv = make_inputs(gen, paged_kv, BATCH, 2, group, head_dim, page_size, layout, dtype)
    scale = head_dim**-0.5
    got = build_block_mask_torch(q, kv, BATCH, params, scale)
    want = triton(monkeypatch, build_block_mask, q, kv, BATCH, params, scale)
    for name in ("own_start", "perm", "perm_offset", "kv_num_blocks"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.kv_indices.shape == want.kv_indices.shape
    assert selections(got) == selections(want)
    assert got.density() == want.density() < 1.0


@pytest.mark.parametrize(
    "group,head_dim,page_size,layout,dtype,fraction",
    [
        (1, 64, 4, "contiguous", torch.float32, 0.4),
        (4, 128, 16, "fused", torch.float32, 0.3),
        (7, 64, 16, "k_transposed", torch.float32, 0.6),
        (4, 64, 8, "head_major", torch.float16, 0.5),
        (1, 128, 16, "head_major", torch.float32, 1.0),
    ],
)
def test_attention_equals_triton(
    gen, paged_kv, monkeypatch, group, head_dim, page_size, layout, dtype, fraction
):
    q, kv = make_inputs(gen, paged_kv, BATCH, 2, group, head_dim, page_size, layout, dtype)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    mask = random_block_mask(BATCH, 16, 32, 2, fraction, device="cpu", seed=seed)
    assert int(mask.kv_num_blocks.max()) > 0
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    got, lse = pbs_attention_torch(q, kv, mask, scale, out=out, return_lse=True)
    assert got.data_ptr() == out.data_ptr() and not got.isnan().any()
    want, want_lse = triton(monkeypatch, pbs_attention, q, kv, mask, scale, return_lse=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_mask_and_strided_out_equal_triton(gen, paged_kv, monkeypatch, dtype):
    q, kv = make_inputs(gen, paged_kv, BATCH, 2, 3, 64, 16, "k_transposed", dtype)
    mask = dense_block_mask(BATCH, 16, 2, "cpu")
    wide = torch.full((q.shape[0], q.shape[1], 128), float("nan"), dtype=dtype)
    got = pbs_attention_torch(q, kv, mask, 0.125, out=wide[..., :64])
    assert wide[..., 64:].isnan().all() and not got.isnan().any()
    want = triton(monkeypatch, pbs_attention, q, kv, mask, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_sparse_prefill_equals_triton_end_to_end(gen, paged_kv, monkeypatch):
    """Mask and attention together (what the backend runs), chunk over a long prefix."""
    batch = ChunkBatch(q_lens=[90, 33], ctx_lens=[230, 100])
    q, kv = make_inputs(gen, paged_kv, batch, 3, 3, 64, 16, "k_transposed", torch.float32)
    params = SparsityParams(block_size=16, segment_size=64, tau=0.85)
    mask = build_block_mask(q, kv, batch, params, 0.125)
    got = pbs_attention(q, kv, mask, 0.125)
    want_mask = triton(monkeypatch, build_block_mask, q, kv, batch, params, 0.125)
    want = triton(monkeypatch, pbs_attention, q, kv, want_mask, 0.125)
    assert selections(mask) == selections(want_mask) and mask.density() < 0.9
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dispatch_follows_device_and_env(gen, paged_kv, monkeypatch, caplog):
    """CPU tensors take the PyTorch path unless PBS_VLLM_CPU_KERNELS=triton; bad values fail."""
    batch = ChunkBatch(q_lens=[20], ctx_lens=[40])
    q, kv = make_inputs(gen, paged_kv, batch, 1, 2, 32, 16, "contiguous", torch.float32)
    mask = dense_block_mask(batch, 16, 1, "cpu")
    calls = []
    real = cpu_kernels.pbs_attention_torch
    monkeypatch.setattr(cpu_kernels, "pbs_attention_torch", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cpu_kernels, "_logged", set())
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger=cpu_kernels.logger.name):
        pbs_attention(q, kv, mask, 0.1)
        pbs_attention(q, kv, mask, 0.1)
    assert len(calls) == 2
    assert [r.getMessage() for r in caplog.records].count(
        f"PBS kernels on CPU tensors: vectorized PyTorch (pbs_vllm.kernels.cpu); {KERNELS_ENV}=torch"
    ) == 1
    monkeypatch.setenv(KERNELS_ENV, "triton")
    pbs_attention(q, kv, mask, 0.1)
    assert len(calls) == 2
    monkeypatch.setenv(KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match=f"{KERNELS_ENV}='cuda'"):
        pbs_attention(q, kv, mask, 0.1)


def test_scratch_buffers_survive_inference_mode(gen, paged_kv):
    """vLLM runs the model under torch.inference_mode; tests and tools run outside it."""
    batch = ChunkBatch(q_lens=[50], ctx_lens=[90])
    q, kv = make_inputs(gen, paged_kv, batch, 1, 2, 32, 16, "contiguous", torch.float32)
    params = SparsityParams(16, 32, tau=0.7)
    with torch.inference_mode():
        inside = pbs_attention_torch(q, kv, build_block_mask_torch(q, kv, batch, params, 0.1), 0.1)
    outside = pbs_attention_torch(q, kv, build_block_mask_torch(q, kv, batch, params, 0.1), 0.1)
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_memory_budget_splits_work_without_changing_results(gen, paged_kv, monkeypatch):
    """A tiny budget: key importance in two passes over key chunks, attention one query
    block per group; the same mask and the same output as with the default budget."""
    batch = ChunkBatch(q_lens=[300, 45], ctx_lens=[400, 130])
    q, kv = make_inputs(gen, paged_kv, batch, 2, 3, 64, 16, "k_transposed", torch.float32)
    params = SparsityParams(block_size=16, segment_size=64, tau=0.8)
    mask = build_block_mask_torch(q, kv, batch, params, 0.125)
    out = pbs_attention_torch(q, kv, mask, 0.125)
    monkeypatch.setattr(cpu_kernels, "_BUDGET", 1)
    small = build_block_mask_torch(q, kv, batch, params, 0.125)
    assert selections(small) == selections(mask) and torch.equal(small.perm, mask.perm)
    torch.testing.assert_close(pbs_attention_torch(q, kv, mask, 0.125), out, rtol=1e-5, atol=1e-5)
