"""`PrefillPlan`: what the kernels derive from a ChunkBatch, built once per step and read
by every layer's estimation and attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from attention_util import _random_qkv

from pbs_vllm.kernels import ChunkBatch, PagedKV, SparsityParams, pbs_prefill, prefill_mask
from pbs_vllm.kernels.attention import _tile_table, tile_shape
from pbs_vllm.kernels.estimate import build_block_mask
from pbs_vllm.kernels.plan import (
    PrefillPlan,
    has_permuted_region,
    plan_for,
    plan_prefill,
    query_blocks,
    tile_table,
)

PARAMS = SparsityParams(block_size=16, segment_size=32, tau=0.8)
# ragged, off block boundaries, one chunk without a permuted region (seq_len 7)
BATCH = ChunkBatch(q_lens=[40, 7, 70], ctx_lens=[90, 0, 50])


def _inputs(gen, paged_kv, batch=BATCH, hq=4, hkv=2, d=16):
    q, k, v = _random_qkv(gen, batch, hq, hkv, d, torch.float32, "cpu")
    return q, paged_kv(k, v, batch.seq_lens, 4, gen)


def test_query_blocks_of_a_ragged_batch():
    qb = query_blocks(ChunkBatch(q_lens=[40, 7], ctx_lens=[90, 0]), 16)
    assert qb.seq.tolist() == [0, 0, 0, 0, 1]  # 90..95, 96..111, 112..127, 128..129 | 0..6
    assert qb.row.tolist() == [0, 6, 22, 38, 40]
    assert qb.length.tolist() == [6, 16, 16, 2, 7]
    assert qb.pos.tolist() == [90, 96, 112, 128, 0]


def test_plan_holds_every_structure_of_its_route():
    both = plan_prefill(BATCH, PARAMS, "cpu", 2, tiles=(2, 32))
    assert both.estimate is not None and both.varlen is not None and both.tiles is not None
    assert both.dense_varlen is None  # sparse: no dense mask, no dense FA3 call
    with pytest.raises(ValueError, match="no dense mask"):
        both.dense_mask()
    fa3 = plan_prefill(BATCH, PARAMS, "cpu", 2, "fa3", tiles=(2, 32))
    assert fa3.tiles is None and fa3.varlen is not None
    triton = plan_prefill(BATCH, PARAMS, "cpu", 2, "triton", tiles=(2, 32))
    assert triton.tiles is not None and triton.varlen is None
    dense = plan_prefill(BATCH, PARAMS, "cpu", 2, "fa3", dense=True)
    assert dense.estimate is None and dense.varlen is None
    assert dense.dense_varlen is not None and dense.dense_mask().segment_size == 0
    short = ChunkBatch(q_lens=[20], ctx_lens=[5])  # inside its first segment
    assert not has_permuted_region(short, PARAMS)
    assert plan_prefill(short, PARAMS, "cpu", 2).dense_mask().num_kv_heads == 2


def test_plan_is_frozen_and_its_repr_names_sizes_not_tensors():
    plan = plan_prefill(BATCH, PARAMS, "cpu", 2, "fa3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.tiles = None
    assert repr(plan) == (
        "PrefillPlan(seqs=3, tokens=117, B=16, S=32, kv_heads=2, device=cpu, route=fa3, "
        "dense=False, query_blocks=10, permuted_slots=224, planned=[estimate, varlen])"
    )
    dense = plan_prefill(BATCH, PARAMS, "cpu", 2, dense=True, tiles=(2, 32))
    assert repr(dense).endswith(
        "route=fa3+triton, dense=True, query_blocks=10, permuted_slots=0, "
        "planned=[dense_mask, tiles, dense_varlen])"
    )
    assert "tensor" not in repr(plan) + repr(dense)


def _assert_device_equals_host(plan: PrefillPlan) -> None:
    host, dev = plan.qblocks_host, plan.qblocks
    for name in ("seq", "row", "length", "pos"):
        assert getattr(dev, name).device == plan.device
        assert torch.equal(getattr(dev, name).cpu(), getattr(host, name))
    est = plan.estimate
    assert est.perm_offset.cpu().tolist() == est.offsets[:-1]
    ss = plan.segment_size
    assert torch.equal(est.own_start.cpu(), host.pos // ss * ss)
    table = tile_table(host, plan.tiles.group, plan.tiles.block_m)
    assert torch.equal(plan.tiles.table.cpu(), table)
    cu = plan.varlen.cu_seqlens_q.cpu().tolist()
    assert cu == host.row.tolist() + [sum(plan.batch.q_lens)]
    assert plan.blocks_per_seq == torch.bincount(host.seq, minlength=len(plan.batch)).tolist()


def test_device_tensors_equal_the_host_ones(gen, paged_kv):
    q, kv = _inputs(gen, paged_kv)
    plan = plan_for(q, kv, BATCH, PARAMS)
    _assert_device_equals_host(plan)
    # the tail rows planned with kv's block table: one cache row per tail slot
    rows = plan.varlen.planned_tail_rows.rows
    pos = plan.varlen.tail_pos
    pages = kv.block_table[plan.varlen.tail_seq, pos // kv.page_size].long()
    assert rows.tolist() == (pages * kv.page_size + pos % kv.page_size).tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_device_tensors_equal_the_host_ones():
    plan = plan_prefill(BATCH, PARAMS, "cuda", 2, tiles=(2, 128))
    assert plan.device == torch.device("cuda", torch.cuda.current_device())
    _assert_device_equals_host(plan)


@pytest.mark.parametrize("kernels", ["torch_kernels", "triton_kernels"])
def test_estimation_with_a_prebuilt_plan_equals_an_on_the_fly_one(gen, paged_kv, kernels, request):
    request.getfixturevalue(kernels)
    q, kv = _inputs(gen, paged_kv)
    plan = plan_for(q, kv, BATCH, PARAMS)
    prebuilt = build_block_mask(q, kv, BATCH, PARAMS, 0.25, plan)
    on_the_fly = build_block_mask(q, kv, BATCH, PARAMS, 0.25)
    assert prebuilt.plan is plan and on_the_fly.plan is not plan
    for name in ("own_start", "kv_num_blocks", "perm", "perm_offset"):
        assert torch.equal(getattr(prebuilt, name), getattr(on_the_fly, name)), name
    for b in range(len(BATCH)):
        assert torch.equal(prebuilt.to_dense(b), on_the_fly.to_dense(b))


def test_layers_of_a_step_share_one_plan(gen, paged_kv, triton_kernels):
    """Two layers (two masks over one plan) read the plan's tile table: nothing is rebuilt."""
    batch = ChunkBatch(q_lens=[70], ctx_lens=[50])
    q, kv = _inputs(gen, paged_kv, batch)
    plan = plan_for(q, kv, batch, PARAMS)
    group, block_m = tile_shape(4, 2, 16, torch.float32, 16)
    assert (plan.tiles.group, plan.tiles.block_m) == (group, block_m)
    masks = [pbs_prefill(torch.randn_like(q), kv, batch, PARAMS, 0.25, plan=plan)[1] for _ in "ab"]
    assert masks[0] is not masks[1] and masks[0].plan is masks[1].plan is plan
    assert _tile_table(masks[0], group, block_m) is plan.tiles.table
    assert _tile_table(masks[1], group, block_m) is plan.tiles.table
    # another tile height (the configuration sweep) gets its own table, built per call
    other = _tile_table(masks[0], group, block_m // 2)
    assert torch.equal(other, tile_table(plan.qblocks_host, group, block_m // 2))


def test_a_plan_used_for_other_inputs_is_refused_naming_the_values(gen, paged_kv):
    q, kv = _inputs(gen, paged_kv)
    plan = plan_for(q, kv, BATCH, PARAMS)
    other_batch = ChunkBatch(q_lens=[40, 8, 69], ctx_lens=[90, 0, 51])
    with pytest.raises(ValueError, match=r"q_lens=\[40, 7, 70\].*q_lens=\[40, 8, 69\]"):
        prefill_mask(q, kv, other_batch, PARAMS, 0.25, plan=plan)
    other_params = dataclasses.replace(PARAMS, segment_size=64)
    with pytest.raises(ValueError, match=r"\(16, 32, None\), used with \(16, 64, None\)"):
        prefill_mask(q, kv, BATCH, other_params, 0.25, plan=plan)
    with pytest.raises(ValueError, match="built for device cpu, used on meta"):
        plan.check(BATCH, PARAMS, "meta")
    with pytest.raises(ValueError, match="num_kv_heads=2, used with 1"):
        plan.check(BATCH, PARAMS, "cpu", 1)
    with pytest.raises(ValueError, match="dense=True, but the plan was built with dense=False"):
        prefill_mask(q, kv, BATCH, PARAMS, 0.25, dense=True, plan=plan)
    # parameters the plan does not depend on are free
    prefill_mask(q, kv, BATCH, dataclasses.replace(PARAMS, tau=0.5), 0.25, plan=plan)


def test_bad_plan_arguments_are_refused_naming_the_values():
    with pytest.raises(ValueError, match="attention='fa2': must be one of"):
        plan_prefill(BATCH, PARAMS, "cpu", 2, "fa2")
    with pytest.raises(ValueError, match="num_kv_heads=0"):
        plan_prefill(BATCH, PARAMS, "cpu", 0)
    with pytest.raises(ValueError, match="page_size=None"):
        plan_prefill(BATCH, PARAMS, "cpu", 2, block_table=torch.zeros(3, 8, dtype=torch.int32))


def test_on_rebuilds_the_plan_for_another_device():
    plan = plan_prefill(BATCH, PARAMS, "cpu", 2, "triton", tiles=(2, 32))
    again = plan.on("cpu")
    assert again is not plan and repr(again) == repr(plan)
    assert torch.equal(again.tiles.table, plan.tiles.table)


def test_on_the_fly_plans_check_the_inputs_first(gen, paged_kv):
    q, kv = _inputs(gen, paged_kv)
    short = PagedKV(kv.key_cache, kv.value_cache, kv.block_table[:, :2])
    with pytest.raises(ValueError, match="block_table has 2 pages per sequence"):
        prefill_mask(q, short, BATCH, PARAMS, 0.25)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_upload_rows_start_on_16_byte_boundaries(dtype, n):
    """A plan's packed uploads give rows that start 16-byte aligned whatever their length
    (Triton would otherwise compile a kernel variant per alignment, i.e. per prompt length)."""
    from pbs_vllm.kernels.paged import upload_rows

    host = torch.arange(3 * n, dtype=dtype).reshape(3, n)
    rows = upload_rows(host, "cpu")
    assert len(rows) == 3
    for i, row in enumerate(rows):
        assert torch.equal(row, host[i])
        assert row.is_contiguous() and row.data_ptr() % 16 == 0


def test_upload_rows_rejects_other_ranks():
    from pbs_vllm.kernels.paged import upload_rows

    with pytest.raises(ValueError, match=r"2-D tensor, got shape \(4,\)"):
        upload_rows(torch.arange(4), "cpu")


def test_plan_index_rows_are_aligned():
    """The query-block rows of a plan (read by the pooling and selection kernels) start on
    16-byte boundaries for every number of query blocks."""
    params = SparsityParams(block_size=16, segment_size=32)
    for q_len in range(17, 17 + 16 * 6, 16):  # 2..7 query blocks
        plan = plan_prefill(ChunkBatch([q_len], [40]), params, "cpu", 2)
        for row in (plan.qblocks.seq, plan.qblocks.row, plan.qblocks.length, plan.qblocks.pos):
            assert row.data_ptr() % 16 == 0, q_len
