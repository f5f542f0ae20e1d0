"""PBS mask estimation: Triton importance and `build_block_mask` against the PyTorch reference.

CPU runs use the Triton interpreter at small sizes (B=16, S=32/64, a few hundred keys);
the `gpu` tests run real sizes in bf16.
"""

from __future__ import annotations

import math

import pytest
import torch

from pbs_vllm.kernels import (
    ChunkBatch,
    PagedKV,
    SparsityParams,
    build_block_mask,
    build_block_mask_ref,
)
from pbs_vllm.kernels.attention_ref import gather_sequence_kv
from pbs_vllm.kernels.estimate_ref import key_importance_ref
from pbs_vllm.kernels.importance import key_importance
from pbs_vllm.kernels.inputs import permuted_region_lengths

pytestmark = pytest.mark.usefixtures("triton_kernels")  # the Triton kernels, interpreted on CPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Ragged chunks, most off block boundaries: one whose last B queries straddle a segment
# boundary, one shorter than a block, one with no permuted region.
BATCH = ChunkBatch(q_lens=[40, 100, 5, 20], ctx_lens=[150, 37, 203, 3])


def make_inputs(
    gen,
    paged_kv,
    batch,
    kv_heads,
    group,
    head_dim,
    page_size,
    layout="contiguous",
    dtype=torch.float32,
    device="cpu",
    spread=2.0,
) -> tuple[torch.Tensor, PagedKV]:
    """Random q [T, Hq, D] and a shuffled paged cache holding every key of `batch`."""
    q = torch.randn(sum(batch.q_lens), kv_heads * group, head_dim, generator=gen) * spread
    k, v = torch.randn(2, sum(batch.seq_lens), kv_heads, head_dim, generator=gen) * spread
    kv = paged_kv(k.to(device, dtype), v.to(device, dtype), batch.seq_lens, page_size, gen, layout)
    return q.to(device, dtype), kv


def candidates(mask, k: int) -> int:
    """Permuted key blocks wholly before query block k's segment."""
    seg = mask.segment_size
    return int(mask.qblocks.pos[k]) // seg * seg // mask.block_size


def selections(mask) -> list[list[list[int]]]:
    """Selected block ids per [KV head][query block], as Python lists."""
    num, idx = mask.kv_num_blocks.cpu(), mask.kv_indices.cpu()
    return [
        [idx[h, k, : num[h, k]].tolist() for k in range(num.shape[1])] for h in range(num.shape[0])
    ]


def assert_masks_equal(mask, ref) -> None:
    for name in ("own_start", "perm", "perm_offset", "kv_num_blocks"):
        assert torch.equal(getattr(mask, name).cpu(), getattr(ref, name).cpu()), name
    assert selections(mask) == selections(ref)


@pytest.mark.parametrize(
    "group,head_dim,page_size,layout",
    [(1, 64, 4, "contiguous"), (4, 128, 16, "k_transposed"), (7, 64, 16, "fused")],
)
def test_importance_matches_reference(gen, paged_kv, group, head_dim, page_size, layout):
    q, kv = make_inputs(gen, paged_kv, BATCH, 2, group, head_dim, page_size, layout)
    scale = head_dim**-0.5
    for b, n in enumerate(permuted_region_lengths(BATCH, 32)):
        if n == 0:
            continue
        end, nq = BATCH.cu_seqlens_q[b + 1], min(16, BATCH.q_lens[b])
        # small tiles and splits: several key tiles per split, several splits, partial tiles
        got = key_importance(
            q[end - nq : end],
            kv,
            b,
            BATCH.seq_lens[b] - nq,
            n,
            scale,
            block_m=16,
            block_n=16,
            split_len=48,
        )
        want = key_importance_ref(q, kv, BATCH, b, n, 16, scale)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)


