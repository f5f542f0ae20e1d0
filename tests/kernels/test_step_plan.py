"""What the kernels derive from a ChunkBatch is built once per step and shared by layers."""

from __future__ import annotations

import pytest
import torch

from pbs_vllm.kernels import ChunkBatch, PagedKV, SparsityParams, pbs_prefill
from pbs_vllm.kernels.attention import _tile_table
from pbs_vllm.kernels.block_mask import QueryBlocks, dense_block_mask

pytestmark = pytest.mark.usefixtures("triton_kernels")  # tile tables are the Triton kernel's


def test_query_blocks_and_dense_mask_are_built_once_per_batch():
    batch = ChunkBatch(q_lens=[40, 7], ctx_lens=[90, 0])
    qb = QueryBlocks.on(batch, 16, "cpu")
    assert QueryBlocks.on(batch, 16, "cpu") is qb
    assert QueryBlocks.on(batch, 32, "cpu") is not qb
    assert qb.seq.tolist() == [0, 0, 0, 0, 1]  # 90..95, 96..111, 112..127, 128..129 | 0..6
    assert qb.length.tolist() == [6, 16, 16, 2, 7]
    mask = dense_block_mask(batch, 16, 2, "cpu")
    assert dense_block_mask(batch, 16, 2, "cpu") is mask
    fresh = ChunkBatch(q_lens=[40, 7], ctx_lens=[90, 0])
    assert dense_block_mask(fresh, 16, 2, "cpu") is not mask  # cached per batch object


def test_layers_of_a_step_share_the_tile_table(gen):
    """Two layers (two masks over one batch) read the same tile table object."""
    batch = ChunkBatch(q_lens=[70], ctx_lens=[50])
    hkv, d, page = 2, 16, 16
    pages = -(-batch.seq_lens[0] // page)
    kv = PagedKV(
        torch.randn(pages, page, hkv, d, generator=gen),
        torch.randn(pages, page, hkv, d, generator=gen),
        torch.arange(pages, dtype=torch.int32)[None],
    )
    params = SparsityParams(block_size=16, segment_size=32, tau=0.9)
    masks = [
        pbs_prefill(torch.randn(70, 4, d, generator=gen), kv, batch, params, d**-0.5)[1]
        for _ in range(2)
    ]
    assert masks[0] is not masks[1]
    assert _tile_table(masks[0], 2, 32) is _tile_table(masks[1], 2, 32)
