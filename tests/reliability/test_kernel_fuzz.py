"""Property-based fuzzing of the prefill kernels' shape space, on the Triton kernels (the
interpreter on CPU) and on the vectorized PyTorch path CPU tensors take by default.

Hypothesis draws ragged batches (context lengths 0..MAX_CTX, chunk sizes 1..MAX_Q), GQA
ratios, head dims, page sizes and sparsity settings, plus a seed for the data and for the
order in which pages are handed out; `pbs_prefill` must give
the token-level mask of `build_block_mask_ref` and the output of `pbs_attention_ref` on it.
Unreferenced pages and the slots past each sequence's end hold NaN, and the output starts
as NaN, so a stray read or an unwritten row fails the comparison.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbs_vllm.kernels import (
    ChunkBatch,
    PagedKV,
    SparsityParams,
    build_block_mask_ref,
    pbs_attention_ref,
    pbs_prefill,
)
from pbs_vllm.kernels.cpu import KERNELS_ENV

MAX_SEQS, MAX_CTX, MAX_Q = 3, 100, 48
SPARE_PAGES = 2
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3}


@st.composite
def sparsity_params(draw) -> SparsityParams:
    block = 16
    scoring = draw(st.sampled_from(["mean", "antidiagonal"]))
    return SparsityParams(
        block_size=block,
        segment_size=block * draw(st.sampled_from([1, 2, 4])),
        tau=draw(st.sampled_from([0.3, 0.6, 0.9, 1.0])),
        max_kept_fraction=draw(st.sampled_from([None, 0.2, 0.5])),
        permute=draw(st.booleans()),
        scoring=scoring,
        antidiagonal_stride=draw(st.sampled_from([2, 4, 16])) if scoring != "mean" else 8,
        keep_sink=draw(st.booleans()),
    )


@st.composite
def prefill_case(draw) -> dict:
    num_seqs = draw(st.integers(1, MAX_SEQS))
    batch = ChunkBatch(
        q_lens=draw(st.lists(st.integers(1, MAX_Q), min_size=num_seqs, max_size=num_seqs)),
        ctx_lens=draw(st.lists(st.integers(0, MAX_CTX), min_size=num_seqs, max_size=num_seqs)),
    )
    return dict(
        batch=batch,
        kv_heads=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2, 3, 4])),
        head_dim=draw(st.sampled_from([16, 32, 64])),
        page_size=draw(st.sampled_from([4, 8, 16, 32])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        params=draw(sparsity_params()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def scatter_into_pages(
    k: torch.Tensor, v: torch.Tensor, seq_lens: list[int], page_size: int, order: list[int]
) -> PagedKV:
    """Copy varlen K/V [sum(seq_lens), Hkv, D] into pages taken from `order` in turn.

    Pages not handed out (page 0 and the spares), and the slots past each sequence's end,
    hold NaN; the block table gets one extra column pointing at page 0.
    """
    shape = (len(order) + 1, page_size, *k.shape[1:])
    key_cache = torch.full(shape, float("nan"), dtype=k.dtype)
    value_cache = torch.full(shape, float("nan"), dtype=v.dtype)
    table = torch.zeros(
        len(seq_lens), max(-(-n // page_size) for n in seq_lens) + 1, dtype=torch.int32
    )
    pages, start = iter(order), 0
    for b, n in enumerate(seq_lens):
        for i, lo in enumerate(range(0, n, page_size)):
            page, hi = next(pages), min(lo + page_size, n)
            key_cache[page, : hi - lo] = k[start + lo : start + hi]
            value_cache[page, : hi - lo] = v[start + lo : start + hi]
            table[b, i] = page
        start += n
    return PagedKV(key_cache, value_cache, table)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=prefill_case())
def test_pbs_prefill_equals_reference(kernels, case):
    batch, dtype, params = case["batch"], case["dtype"], case["params"]
    hkv, hq, d = case["kv_heads"], case["kv_heads"] * case["group"], case["head_dim"]
    gen = torch.Generator().manual_seed(case["seed"])
    q = torch.randn(sum(batch.q_lens), hq, d, generator=gen).to(dtype)
    k, v = torch.randn(2, sum(batch.seq_lens), hkv, d, generator=gen).to(dtype)
    page = case["page_size"]
    pages = sum(-(-n // page) for n in batch.seq_lens) + SPARE_PAGES
    order = (torch.randperm(pages, generator=gen) + 1).tolist()  # page 0: never referenced
    kv = scatter_into_pages(k, v, batch.seq_lens, page, order)
    scale = d**-0.5

    out = torch.full_like(q, float("nan"))
    with mock.patch.dict(os.environ, {KERNELS_ENV: kernels}):
        got, mask = pbs_prefill(q, kv, batch, params, scale, out=out)
    ref_mask = build_block_mask_ref(q, kv, batch, params, scale)

    for b in range(len(batch)):
        assert torch.equal(mask.to_dense(b), ref_mask.to_dense(b)), f"mask of sequence {b}"
    assert not got.isnan().any()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, pbs_attention_ref(q, kv, ref_mask, scale), rtol=tol, atol=tol)
