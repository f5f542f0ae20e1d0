"""PBS attention through a paged varlen flash-attention kernel (`pbs_vllm.kernels.varlen`).

On the CPU the varlen kernel is `varlen_attention_ref` (the same interface in PyTorch), so
these tests check everything the route builds (scratch pages, page tables, key counts, the
bottom-right causal alignment) against float64 attention of the mask; the page-table and
gather launches also run in the Triton interpreter against their PyTorch versions. On a
Hopper GPU with vLLM, the real FA3 kernel runs the same cases in bf16 (marker `gpu`).
"""

from __future__ import annotations

import pytest
import torch
from attention_util import _causal_masks, _fa3, _random_qkv, _rel_err, _truth

from pbs_vllm.kernels import varlen
from pbs_vllm.kernels.attention_ref import pbs_attention_ref, varlen_attention_ref
from pbs_vllm.kernels.block_mask import dense_block_mask, random_block_mask
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
from pbs_vllm.kernels.params import SparsityParams
from pbs_vllm.kernels.plan import plan_for
from pbs_vllm.kernels.varlen import gather_scratch, page_tables, pbs_attention_varlen, varlen_plan


def _masks(mask):
    return [mask.to_dense(b) for b in range(len(mask.batch))]


@pytest.mark.parametrize(
    ("group", "head_dim", "page_size", "layout"),
    [
        (1, 64, 4, "contiguous"),
        (4, 128, 16, "fused"),
        (7, 64, 8, "head_major"),
        (2, 16, 4, "k_transposed"),
    ],
)
def test_sparse_route_matches_float64(
    gen, paged_kv, random_chunk_batch, torch_kernels, group, head_dim, page_size, layout
):
    batch = random_chunk_batch(gen, num_seqs=3, max_ctx=220, max_q=70)
    hkv = 2
    q, k, v = _random_qkv(gen, batch, hkv * group, hkv, head_dim, torch.float32, "cpu")
    kv = paged_kv(k, v, batch.seq_lens, page_size, gen, layout=layout)
    fraction = float(torch.rand(1, generator=gen)) * 0.7 + 0.1
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    mask = random_block_mask(batch, 16, 32, hkv, fraction, device="cpu", seed=seed)
    assert int(mask.kv_num_blocks.max()) > 0, "test batch too short to select any block"
    out = torch.full_like(q, float("nan"))
    got, lse = pbs_attention_varlen(
        q, kv, mask, 0.1, varlen_attention_ref, out=out, return_lse=True
    )
    assert got is out and not out.isnan().any()
    truth, truth_lse = _truth(q, k, v, batch, _masks(mask), 0.1)
    assert _rel_err(out, truth) <= 1e-5
    assert _rel_err(lse, truth_lse) <= 1e-5


def test_chunks_off_block_and_segment_boundaries(gen, paged_kv, torch_kernels):
    """Partial first query blocks, chunks spanning several segments, a one-token chunk,
    a sequence without a permuted region."""
    batch = ChunkBatch(q_lens=[75, 1, 40, 33], ctx_lens=[37, 190, 0, 96])
    q, k, v = _random_qkv(gen, batch, 6, 2, 32, torch.float32, "cpu")
    kv = paged_kv(k, v, batch.seq_lens, 8, gen, layout="fused")
    mask = random_block_mask(batch, 16, 32, 2, 0.5, device="cpu", seed=5)
    out = pbs_attention_varlen(q, kv, mask, 0.2, varlen_attention_ref)
    truth, _ = _truth(q, k, v, batch, _masks(mask), 0.2)
    assert _rel_err(out, truth) <= 1e-5


