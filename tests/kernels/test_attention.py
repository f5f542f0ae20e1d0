"""PBS attention: Triton kernel and PyTorch reference against float64 attention.

CPU runs go through the Triton interpreter (see conftest), so shapes stay small: block 16,
segment 32, a few hundred keys. Real sizes in bf16 run only on a GPU (marker `gpu`).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from attention_util import _causal_masks, _random_qkv, _rel_err, _truth

from pbs_vllm.kernels.attention import _row_table, compose_row_table, pbs_attention
from pbs_vllm.kernels.attention_ref import pbs_attention_ref
from pbs_vllm.kernels.block_mask import (
    PBSBlockMask,
    dense_block_mask,
    random_block_mask,
)
from pbs_vllm.kernels.paged import ChunkBatch

pytestmark = pytest.mark.usefixtures("triton_kernels")  # the Triton kernel, interpreted on CPU

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _naive_to_dense(mask: PBSBlockMask, seq: int) -> torch.Tensor:
    """Loop-by-loop token mask of one sequence, straight from the field definitions."""
    bs = mask.block_size
    q_len, ctx = mask.batch.q_lens[seq], mask.batch.ctx_lens[seq]
    out = torch.zeros(mask.num_kv_heads, q_len, ctx + q_len, dtype=torch.bool)
    first_slot = int(mask.perm_offset[seq])
    for qb in range(len(mask.qblocks)):
        if int(mask.qblocks.seq[qb]) != seq:
            continue
        pos0, length = int(mask.qblocks.pos[qb]), int(mask.qblocks.length[qb])
        for h in range(mask.num_kv_heads):
            keys = set()
            for i in range(int(mask.kv_num_blocks[h, qb])):
                j = int(mask.kv_indices[h, qb, i])
                slots = range(first_slot + j * bs, first_slot + (j + 1) * bs)
                keys |= {int(mask.perm[h, s]) for s in slots}
            for p in range(pos0, pos0 + length):
                row = p - ctx
                out[h, row, list(keys)] = True
                out[h, row, int(mask.own_start[qb]) : p + 1] = True
    return out


def _assert_written(out: torch.Tensor) -> None:
    assert not out.isnan().any(), "kernel left NaN (unwritten rows, or read a poisoned page)"


# --- PBSBlockMask ------------------------------------------------------------------


def test_to_dense_matches_naive_construction(gen, random_chunk_batch):
    batch = random_chunk_batch(gen, num_seqs=3, max_ctx=150, max_q=70)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    mask = random_block_mask(batch, 16, 32, num_kv_heads=3, fraction=0.4, device="cpu", seed=seed)
    for b in range(len(batch)):
        assert torch.equal(mask.to_dense(b), _naive_to_dense(mask, b))


def test_full_random_mask_equals_causal_and_density_one(gen, random_chunk_batch):
    batch = random_chunk_batch(gen, num_seqs=3, max_ctx=150, max_q=70)
    mask = random_block_mask(batch, 16, 32, num_kv_heads=2, fraction=1.0, device="cpu", seed=7)
    dense = dense_block_mask(batch, 16, num_kv_heads=2, device="cpu")
    for b, causal in enumerate(_causal_masks(batch, 2, "cpu")):
        assert torch.equal(mask.to_dense(b), causal)
        assert torch.equal(dense.to_dense(b), causal)
    assert mask.density() == pytest.approx(1.0)
    assert dense.density() == 1.0 and dense.sparsity() == 0.0


def test_density_counts_selected_and_touched_own_blocks():
    # One sequence, B=16, S=32, queries at [40, 100): query blocks start at 40, 48, 64, 80, 96.
    batch = ChunkBatch(q_lens=[60], ctx_lens=[40])
    mask = random_block_mask(batch, 16, 32, num_kv_heads=2, fraction=0.0, device="cpu")
    # Own regions touch 1 (40-47), 2 (48-63), 1, 2, 1 blocks; visible: 3, 4, 5, 6, 7 blocks.
    assert mask.density() == pytest.approx(7 / 25)
    mask.kv_num_blocks[0, 4] = 3  # block at 96: three of its six candidates on one head
    mask.kv_indices = torch.tensor([0, 2, 4]).expand(2, 5, 3).to(torch.int32)
    assert mask.density() == pytest.approx((14 + 3) / 50)
    assert mask.sparsity() == pytest.approx(1 - 17 / 50)
    assert repr(mask) == (
        "PBSBlockMask(batch=1, B=16, S=32, kv_heads=2, query_blocks=5, density=0.3400, "
        "max_selected=3)"
    )


# --- reference -----------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 4, 7])
def test_reference_matches_float64(gen, paged_kv, random_chunk_batch, group):
    batch = random_chunk_batch(gen, num_seqs=3, max_ctx=200, max_q=80)
    q, k, v = _random_qkv(gen, batch, 2 * group, 2, 64, torch.float32, "cpu")
    kv = paged_kv(k, v, batch.seq_lens, 4, gen, layout="k_transposed")
    mask = random_block_mask(batch, 16, 32, num_kv_heads=2, fraction=0.3, device="cpu", seed=group)
    truth, _ = _truth(q, k, v, batch, [mask.to_dense(b) for b in range(len(batch))], 0.125)
    assert _rel_err(pbs_attention_ref(q, kv, mask, 0.125), truth) <= 1e-5


# --- Triton kernel on CPU (interpreter) ------------------------------------------------


@pytest.mark.parametrize(
    ("group", "head_dim", "page_size", "layout"),
    [
        (1, 64, 4, "contiguous"),
        (4, 128, 16, "fused"),
        (7, 64, 16, "head_major"),
        (4, 64, 4, "k_transposed"),
    ],
)
def test_dense_mask_matches_sdpa(
    gen, paged_kv, random_chunk_batch, group, head_dim, page_size, layout
):
    batch = random_chunk_batch(gen, num_seqs=3, max_ctx=120, max_q=60)
    q, k, v = _random_qkv(gen, batch, 2 * group, 2, head_dim, torch.float32, "cpu")
    kv = paged_kv(k, v, batch.seq_lens, page_size, gen, layout=layout)
    mask = dense_block_mask(batch, 16, num_kv_heads=2, device="cpu")
    out = torch.full_like(q, float("nan"))
    pbs_attention(q, kv, mask, head_dim**-0.5, out=out)
    _assert_written(out)
    truth, _ = _truth(q, k, v, batch, _causal_masks(batch, 2, "cpu"), head_dim**-0.5)
    assert _rel_err(out, truth) <= 1e-5


@pytest.mark.parametrize(
    ("group", "head_dim", "layout"),
    [(1, 128, "head_major"), (4, 64, "fused"), (7, 64, "k_transposed")],
)
def test_sparse_mask_matches_float64(gen, paged_kv, random_chunk_batch, group, head_dim, layout):
    batch = random_chunk_batch(gen, num_seqs=3, max_ctx=200, max_q=50)
    q, k, v = _random_qkv(gen, batch, 2 * group, 2, head_dim, torch.float32, "cpu")
    kv = paged_kv(k, v, batch.seq_lens, 4, gen, layout=layout)
    fraction = float(torch.rand(1, generator=gen)) * 0.6 + 0.2
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    mask = random_block_mask(batch, 16, 32, 2, fraction, device="cpu", seed=seed)
    assert int(mask.kv_num_blocks.max()) > 0, "test batch too short to select any block"
    out, lse = pbs_attention(q, kv, mask, 0.1, return_lse=True)
    _assert_written(out)
    truth, truth_lse = _truth(q, k, v, batch, [mask.to_dense(b) for b in range(len(batch))], 0.1)
    assert _rel_err(out, truth) <= 1e-5
    assert _rel_err(lse, truth_lse) <= 1e-5


def test_fp16_error_within_twice_reference(gen, paged_kv, random_chunk_batch):
    batch = random_chunk_batch(gen, num_seqs=2, max_ctx=200, max_q=60)
    q, k, v = _random_qkv(gen, batch, 8, 2, 64, torch.float16, "cpu")
    kv = paged_kv(k, v, batch.seq_lens, 16, gen, layout="fused")
    mask = random_block_mask(batch, 16, 32, 2, 0.5, device="cpu", seed=11)
    truth, _ = _truth(q, k, v, batch, [mask.to_dense(b) for b in range(len(batch))], 0.125)
    out = pbs_attention(q, kv, mask, 0.125)
    _assert_written(out)
    assert out.dtype == torch.float16
    assert _rel_err(out, truth) <= 2 * _rel_err(pbs_attention_ref(q, kv, mask, 0.125), truth)


def test_strided_q_and_out(gen, paged_kv):
    """q and out as column slices of wider buffers (like vLLM's fused qkv / output)."""
    batch = ChunkBatch(q_lens=[33, 17], ctx_lens=[64, 5])  # one chunk on a segment boundary
    hq, hkv, d = 4, 1, 64  # MQA
    q_wide = torch.randn(sum(batch.q_lens), 2 * hq, d, generator=gen)
    q = q_wide[:, 1::2]
    _, k, v = _random_qkv(gen, batch, hq, hkv, d, torch.float32, "cpu")
    kv = paged_kv(k, v, batch.seq_lens, 16, gen)
    mask = random_block_mask(batch, 16, 32, hkv, 0.5, device="cpu", seed=5)
    out_wide = torch.full((sum(batch.q_lens), hq, 2 * d), float("nan"))
    out = out_wide[..., :d]
    pbs_attention(q, kv, mask, 0.125, out=out)
    _assert_written(out)
    assert out_wide[..., d:].isnan().all(), "kernel wrote outside the out view"
    truth, _ = _truth(q, k, v, batch, [mask.to_dense(b) for b in range(len(batch))], 0.125)
    assert _rel_err(out, truth) <= 1e-5


def test_mask_reused_with_other_and_rewritten_block_tables(gen, paged_kv):
    """A mask's row table (perm composed with one block table) serves only that table,
    unchanged: other and rewritten tables get theirs composed."""
    batch = ChunkBatch(q_lens=[40, 25], ctx_lens=[150, 90])
    q, k, v = _random_qkv(gen, batch, 4, 2, 32, torch.float32, "cpu")
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    mask = random_block_mask(batch, 16, 32, 2, 0.5, device="cpu", seed=seed)
    truth, _ = _truth(q, k, v, batch, [mask.to_dense(b) for b in range(len(batch))], 0.125)
    first, second = (paged_kv(k, v, batch.seq_lens, 4, gen) for _ in range(2))
    for kv in (first, second, first):
        assert _rel_err(pbs_attention(q, kv, mask, 0.125), truth) <= 1e-5
    mask = dataclasses.replace(mask, row_table=compose_row_table(mask, first))
    rows = mask.row_table.rows
    assert _row_table(mask, first) is rows, "row table rebuilt for an unchanged block table"
    assert _row_table(mask, second) is not rows
    assert _rel_err(pbs_attention(q, first, mask, 0.125), truth) <= 1e-5

    # vLLM updates its block table in place: move every page of `first` somewhere else.
    moved = torch.randperm(first.key_cache.shape[0], generator=gen)
    for cache in (first.key_cache, first.value_cache):
        cache[moved] = cache.clone()
    first.block_table.copy_(moved[first.block_table.long()].to(torch.int32))
    out = torch.full_like(q, float("nan"))
    pbs_attention(q, first, mask, 0.125, out=out)
    _assert_written(out)
    assert _rel_err(out, truth) <= 1e-5


def _bad_inputs(case: str, paged_kv, gen):
    batch = ChunkBatch(q_lens=[20], ctx_lens=[0])
    q, k, v = _random_qkv(gen, batch, 4, 2, 32, torch.float32, "cpu")
    kv = paged_kv(k, v, batch.seq_lens, 16, gen)
    mask = dense_block_mask(batch, 16, 2, "cpu")
    if case == "head_dim":
        q = q[..., :16]
    elif case == "dtype":
        q = q.half()
    elif case == "groups":
        q = torch.cat([q, q[:, :1]], dim=1)
    elif case == "tokens":
        q = q[:-1]
    elif case == "mask_heads":
        mask = dense_block_mask(batch, 16, 1, "cpu")
    elif case == "out":
        return q, kv, mask, q.new_empty(q.shape[0], 4, 16)
    return q, kv, mask, None


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("head_dim", "head dim mismatch"),
        ("dtype", "differs from q dtype"),
        ("groups", r"multiple of KV heads \(2\)"),
        ("tokens", "sum\\(q_lens\\)=20"),
        ("mask_heads", "mask has 1 KV heads"),
        ("out", "out must match q"),
    ],
)
def test_rejects_bad_inputs(paged_kv, gen, case, message):
    q, kv, mask, out = _bad_inputs(case, paged_kv, gen)
    with pytest.raises(ValueError, match=message):
        pbs_attention(q, kv, mask, 0.1, out=out)


