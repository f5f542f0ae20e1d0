"""`PBSAttentionBackend`: the class vLLM loads for `--attention-backend pbs` (CUSTOM).

KV cache layout, block sizes and feature checks are the platform's stock backend's
(FLASH_ATTN on CUDA, CPU_ATTN on CPU; forwarded through `compat.stock_members`), so the
cache is allocated and written exactly as in a stock run. The builder and impl live in
`metadata.py` and `impl.py`.
"""

from __future__ import annotations

from typing import ClassVar

from vllm.v1.attention.backend import AttentionBackend

from pbs_vllm.backend.compat import stock_members
from pbs_vllm.backend.impl import PBSAttentionImpl
from pbs_vllm.backend.metadata import PBSAttentionMetadataBuilder
from pbs_vllm.backend.stock import stock_backend

_STOCK = stock_backend()


class PBSAttentionBackend(AttentionBackend):
    """Permuted block-sparse prefill; decodes and unsupported layers on the stock backend."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar = list(_STOCK.supported_dtypes)
    supported_kv_cache_dtypes: ClassVar = list(_STOCK.supported_kv_cache_dtypes)

    @staticmethod
    def get_name() -> str:
        # The plugin registers this class as AttentionBackendEnum.CUSTOM (alias PBS).
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[PBSAttentionImpl]:
        return PBSAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[PBSAttentionMetadataBuilder]:
        return PBSAttentionMetadataBuilder


for _name, _member in stock_members(_STOCK).items():
    setattr(PBSAttentionBackend, _name, _member)
