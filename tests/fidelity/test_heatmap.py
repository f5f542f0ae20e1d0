"""Heatmap tiles and the PNG."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pbs_vllm.fidelity.heatmap import permuted_key_order, plot_selection_heatmap, tile_coverage
from pbs_vllm.fidelity.report import PromptAttention
from pbs_vllm.fidelity.synthetic import SyntheticSpec, make_synthetic_qkv
from pbs_vllm.kernels.params import SparsityParams

B, S = 16, 64


@pytest.fixture
def masks(seed):
    s = make_synthetic_qkv(SyntheticSpec(seq_len=256, seed=seed))
    prompt = PromptAttention(s.q, s.k, s.v)
    params = SparsityParams(block_size=B, segment_size=S, tau=0.8)
    return prompt.mask(replace(params, permute=False)), prompt.mask(params)


def test_tile_coverage_counts_selected_blocks(masks):
    unpermuted, pbs = masks
    n_cand = (pbs.own_start.long() // B).tolist()
    for mask in (unpermuted, pbs):
        for h in range(mask.num_kv_heads):
            tokens = mask.to_dense(0)[h]
            permuted = tile_coverage(tokens, B, permuted_key_order(mask, h))
            original = tile_coverage(tokens, B)
            for qb, c in enumerate(n_cand):
                sel = mask.kv_indices[h, qb, : mask.kv_num_blocks[h, qb]].long()
                expect = torch.zeros(c)
                expect[sel] = 1.0
                # permuted coordinates: whole selected blocks; original: same total keys
                assert torch.equal(permuted[qb, :c], expect)
                assert original[qb, :c].sum().item() == pytest.approx(len(sel))
                assert original[qb, qb] == pytest.approx((B + 1) / (2 * B))  # causal diagonal
    # the permutation really moves keys: PBS tiles in original order are fractional
    original = tile_coverage(pbs.to_dense(0)[0], B)
    assert ((original > 0) & (original < 1)).any()
    assert torch.equal(permuted_key_order(unpermuted, 0), torch.arange(256))


def test_png_is_written(masks, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "mask.png"
    plot_selection_heatmap(*masks, head=1, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match=r"head=2: must be in \[0, 2\)"):
        plot_selection_heatmap(*masks, head=2, path=path)