def test_dense_mask_is_one_call_over_the_cache(gen, paged_kv, random_chunk_batch, torch_kernels):
    batch = random_chunk_batch(gen, num_seqs=3, max_ctx=120, max_q=60)
    q, k, v = _random_qkv(gen, batch, 8, 2, 64, torch.float32, "cpu")
    kv = paged_kv(k, v, batch.seq_lens, 16, gen, layout="contiguous")
    mask = dense_block_mask(batch, 16, 2, "cpu")
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return varlen_attention_ref(*args, **kwargs)

    out = pbs_attention_varlen(q, kv, mask, 0.125, counting)
    assert calls == [kv.key_cache.shape]  # the paged cache itself, no scratch
    truth, _ = _truth(q, k, v, batch, _causal_masks(batch, 2, "cpu"), 0.125)
    assert _rel_err(out, truth) <= 1e-5


def test_scratch_budget_splits_heads_into_groups(gen, paged_kv, monkeypatch, torch_kernels):
    batch = ChunkBatch(q_lens=[90, 50], ctx_lens=[100, 30])
    q, k, v = _random_qkv(gen, batch, 8, 4, 16, torch.float32, "cpu")
    kv = paged_kv(k, v, batch.seq_lens, 4, gen, layout="head_major")
    mask = random_block_mask(batch, 16, 32, 4, 0.4, device="cpu", seed=9)
    whole = pbs_attention_varlen(q, kv, mask, 0.25, varlen_attention_ref)
    gathered = []
    real_gather = varlen.gather_scratch

    def spy(kv_, rows, tail, h0, h1):
        gathered.append((h0, h1))
        return real_gather(kv_, rows, tail, h0, h1)

    monkeypatch.setattr(varlen, "gather_scratch", spy)
    monkeypatch.setattr(varlen, "SCRATCH_BUDGET_BYTES", 1)  # one head per group
    split = pbs_attention_varlen(q, kv, mask, 0.25, varlen_attention_ref)
    assert gathered == [(0, 1), (1, 2), (2, 3), (3, 4)]
    torch.testing.assert_close(split, whole, rtol=0, atol=0)


def test_page_tables_and_gather_triton_match_torch(gen, paged_kv, random_chunk_batch, monkeypatch):
    """The two launches in the Triton interpreter against their PyTorch versions."""
    from pbs_vllm.kernels.attention import _row_table
    from pbs_vllm.kernels.cpu import KERNELS_ENV

    batch = random_chunk_batch(gen, num_seqs=3, max_ctx=200, max_q=60)
    q, k, v = _random_qkv(gen, batch, 4, 2, 16, torch.float32, "cpu")
    kv = paged_kv(k, v, batch.seq_lens, 4, gen, layout="fused")
    mask = random_block_mask(batch, 16, 32, 2, 0.5, device="cpu", seed=2)
    plan = varlen_plan(mask)
    rows, tail = _row_table(mask, kv), plan.tail_rows(kv)
    results = {}
    for kernels in ("torch", "triton"):
        monkeypatch.setenv(KERNELS_ENV, kernels)
        table, seqused = page_tables(mask, plan)
        ks, vs = gather_scratch(kv, rows, tail, 0, 2)
        results[kernels] = (table, seqused, ks, vs)
    for a, b in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    table, seqused, ks, vs = results["torch"]
    assert not ks.isnan().any() and not vs.isnan().any()  # padding rows are real keys
    assert int(seqused.max()) <= table.shape[-1] * mask.block_size


def test_layers_share_the_plans_varlen_plan_and_tail_rows(gen, paged_kv, torch_kernels):
    """Two layers' masks over one plan read one varlen plan; its tail rows are planned for
    the block table it was built with, composed for any other (and equal to a fresh
    composition)."""
    batch = ChunkBatch(q_lens=[64], ctx_lens=[64])
    q, k, v = _random_qkv(gen, batch, 4, 2, 16, torch.float32, "cpu")
    kv = paged_kv(k, v, batch.seq_lens, 4, gen)
    plan = plan_for(q, kv, batch, SparsityParams(block_size=16, segment_size=32), "fa3")
    first = random_block_mask(batch, 16, 32, 2, 0.5, device="cpu", seed=1, plan=plan)
    second = random_block_mask(batch, 16, 32, 2, 0.5, device="cpu", seed=2, plan=plan)
    assert varlen_plan(first) is varlen_plan(second) is plan.varlen
    planned = plan.varlen.tail_rows(kv)
    assert planned is plan.varlen.tail_rows(kv) is plan.varlen.planned_tail_rows.rows
    other = PagedKV(kv.key_cache, kv.value_cache, kv.block_table.clone())
    composed = plan.varlen.tail_rows(other)
    assert composed is not planned and torch.equal(composed, planned)


