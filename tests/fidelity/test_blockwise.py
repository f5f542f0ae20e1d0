"""Blockwise fidelity: over every query block it equals the whole-prompt metric; the
permuted oracle never keeps less true mass than the mask whose counts it takes."""

from __future__ import annotations

import math

import pytest
import torch

from pbs_vllm.fidelity.blockwise import (
    FidelitySums,
    block_parts,
    candidate_block_mass,
    dense_rows,
    mask_keep,
    mask_rows,
    oracle_counts,
    oracle_keep,
    spaced,
)
from pbs_vllm.fidelity.metrics import attend, dense_probs, mask_fidelity
from pbs_vllm.kernels.block_mask import random_block_mask
from pbs_vllm.kernels.estimate_ref import build_block_mask_ref
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
from pbs_vllm.kernels.params import SparsityParams


@pytest.mark.parametrize("n, hq, hkv, d", [(300, 4, 2, 16), (257, 6, 3, 8)])
def test_all_blocks_reproduce_mask_fidelity(gen, n, hq, hkv, d):
    q = torch.randn(n, hq, d, generator=gen) * 2
    k = torch.randn(n, hkv, d, generator=gen)
    v = torch.randn(n, hkv, d, generator=gen)
    params = SparsityParams(block_size=16, segment_size=48, tau=0.8)
    kv = PagedKV.from_contiguous(k, v, [n])
    mask = build_block_mask_ref(q, kv, ChunkBatch([n], [0]), params, d**-0.5)

    sums = FidelitySums(hkv)
    for block in range(len(mask.plan.qblocks_host)):
        rows = mask_rows(q, k, v, mask, block)
        parts = block_parts(rows, v, mask.perm, params.block_size)
        sums.add(rows, parts, mask_keep(mask, block), params.block_size)

    probs = dense_probs(q, k, d**-0.5)
    ref = mask_fidelity(mask.to_dense(0), probs, v, attend(probs, v))
    assert sums.recall == pytest.approx(ref.recall, abs=1e-12)
    assert sums.rel_error == pytest.approx(ref.rel_error, rel=1e-9)
    assert sums.density == pytest.approx(mask.density(), abs=1e-12)
    assert ref.rel_error > 0  # the mask is sparse: something to measure


def test_oracle_keeps_at_least_the_masks_true_mass(gen, seed):
    n, hq, hkv, d, bs = 320, 4, 2, 16, 16
    q = torch.randn(n, hq, d, generator=gen) * 2
    k = torch.randn(n, hkv, d, generator=gen)
    v = torch.randn(n, hkv, d, generator=gen)
    mask = random_block_mask(ChunkBatch([n], [0]), bs, 64, hkv, 0.3, "cpu", seed=seed % 2**31)
    with_cand = [b for b in range(len(mask.plan.qblocks_host)) if int(mask.own_start[b]) > 0]
    blocks = spaced(with_cand, 5)
    assert len(blocks) == 5 and blocks[-1] == len(mask.plan.qblocks_host) - 1
    assert spaced(with_cand, None) == with_cand
    for block in blocks:
        rows = mask_rows(q, k, v, mask, block, dtype=torch.float32)
        parts = block_parts(rows, v, mask.perm, bs)
        counts = mask.kv_num_blocks[:, block]
        pbs, oracle = FidelitySums(hkv), FidelitySums(hkv)
        pbs.add(rows, parts, mask_keep(mask, block), bs)
        keep = oracle_keep(parts, hkv, counts)
        assert keep.sum(-1).tolist() == counts.tolist()
        oracle.add(rows, parts, keep, bs)
        assert oracle.density == pytest.approx(pbs.density)
        assert oracle.recall >= pbs.recall - 1e-6

        mass = candidate_block_mass(parts, hkv)
        assert mass.sum(-1).max() <= 1.0 + 1e-6
        full = FidelitySums(hkv)
        all_cand = oracle_counts(parts, hkv, 1.0)
        assert all_cand.tolist() == [rows.n_cand] * hkv
        full.add(rows, parts, oracle_keep(parts, hkv, all_cand), bs)
        assert full.recall == pytest.approx(1.0, abs=1e-6)
        assert full.rel_error == pytest.approx(0.0, abs=1e-5)


def test_oracle_counts_reach_tau(gen):
    n, hq, hkv, d, bs = 256, 2, 1, 8, 16
    q = torch.randn(n, hq, d, generator=gen) * 3
    k = torch.randn(n, hkv, d, generator=gen)
    mask = random_block_mask(ChunkBatch([n], [0]), bs, 32, hkv, 1.0, "cpu")
    rows = mask_rows(q, k, k, mask, len(mask.plan.qblocks_host) - 1)
    parts = block_parts(rows, k, mask.perm, bs)
    mass = candidate_block_mass(parts, hkv)[0]
    top = mass.sort(descending=True).values
    for tau in (0.5, 0.9, 0.99):
        c = int(oracle_counts(parts, hkv, tau)[0])
        assert float(top[:c].sum()) >= tau * float(mass.sum()) - 1e-12
        assert c == 1 or float(top[: c - 1].sum()) < tau * float(mass.sum())
    assert not math.isnan(float(mass.sum()))


def test_blockwise_needs_a_whole_prompt(gen):
    q = torch.randn(64, 2, 8, generator=gen)
    mask = random_block_mask(ChunkBatch([32], [32]), 16, 32, 1, 0.5, "cpu")
    with pytest.raises(ValueError, match="one whole prompt of 64 tokens"):
        mask_rows(q, q[:, :1], q[:, :1], mask, 0)
    with pytest.raises(ValueError, match="own_start 8"):
        dense_rows(q, q[:, :1], q[:, :1], (16, 32), 8, 16)
