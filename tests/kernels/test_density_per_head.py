"""`PBSBlockMask.density_per_head_tensor` against a brute-force count from `to_dense`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pbs_vllm.kernels import ChunkBatch, SparsityParams, build_block_mask, dense_block_mask
from pbs_vllm.kernels.block_mask import PBSBlockMask, random_block_mask
from pbs_vllm.kernels.plan import plan_prefill


def plan_params(plan) -> SparsityParams:
    return SparsityParams(block_size=plan.block_size, segment_size=plan.segment_size)


# Ragged chunks, most off block boundaries; one shorter than a block, one without a
# permuted region, one starting at position 0.
BATCH_SHAPES = [([40, 100, 5, 20], [150, 37, 203, 3]), ([64, 1, 33], [0, 95, 130])]


def brute_force_density(mask: PBSBlockMask) -> list[float]:
    """Per KV head: computed key blocks / causally visible key blocks, counted from the
    token mask. A query block's selected permuted blocks are the keys it attends before
    its own region (B keys each); its own region counts every key block it touches."""
    bs, h = mask.block_size, mask.num_kv_heads
    computed, visible = [0] * h, 0
    for b in range(len(mask.batch)):
        dense = mask.to_dense(b).cpu()  # [Hkv, q_len, seq_len]
        ctx = mask.batch.ctx_lens[b]
        blocks = torch.nonzero(mask.qblocks.seq.cpu() == b).flatten().tolist()
        for k in blocks:
            pos, n = int(mask.qblocks.pos[k]), int(mask.qblocks.length[k])
            own, last = int(mask.own_start[k]), pos + n - 1
            visible += last // bs + 1
            rows = dense[:, pos - ctx : pos - ctx + n]  # [Hkv, n, seq_len]
            for head in range(h):
                attended = rows[head].any(dim=0)
                before = int(attended[:own].sum())
                assert before % bs == 0
                touched = torch.nonzero(attended[own:]).flatten() + own
                computed[head] += before // bs + len(set((touched // bs).tolist()))
    return [c / visible for c in computed]


def with_head_counts(mask: PBSBlockMask, gen: torch.Generator) -> PBSBlockMask:
    """`mask` with each head keeping a random prefix of its selected blocks (so heads
    differ; kv_indices stay ascending, the kept ids are still valid)."""
    num = mask.kv_num_blocks
    keep = (torch.rand(num.shape, generator=gen) * (num.double() + 1)).floor().to(num.dtype)
    return dataclasses.replace(mask, kv_num_blocks=keep.clamp(max=num))


@pytest.mark.parametrize("shape", BATCH_SHAPES)
@pytest.mark.parametrize("fraction", [0.0, 0.4, 1.0])
def test_random_mask_matches_brute_force(gen, shape, fraction):
    batch = ChunkBatch(*shape)
    mask = random_block_mask(batch, 16, 32, num_kv_heads=3, fraction=fraction, device="cpu")
    per_head = mask.density_per_head_tensor()
    assert per_head.shape == (3,) and per_head.dtype == torch.float64
    assert per_head.device == mask.kv_num_blocks.device
    torch.testing.assert_close(per_head.tolist(), brute_force_density(mask))
    # Every head has the same visible count: the mean over heads is density_tensor().
    torch.testing.assert_close(per_head.mean(), mask.density_tensor())


@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_heads_that_differ(gen, shape):
    batch = ChunkBatch(*shape)
    mask = with_head_counts(random_block_mask(batch, 16, 64, 4, 0.7, "cpu", seed=3), gen)
    per_head = mask.density_per_head_tensor()
    torch.testing.assert_close(per_head.tolist(), brute_force_density(mask))
    torch.testing.assert_close(per_head.mean(), mask.density_tensor())
    assert len(set(per_head.tolist())) > 1


def test_dense_mask_is_one_per_head():
    batch = ChunkBatch([40, 100], [150, 0])
    per_head = dense_block_mask(batch, 16, 2, "cpu").density_per_head_tensor()
    assert per_head.tolist() == [1.0, 1.0]


def test_estimated_mask_matches_brute_force(gen, paged_kv):
    batch = ChunkBatch(q_lens=[40, 100, 5], ctx_lens=[150, 37, 203])
    hkv, group, d = 2, 2, 64
    q = torch.randn(sum(batch.q_lens), hkv * group, d, generator=gen) * 2
    k, v = torch.randn(2, sum(batch.seq_lens), hkv, d, generator=gen) * 2
    kv = paged_kv(k, v, batch.seq_lens, 16, gen)
    mask = build_block_mask(q, kv, batch, SparsityParams(16, 32, tau=0.8), d**-0.5)
    per_head = mask.density_per_head_tensor()
    torch.testing.assert_close(per_head.tolist(), brute_force_density(mask))
    torch.testing.assert_close(per_head.mean(), mask.density_tensor())
    assert (per_head > 0).all() and (per_head <= 1).all()


def test_static_counts_come_from_the_plan():
    """The own / visible block counts are the plan's host ints (no device work), the same
    for a sparse mask and its plan's dense mask except the own regions."""
    batch = ChunkBatch([40], [150])
    plan = plan_prefill(batch, SparsityParams(block_size=16, segment_size=32), "cpu", 2)
    mask = random_block_mask(batch, 16, 32, 2, 0.5, "cpu", plan=plan)
    # positions 150..189: blocks 9..11, own segments start at 128 / 160 (blocks 8 / 10)
    assert (plan.own_blocks, plan.visible_blocks) == (2 + 1 + 2, 10 + 11 + 12)
    assert mask._static_counts_per_head() == (plan.own_blocks, plan.visible_blocks)
    assert mask._static_counts() == (2 * plan.own_blocks, 2 * plan.visible_blocks)
    dense = plan_prefill(batch, plan_params(plan), "cpu", 2, dense=True).dense_mask()
    assert dense._static_counts_per_head() == (plan.visible_blocks, plan.visible_blocks)
