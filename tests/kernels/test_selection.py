"""The fused Triton selection (`select_into`) against its PyTorch reference
(`block_probs` + `select_blocks`) on fresh random logits, ties and empty rows included."""

from __future__ import annotations

import pytest
import torch

from pbs_vllm.kernels.params import SparsityParams
from pbs_vllm.kernels.selection import block_probs, select_blocks, select_into

BS, SS = 16, 64


def _case(gen, group: int, hkv: int, n_seg: int, tq: int, ties: bool):
    """Pooled q/k of one sequence whose permuted region has n_seg segments, query blocks
    at random positions up to the region's end, and a shuffled segment-0 permutation."""
    e = 8
    c = n_seg * SS // BS
    q_pool = torch.randn(hkv * group, tq, e, generator=gen)
    k_pool = torch.randn(hkv, c, e, generator=gen)
    if ties:  # equal keys give equal probabilities: the sort must break ties by block
        k_pool[:, 1::2] = k_pool[:, ::2][:, : k_pool[:, 1::2].shape[1]]
    pos = torch.randint(0, (n_seg + 1) * SS, (tq,), generator=gen).sort().values
    pos[-1] = n_seg * SS + 3  # the last query block sees the whole region
    perm = torch.stack([torch.randperm(SS, generator=gen) for _ in range(hkv)])
    perm = torch.cat([perm, torch.arange(SS, n_seg * SS).expand(hkv, -1)], dim=1)
    return q_pool, k_pool, pos.int(), perm.int().contiguous()


_P = dict(block_size=BS, segment_size=SS)


@pytest.mark.parametrize(
    "group, ties, params, dense_from",
    [
        (7, False, SparsityParams(**_P, tau=0.9), None),
        (1, True, SparsityParams(**_P, tau=0.9), None),
        (4, True, SparsityParams(**_P, tau=0.5, keep_sink=False), None),
        (7, True, SparsityParams(**_P, tau=1.0), None),
        (1, False, SparsityParams(**_P, tau=0.95, max_kept_fraction=0.3), None),
        (7, True, SparsityParams(**_P, tau=1.0, max_kept_fraction=0.1), None),
        (4, False, SparsityParams(**_P, tau=0.5), 6),
        (1, True, SparsityParams(**_P, tau=0.9, max_kept_fraction=0.2), 8),
        (7, False, SparsityParams(**_P, tau=0.8, tau_excludes_sink=True), None),
        (4, True, SparsityParams(**_P, tau=0.6, max_kept_fraction=0.3, tau_excludes_sink=True), 7),
    ],
    ids=[
        "g7-tau0.9",
        "g1-ties-tau0.9",
        "g4-ties-tau0.5-nosink",
        "g7-ties-tau1",
        "g1-cap0.3",
        "g7-ties-cap0.1",
        "g4-dense-last-3-blocks",
        "g1-ties-cap0.2-dense-last-block",
        "g7-tau0.8-excl-sink",
        "g4-ties-cap0.3-excl-sink-dense-last",
    ],
)
def test_fused_selection_matches_reference(gen, device, group, params, ties, dense_from):
    hkv, tq, n_seg = 2, 9, 5
    q_pool, k_pool, pos, perm = _case(gen, group, hkv, n_seg, tq, ties)
    c = k_pool.shape[1]
    scale = 0.7
    n_cand = pos // SS * (SS // BS)
    exact = torch.rand(hkv, c, generator=gen)
    exact /= exact.sum(-1, keepdim=True)
    for use_exact in (False, True):
        p = block_probs(q_pool, k_pool, n_cand, scale)
        if use_exact:
            p[:, -1] = exact
        sink = (perm[:, :SS] == 0).int().argmax(dim=-1) // BS
        want_num, want_ids = select_blocks(p, n_cand, sink, params, dense_from)
        width = c + 3  # wider than this sequence's candidates: the tail stays untouched
        num = torch.full((hkv, tq), -7, dtype=torch.int32)
        ids = torch.full((hkv, tq, width), -7, dtype=torch.int32)
        logits = torch.bmm(q_pool.reshape(hkv, group * tq, -1), k_pool.mT).contiguous()
        on = lambda x: x.to(device)
        num, ids = on(num), on(ids)
        select_into(
            on(logits),
            on(pos),
            on(perm),
            on(exact) if use_exact else None,
            num,
            ids,
            params,
            scale,
            dense_from,
        )
        num, ids = num.cpu(), ids.cpu()
        assert torch.equal(num, want_num), (use_exact, num, want_num)
        assert torch.equal(ids[..., :c], want_ids), use_exact
        assert (ids[..., c:] == -7).all()
        assert (num[:, n_cand == 0] == 0).all()
        if dense_from is not None:  # those rows keep every candidate
            assert torch.equal(num[:, dense_from:], n_cand[dense_from:].expand(hkv, -1).int())


def test_fused_selection_rejects_bad_logits(gen):
    params = SparsityParams(block_size=BS, segment_size=SS)
    logits = torch.zeros(2, 10, 8)
    num, ids = torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3, 8, dtype=torch.int32)
    pos = torch.zeros(3, dtype=torch.int32)
    perm = torch.zeros(2, SS, dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        select_into(logits, pos, perm, None, num, ids, params, 1.0)


def test_tau_excluding_the_sink_fills_tau_with_the_other_blocks(gen):
    """With the sink's share out of the budget, a row's kept blocks besides the sink are the
    fewest that reach tau of the other candidates' mass (and the sink is kept)."""
    hkv, tq, n_seg, group = 2, 9, 5, 4
    q_pool, k_pool, pos, perm = _case(gen, group, hkv, n_seg, tq, False)
    k_pool[:, 0] *= 6  # a heavy first block: the sink's share is large for most rows
    n_cand = pos // SS * (SS // BS)
    p = block_probs(q_pool, k_pool, n_cand, 0.7)
    sink = (perm[:, :SS] == 0).int().argmax(dim=-1) // BS
    tau = 0.8
    plain = select_blocks(p, n_cand, sink, SparsityParams(**_P, tau=tau))
    excl = select_blocks(p, n_cand, sink, SparsityParams(**_P, tau=tau, tau_excludes_sink=True))
    assert not torch.equal(excl[0], plain[0])  # the heavy sink block changes selections
    for h in range(hkv):
        for t in range(tq):
            c = int(n_cand[t])
            if c == 0:
                continue
            kept = excl[1][h, t, : int(excl[0][h, t])].long()
            assert int(sink[h]) in kept.tolist()
            others = p[h, t, :c].clone()
            others[sink[h]] = 0
            rest = float(others.sum())
            if rest > 0:
                got = others[kept[kept != sink[h]]].sort(descending=True).values
                assert float(got.sum()) >= tau * rest - 1e-6
                assert float(got[:-1].sum()) < tau * rest + 1e-6  # none to spare


def test_tau_excludes_sink_needs_keep_sink():
    with pytest.raises(ValueError, match="needs keep_sink=True"):
        SparsityParams(**_P, keep_sink=False, tau_excludes_sink=True)