def test_permutation_sorts_reference_scores(gen, paged_kv):
    q, kv = make_inputs(gen, paged_kv, BATCH, 2, 4, 64, 16)
    params = SparsityParams(block_size=16, segment_size=32)
    mask = build_block_mask(q, kv, BATCH, params, 0.125)
    for b, n in enumerate(permuted_region_lengths(BATCH, 32)):
        if n == 0:
            continue
        first = int(mask.perm_offset[b])
        perm = mask.perm[:, first : first + n].long().view(2, -1, 32)
        segment_keys = torch.arange(n).view(1, -1, 32)
        assert torch.equal(perm.sort(dim=-1).values, segment_keys.expand_as(perm))
        scores = key_importance_ref(q, kv, BATCH, b, n, 16, 0.125)
        ranked = scores.gather(1, perm.view(2, n)).view(2, -1, 32)
        assert (ranked[..., 1:] <= ranked[..., :-1]).all()


B16_S32 = dict(block_size=16, segment_size=32)


@pytest.mark.parametrize(
    "params,group,head_dim",
    [
        (SparsityParams(**B16_S32, tau=0.8), 1, 128),
        (SparsityParams(**B16_S32, tau=0.8, exact_last_block=False), 2, 64),
        (SparsityParams(**B16_S32, tau=0.8), 4, 64),
        (SparsityParams(**B16_S32, tau=0.8), 7, 64),
        (SparsityParams(block_size=16, segment_size=64, tau=0.9, max_kept_fraction=0.3), 4, 128),
        (SparsityParams(**B16_S32, tau=0.6, keep_sink=False), 7, 64),
        (SparsityParams(**B16_S32, tau=0.7, tau_excludes_sink=True), 4, 64),
        (SparsityParams(**B16_S32, tau=0.5, permute=False), 1, 64),
        (SparsityParams(**B16_S32, tau=0.5, max_kept_fraction=0.2, dense_last_tokens=20), 4, 64),
        (SparsityParams(**B16_S32, tau=0.7, scoring="antidiagonal", antidiagonal_stride=4), 4, 64),
        (
            SparsityParams(**B16_S32, tau=0.95, scoring="antidiagonal", antidiagonal_stride=16),
            1,
            64,
        ),
    ],
    ids=[
        "mean-g1",
        "pooled_last_block",
        "mean-g4",
        "mean-g7",
        "kept_cap",
        "no_sink",
        "tau_excludes_sink",
        "unpermuted",
        "dense_last_tokens",
        "antidiagonal",
        "antidiagonal_full_stride",
    ],
)
def test_mask_matches_reference(gen, paged_kv, params, group, head_dim):
    q, kv = make_inputs(gen, paged_kv, BATCH, 2, group, head_dim, 4, "head_major")
    mask = build_block_mask(q, kv, BATCH, params, head_dim**-0.5)
    assert_masks_equal(mask, build_block_mask_ref(q, kv, BATCH, params, head_dim**-0.5))


def test_fp16_inputs_match_reference(gen, paged_kv):
    q, kv = make_inputs(gen, paged_kv, BATCH, 2, 2, 64, 16, dtype=torch.float16)
    params = SparsityParams(block_size=16, segment_size=32, tau=0.8)
    assert_masks_equal(
        build_block_mask(q, kv, BATCH, params, 0.125),
        build_block_mask_ref(q, kv, BATCH, params, 0.125),
    )


def test_last_query_block_keeps_tau_of_its_queries_exact_mass(gen, paged_kv):
    """With exact_last_block the chunk's last query block keeps the fewest permuted blocks
    holding >= tau of its scoring queries' attention mass over the candidates."""
    batch, tau, bs = ChunkBatch(q_lens=[48], ctx_lens=[208]), 0.8, 16
    q, kv = make_inputs(gen, paged_kv, batch, 2, 2, 64, 16)
    params = SparsityParams(bs, 32, tau=tau, keep_sink=False)
    mask = build_block_mask(q, kv, batch, params, 0.125)
    n = permuted_region_lengths(batch, 32)[0]
    scores = key_importance_ref(q, kv, batch, 0, n, bs, 0.125)
    for h, per_block in enumerate(selections(mask)):
        keys = mask.perm[h].long().view(-1, bs)
        block_mass = scores[h][keys].sum(-1) / scores[h].sum()
        kept = block_mass[per_block[-1]].sort().values
        assert kept.sum() >= tau - 1e-6 and kept[1:].sum() < tau, (h, per_block[-1])


