"""Shared fixtures for kernel tests: chunk batches and paged caches (the seeded `gen`
fixture and TRITON_INTERPRET come from tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from pbs_vllm.kernels.cpu import KERNELS_ENV
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV

# Physical layouts of the paged cache; every one is viewed as [pages, page_size, Hkv, D].
#   contiguous    [pages, page_size, Hkv, D]
#   fused         K and V interleaved per page, [pages, 2, page_size, Hkv, D] (vLLM CUDA)
#   head_major    [pages, Hkv, page_size, D] (vLLM CPU)
#   k_transposed  K stored [pages, Hkv, D, page_size], V head_major
CACHE_LAYOUTS = ("contiguous", "fused", "head_major", "k_transposed")


@pytest.fixture
def triton_kernels(monkeypatch):
    """`build_block_mask` / `pbs_attention` on the Triton kernels (the interpreter on the
    CPU) instead of the vectorized PyTorch path CPU tensors take by default."""
    monkeypatch.setenv(KERNELS_ENV, "triton")


@pytest.fixture
def torch_kernels(monkeypatch):
    """`build_block_mask` / `pbs_attention` on the PyTorch path (pbs_vllm.kernels.cpu)."""
    monkeypatch.setenv(KERNELS_ENV, "torch")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _random_chunk_batch(
    gen: torch.Generator, num_seqs: int, max_ctx: int, max_q: int
) -> ChunkBatch:
    """Ragged chunks: q_len in [1, max_q], ctx_len in [0, max_ctx], uniformly at random."""
    q_lens = torch.randint(1, max_q + 1, (num_seqs,), generator=gen).tolist()
    ctx_lens = torch.randint(0, max_ctx + 1, (num_seqs,), generator=gen).tolist()
    return ChunkBatch(q_lens=q_lens, ctx_lens=ctx_lens)


@pytest.fixture
def random_chunk_batch():
    """Factory: random_chunk_batch(gen, num_seqs, max_ctx, max_q) -> ChunkBatch."""
    return _random_chunk_batch


def _layout_views(
    keys: torch.Tensor, values: torch.Tensor, layout: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy logical [pages, page_size, Hkv, D] caches into `layout`; return the views."""
    n, ps, h, d = keys.shape
    if layout == "contiguous":
        return keys.clone(), values.clone()
    if layout == "fused":
        store = torch.stack([keys, values], dim=1).contiguous()
        return store[:, 0], store[:, 1]
    head_major_v = values.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    if layout == "head_major":
        return keys.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3), head_major_v
    if layout == "k_transposed":
        return keys.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), head_major_v
    raise ValueError(f"layout={layout!r}: must be one of {CACHE_LAYOUTS}")


def _paged_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    page_size: int,
    gen: torch.Generator,
    layout: str = "contiguous",
    spare_pages: int = 2,
) -> PagedKV:
    """Page contiguous varlen K/V ([sum(seq_lens), Hkv, D]) into a shuffled cache.

    Page 0 is a never-referenced null page, pages are handed out in random order, and
    spare pages, the null page, and the slots past each sequence's end hold NaN, so any
    read outside the keys a kernel may touch shows up in its output. The block table has
    one extra column pointing at the null page.
    """
    pages_per_seq = [-(-n // page_size) for n in seq_lens]
    num_pages = 1 + sum(pages_per_seq) + spare_pages
    shape = (num_pages, page_size, *k.shape[1:])
    keys = torch.full(shape, float("nan"), dtype=k.dtype, device=k.device)
    values = torch.full(shape, float("nan"), dtype=v.dtype, device=v.device)
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(seq_lens), max(pages_per_seq) + 1, dtype=torch.int32)
    start = 0
    for b, (n, p) in enumerate(zip(seq_lens, pages_per_seq, strict=True)):
        for i in range(p):
            page = order.pop()
            lo, hi = start + i * page_size, min(start + (i + 1) * page_size, start + n)
            keys[page, : hi - lo] = k[lo:hi]
            values[page, : hi - lo] = v[lo:hi]
            table[b, i] = page
        start += n
    key_cache, value_cache = _layout_views(keys, values, layout)
    return PagedKV(key_cache, value_cache, table.to(k.device))


@pytest.fixture
def paged_kv():
    """Factory: paged_kv(k, v, seq_lens, page_size, gen, layout="contiguous") -> PagedKV."""
    return _paged_kv
