"""The top-k oracle keeps exactly the budget's block counts, and the heaviest blocks."""

from __future__ import annotations

import pytest
import torch

from pbs_vllm.fidelity.metrics import dense_probs
from pbs_vllm.fidelity.oracle import topk_oracle_mask
from pbs_vllm.kernels.block_mask import random_block_mask
from pbs_vllm.kernels.paged import ChunkBatch

N, B, S, HQ, HKV, D = 200, 16, 48, 4, 2, 16  # N off a block boundary on purpose


def test_oracle_picks_heaviest_candidate_blocks(gen, seed):
    q = torch.randn(N, HQ, D, generator=gen) * 2
    k = torch.randn(N, HKV, D, generator=gen)
    probs = dense_probs(q, k, D**-0.5)
    budget = random_block_mask(ChunkBatch([N], [0]), B, S, HKV, 0.4, "cpu", seed=seed % 2**31)
    oracle = topk_oracle_mask(probs, budget)

    assert torch.equal(oracle.kv_num_blocks, budget.kv_num_blocks)
    assert oracle.density() == pytest.approx(budget.density())
    assert torch.equal(oracle.to_dense(0).sum(), budget.to_dense(0).sum())

    mass = probs.unflatten(0, (HKV, -1)).sum(1)  # [Hkv, N, N]
    n_cand = (budget.own_start.long() // B).tolist()
    tokens = oracle.to_dense(0)
    for h in range(HKV):
        for qb, c in enumerate(n_cand):
            rows = slice(qb * B, min((qb + 1) * B, N))
            blocks = [tokens[h, rows, kb * B : (kb + 1) * B] for kb in range(c)]
            assert all(t.all() or not t.any() for t in blocks)  # whole tiles only
            sel = torch.tensor([bool(t.any()) for t in blocks], dtype=torch.bool)
            assert int(sel.sum()) == int(budget.kv_num_blocks[h, qb])
            if sel.any() and (~sel).any():
                tile_mass = torch.stack(
                    [mass[h, rows, kb * B : (kb + 1) * B].sum() for kb in range(c)]
                )
                assert tile_mass[sel].min() >= tile_mass[~sel].max()


def test_oracle_needs_a_whole_prompt():
    budget = random_block_mask(ChunkBatch([64], [64]), B, S, HKV, 0.5, "cpu")
    with pytest.raises(ValueError, match="one whole prompt of 128 tokens"):
        topk_oracle_mask(torch.ones(HQ, 128, 128, dtype=torch.float64), budget)