def test_tau_one_selects_every_candidate(gen, paged_kv):
    q, kv = make_inputs(gen, paged_kv, BATCH, 2, 4, 64, 16)
    mask = build_block_mask(q, kv, BATCH, SparsityParams(16, 32, tau=1.0), 0.125)
    for per_head in selections(mask):
        assert per_head == [list(range(candidates(mask, k))) for k in range(len(mask.qblocks))]


def test_dense_from_counts_blocks_holding_the_last_queries():
    """SparsityParams.dense_from: the first of a chunk's query blocks (at multiples of the
    block size) that holds one of its last dense_last_tokens queries."""
    for ctx in (0, 5, 16, 37, 150):
        for q_len in (1, 3, 16, 40, 100):
            end = ctx + q_len
            starts = [ctx] + list(range((ctx // 16 + 1) * 16, end, 16))  # query blocks
            for n in (0, 1, 15, 16, 17, 33, 500):
                p = SparsityParams(16, 32, dense_last_tokens=n)
                ends = [min((s // 16 + 1) * 16, end) for s in starts]
                want = next((i for i, e in enumerate(ends) if n and e > end - n), len(starts))
                assert p.dense_from(ctx, end) == want, (ctx, q_len, n)


@pytest.mark.parametrize("dense_last_tokens", [1, 16, 17])
def test_dense_last_tokens_keep_every_candidate(gen, paged_kv, dense_last_tokens):
    """The query blocks holding any of each sequence's last dense_last_tokens queries keep
    every candidate (even under a cap); the others are selected as without the option."""
    q, kv = make_inputs(gen, paged_kv, BATCH, 2, 4, 64, 16, spread=0.5)
    base = SparsityParams(16, 32, tau=0.5, max_kept_fraction=0.25)
    params = SparsityParams(
        16, 32, tau=0.5, max_kept_fraction=0.25, dense_last_tokens=dense_last_tokens
    )
    mask = build_block_mask(q, kv, BATCH, params, 0.125)
    plain = build_block_mask(q, kv, BATCH, base, 0.125)
    qb = mask.qblocks
    for k in range(len(qb)):
        last_query = int(qb.pos[k]) + int(qb.length[k]) - 1
        if last_query >= BATCH.seq_lens[int(qb.seq[k])] - dense_last_tokens:
            assert (mask.kv_num_blocks[:, k] == candidates(mask, k)).all(), k
        else:
            assert torch.equal(mask.kv_num_blocks[:, k], plain.kv_num_blocks[:, k]), k
    assert mask.sparsity() < plain.sparsity()


@pytest.mark.parametrize("max_kept_fraction", [0.1, 0.25, 0.5])
def test_max_kept_fraction_bounds_selection(gen, paged_kv, max_kept_fraction):
    q, kv = make_inputs(gen, paged_kv, BATCH, 2, 4, 64, 16, spread=0.5)  # flat attention
    params = SparsityParams(16, 32, tau=0.99, max_kept_fraction=max_kept_fraction)
    mask = build_block_mask(q, kv, BATCH, params, 0.125)
    for k in range(len(mask.qblocks)):
        cap = max(1, math.ceil(max_kept_fraction * candidates(mask, k) - 1e-9))
        if candidates(mask, k):
            assert (mask.kv_num_blocks[:, k] == cap).all()  # flat: tau alone keeps more
        else:
            assert (mask.kv_num_blocks[:, k] == 0).all()


@pytest.mark.parametrize("keep_sink", [True, False])
def test_sink_block_forced(gen, paged_kv, keep_sink):
    batch = ChunkBatch(q_lens=[64], ctx_lens=[192])
    q, kv = make_inputs(gen, paged_kv, batch, 2, 2, 64, 16, spread=3.0)  # peaky attention
    params = SparsityParams(16, 32, tau=0.2, max_kept_fraction=0.1, keep_sink=keep_sink)
    mask = build_block_mask(q, kv, batch, params, 0.125)
    sink = [int((mask.perm[h, :32] == 0).nonzero()) // 16 for h in range(2)]
    has_sink = [[sink[h] in sel for sel in per_head] for h, per_head in enumerate(selections(mask))]
    if keep_sink:
        assert all(all(row) for row in has_sink)
        assert (mask.kv_num_blocks <= 2).all()  # cap ceil(0.1 * 12) = 2 includes the sink
    else:
        assert not all(all(row) for row in has_sink)


def test_unpermuted_is_identity(gen, paged_kv):
    q, kv = make_inputs(gen, paged_kv, BATCH, 3, 2, 64, 16)
    mask = build_block_mask(q, kv, BATCH, SparsityParams(16, 32, permute=False), 0.125)
    for b, n in enumerate(permuted_region_lengths(BATCH, 32)):
        first = int(mask.perm_offset[b])
        assert torch.equal(
            mask.perm[:, first : first + n], torch.arange(n, dtype=torch.int32).expand(3, n)
        )


def test_sequence_without_permuted_region(gen, paged_kv):
    batch = ChunkBatch(q_lens=[30, 70], ctx_lens=[1, 100])  # first ends inside segment 0
    q, kv = make_inputs(gen, paged_kv, batch, 2, 2, 64, 16)
    mask = build_block_mask(q, kv, batch, SparsityParams(16, 32, tau=1.0), 0.125)
    first_seq = mask.qblocks.seq == 0
    assert mask.perm_offset.tolist() == [0, 0] and mask.perm.shape == (2, 160)
    assert (mask.kv_num_blocks[:, first_seq] == 0).all()
    assert (mask.own_start[first_seq] == 0).all()


def test_rejects_bad_inputs(gen, paged_kv):
    q, kv = make_inputs(gen, paged_kv, BATCH, 2, 2, 64, 16)
    params = SparsityParams(16, 32)
    with pytest.raises(ValueError, match="tokens"):
        build_block_mask(q[1:], kv, BATCH, params, 0.125)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        build_block_mask(q[:, :3], kv, BATCH, params, 0.125)
    with pytest.raises(ValueError, match="head_dim"):
        build_block_mask(q[..., :32], kv, BATCH, params, 0.125)


def covered_attention_mass(q, kv, mask, scale) -> float:
    """Mean over queries and heads of the full causal attention mass on the mask's keys."""
    batch = mask.batch
    keys = gather_sequence_kv(kv, 0, batch.seq_lens[0])[0].double()  # [n, Hkv, D]
    group = q.shape[1] // kv.num_kv_heads
    s = torch.einsum("qhd,khd->hqk", q.double(), keys.repeat_interleave(group, dim=1)) * scale
    pos = torch.arange(batch.ctx_lens[0], batch.seq_lens[0])
    s = s.masked_fill(torch.arange(batch.seq_lens[0])[None, :] > pos[:, None], float("-inf"))
    allowed = mask.to_dense(0).repeat_interleave(group, dim=0)
    return (s.softmax(dim=-1) * allowed).sum(dim=-1).mean().item()


def test_permutation_gathers_scattered_heavy_hitters(gen, paged_kv):
    """Four heavy keys per segment, one in each block: at the same block budget the
    permuted selection (heavy keys packed into one block per segment) covers more mass."""
    head_dim, seg, blk = 64, 64, 16
    batch = ChunkBatch(q_lens=[64], ctx_lens=[256])
    direction = torch.randn(head_dim, generator=gen)
    q = torch.randn(64, 2, head_dim, generator=gen) + direction
    k = torch.randn(320, 1, head_dim, generator=gen)
    heavy = torch.tensor(
        [
            s + b * blk + int(torch.randint(blk, (1,), generator=gen))
            for s in range(0, 256, seg)
            for b in range(seg // blk)
        ]
    )
    k[heavy, 0] += direction
    kv = paged_kv(k, torch.randn_like(k), batch.seq_lens, 16, gen)
    scale = head_dim**-0.5
    mass = {}
    for permute in (True, False):
        params = SparsityParams(
            blk, seg, tau=1.0, max_kept_fraction=0.25, permute=permute, keep_sink=False
        )
        mask = build_block_mask(q, kv, batch, params, scale)
        assert (mask.kv_num_blocks == 4).all()
        mass[permute] = covered_attention_mass(q, kv, mask, scale)
    assert mass[True] >= mass[False] + 0.1, mass


# ----------------------------------------------------------------------------- GPU, bf16


@gpu
@pytest.mark.gpu
def test_gpu_importance_matches_reference_32k(gen, paged_kv):
    batch = ChunkBatch(q_lens=[2048], ctx_lens=[30720])
    q, kv = make_inputs(gen, paged_kv, batch, 8, 4, 128, 16, "fused", torch.bfloat16, "cuda", 1.0)
    n = permuted_region_lengths(batch, 256)[0]
    got = key_importance(q[-128:], kv, 0, 32768 - 128, n, 128**-0.5)
    want = key_importance_ref(q, kv, batch, 0, n, 128, 128**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-9)


@gpu
@pytest.mark.gpu
def test_gpu_mask_real_size_against_reference_slice(gen, paged_kv):
    """32K bf16 mask: valid, sorted by reference scores; on a 4K slice (same B, S) the
    selections agree with the reference except where bf16/fp32 rounding flips a near-tie."""
    params = SparsityParams(block_size=128, segment_size=256, tau=0.9)
    batch = ChunkBatch(q_lens=[4096, 1000], ctx_lens=[28672, 3000])
    q, kv = make_inputs(gen, paged_kv, batch, 8, 4, 128, 16, "fused", torch.bfloat16, "cuda", 1.0)
    mask = build_block_mask(q, kv, batch, params, 128**-0.5)
    for b, n in enumerate(permuted_region_lengths(batch, 256)):
        first = int(mask.perm_offset[b])
        perm = mask.perm[:, first : first + n].long().view(8, -1, 256)
        segment_keys = torch.arange(n, device="cuda").view(1, -1, 256)
        assert torch.equal(perm.sort(dim=-1).values, segment_keys.expand_as(perm))
        scores = key_importance_ref(q, kv, batch, b, n, 128, 128**-0.5)
        ranked = scores.gather(1, perm.view(8, n)).view(8, -1, 256)
        assert (ranked[..., 1:] <= ranked[..., :-1] * (1 + 1e-3)).all()

    small = ChunkBatch(q_lens=[1000], ctx_lens=[3000])
    qs, kvs = make_inputs(gen, paged_kv, small, 8, 4, 128, 16, "fused", torch.bfloat16, "cuda", 2.0)
    got = build_block_mask(qs, kvs, small, params, 128**-0.5)
    want = build_block_mask_ref(qs, kvs, small, params, 128**-0.5)
    assert (got.perm == want.perm).float().mean() > 0.99
    agree = (got.kv_num_blocks == want.kv_num_blocks).float().mean()
    assert agree > 0.95 and ((got.kv_num_blocks - want.kv_num_blocks).abs() <= 1).all()


@gpu
@pytest.mark.gpu
def test_gpu_peak_memory_16k_chunk_over_128k_prefix(gen, paged_kv):
    batch = ChunkBatch(q_lens=[16384], ctx_lens=[131072])
    q, kv = make_inputs(gen, paged_kv, batch, 8, 4, 128, 16, "fused", torch.bfloat16, "cuda", 1.0)
    params = SparsityParams(block_size=128, segment_size=256, tau=0.9)
    build_block_mask(q[:2048], kv, ChunkBatch([2048], [145408]), params, 128**-0.5)  # compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    mask = build_block_mask(q, kv, batch, params, 128**-0.5)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 64 * 2**20, f"{extra / 2**20:.1f} MiB"
    assert 0 < mask.density() < 1
