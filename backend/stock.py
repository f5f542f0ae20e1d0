"""The platform's stock attention backend, and PagedKV views of its KV cache layout.

Decode tokens run on the stock backend (FLASH_ATTN on CUDA, CPU_ATTN on CPU) and the stock
impl writes K/V into the cache. Our prefill kernels read the same cache through strided
views, so nothing is copied and the cache stays byte-identical to a stock run.
"""

from __future__ import annotations

import functools

import torch
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionBackend
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from pbs_vllm.kernels.paged import PagedKV

# CPU_ATTN ISAs that store a page's K as [head_dim, page_size] per head (transposed) and V
# as [page_size, head_dim]. Others (amx, neon, ...) pack K in tiles we cannot view.
CPU_VIEWABLE_ISAS = ("vec", "vec16")


@functools.cache
def stock_backend() -> type[AttentionBackend]:
    """FLASH_ATTN on CUDA, CPU_ATTN on CPU; error on other platforms."""
    if current_platform.is_cpu():
        return AttentionBackendEnum.CPU_ATTN.get_class()
    if current_platform.is_cuda():
        return AttentionBackendEnum.FLASH_ATTN.get_class()
    raise ValueError(
        f"PBS attention runs on CUDA or CPU platforms, not {current_platform.device_name!r}"
    )


def paged_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, cpu_isa: str | None) -> PagedKV:
    """Logical [pages, page_size, Hkv, D] K/V views of one layer's stock KV cache.

    kv_cache: the stock per-layer tensor, logical [pages, Hkv, page_size, 2 * D] (both vLLM
    0.26 and 0.32, FLASH_ATTN and CPU_ATTN). FLASH_ATTN keeps K and V side by side in the
    last dim (pass cpu_isa=None); CPU_ATTN (`cpu_isa` = the ISA its builder set on the layer) splits each (page, head) run into a
    K half stored transposed and a V half.
    """
    if cpu_isa is None:
        key, value = kv_cache.transpose(1, 2).split(kv_cache.shape[-1] // 2, dim=-1)
        return PagedKV(key, value, block_table)
    if cpu_isa not in CPU_VIEWABLE_ISAS:
        raise ValueError(
            f"CPU_ATTN ISA {cpu_isa!r} packs K in a layout PBS cannot read; "
            f"supported: {CPU_VIEWABLE_ISAS}"
        )
    pages, heads, page_size, content = kv_cache.shape
    d = content // 2
    s_page, s_head, s_tok, s_elem = kv_cache.stride()
    if (s_tok, s_elem) != (content, 1):
        raise ValueError(
            f"CPU_ATTN KV cache must be contiguous inside a (page, head) run, got strides "
            f"{kv_cache.stride()} for shape {tuple(kv_cache.shape)}"
        )
    off = kv_cache.storage_offset()
    shape = (pages, page_size, heads, d)
    key = kv_cache.as_strided(shape, (s_page, 1, s_head, page_size), off)
    value = kv_cache.as_strided(shape, (s_page, d, s_head, 1), off + page_size * d)
    return PagedKV(key, value, block_table)
