"""PBS-Attn kernels: Triton mask estimation and block-sparse attention, plus PyTorch references.

Exports resolve lazily (PEP 562), so importing one of them never imports Triton kernels or
references that are not needed. This package must not import vllm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "SparsityParams": "params",
    "PagedKV": "paged",
    "ChunkBatch": "paged",
    "PBSBlockMask": "block_mask",
    "PrefillPlan": "plan",
    "plan_prefill": "plan",
    "plan_for": "plan",
    "QueryBlocks": "block_mask",
    "dense_block_mask": "block_mask",
    "build_block_mask": "estimate",
    "build_block_mask_ref": "estimate_ref",
    "pbs_attention": "attention",
    "pbs_attention_ref": "attention_ref",
    "pbs_prefill": "prefill",
    "prefill_mask": "prefill",
}

__all__ = [
    "ChunkBatch",
    "PBSBlockMask",
    "PagedKV",
    "PrefillPlan",
    "QueryBlocks",
    "SparsityParams",
    "build_block_mask",
    "build_block_mask_ref",
    "dense_block_mask",
    "pbs_attention",
    "pbs_attention_ref",
    "pbs_prefill",
    "plan_for",
    "plan_prefill",
    "prefill_mask",
]

if TYPE_CHECKING:
    from pbs_vllm.kernels.attention import pbs_attention
    from pbs_vllm.kernels.attention_ref import pbs_attention_ref
    from pbs_vllm.kernels.block_mask import PBSBlockMask, QueryBlocks, dense_block_mask
    from pbs_vllm.kernels.estimate import build_block_mask
    from pbs_vllm.kernels.estimate_ref import build_block_mask_ref
    from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
    from pbs_vllm.kernels.params import SparsityParams
    from pbs_vllm.kernels.plan import PrefillPlan, plan_for, plan_prefill
    from pbs_vllm.kernels.prefill import pbs_prefill, prefill_mask


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
