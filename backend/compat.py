"""Every difference between vLLM 0.26 (GPU) and 0.32 (CPU CI) that the backend touches.

* KV cache layout: 0.26 backends declare `get_kv_cache_shape` / `get_kv_cache_stride_order`
  / `get_required_kv_cache_layout`; 0.32 removed them for `supported_kv_cache_layouts` and
  `customize_spec`. `get_supported_kernel_block_sizes` takes no argument in 0.26 and an
  optional `kv_cache_spec` in 0.32. We forward whichever exist to the stock backend
  (`stock_members`), so signatures always match the running version.
* CommonAttentionMetadata: 0.26 still carries the deprecated `_seq_lens_cpu`; both carry
  `seq_lens_cpu_upper_bound` (exact on prefill rows). `host_seq_lens` picks one.
* Impl variants: 0.32 builders find wrapped impls through `get_impl_variants()`; 0.26
  builders use isinstance only. The impl defines the method; 0.26 never calls it.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.attention.backend import AttentionBackend, CommonAttentionMetadata

from pbs_vllm.backend.log import get_logger

logger = get_logger(__name__)

# Class members answered by the stock backend: KV layout (0.26 and 0.32 names), block and
# head sizes, and the feature checks that decide what can run at all (unsupported
# features then run on the stock impl, see impl.unsupported_reason).
STOCK_MEMBERS = (
    # 0.26 KV layout
    "get_kv_cache_shape",
    "get_kv_cache_stride_order",
    "get_kv_cache_block_dim",
    "get_required_kv_cache_layout",
    "indexes_kv_by_block_stride",
    # 0.32 KV layout
    "supported_kv_cache_layouts",
    "customize_spec",
    # both
    "get_supported_kernel_block_sizes",
    "supports_block_size",
    "get_preferred_block_size",
    "get_supported_head_sizes",
    "supports_head_size",
    "supports_dtype",
    "supports_kv_cache_dtype",
    "supports_sliding_window",
    "supports_sink",
    "supports_alibi_sqrt",
    "supports_mm_prefix",
    "supports_attn_type",
    "supports_compute_capability",
    "supports_combination",
)


def stock_members(stock: type[AttentionBackend]) -> dict[str, Any]:
    """{name: staticmethod forwarding to `stock`} for each STOCK_MEMBERS name it has."""
    return {
        name: staticmethod(getattr(stock, name)) for name in STOCK_MEMBERS if hasattr(stock, name)
    }


def host_seq_lens(common: CommonAttentionMetadata) -> torch.Tensor:
    """Host copy of seq_lens [num_reqs], exact on prefill rows, without a device sync.

    Falls back to a device-to-host copy (with one warning) only for metadata built
    without either host copy, e.g. by third-party callers.
    """
    host = common.seq_lens_cpu_upper_bound
    if host is None:
        host = getattr(common, "_seq_lens_cpu", None)
    if host is None:
        logger.warning_once(
            "CommonAttentionMetadata has no host seq_lens; PBS copies them from the device"
        )
        host = common.seq_lens.cpu()
    return host[: common.num_reqs]
