"""The fused Triton permutation (`permute_region`) against its PyTorch references
(`segment_permutation`, `exact_block_mass`, perm composed with the block table), on fresh
random scores with ties, shuffled pages, a non-zero slot base and segments whose length is
not a power of two."""

from __future__ import annotations

import pytest
import torch

from pbs_vllm.kernels.estimate import exact_block_mass, segment_permutation
from pbs_vllm.kernels.permute import permute_region


def _expected_rows(perm: torch.Tensor, table_row: torch.Tensor, page: int) -> torch.Tensor:
    p = perm.long()
    return (table_row.long()[p // page] * page + p % page).int()


@pytest.mark.parametrize(
    "hkv, n_seg, seg, bs, page, ties, permute",
    [
        (2, 3, 32, 16, 4, False, True),
        (1, 4, 64, 16, 16, True, True),
        (3, 2, 48, 16, 16, True, True),  # segment of 48: sorted in a 64-wide program
        (2, 3, 32, 16, 4, False, False),  # identity (the unpermuted ablation)
    ],
    ids=["h2-s32", "h1-s64-ties", "h3-s48-ties", "identity"],
)
def test_permute_region_matches_reference(gen, device, hkv, n_seg, seg, bs, page, ties, permute):
    n = n_seg * seg
    scores = torch.rand(hkv, n, generator=gen)
    if ties:  # few distinct values: the order must keep ascending positions among equals
        scores = (scores * 4).floor() / 4
    scores[0, :5] = 0.0  # exact zeros sort last, by position
    pages = -(-n // page) + 3
    table_row = torch.randperm(pages, generator=gen).int()
    base, total = 7, 7 + n + 5
    perm = torch.full((hkv, total), -1, dtype=torch.int32)
    rows = torch.full((hkv, total), -1, dtype=torch.int32)
    mass = torch.full((hkv, n // bs), float("nan"))
    to = lambda x: x.to(device)
    perm, rows, mass, scores_d = map(to, (perm, rows, mass, scores))
    permute_region(
        scores_d if permute else None,
        to(table_row),
        page,
        perm,
        rows,
        base,
        n,
        seg,
        bs,
        mass if permute else None,
    )
    perm, rows, mass = perm.cpu(), rows.cpu(), mass.cpu()
    want = segment_permutation(scores, seg) if permute else torch.arange(n).expand(hkv, n).int()
    assert torch.equal(perm[:, base : base + n], want)
    assert torch.equal(rows[:, base : base + n], _expected_rows(want, table_row, page))
    # slots outside [base, base + n) are untouched
    assert (perm[:, :base] == -1).all() and (perm[:, base + n :] == -1).all()
    assert (rows[:, :base] == -1).all() and (rows[:, base + n :] == -1).all()
    if permute:
        ref = exact_block_mass(scores, want, bs)
        got = mass / mass.sum(-1, keepdim=True)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_permute_region_rejects_bad_lengths(device):
    perm = torch.zeros(1, 64, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="multiple of segment_size"):
        permute_region(None, perm[0], 16, perm, perm.clone(), 0, 40, 32, 16)
    with pytest.raises(ValueError, match="mass needs scores"):
        permute_region(None, perm[0], 16, perm, perm.clone(), 0, 32, 32, 16, torch.zeros(1, 2))