# --- GPU, real sizes -------------------------------------------------------------------


def _real_batch() -> ChunkBatch:
    """A whole 4K prompt, a chunk off block boundaries over a 3000-token prefix, a decode-like 1."""
    return ChunkBatch(q_lens=[4096, 1100, 1], ctx_lens=[0, 3001, 777])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("group", "head_dim"), [(4, 128), (7, 64)])
def test_gpu_bf16_sparse_real_size(gen, paged_kv, group, head_dim):
    batch, hkv = _real_batch(), 8 if group == 4 else 2
    q, k, v = _random_qkv(gen, batch, hkv * group, hkv, head_dim, torch.bfloat16, "cuda")
    kv = paged_kv(k, v, batch.seq_lens, 16, gen, layout="fused")
    mask = random_block_mask(batch, 128, 256, hkv, 0.3, device="cuda", seed=3)
    scale = head_dim**-0.5
    truth, _ = _truth(q, k, v, batch, [mask.to_dense(b) for b in range(len(batch))], scale)
    out = torch.full_like(q, float("nan"))
    pbs_attention(q, kv, mask, scale, out=out)
    _assert_written(out)
    ref_err = _rel_err(pbs_attention_ref(q, kv, mask, scale), truth)
    assert _rel_err(out, truth) <= max(2 * ref_err, 1e-2)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_gpu_dense_matches_sdpa(gen, paged_kv, dtype):
    batch = _real_batch()
    q, k, v = _random_qkv(gen, batch, 32, 8, 128, dtype, "cuda")
    kv = paged_kv(k, v, batch.seq_lens, 16, gen, layout="head_major")
    mask = dense_block_mask(batch, 128, 8, "cuda")
    out = torch.full_like(q, float("nan"))
    pbs_attention(q, kv, mask, 128**-0.5, out=out)
    _assert_written(out)
    truth, _ = _truth(q, k, v, batch, _causal_masks(batch, 8, "cuda"), 128**-0.5)
    bound = 1e-5 if dtype == torch.float32 else 2e-3
    assert _rel_err(out, truth) <= bound
