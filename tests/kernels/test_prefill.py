"""`pbs_prefill`: PBS mask + attention equals dense causal attention at tau=1 and the
attention reference on the same mask at tau<1 (Triton interpreter on CPU, small sizes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pbs_vllm.kernels import ChunkBatch, SparsityParams, pbs_attention_ref, pbs_prefill
from pbs_vllm.kernels.attention_ref import gather_sequence_kv

pytestmark = pytest.mark.usefixtures("triton_kernels")  # the Triton kernels, interpreted on CPU

BATCH = ChunkBatch(q_lens=[40, 100, 5], ctx_lens=[150, 37, 203])
PARAMS = dict(block_size=16, segment_size=32)


def make_inputs(gen, paged_kv, batch, kv_heads, group, head_dim, layout, dtype=torch.float32):
    """Random q [T, Hq, D] and a shuffled paged cache of every key/value of `batch`."""
    q = torch.randn(sum(batch.q_lens), kv_heads * group, head_dim, generator=gen)
    k, v = torch.randn(2, sum(batch.seq_lens), kv_heads, head_dim, generator=gen)
    return q.to(dtype), paged_kv(k.to(dtype), v.to(dtype), batch.seq_lens, 16, gen, layout)


def dense_causal_attention(q, kv, batch, scale) -> torch.Tensor:
    """Float64 SDPA of each chunk over its keys [0, seq_len), causal on absolute positions."""
    group = q.shape[1] // kv.num_kv_heads
    out = []
    for b, (c, n) in enumerate(zip(batch.ctx_lens, batch.q_lens)):
        k, v = (
            x.double().repeat_interleave(group, dim=1).transpose(0, 1)
            for x in gather_sequence_kv(kv, b, c + n)
        )
        qs = q[batch.cu_seqlens_q[b] : batch.cu_seqlens_q[b + 1]].double().transpose(0, 1)
        causal = torch.arange(c + n)[None, :] <= torch.arange(c, c + n)[:, None]
        out.append(
            F.scaled_dot_product_attention(qs, k, v, attn_mask=causal, scale=scale).transpose(0, 1)
        )
    return torch.cat(out)


@pytest.mark.parametrize(
    "kv_heads,group,head_dim,layout",
    [(2, 1, 64, "k_transposed"), (1, 4, 128, "fused"), (1, 7, 64, "head_major")],
)
def test_tau_one_equals_dense_causal_attention(gen, paged_kv, kv_heads, group, head_dim, layout):
    q, kv = make_inputs(gen, paged_kv, BATCH, kv_heads, group, head_dim, layout)
    out, mask = pbs_prefill(q, kv, BATCH, SparsityParams(**PARAMS, tau=1.0), head_dim**-0.5)
    assert mask.segment_size == 32 and mask.kv_num_blocks.any()  # the sparse path ran
    want = dense_causal_attention(q, kv, BATCH, head_dim**-0.5)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize(
    "dtype,scoring,tol",
    [
        (torch.float32, "mean", 1e-5),
        (torch.float32, "antidiagonal", 1e-5),
        (torch.float16, "mean", 2e-3),
    ],
)
def test_sparse_equals_attention_reference_on_its_mask(gen, paged_kv, dtype, scoring, tol):
    q, kv = make_inputs(gen, paged_kv, BATCH, 2, 2, 64, "contiguous", dtype)
    params = SparsityParams(**PARAMS, tau=0.6, scoring=scoring, antidiagonal_stride=4)
    out = torch.full_like(q, float("nan"))
    got, mask = pbs_prefill(q, kv, BATCH, params, 0.125, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert mask.density() < 0.9
    torch.testing.assert_close(got, pbs_attention_ref(q, kv, mask, 0.125), rtol=tol, atol=tol)


@pytest.mark.parametrize("dense,batch", [(True, BATCH), (False, ChunkBatch([20, 9], [3, 20]))])
def test_dense_mask_when_requested_or_nothing_to_permute(gen, paged_kv, dense, batch):
    q, kv = make_inputs(gen, paged_kv, batch, 2, 2, 64, "contiguous")
    out, mask = pbs_prefill(q, kv, batch, SparsityParams(**PARAMS, tau=0.1), 0.125, dense=dense)
    assert mask.segment_size == 0 and not mask.kv_num_blocks.any()
    torch.testing.assert_close(
        out.double(), dense_causal_attention(q, kv, batch, 0.125), rtol=1e-4, atol=2e-5
    )