def test_reference_rejects_sizes_beyond_the_maxima():
    q = torch.zeros(4, 1, 16)
    k = v = torch.zeros(2, 4, 1, 16)
    kwargs = dict(
        cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32),
        seqused_k=torch.tensor([8], dtype=torch.int32),
        softmax_scale=1.0,
        causal=True,
        block_table=torch.tensor([[0, 1]], dtype=torch.int32),
    )
    with pytest.raises(ValueError, match="max_seqlen_k=7"):
        varlen_attention_ref(q, k, v, max_seqlen_q=4, max_seqlen_k=7, **kwargs)


# --- GPU: the FA3 kernel bundled with vLLM ------------------------------------------------


_GPU_CASES = [(4, 128, 8), (7, 64, 2), (1, 64, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize(("group", "head_dim", "hkv"), _GPU_CASES)
def test_gpu_fa3_sparse_bf16_within_twice_dense_error(gen, paged_kv, group, head_dim, hkv):
    fa3 = _fa3()
    if fa3 is None:
        pytest.skip("needs a Hopper GPU and vLLM's FA3")
    batch = ChunkBatch(q_lens=[4096, 1100, 1, 700], ctx_lens=[0, 3001, 777, 9000])
    q, k, v = _random_qkv(gen, batch, hkv * group, hkv, head_dim, torch.bfloat16, "cuda")
    kv = paged_kv(k, v, batch.seq_lens, 16, gen, layout="fused")
    scale = head_dim**-0.5
    for fraction in (0.1, 1.0):
        mask = random_block_mask(batch, 128, 256, hkv, fraction, device="cuda", seed=3)
        out = torch.full_like(q, float("nan"))
        pbs_attention_varlen(q, kv, mask, scale, fa3, out=out)
        assert not out.isnan().any()
        truth, _ = _truth(q, k, v, batch, _masks(mask), scale)
        ref_err = _rel_err(pbs_attention_ref(q, kv, mask, scale), truth)
        dense = dense_block_mask(batch, 128, hkv, "cuda")
        dense_out = pbs_attention_varlen(q, kv, dense, scale, fa3)
        dense_truth, _ = _truth(q, k, v, batch, _causal_masks(batch, hkv, "cuda"), scale)
        dense_err = _rel_err(dense_out, dense_truth)
        assert _rel_err(out, truth) <= max(2 * dense_err, 2 * ref_err), (fraction, dense_err)


@pytest.mark.gpu
def test_gpu_fa3_dense_matches_sdpa(gen, paged_kv):
    fa3 = _fa3()
    if fa3 is None:
        pytest.skip("needs a Hopper GPU and vLLM's FA3")
    batch = ChunkBatch(q_lens=[2048, 300, 1], ctx_lens=[0, 5000, 64])
    q, k, v = _random_qkv(gen, batch, 14, 2, 64, torch.bfloat16, "cuda")
    kv = paged_kv(k, v, batch.seq_lens, 16, gen, layout="fused")
    out = pbs_attention_varlen(q, kv, dense_block_mask(batch, 128, 2, "cuda"), 0.125, fa3)
    truth, _ = _truth(q, k, v, batch, _causal_masks(batch, 2, "cuda"), 0.125)
    assert _rel_err(out, truth) <= 1e-2
